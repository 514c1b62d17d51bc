//! A session: what the broker keeps for one client id, connected or not.
//!
//! The session owns the client's bounded queue of deliveries and its outgoing in-flight
//! window. The router pushes into the queue from any thread; the connection that currently
//! owns the session (identified by a *generation*) drains it on its own worker. A takeover
//! bumps the generation, which tells the old connection to close.

use std::{
    collections::{HashSet, VecDeque},
    num::NonZeroU16,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use edgegw_store::{Op, Store, Ticket};
use tokio::sync::Notify;

use crate::{
    message::{Message, QoS},
    metrics::{BrokerMetrics, DropReason},
    topic::Filter,
    tree::SubOptions,
};

/// One message on its way to one session, with the QoS and flags that session gets.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// min(publish QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag as the subscriber sees it (retain-as-published, or a retained replay).
    pub retain: bool,
    /// v5 subscription identifiers of every matching subscription of this session.
    pub subscription_ids: Vec<u32>,
    /// Row of this delivery in the state file; 0 when it is not persisted.
    pub seq: u64,
}

/// A delivery ready to be written to the connection.
#[derive(Debug)]
pub struct Outgoing {
    pub delivery: Delivery,
    /// Packet id for QoS 1 and 2.
    pub packet_id: Option<NonZeroU16>,
    /// A re-send after reconnect.
    pub dup: bool,
    /// QoS 2 whose PUBREC arrived before the connection dropped: only PUBREL is owed.
    pub release_only: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum InflightState {
    /// PUBLISH written, waiting for PUBACK / PUBREC.
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    packet_id: u16,
    delivery: Delivery,
    state: InflightState,
}

impl Inflight {
    /// Whether `ack` ends this delivery: a PUBACK for QoS 1, a PUBCOMP for QoS 2 once its
    /// PUBREL was sent, a refusing PUBREC (MQTT 5) for QoS 2.
    fn completed_by(&self, ack: AckKind) -> bool {
        let released = self.state == InflightState::Released;
        matches!(
            (ack, self.delivery.qos, released),
            (AckKind::Puback, QoS::AtLeastOnce, _)
                | (AckKind::Pubcomp, QoS::ExactlyOnce, true)
                | (AckKind::PubrecRefused, QoS::ExactlyOnce, _)
        )
    }
}

/// A client's acknowledgement of a delivery in flight ([`Session::take_ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    Puback,
    Pubrec,
    /// A PUBREC with a failure reason code (MQTT 5): the QoS 2 delivery ends, no PUBREL.
    PubrecRefused,
    Pubcomp,
}

/// An acknowledgement read ahead of ntex's dispatcher, for [`Session::complete_acks`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadAck {
    pub kind: AckKind,
    pub packet_id: u16,
    /// Where the packet starts in the read buffer.
    pub at: usize,
    /// Set when it completed its delivery.
    pub taken: bool,
}

/// What [`Session::take_ack`] made of an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// It moved its delivery on (or repeated a PUBREC already taken).
    Done,
    /// No delivery with that packet id is in flight (e.g. a late re-send of an ack).
    Unknown,
    /// It does not fit its delivery (a PUBACK for QoS 2, a PUBREC for QoS 1, a PUBCOMP
    /// before PUBREC): a protocol violation.
    Unexpected,
}

/// The connection lost ownership of its session (takeover, session end, or its access
/// revoked by a reload: see [`Session::is_revoked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superseded;

/// How the connection that owns a session proved who it is, so that a reload of the
/// password file or of `allow_anonymous` can check it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Credential {
    /// An in-process client (a pipeline, a node link): not subject to the broker's auth.
    Internal,
    /// No verified user name.
    #[default]
    Anonymous,
    /// A password checked against the password-file entry with this fingerprint.
    Password { entry: u64 },
    /// The name in a client certificate.
    Certificate,
}

/// A set of packet ids. Touched for every QoS 1/2 delivery and ack: foldhash, not the
/// standard SipHash (which took 2–3% of the broker's core in QoS 1 fan-out).
type PacketIds = HashSet<u16, foldhash::fast::RandomState>;

#[derive(Default)]
struct State {
    queue: VecDeque<Delivery>,
    /// In send order, so a reconnect re-sends in the original order.
    inflight: VecDeque<Inflight>,
    /// Packet ids of `inflight`, so allocating an id is O(1) even with a wide window.
    inflight_ids: PacketIds,
    next_packet_id: u16,
    /// The writer stopped at a full in-flight window with deliveries queued, and has not
    /// looked again since: every ack wakes it until it does (no other ack needs to: a
    /// writer not blocked there comes back for the queue by itself). Cleared only by
    /// `next_outgoing`, so a wake taken by the previous connection's writer during a
    /// takeover is followed by more.
    window_blocked: bool,
    generation: u64,
    /// A list, not a map: most clients have one to a few subscriptions, and a map's
    /// smallest table (four entries with a copy of the filter as key) was 0.37 KiB of
    /// every subscribed connection. Subscribing is a scan, as in Mosquitto.
    subscriptions: Vec<(Filter, SubOptions)>,
    /// Inbound QoS 2 packet ids received (PUBREC sent) and not yet released.
    inbound_qos2: PacketIds,
    /// Session expiry interval in seconds (v3: 0 for clean session, max for persistent).
    expiry_secs: u32,
    ended: bool,
    /// A will waiting for its delay (or the session's end), from the last connection.
    /// Boxed: rarely there, and inline it made every session 88 bytes larger.
    pending_will: Option<Box<Message>>,
    /// Written to the state file (a store exists and the session outlives connections).
    persisted: bool,
    /// It was persisted at some point, so its end must be written (clean sessions, the
    /// common case, never touch the state file).
    was_persisted: bool,
    /// The user name that created the session; only that user may resume it.
    owner: Option<Arc<str>>,
    /// How the current (or last) connection logged in.
    credential: Credential,
}

/// Where a session writes its durable state.
#[derive(Clone)]
pub(crate) struct Persistence {
    pub store: Store,
    /// Delivery row numbers, shared by all sessions.
    pub next_seq: Arc<AtomicU64>,
}

pub struct Session {
    /// Unique per session instance (a clean start creates a new one).
    pub id: u64,
    pub client_id: Arc<str>,
    max_queued: usize,
    online: AtomicBool,
    state: Mutex<State>,
    notify: Notify,
    /// The generation whose access a reload revoked (0: none): that connection closes. An
    /// atomic, so the connection checks it on every PUBLISH without taking the lock.
    revoked: AtomicU64,
    revoked_notify: Notify,
    /// Whether `parked` is set: checked without the lock on every wake.
    has_parked: AtomicBool,
    /// Called, as well as `notify`, while the owning connection hibernates (set by the
    /// parking thread, which owns no task to notify).
    parked: Mutex<Option<(u64, ParkedHook)>>,
    metrics: Arc<BrokerMetrics>,
    persistence: Option<Persistence>,
}

/// What wakes a hibernating connection's watcher (see [`Session::set_parked_hook`]).
pub(crate) type ParkedHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl Session {
    pub(crate) fn new(
        id: u64,
        client_id: Arc<str>,
        max_queued: usize,
        metrics: Arc<BrokerMetrics>,
        persistence: Option<Persistence>,
    ) -> Self {
        Self {
            id,
            client_id,
            max_queued,
            online: AtomicBool::new(false),
            state: Mutex::new(State {
                next_packet_id: 1,
                ..State::default()
            }),
            notify: Notify::new(),
            revoked: AtomicU64::new(0),
            revoked_notify: Notify::new(),
            has_parked: AtomicBool::new(false),
            parked: Mutex::new(None),
            metrics,
            persistence,
        }
    }

    /// Writes `op` if this session is persisted. Called with the state locked, so the
    /// state file sees a session's changes in the order they happened.
    fn persist(&self, state: &State, op: impl FnOnce(String) -> Op) -> Option<Ticket> {
        match &self.persistence {
            Some(p) if state.persisted => Some(p.store.submit_one(op(self.client_id.to_string()))),
            _ => None,
        }
    }

    /// Rebuilds an offline session from the state file.
    pub(crate) fn restore(
        &self,
        owner: Option<Arc<str>>,
        expiry_secs: u32,
        queued: Vec<Delivery>,
        inflight: Vec<(u16, Delivery, bool)>,
        inbound_qos2: Vec<u16>,
        subscriptions: Vec<(Filter, SubOptions)>,
    ) {
        let mut state = self.lock();
        state.expiry_secs = expiry_secs;
        state.owner = owner;
        state.persisted = self.persistence.is_some() && expiry_secs > 0;
        state.was_persisted = true;
        self.metrics.queued.increment(queued.len() as f64);
        state.queue.extend(queued);
        for (packet_id, delivery, released) in inflight {
            state.inflight_ids.insert(packet_id);
            state.next_packet_id = packet_id.checked_add(1).unwrap_or(1).max(1);
            state.inflight.push_back(Inflight {
                packet_id,
                delivery,
                state: if released {
                    InflightState::Released
                } else {
                    InflightState::Sent
                },
            });
        }
        state.inbound_qos2.extend(inbound_qos2);
        // One row per filter (the table's key): no scan for duplicates.
        state.subscriptions.extend(subscriptions);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Queues a delivery; the owning connection is woken. Returns the reason when dropped,
    /// and for a persisted QoS 1/2 delivery the ticket of its write to the state file.
    pub fn enqueue(&self, delivery: Delivery) -> Result<Option<Ticket>, DropReason> {
        let (ticket, wake) = self.enqueue_quietly(delivery)?;
        if wake {
            self.notify.notify_one();
            self.poke_parked();
        }
        Ok(ticket)
    }

    /// As [`Session::enqueue`] without waking the owning connection: `true` alongside the
    /// ticket when the caller must [`Session::wake`] it (once, after queueing several).
    pub(crate) fn enqueue_quietly(
        &self,
        mut delivery: Delivery,
    ) -> Result<(Option<Ticket>, bool), DropReason> {
        let online = self.is_online();
        if delivery.qos == QoS::AtMostOnce && !online {
            return Err(DropReason::OfflineQos0);
        }
        let ticket = {
            let mut state = self.lock();
            if state.ended {
                return Err(DropReason::SessionEnded);
            }
            if state.queue.len() >= self.max_queued {
                return Err(DropReason::QueueFull);
            }
            let ticket = match &self.persistence {
                Some(p) if state.persisted && delivery.qos != QoS::AtMostOnce => {
                    delivery.seq = p.next_seq.fetch_add(1, Ordering::Relaxed);
                    Some(p.store.submit_one(Op::PutDelivery {
                        client_id: self.client_id.to_string(),
                        seq: delivery.seq,
                        record: crate::persist::encode_delivery(&delivery),
                    }))
                }
                _ => None,
            };
            state.queue.push_back(delivery);
            ticket
        };
        // The queue-depth gauge is raised by the caller, once per publish.
        Ok((ticket, online))
    }

    /// Marks a new connection as the owner; returns its generation. The previous owner,
    /// if any, sees [`Superseded`] on its next call.
    pub(crate) fn attach(
        &self,
        expiry_secs: u32,
        owner: Option<Arc<str>>,
        credential: Credential,
    ) -> u64 {
        let generation = {
            let mut state = self.lock();
            state.generation += 1;
            state.credential = credential;
            state.expiry_secs = expiry_secs;
            // A new connection to this session cancels a delayed will [MQTT-3.1.3-9].
            state.pending_will = None;
            state.persisted = self.persistence.is_some() && expiry_secs > 0;
            state.was_persisted |= state.persisted;
            state.owner = owner;
            let owner = state.owner.as_deref().map(str::to_string);
            self.persist(&state, |client_id| Op::PutSession {
                client_id,
                expiry_secs,
                owner,
            });
            self.persist(&state, |client_id| Op::SetDisconnected {
                client_id,
                at_unix_secs: None,
            });
            state.generation
        };
        self.online.store(true, Ordering::Relaxed);
        // Wake the previous owner so it notices the takeover.
        self.notify.notify_waiters();
        self.notify.notify_one();
        self.poke_parked();
        generation
    }

    /// The connection with `generation` is gone. Returns false when it had already been
    /// superseded (the session belongs to a newer connection).
    pub(crate) fn detach(&self, generation: u64) -> bool {
        let state = self.lock();
        if state.generation != generation {
            return false;
        }
        self.online.store(false, Ordering::Relaxed);
        self.persist(&state, |client_id| Op::SetDisconnected {
            client_id,
            at_unix_secs: Some(crate::persist::unix_now()),
        });
        true
    }

    /// The user name that created the session.
    pub fn owner(&self) -> Option<Arc<str>> {
        self.lock().owner.clone()
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// How the current (or last) connection logged in.
    pub fn credential(&self) -> Credential {
        self.lock().credential
    }

    /// Closes the connected client when `lost(owner, credential)` says its login is no
    /// longer valid (a reload removed the user, changed the password, or refused anonymous
    /// access). Decided under the session's lock, so a connection that took the session
    /// over meanwhile is judged on its own login. Returns whether a connection was closed.
    pub fn revoke_if(&self, lost: impl FnOnce(Option<&str>, Credential) -> bool) -> bool {
        {
            let state = self.lock();
            if !self.is_online()
                || state.ended
                || self.is_revoked(state.generation)
                || !lost(state.owner.as_deref(), state.credential)
            {
                return false;
            }
            self.revoked.store(state.generation, Ordering::Release);
        }
        // The owning connection's writer sees `Superseded` (or `revoked` fires while it
        // waits on the socket) and closes it.
        self.notify.notify_waiters();
        self.notify.notify_one();
        self.revoked_notify.notify_waiters();
        self.poke_parked();
        true
    }

    /// A reload revoked the access of connection `generation`: it closes without its will,
    /// and may no longer publish or subscribe.
    pub fn is_revoked(&self, generation: u64) -> bool {
        self.revoked.load(Ordering::Acquire) == generation
    }

    /// Completes once the access of connection `generation` is revoked.
    pub async fn revoked(&self, generation: u64) {
        loop {
            let notified = self.revoked_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_revoked(generation) {
                return;
            }
            notified.await;
        }
    }

    /// The session's subscriptions.
    pub fn subscriptions(&self) -> Vec<Filter> {
        self.lock()
            .subscriptions
            .iter()
            .map(|(filter, _)| filter.clone())
            .collect()
    }

    pub fn is_current(&self, generation: u64) -> bool {
        let state = self.lock();
        state.generation == generation && !state.ended
    }

    pub(crate) fn set_expiry(&self, expiry_secs: u32) {
        let mut state = self.lock();
        state.expiry_secs = expiry_secs;
        let owner = state.owner.as_deref().map(str::to_string);
        self.persist(&state, |client_id| Op::PutSession {
            client_id,
            expiry_secs,
            owner,
        });
    }

    pub fn expiry_secs(&self) -> u32 {
        self.lock().expiry_secs
    }

    /// Ends the session: nothing more is queued, queued deliveries are discarded.
    /// Returns its subscriptions so the router can remove them from the tree.
    pub(crate) fn end(&self) -> Vec<(Filter, SubOptions)> {
        let (subscriptions, discarded) = {
            let mut state = self.lock();
            state.ended = true;
            if let Some(p) = &self.persistence
                && state.was_persisted
            {
                // Also when not persisted now: an earlier connection may have persisted it.
                p.store.submit_one(Op::DeleteSession {
                    client_id: self.client_id.to_string(),
                });
            }
            let discarded = state.queue.len();
            state.queue.clear();
            state.inflight.clear();
            state.inflight_ids.clear();
            (std::mem::take(&mut state.subscriptions), discarded)
        };
        self.online.store(false, Ordering::Relaxed);
        self.metrics.queued.decrement(discarded as f64);
        self.notify.notify_waiters();
        self.notify.notify_one();
        self.poke_parked();
        subscriptions
    }

    pub(crate) fn set_pending_will(&self, will: Message) {
        self.lock().pending_will = Some(Box::new(will));
    }

    /// Takes the pending will if the session still belongs to connection `generation`
    /// (`None` for any generation), i.e. nobody reconnected since.
    pub(crate) fn take_pending_will(&self, generation: Option<u64>) -> Option<Message> {
        let mut state = self.lock();
        match generation {
            Some(g) if g != state.generation => None,
            _ => state.pending_will.take().map(|will| *will),
        }
    }

    pub fn is_ended(&self) -> bool {
        self.lock().ended
    }

    /// Waits until there may be something to send or the owner changed.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wakes the owning connection's writer (e.g. to give its write page back after a
    /// PINGRESP).
    pub fn wake(&self) {
        self.notify.notify_one();
        self.poke_parked();
    }

    /// Sets what is called whenever the owning connection would be woken while it
    /// hibernates, for the parked record `token` (it replaces any other). Whoever sets it
    /// checks the session after (see [`Session::needs_connection`]): a change made before is
    /// not signalled. (Changes are made under the state lock and signalled after it, so one
    /// made after that check sees the hook.)
    pub(crate) fn set_parked_hook(&self, token: u64, hook: ParkedHook) {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        self.has_parked.store(true, Ordering::Release);
        *parked = Some((token, hook));
    }

    /// Clears the hook of parked record `token`, unless another record's replaced it.
    pub(crate) fn clear_parked_hook(&self, token: u64) {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        if parked.as_ref().is_some_and(|(owner, _)| *owner == token) {
            *parked = None;
            self.has_parked.store(false, Ordering::Release);
        }
    }

    fn poke_parked(&self) {
        if self.has_parked.load(Ordering::Acquire)
            && let Some(hook) = self
                .parked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
        {
            (hook.1)();
        }
    }

    /// Gives back the room of the session's empty queues and packet id sets. They keep
    /// the capacity of their busiest moment (a burst of 64 deliveries left 3.6 KiB per
    /// subscriber); called when the client pings, which it does when it has sent nothing
    /// for its keepalive, so a connection that went idle gives it back within that time
    /// and a busy one pays once per keepalive at most.
    pub fn trim_idle(&self) {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
        if state.inflight.is_empty() {
            state.inflight = VecDeque::new();
        }
        if state.inflight_ids.is_empty() {
            state.inflight_ids.shrink_to_fit();
        }
        if state.inbound_qos2.is_empty() {
            state.inbound_qos2.shrink_to_fit();
        }
    }

    /// Whether connection `generation` owns the session and has nothing to send, nothing in
    /// flight either way (deliveries unacknowledged, inbound QoS 2 ids not released): it
    /// may hibernate. Trims the session's empty queues as [`Session::trim_idle`] does.
    pub(crate) fn is_quiet(&self, generation: u64) -> bool {
        let quiet = {
            let state = self.lock();
            state.generation == generation
                && !state.ended
                && state.queue.is_empty()
                && state.inflight.is_empty()
                && state.inbound_qos2.is_empty()
        };
        if quiet {
            self.trim_idle();
        }
        quiet
    }

    /// Whether a hibernating connection `generation` must wake: the session has something
    /// to send, belongs to another connection now, or ended (a clean-session takeover).
    pub(crate) fn needs_connection(&self, generation: u64) -> bool {
        let state = self.lock();
        state.generation != generation
            || state.ended
            || !state.queue.is_empty()
            || !state.inflight.is_empty()
    }

    /// Room held by the queue, the in-flight window and the packet id sets (tests).
    #[cfg(test)]
    pub(crate) fn capacities(&self) -> [usize; 4] {
        let state = self.lock();
        [
            state.queue.capacity(),
            state.inflight.capacity(),
            state.inflight_ids.capacity(),
            state.inbound_qos2.capacity(),
        ]
    }

    /// Deliveries still in flight from a previous connection, to re-send first (with DUP).
    pub fn take_redelivery(&self, generation: u64) -> Result<Vec<Outgoing>, Superseded> {
        let state = self.lock();
        if state.generation != generation || state.ended || self.is_revoked(generation) {
            return Err(Superseded);
        }
        Ok(state
            .inflight
            .iter()
            .map(|f| Outgoing {
                delivery: f.delivery.clone(),
                packet_id: NonZeroU16::new(f.packet_id),
                dup: true,
                release_only: f.state == InflightState::Released,
            })
            .collect())
    }

    /// Moves up to `max` queued deliveries into `out`, giving QoS 1/2 deliveries a packet id
    /// while the in-flight window (`window`) has room. Expired messages are dropped.
    pub fn next_outgoing(
        &self,
        generation: u64,
        window: usize,
        max: usize,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Superseded> {
        // Read the clock only for a message that can expire (MQTT 5 expiry interval).
        let mut now = None;
        let mut taken = 0usize;
        let mut expired = 0u64;
        {
            let mut state = self.lock();
            if state.generation != generation || state.ended || self.is_revoked(generation) {
                return Err(Superseded);
            }
            state.window_blocked = false;
            while out.len() < max {
                let Some(front) = state.queue.front() else {
                    break;
                };
                if front.message.properties.message_expiry_secs.is_some()
                    && front
                        .message
                        .is_expired(*now.get_or_insert_with(Instant::now))
                {
                    let seq = front.seq;
                    state.queue.pop_front();
                    taken += 1;
                    expired += 1;
                    if seq != 0 {
                        self.persist(&state, |client_id| Op::DeleteDelivery { client_id, seq });
                    }
                    continue;
                }
                if front.qos != QoS::AtMostOnce && state.inflight.len() >= window {
                    state.window_blocked = true;
                    break;
                }
                let Some(delivery) = state.queue.pop_front() else {
                    break;
                };
                taken += 1;
                let packet_id = if delivery.qos == QoS::AtMostOnce {
                    None
                } else {
                    let id = allocate_packet_id(&mut state);
                    if delivery.seq != 0 {
                        let seq = delivery.seq;
                        self.persist(&state, |client_id| Op::SetDeliveryState {
                            client_id,
                            seq,
                            packet_id: id,
                            released: false,
                        });
                    }
                    state.inflight_ids.insert(id);
                    state.inflight.push_back(Inflight {
                        packet_id: id,
                        delivery: delivery.clone(),
                        state: InflightState::Sent,
                    });
                    NonZeroU16::new(id)
                };
                if out.capacity() == 0 {
                    // One allocation for the batch, made only when there is something to
                    // send (the writer gives it back when it goes idle, and is woken per
                    // message while its window is full).
                    out.reserve(state.queue.len().saturating_add(1).min(max - out.len()));
                }
                out.push(Outgoing {
                    delivery,
                    packet_id,
                    dup: false,
                    release_only: false,
                });
            }
        }
        if taken > 0 {
            self.metrics.queued.decrement(taken as f64);
        }
        if expired > 0 {
            self.metrics.dropped(DropReason::Expired, expired);
        }
        Ok(())
    }

    pub fn inflight_len(&self) -> usize {
        self.lock().inflight.len()
    }

    pub fn queued_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) for `packet_id`: the delivery is done.
    pub fn acknowledge(&self, packet_id: u16) {
        let state = self.lock();
        if let Some(i) = inflight_index(&state.inflight, packet_id) {
            self.complete(state, i);
        }
    }

    /// Removes the in-flight delivery at `index`, waking the owning connection when that
    /// frees window space for something queued.
    fn complete(&self, mut state: MutexGuard<'_, State>, index: usize) {
        let Some(done) = self.remove_inflight(&mut state, index) else {
            return;
        };
        let wake = Self::window_freed(&state);
        drop(state);
        drop(done);
        if wake {
            self.notify.notify_one();
        }
    }

    fn remove_inflight(&self, state: &mut State, index: usize) -> Option<Inflight> {
        let done = state.inflight.remove(index)?;
        state.inflight_ids.remove(&done.packet_id);
        if done.delivery.seq != 0 {
            let seq = done.delivery.seq;
            self.persist(state, |client_id| Op::DeleteDelivery { client_id, seq });
        }
        Some(done)
    }

    /// Whether completing deliveries should wake the writer. Only a writer stopped at the
    /// full window waits for this: with nothing queued the next enqueue wakes it, and one
    /// not blocked by the window comes back by itself. (Waking it for every ack cost a task
    /// switch per message in QoS 1 fan-out, and a `Notify` permit per ack after that.)
    fn window_freed(state: &State) -> bool {
        state.window_blocked && !state.queue.is_empty()
    }

    /// PUBACKs and PUBCOMPs read together (`crate::acks`), under one lock: each that
    /// completes its delivery as [`Session::take_ack`] would
    /// ([`Inflight::completed_by`]) does so and is marked
    /// `taken`; the others are left untouched for `take_ack` to judge. Returns how many
    /// were taken.
    pub(crate) fn complete_acks(&self, acks: &mut [ReadAck]) -> usize {
        let mut state = self.lock();
        let mut taken = 0;
        for ack in acks.iter_mut() {
            let Some(i) = inflight_index(&state.inflight, ack.packet_id) else {
                continue;
            };
            if state.inflight[i].completed_by(ack.kind) {
                // Dropped under the lock (`complete` drops after it): one lock per read
                // of up to 64 acks, and holding them for later would need a buffer.
                self.remove_inflight(&mut state, i);
                ack.taken = true;
                taken += 1;
            }
        }
        let wake = taken > 0 && Self::window_freed(&state);
        drop(state);
        if wake {
            self.notify.notify_one();
        }
        taken
    }

    /// A client's PUBACK, PUBREC or PUBCOMP for `packet_id`, checked against the state of
    /// the delivery in flight with that id: a PUBACK completes a QoS 1 delivery, a PUBREC
    /// moves a QoS 2 delivery to waiting for PUBCOMP (again: a repeated PUBREC is answered
    /// with PUBREL again), a PUBCOMP completes a QoS 2 delivery whose PUBREL was sent.
    pub fn take_ack(&self, packet_id: u16, ack: AckKind) -> AckOutcome {
        let mut state = self.lock();
        let Some(i) = inflight_index(&state.inflight, packet_id) else {
            return AckOutcome::Unknown;
        };
        let entry = &mut state.inflight[i];
        if entry.completed_by(ack) {
            self.complete(state, i);
            return AckOutcome::Done;
        }
        let released = entry.state == InflightState::Released;
        match (ack, entry.delivery.qos, released) {
            (AckKind::Pubrec, QoS::ExactlyOnce, true) => AckOutcome::Done,
            (AckKind::Pubrec, QoS::ExactlyOnce, false) => {
                entry.state = InflightState::Released;
                let seq = entry.delivery.seq;
                if seq != 0 {
                    self.persist(&state, |client_id| Op::SetDeliveryState {
                        client_id,
                        seq,
                        packet_id,
                        released: true,
                    });
                }
                AckOutcome::Done
            }
            _ => AckOutcome::Unexpected,
        }
    }

    /// Inbound QoS 2: returns true when `packet_id` is new (route the message), false when
    /// it is a re-send of one already received and not yet released; with the ticket of
    /// its write to the state file.
    pub fn inbound_qos2_begin(&self, packet_id: u16) -> (bool, Option<Ticket>) {
        let mut state = self.lock();
        let new = state.inbound_qos2.insert(packet_id);
        let ticket = if new {
            self.persist(&state, |client_id| Op::PutInbound {
                client_id,
                packet_id,
            })
        } else {
            None
        };
        (new, ticket)
    }

    /// Inbound PUBREL. False if the packet id was not received.
    pub fn inbound_qos2_release(&self, packet_id: u16) -> bool {
        let mut state = self.lock();
        let known = state.inbound_qos2.remove(&packet_id);
        if known {
            self.persist(&state, |client_id| Op::DeleteInbound {
                client_id,
                packet_id,
            });
        }
        known
    }

    /// Adds a subscription record; returns true when it replaced one for the same filter.
    pub(crate) fn record_subscription(&self, filter: &Filter, options: SubOptions) -> bool {
        let mut state = self.lock();
        self.persist(&state, |client_id| Op::PutSubscription {
            client_id,
            filter: filter.to_string(),
            record: crate::persist::encode_options(&options),
        });
        upsert(&mut state.subscriptions, filter, options)
    }

    pub(crate) fn forget_subscription(&self, filter: &Filter) -> bool {
        let mut state = self.lock();
        let Some(at) = state.subscriptions.iter().position(|(f, _)| f == filter) else {
            return false;
        };
        state.subscriptions.swap_remove(at);
        if state.subscriptions.is_empty() {
            state.subscriptions = Vec::new();
        }
        self.persist(&state, |client_id| Op::DeleteSubscription {
            client_id,
            filter: filter.to_string(),
        });
        true
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().subscriptions.len()
    }
}

/// Where the delivery with `packet_id` is in the in-flight window. Ids are handed out in
/// sequence (1..=65535) and mostly completed in order, so it is usually exactly as far from
/// the front as its id is from the front's id; otherwise (an ack out of order, a skipped id,
/// a window restored from the state file) it is searched for. A linear search for every ack
/// was 4–5% of the broker's core in QoS 2 fan-in, where the deliveries awaiting PUBCOMP sit
/// in front of the one a PUBREC names.
fn inflight_index(inflight: &VecDeque<Inflight>, packet_id: u16) -> Option<usize> {
    let front = inflight.front()?.packet_id;
    let distance = if packet_id >= front {
        usize::from(packet_id - front)
    } else {
        // Wrapped past 65535 to 1 (0 is never used).
        usize::from(packet_id) + usize::from(u16::MAX - front)
    };
    match inflight.get(distance) {
        Some(f) if f.packet_id == packet_id => Some(distance),
        _ => inflight.iter().position(|f| f.packet_id == packet_id),
    }
}

/// The next free packet id (1..=65535), skipping ids still in flight.
fn allocate_packet_id(state: &mut State) -> u16 {
    loop {
        let id = state.next_packet_id;
        state.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
        if !state.inflight_ids.contains(&id) {
            return id;
        }
    }
}

/// Adds or replaces the subscription to `filter`; true when it replaced one.
fn upsert(
    subscriptions: &mut Vec<(Filter, SubOptions)>,
    filter: &Filter,
    options: SubOptions,
) -> bool {
    if let Some((_, known)) = subscriptions.iter_mut().find(|(f, _)| f == filter) {
        *known = options;
        return true;
    }
    if subscriptions.capacity() == 0 {
        // Room for one: most clients subscribe once.
        subscriptions.reserve_exact(1);
    }
    subscriptions.push((filter.clone(), options));
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ids: &[u16]) -> VecDeque<Inflight> {
        let message = Arc::new(Message::new("t", crate::Bytes::new(), QoS::AtLeastOnce));
        ids.iter()
            .map(|&packet_id| Inflight {
                packet_id,
                delivery: Delivery {
                    message: message.clone(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: Vec::new(),
                    seq: 0,
                },
                state: InflightState::Sent,
            })
            .collect()
    }

    #[test]
    fn a_parked_hook_is_cleared_only_by_the_record_that_set_it() {
        use std::sync::atomic::AtomicUsize;
        let metrics = Arc::new(crate::metrics::BrokerMetrics::new());
        let session = Session::new(1, "c1".into(), 10, metrics, None);
        let calls = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let hook = |which: usize| -> ParkedHook {
            let calls = calls.clone();
            Box::new(move || {
                calls[which].fetch_add(1, Ordering::Relaxed);
            })
        };
        let count = |which: usize| calls[which].load(Ordering::Relaxed);
        session.wake();
        session.set_parked_hook(1, hook(0));
        session.wake();
        assert_eq!((count(0), count(1)), (1, 0));
        // A later record of the session (its next connection) takes the hook over; the
        // earlier record, removed after, leaves it in place.
        session.set_parked_hook(2, hook(1));
        session.clear_parked_hook(1);
        session.wake();
        assert_eq!((count(0), count(1)), (1, 1));
        session.clear_parked_hook(2);
        session.wake();
        assert_eq!((count(0), count(1)), (1, 1));
    }

    #[test]
    fn finds_deliveries_in_flight_wherever_they_sit() {
        for ids in [
            vec![1, 2, 3, 4],
            // Wrapping from 65535 to 1.
            vec![65534, 65535, 1, 2],
            // Completed out of order (6 gone), and skipped ids.
            vec![4, 5, 7, 9],
            // Restored from the state file in any order.
            vec![9, 3, 65535, 4],
        ] {
            let window = window(&ids);
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(inflight_index(&window, *id), Some(i), "{id} in {ids:?}");
            }
            assert_eq!(inflight_index(&window, 6), None, "{ids:?}");
        }
        assert_eq!(inflight_index(&VecDeque::new(), 1), None);
    }

    /// After a burst the session's queue, window and id set keep the room of the burst;
    /// a ping of the idle client gives it back, and never what is still in use.
    #[test]
    fn an_idle_session_gives_back_the_room_of_its_busiest_moment() {
        use crate::{
            router::{AttachOptions, Router, RouterLimits},
            topic::Filter,
            tree::SubOptions,
        };
        let router = Router::new(RouterLimits {
            max_queued: 1000,
            max_session_expiry_secs: 60,
        });
        let attached = router.attach(AttachOptions {
            client_id: "trim".into(),
            clean_start: true,
            session_expiry_secs: 0,
            owner: None,
            credential: Credential::Anonymous,
        });
        let session = &attached.session;
        router.subscribe(
            session,
            &Filter::parse("t").unwrap(),
            SubOptions::qos(QoS::AtLeastOnce),
        );
        for i in 0..64 {
            router.publish(Message::new(
                "t",
                format!("{i}").into_bytes(),
                QoS::AtLeastOnce,
            ));
        }
        let mut out = Vec::new();
        session
            .next_outgoing(attached.generation, 32, 64, &mut out)
            .unwrap();
        assert_eq!(out.len(), 32, "a window of 32");
        session.trim_idle();
        let [queue, inflight, ids, _] = session.capacities();
        assert!(queue >= 32 && inflight >= 32 && ids >= 32, "in use: kept");
        for outgoing in out.drain(..) {
            session.take_ack(outgoing.packet_id.unwrap().get(), AckKind::Puback);
        }
        session
            .next_outgoing(attached.generation, 32, 64, &mut out)
            .unwrap();
        for outgoing in out.drain(..) {
            session.take_ack(outgoing.packet_id.unwrap().get(), AckKind::Puback);
        }
        // The id set's reported capacity after removals depends on the hash seed (removed
        // entries may leave tombstones that hashbrown does not count as room): only the
        // queues' room is a fixed precondition here.
        let [queue, inflight, _, _] = session.capacities();
        assert!(queue >= 32 && inflight >= 32, "the burst's room");
        session.trim_idle();
        assert_eq!(session.capacities(), [0, 0, 0, 0]);
    }
}
