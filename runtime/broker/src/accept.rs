//! The broker's own accept loop and worker services, in place of ntex-server's network
//! builder: that builder turns each accepted socket into an ntex `Io` inside the worker and
//! never gives its descriptor out, and hibernation (`hibernate.rs`) needs it. Here one thread
//! per listener accepts, ntex's worker pool picks the worker (`Server::process`), and the
//! worker's service makes the `Io` itself, noting the descriptor of each plain-TCP MQTT
//! connection when hibernation is on ([`take_descriptor`]).

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ntex::{
    SharedCfg,
    io::Io,
    service::{Ctx, Pipeline, Service},
};

/// A socket accepted on listener `listener` (its index in the broker's settings).
#[derive(Debug)]
pub(crate) struct Accepted {
    pub stream: TcpStream,
    pub listener: usize,
}

/// Makes one listener's connection service (once per worker, on the worker's thread).
pub(crate) type MakeService = Arc<dyn Fn() -> Pipeline<Io, (), ()> + Send + Sync>;

/// One listener as the workers see it.
#[derive(Clone)]
pub(crate) struct ListenerEntry {
    pub addr: SocketAddr,
    pub cfg: SharedCfg,
    pub make: MakeService,
    /// Note the descriptor of each connection, for hibernation.
    pub note_descriptor: bool,
}

/// The workers' configuration (ntex's `ServerConfiguration`): every listener's service.
#[derive(Clone)]
pub(crate) struct Workers {
    pub listeners: Arc<[ListenerEntry]>,
}

impl ntex_server::ServerConfiguration for Workers {
    type Item = Accepted;
    type Service = WorkerService;

    async fn create(&self) -> std::io::Result<WorkerService> {
        let listeners: Rc<[WorkerListener]> = self
            .listeners
            .iter()
            .map(|entry| WorkerListener {
                addr: entry.addr,
                pipeline: (entry.make)(),
                cfg: entry.cfg.clone(),
                note_descriptor: entry.note_descriptor,
            })
            .collect();
        WORKER.with(|worker| *worker.borrow_mut() = Some(listeners.clone()));
        Ok(WorkerService { listeners })
    }
}

pub(crate) struct WorkerListener {
    pub addr: SocketAddr,
    pub pipeline: Pipeline<Io, (), ()>,
    pub cfg: SharedCfg,
    pub note_descriptor: bool,
}

/// A connection on a worker: its listener's address and its peer's.
pub(crate) type ConnKey = (SocketAddr, SocketAddr);

/// A connection's descriptor: the number of the connection, its listener's index, the
/// descriptor (ntex's, open as long as the connection is).
type KeptDescriptor = (u64, usize, RawFd);

thread_local! {
    /// This worker's listener services, for connections resumed from hibernation.
    static WORKER: RefCell<Option<Rc<[WorkerListener]>>> = const { RefCell::new(None) };
    /// The descriptors of this worker's plain-TCP connections (hibernation on), by listener
    /// and peer address, with the number of the connection that owns each.
    static DESCRIPTORS: RefCell<HashMap<ConnKey, KeptDescriptor>> = RefCell::new(HashMap::new());
    static NEXT_NUMBER: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// One worker's service: turns accepted sockets into connections.
pub(crate) struct WorkerService {
    listeners: Rc<[WorkerListener]>,
}

impl Service<(), Accepted> for WorkerService {
    type Res = ();
    type Error = ();

    async fn call(&self, item: Accepted, _: Ctx<'_, Self, ()>) -> Result<(), ()> {
        let Some(listener) = self.listeners.get(item.listener) else {
            return Err(());
        };
        serve(item.listener, listener, item.stream, None);
        Ok(())
    }
}

/// Runs listener `listener`'s service on `stream` (on this worker) for a connection woken
/// from hibernation (`resume`: the bytes to replay and its saved state).
pub(crate) fn serve_on_worker(
    listener: usize,
    stream: TcpStream,
    resume: crate::hibernate::Resumed,
) {
    let Some(listeners) = WORKER.with(|worker| worker.borrow().clone()) else {
        tracing::error!("No listener services on this thread: connection dropped.");
        return;
    };
    let Some(entry) = listeners.get(listener) else {
        return;
    };
    serve(listener, entry, stream, Some(resume));
}

fn serve(
    index: usize,
    listener: &WorkerListener,
    stream: TcpStream,
    resume: Option<crate::hibernate::Resumed>,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    // Only its number: the connection takes a duplicate when it hibernates.
    let kept = listener.note_descriptor.then(|| stream.as_raw_fd());
    let io = match ntex::rt::from_tcp_stream(stream, listener.cfg.clone()) {
        Ok(io) => io,
        Err(error) => {
            tracing::warn!(%error, "Cannot set up an accepted connection.");
            return;
        }
    };
    let number = NEXT_NUMBER.with(|n| n.replace(n.get() + 1));
    let peer = peer.map(|peer| (listener.addr, peer));
    let resumed = match (peer, resume) {
        (Some(key), Some(resume)) => {
            crate::hibernate::begin_resume(key, number, resume);
            true
        }
        _ => false,
    };
    let key = match (peer, kept) {
        (Some(key), Some(fd)) => {
            DESCRIPTORS.with(|map| map.borrow_mut().insert(key, (number, index, fd)));
            Some(key)
        }
        _ => None,
    };
    let call = listener.pipeline.call_static(io);
    ntex::rt::spawn_detached(async move {
        let _ = call.await;
        if resumed && let Some(peer) = peer {
            crate::hibernate::forget(peer, number);
        }
        if let Some(peer) = key {
            DESCRIPTORS.with(|map| {
                let mut map = map.borrow_mut();
                if map.get(&peer).is_some_and(|(owner, _, _)| *owner == number) {
                    remove_descriptor(&mut map, &peer);
                }
            });
        }
    });
}

/// A duplicate of the descriptor of this worker's connection from `peer` on the listener at
/// `listener`, with the index of the listener (hibernation). Its worker calls this while the
/// connection is open, so the descriptor noted at accept is still its socket; the duplicate's
/// addresses are checked all the same.
pub(crate) fn take_descriptor(listener: SocketAddr, peer: SocketAddr) -> Option<(usize, OwnedFd)> {
    let key = (listener, peer);
    let (number, index, fd) =
        DESCRIPTORS.with(|map| remove_descriptor(&mut map.borrow_mut(), &key))?;
    let copy = match duplicate(fd) {
        Ok(copy) => copy,
        Err(error) => {
            // Out of descriptors, say: it stays awake and tries again when it next idles.
            tracing::debug!(%error, "Cannot duplicate a connection's descriptor: it does not hibernate now.");
            DESCRIPTORS.with(|map| map.borrow_mut().insert(key, (number, index, fd)));
            return None;
        }
    };
    let socket = socket2::SockRef::from(&copy);
    let same = socket
        .peer_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .is_some_and(|addr| addr == peer)
        && socket
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .is_some_and(|addr| addr.port() == listener.port());
    same.then_some((index, copy))
}

/// Removes `key`'s entry, and gives back the room of a map that emptied: after a burst of
/// connections that then hibernate, its table (88 bytes a slot, 16,384 slots for 10,000
/// connections) would otherwise stay.
fn remove_descriptor(
    map: &mut HashMap<ConnKey, KeptDescriptor>,
    key: &ConnKey,
) -> Option<KeptDescriptor> {
    let removed = map.remove(key);
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
    removed
}

/// This process, as a pidfd (an error where the kernel has none: before Linux 5.3).
fn own_pidfd() -> std::io::Result<BorrowedFd<'static>> {
    static PIDFD: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    PIDFD
        .get_or_init(|| {
            rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty(),
            )
            .ok()
        })
        .as_ref()
        .map(OwnedFd::as_fd)
        .ok_or_else(|| std::io::Error::other("no pidfd for this process (Linux 5.3 or later)"))
}

/// A new descriptor for the open socket `fd` of this process (`pidfd_getfd`, Linux 5.6:
/// the safe way to duplicate a descriptor known only by number; the workspace forbids
/// `unsafe`).
fn duplicate(fd: RawFd) -> std::io::Result<OwnedFd> {
    rustix::process::pidfd_getfd(own_pidfd()?, fd, rustix::process::PidfdGetfdFlags::empty())
        .map_err(std::io::Error::from)
}

/// Whether this kernel lets the broker duplicate its connections' descriptors (hibernation
/// needs it): tried on the pidfd itself.
pub(crate) fn can_duplicate() -> std::io::Result<()> {
    duplicate(own_pidfd()?.as_raw_fd()).map(drop)
}

/// Whether a descriptor is kept for this worker's connection from `peer` on `listener`.
pub(crate) fn has_descriptor(listener: SocketAddr, peer: SocketAddr) -> bool {
    let peer = (listener, peer);
    DESCRIPTORS.with(|map| map.borrow().contains_key(&peer))
}

/// Accepts on `listener` until `stop` is set, handing each socket to a worker.
pub(crate) fn spawn_acceptor(
    listener: TcpListener,
    index: usize,
    server: ntex_server::Server<Accepted>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("edgegw-accept-{index}"))
        .spawn(move || {
            let addr = listener.local_addr().ok();
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let mut item = Accepted {
                            stream,
                            listener: index,
                        };
                        // The pool refuses items until its workers are up (and while it
                        // stops): wait a little for them rather than drop the client.
                        let mut tries = 0;
                        loop {
                            match server.process(item) {
                                Ok(()) => break,
                                Err(back) if tries < 100 && !stop.load(Ordering::Acquire) => {
                                    item = back;
                                    tries += 1;
                                    std::thread::sleep(Duration::from_millis(20));
                                }
                                Err(_) => {
                                    tracing::warn!(listener = ?addr, "No worker took a connection: closed.");
                                    break;
                                }
                            }
                        }
                    }
                    Err(error) => {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        match error.raw_os_error() {
                            // Out of descriptors or memory: back off, as ntex's acceptor did.
                            // EMFILE, ENFILE, ENOMEM, ENOBUFS
                            Some(24 | 23 | 12 | 105) => {
                                tracing::warn!(listener = ?addr, %error, "Cannot accept: backing off 500 ms.");
                                std::thread::sleep(Duration::from_millis(500));
                            }
                            _ => {
                                tracing::debug!(listener = ?addr, %error, "accept failed");
                            }
                        }
                    }
                }
            }
        })
}

/// Wakes an acceptor blocked in `accept` so that it sees its stop flag.
pub(crate) fn wake_acceptor(listener: &TcpListener) {
    // `shutdown` on a listening socket makes a blocked `accept` return (EINVAL) on Linux.
    let _ = socket2::SockRef::from(listener).shutdown(std::net::Shutdown::Both);
}
