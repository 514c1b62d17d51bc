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

use crate::{
    message::{ByteString, Message, Origin},
    metrics::BrokerMetrics,
    session::{Delivery, Session},
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

/// The outcome of one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routed {
    /// Sessions the message was queued for.
    pub delivered: usize,
    /// Sessions that matched but dropped it (queue full, offline QoS 0...).
    pub dropped: usize,
}

struct Inner {
    tree: RwLock<SubscriptionTree>,
    retained: RwLock<HashMap<ByteString, Arc<Message>>>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    next_session_id: AtomicU64,
    limits: RouterLimits,
    metrics: Arc<BrokerMetrics>,
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
    pub fn new(limits: RouterLimits) -> Self {
        Self(Arc::new(Inner {
            tree: RwLock::new(SubscriptionTree::default()),
            retained: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_session_id: AtomicU64::new(1),
            limits,
            metrics: Arc::new(BrokerMetrics::new()),
        }))
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
        let expiry = options
            .session_expiry_secs
            .min(self.0.limits.max_session_expiry_secs.max(1))
            .min(options.session_expiry_secs);
        let mut ended = None;
        let attached = {
            let mut sessions = lock(&self.0.sessions);
            match sessions.get(&options.client_id).cloned() {
                Some(existing) if !options.clean_start && !existing.is_ended() => {
                    let generation = existing.attach(expiry);
                    Attached {
                        session: existing,
                        generation,
                        session_present: true,
                    }
                }
                existing => {
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
                    ));
                    sessions.insert(options.client_id.clone(), session.clone());
                    let generation = session.attach(expiry);
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
        attached
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
        self.0.metrics.received(message.qos, message.payload.len());
        let publisher = match message.origin {
            Origin::Session(id) => Some(id),
            _ => None,
        };
        let message = Arc::new(message);
        if message.retain {
            let mut retained = write(&self.0.retained);
            if message.payload.is_empty() {
                retained.remove(&message.topic);
            } else {
                retained.insert(message.topic.clone(), message.clone());
            }
            self.0.metrics.retained.set(retained.len() as f64);
        }

        // One delivery per session for its non-shared subscriptions (highest QoS, every
        // subscription id); shared-group picks are separate deliveries.
        let mut targets: Vec<(Arc<Session>, Delivery)> = Vec::new();
        let mut index: HashMap<u64, usize> = HashMap::new();
        {
            let tree = read(&self.0.tree);
            tree.for_each_match(&message.topic, |entry: &Entry, shared| {
                let options = entry.options;
                if options.no_local && publisher == Some(entry.session.id) {
                    return;
                }
                let qos = message.qos.min(options.qos);
                let retain = message.retain && options.retain_as_published;
                if !shared && let Some(&i) = index.get(&entry.session.id) {
                    let delivery = &mut targets[i].1;
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    if let Some(id) = options.subscription_id {
                        delivery.subscription_ids.push(id);
                    }
                    return;
                }
                if !shared {
                    index.insert(entry.session.id, targets.len());
                }
                targets.push((
                    entry.session.clone(),
                    Delivery {
                        message: message.clone(),
                        qos,
                        retain,
                        subscription_ids: options.subscription_id.into_iter().collect(),
                    },
                ));
            });
        }

        let mut routed = Routed {
            delivered: 0,
            dropped: 0,
        };
        for (session, delivery) in targets {
            match session.enqueue(delivery) {
                Ok(()) => routed.delivered += 1,
                Err(reason) => {
                    routed.dropped += 1;
                    self.0.metrics.dropped(reason, 1);
                }
            }
        }
        routed
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
                message,
            };
            if let Err(reason) = session.enqueue(delivery) {
                self.0.metrics.dropped(reason, 1);
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
        });
        LocalClient {
            router: self.clone(),
            session: attached.session,
            generation: attached.generation,
        }
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

/// Runs `f` after `delay` on the current tokio runtime (the connection's worker).
fn spawn_after(delay: Duration, f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(async move {
                tokio::time::sleep(delay).await;
                f();
            });
        }
        Err(_) => tracing::error!("No runtime to schedule a session timer on; timer skipped."),
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

    /// Publishes as this client (so `no_local` subscriptions of its own skip it).
    pub fn publish(&self, mut message: Message) -> Routed {
        message.origin = Origin::Session(self.session.id);
        self.router.publish(message)
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
        let mut out = Vec::with_capacity(1);
        loop {
            self.session
                .next_outgoing(self.generation, usize::MAX, 1, &mut out)
                .ok()?;
            if let Some(outgoing) = out.pop() {
                if let Some(id) = outgoing.packet_id {
                    self.session.acknowledge(id.get());
                }
                self.router.metrics().sent(
                    outgoing.delivery.qos,
                    outgoing.delivery.message.payload.len(),
                );
                return Some(outgoing.delivery);
            }
            self.session.wait().await;
        }
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
