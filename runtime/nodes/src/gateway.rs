//! The MQTT-SN 1.2 gateway of one link: frames in, broker clients out.
//!
//! Every node on the link (one directly attached, or many behind a forwarder, told apart by
//! their wireless node ids) that sends CONNECT becomes a broker client
//! ([`Router::local_client`]) named by its client id. A task per node moves the node's
//! deliveries from its broker session into the link's one bounded channel; the link loop
//! owns all node state, so there are no locks. Whatever the link writes goes out in one
//! `write_all` per turn of the loop.
//!
//! Wills (spec §6.3): a CONNECT with the will flag is answered with WILLTOPICREQ and
//! WILLMSGREQ before CONNACK; the will is published when the node is lost (keepalive or
//! sleep expired, replaced by a new CONNECT, the link failed), not after its DISCONNECT and
//! not when the gateway stops. WILLTOPICUPD and WILLMSGUPD change it.
//!
//! Sleeping clients (spec §6.14): DISCONNECT with a duration puts a node to sleep. Its
//! broker session stays (subscriptions, registered topics) and its deliveries wait there,
//! bounded by `broker.limits.max_queued`; a PINGREQ with its client id wakes it for the
//! waiting messages, then PINGRESP sends it back to sleep; CONNECT (clean session off)
//! makes it active again with its session. A node silent for 1.5 sleep durations is lost.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use edgegw_broker::{
    Bytes, Delivery, LocalClient, Message as BrokerMessage, QoS as BrokerQoS, Router, SubOptions,
};
use edgegw_protocol::{
    Connect, FrameDecoder, Message, Publish, QoS, Register, ReturnCode, Subscribe, Topic, TopicId,
    Unsubscribe, WillTopic, encode_encapsulated, encode_frame_to_vec, encode_to_vec,
};
use metrics::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    LinkError,
    metrics::{FrameErrorKind, NodeMetrics, PerNode, RejectReason},
};

/// Longest frame accepted from a node (message + CRC); longer ones are dropped and counted.
pub const MAX_FRAME: usize = 1024;
/// Deliveries from all node sessions of one link waiting to be written. When full the
/// per-node forwarding tasks wait, so the broker session queues (bounded by
/// `broker.limits.max_queued`, drops counted there) absorb a slow link.
const DELIVERY_QUEUE: usize = 64;
/// Deliveries held per topic while the node has not yet acknowledged its REGISTER; beyond
/// that the oldest are dropped (counted as `inflight_full`).
const MAX_AWAITING_REGACK: usize = 16;
/// Inbound QoS 2 messages waiting for PUBREL per node.
const MAX_QOS2_INFLIGHT: usize = 16;
/// The spec limits client ids to 23 characters; be lenient but bounded.
const MAX_CLIENT_ID: usize = 64;
/// How often keepalives are checked.
const KEEPALIVE_TICK: Duration = Duration::from_millis(500);
/// QoS 1 and 2 deliveries sent to one node and not yet acknowledged; more wait in its
/// broker session.
const MAX_INFLIGHT_OUT: usize = 8;
/// Unacknowledged deliveries are sent again (DUP) after this, up to `MAX_RETRIES` times;
/// a node that acknowledges none of them is lost (spec §6.13: Tretry, Nretry).
const RETRY_INTERVAL: Duration = Duration::from_secs(10);
const MAX_RETRIES: u8 = 3;
/// Nodes between CONNECT (with the will flag) and WILLMSG on one link, and how long one may
/// take to answer.
const MAX_PENDING_CONNECTS: usize = 256;
const PENDING_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a link's nodes are: `None` for the node attached directly, else the wireless node id
/// of a node behind a forwarder.
type NodeKey = Option<Arc<[u8]>>;

/// What every link shares.
#[derive(Clone)]
pub struct Context {
    pub router: Router,
    /// Predefined topic ids; `{node}` is replaced by the node's client id.
    pub predefined_topics: Arc<BTreeMap<u16, String>>,
    pub metrics: NodeMetrics,
}

impl Context {
    fn predefined(&self, id: u16, node: Option<&str>) -> Option<String> {
        let template = self.predefined_topics.get(&id)?;
        match node {
            Some(node) => Some(template.replace("{node}", node)),
            None if template.contains("{node}") => None,
            None => Some(template.clone()),
        }
    }
}

/// Topic ids registered with one node, both ways.
#[derive(Default)]
struct Topics {
    by_name: HashMap<Arc<str>, u16>,
    by_id: HashMap<u16, Arc<str>>,
    last: u16,
}

impl Topics {
    /// The id of `name`, assigning the next free one; `None` when all 65 535 are used.
    fn id_for(&mut self, name: &str) -> Option<(u16, bool)> {
        if let Some(&id) = self.by_name.get(name) {
            return Some((id, false));
        }
        let id = self.last.checked_add(1)?;
        self.last = id;
        let name: Arc<str> = name.into();
        self.by_name.insert(name.clone(), id);
        self.by_id.insert(id, name);
        Some((id, true))
    }
}

struct Node {
    client_id: Arc<str>,
    client: Arc<LocalClient>,
    /// Tells this node's deliveries from those of a node it replaced on the same key.
    epoch: u64,
    forward: JoinHandle<()>,
    /// False while the node sleeps or its in-flight window is full: the forwarding task
    /// leaves deliveries in the session.
    pull: watch::Sender<bool>,
    keepalive: Option<Duration>,
    /// While asleep: how long it may stay silent (1.5 sleep durations).
    sleep: Option<Duration>,
    /// Deliveries that reached the link while the node slept or its window was full,
    /// oldest first.
    held: VecDeque<Delivery>,
    /// QoS 1 and 2 deliveries sent and not acknowledged, in send order.
    inflight: VecDeque<SentDelivery>,
    /// Awake for a wake-up PINGREQ: what waited is being sent; PINGRESP ends it.
    waking: bool,
    /// Published when the node is lost.
    will: Option<BrokerMessage>,
    last_seen: Instant,
    topics: Topics,
    next_message_id: u16,
    /// Deliveries for topic ids the node has been sent a REGISTER for and not acked yet.
    awaiting_regack: HashMap<u16, Registering>,
    /// Inbound QoS 2 messages by message id, published at PUBREL.
    qos2_in: HashMap<u16, BrokerMessage>,
    metrics: NodeMetrics,
    /// This node's own series (frames, last seen).
    per_node: PerNode,
}

/// A REGISTER the gateway sent, until REGACK, with the deliveries waiting for it.
struct Registering {
    queued: Vec<Delivery>,
    at: Instant,
    retries: u8,
}

/// A QoS 1 or 2 delivery sent to a node, until PUBACK or PUBCOMP.
struct SentDelivery {
    message_id: u16,
    topic: TopicId,
    delivery: Delivery,
    /// PUBREC came (QoS 2): PUBREL is what is re-sent.
    released: bool,
    at: Instant,
    retries: u8,
}

impl Node {
    /// Asleep (and not in a wake-up), deliveries wait.
    fn dormant(&self) -> bool {
        self.sleep.is_some() && !self.waking
    }

    /// Lets the forwarding task take deliveries from the session, or stops it.
    fn update_pull(&self) {
        let pull = self.sleep.is_none() && self.held.is_empty() && self.window_open();
        self.pull
            .send_if_modified(|current| std::mem::replace(current, pull) != pull);
    }

    /// Room for another QoS 1/2 delivery: those in flight and those waiting for a REGACK
    /// count.
    fn window_open(&self) -> bool {
        self.inflight.len() + self.registering() < MAX_INFLIGHT_OUT
    }

    /// May `delivery` go out now? QoS 0 needs no window, but every delivery waiting for a
    /// REGACK counts, so those never pile up.
    fn may_send(&self, delivery: &Delivery) -> bool {
        self.registering() < MAX_INFLIGHT_OUT
            && (delivery.qos == BrokerQoS::AtMostOnce || self.window_open())
    }

    fn registering(&self) -> usize {
        self.awaiting_regack.values().map(|r| r.queued.len()).sum()
    }

    /// Takes the in-flight delivery with `message_id` (acknowledged or given up).
    fn take_inflight(&mut self, message_id: u16) -> Option<SentDelivery> {
        let i = self
            .inflight
            .iter()
            .position(|s| s.message_id == message_id)?;
        self.inflight.remove(i)
    }

    fn inflight_mut(&mut self, message_id: u16) -> Option<&mut SentDelivery> {
        self.inflight
            .iter_mut()
            .find(|s| s.message_id == message_id)
    }

    /// The next message id not in flight.
    fn message_id(&mut self) -> u16 {
        loop {
            let id = self.next_message_id;
            self.next_message_id = self.next_message_id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|s| s.message_id == id) {
                return id;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Dropped without its DISCONNECT (lost, replaced, link failed): its will goes out.
        if let Some(will) = self.will.take() {
            tracing::info!(client_id = %self.client_id, topic = %will.topic, "Publishing the will of a lost node.");
            self.client.publish(will);
        }
        // The task holds the other reference to the client: once it is gone the broker
        // session ends.
        self.forward.abort();
        self.metrics.connected.decrement(1.0);
    }
}

/// Encoded frames waiting to be written.
struct Outbox {
    bytes: Vec<u8>,
    metrics: NodeMetrics,
    /// Frames-sent counters of the connected nodes (pruned at each keepalive check).
    per_node: HashMap<NodeKey, Counter>,
}

impl Outbox {
    fn send(&mut self, key: &NodeKey, message: &Message<'_>) {
        let encoded = match key {
            None => encode_to_vec(message),
            Some(id) => {
                let mut buffer = vec![0; message_capacity(message)];
                encode_encapsulated(0, id, message, &mut buffer).map(|n| {
                    buffer.truncate(n);
                    buffer
                })
            }
        };
        match encoded {
            Ok(bytes) => {
                self.bytes.extend_from_slice(&encode_frame_to_vec(&bytes));
                self.metrics.frames_sent.increment(1);
                if let Some(counter) = self.per_node.get(key) {
                    counter.increment(1);
                }
            }
            Err(error) => tracing::warn!(
                %error,
                message_type = message.message_type().name(),
                "Cannot encode a message for a node; dropped."
            ),
        }
    }
}

/// An upper bound of `message` wrapped in an encapsulation.
fn message_capacity(message: &Message<'_>) -> usize {
    edgegw_protocol::encoded_len(message).unwrap_or(0)
        + 3
        + edgegw_protocol::MAX_WIRELESS_NODE_ID_LEN
}

fn to_broker_qos(qos: QoS) -> BrokerQoS {
    match qos {
        QoS::One => BrokerQoS::AtLeastOnce,
        QoS::Two => BrokerQoS::ExactlyOnce,
        QoS::Zero | QoS::MinusOne => BrokerQoS::AtMostOnce,
    }
}

fn to_node_qos(qos: BrokerQoS) -> QoS {
    match qos {
        BrokerQoS::AtMostOnce => QoS::Zero,
        BrokerQoS::AtLeastOnce => QoS::One,
        BrokerQoS::ExactlyOnce => QoS::Two,
    }
}

fn node_label(key: &NodeKey) -> String {
    match key {
        None => "direct".into(),
        Some(id) => String::from_utf8_lossy(id).into_owned(),
    }
}

/// A CONNECT with the will flag, waiting for WILLTOPIC and WILLMSG.
struct PendingConnect {
    client_id: String,
    clean_session: bool,
    duration: u16,
    will_topic: Option<(String, QoS, bool)>,
    since: Instant,
}

struct Link {
    context: Context,
    link: Arc<str>,
    nodes: HashMap<NodeKey, Node>,
    pending: HashMap<NodeKey, PendingConnect>,
    outbox: Outbox,
    deliveries: mpsc::Sender<(NodeKey, u64, Delivery)>,
    delivered: mpsc::Receiver<(NodeKey, u64, Delivery)>,
    next_epoch: u64,
}

/// Runs the gateway on one open link until it fails (`Err`) or `cancel` fires (`Ok`).
pub async fn run_link<T>(
    io: T,
    link: &str,
    context: &Context,
    cancel: &CancellationToken,
) -> Result<(), LinkError>
where
    T: AsyncRead + AsyncWrite,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let (deliveries, delivered) = mpsc::channel(DELIVERY_QUEUE);
    let mut state = Link {
        context: context.clone(),
        link: link.into(),
        nodes: HashMap::new(),
        pending: HashMap::new(),
        outbox: Outbox {
            // A lone delimiter ends whatever half frame a node still holds from before.
            bytes: vec![edgegw_protocol::DELIMITER],
            metrics: context.metrics.clone(),
            per_node: HashMap::new(),
        },
        deliveries,
        delivered,
        next_epoch: 0,
    };
    let mut decoder = Box::new(FrameDecoder::<MAX_FRAME>::new());
    let mut chunk = vec![0u8; 1024];
    let mut keepalive = tokio::time::interval(KEEPALIVE_TICK);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !state.outbox.bytes.is_empty() {
            writer
                .write_all(&state.outbox.bytes)
                .await
                .map_err(|source| LinkError::Write { source })?;
            state.outbox.bytes.clear();
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                // The gateway stopping is not the nodes' failure: no wills.
                for node in state.nodes.values_mut() {
                    node.will = None;
                }
                return Ok(());
            }
            read = reader.read(&mut chunk) => {
                let n = read.map_err(|source| LinkError::Read { source })?;
                if n == 0 {
                    return Err(LinkError::Closed);
                }
                let mut frames = decoder.feed(&chunk[..n]);
                while let Some(frame) = frames.next_frame() {
                    match frame {
                        Ok(bytes) => {
                            let bytes = bytes.to_vec();
                            state.on_frame(&bytes).await;
                        }
                        Err(error) => {
                            tracing::debug!(link, %error, "Bad frame from a node; dropped.");
                            context.metrics.frame_error(FrameErrorKind::from(&error));
                        }
                    }
                }
            }
            Some((key, epoch, delivery)) = state.delivered.recv() => state.deliver(key, epoch, delivery),
            _ = keepalive.tick() => state.check_keepalives(Instant::now()),
        }
    }
}

impl Link {
    async fn on_frame(&mut self, bytes: &[u8]) {
        self.context.metrics.frames_received.increment(1);
        let decoded = edgegw_protocol::decode_exact(bytes).and_then(|message| match message {
            Message::Encapsulated(encapsulated) => encapsulated.decode_message().map(|inner| {
                (
                    Some(Arc::<[u8]>::from(encapsulated.wireless_node_id)),
                    inner,
                )
            }),
            message => Ok((None, message)),
        });
        match decoded {
            Ok((key, message)) => self.on_message(key, message).await,
            Err(error) => {
                tracing::debug!(link = %self.link, %error, "Undecodable MQTT-SN message; dropped.");
                self.context.metrics.frame_error(FrameErrorKind::Decode);
            }
        }
    }

    fn reject(&self, key: &NodeKey, reason: RejectReason, message_type: &'static str) {
        tracing::debug!(
            link = %self.link,
            node = %node_label(key),
            reason = reason.label(),
            message_type,
            "Node message refused."
        );
        self.context.metrics.rejected(reason);
    }

    async fn on_message(&mut self, key: NodeKey, message: Message<'_>) {
        // Anything from a node (also a CONNECT or WILLTOPIC of a sleeping one) shows it alive.
        if let Some(node) = self.nodes.get_mut(&key) {
            node.last_seen = Instant::now();
            node.per_node.seen();
        }
        match message {
            Message::Connect(connect) => return self.connect(key, connect),
            Message::SearchGw { .. } => {
                return self.outbox.send(
                    &key,
                    &Message::GwInfo {
                        gateway_id: 1,
                        gateway_address: &[],
                    },
                );
            }
            Message::Publish(publish) if publish.qos == QoS::MinusOne => {
                return self.publish_without_connection(&key, publish);
            }
            Message::WillTopic(topic) if self.pending.contains_key(&key) => {
                return self.will_topic(key, topic);
            }
            Message::WillMsg { will_message } if self.pending.contains_key(&key) => {
                return self.will_message(key, will_message);
            }
            _ => {}
        }
        let Some(node) = self.nodes.get_mut(&key) else {
            // Not (or no longer) connected, e.g. after a gateway restart: DISCONNECT tells the
            // node to start over with CONNECT.
            self.reject(
                &key,
                RejectReason::NotConnected,
                message.message_type().name(),
            );
            self.outbox
                .send(&key, &Message::Disconnect { duration: None });
            return;
        };
        node.last_seen = Instant::now();
        match message {
            Message::Register(register) => self.register(key, register),
            Message::RegAck {
                topic_id,
                return_code,
                ..
            } => self.registered(key, topic_id, return_code),
            Message::Publish(publish) => self.publish(key, publish).await,
            Message::PubRel { message_id } => {
                if let Some(message) = node.qos2_in.remove(&message_id) {
                    let routed = node.client.publish(message);
                    if let Err(error) = routed.durable().await {
                        tracing::warn!(%error, "QoS 2 message from a node not stored.");
                    }
                }
                self.outbox.send(&key, &Message::PubComp { message_id });
            }
            Message::PubAck {
                message_id,
                return_code: ReturnCode::InvalidTopicId,
                ..
            } => {
                // The node does not know the topic id (it restarted, or forgot): the id is
                // dropped, and the message goes again after a new REGISTER.
                if let Some(sent) = node.take_inflight(message_id) {
                    if let TopicId::Normal(id) = sent.topic
                        && let Some(name) = node.topics.by_id.remove(&id)
                    {
                        node.topics.by_name.remove(&name);
                    }
                    node.held.push_front(sent.delivery);
                    self.refill(&key);
                }
            }
            Message::PubAck {
                message_id,
                return_code: ReturnCode::Congestion,
                ..
            } => {
                // Busy: sent again after the retry interval.
                if let Some(sent) = node.inflight_mut(message_id) {
                    sent.at = Instant::now();
                }
            }
            Message::PubAck { message_id, .. } | Message::PubComp { message_id } => {
                if node.take_inflight(message_id).is_some() {
                    self.refill(&key);
                }
            }
            Message::PubRec { message_id } => {
                if let Some(sent) = node.inflight_mut(message_id) {
                    sent.released = true;
                    sent.at = Instant::now();
                    sent.retries = 0;
                }
                self.outbox.send(&key, &Message::PubRel { message_id });
            }
            Message::Subscribe(subscribe) => self.subscribe(key, subscribe),
            Message::Unsubscribe(unsubscribe) => self.unsubscribe(key, unsubscribe),
            Message::PingReq { client_id } => self.ping(key, client_id),
            Message::Disconnect {
                duration: Some(duration),
            } if duration > 0 => {
                self.outbox
                    .send(&key, &Message::Disconnect { duration: None });
                node.sleep = Some(Duration::from_secs(u64::from(duration)) * 3 / 2);
                node.waking = false;
                node.update_pull();
                tracing::info!(link = %self.link, client_id = %node.client_id, duration_secs = duration, "Node asleep.");
            }
            Message::Disconnect { .. } => {
                self.outbox
                    .send(&key, &Message::Disconnect { duration: None });
                if let Some(mut node) = self.nodes.remove(&key) {
                    node.will = None;
                    tracing::info!(link = %self.link, client_id = %node.client_id, "Node disconnected.");
                }
            }
            Message::WillTopicUpd(topic) => {
                let return_code = match topic {
                    None => {
                        node.will = None;
                        ReturnCode::Accepted
                    }
                    Some(topic) => match will_topic(&topic) {
                        Some((name, qos, retain)) => {
                            let payload = node.will.take().map(|w| w.payload).unwrap_or_default();
                            node.will = Some(will(name, qos, retain, payload));
                            ReturnCode::Accepted
                        }
                        None => ReturnCode::NotSupported,
                    },
                };
                self.outbox
                    .send(&key, &Message::WillTopicResp { return_code });
            }
            Message::WillMsgUpd { will_message } => {
                let return_code = match &mut node.will {
                    Some(will) => {
                        will.payload = Bytes::copy_from_slice(will_message);
                        ReturnCode::Accepted
                    }
                    // There is no will topic to go with it.
                    None => ReturnCode::NotSupported,
                };
                self.outbox
                    .send(&key, &Message::WillMsgResp { return_code });
            }
            other => self.reject(&key, RejectReason::Unsupported, other.message_type().name()),
        }
    }

    fn connect(&mut self, key: NodeKey, connect: Connect<'_>) {
        let refuse = |link: &mut Self, reason| {
            link.reject(&key, reason, "CONNECT");
            link.outbox.send(
                &key,
                &Message::ConnAck {
                    return_code: ReturnCode::NotSupported,
                },
            );
        };
        if connect.client_id.is_empty() || connect.client_id.len() > MAX_CLIENT_ID {
            return refuse(self, RejectReason::InvalidClientId);
        }
        let pending = PendingConnect {
            client_id: connect.client_id.to_owned(),
            clean_session: connect.clean_session,
            duration: connect.duration,
            will_topic: None,
            since: Instant::now(),
        };
        if connect.will {
            if self.pending.len() >= MAX_PENDING_CONNECTS && !self.pending.contains_key(&key) {
                self.context.metrics.rejected(RejectReason::InflightFull);
                return self.outbox.send(
                    &key,
                    &Message::ConnAck {
                        return_code: ReturnCode::Congestion,
                    },
                );
            }
            self.pending.insert(key.clone(), pending);
            return self.outbox.send(&key, &Message::WillTopicReq);
        }
        self.pending.remove(&key);
        self.establish(key, pending, None);
    }

    /// WILLTOPIC during a CONNECT: the empty one means no will after all.
    fn will_topic(&mut self, key: NodeKey, topic: Option<WillTopic<'_>>) {
        let Some(topic) = topic else {
            let pending = self.pending.remove(&key).expect("checked by the caller");
            return self.establish(key, pending, None);
        };
        let Some(parsed) = will_topic(&topic) else {
            self.pending.remove(&key);
            self.reject(&key, RejectReason::InvalidTopic, "WILLTOPIC");
            return self.outbox.send(
                &key,
                &Message::ConnAck {
                    return_code: ReturnCode::NotSupported,
                },
            );
        };
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.will_topic = Some(parsed);
        }
        self.outbox.send(&key, &Message::WillMsgReq);
    }

    /// WILLMSG: the CONNECT is complete.
    fn will_message(&mut self, key: NodeKey, message: &[u8]) {
        let mut pending = self.pending.remove(&key).expect("checked by the caller");
        let Some((topic, qos, retain)) = pending.will_topic.take() else {
            // WILLMSG before WILLTOPIC: ask again from the start.
            self.reject(&key, RejectReason::Unsupported, "WILLMSG");
            return self.outbox.send(
                &key,
                &Message::ConnAck {
                    return_code: ReturnCode::NotSupported,
                },
            );
        };
        let will = will(topic, qos, retain, Bytes::copy_from_slice(message));
        self.establish(key, pending, Some(will));
    }

    /// Connects a node: resumes the session of the node at `key` when it has the same client
    /// id and the CONNECT keeps sessions (a sleeping node waking up), else starts a new one
    /// (replacing any old node there).
    fn establish(&mut self, key: NodeKey, connect: PendingConnect, will: Option<BrokerMessage>) {
        let keepalive = (connect.duration > 0)
            // The spec's grace: 1.5 periods without a message.
            .then(|| Duration::from_secs(u64::from(connect.duration)) * 3 / 2);
        if !connect.clean_session
            && let Some(node) = self.nodes.get_mut(&key)
            && *node.client_id == *connect.client_id
        {
            node.keepalive = keepalive;
            node.last_seen = Instant::now();
            node.will = will;
            let was_asleep = node.sleep.take().is_some();
            node.waking = false;
            tracing::info!(
                link = %self.link,
                node = %node_label(&key),
                client_id = %node.client_id,
                keepalive_secs = connect.duration,
                was_asleep,
                "Node connected again; session resumed."
            );
            self.outbox.send(
                &key,
                &Message::ConnAck {
                    return_code: ReturnCode::Accepted,
                },
            );
            // Unacknowledged deliveries again, then what waited at the link; the session's
            // queue follows through the forwarding task.
            resend_inflight(&mut self.outbox, &key, node);
            self.refill(&key);
            return;
        }
        // A node that reconnects replaces its old state (and broker session) first.
        self.nodes.remove(&key);
        let client = Arc::new(self.context.router.local_client(&connect.client_id));
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let (pull, mut pull_rx) = watch::channel(true);
        let forward = tokio::spawn({
            let client = client.clone();
            let deliveries = self.deliveries.clone();
            let key = key.clone();
            async move {
                loop {
                    // While the node sleeps (or its window is full) deliveries wait in its
                    // session.
                    if pull_rx.wait_for(|pull| *pull).await.is_err() {
                        break;
                    }
                    let Some(delivery) = client.recv().await else {
                        break;
                    };
                    if deliveries
                        .send((key.clone(), epoch, delivery))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        self.context.metrics.connected.increment(1.0);
        tracing::info!(
            link = %self.link,
            node = %node_label(&key),
            client_id = connect.client_id,
            keepalive_secs = connect.duration,
            will = will.is_some(),
            "Node connected."
        );
        let per_node = self.context.metrics.per_node(&connect.client_id);
        per_node.seen();
        self.outbox
            .per_node
            .insert(key.clone(), per_node.frames_sent.clone());
        self.nodes.insert(
            key.clone(),
            Node {
                client_id: connect.client_id.into(),
                client,
                epoch,
                forward,
                pull,
                keepalive,
                sleep: None,
                held: VecDeque::new(),
                inflight: VecDeque::new(),
                waking: false,
                will,
                last_seen: Instant::now(),
                topics: Topics::default(),
                next_message_id: 1,
                awaiting_regack: HashMap::new(),
                qos2_in: HashMap::new(),
                metrics: self.context.metrics.clone(),
                per_node,
            },
        );
        self.outbox.send(
            &key,
            &Message::ConnAck {
                return_code: ReturnCode::Accepted,
            },
        );
    }

    /// PINGREQ. With the client id of a sleeping node: it is awake for what waited for it,
    /// then PINGRESP (once any REGISTERs those needed are acked) sends it back to sleep.
    fn ping(&mut self, key: NodeKey, client_id: Option<&str>) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let waking = node.sleep.is_some() && client_id.is_some_and(|id| *node.client_id == *id);
        if !waking {
            return self.outbox.send(&key, &Message::PingResp);
        }
        // REGISTERs of an earlier wake-up still unacked (the REGACK may have been lost):
        // sent again, so this PINGRESP does not wait forever.
        let unacked: Vec<u16> = node.awaiting_regack.keys().copied().collect();
        for topic_id in unacked {
            resend_register(&mut self.outbox, &key, node, topic_id);
        }
        // Deliveries sent before it slept and not acknowledged go again first.
        resend_inflight(&mut self.outbox, &key, node);
        // Then, oldest first: held at the link, on their way to it, in the session.
        let epoch = node.epoch;
        let mut others = Vec::new();
        while let Ok((other, other_epoch, delivery)) = self.delivered.try_recv() {
            if other == key && other_epoch == epoch {
                node.held.push_back(delivery);
            } else {
                others.push((other, other_epoch, delivery));
            }
        }
        node.waking = true;
        self.refill(&key);
        for (other, other_epoch, delivery) in others {
            self.deliver(other, other_epoch, delivery);
        }
    }

    /// Sends what waits for the node at `key` as far as its window allows: held deliveries,
    /// then (in a wake-up) its session's queue. A wake-up ends with PINGRESP once nothing is
    /// left to send and no REGISTER is unacknowledged.
    fn refill(&mut self, key: &NodeKey) {
        loop {
            let Some(node) = self.nodes.get_mut(key) else {
                return;
            };
            if node.dormant() {
                break;
            }
            let next = match node.held.front() {
                Some(front) if !node.may_send(front) => break,
                Some(_) => node.held.pop_front(),
                // The session's queue: the link takes it itself only in a wake-up (otherwise
                // the forwarding task does).
                None if node.waking && node.window_open() => node.client.try_recv(),
                None => None,
            };
            let Some(delivery) = next else { break };
            self.dispatch(key, delivery);
        }
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        // Everything sent in the wake-up acknowledged too: a PUBREC (QoS 2) or a lost
        // PUBLISH is dealt with while the node still listens.
        if node.waking
            && node.held.is_empty()
            && node.awaiting_regack.is_empty()
            && node.inflight.is_empty()
            && node.client.queued() == 0
        {
            node.waking = false;
            self.outbox.send(key, &Message::PingResp);
        }
        node.update_pull();
    }

    fn register(&mut self, key: NodeKey, register: Register<'_>) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let name = register.topic_name;
        let (topic_id, return_code) = if name.is_empty() || name.contains(['+', '#', '\0']) {
            self.context.metrics.rejected(RejectReason::InvalidTopic);
            (0, ReturnCode::NotSupported)
        } else {
            match node.topics.id_for(name) {
                Some((id, _)) => (id, ReturnCode::Accepted),
                None => (0, ReturnCode::Congestion),
            }
        };
        self.outbox.send(
            &key,
            &Message::RegAck {
                topic_id,
                message_id: register.message_id,
                return_code,
            },
        );
    }

    fn registered(&mut self, key: NodeKey, topic_id: u16, return_code: ReturnCode) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let Some(Registering { queued, .. }) = node.awaiting_regack.remove(&topic_id) else {
            return;
        };
        if return_code == ReturnCode::Accepted {
            for delivery in queued {
                send_publish(
                    &mut self.outbox,
                    &key,
                    node,
                    TopicId::Normal(topic_id),
                    delivery,
                );
            }
        } else {
            tracing::debug!(
                topic_id,
                ?return_code,
                "Node refused a topic; its messages are dropped."
            );
        }
        self.refill(&key);
    }

    /// The topic name a node's PUBLISH means, `None` when unknown.
    fn topic_name(context: &Context, node: &Node, topic: TopicId) -> Option<String> {
        match topic {
            TopicId::Normal(id) => node.topics.by_id.get(&id).map(|n| n.to_string()),
            TopicId::Predefined(id) => context.predefined(id, Some(&node.client_id)),
            TopicId::Short(name) => std::str::from_utf8(&name).ok().map(str::to_owned),
        }
    }

    async fn publish(&mut self, key: NodeKey, publish: Publish<'_>) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let Some(topic) = Self::topic_name(&self.context, node, publish.topic) else {
            self.context.metrics.rejected(RejectReason::UnknownTopic);
            tracing::debug!(client_id = %node.client_id, topic = ?publish.topic, "PUBLISH to an unknown topic id.");
            self.outbox.send(
                &key,
                &Message::PubAck {
                    topic_id: u16::from_be_bytes(publish.topic.to_bytes()),
                    message_id: publish.message_id,
                    return_code: ReturnCode::InvalidTopicId,
                },
            );
            return;
        };
        let message = BrokerMessage::new(
            topic,
            Bytes::copy_from_slice(publish.data),
            to_broker_qos(publish.qos),
        )
        .with_retain(publish.retain);
        match publish.qos {
            QoS::Zero | QoS::MinusOne => {
                node.client.publish(message);
            }
            QoS::One => {
                let routed = node.client.publish(message);
                // Acknowledge only what the state file holds (when it is persisted at all).
                let return_code = match routed.durable().await {
                    Ok(()) => ReturnCode::Accepted,
                    Err(error) => {
                        tracing::warn!(%error, "QoS 1 message from a node not stored.");
                        ReturnCode::Congestion
                    }
                };
                self.outbox.send(
                    &key,
                    &Message::PubAck {
                        topic_id: u16::from_be_bytes(publish.topic.to_bytes()),
                        message_id: publish.message_id,
                        return_code,
                    },
                );
            }
            QoS::Two => {
                if node.qos2_in.len() >= MAX_QOS2_INFLIGHT
                    && !node.qos2_in.contains_key(&publish.message_id)
                {
                    self.context.metrics.rejected(RejectReason::InflightFull);
                    return;
                }
                // A DUP re-send replaces the held copy: it is routed once, at PUBREL.
                node.qos2_in.insert(publish.message_id, message);
                self.outbox.send(
                    &key,
                    &Message::PubRec {
                        message_id: publish.message_id,
                    },
                );
            }
        }
    }

    /// QoS −1 (spec §6.8): predefined or short topic ids, no connection needed.
    fn publish_without_connection(&mut self, key: &NodeKey, publish: Publish<'_>) {
        let node = self.nodes.get(key);
        let name = match (node, key) {
            (Some(node), _) => Some(node.client_id.to_string()),
            (None, Some(id)) => Some(String::from_utf8_lossy(id).into_owned()),
            (None, None) => None,
        };
        let topic = match publish.topic {
            TopicId::Predefined(id) => self.context.predefined(id, name.as_deref()),
            TopicId::Short(short) => std::str::from_utf8(&short).ok().map(str::to_owned),
            TopicId::Normal(_) => None,
        };
        let Some(topic) = topic else {
            return self.reject(key, RejectReason::UnknownTopic, "PUBLISH(QoS -1)");
        };
        let message = BrokerMessage::new(
            topic,
            Bytes::copy_from_slice(publish.data),
            BrokerQoS::AtMostOnce,
        )
        .with_retain(publish.retain);
        match node {
            Some(node) => node.client.publish(message),
            None => self.context.router.publish(message),
        };
    }

    fn subscribe(&mut self, key: NodeKey, subscribe: Subscribe<'_>) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let (filter, predefined_id) = match subscribe.topic {
            Topic::Name(name) => (Some(name.to_owned()), None),
            Topic::Predefined(id) => (self.context.predefined(id, Some(&node.client_id)), Some(id)),
            Topic::Short(short) => (std::str::from_utf8(&short).ok().map(str::to_owned), None),
        };
        let qos = to_broker_qos(subscribe.qos);
        let suback = |topic_id, return_code| Message::SubAck {
            qos: to_node_qos(qos),
            topic_id,
            message_id: subscribe.message_id,
            return_code,
        };
        let Some(filter) = filter else {
            self.context.metrics.rejected(RejectReason::UnknownTopic);
            self.outbox
                .send(&key, &suback(0, ReturnCode::InvalidTopicId));
            return;
        };
        if let Err(error) = node.client.subscribe(&filter, SubOptions::qos(qos)) {
            tracing::debug!(client_id = %node.client_id, %error, "Invalid SUBSCRIBE filter.");
            self.context.metrics.rejected(RejectReason::InvalidTopic);
            self.outbox.send(&key, &suback(0, ReturnCode::NotSupported));
            return;
        }
        // A topic name without wildcards gets its id in SUBACK (spec §6.9), so deliveries
        // need no REGISTER.
        let topic_id = match (subscribe.topic, predefined_id) {
            (_, Some(id)) => id,
            (Topic::Name(name), None) if !name.contains(['+', '#']) => {
                node.topics.id_for(name).map_or(0, |(id, _)| id)
            }
            _ => 0,
        };
        tracing::debug!(client_id = %node.client_id, filter, "Node subscribed.");
        self.outbox
            .send(&key, &suback(topic_id, ReturnCode::Accepted));
    }

    fn unsubscribe(&mut self, key: NodeKey, unsubscribe: Unsubscribe<'_>) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let filter = match unsubscribe.topic {
            Topic::Name(name) => Some(name.to_owned()),
            Topic::Predefined(id) => self.context.predefined(id, Some(&node.client_id)),
            Topic::Short(short) => std::str::from_utf8(&short).ok().map(str::to_owned),
        };
        if let Some(filter) = filter {
            let _ = node.client.unsubscribe(&filter);
        }
        self.outbox.send(
            &key,
            &Message::UnsubAck {
                message_id: unsubscribe.message_id,
            },
        );
    }

    /// A message from the broker for the node at `key`.
    fn deliver(&mut self, key: NodeKey, epoch: u64, delivery: Delivery) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        if node.epoch != epoch {
            return;
        }
        // Asleep, or behind others waiting for the window: kept in order. (The forwarding
        // task stops in both cases, so only what was on its way lands here.)
        if node.dormant() || !node.held.is_empty() || !node.may_send(&delivery) {
            // At most the link channel's worth plus the one the forwarding task held.
            if node.held.len() > DELIVERY_QUEUE {
                node.held.pop_front();
                self.context.metrics.rejected(RejectReason::InflightFull);
            }
            node.held.push_back(delivery);
            node.update_pull();
            return;
        }
        self.dispatch(&key, delivery);
        if let Some(node) = self.nodes.get_mut(&key) {
            node.update_pull();
        }
    }

    /// Sends one delivery to the node at `key` (REGISTERing its topic first if needed).
    fn dispatch(&mut self, key: &NodeKey, delivery: Delivery) {
        let key = key.clone();
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let topic = &*delivery.message.topic;
        if let Some(&id) = node.topics.by_name.get(topic) {
            if let Some(registering) = node.awaiting_regack.get_mut(&id) {
                return hold(&mut registering.queued, delivery, &self.context.metrics);
            }
            return send_publish(&mut self.outbox, &key, node, TopicId::Normal(id), delivery);
        }
        let predefined = self.context.predefined_topics.keys().copied().find(|&id| {
            self.context
                .predefined(id, Some(&node.client_id))
                .as_deref()
                == Some(topic)
        });
        if let Some(id) = predefined {
            return send_publish(
                &mut self.outbox,
                &key,
                node,
                TopicId::Predefined(id),
                delivery,
            );
        }
        if let [a, b] = topic.as_bytes() {
            return send_publish(
                &mut self.outbox,
                &key,
                node,
                TopicId::Short([*a, *b]),
                delivery,
            );
        }
        let Some((id, _)) = node.topics.id_for(topic) else {
            self.context.metrics.rejected(RejectReason::InflightFull);
            return;
        };
        let message_id = node.message_id();
        self.outbox.send(
            &key,
            &Message::Register(Register {
                topic_id: id,
                message_id,
                topic_name: topic,
            }),
        );
        node.awaiting_regack.insert(
            id,
            Registering {
                queued: vec![delivery],
                at: Instant::now(),
                retries: 0,
            },
        );
    }

    fn check_keepalives(&mut self, now: Instant) {
        let link = self.link.clone();
        let metrics = self.context.metrics.clone();
        let outbox = &mut self.outbox;
        self.nodes.retain(|key, node| {
            // Unacknowledged deliveries: again after RETRY_INTERVAL (not while the node
            // sleeps); a node that leaves MAX_RETRIES re-sends unanswered is lost.
            if !node.dormant() {
                for sent in &mut node.inflight {
                    if now.duration_since(sent.at) < RETRY_INTERVAL {
                        continue;
                    }
                    if sent.retries >= MAX_RETRIES {
                        tracing::warn!(%link, client_id = %node.client_id, message_id = sent.message_id, "Node acknowledged none of the re-sends of a message; disconnected.");
                        metrics.keepalive_timeouts.increment(1);
                        return false;
                    }
                    sent.retries += 1;
                    resend(outbox, key, sent);
                }
                let mut lost = false;
                let due: Vec<u16> = node
                    .awaiting_regack
                    .iter_mut()
                    .filter(|(_, r)| now.duration_since(r.at) >= RETRY_INTERVAL)
                    .map(|(id, r)| {
                        r.retries += 1;
                        lost |= r.retries > MAX_RETRIES;
                        *id
                    })
                    .collect();
                if lost {
                    tracing::warn!(%link, client_id = %node.client_id, "Node acknowledged none of the re-sends of a REGISTER; disconnected.");
                    metrics.keepalive_timeouts.increment(1);
                    return false;
                }
                for topic_id in due {
                    resend_register(outbox, key, node, topic_id);
                }
            }
            let alive = node
                .sleep
                .or(node.keepalive)
                .is_none_or(|limit| now.duration_since(node.last_seen) <= limit);
            if !alive {
                if node.sleep.is_some() {
                    tracing::warn!(%link, client_id = %node.client_id, "Sleeping node did not wake up in time; disconnected.");
                } else {
                    tracing::warn!(%link, client_id = %node.client_id, "Node keepalive expired; disconnected.");
                }
                metrics.keepalive_timeouts.increment(1);
            }
            alive
        });
        self.pending
            .retain(|_, pending| now.duration_since(pending.since) <= PENDING_CONNECT_TIMEOUT);
        let nodes = &self.nodes;
        self.outbox
            .per_node
            .retain(|key, _| nodes.contains_key(key));
    }
}

/// A will topic a node may use: a topic name (no wildcards), its QoS and retain flag.
fn will_topic(topic: &WillTopic<'_>) -> Option<(String, QoS, bool)> {
    (!topic.topic.is_empty() && !topic.topic.contains(['+', '#', '\0']))
        .then(|| (topic.topic.to_owned(), topic.qos, topic.retain))
}

fn will(topic: String, qos: QoS, retain: bool, payload: Bytes) -> BrokerMessage {
    BrokerMessage::new(topic, payload, to_broker_qos(qos)).with_retain(retain)
}

fn hold(queued: &mut Vec<Delivery>, delivery: Delivery, metrics: &NodeMetrics) {
    if queued.len() >= MAX_AWAITING_REGACK {
        queued.remove(0);
        metrics.rejected(RejectReason::InflightFull);
    }
    queued.push(delivery);
}

/// Sends a delivery; QoS 1 and 2 ones stay in flight until acknowledged.
fn send_publish(
    outbox: &mut Outbox,
    key: &NodeKey,
    node: &mut Node,
    topic: TopicId,
    delivery: Delivery,
) {
    let qos = to_node_qos(delivery.qos);
    let message_id = if qos == QoS::Zero {
        0
    } else {
        node.message_id()
    };
    send_publish_frame(outbox, key, topic, message_id, false, &delivery);
    if qos != QoS::Zero {
        node.inflight.push_back(SentDelivery {
            message_id,
            topic,
            delivery,
            released: false,
            at: Instant::now(),
            retries: 0,
        });
    }
}

fn send_publish_frame(
    outbox: &mut Outbox,
    key: &NodeKey,
    topic: TopicId,
    message_id: u16,
    dup: bool,
    delivery: &Delivery,
) {
    outbox.send(
        key,
        &Message::Publish(Publish {
            dup,
            qos: to_node_qos(delivery.qos),
            retain: delivery.retain,
            topic,
            message_id,
            data: &delivery.message.payload,
        }),
    );
}

/// Sends one unacknowledged delivery again: the PUBLISH with DUP, or PUBREL after PUBREC.
fn resend(outbox: &mut Outbox, key: &NodeKey, sent: &mut SentDelivery) {
    if sent.released {
        outbox.send(
            key,
            &Message::PubRel {
                message_id: sent.message_id,
            },
        );
    } else {
        send_publish_frame(
            outbox,
            key,
            sent.topic,
            sent.message_id,
            true,
            &sent.delivery,
        );
    }
    sent.at = Instant::now();
}

/// Every unacknowledged delivery again (the node was asleep or reconnected).
fn resend_inflight(outbox: &mut Outbox, key: &NodeKey, node: &mut Node) {
    for sent in &mut node.inflight {
        resend(outbox, key, sent);
        sent.retries = 0;
    }
}

/// Sends the REGISTER for `topic_id` again (a new message id).
fn resend_register(outbox: &mut Outbox, key: &NodeKey, node: &mut Node, topic_id: u16) {
    let Some(name) = node.topics.by_id.get(&topic_id).cloned() else {
        return;
    };
    let message_id = node.message_id();
    outbox.send(
        key,
        &Message::Register(Register {
            topic_id,
            message_id,
            topic_name: &name,
        }),
    );
    if let Some(registering) = node.awaiting_regack.get_mut(&topic_id) {
        registering.at = Instant::now();
    }
}

#[cfg(test)]
mod tests;
