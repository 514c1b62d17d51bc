//! Hibernation of idle MQTT 3.1.1 connections (plain TCP, epoll driver;
//! `broker.limits.hibernate_after`).
//!
//! An open ntex connection costs about 9 KiB (its dispatcher, service pipeline, buffers and
//! tasks), most of it ntex's own. A connection that has had nothing to do for
//! `hibernate_after` (nothing read, nothing to send, nothing in flight, see
//! [`Conn::try_park`](crate::connection::Conn::try_park)) gives all of that back: its
//! worker's connection ends without closing the socket (a duplicate of the descriptor is
//! kept from accept, `accept.rs`), and a small task on the broker's parking thread watches
//! the socket and the session instead ([`watch`]). It answers PINGREQs itself, and ends the
//! connection as the worker would (will published, session detached) when the client
//! closes it, errs, or misses its keepalive. Anything else wakes it: a delivery for the
//! session, a takeover or revoked login, any other bytes from the client. Waking hands the
//! socket back to the worker that parked it, which serves it as a new connection whose
//! first bytes are a CONNECT replayed from the saved state (then what the client sent);
//! the CONNECT handler recognises it ([`take_resume`]) and rebuilds the connection from the
//! saved state without logging in again or touching the session, and the CONNACK it
//! answers is dropped on the way out (`AckFilter`), so the client sees one connection
//! throughout.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    task::Poll,
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    accept::ConnKey,
    acl::ClientAcl,
    connection::{Shared, Slot},
    metrics::Protocol,
    router::Will,
    session::Session,
};

/// What a connection needs again when it wakes; ends the connection (as a close would)
/// when dropped without being resumed.
pub(crate) struct Hibernated(Option<ConnState>);

pub(crate) struct ConnState {
    pub shared: Arc<Shared>,
    pub session: Arc<Session>,
    pub generation: u64,
    pub will: Option<Box<Will>>,
    pub user: Option<Arc<str>>,
    pub acl: ClientAcl,
    pub acl_generation: u64,
    pub slot: Slot,
    pub keep_alive: u16,
    /// When the client last sent anything: its keepalive counts from there.
    pub last_read: Option<std::time::Instant>,
}

impl Hibernated {
    pub fn new(state: ConnState) -> Self {
        Self(Some(state))
    }

    pub fn into_state(mut self) -> ConnState {
        self.0.take().expect("state taken once")
    }

    fn state(&self) -> &ConnState {
        self.0.as_ref().expect("state present until taken")
    }
}

impl Drop for Hibernated {
    fn drop(&mut self) {
        let Some(state) = self.0.take() else {
            return;
        };
        tracing::info!(
            client_id = %state.session.client_id,
            protocol = "3.1.1",
            graceful = false,
            hibernating = true,
            "Client disconnected."
        );
        // As `Conn::finish_now` does for a connection that did not say goodbye.
        let will = if state.session.is_revoked(state.generation) {
            None
        } else {
            state.will.map(|will| *will)
        };
        let router = &state.shared.router;
        router.detach(&state.session, state.generation, will);
        router.metrics().connection_closed(Protocol::V311);
    }
}

/// Sets `SO_LINGER` back to the default (off) on a socket ntex aborted when it let go of it.
pub(crate) fn reset_linger(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_linger(None)
}

/// The thread that runs the parked connections' tasks (one per broker).
pub(crate) struct ParkingLot {
    handle: tokio::runtime::Handle,
    stop: Mutex<Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl ParkingLot {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("edgegw-parked".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
                // Dropping the runtime drops every parked connection's task, which ends
                // the connection (`Hibernated`'s drop).
                drop(runtime);
            })?;
        Ok(Self {
            handle,
            stop: Mutex::new(Some((stop, thread))),
        })
    }

    /// Ends every parked connection and the thread.
    pub fn stop(&self) -> Option<JoinHandle<()>> {
        let (stop, thread) = self.stop.lock().ok()?.take()?;
        let _ = stop.send(());
        Some(thread)
    }

    /// Parks a connection: `stream` is its socket, `listener` the listener that accepted it,
    /// `worker` the worker that served it (and will again).
    pub fn park(
        &self,
        stream: TcpStream,
        listener: usize,
        worker: ntex::rt::Handle,
        state: Hibernated,
    ) {
        let metrics = state.state().shared.router.metrics().clone();
        metrics.hibernated(1);
        let parked = Parked {
            stream,
            listener,
            worker,
            state,
            _counted: Counted(metrics),
        };
        self.handle.spawn(watch(parked));
    }
}

struct Parked {
    stream: TcpStream,
    listener: usize,
    worker: ntex::rt::Handle,
    state: Hibernated,
    _counted: Counted,
}

const PINGREQ: [u8; 2] = [0xc0, 0x00];
const PINGRESP: [u8; 2] = [0xd0, 0x00];

/// What the client sent while hibernating, looked at without taking it: `Ok(true)` when it
/// was only whole PINGREQs, now taken and answered; `Ok(false)` when anything else is there
/// (left in the socket for the woken connection to read); `WouldBlock` when nothing is;
/// `UnexpectedEof` when the client closed the connection; else the socket's error.
async fn answer_pings(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut peeked = [0u8; 64];
    let mut buf = tokio::io::ReadBuf::new(&mut peeked);
    // One look, without waiting: `readable` said there is something.
    let polled = std::future::poll_fn(|cx| Poll::Ready(stream.poll_peek(cx, &mut buf))).await;
    let n = match polled {
        Poll::Pending => return Err(std::io::ErrorKind::WouldBlock.into()),
        Poll::Ready(result) => result?,
    };
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let bytes = &peeked[..n];
    if n % 2 != 0 || !bytes.chunks(2).all(|pair| pair == PINGREQ) {
        return Ok(false);
    }
    // Answered first: a PINGREQ is taken only once its PINGRESP is written (two bytes per
    // PINGREQ; a socket whose send buffer is full wakes instead, the worker answers).
    let answer = PINGRESP.repeat(n / 2);
    match stream.try_write(&answer) {
        Ok(written) if written == answer.len() => {}
        Ok(0) | Err(_) => return Ok(false),
        Ok(_) => return Err(std::io::Error::other("a PINGRESP was cut short")),
    }
    let mut taken = [0u8; 64];
    if stream.try_read(&mut taken[..n])? != n {
        return Err(std::io::Error::other(
            "the PINGREQs answered could not be taken",
        ));
    }
    Ok(true)
}

/// Watches a parked connection until it ends or wakes.
async fn watch(parked: Parked) {
    let Parked {
        stream,
        listener,
        worker,
        mut state,
        _counted,
    } = parked;
    let client_id = state.state().session.client_id.clone();
    let Ok(stream) = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream))
    else {
        return; // `state` ends the connection
    };
    let session = state.state().session.clone();
    let generation = state.state().generation;
    let keep_alive = state.state().keep_alive;
    // MQTT allows 1.5 × the keepalive between packets; 0 means none.
    let allowance = (keep_alive > 0)
        .then(|| Duration::from_secs(u64::from(keep_alive.saturating_add(keep_alive.div_ceil(2)))));
    // From the client's last packet, not from when it hibernated.
    let mut last_read = state
        .state()
        .last_read
        .unwrap_or_else(std::time::Instant::now);
    let expiry = |last_read: std::time::Instant| {
        tokio::time::Instant::from_std(
            last_read + allowance.unwrap_or(Duration::from_secs(86_400 * 365)),
        )
    };
    let deadline = tokio::time::sleep_until(expiry(last_read));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            ready = stream.readable() => {
                if ready.is_err() {
                    return;
                }
                match answer_pings(&stream).await {
                    Ok(true) => {
                        last_read = std::time::Instant::now();
                        deadline.as_mut().reset(expiry(last_read));
                    }
                    Ok(false) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => {
                        if error.kind() != std::io::ErrorKind::UnexpectedEof {
                            tracing::debug!(%client_id, %error, "Hibernating connection failed.");
                        }
                        return;
                    }
                }
            }
            () = session.wait() => {
                if session.needs_connection(generation) || session.is_revoked(generation) {
                    if allowance.is_some() && tokio::time::Instant::now() >= expiry(last_read) {
                        // Its keepalive ran out: a delivery does not revive it.
                        tracing::info!(%client_id, keep_alive, "Closing hibernating connection: no packet within 1.5 × keepalive.");
                        crate::metrics::BrokerMetrics::protocol_error("keepalive_timeout");
                        return;
                    }
                    break;
                }
            }
            () = &mut deadline, if allowance.is_some() => {
                tracing::info!(%client_id, keep_alive, "Closing hibernating connection: no packet within 1.5 × keepalive.");
                crate::metrics::BrokerMetrics::protocol_error("keepalive_timeout");
                return;
            }
        }
    }
    // Wake: back to the worker that parked it.
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if let Some(saved) = state.0.as_mut() {
        saved.last_read = Some(last_read);
    }
    let prefill = connect_packet(state.state());
    state.state().shared.router.metrics().woke();
    let resume = Resume {
        stream,
        listener,
        state,
        prefill,
    };
    // Dropping the handle detaches the task. A worker that stopped drops the future, and with
    // it the connection (ended).
    drop(worker.spawn(async move { resume.run() }));
}

/// Counts a parked connection in `edgegw_broker_hibernating_connections` while it lives.
struct Counted(Arc<crate::metrics::BrokerMetrics>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.hibernated(-1);
    }
}

struct Resume {
    stream: TcpStream,
    listener: usize,
    state: Hibernated,
    prefill: Vec<u8>,
}

impl Resume {
    /// On the worker: serve the socket again, with the CONNECT handler finding `state`.
    fn run(self) {
        let Resume {
            stream,
            listener,
            state,
            prefill,
        } = self;
        let _ = stream.set_nonblocking(false);
        crate::accept::serve_on_worker(listener, stream, Resumed { prefill, state });
    }
}

/// A connection being resumed: the bytes to replay and its saved state.
pub(crate) struct Resumed {
    prefill: Vec<u8>,
    state: Hibernated,
}

thread_local! {
    /// Connections being resumed on this worker, by peer address, with the number of the
    /// connection serving each: the bytes to replay (taken by `WithAcks`) and the saved
    /// state (taken by the CONNECT handler).
    static RESUMING: RefCell<HashMap<ConnKey, (u64, Resumed)>> = RefCell::new(HashMap::new());
}

/// Connection `number` from `peer` serves `resume`.
pub(crate) fn begin_resume(peer: ConnKey, number: u64, resume: Resumed) {
    let replaced = RESUMING.with(|map| map.borrow_mut().insert(peer, (number, resume)));
    drop(replaced);
}

/// Connection `number` from `peer` ended: a resume its CONNECT handler never took ends here.
pub(crate) fn forget(peer: ConnKey, number: u64) {
    let left = RESUMING.with(|map| {
        let mut map = map.borrow_mut();
        if map.get(&peer).is_some_and(|(owner, _)| *owner == number) {
            map.remove(&peer)
        } else {
            None
        }
    });
    drop(left);
}

fn peer_of(io: &ntex::io::IoRef) -> Option<SocketAddr> {
    io.query::<ntex::io::types::PeerAddr>()
        .get()
        .map(|peer| peer.0)
}

/// The bytes to replay into a resumed connection on the listener at `listener` (`None` for
/// any other connection).
pub(crate) fn take_prefill(listener: SocketAddr, io: &ntex::io::IoRef) -> Option<Vec<u8>> {
    if RESUMING.with(|map| map.borrow().is_empty()) {
        return None;
    }
    let peer = (listener, peer_of(io)?);
    RESUMING.with(|map| {
        map.borrow_mut()
            .get_mut(&peer)
            .map(|(_, resume)| std::mem::take(&mut resume.prefill))
    })
}

/// The saved state of a resumed connection on the listener at `listener` (for the CONNECT
/// handler).
pub(crate) fn take_resume(listener: SocketAddr, io: &ntex::io::IoRef) -> Option<Hibernated> {
    if RESUMING.with(|map| map.borrow().is_empty()) {
        return None;
    }
    let peer = (listener, peer_of(io)?);
    RESUMING
        .with(|map| map.borrow_mut().remove(&peer))
        .map(|(_, resume)| resume.state)
}

/// The CONNECT replayed to the MQTT service of a resumed connection: MQTT 3.1.1, the
/// client id and keepalive; no login (the handler does not check it for a resume).
fn connect_packet(state: &ConnState) -> Vec<u8> {
    let client_id = state.session.client_id.as_bytes();
    let remaining = 10 + 2 + client_id.len();
    let mut packet = Vec::with_capacity(remaining + 5);
    packet.push(0x10);
    let mut length = remaining;
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
    packet.extend_from_slice(&state.keep_alive.to_be_bytes());
    packet.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    packet.extend_from_slice(client_id);
    packet
}
