//! Hibernation of idle MQTT connections (3.1.1, and 5.0 while the client has not used a
//! topic alias; plain TCP, epoll driver; `broker.limits.hibernate_after`).
//!
//! An open ntex connection costs about 9 KiB (its dispatcher, service pipeline, buffers and
//! tasks), most of it ntex's own. A connection that has had nothing to do for
//! `hibernate_after` (nothing read, nothing to send, nothing in flight, see
//! [`Conn::try_park`](crate::connection::Conn::try_park)) gives all of that back: its
//! worker's connection ends without closing the socket (a duplicate of the descriptor, taken
//! as it parks, keeps it open: `accept.rs`), and the broker's parking thread watches the socket and
//! the session instead ([`ParkingLot`]: one epoll loop over a slab of records, the session
//! signalling through a hook rather than a task's waker). It answers PINGREQs itself, and
//! ends the connection as the worker would (will published, session detached) when the
//! client closes it, errs, or misses its keepalive. Anything else wakes it: a delivery for the
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
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
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
    /// The keepalive in force (for MQTT 5, the Server Keep Alive when the broker set one).
    pub keep_alive: u16,
    /// When the client last sent anything: its keepalive counts from there.
    pub last_read: Option<std::time::Instant>,
    /// MQTT 5: what its CONNECT asked for and the topic aliases assigned to it (`None`:
    /// MQTT 3.1.1). Boxed: 8 bytes in every parked record rather than the whole of it.
    pub v5: Option<Box<V5State>>,
}

/// What an MQTT 5 connection needs again when it wakes, beyond what 3.1.1 needs: the
/// CONNECT properties ntex-mqtt configures the connection from (replayed as they were), and
/// the topic aliases the broker assigned to the client (the client keeps them).
pub(crate) struct V5State {
    /// The keepalive the client asked for (the replayed CONNECT carries it, so the
    /// connection gets the same Server Keep Alive, if any).
    pub client_keep_alive: u16,
    pub session_expiry_secs: u32,
    pub receive_max: Option<std::num::NonZeroU16>,
    pub max_packet_size: Option<std::num::NonZeroU32>,
    pub topic_alias_max: u16,
    /// False when the client asked for no reason strings or user properties in acks
    /// (ntex-mqtt's codec takes this from the CONNECT it decodes).
    pub request_problem_info: bool,
    /// Outbound topic aliases assigned so far, by topic.
    pub aliases: HashMap<crate::message::ByteString, std::num::NonZeroU16>,
}

impl ConnState {
    pub fn protocol(&self) -> Protocol {
        if self.v5.is_some() {
            Protocol::V5
        } else {
            Protocol::V311
        }
    }

    /// How long the client may stay silent, in seconds (0: no limit), as its awake
    /// connection enforced it: 1.5 × the keepalive, or, for an MQTT 5 client given a lower
    /// Server Keep Alive, what ntex-mqtt enforces for that (1.2 × it, rounded up).
    fn allowance(&self) -> u16 {
        allowance(
            self.keep_alive,
            self.v5.as_ref().map(|v5| v5.client_keep_alive),
        )
    }
}

/// See [`ConnState::allowance`]: `keep_alive` is the keepalive in force, `client_keep_alive`
/// the one an MQTT 5 client asked for.
fn allowance(keep_alive: u16, client_keep_alive: Option<u16>) -> u16 {
    match client_keep_alive {
        Some(asked) if asked > keep_alive && keep_alive != 0 => {
            keep_alive.saturating_add(keep_alive.div_ceil(5))
        }
        _ => crate::connection::keepalive_allowance(keep_alive),
    }
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

    fn state_mut(&mut self) -> &mut ConnState {
        self.0.as_mut().expect("state present until taken")
    }
}

impl Drop for Hibernated {
    fn drop(&mut self) {
        let Some(state) = self.0.take() else {
            return;
        };
        let protocol = state.protocol();
        tracing::info!(
            client_id = %state.session.client_id,
            protocol = protocol.label(),
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
        router.metrics().connection_closed(protocol);
    }
}

/// Sets `SO_LINGER` back to the default (off) on a socket ntex aborted when it let go of it.
pub(crate) fn reset_linger(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_linger(None)
}

/// The thread that watches the parked connections (one per broker): one epoll loop (mio)
/// over a slab of small records, no task or timer per connection, so that a parked
/// connection costs little more than its session.
pub(crate) struct ParkingLot {
    shared: Arc<LotShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ParkingLot {
    /// A broker dropped without [`Broker::stop`](crate::Broker::stop) (or one that failed to
    /// start) does not leave the thread behind.
    fn drop(&mut self) {
        drop(self.stop());
    }
}

/// What the workers and the sessions hand the parking thread.
struct LotShared {
    waker: mio::Waker,
    inbox: Mutex<Inbox>,
}

#[derive(Default)]
struct Inbox {
    /// Connections to watch.
    parked: Vec<Parked>,
    /// Records whose session signalled (slab index, stamp).
    poked: Vec<(usize, u64)>,
    stop: bool,
}

impl LotShared {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

const WAKER: mio::Token = mio::Token(usize::MAX);
/// PINGREQs answered for one readiness event of one connection before it is woken instead.
const PINGS_PER_EVENT: usize = 16;
/// How often keepalives are checked: a client that missed its keepalive is closed up to
/// this much later than its allowance (ntex's own timers tick once a second too).
const SWEEP: Duration = Duration::from_secs(1);

impl ParkingLot {
    pub fn start() -> std::io::Result<Self> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        let shared = Arc::new(LotShared {
            waker,
            inbox: Mutex::new(Inbox::default()),
        });
        // Ending a connection here can start session timers (a will's delay, a session's
        // expiry: `Router::detach`). They need a runtime, which this thread does not run:
        // it enters the one that started the broker (the gateway's tokio runtime).
        let runtime = tokio::runtime::Handle::try_current().ok();
        if runtime.is_none() {
            tracing::warn!(
                "The broker was started outside a tokio runtime: a hibernating connection that ends cannot start its will delay or session expiry."
            );
        }
        let lot = Lot {
            poll,
            shared: shared.clone(),
            records: Vec::new(),
            free: std::collections::BinaryHeap::new(),
            next_stamp: 0,
            runtime,
        };
        let thread = std::thread::Builder::new()
            .name("edgegw-parked".into())
            .spawn(move || lot.run())?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Ends every parked connection and the thread.
    pub fn stop(&self) -> Option<JoinHandle<()>> {
        let thread = self.thread.lock().ok()?.take()?;
        self.shared.inbox().stop = true;
        let _ = self.shared.waker.wake();
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
            // The index of a configured listener.
            listener: listener as u32,
            worker,
            state,
            stamp: 0,
            _counted: Counted(metrics),
        };
        let mut inbox = self.shared.inbox();
        if inbox.stop {
            return; // `parked` ends the connection
        }
        inbox.parked.push(parked);
        drop(inbox);
        let _ = self.shared.waker.wake();
    }
}

/// A parked connection.
struct Parked {
    stream: TcpStream,
    /// u32: together with the descriptor, 8 bytes.
    listener: u32,
    worker: ntex::rt::Handle,
    state: Hibernated,
    /// Tells this record's signals from those of an earlier one in the same slot, and its
    /// session hook from a later record's for the same session.
    stamp: u64,
    _counted: Counted,
}

/// The parking thread's side.
struct Lot {
    poll: mio::Poll,
    shared: Arc<LotShared>,
    /// In place, not boxed: one allocation, resident only as far as it was ever filled.
    records: Vec<Option<Parked>>,
    /// Free slots, lowest first: records stay at the front, and the tail of the slab can
    /// be given back when connections leave (see [`Lot::compact`]).
    free: std::collections::BinaryHeap<std::cmp::Reverse<usize>>,
    next_stamp: u64,
    /// Where the timers of connections that end here run (see [`ParkingLot::start`]).
    runtime: Option<tokio::runtime::Handle>,
}

impl Lot {
    fn run(mut self) {
        let runtime = self.runtime.take();
        let entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
        let mut stopping = false;
        let mut events = mio::Events::with_capacity(256);
        let mut next_sweep = std::time::Instant::now() + SWEEP;
        loop {
            let timeout = next_sweep.saturating_duration_since(std::time::Instant::now());
            if let Err(error) = self.poll.poll(&mut events, Some(timeout))
                && error.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::error!(%error, "The parking thread cannot wait for its connections: ending them.");
                break;
            }
            for event in &events {
                if event.token() != WAKER {
                    self.readable(event.token().0);
                }
            }
            let (parked, poked, stop) = {
                let mut inbox = self.shared.inbox();
                (
                    std::mem::take(&mut inbox.parked),
                    std::mem::take(&mut inbox.poked),
                    inbox.stop,
                )
            };
            if stop {
                stopping = true;
                break;
            }
            for parked in parked {
                self.insert(parked);
            }
            for (index, stamp) in poked {
                if self.stamp_of(index) == Some(stamp) {
                    self.check_session(index);
                }
            }
            let now = std::time::Instant::now();
            if now >= next_sweep {
                for index in 0..self.records.len() {
                    if self.records[index]
                        .as_ref()
                        .is_some_and(|record| expired(&record.state, now))
                    {
                        self.expire(index);
                    }
                }
                self.compact();
                next_sweep = now + SWEEP;
            }
        }
        // The broker stops: the timers the connections ended now start (a will's delay, a
        // session's expiry) go with it, as do those of connections ending on its workers
        // (with the workers' runtime). A runtime of their own takes them, and is dropped.
        drop(entered);
        let discard = stopping
            .then(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .ok()
            })
            .flatten();
        let _entered = discard
            .as_ref()
            .map(|discard| discard.handle().enter())
            .or_else(|| runtime.as_ref().map(tokio::runtime::Handle::enter));
        // Dropping the records ends their connections (`Hibernated`'s drop).
        for index in 0..self.records.len() {
            drop(self.remove(index));
        }
        self.shared.inbox().stop = true;
        let left = std::mem::take(&mut self.shared.inbox().parked);
        drop(left);
    }

    fn stamp_of(&self, index: usize) -> Option<u64> {
        self.records.get(index)?.as_ref().map(|record| record.stamp)
    }

    /// Starts watching `parked`.
    fn insert(&mut self, mut parked: Parked) {
        if parked.stream.set_nonblocking(true).is_err() {
            return; // ends the connection
        }
        self.next_stamp += 1;
        parked.stamp = self.next_stamp;
        let index = self.free.pop().map(|slot| slot.0).unwrap_or_else(|| {
            self.records.push(None);
            self.records.len() - 1
        });
        let fd = parked.stream.as_raw_fd();
        if let Err(error) = self.poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(index),
            mio::Interest::READABLE,
        ) {
            tracing::warn!(%error, "Cannot watch a hibernating connection: ending it.");
            self.free.push(std::cmp::Reverse(index));
            return;
        }
        let state = parked.state.state_mut();
        if state.last_read.is_none() {
            state.last_read = Some(std::time::Instant::now());
        }
        let (shared, stamp) = (self.shared.clone(), parked.stamp);
        state.session.set_parked_hook(
            stamp,
            Box::new(move || {
                shared.inbox().poked.push((index, stamp));
                let _ = shared.waker.wake();
            }),
        );
        self.records[index] = Some(parked);
        // Whatever happened to the session before the hook was set.
        self.check_session(index);
    }

    /// Takes record `index` out of the slab and the poll (`None` if there is none).
    fn remove(&mut self, index: usize) -> Option<Parked> {
        let record = self.records.get_mut(index)?.take()?;
        self.free.push(std::cmp::Reverse(index));
        let fd = record.stream.as_raw_fd();
        let _ = self
            .poll
            .registry()
            .deregister(&mut mio::unix::SourceFd(&fd));
        // Only its own: a later connection of the session may have parked meanwhile.
        record.state.state().session.clear_parked_hook(record.stamp);
        Some(record)
    }

    /// Gives back the tail of the slab that no record uses any more (free slots are
    /// reused lowest first, so records gather at the front).
    fn compact(&mut self) {
        let used = self
            .records
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |last| last + 1);
        if used == self.records.len() {
            return;
        }
        self.records.truncate(used);
        self.free.retain(|slot| slot.0 < used);
        if self.records.capacity() > 2 * used + 64 {
            self.records.shrink_to(used + used / 2);
            self.free.shrink_to(used / 2);
        }
    }

    /// The client sent something (or closed, or the socket failed). A client that keeps
    /// sending PINGREQs wakes after `PINGS_PER_EVENT` of them: the worker answers it, and the
    /// other parked connections are not kept waiting.
    fn readable(&mut self, index: usize) {
        for _ in 0..PINGS_PER_EVENT {
            let Some(record) = self.records.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            match answer_pings(&record.stream) {
                Ok(true) => {
                    record.state.state_mut().last_read = Some(std::time::Instant::now());
                }
                Ok(false) => return self.wake(index),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    if error.kind() != std::io::ErrorKind::UnexpectedEof {
                        let client_id = &record.state.state().session.client_id;
                        tracing::debug!(%client_id, %error, "Hibernating connection failed.");
                    }
                    drop(self.remove(index));
                    return;
                }
            }
        }
        self.wake(index);
    }

    /// The session signalled: wake the connection if it has something to do.
    fn check_session(&mut self, index: usize) {
        let Some(record) = self.records.get(index).and_then(Option::as_ref) else {
            return;
        };
        let state = record.state.state();
        if !state.session.needs_connection(state.generation)
            && !state.session.is_revoked(state.generation)
        {
            return;
        }
        if expired(&record.state, std::time::Instant::now()) {
            // Its keepalive ran out: a delivery does not revive it.
            self.expire(index);
        } else {
            self.wake(index);
        }
    }

    fn expire(&mut self, index: usize) {
        let Some(record) = self.remove(index) else {
            return;
        };
        let state = record.state.state();
        tracing::info!(
            client_id = %state.session.client_id,
            keep_alive = state.keep_alive,
            allowance_secs = state.allowance(),
            "Closing hibernating connection: no packet within its keepalive allowance."
        );
        crate::metrics::BrokerMetrics::protocol_error("keepalive_timeout");
    }

    /// Hands the connection back to the worker that parked it.
    fn wake(&mut self, index: usize) {
        let Some(record) = self.remove(index) else {
            return;
        };
        let Parked {
            stream,
            listener,
            worker,
            state,
            ..
        } = record;
        // On the worker: serve the socket again, with the CONNECT handler finding the
        // state. Dropping the handle detaches the task; a worker that stopped drops the
        // future, and with it the connection (ended).
        drop(worker.spawn(async move {
            resume(stream, listener as usize, state, &[]);
        }));
    }
}

/// Serves a connection that has just hibernated again at once, on this worker: ntex read
/// `late` from its socket after the hand-over (a packet the client sent just then), which
/// the woken connection reads after its replayed CONNECT.
pub(crate) fn resume_now(stream: TcpStream, listener: usize, mut state: Hibernated, late: &[u8]) {
    tracing::debug!(
        client_id = %state.state().session.client_id,
        bytes = late.len(),
        "The client sent a packet as its connection hibernated: it wakes at once."
    );
    // Its keepalive counts from these bytes.
    state.state_mut().last_read = Some(std::time::Instant::now());
    // Counted as a wake (the awake connection ended; another serves the client).
    resume(stream, listener, state, late);
}

/// Serves a hibernated connection again on the calling worker: the broker's CONNECT handler
/// gets the replayed CONNECT (which finds `state`), then `extra`, then the socket.
fn resume(stream: TcpStream, listener: usize, state: Hibernated, extra: &[u8]) {
    let mut prefill = connect_packet(state.state());
    prefill.extend_from_slice(extra);
    state.state().shared.router.metrics().woke();
    let _ = stream.set_nonblocking(false);
    crate::accept::serve_on_worker(listener, stream, Resumed { prefill, state });
}

/// Whether the client of `state` missed its keepalive by `now` (see
/// [`ConnState::allowance`]), counted from the client's last packet.
fn expired(state: &Hibernated, now: std::time::Instant) -> bool {
    let state = state.state();
    let allowance = state.allowance();
    if allowance == 0 {
        return false;
    }
    let allowance = Duration::from_secs(u64::from(allowance));
    state
        .last_read
        .is_some_and(|last_read| now >= last_read + allowance)
}

const PINGREQ: [u8; 2] = [0xc0, 0x00];
const PINGRESP: [u8; 2] = [0xd0, 0x00];

/// What the client sent while hibernating, looked at without taking it: `Ok(true)` when it
/// was only whole PINGREQs, now taken and answered; `Ok(false)` when anything else is there
/// (left in the socket for the woken connection to read); `WouldBlock` when nothing is;
/// `UnexpectedEof` when the client closed the connection; else the socket's error.
fn answer_pings(stream: &TcpStream) -> std::io::Result<bool> {
    let mut peeked = [0u8; 64];
    let n = stream.peek(&mut peeked)?;
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
    match (&*stream).write(&answer) {
        Ok(written) if written == answer.len() => {}
        Ok(0) | Err(_) => return Ok(false),
        Ok(_) => return Err(std::io::Error::other("a PINGRESP was cut short")),
    }
    let mut taken = [0u8; 64];
    if (&*stream).read(&mut taken[..n])? != n {
        return Err(std::io::Error::other(
            "the PINGREQs answered could not be taken",
        ));
    }
    Ok(true)
}

/// Counts a parked connection in `edgegw_broker_hibernating_connections` while it lives.
struct Counted(Arc<crate::metrics::BrokerMetrics>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.hibernated(-1);
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

/// The CONNECT replayed to the MQTT service of a resumed connection: its protocol, the
/// client id and keepalive, and for MQTT 5 the properties ntex-mqtt configures the
/// connection from; no will and no login (the handler does not check them for a resume).
fn connect_packet(state: &ConnState) -> Vec<u8> {
    encode_connect(
        &state.session.client_id,
        state.keep_alive,
        state.v5.as_deref(),
    )
}

fn encode_connect(client_id: &str, keep_alive: u16, v5: Option<&V5State>) -> Vec<u8> {
    let client_id = client_id.as_bytes();
    let mut body = Vec::with_capacity(32 + client_id.len());
    match v5 {
        None => {
            body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
            body.extend_from_slice(&keep_alive.to_be_bytes());
        }
        Some(v5) => {
            // Clean start off: the session is there.
            body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5, 0x00]);
            body.extend_from_slice(&v5.client_keep_alive.to_be_bytes());
            let mut properties = Vec::with_capacity(20);
            if v5.session_expiry_secs != 0 {
                properties.push(0x11);
                properties.extend_from_slice(&v5.session_expiry_secs.to_be_bytes());
            }
            if let Some(max) = v5.receive_max {
                properties.push(0x21);
                properties.extend_from_slice(&max.get().to_be_bytes());
            }
            if let Some(size) = v5.max_packet_size {
                properties.push(0x27);
                properties.extend_from_slice(&size.get().to_be_bytes());
            }
            if v5.topic_alias_max != 0 {
                properties.push(0x22);
                properties.extend_from_slice(&v5.topic_alias_max.to_be_bytes());
            }
            if !v5.request_problem_info {
                properties.extend_from_slice(&[0x17, 0]);
            }
            let (length, n) = crate::v3::remaining_length(properties.len());
            body.extend_from_slice(&length[..n]);
            body.extend_from_slice(&properties);
        }
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    let (length, n) = crate::v3::remaining_length(body.len());
    let mut packet = Vec::with_capacity(1 + n + body.len());
    packet.push(0x10);
    packet.extend_from_slice(&length[..n]);
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU16, NonZeroU32};

    use ntex::codec::Decoder;
    use ntex_bytes::BytesMut;
    use ntex_mqtt::{v3, v5};

    use super::{V5State, encode_connect};

    fn v5_state() -> V5State {
        V5State {
            client_keep_alive: 90,
            session_expiry_secs: 3600,
            receive_max: NonZeroU16::new(7),
            max_packet_size: NonZeroU32::new(200_000),
            topic_alias_max: 12,
            request_problem_info: false,
            aliases: Default::default(),
        }
    }

    /// The replayed 5.0 CONNECT, decoded as ntex-mqtt decodes it, carries what the client's
    /// CONNECT asked for.
    #[test]
    fn the_replayed_mqtt_5_connect_carries_the_clients_properties() {
        let client_id = "x".repeat(130); // a two-byte remaining length
        for state in [
            v5_state(),
            V5State {
                session_expiry_secs: 0,
                receive_max: None,
                max_packet_size: None,
                topic_alias_max: 0,
                request_problem_info: true,
                ..v5_state()
            },
        ] {
            let mut bytes = BytesMut::from(&encode_connect(&client_id, 45, Some(&state))[..]);
            let decoded = v5::codec::Codec::new().decode(&mut bytes).unwrap();
            let Some(v5::codec::Decoded::Packet(v5::codec::Packet::Connect(connect), _)) = decoded
            else {
                panic!("not a CONNECT: {decoded:?}");
            };
            assert!(bytes.is_empty(), "the whole packet is the CONNECT");
            assert_eq!(connect.client_id, client_id.as_str());
            assert!(!connect.clean_start);
            assert_eq!(connect.keep_alive, state.client_keep_alive);
            assert_eq!(
                connect.session_expiry_interval_secs,
                state.session_expiry_secs
            );
            assert_eq!(connect.receive_max, state.receive_max);
            assert_eq!(connect.max_packet_size, state.max_packet_size);
            assert_eq!(connect.topic_alias_max, state.topic_alias_max);
            assert_eq!(connect.request_problem_info, state.request_problem_info);
            assert!(connect.last_will.is_none() && connect.username.is_none());
        }
    }

    #[test]
    fn the_replayed_mqtt_3_connect_carries_the_client_id_and_keepalive() {
        let client_id = "y".repeat(130);
        let mut bytes = BytesMut::from(&encode_connect(&client_id, 45, None)[..]);
        let decoded = v3::codec::Codec::new().decode(&mut bytes).unwrap();
        let Some(v3::codec::Decoded::Packet(v3::codec::Packet::Connect(connect), _)) = decoded
        else {
            panic!("not a CONNECT: {decoded:?}");
        };
        assert!(bytes.is_empty());
        assert_eq!(connect.client_id, client_id.as_str());
        assert!(connect.clean_session);
        assert_eq!(connect.keep_alive, 45);
    }

    /// The keepalive of a hibernating connection runs out when it would have awake.
    #[test]
    fn the_allowance_is_what_the_awake_connection_had() {
        use super::allowance;
        assert_eq!(allowance(60, None), 90, "3.1.1: 1.5 × the keepalive");
        assert_eq!(allowance(60, Some(60)), 90, "5.0 with its own keepalive");
        assert_eq!(allowance(61, Some(61)), 92, "rounded up");
        // 5.0 told a lower Server Keep Alive: ntex-mqtt allows 1.2 × it, rounded up.
        assert_eq!(allowance(60, Some(600)), 72);
        assert_eq!(allowance(7, Some(600)), 9);
        assert_eq!(allowance(0, None), 0, "no keepalive");
        assert_eq!(allowance(0, Some(0)), 0, "no keepalive");
    }

    /// Every hibernating connection has one record in the slab (see the module's doc).
    #[test]
    fn a_parked_record_stays_small() {
        assert!(
            std::mem::size_of::<super::Parked>() <= 160,
            "Parked is {} bytes",
            std::mem::size_of::<super::Parked>()
        );
    }
}
