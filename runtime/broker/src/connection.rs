//! What v3 and v5 connections share: the per-connection state kept by ntex-mqtt (`Conn`),
//! the writer task that drains the session's queue into the socket, and the QoS 0 lane
//! (`Qos0Lane`) whose task routes inbound QoS 0 messages with streamed payloads in order.
//!
//! Threading: a `Conn` and its writer live on the ntex worker that accepted the connection
//! (`MqttSink` is `Rc`-based). The session they serve is `Send` and is filled by the router
//! from any thread; it wakes the writer through its `Notify`.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::Future,
    pin::Pin,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::Notify;

use crate::{
    auth::Login,
    inflight::{InFlight, Turn},
    message::{Bytes, Message, Origin, QoS},
    metrics::{BrokerMetrics, DropReason, Protocol},
    order::Order,
    router::{AttachOptions, Attached, Routed, Router, Will},
    session::{AckKind, AckOutcome, Outgoing, Session, Superseded},
    topic::{self, Filter, TopicError},
    tree::SubOptions,
};

/// Settings every connection handler needs.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_packet_size: u32,
    pub max_keepalive_secs: u16,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub topic_alias_maximum: u16,
    /// PUBLISH packets per second one connection may send; 0 = unlimited. Faster
    /// publishers are slowed down (their packets wait), never disconnected.
    pub max_publish_rate: u32,
    /// An MQTT connection on a plain TCP listener that has had nothing to do for this long
    /// hibernates (`hibernate.rs`); `None`: never.
    pub hibernate_after: Option<std::time::Duration>,
}

/// State shared by all connections of all listeners.
pub(crate) struct Shared {
    pub router: Router,
    pub limits: ConnectionLimits,
    pub auth: crate::auth::Authenticator,
    pub connections: AtomicUsize,
    pub next_client_number: std::sync::atomic::AtomicU64,
    /// Where idle connections hibernate (`None`: hibernation off).
    pub parking: Option<crate::hibernate::ParkingLot>,
}

impl Shared {
    /// An id for a client that sent an empty one.
    pub fn assign_client_id(&self) -> String {
        let n = self.next_client_number.fetch_add(1, Ordering::Relaxed);
        format!("edgegw-{:x}-{n}", std::process::id())
    }

    /// Attaches a logged-in client to its session. `None` when a reload that ran since the
    /// login no longer accepts it (refuse as not authorized): the reload's sweep cannot see
    /// a session that is not attached yet, so this is checked under the router's sessions
    /// lock, before anything is taken over.
    pub fn attach(&self, options: AttachOptions, login: &Login) -> Option<Attached> {
        let owner = options.owner.clone();
        let client_id = options.client_id.clone();
        let attached = self.router.attach_if(options, || {
            self.auth.generation() == login.generation
                || self.auth.still_valid(owner.as_deref(), login.credential)
        });
        if attached.is_none() {
            BrokerMetrics::refused("not_authorized");
            tracing::info!(
                client_id = %client_id,
                user = owner.as_deref(),
                "Connection refused: the auth settings reloaded during the login no longer accept it."
            );
        }
        attached
    }

    /// Reserves a connection slot; `None` when `max_connections` are open.
    pub fn reserve_slot(self: &Arc<Self>) -> Option<Slot> {
        let previous = self.connections.fetch_add(1, Ordering::AcqRel);
        if previous >= self.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            None
        } else {
            Some(Slot(self.clone()))
        }
    }
}

/// An inbound QoS 2 PUBLISH is either a re-send to ignore or new (with the ticket of its
/// packet id's write to the state file, for persistent sessions).
pub(crate) enum Qos2 {
    Duplicate,
    New(Option<edgegw_store::Ticket>),
}

/// Where an inbound QoS 1 or 2 packet id stands. A PUBLISH is either taken before ntex's
/// service pipeline (the common case, see [`Inbound`]) or passed on to ntex-mqtt, which then
/// follows its packet id itself; the broker keeps track of both so that a packet id's
/// re-sends and PUBREL go where its PUBLISH went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InboundId {
    /// Passed on to ntex-mqtt (QoS 1: until its handler returned; QoS 2: until PUBREL).
    Ntex,
    /// Taken, not acknowledged yet (waiting for the state file).
    Waiting(QoS),
    /// QoS 2 taken and PUBREC sent: waiting for PUBREL.
    Received,
}

/// A PUBLISH taken before ntex's pipeline while its payload arrives in chunks: handled once
/// the last one is read, before any later packet, so it keeps its place in the publisher's
/// order. (ntex's own streaming hands the payload to a handler that runs when next polled:
/// PUBLISHes read right after the last chunk were routed first.)
pub(crate) struct Partial {
    pub topic: crate::message::ByteString,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
    pub payload: ntex_bytes::BytesMut,
    /// Answers the PUBLISH's own call, which holds its place in ntex's ordered acks.
    pub answer: tokio::sync::oneshot::Sender<Result<Option<InboundAck>, crate::BrokerError>>,
}

/// The ack a taken PUBLISH is answered with (ntex writes it in packet order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InboundAck {
    Puback(u16),
    Pubrec(u16),
}

/// What [`Inbound::take`] did with a packet.
pub(crate) enum Taken<'a, R: Inbound> {
    /// Handled: the call's response (an ack ntex writes in packet order, or an error that
    /// closes the connection as ntex's own would).
    Done(Result<R::Res, R::Error>),
    /// Handled once this completes (the connection reads on meanwhile).
    Later(Answering<'a, R>),
    /// For ntex's pipeline.
    Pass(R, Passed),
}

/// The answer of a packet handled later.
pub(crate) type Answering<'a, R> =
    Pin<Box<dyn Future<Output = Result<<R as Inbound>::Res, <R as Inbound>::Error>> + 'a>>;

/// A packet passed on to ntex, to account for once its call returns.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Passed {
    /// A PUBLISH (see [`Conn::pass_publish`]).
    pub publish: bool,
    /// A QoS 1 packet id that is ntex's until the call returns.
    pub qos1_id: Option<u16>,
}

/// An inbound packet the broker may handle itself before ntex-mqtt's service pipeline.
pub(crate) trait Inbound: Sized {
    type Res: Default;
    type Error;
    fn take(self, conn: &Conn) -> Taken<'_, Self>;
}

/// An outstanding answer of a taken PUBLISH ([`Conn::answer_pending`]).
pub(crate) struct AnswerPending<'a>(&'a Conn);

impl Drop for AnswerPending<'_> {
    fn drop(&mut self) {
        let pending = &self.0.pending_answers;
        pending.set(pending.get() - 1);
    }
}

/// What a PUBREL found ([`Conn::take_release`]).
pub(crate) enum Release {
    /// The packet id is ntex's: pass the PUBREL on.
    Ntex,
    /// Answered here with PUBCOMP.
    Answered,
    /// The PUBLISH is still being handled: a protocol violation.
    BeforePubrec,
}

/// A per-connection publish rate limit: publishes get slots `interval` apart, with a burst
/// of one second's worth allowed after a quiet period.
struct RateLimit {
    next: Cell<std::time::Instant>,
    interval: std::time::Duration,
    throttled: metrics::Counter,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        let interval = std::time::Duration::from_secs(1) / per_second.max(1);
        Self {
            // Starting a second in the past allows an initial burst of `per_second`.
            next: Cell::new(
                std::time::Instant::now()
                    .checked_sub(std::time::Duration::from_secs(1))
                    .unwrap_or_else(std::time::Instant::now),
            ),
            interval,
            throttled: metrics::counter!(edgegw_telemetry::names::BROKER_THROTTLED),
        }
    }
}

/// QoS 0 PUBLISHes of one connection waiting, in packet order, for the connection's drain
/// task to route them.
///
/// ntex-mqtt streams the payload of a PUBLISH that arrived split across socket reads. A
/// publish handler that waits for such a payload can be dropped by ntex-mqtt (9.4) before
/// the payload ends, and its message is lost with it: under load about one QoS 0 message in
/// a million went that way. So a QoS 0 handler never waits for a payload: it queues a
/// streamed message here and returns, and the drain task reads the payload and routes it.
/// While anything is queued or being routed, later QoS 0 messages of the connection queue
/// behind it, so QoS 0 order per connection holds. A queued message is routed even if the
/// handler that queued it is dropped. A connection that ends while its lane drains is finished
/// (session detached, will published) by the drain task once the lane is empty, so the will
/// comes after the messages the client sent before it went.
pub(crate) struct Qos0Lane {
    queue: RefCell<VecDeque<Queued0>>,
    /// The drain task runs (it may be routing a message it took off the queue).
    draining: Cell<bool>,
    /// The connection ended while the lane drained: the drain task finishes it.
    finish_when_drained: Cell<bool>,
    /// The connection is being closed for a protocol error: nothing more is routed.
    stopped: Cell<bool>,
    /// Handlers wait while more than this many are queued: ntex stops reading meanwhile.
    max_queued: usize,
    room: Notify,
}

struct Queued0 {
    /// The message with an empty payload: the drain task reads `body` into it.
    message: Message,
    /// Whole (read at once) or streamed by ntex.
    body: ntex_mqtt::Payload,
    /// Its place in [`Conn::in_order`]'s order, taken when it was queued while PUBLISHes
    /// waited there or under a publish rate limit: it is routed on that turn.
    turn: Option<u64>,
}

impl Qos0Lane {
    pub fn new(max_queued: usize) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            finish_when_drained: Cell::new(false),
            stopped: Cell::new(false),
            max_queued: max_queued.max(1),
            room: Notify::new(),
        }
    }

    /// Nothing queued or being routed: a QoS 0 message whose payload is complete may be
    /// routed by its handler at once.
    pub fn is_idle(&self) -> bool {
        !self.draining.get() && !self.stopped.get()
    }

    /// Queues a message (its payload left empty) with ntex's payload for it. True when the
    /// caller must start the drain task ([`Conn::drain_qos0`]).
    fn push(&self, message: Message, body: ntex_mqtt::Payload, turn: Option<u64>) -> bool {
        self.queue.borrow_mut().push_back(Queued0 {
            message,
            body,
            turn,
        });
        !self.draining.replace(true)
    }

    /// `value()` once the queue is within its bound: at once when it is (the common case).
    #[inline(always)]
    pub fn after_room<'a, T: 'a>(&'a self, value: impl FnOnce() -> T + 'a) -> Handled<'a, T> {
        if self.queue.borrow().len() <= self.max_queued {
            return Handled::ready(value());
        }
        Handled::later(async move {
            self.room().await;
            value()
        })
    }

    /// Waits while the queue is over its bound.
    async fn room(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it even before it is polled.
            let notified = self.room.notified();
            if self.queue.borrow().len() <= self.max_queued {
                return;
            }
            notified.await;
        }
    }

    pub fn len(&self) -> usize {
        self.queue.borrow().len()
    }
}

/// One of `max_connections`; released on drop.
pub(crate) struct Slot(Arc<Shared>);

impl Slot {
    /// Another slot for the same connection (one that hibernates: its old one goes with
    /// the worker's connection).
    fn again(&self) -> Slot {
        self.0.connections.fetch_add(1, Ordering::AcqRel);
        Slot(self.0.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-connection state held by ntex-mqtt for the life of the connection.
pub(crate) struct Conn {
    pub shared: Arc<Shared>,
    pub session: Arc<Session>,
    pub generation: u64,
    pub protocol: Protocol,
    /// Boxed, as is `rate`: most clients have neither, and inline they made every
    /// connection 0.17 KiB larger.
    pub will: RefCell<Option<Box<Will>>>,
    /// The client said goodbye properly: no will.
    pub graceful: Cell<bool>,
    /// Wakes the writer when the connection ends.
    pub closed: Rc<Notify>,
    /// Publish rate limit state, when `max_publish_rate` is set.
    rate: Option<Box<RateLimit>>,
    /// What this client may publish and subscribe to: resolved at CONNECT, and again after a
    /// reload moved the authenticator's generation past `acl_generation`.
    pub acl: RefCell<crate::acl::ClientAcl>,
    pub acl_generation: Cell<u64>,
    /// The authenticated user name (`None`: anonymous), for resolving the ACL again.
    pub user: Option<Arc<str>>,
    /// QoS 0 PUBLISHes waiting to be routed in order (see [`Qos0Lane`]).
    pub qos0: Qos0Lane,
    /// The connection's I/O: acks the broker writes itself go here.
    pub io: ntex::io::IoRef,
    /// Inbound QoS 1/2 packet ids in use (see [`InboundId`]); allocates on first use.
    inbound: RefCell<std::collections::HashMap<u16, InboundId, foldhash::fast::RandomState>>,
    /// PUBLISHes taken before ntex's pipeline that wait for the state file.
    inbound_waiting: Cell<u16>,
    /// PUBLISHes passed on to ntex whose calls have not returned.
    passed_publishes: Cell<u32>,
    /// Taken PUBLISHes whose calls have not answered yet (see [`Conn::ack_now`]).
    pending_answers: Cell<u32>,
    /// The payload chunks of a streamed PUBLISH ignored as a re-send are dropped.
    discard_chunks: Cell<bool>,
    /// A taken PUBLISH whose payload is still arriving in chunks.
    partial: RefCell<Option<Box<Partial>>>,
    /// The order of PUBLISHes passed on that must wait (see [`Conn::in_order`]); made on
    /// first use.
    order: std::cell::OnceCell<Box<Order>>,
    finished: Cell<bool>,
    /// The keepalive in force in seconds (for hibernation).
    keep_alive: u16,
    /// MQTT 5: the client has used a topic alias. ntex-mqtt keeps the client's aliases, so
    /// such a connection does not hibernate (a woken one would not know them).
    pub client_aliases: Cell<bool>,
    /// The connection hibernated: its socket and session live on (`hibernate.rs`).
    pub hibernated: Cell<bool>,
    /// Reads seen by the connection's filter when hibernation last looked (`try_park`).
    reads_seen: Cell<u32>,
    slot: Slot,
}

/// The connection state ntex-mqtt holds (`Session<ConnRef>`), shared with the writer, which
/// hibernates the connection when it idles ([`Conn::try_park`]).
#[derive(Clone)]
pub(crate) struct ConnRef(pub Rc<Conn>);

impl std::ops::Deref for ConnRef {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)] // each is one piece of the connection's state
    pub fn new(
        shared: Arc<Shared>,
        session: Arc<Session>,
        generation: u64,
        protocol: Protocol,
        will: Option<Will>,
        user: Option<Arc<str>>,
        acl: crate::acl::ClientAcl,
        acl_generation: u64,
        io: ntex::io::IoRef,
        slot: Slot,
        keep_alive: u16,
        resumed: bool,
    ) -> Self {
        if !resumed {
            shared.router.metrics().connection_opened(protocol);
        }
        crate::acks::attach(&io, &session);
        let reads_seen = Cell::new(crate::acks::reads(&io));
        let qos0 = Qos0Lane::new(usize::from(shared.limits.receive_maximum));
        let rate = match shared.limits.max_publish_rate {
            0 => None,
            per_second => Some(Box::new(RateLimit::new(per_second))),
        };
        Self {
            shared,
            session,
            generation,
            protocol,
            will: RefCell::new(will.map(Box::new)),
            graceful: Cell::new(false),
            closed: Rc::new(Notify::new()),
            rate,
            acl: RefCell::new(acl),
            acl_generation: Cell::new(acl_generation),
            user,
            qos0,
            io,
            inbound: RefCell::default(),
            inbound_waiting: Cell::new(0),
            passed_publishes: Cell::new(0),
            pending_answers: Cell::new(0),
            discard_chunks: Cell::new(false),
            partial: RefCell::new(None),
            order: std::cell::OnceCell::new(),
            finished: Cell::new(false),
            keep_alive,
            client_aliases: Cell::new(false),
            hibernated: Cell::new(false),
            reads_seen,
            slot,
        }
    }

    /// The connection that takes over from a hibernated one when it wakes (a replayed
    /// CONNECT; see `hibernate.rs`): its session, will, user, ACL and slot as they were, and
    /// the client's last read, from which its keepalive counts. Also gives back what an
    /// MQTT 5 connection needs again (`None` for 3.1.1).
    pub(crate) fn resumed(
        state: crate::hibernate::ConnState,
        io: ntex::io::IoRef,
    ) -> (ConnRef, Option<Box<crate::hibernate::V5State>>) {
        let protocol = state.protocol();
        crate::acks::set_last_read(&io, state.last_read);
        let conn = Self::new(
            state.shared,
            state.session,
            state.generation,
            protocol,
            state.will.map(|will| *will),
            state.user,
            state.acl,
            state.acl_generation,
            io,
            state.slot,
            state.keep_alive,
            true,
        );
        tracing::debug!(client_id = %conn.session.client_id, "Connection wakes from hibernation.");
        (ConnRef(Rc::new(conn)), state.v5)
    }

    /// Hibernates the connection if it has had nothing to do since the last call (MQTT
    /// 3.1.1 or 5.0 without client topic aliases, on a plain TCP listener with hibernation
    /// on; see `hibernate.rs`; `v5` gives what a 5.0 connection needs again): nothing read,
    /// nothing being handled, nothing to send or in flight, no bytes buffered either way.
    /// Then the worker's connection ends without closing the socket (a duplicate of its
    /// descriptor keeps it open), and the parking thread watches it. True when it did (the
    /// writer stops).
    pub fn try_park(
        &self,
        listener: std::net::SocketAddr,
        v5: impl FnOnce() -> Option<Box<crate::hibernate::V5State>>,
    ) -> bool {
        if self.shared.parking.is_none() {
            return false;
        }
        let reads = crate::acks::reads(&self.io);
        if reads != self.reads_seen.replace(reads) {
            return false;
        }
        let Some(peer) = self
            .io
            .query::<ntex::io::types::PeerAddr>()
            .get()
            .map(|peer| peer.0)
        else {
            return false;
        };
        let idle = (self.protocol == Protocol::V311 || !self.client_aliases.get())
            && !self.finished.get()
            && crate::accept::has_descriptor(listener, peer)
            && self.inbound.borrow().is_empty()
            && self.inbound_waiting.get() == 0
            && self.passed_publishes.get() == 0
            && self.pending_answers.get() == 0
            && self.partial.borrow().is_none()
            && self.qos0.is_idle()
            && self.qos0.len() == 0
            && self.order.get().is_none_or(|order| order.idle())
            && self.io.read_dst_size() == 0
            && self.io.with_read_src(|buf| buf.is_empty())
            && self.io.with_write_dst(|buf| buf.is_empty())
            && self.io.is_active()
            && !self.session.is_revoked(self.generation)
            && self.session.is_quiet(self.generation);
        if !idle {
            return false;
        }
        let v5 = match self.protocol {
            Protocol::V311 => None,
            Protocol::V5 => match v5() {
                Some(v5) => Some(v5),
                None => return false,
            },
        };
        let Some((listener, fd)) = crate::accept::take_descriptor(listener, peer) else {
            return false;
        };
        let state = crate::hibernate::Hibernated::new(crate::hibernate::ConnState {
            shared: self.shared.clone(),
            session: self.session.clone(),
            generation: self.generation,
            will: self.will.borrow_mut().take(),
            user: self.user.clone(),
            acl: self.acl.borrow().clone(),
            acl_generation: self.acl_generation.get(),
            slot: self.slot.again(),
            keep_alive: self.keep_alive,
            last_read: crate::acks::last_read(&self.io),
            v5,
        });
        // The session stays this connection's: nothing here detaches it.
        self.finished.set(true);
        self.hibernated.set(true);
        tracing::debug!(client_id = %self.session.client_id, "Connection hibernates.");
        let disconnected = self.io.on_disconnect();
        let worker = ntex::rt::Handle::current();
        let late = crate::acks::capture_late_reads(&self.io);
        // ntex aborts the socket it closes (SO_LINGER 0) and closes its descriptor; ours
        // keeps the connection open. Once ntex is done with it, linger is set back.
        self.io.terminate();
        let stream = std::net::TcpStream::from(fd);
        let shared = self.shared.clone();
        ntex::rt::spawn_detached(async move {
            disconnected.await;
            let _ = crate::hibernate::reset_linger(&stream);
            // A packet ntex read after the hand-over: the connection wakes with it at once.
            let late = late.map(|late| std::mem::take(&mut *late.borrow_mut()));
            if let Some(late) = late.filter(|late| !late.is_empty()) {
                crate::hibernate::resume_now(stream, listener, state, &late);
            } else if let Some(parking) = shared.parking.as_ref() {
                parking.park(stream, listener, worker, state);
            }
        });
        true
    }

    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    pub fn client_id(&self) -> &str {
        &self.session.client_id
    }

    /// Handles a PUBLISH passed on to ntex in arrival order: `next` gets the whole payload
    /// and routes the message before it returns. It runs at once when the payload is whole,
    /// there is no publish rate limit and no earlier PUBLISH of this connection waits (the
    /// common case); else it waits for the earlier ones to be routed, for its slot under
    /// `max_publish_rate` and for the last chunk of its payload, in that order. So neither a
    /// payload arriving in chunks nor the rate limit lets a later PUBLISH overtake it.
    /// While the rate limit holds them back, their slots in `AckGuard` fill up and ntex
    /// stops reading from the client (backpressure).
    #[inline(always)]
    pub fn in_order<'a, T: 'a>(
        &'a self,
        body: ntex_mqtt::Payload,
        next: impl FnOnce(Result<Bytes, ntex_mqtt::error::PayloadError>) -> Handled<'a, T> + 'a,
    ) -> Handled<'a, T> {
        if body.is_fixed() && !self.keeps_order() {
            return with_payload(body, next);
        }
        let ticket = self.order().ticket();
        Handled::later(async move {
            ticket.turn().await;
            self.throttle().await;
            let payload = body.read_all().await;
            // Routed (or refused) by the time `next` returns: the turn ends here, before
            // any wait for the state file.
            let handled = next(payload);
            drop(ticket);
            handled.await
        })
    }

    /// Waits for this connection's slot under `max_publish_rate` (no-op when unlimited).
    /// Called only on a PUBLISH's turn in the order of [`Conn::in_order`] (handlers, and
    /// the QoS 0 lane for what it queued under the limit), so slots follow packet order.
    async fn throttle(&self) {
        let Some(rate) = &self.rate else { return };
        let now = std::time::Instant::now();
        // Slots up to a second in the past are taken at once: the burst of one second's
        // worth after a quiet period. (`max(now)` alone would pace even the first ones.)
        let earliest = now
            .checked_sub(std::time::Duration::from_secs(1))
            .unwrap_or(now);
        let slot = rate.next.get().max(earliest);
        rate.next.set(slot + rate.interval);
        if slot > now {
            rate.throttled.increment(1);
            // The runtime's timer counts whole milliseconds: round up, never wake early
            // (slots stay `interval` apart, so a late wake-up does not lower the rate).
            let wait = (slot - now).as_micros().div_ceil(1000);
            ntex::time::sleep(ntex::time::Millis(u32::try_from(wait).unwrap_or(u32::MAX))).await;
        }
    }

    /// Queues a QoS 0 message (its payload left empty) in the lane with ntex's payload for
    /// it ([`Qos0Lane`]). True when the caller must start the drain task
    /// ([`Conn::drain_qos0`]). While PUBLISHes wait in [`Conn::in_order`] or a publish rate
    /// limit applies, it takes its place in that order too: the drain task routes it on its
    /// turn (and takes its rate-limit slot then), so it neither overtakes those waiting
    /// nor is overtaken by those called after it.
    pub fn push_qos0(&self, message: Message, body: ntex_mqtt::Payload) -> bool {
        if self.qos0.stopped.get() {
            return false;
        }
        let turn = self.keeps_order().then(|| self.order().take());
        self.qos0.push(message, body, turn)
    }

    /// A PUBLISH must take a place in the order rather than be routed at once: earlier ones
    /// wait for their turn, or a publish rate limit applies (slots are handed out in turn).
    #[inline]
    fn keeps_order(&self) -> bool {
        self.rate.is_some() || self.order.get().is_some_and(|order| !order.idle())
    }

    fn order(&self) -> &Order {
        self.order.get_or_init(Box::default)
    }

    /// Routes the QoS 0 lane in order until it is empty; run by one task per connection,
    /// started by the handler whose [`Conn::push_qos0`] said so. `valid` applies the
    /// protocol's checks to a message with its whole payload (false: dropped, it logs why);
    /// `refused` handles a topic name the router refuses and says whether the connection is
    /// being closed for it (then nothing after it is routed).
    pub async fn drain_qos0(
        &self,
        valid: impl Fn(&Message) -> bool,
        refused: impl Fn(TopicError) -> bool,
    ) {
        let lane = &self.qos0;
        loop {
            let next = lane.queue.borrow_mut().pop_front();
            let Some(Queued0 {
                mut message,
                body,
                turn,
            }) = next
            else {
                lane.draining.set(false);
                if lane.finish_when_drained.get() {
                    self.finish();
                }
                return;
            };
            if lane.len() == lane.max_queued {
                lane.room.notify_waiters();
            }
            // Dropped (ending its turn) when the message is routed or dropped.
            let ticket = turn.map(|number| self.order().resume(number));
            match body.read_all().await {
                Ok(payload) => message.payload = payload,
                Err(error) => {
                    // The connection ended inside this PUBLISH: it never arrived whole.
                    tracing::debug!(client_id = self.client_id(), topic = %message.topic, %error, "QoS 0 PUBLISH cut short; dropped.");
                    continue;
                }
            }
            if !self.may_publish(&message.topic) || !valid(&message) {
                continue;
            }
            if let Some(ticket) = &ticket {
                ticket.turn().await;
            }
            self.throttle().await;
            if let Err(error) = self.route(message)
                && refused(error)
            {
                lane.stopped.set(true);
                let dropped = std::mem::take(&mut *lane.queue.borrow_mut());
                for queued in dropped {
                    if let Some(number) = queued.turn {
                        drop(self.order().resume(number));
                    }
                }
                lane.room.notify_waiters();
            }
        }
    }

    /// Routes an inbound PUBLISH as this client.
    pub fn route(&self, mut message: Message) -> Result<Routed, TopicError> {
        topic::validate_name(&message.topic)?;
        message.origin = Origin::Session(self.session.id);
        Ok(self.router().publish(message))
    }

    /// The client's PUBACK, PUBREC or PUBCOMP: moves the delivery on and answers a PUBREC
    /// with PUBREL. An ack that does not fit its delivery closes the connection (as ntex
    /// would); one for no delivery in flight is ignored (a late duplicate, as Mosquitto
    /// does), except that a PUBREC is still answered with PUBREL so the client can finish
    /// its side (MQTT 5: with reason code 0x92, packet identifier not found).
    pub fn take_ack(&self, kind: AckKind, packet_id: u16) {
        // Writing fails only when the connection is closing: the delivery stays in flight
        // and its PUBREL goes again after a reconnect.
        match self.session.take_ack(packet_id, kind) {
            AckOutcome::Done if kind == AckKind::Pubrec => {
                write_ack(&self.io, PUBREL, packet_id, false);
            }
            AckOutcome::Unknown if kind == AckKind::Pubrec => {
                write_ack(&self.io, PUBREL, packet_id, self.protocol == Protocol::V5);
            }
            AckOutcome::Done => {}
            AckOutcome::Unknown => {
                tracing::debug!(client_id = self.client_id(), packet_id, ack = ?kind, "Acknowledgement for no delivery in flight; ignored.");
            }
            AckOutcome::Unexpected => {
                BrokerMetrics::protocol_error("violation");
                tracing::warn!(client_id = self.client_id(), packet_id, ack = ?kind, "Closing connection: acknowledgement does not match its delivery's QoS or state.");
                self.io.close();
            }
        }
    }

    /// Where an inbound packet id stands (`None`: not in use on this connection).
    pub fn inbound_id(&self, packet_id: u16) -> Option<InboundId> {
        self.inbound.borrow().get(&packet_id).copied()
    }

    /// Passes a PUBLISH on to ntex-mqtt, which then follows its packet id.
    pub fn pass_publish(&self, qos: QoS, packet_id: Option<u16>) -> Passed {
        if let Some(id) = packet_id {
            self.inbound.borrow_mut().insert(id, InboundId::Ntex);
        }
        Passed {
            qos1_id: packet_id.filter(|_| qos == QoS::AtLeastOnce),
            ..self.pass_resend()
        }
    }

    /// Passes a re-send of a PUBLISH ntex follows (its id is [`InboundId::Ntex`]) back to
    /// ntex, counted like [`Conn::pass_publish`]; the id stays as the first one left it.
    pub fn pass_resend(&self) -> Passed {
        self.passed_publishes.set(self.passed_publishes.get() + 1);
        Passed {
            publish: true,
            qos1_id: None,
        }
    }

    /// ntex's call for a packet passed on returned.
    pub fn passed_done(&self, passed: Passed) {
        if passed.publish {
            self.passed_publishes.set(self.passed_publishes.get() - 1);
        }
        if let Some(id) = passed.qos1_id {
            let mut inbound = self.inbound.borrow_mut();
            if inbound.get(&id) == Some(&InboundId::Ntex) {
                inbound.remove(&id);
            }
        }
    }

    /// Whether a PUBLISH may be taken before ntex's pipeline: no publish rate limit (whose
    /// waits hold back ntex's reading), fewer than `receive_maximum` taken publishes
    /// waiting for the state file (beyond, the in-flight limits of `AckGuard` apply,
    /// `inflight.rs`), and no PUBLISH passed on still waiting for a slot or in ntex's
    /// pipeline (a taken one would be routed before it).
    pub fn may_take_publish(&self) -> bool {
        self.rate.is_none()
            && self.inbound_waiting.get() < self.shared.limits.receive_maximum
            && self.passed_publishes.get() == 0
    }

    /// Drops the payload chunks that follow (a streamed PUBLISH ignored as a re-send).
    pub fn discard_payload(&self) {
        self.discard_chunks.set(true);
    }

    /// A payload chunk: true if it belongs to a PUBLISH being ignored (and is dropped).
    pub fn discarded_chunk(&self, eof: bool) -> bool {
        if !self.discard_chunks.get() {
            return false;
        }
        if eof {
            self.discard_chunks.set(false);
        }
        true
    }

    /// Starts collecting a taken PUBLISH's payload.
    pub fn begin_partial(&self, partial: Partial) {
        *self.partial.borrow_mut() = Some(Box::new(partial));
    }

    /// A payload chunk of a taken PUBLISH: `Err(chunk)` if none is being collected (the
    /// chunk is ntex's), `Ok(Some(publish))` with its whole payload after the last one.
    pub fn partial_chunk(&self, chunk: Bytes, eof: bool) -> Result<Option<Box<Partial>>, Bytes> {
        let mut partial = self.partial.borrow_mut();
        let Some(collecting) = partial.as_mut() else {
            return Err(chunk);
        };
        collecting.payload.extend_from_slice(&chunk);
        Ok(if eof { partial.take() } else { None })
    }

    /// A taken PUBLISH waits for the state file before its ack.
    pub fn inbound_wait(&self, qos: QoS, packet_id: Option<u16>) {
        if let Some(id) = packet_id {
            self.inbound
                .borrow_mut()
                .insert(id, InboundId::Waiting(qos));
        }
        self.inbound_waiting.set(self.inbound_waiting.get() + 1);
    }

    /// Ends a taken PUBLISH: its ack (QoS 2: PUBREC, the packet id then waits for PUBREL),
    /// or its error, which closes the connection (MQTT 3.1.1 has no negative ack; the
    /// publisher re-sends after reconnecting). `waited`: it was [`Conn::inbound_wait`]ing.
    pub fn publish_done(
        &self,
        qos: QoS,
        packet_id: Option<u16>,
        waited: bool,
        result: Result<(), crate::BrokerError>,
    ) -> Result<Option<InboundAck>, crate::BrokerError> {
        if waited {
            self.inbound_waiting.set(self.inbound_waiting.get() - 1);
        }
        match (result, packet_id) {
            (Ok(()), Some(id)) if qos == QoS::ExactlyOnce => Ok(Some(self.received_qos2(id))),
            (Ok(()), Some(id)) => {
                if waited {
                    self.inbound.borrow_mut().remove(&id);
                }
                Ok(Some(InboundAck::Puback(id)))
            }
            (Ok(()), None) => Ok(None),
            (Err(error), id) => {
                if let Some(id) = id {
                    self.inbound.borrow_mut().remove(&id);
                }
                Err(error)
            }
        }
    }

    /// A reply written outside the writer (PINGRESP, or a SUBACK or UNSUBACK that ntex
    /// writes when the handler returns, before the writer task runs) is on its way out:
    /// wakes the writer, which finds nothing to send and gives the write page back once the
    /// reply has left ([`release_write_pages`]). Else an idle client kept the 4 KiB page of
    /// its last reply.
    pub fn reply_written(&self) {
        self.session.wake();
    }

    /// Answers a PINGREQ with PINGRESP, written at once (MQTT orders only the acks of
    /// PUBLISHes). ntex's pipeline would box a call per ping and grow its readiness
    /// bookkeeping on a connection that otherwise only idles.
    pub fn pong(&self) {
        use ntex_bytes::BufMut;
        let _ = self.io.with_write_src(|buf| buf.put_slice(&[0xd0, 0x00]));
        self.session.trim_idle();
        self.reply_written();
    }

    /// Writes a taken PUBLISH's ack now if no earlier PUBLISH's answer is outstanding (none
    /// taken waits, none passed on is in ntex's pipeline): then ntex's ordered response
    /// queue is empty and would write it at once too; going through it costs a codec
    /// encode per ack. False: the call must answer with it (ntex orders it).
    pub fn ack_now(&self, ack: InboundAck) -> bool {
        if self.pending_answers.get() != 0 || self.passed_publishes.get() != 0 {
            return false;
        }
        match ack {
            InboundAck::Puback(id) => write_ack(&self.io, PUBACK, id, false),
            InboundAck::Pubrec(id) => write_ack(&self.io, PUBREC, id, false),
        };
        true
    }

    /// MQTT 5: [`Conn::ack_now`] for a PUBACK with a reason code (0: success, written in the
    /// short form without one).
    pub fn puback_now(&self, packet_id: u16, reason: u8) -> bool {
        if self.pending_answers.get() != 0 || self.passed_publishes.get() != 0 {
            return false;
        }
        let [hi, lo] = packet_id.to_be_bytes();
        let _ = self.io.with_write_src(|buf| {
            use ntex_bytes::BufMut;
            if reason == 0 {
                buf.put_slice(&[PUBACK, 0x02, hi, lo]);
            } else {
                buf.put_slice(&[PUBACK, 0x03, hi, lo, reason]);
            }
        });
        true
    }

    /// Marks a taken PUBLISH's answer as outstanding until the guard drops (when its call
    /// answers).
    pub fn answer_pending(&self) -> AnswerPending<'_> {
        self.pending_answers.set(self.pending_answers.get() + 1);
        AnswerPending(self)
    }

    /// A QoS 2 PUBLISH is received (routed or a re-send): answered with PUBREC, the packet
    /// id waits for PUBREL.
    pub fn received_qos2(&self, packet_id: u16) -> InboundAck {
        self.inbound
            .borrow_mut()
            .insert(packet_id, InboundId::Received);
        InboundAck::Pubrec(packet_id)
    }

    /// The client's PUBREL: passed on if the packet id is ntex's, else answered here with
    /// PUBCOMP (PUBREL is not one of the packets whose answers ntex orders), also for a
    /// packet id this connection does not know: the PUBLISH came on an earlier connection of
    /// the session (the client re-sends PUBREL after reconnecting [MQTT-4.4.0-1]), and the
    /// session releases it.
    pub fn take_release(&self, packet_id: u16) -> Release {
        let state = self.inbound.borrow_mut().remove(&packet_id);
        match state {
            Some(InboundId::Ntex) => Release::Ntex,
            Some(InboundId::Waiting(_)) => Release::BeforePubrec,
            Some(InboundId::Received) | None => {
                let known = self.session.inbound_qos2_release(packet_id);
                // MQTT 5 tells the client when there was nothing to release.
                let not_found = !known && self.protocol == Protocol::V5;
                write_ack(&self.io, PUBCOMP, packet_id, not_found);
                Release::Answered
            }
        }
    }

    /// Inbound QoS 2 duplicate detection across reconnects: a PUBLISH with DUP set whose
    /// packet id was already received (and not released) must not be routed again. Call it
    /// when the message is routed (whole, on its turn): an id recorded for a PUBLISH cut
    /// short by the connection ending would make the client's re-send look like a
    /// duplicate, and it would be lost. Not QoS 2 (or no id): `New` with no ticket.
    pub fn begin_qos2(&self, qos: QoS, packet_id: Option<u16>, dup: bool) -> Qos2 {
        let Some(id) = packet_id.filter(|_| qos == QoS::ExactlyOnce) else {
            return Qos2::New(None);
        };
        match self.session.inbound_qos2_begin(id) {
            (false, _) if dup => Qos2::Duplicate,
            (_, ticket) => Qos2::New(ticket),
        }
    }

    /// Subscribes (after [`Conn::may_subscribe`] allowed it).
    pub fn subscribe(&self, filter: &str, options: SubOptions) -> Result<(), TopicError> {
        let parsed = Filter::parse(filter)?;
        self.router().subscribe(&self.session, &parsed, options);
        // A reload that ran since the ACL check may have swept this session's subscriptions
        // before this one was added: check it against the new ACL.
        if self.shared.auth.generation() != self.acl_generation.get() && !self.may_subscribe(filter)
        {
            self.router().unsubscribe(&self.session, &parsed);
        }
        Ok(())
    }

    pub fn unsubscribe(&self, filter: &str) -> Result<bool, TopicError> {
        let filter = Filter::parse(filter)?;
        Ok(self.router().unsubscribe(&self.session, &filter))
    }

    /// The connection is over (control stop, or drop as a backstop): hand the session back
    /// to the router with the will unless the client disconnected normally. Idempotent.
    pub fn finish(&self) {
        if self.qos0.draining.get() {
            // The drain task calls this again once the lane is empty.
            self.qos0.finish_when_drained.set(true);
            return;
        }
        self.finish_now();
    }

    /// [`Conn::finish`] without waiting for the QoS 0 lane (dropping the connection: its
    /// drain task is gone).
    fn finish_now(&self) {
        if self.finished.replace(true) {
            return;
        }
        // A client whose access a reload revoked does not get its will published.
        let will = if self.graceful.get() || self.session.is_revoked(self.generation) {
            None
        } else {
            self.will.borrow_mut().take().map(|will| *will)
        };
        self.router().detach(&self.session, self.generation, will);
        self.router().metrics().connection_closed(self.protocol);
        self.closed.notify_one();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.finish_now();
    }
}

/// How the writer talks to one protocol's sink.
pub(crate) trait Outbound {
    fn is_open(&self) -> bool;
    fn is_ready(&self) -> bool;
    fn ready(&self) -> impl Future<Output = bool>;
    /// Encodes one delivery at its QoS into `buf`, the connection's write buffer (the
    /// writer waited for [`Outbound::is_ready`]), without waiting for its ack:
    /// [`Conn::take_ack`] follows QoS 1 and 2 flows.
    fn encode(&mut self, buf: &mut ntex_bytes::BytePages, outgoing: &Outgoing) -> SendResult;
    /// The connection's raw I/O.
    fn io(&self) -> &ntex::io::IoRef;
    /// Closes the connection because another connection took the session over.
    fn close_taken_over(&self);
    /// Closes the connection because a reload revoked the client's access.
    fn close_revoked(&self);
    /// MQTT 5: what the connection needs again when it wakes from hibernation, beyond
    /// what 3.1.1 needs (`None` for 3.1.1).
    fn v5_state(&self) -> Option<Box<crate::hibernate::V5State>>;
}

pub(crate) enum SendResult {
    /// Written to the connection's buffer.
    Sent,
    /// The client cannot take this message (e.g. larger than its maximum packet size):
    /// it is dropped, the connection continues.
    Rejected,
}

/// Packet types of the acks the broker writes itself.
pub(crate) const PUBACK: u8 = 0x40;
pub(crate) const PUBREC: u8 = 0x50;
pub(crate) const PUBREL: u8 = 0x62;
pub(crate) const PUBCOMP: u8 = 0x70;

/// Writes an ack (`PUBACK`, `PUBREC`, `PUBREL`, `PUBCOMP`) for `packet_id`, with MQTT 5's
/// reason code 0x92 (packet identifier not found) if `not_found`. False if the connection
/// is closing.
/// How long a client with keepalive `keep_alive` (seconds) may stay silent: MQTT allows 1.5
/// times the keepalive between packets (0: no limit).
pub(crate) fn keepalive_allowance(keep_alive: u16) -> u16 {
    keep_alive.saturating_add(keep_alive.div_ceil(2))
}

pub(crate) fn write_ack(io: &ntex::io::IoRef, kind: u8, packet_id: u16, not_found: bool) -> bool {
    io.with_write_src(|buf| put_ack(buf, kind, packet_id, not_found))
        .is_ok()
}

/// [`write_ack`] into a write buffer.
fn put_ack(buf: &mut ntex_bytes::BytePages, kind: u8, packet_id: u16, not_found: bool) {
    use ntex_bytes::BufMut;
    let [hi, lo] = packet_id.to_be_bytes();
    if not_found {
        buf.put_slice(&[kind, 0x03, hi, lo, 0x92]);
    } else {
        buf.put_slice(&[kind, 0x02, hi, lo]);
    }
}

/// Gives an idle connection's write pages back once what was written has gone out. ntex
/// keeps a write buffer's current page (4 KiB) for the next write; on a connection that
/// waits for minutes between a CONNACK or PINGRESP and its next packet, that page was most
/// of its memory. Waits at most two turns of the thread for the write to go out (with
/// epoll, ntex writes on its next turn); a connection still writing after that keeps it.
pub(crate) async fn release_write_pages(io: &ntex::io::IoRef) {
    let empty = |buf: &mut ntex_bytes::BytePages| buf.is_empty();
    for turn in 0..3 {
        // With a filter (TLS, WebSocket) the application side and the wire side each keep
        // a page (a layer between them, as in WebSocket over TLS, keeps its own); without,
        // they are the same buffer. Both must be empty: the filter moves what the
        // application side holds to the wire side on ntex's write turn.
        match io.with_write_src(empty) {
            Err(_) => return, // closing
            Ok(true) if io.with_write_dst(empty) => {
                io.with_write_dst(drop_spare_page);
                let _ = io.with_write_src(drop_spare_page);
                return;
            }
            Ok(_) => {}
        }
        if turn < 2 {
            tokio::task::yield_now().await;
        }
    }
}

/// Drops the current page of an empty write buffer.
fn drop_spare_page(buf: &mut ntex_bytes::BytePages) {
    if buf.is_empty() {
        let mut spare = ntex_bytes::BytePages::new(buf.page_size());
        spare.try_get_current_from(buf);
    }
}

/// About how many bytes the writer puts into the write buffer before it checks the high
/// watermark again.
const RUN_BYTES: usize = 16 * 1024;

/// The connection lost its session: to a newer connection, or by a reload's revocation.
fn close_superseded(out: &impl Outbound, session: &Session, generation: u64) {
    if session.is_revoked(generation) {
        out.close_revoked();
    } else {
        out.close_taken_over();
    }
}

/// Starts the connection's writer ([`run_writer`]) as a task of its own. Boxed: ntex's
/// task wrapper holds the future it is given twice (as it was passed in and pinned inside
/// its own future), so the writer's state (about 450 bytes) was in every idle
/// connection's task twice; as a box, the task holds two pointers. ntex's task records
/// name the connect handler that called this as where the task was spawned.
#[track_caller]
pub(crate) fn spawn_writer<O: Outbound + 'static>(
    out: O,
    session: Arc<Session>,
    generation: u64,
    window: usize,
    closed: Rc<Notify>,
    metrics: Arc<BrokerMetrics>,
    hibernate: Option<Hibernate>,
) {
    ntex::rt::spawn_detached(Box::pin(run_writer(
        out, session, generation, window, closed, metrics, hibernate,
    )));
}

/// When an idle writer asks its connection to hibernate ([`Conn::try_park`]).
pub(crate) struct Hibernate {
    pub conn: std::rc::Weak<Conn>,
    pub after: std::time::Duration,
    /// The address of the connection's listener.
    pub listener: std::net::SocketAddr,
}

impl Hibernate {
    /// How the writer of `conn` hibernates it (hibernation on, `listener` the address of
    /// its listener when its connections may hibernate).
    pub fn of(conn: &ConnRef, listener: Option<std::net::SocketAddr>) -> Option<Self> {
        let after = conn.shared.limits.hibernate_after?;
        conn.shared.parking.as_ref()?;
        Some(Self {
            conn: std::rc::Rc::downgrade(&conn.0),
            after,
            listener: listener?,
        })
    }
}

/// Drains the session into the connection until either ends.
///
/// An `async` block rather than an `async fn`: an `async fn`'s state keeps its arguments
/// twice (as passed, and moved into its body's locals), 56 bytes of every idle writer.
#[allow(clippy::manual_async_fn)]
fn run_writer<O: Outbound>(
    mut out: O,
    session: Arc<Session>,
    generation: u64,
    window: usize,
    closed: Rc<Notify>,
    metrics: Arc<BrokerMetrics>,
    hibernate: Option<Hibernate>,
) -> impl Future<Output = ()> {
    async move {
        // Writes in runs, each in one access to the connection's write buffer (an access per
        // delivery, with ntex's write-state upkeep each time, was a tenth of the broker's core
        // in QoS 0 fan-out), of about `RUN_BYTES`; between runs it waits while the buffer is
        // over its high watermark. A client that stops reading can hold the writer there: a
        // reload revoking its access must still close it. (Only there: watching for revocation
        // around every send registered and dropped a waiter per message, a tenth of the
        // broker's core in QoS 0 fan-out.) False when the connection is closing: deliveries
        // not written stay in flight for the next connection.
        //
        // Called boxed: inline, its state would make every idle connection's writer task as
        // large as the busiest moment of a send.
        let send_all = async |out: &mut O,
                              list: &mut dyn Iterator<Item = Outgoing>,
                              tally: &mut SentTally<'_>|
               -> bool {
            loop {
                if !out.is_ready() {
                    tokio::select! {
                        ready = out.ready() => if !ready {
                            return false;
                        },
                        () = session.revoked(generation) => {
                            out.close_revoked();
                            return false;
                        }
                    }
                }
                let io = out.io().clone();
                let run = io.with_write_src(|buf| {
                    let mut written = 0;
                    while written < RUN_BYTES {
                        let Some(outgoing) = list.next() else {
                            return true;
                        };
                        if outgoing.release_only
                            && let Some(id) = outgoing.packet_id
                        {
                            // PUBREC arrived on an earlier connection: only PUBREL is owed
                            // [MQTT-4.4.0-1]; its PUBCOMP is taken by `AckGuard`.
                            put_ack(buf, PUBREL, id.get(), false);
                            written += 4;
                            continue;
                        }
                        let qos = outgoing.delivery.qos;
                        let size = outgoing.delivery.message.payload.len();
                        match out.encode(buf, &outgoing) {
                            SendResult::Sent => {
                                tally.add(qos, size);
                                written += size + outgoing.delivery.message.topic.len() + 8;
                            }
                            SendResult::Rejected => {
                                if let Some(id) = outgoing.packet_id {
                                    session.acknowledge(id.get());
                                }
                                metrics.dropped(DropReason::TooLarge, 1);
                            }
                        }
                    }
                    false
                });
                match run {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(_) => return false,
                }
            }
        };

        // Sent-message metrics are added up per batch (a tally that lives only while the batch
        // is written, not while the writer idles): per-message atomic updates of shared
        // counters showed up in profiles of fan-out.
        match session.take_redelivery(generation) {
            Ok(list) => {
                let mut tally = SentTally::new(&metrics);
                if !Box::pin(send_all(&mut out, &mut list.into_iter(), &mut tally)).await {
                    return;
                }
            }
            Err(Superseded) => {
                close_superseded(&out, &session, generation);
                return;
            }
        }
        // Grows on first use, and is given back whenever the writer goes idle: an idle
        // connection should cost as little as possible (a batch of 64 deliveries is 3.5 KiB).
        let mut batch = Vec::new();
        loop {
            if !out.is_open() {
                return;
            }
            if session
                .next_outgoing(generation, window, 64, &mut batch)
                .is_err()
            {
                if out.is_open() {
                    close_superseded(&out, &session, generation);
                }
                return;
            }
            if batch.is_empty() {
                batch = Vec::new();
                // Written now, not on ntex's write turn: that turn writes connections in the
                // order their output was queued, so a publisher's PUBACK (queued while its
                // PUBLISH was routed) went out before the subscribers' deliveries, a loopback
                // write ahead of them on the way to every subscriber. Under load this is still
                // one write per connection and turn (syscalls per read measured unchanged).
                // This writes in place only while ntex's direct writes are on (its default
                // `write_buf_threshold` > 0); else it only schedules the write turn, as the
                // write into the buffer did. An error means the connection is closing;
                // that is seen above.
                let _ = out.io().send_buf();
                release_write_pages(out.io()).await;
                let idle = async {
                    match &hibernate {
                        Some(hibernate) => ntex::time::sleep(hibernate.after).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = session.wait() => {}
                    () = closed.notified() => return,
                    () = idle => {
                        if hibernate
                            .as_ref()
                            .and_then(|hibernate| {
                                Some((hibernate.conn.upgrade()?, hibernate.listener))
                            })
                            .is_some_and(|(conn, listener)| {
                                conn.try_park(listener, || out.v5_state())
                            })
                        {
                            return;
                        }
                    }
                }
                continue;
            }
            let mut tally = SentTally::new(&metrics);
            if !Box::pin(send_all(&mut out, &mut batch.drain(..), &mut tally)).await {
                return;
            }
        }
    }
}

/// Messages and payload bytes written in a batch, by QoS; added to the shared counters
/// when dropped.
struct SentTally<'a> {
    metrics: &'a BrokerMetrics,
    messages: [u64; 3],
    bytes: [u64; 3],
}

impl<'a> SentTally<'a> {
    fn new(metrics: &'a BrokerMetrics) -> Self {
        Self {
            metrics,
            messages: [0; 3],
            bytes: [0; 3],
        }
    }

    fn add(&mut self, qos: QoS, bytes: usize) {
        self.messages[qos as usize] += 1;
        self.bytes[qos as usize] += bytes as u64;
    }

    fn flush(&mut self) {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let i = qos as usize;
            if self.messages[i] > 0 {
                self.metrics.sent_many(qos, self.messages[i], self.bytes[i]);
                self.messages[i] = 0;
                self.bytes[i] = 0;
            }
        }
    }
}

impl Drop for SentTally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Middleware in front of ntex-mqtt's packet handling: takes every PUBACK, PUBREC and
/// PUBCOMP ([`Conn::take_ack`]) before ntex's service pipeline, and on MQTT 3.1.1 also
/// PUBLISH and PUBREL where it can (see [`Inbound`]). The broker writes its
/// deliveries itself rather than through ntex's sink (see [`Outbound`]), so ntex knows none
/// of their packet ids; its per-packet pipeline and ack bookkeeping were a fifth of the
/// broker's core in QoS 1 fan-out.
///
/// It is the only middleware (`replace_middlewares`): it also enforces the limits ntex-mqtt's
/// own middleware did on the packets passed on ([`InFlight`]).
pub(crate) struct AckGuard {
    /// PUBLISHes passed on and handled at once (0: no limit).
    max_slots: u16,
}

impl AckGuard {
    /// MQTT 3.1.1: at most `receive_maximum` PUBLISHes passed on are handled at once.
    pub fn v3(receive_maximum: u16) -> Self {
        Self {
            max_slots: receive_maximum,
        }
    }

    /// MQTT 5: ntex-mqtt enforces the Receive Maximum itself (DISCONNECT 0x93).
    pub fn v5() -> Self {
        Self { max_slots: 0 }
    }
}

pub(crate) struct AckGuardService<S> {
    inner: S,
    inflight: InFlight,
}

impl<S, St> ntex::service::Middleware<S, St> for AckGuard {
    type Service = AckGuardService<S>;

    fn create(&self, _: &St, inner: S) -> Self::Service {
        AckGuardService {
            inner,
            inflight: InFlight::new(self.max_slots, crate::inflight::MAX_RECEIVE_SIZE),
        }
    }
}

/// MQTT 5: acks, PINGREQ and most PUBLISHes are taken here ([`crate::v5::take_publish`]);
/// the rest goes through ntex's pipeline. The packet ids of PUBLISHes passed on are noted
/// (QoS 2 ones until their PUBREL), so that a PUBREL for a PUBLISH received on an earlier
/// connection of the session (which ntex would answer without telling the broker) releases
/// it in the session ([`Conn::take_release`]).
impl Inbound for ntex_mqtt::v5::codec::Decoded {
    type Res = Option<ntex_mqtt::v5::codec::Packet>;
    type Error = ntex_mqtt::error::DispatcherError<crate::BrokerError>;

    fn take(self, conn: &Conn) -> Taken<'_, Self> {
        use ntex_mqtt::v5::codec::Packet;
        let (kind, packet_id) = match &self {
            Self::Publish(..) => {
                let Self::Publish(publish, payload, size) = self else {
                    unreachable!("matched above")
                };
                return crate::v5::take_publish(conn, publish, payload, size);
            }
            Self::PayloadChunk(_, eof) if conn.discarded_chunk(*eof) => {
                return Taken::Done(Ok(None));
            }
            Self::Packet(Packet::PublishRelease(release), _) => {
                return match conn.take_release(release.packet_id.get()) {
                    Release::Ntex => Taken::Pass(self, Passed::default()),
                    Release::Answered => Taken::Done(Ok(None)),
                    // The id is a taken QoS 1 PUBLISH's, still waiting for the state file
                    // (ntex closes the connection the same way for its own).
                    Release::BeforePubrec => {
                        Taken::Done(Err(ntex_mqtt::error::DispatcherError::Service(
                            crate::BrokerError::Protocol("PUBREL before PUBREC"),
                        )))
                    }
                };
            }
            // Any reason code completes a QoS 1 delivery.
            Self::Packet(Packet::PublishAck(ack), _) => (AckKind::Puback, ack.packet_id),
            Self::Packet(Packet::PublishReceived(ack), _) => {
                let kind = if u8::from(ack.reason_code) < 0x80 {
                    AckKind::Pubrec
                } else {
                    AckKind::PubrecRefused
                };
                (kind, ack.packet_id)
            }
            Self::Packet(Packet::PublishComplete(ack), _) => (AckKind::Pubcomp, ack.packet_id),
            Self::Packet(Packet::PingRequest, _) => {
                conn.pong();
                return Taken::Done(Ok(None));
            }
            _ => return Taken::Pass(self, Passed::default()),
        };
        conn.take_ack(kind, packet_id.get());
        Taken::Done(Ok(None))
    }
}

impl<S, T, Req> ntex::service::Service<ntex_mqtt::Session<T, ConnRef>, Req> for AckGuardService<S>
where
    S: ntex::service::Service<
            ntex_mqtt::Session<T, ConnRef>,
            Req,
            Res = Req::Res,
            Error = Req::Error,
        >,
    Req: Inbound + ntex_mqtt::SizedRequest,
{
    type Res = S::Res;
    type Error = S::Error;

    fn bind(&self, ctx: ntex::service::BindCtx<'_>) {
        ctx.subscribe(self.inflight.changed());
        ctx.bind::<_, ntex_mqtt::Session<T, ConnRef>, Req>(&self.inner);
    }

    ntex::forward_shutdown!(ntex_mqtt::Session<T, ConnRef>, inner);

    /// Boxed: ntex's per-packet call future holds the pipeline's readiness future inline,
    /// and the layers below make it large; as a box it is one pointer, allocated only when
    /// readiness is actually awaited (ntex checks it once before a run of calls).
    async fn ready(
        &self,
        ctx: ntex::service::Ctx<'_, Self, ntex_mqtt::Session<T, ConnRef>>,
    ) -> Result<(), Self::Error> {
        self.inflight.open().await;
        Box::pin(ctx.ready(&self.inner)).await
    }

    async fn call(
        &self,
        request: Req,
        ctx: ntex::service::Ctx<'_, Self, ntex_mqtt::Session<T, ConnRef>>,
    ) -> Result<Self::Res, Self::Error> {
        let conn: &Conn = ctx.st();
        match request.take(conn) {
            Taken::Done(result) => result,
            Taken::Later(handled) => handled.await,
            Taken::Pass(request, passed) => {
                let entry = self.inflight.enter(&request);
                let slot = match entry.turn() {
                    Turn::Now(slot) => slot,
                    // Boxed, like the call below: waiting is rare.
                    Turn::Wait => Box::pin(entry.wait_turn()).await,
                };
                // Boxed: ntex boxes this call's future per packet and moves it around;
                // holding the rest of the pipeline's future (3.4 KiB) inline would make
                // every taken packet pay for its size.
                let result = Box::pin(ctx.call(&self.inner, request)).await;
                drop(slot);
                drop(entry);
                conn.passed_done(passed);
                result
            }
        }
    }
}

/// What a PUBLISH handler returns: the result at once when the message could be handled
/// without waiting (a whole payload, no rate limit, nothing to make durable: the common case),
/// else a boxed future for the rest.
///
/// ntex moves a handler's future through the layers of its service pipeline (each layer's
/// future holds the next one's, and the outermost is boxed per packet), so its size is copied
/// several times per PUBLISH. As an `async fn` holding every path's state the handler's future
/// was 0.9 KiB (v3) and 1.4 KiB (v5); this is three words.
pub(crate) enum Handled<'a, T> {
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + 'a>>),
}

impl<'a, T> Handled<'a, T> {
    pub fn ready(value: T) -> Self {
        Self::Ready(Some(value))
    }

    pub fn later(future: impl Future<Output = T> + 'a) -> Self {
        Self::Later(Box::pin(future))
    }

    /// The result if it is there, else the future.
    pub fn now(self) -> Result<T, Pin<Box<dyn Future<Output = T> + 'a>>> {
        match self {
            Self::Ready(value) => Ok(value.expect("`Handled` taken after it completed")),
            Self::Later(future) => Err(future),
        }
    }
}

// The value is never pinned (it is moved out when ready), the future is boxed.
impl<T> Unpin for Handled<'_, T> {}

impl<T> Future for Handled<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.get_mut() {
            Self::Ready(value) => {
                std::task::Poll::Ready(value.take().expect("`Handled` polled after it completed"))
            }
            Self::Later(future) => future.as_mut().poll(cx),
        }
    }
}

/// `next(payload)` with a PUBLISH's whole payload: at once when ntex read it whole (the
/// common case), else once ntex has streamed it. Only for [`Conn::in_order`]'s common case.
// The PUBLISH steps are inlined into the handlers: as calls taking closures they cost
// 3–4% of QoS 0 throughput in an A/B (8 pairs 801k vs 831k msg/s).
#[inline(always)]
fn with_payload<'a, T: 'a>(
    body: ntex_mqtt::Payload,
    next: impl FnOnce(Result<Bytes, ntex_mqtt::error::PayloadError>) -> Handled<'a, T> + 'a,
) -> Handled<'a, T> {
    if body.is_fixed() {
        // A whole payload is taken on the first poll; it never waits.
        let mut read = std::pin::pin!(body.read_all());
        if let std::task::Poll::Ready(payload) = read
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            return next(payload);
        }
    }
    Handled::later(async move {
        let payload = body.read_all().await;
        next(payload).await
    })
}
