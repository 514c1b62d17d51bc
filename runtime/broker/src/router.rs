//! The router: sessions by client id, the subscription tree, retained messages, wills.
//!
//! Every client — network connection, node, pipeline, uplink — attaches a [`Session`] and
//! publishes through [`Router::publish`]. The publish path takes the subscription tree's
//! read lock (writers are only SUBSCRIBE/UNSUBSCRIBE and session ends), shares one
//! `Arc<Message>` across all deliveries, and pushes into each matching session's bounded
//! queue; it never waits on a subscriber.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use edgegw_store::{Op, Snapshot, Store, Ticket};

use crate::{
    message::{ByteString, Message, Origin, QoS},
    metrics::BrokerMetrics,
    session::{Credential, Delivery, Persistence, Session},
    topic::{Filter, TopicError},
    tree::{Entry, SubOptions, SubscriptionTree},
};

/// Limits the router applies to every session.
#[derive(Clone, Debug)]
pub struct RouterLimits {
    /// Deliveries queued per session before new ones are dropped.
    pub max_queued: usize,
    /// Longest session expiry granted, in seconds.
    pub max_session_expiry_secs: u32,
}

impl Default for RouterLimits {
    fn default() -> Self {
        Self {
            max_queued: 1000,
            max_session_expiry_secs: 7 * 24 * 3600,
        }
    }
}

/// What a client asks for when it attaches.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub client_id: Arc<str>,
    /// Discard any existing session (v3 clean session, v5 clean start).
    pub clean_start: bool,
    /// Seconds the session outlives the connection; `u32::MAX` never expires.
    pub session_expiry_secs: u32,
    /// The authenticated user name. A session is resumed only by the user that created it:
    /// anyone else gets a fresh one (the old session ends), so a client id never hands one
    /// user's subscriptions and queued messages to another.
    pub owner: Option<Arc<str>>,
    /// How the client proved `owner`; a reload of the auth settings checks it again.
    pub credential: Credential,
}

/// The result of attaching: the session and the generation that identifies this
/// connection's ownership of it.
pub struct Attached {
    pub session: Arc<Session>,
    pub generation: u64,
    pub session_present: bool,
}

/// A will registered at CONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub message: Message,
    pub delay_secs: u32,
}

/// What [`Router::publish_batch`] does once for the whole batch rather than per message.
#[derive(Default)]
struct Deferred {
    /// Sessions to wake.
    wakes: Vec<Arc<Session>>,
    /// Messages and payload bytes received, by QoS.
    received: [(u64, u64); 3],
    /// Deliveries queued.
    queued: u64,
}

/// The outcome of one publish.
pub struct Routed {
    /// Sessions the message was queued for.
    pub delivered: usize,
    /// Sessions that matched but dropped it (queue full, offline QoS 0...).
    pub dropped: usize,
    /// When the message was written to the state file (retained, or queued for a
    /// persistent session): wait for this before acknowledging it to its publisher.
    pub durable: Option<Ticket>,
}

impl Routed {
    /// Waits until the message is durable (immediately when nothing was persisted).
    pub async fn durable(self) -> Result<(), edgegw_store::StoreError> {
        match self.durable {
            Some(ticket) => ticket.wait().await,
            None => Ok(()),
        }
    }

    /// What to wait for before the message and `also` are durable: `None` when they already
    /// are (nothing was persisted), so that a caller can acknowledge without awaiting.
    pub fn pending_with(self, also: Option<Ticket>) -> Option<Ticket> {
        later(self.durable, also)
    }
}

fn later(a: Option<Ticket>, b: Option<Ticket>) -> Option<Ticket> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A part that takes routed messages synchronously, before the publisher is acknowledged:
/// an uplink's outbox. The router offers it every message; a ticket it returns joins the
/// message's durability, so a QoS 1/2 publisher is acknowledged only after the part has
/// made the message durable.
pub trait Sink: Send + Sync + 'static {
    /// `None`: not for this sink. Must not block (queue and return a ticket instead).
    fn offer(&self, message: &Arc<Message>) -> Option<Offer>;
}

/// What a [`Sink`] did with a message.
pub enum Offer {
    /// Taken; durable once the ticket (if any) resolves.
    Accepted(Option<Ticket>),
    /// Refused (the sink counts why).
    Dropped,
}

/// Identifies a sink added with [`Router::add_sink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkId(u64);

struct Inner {
    sinks: RwLock<Vec<(SinkId, Arc<dyn Sink>)>>,
    has_sinks: std::sync::atomic::AtomicBool,
    next_sink: AtomicU64,
    tree: RwLock<SubscriptionTree>,
    retained: RwLock<HashMap<ByteString, Arc<Message>>>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    next_session_id: AtomicU64,
    limits: RouterLimits,
    metrics: Arc<BrokerMetrics>,
    persistence: Option<Persistence>,
}

/// Cheap to clone; all clones are the same router.
#[derive(Clone)]
pub struct Router(Arc<Inner>);

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    /// A router that keeps its state in memory only.
    pub fn new(limits: RouterLimits) -> Self {
        Self::build(limits, None)
    }

    fn build(limits: RouterLimits, persistence: Option<Persistence>) -> Self {
        Self(Arc::new(Inner {
            sinks: RwLock::new(Vec::new()),
            has_sinks: std::sync::atomic::AtomicBool::new(false),
            next_sink: AtomicU64::new(1),
            tree: RwLock::new(SubscriptionTree::default()),
            retained: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_session_id: AtomicU64::new(1),
            limits,
            metrics: Arc::new(BrokerMetrics::new()),
            persistence,
        }))
    }

    /// A router whose retained messages and persistent sessions live in `store`, starting
    /// from what the state file held (`snapshot`). Must run inside a tokio runtime: restored
    /// sessions get their expiry timers.
    pub fn with_store(limits: RouterLimits, store: Store, snapshot: Snapshot) -> Self {
        let next_seq = edgegw_store::max_seq(&snapshot) + 1;
        let router = Self::build(
            limits,
            Some(Persistence {
                store,
                next_seq: Arc::new(AtomicU64::new(next_seq)),
            }),
        );
        router.restore(snapshot);
        router
    }

    fn restore(&self, snapshot: Snapshot) {
        let mut skipped = 0usize;
        {
            let mut retained = write(&self.0.retained);
            for (topic, record) in &snapshot.retained {
                match crate::persist::decode_message(record) {
                    Some(message) => {
                        retained.insert(message.topic.clone(), Arc::new(message));
                    }
                    None => {
                        skipped += 1;
                        tracing::warn!(%topic, "Unreadable retained message in the state file; skipped.");
                    }
                }
            }
            self.0.metrics.retained.set(retained.len() as f64);
        }
        let now = crate::persist::unix_now();
        let sessions_restored = snapshot.sessions.len();
        for stored in snapshot.sessions {
            let mut queued = Vec::new();
            let mut inflight = Vec::new();
            for d in &stored.deliveries {
                let Some(mut delivery) = crate::persist::decode_delivery(&d.record) else {
                    skipped += 1;
                    tracing::warn!(client_id = %stored.client_id, seq = d.seq, "Unreadable queued message in the state file; skipped.");
                    continue;
                };
                delivery.seq = d.seq;
                match d.packet_id {
                    Some(packet_id) if packet_id != 0 => {
                        inflight.push((packet_id, delivery, d.released))
                    }
                    _ => queued.push(delivery),
                }
            }
            let mut subscriptions = Vec::new();
            for (text, record) in &stored.subscriptions {
                match (Filter::parse(text), crate::persist::decode_options(record)) {
                    (Ok(filter), Some(options)) => subscriptions.push((filter, options)),
                    _ => {
                        skipped += 1;
                        tracing::warn!(client_id = %stored.client_id, filter = %text, "Unreadable subscription in the state file; skipped.");
                    }
                }
            }
            let id = self.0.next_session_id.fetch_add(1, Ordering::Relaxed);
            let client_id: Arc<str> = stored.client_id.as_str().into();
            let session = Arc::new(Session::new(
                id,
                client_id.clone(),
                self.0.limits.max_queued,
                self.0.metrics.clone(),
                self.0.persistence.clone(),
            ));
            session.restore(
                stored.owner.as_deref().map(Arc::from),
                stored.expiry_secs,
                queued,
                inflight,
                stored.inbound_qos2,
                subscriptions.clone(),
            );
            {
                let mut tree = write(&self.0.tree);
                for (filter, options) in subscriptions {
                    tree.insert(
                        &filter.filter,
                        filter.share.as_deref(),
                        Entry {
                            session: session.clone(),
                            options,
                        },
                    );
                }
                self.0.metrics.subscriptions.set(tree.len() as f64);
            }
            lock(&self.0.sessions).insert(client_id, session.clone());
            self.0.metrics.sessions.increment(1.0);
            // The expiry clock started when the client went away (or now, if it was
            // connected when the gateway stopped).
            let gone_for = now.saturating_sub(stored.disconnected_at.unwrap_or(now));
            let left = u64::from(stored.expiry_secs).saturating_sub(gone_for);
            let generation = session.generation();
            if left == 0 {
                self.end_session(&session);
            } else {
                let router = self.clone();
                spawn_after(Duration::from_secs(left), move || {
                    if session.generation() == generation && !session.is_online() {
                        router.end_session(&session);
                    }
                });
            }
        }
        tracing::info!(
            sessions = sessions_restored,
            retained = self.retained_count(),
            skipped,
            "State restored."
        );
    }

    pub fn limits(&self) -> &RouterLimits {
        &self.0.limits
    }

    pub(crate) fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.0.metrics
    }

    /// Attaches a connection to the session for `options.client_id`: resumes it (unless
    /// clean start) or creates it. A connection that owned it before is superseded and
    /// closes itself (takeover).
    pub fn attach(&self, options: AttachOptions) -> Attached {
        self.attach_if(options, || true)
            .expect("attaching unconditionally")
    }

    /// [`Router::attach`] if `allowed()`, which is asked under the sessions' lock: nothing
    /// is taken over or ended when it says no.
    pub fn attach_if(
        &self,
        options: AttachOptions,
        allowed: impl FnOnce() -> bool,
    ) -> Option<Attached> {
        let expiry = options
            .session_expiry_secs
            .min(self.0.limits.max_session_expiry_secs.max(1))
            .min(options.session_expiry_secs);
        let mut ended = None;
        let attached = {
            let mut sessions = lock(&self.0.sessions);
            if !allowed() {
                return None;
            }
            match sessions.get(&options.client_id).cloned() {
                Some(existing)
                    if !options.clean_start
                        && !existing.is_ended()
                        && existing.owner() == options.owner =>
                {
                    let generation =
                        existing.attach(expiry, options.owner.clone(), options.credential);
                    Attached {
                        session: existing,
                        generation,
                        session_present: true,
                    }
                }
                existing => {
                    if let Some(old) = &existing
                        && !options.clean_start
                        && old.owner() != options.owner
                    {
                        tracing::info!(
                            client_id = %options.client_id,
                            "Session not resumed: it belongs to another user; starting a new one."
                        );
                    }
                    if let Some(old) = existing {
                        sessions.remove(&options.client_id);
                        ended = Some(old);
                    }
                    self.0.metrics.sessions.increment(1.0);
                    let id = self.0.next_session_id.fetch_add(1, Ordering::Relaxed);
                    let session = Arc::new(Session::new(
                        id,
                        options.client_id.clone(),
                        self.0.limits.max_queued,
                        self.0.metrics.clone(),
                        self.0.persistence.clone(),
                    ));
                    sessions.insert(options.client_id.clone(), session.clone());
                    let generation =
                        session.attach(expiry, options.owner.clone(), options.credential);
                    Attached {
                        session,
                        generation,
                        session_present: false,
                    }
                }
            }
        };
        if let Some(old) = ended {
            self.finish_session(&old);
        }
        Some(attached)
    }

    /// The connection `generation` of `session` is gone. `will` is its will unless it
    /// disconnected normally. Starts the will delay and session expiry timers.
    pub fn detach(&self, session: &Arc<Session>, generation: u64, will: Option<Will>) {
        let current = session.detach(generation);
        let expiry = session.expiry_secs();
        if let Some(will) = will {
            if !current {
                // Taken over. A new connection to the session within the will delay cancels
                // the will [MQTT-3.1.3-9]; a clean start ended the session, which publishes it.
                if will.delay_secs == 0 || session.is_ended() {
                    self.publish_will(will.message);
                }
            } else if will.delay_secs == 0 {
                self.publish_will(will.message);
            } else if expiry == 0 {
                // The session ends right below, which publishes it.
                session.set_pending_will(will.message);
            } else {
                session.set_pending_will(will.message);
                // A will whose delay outlasts the session is published when it ends.
                let delay = will.delay_secs.min(expiry);
                let router = self.clone();
                let session = session.clone();
                spawn_after(Duration::from_secs(u64::from(delay)), move || {
                    if let Some(will) = session.take_pending_will(Some(generation)) {
                        router.publish_will(will);
                    }
                });
            }
        }
        if !current {
            return;
        }
        match expiry {
            0 => self.end_session(session),
            u32::MAX => {}
            secs => {
                let router = self.clone();
                let session = session.clone();
                spawn_after(Duration::from_secs(u64::from(secs)), move || {
                    if session.generation() == generation && !session.is_online() {
                        router.end_session(&session);
                    }
                });
            }
        }
    }

    /// Updates the expiry of a session (v5 DISCONNECT may change it).
    pub fn set_session_expiry(&self, session: &Session, secs: u32) {
        session.set_expiry(secs.min(self.0.limits.max_session_expiry_secs));
    }

    /// Ends a session now: removes it, its subscriptions, and publishes a pending will.
    pub fn end_session(&self, session: &Arc<Session>) {
        {
            let mut sessions = lock(&self.0.sessions);
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| s.id == session.id)
            {
                sessions.remove(&session.client_id);
            } else if session.is_ended() {
                return;
            }
        }
        self.finish_session(session);
    }

    fn finish_session(&self, session: &Arc<Session>) {
        let will = session.take_pending_will(None);
        let subscriptions = session.end();
        if !subscriptions.is_empty() {
            let mut tree = write(&self.0.tree);
            for (filter, _) in &subscriptions {
                tree.remove(&filter.filter, filter.share.as_deref(), session.id);
            }
            self.0.metrics.subscriptions.set(tree.len() as f64);
        }
        self.0.metrics.sessions.decrement(1.0);
        if let Some(will) = will {
            self.publish_will(will);
        }
    }

    fn publish_will(&self, will: Message) {
        self.0.metrics.wills.increment(1);
        self.publish(will);
    }

    /// Routes a message to every matching session and updates the retained store.
    pub fn publish(&self, message: Message) -> Routed {
        self.route(message, None)
    }

    /// Routes `messages` in order, as [`Router::publish`] does each, but wakes each
    /// receiving connection once at the end rather than once per message: a wake from
    /// another thread can be a syscall and a context switch. For in-process publishers
    /// that produce messages in bursts (pipeline workers).
    pub fn publish_batch(&self, messages: impl IntoIterator<Item = Message>) {
        let mut deferred = Deferred::default();
        for message in messages {
            self.route(message, Some(&mut deferred));
        }
        let Deferred {
            mut wakes,
            received,
            queued,
        } = deferred;
        for (qos, (messages, bytes)) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .zip(received)
        {
            if messages > 0 {
                self.0.metrics.received_many(qos, messages, bytes);
            }
        }
        if queued > 0 {
            self.0.metrics.queued.increment(queued as f64);
        }
        wakes.sort_unstable_by_key(|s: &Arc<Session>| s.id);
        wakes.dedup_by_key(|s| s.id);
        for session in wakes {
            session.wake();
        }
    }

    /// `deferred`: where to leave the sessions to wake and the metrics to count instead of
    /// doing it now.
    fn route(&self, message: Message, mut deferred: Option<&mut Deferred>) -> Routed {
        match deferred.as_deref_mut() {
            Some(d) => {
                let (messages, bytes) = &mut d.received[message.qos as usize];
                *messages += 1;
                *bytes += message.payload.len() as u64;
            }
            None => self.0.metrics.received(message.qos, message.payload.len()),
        }
        let publisher = match message.origin {
            Origin::Session(id) => Some(id),
            _ => None,
        };
        let message = Arc::new(message);
        let mut durable = None;
        if message.retain {
            let mut retained = write(&self.0.retained);
            let op = if message.payload.is_empty() {
                retained.remove(&message.topic);
                Op::DeleteRetained {
                    topic: message.topic.to_string(),
                }
            } else {
                retained.insert(message.topic.clone(), message.clone());
                Op::PutRetained {
                    topic: message.topic.to_string(),
                    record: crate::persist::encode_message(&message),
                }
            };
            // Submitted under the lock so the file sees retained updates in order.
            if let Some(p) = &self.0.persistence {
                durable = Some(p.store.submit_one(op));
            }
            self.0.metrics.retained.set(retained.len() as f64);
        }

        // One delivery per session for its non-shared subscriptions (highest QoS, every
        // subscription id); shared-group picks are separate deliveries.
        let mut targets = Targets::default();
        {
            let tree = read(&self.0.tree);
            tree.for_each_match(&message.topic, |entry: &Entry, shared| {
                let options = entry.options;
                if options.no_local && publisher == Some(entry.session.id) {
                    return;
                }
                let qos = message.qos.min(options.qos);
                let retain = message.retain && options.retain_as_published;
                if !shared && let Some(delivery) = targets.find(entry.session.id) {
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    if let Some(id) = options.subscription_id {
                        delivery.subscription_ids.push(id);
                    }
                    return;
                }
                targets.push(
                    entry.session.clone(),
                    Delivery {
                        message: message.clone(),
                        qos,
                        retain,
                        subscription_ids: options.subscription_id.into_iter().collect(),
                        seq: 0,
                    },
                    shared,
                );
            });
        }

        let mut routed = Routed {
            delivered: 0,
            dropped: 0,
            durable,
        };
        for (session, delivery, _) in targets.list {
            match session.enqueue_quietly(delivery) {
                Ok((ticket, wake)) => {
                    if wake {
                        match deferred.as_deref_mut() {
                            // Repeats of the previous session are common in a burst.
                            Some(d) if d.wakes.last().is_some_and(|w| w.id == session.id) => {}
                            Some(d) => d.wakes.push(session),
                            None => session.wake(),
                        }
                    }
                    routed.delivered += 1;
                    routed.durable = later(routed.durable.take(), ticket);
                }
                Err(reason) => {
                    routed.dropped += 1;
                    self.0.metrics.dropped(reason, 1);
                }
            }
        }
        if routed.delivered > 0 {
            match deferred {
                Some(d) => d.queued += routed.delivered as u64,
                None => self.0.metrics.queued.increment(routed.delivered as f64),
            }
        }
        if self.0.has_sinks.load(Ordering::Acquire) {
            for (_, sink) in read(&self.0.sinks).iter() {
                match sink.offer(&message) {
                    None => {}
                    Some(Offer::Accepted(ticket)) => {
                        routed.delivered += 1;
                        routed.durable = later(routed.durable.take(), ticket);
                    }
                    Some(Offer::Dropped) => routed.dropped += 1,
                }
            }
        }
        routed
    }

    /// Adds a sink that is offered every message published from now on.
    pub fn add_sink(&self, sink: Arc<dyn Sink>) -> SinkId {
        let id = SinkId(self.0.next_sink.fetch_add(1, Ordering::Relaxed));
        let mut sinks = write(&self.0.sinks);
        sinks.push((id, sink));
        self.0.has_sinks.store(true, Ordering::Release);
        id
    }

    /// Removes a sink; returns whether it was there.
    pub fn remove_sink(&self, id: SinkId) -> bool {
        let mut sinks = write(&self.0.sinks);
        let before = sinks.len();
        sinks.retain(|(s, _)| *s != id);
        self.0.has_sinks.store(!sinks.is_empty(), Ordering::Release);
        sinks.len() != before
    }

    /// Subscribes `session` to `filter`. Queues the matching retained messages as the
    /// retain handling option asks. Returns whether an existing subscription was replaced.
    pub fn subscribe(&self, session: &Arc<Session>, filter: &Filter, options: SubOptions) -> bool {
        let existed = session.record_subscription(filter, options);
        {
            let mut tree = write(&self.0.tree);
            tree.insert(
                &filter.filter,
                filter.share.as_deref(),
                Entry {
                    session: session.clone(),
                    options,
                },
            );
            self.0.metrics.subscriptions.set(tree.len() as f64);
        }
        let send_retained = filter.share.is_none()
            && match options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
        if send_retained {
            self.replay_retained(session, filter, options);
        }
        existed
    }

    fn replay_retained(&self, session: &Arc<Session>, filter: &Filter, options: SubOptions) {
        let now = Instant::now();
        let mut matching: Vec<Arc<Message>> = {
            let retained = read(&self.0.retained);
            retained
                .values()
                .filter(|m| crate::topic::matches(&filter.filter, &m.topic) && !m.is_expired(now))
                .cloned()
                .collect()
        };
        matching.sort_by(|a, b| a.topic.cmp(&b.topic));
        for message in matching {
            let delivery = Delivery {
                qos: message.qos.min(options.qos),
                retain: true,
                subscription_ids: options.subscription_id.into_iter().collect(),
                seq: 0,
                message,
            };
            match session.enqueue(delivery) {
                Ok(_) => self.0.metrics.queued.increment(1.0),
                Err(reason) => self.0.metrics.dropped(reason, 1),
            }
        }
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &Filter) -> bool {
        if !session.forget_subscription(filter) {
            return false;
        }
        let mut tree = write(&self.0.tree);
        tree.remove(&filter.filter, filter.share.as_deref(), session.id);
        self.0.metrics.subscriptions.set(tree.len() as f64);
        true
    }

    /// An in-process client with the same semantics as a network client.
    pub fn local_client(&self, client_id: &str) -> LocalClient {
        let attached = self.attach(AttachOptions {
            client_id: client_id.into(),
            clean_start: true,
            session_expiry_secs: 0,
            owner: None,
            credential: Credential::Internal,
        });
        LocalClient {
            router: self.clone(),
            session: attached.session,
            generation: attached.generation,
        }
    }

    /// Every session, connected or not (a snapshot).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.0.sessions).values().cloned().collect()
    }

    pub fn session_count(&self) -> usize {
        lock(&self.0.sessions).len()
    }

    pub fn retained_count(&self) -> usize {
        read(&self.0.retained).len()
    }

    pub fn subscription_count(&self) -> usize {
        read(&self.0.tree).len()
    }
}

/// The sessions one publish goes to. Overlapping non-shared subscriptions of a session
/// merge into one delivery; a linear scan finds them while the list is short (the common
/// case, and no allocation), an index takes over for large fan-outs.
#[derive(Default)]
struct Targets {
    list: Vec<(Arc<Session>, Delivery, bool)>,
    index: Option<HashMap<u64, usize>>,
}

impl Targets {
    const SCAN_LIMIT: usize = 16;

    fn find(&mut self, session: u64) -> Option<&mut Delivery> {
        let position = match &self.index {
            Some(index) => index.get(&session).copied(),
            None => self
                .list
                .iter()
                .position(|(s, _, shared)| !*shared && s.id == session),
        };
        position.map(|i| &mut self.list[i].1)
    }

    fn push(&mut self, session: Arc<Session>, delivery: Delivery, shared: bool) {
        if self.index.is_none() && self.list.len() >= Self::SCAN_LIMIT {
            self.index = Some(
                self.list
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, _, shared))| !*shared)
                    .map(|(i, (s, _, _))| (s.id, i))
                    .collect(),
            );
        }
        if !shared && let Some(index) = &mut self.index {
            index.insert(session.id, self.list.len());
        }
        self.list.push((session, delivery, shared));
    }
}

/// Runs `f` after `delay` on the current thread's runtime: a connection's MQTT worker (ntex)
/// or the gateway's tokio runtime (in-process clients, start-up).
fn spawn_after(delay: Duration, f: impl FnOnce() + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            tokio::time::sleep(delay).await;
            f();
        });
    } else if ntex::rt::System::try_current().is_some() {
        let deadline = std::time::Instant::now() + delay;
        ntex::rt::spawn(async move {
            // ntex's timer takes whole milliseconds in a u32 (49 days): wait in steps of at
            // most a day until the deadline, rounding up so it never fires early.
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let millis = left.as_micros().div_ceil(1000).min(86_400_000);
                ntex::time::sleep(ntex::time::Millis(millis as u32)).await;
            }
            f();
        });
    } else {
        tracing::error!("No runtime to schedule a session timer on; timer skipped.");
    }
}

/// An in-process client of the router: node link, pipelines and uplinks use this.
/// It behaves as a connected clean session; deliveries are taken with [`LocalClient::recv`]
/// and count as acknowledged once taken. Dropping it ends the session.
pub struct LocalClient {
    router: Router,
    session: Arc<Session>,
    generation: u64,
}

impl LocalClient {
    pub fn client_id(&self) -> &str {
        &self.session.client_id
    }

    /// The session id its publishes carry as [`Origin::Session`] (loop guards use it).
    pub fn session_id(&self) -> u64 {
        self.session.id
    }

    /// Publishes as this client (so `no_local` subscriptions of its own skip it).
    pub fn publish(&self, mut message: Message) -> Routed {
        message.origin = Origin::Session(self.session.id);
        self.router.publish(message)
    }

    /// Publishes `messages` in order as this client, waking each receiving connection once
    /// ([`Router::publish_batch`]).
    pub fn publish_batch(&self, messages: impl IntoIterator<Item = Message>) {
        let origin = Origin::Session(self.session.id);
        self.router
            .publish_batch(messages.into_iter().map(|mut message| {
                message.origin = origin.clone();
                message
            }));
    }

    pub fn subscribe(&self, filter: &str, options: SubOptions) -> Result<(), TopicError> {
        let filter = Filter::parse(filter)?;
        self.router.subscribe(&self.session, &filter, options);
        Ok(())
    }

    pub fn unsubscribe(&self, filter: &str) -> Result<bool, TopicError> {
        let filter = Filter::parse(filter)?;
        Ok(self.router.unsubscribe(&self.session, &filter))
    }

    /// The next delivery; `None` once the session was taken over or ended.
    pub async fn recv(&self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.take()? {
                return Some(delivery);
            }
            self.session.wait().await;
        }
    }

    /// The next delivery if one is queued now; `None` when none is (or the session ended).
    pub fn try_recv(&self) -> Option<Delivery> {
        self.take().flatten()
    }

    /// `None`: the session is gone; `Some(None)`: nothing queued.
    fn take(&self) -> Option<Option<Delivery>> {
        let mut out = Vec::with_capacity(1);
        self.session
            .next_outgoing(self.generation, usize::MAX, 1, &mut out)
            .ok()?;
        let outgoing = out.pop();
        if let Some(outgoing) = &outgoing {
            if let Some(id) = outgoing.packet_id {
                self.session.acknowledge(id.get());
            }
            self.router.metrics().sent(
                outgoing.delivery.qos,
                outgoing.delivery.message.payload.len(),
            );
        }
        Some(outgoing.map(|o| o.delivery))
    }

    /// Deliveries waiting in this client's queue.
    pub fn queued(&self) -> usize {
        self.session.queued_len()
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.router.detach(&self.session, self.generation, None);
    }
}

#[cfg(test)]
mod tests;
