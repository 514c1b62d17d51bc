//! The connection side of an uplink: one thread with its own single-threaded ntex runtime
//! (ntex-mqtt's client types are `!Send`), connecting with backoff, forwarding the outbox in
//! order with a bounded in-flight window, and delivering downlink messages to the router.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use edgegw_broker::{LocalClient, Message, QoS, topic::TopicTemplate};
use edgegw_store::{Outbox, OutboxEntry, StoreError};
use edgegw_telemetry::names;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use ntex::{Pipeline, SharedCfg, service::fn_service, time::Seconds};
use ntex_bytes::{ByteString, Bytes};
use ntex_mqtt::{v3, v5};
use ntex_tls::rustls::TlsConnector;
use rand::Rng as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{Endpoint, Protocol, UplinkSettings, qos_of};

/// How long a connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries read from the outbox at once.
const READ_AHEAD: usize = 1024;
/// Session expiry asked for when `clean_start` is false (MQTT 5).
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

pub(crate) struct CompiledDownlink {
    pub remote: String,
    pub template: TopicTemplate,
    pub qos: u8,
}

pub(crate) struct Task {
    pub settings: UplinkSettings,
    pub endpoint: Endpoint,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub downlinks: Vec<CompiledDownlink>,
    pub outbox: Outbox,
    pub local: Arc<LocalClient>,
    pub cancel: CancellationToken,
}

struct Metrics {
    connected: Gauge,
    reconnects: Counter,
    connect_failures: Counter,
    forwarded: Counter,
    downlink: Counter,
    rtt: Histogram,
    too_large: Counter,
}

impl Metrics {
    fn new(uplink: &str) -> Self {
        let l = uplink.to_string();
        Self {
            connected: gauge!(names::UPLINK_CONNECTED, "uplink" => l.clone()),
            reconnects: counter!(names::UPLINK_RECONNECTS, "uplink" => l.clone()),
            connect_failures: counter!(names::UPLINK_CONNECT_FAILURES, "uplink" => l.clone()),
            forwarded: counter!(names::UPLINK_FORWARDED, "uplink" => l.clone()),
            downlink: counter!(names::UPLINK_DOWNLINK, "uplink" => l.clone()),
            rtt: histogram!(names::UPLINK_ACK_RTT, "uplink" => l.clone()),
            too_large: counter!(names::UPLINK_DROPPED, "uplink" => l, "reason" => "too_large"),
        }
    }
}

/// The address handed to ntex's connector: `host()` is the name TLS verifies (and sends as
/// SNI); `addr()`, when set, is where to connect instead of resolving that name.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    port: u16,
    addr: Option<SocketAddr>,
}

impl ntex::connect::Address for Target {
    fn host(&self) -> &str {
        &self.name
    }

    fn port(&self) -> Option<u16> {
        Some(self.port)
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

/// An open connection's sending side.
#[derive(Clone)]
enum Up {
    V3 {
        sink: v3::MqttSink,
        /// Configured only: a 3.1.1 broker cannot announce it.
        max_packet: Option<u32>,
    },
    V5 {
        sink: v5::MqttSink,
        max_packet: Option<u32>,
        max_qos: u8,
    },
}

/// A PUBLISH ready to send (`Up::prepare`); for MQTT 5 with the broker's maximum QoS.
enum Prepared {
    V3(v3::PublishBuilder),
    V5(v5::PublishBuilder, u8),
}

/// Why one forward failed.
enum Failure {
    /// The connection is gone: the entry stays in the outbox and is sent again.
    Disconnected(String),
    /// The cloud broker can never take it (too large, refused): dropped and counted.
    Rejected(&'static str, String),
}

impl Up {
    /// The entry's PUBLISH, checked against the broker's maximum packet size.
    fn prepare(&self, entry: OutboxEntry) -> Result<(Prepared, Bytes), Failure> {
        let topic = ByteString::from(entry.topic);
        let payload = Bytes::from(entry.payload);
        // The QoS it goes out with (MQTT 5: at most the broker's): a packet id only above 0.
        let (prepared, size, max, qos) = match self {
            Up::V3 { sink, max_packet } => {
                let mut builder = sink.publish(topic);
                if entry.retain {
                    builder = builder.retain();
                }
                let size = builder.size(payload.len());
                (Prepared::V3(builder), size, *max_packet, entry.qos)
            }
            Up::V5 {
                sink,
                max_packet,
                max_qos,
            } => {
                let builder = sink.publish(topic).retain(entry.retain);
                let size = builder.size(payload.len());
                let qos = entry.qos.min(*max_qos);
                (Prepared::V5(builder, *max_qos), size, *max_packet, qos)
            }
        };
        fits(max, size, qos)?;
        Ok((prepared, payload))
    }

    async fn publish(&self, entry: OutboxEntry) -> Result<(), Failure> {
        let qos = entry.qos;
        match self.prepare(entry)? {
            (Prepared::V3(builder), payload) => match qos {
                0 => builder
                    .send_at_most_once(payload)
                    .await
                    .map_err(send_failed),
                1 => builder
                    .send_at_least_once(payload)
                    .await
                    .map_err(send_failed),
                _ => {
                    let received = builder
                        .send_exactly_once(payload)
                        .await
                        .map_err(send_failed)?;
                    received.release().await.map_err(send_failed)
                }
            },
            (Prepared::V5(builder, max_qos), payload) => match qos.min(max_qos) {
                0 => builder
                    .send_at_most_once(payload)
                    .await
                    .map_err(send_failed),
                1 => {
                    let ack = builder
                        .send_at_least_once(payload)
                        .await
                        .map_err(send_failed)?;
                    refused(ack.reason_code as u8, ack.reason_string)
                }
                _ => {
                    let received = builder
                        .send_exactly_once(payload)
                        .await
                        .map_err(send_failed)?;
                    let code = received.packet().reason_code as u8;
                    let reason = received.packet().reason_string.clone();
                    refused(code, reason)?;
                    received.release().await.map_err(send_failed)
                }
            },
        }
    }

    /// Whether a publish of `qos` goes out unawaited (`publish_unawaited`): QoS 1 after the
    /// broker's maximum QoS. QoS 0 and 2 keep a task each (QoS 2 has two round trips).
    fn unawaited(&self, qos: u8) -> bool {
        match self {
            Up::V3 { .. } => qos == 1,
            Up::V5 { max_qos, .. } => qos.min(*max_qos) == 1,
        }
    }

    /// Send credit is left and the connection's write buffer is below its high mark.
    fn is_ready(&self) -> bool {
        match self {
            Up::V3 { sink, .. } => sink.is_ready(),
            Up::V5 { sink, .. } => sink.is_ready(),
        }
    }

    /// Sets what runs on the PUBACK of each `publish_unawaited`. ntex refuses a PUBACK out
    /// of order, so they come in the order the publishes were sent. When the connection
    /// ends, each publish still in flight is reported as `Disconnected`, in no order.
    fn on_pubacks(&self, f: impl Fn(Result<(), Failure>) + 'static) {
        let gone = || Err(Failure::Disconnected("connection closed".into()));
        match self {
            Up::V3 { sink, .. } => sink.publish_ack_cb(move |_, disconnected| {
                f(if disconnected { gone() } else { Ok(()) });
            }),
            Up::V5 { sink, .. } => sink.publish_ack_cb(move |ack, disconnected| {
                f(if disconnected {
                    gone()
                } else {
                    refused(ack.reason_code as u8, ack.reason_string)
                });
            }),
        }
    }

    /// Sends a QoS 1 publish without a task or a wait: its PUBACK is reported to the
    /// `on_pubacks` callback. Only when `unawaited(entry.qos)` and `is_ready()`.
    fn publish_unawaited(&self, entry: OutboxEntry) -> Result<(), Failure> {
        match self.prepare(entry)? {
            (Prepared::V3(builder), payload) => builder.send_at_least_once_no_block(payload),
            (Prepared::V5(builder, _), payload) => builder.send_at_least_once_no_block(payload),
        }
        .map_err(send_failed)
    }

    /// Publishes the connection can send now without waiting for acknowledgements (the
    /// broker's receive maximum for MQTT 5, ntex's send window for 3.1.1).
    fn credit(&self) -> usize {
        match self {
            Up::V3 { sink, .. } => sink.credit(),
            Up::V5 { sink, .. } => sink.credit(),
        }
    }

    fn close(&self) {
        match self {
            Up::V3 { sink, .. } => sink.close(),
            Up::V5 { sink, .. } => sink.close(),
        }
    }
}

/// `Rejected("too_large")` when a publish whose variable header and payload take `size`
/// bytes would be a packet above `max`: the fixed header (1 byte and the 1–4 bytes of the
/// remaining length) and, at QoS 1 and 2, the packet id come on top.
fn fits(max: Option<u32>, size: u32, qos: u8) -> Result<(), Failure> {
    let Some(max) = max else {
        return Ok(());
    };
    let remaining = u64::from(size) + if qos > 0 { 2 } else { 0 };
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    if 1 + length_bytes + remaining > u64::from(max) {
        return Err(Failure::Rejected(
            "too_large",
            format!("above the broker's maximum packet size {max}"),
        ));
    }
    Ok(())
}

/// Why a send failed: a packet the encoder finds above the broker's maximum packet size
/// (the check before sending leaves out the fixed header) can never be sent and is dropped;
/// anything else means the connection is gone and the entry is sent again.
fn send_failed(error: ntex_mqtt::error::SendPacketError) -> Failure {
    use ntex_mqtt::error::{EncodeError, SendPacketError};
    match error {
        SendPacketError::Encode(EncodeError::OverMaxPacketSize) => {
            Failure::Rejected("too_large", "above the broker's maximum packet size".into())
        }
        other => Failure::Disconnected(other.to_string()),
    }
}

/// A PUBACK/PUBREC reason code of 0x80 or above: the broker took the message and refused it.
fn refused(code: u8, reason: Option<ByteString>) -> Result<(), Failure> {
    if code < 0x80 {
        return Ok(());
    }
    Err(Failure::Rejected(
        "refused",
        format!(
            "reason code 0x{code:02x}{}",
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        ),
    ))
}

/// Delivers downlink messages into the router.
struct Downlink {
    rules: Vec<CompiledDownlink>,
    local: Arc<LocalClient>,
    metrics: Rc<Metrics>,
    uplink: String,
}

impl Downlink {
    /// Routes one remote message; `Err` when it cannot be stored (then it is not acked).
    async fn deliver(&self, topic: &str, payload: Bytes, qos: u8, retain: bool) -> Result<(), ()> {
        let Some((rule, local)) = self.rules.iter().find_map(|rule| {
            edgegw_broker::topic::matches(&rule.remote, topic)
                .then(|| rule.template.render(topic).map(|t| (rule, t)))
                .flatten()
        }) else {
            tracing::debug!(uplink = %self.uplink, %topic, "Downlink message matches no subscribe rule (or its template); acknowledged and dropped.");
            return Ok(());
        };
        let qos = qos_of(qos.min(rule.qos));
        self.metrics.downlink.increment(1);
        let routed = self
            .local
            .publish(Message::new(local, payload, qos).with_retain(retain));
        if qos != QoS::AtMostOnce
            && let Err(error) = routed.durable().await
        {
            tracing::error!(uplink = %self.uplink, %error, "Downlink message not acknowledged: state file write failed.");
            return Err(());
        }
        Ok(())
    }
}

impl Task {
    pub fn run(self) {
        let name = format!("edgegw-uplink-{}", self.settings.name);
        let uplink = self.settings.name.clone();
        let driver = self.settings.io_driver;
        let result = ntex::rt::System::new(&name, driver).block_on(async move {
            self.main().await;
            Ok::<(), std::io::Error>(())
        });
        if let Err(error) = result {
            tracing::error!(%uplink, %error, "Uplink runtime failed.");
        }
    }

    async fn main(self) {
        let metrics = Rc::new(Metrics::new(&self.settings.name));
        metrics.connected.set(0.0);
        let task = Rc::new(self);
        let mut backoff = task.settings.reconnect_min;
        let mut connected_before = false;
        loop {
            if task.cancel.is_cancelled() {
                break;
            }
            let attempt = tokio::select! {
                result = ntex::time::timeout(CONNECT_TIMEOUT, task.connect(&metrics)) => {
                    result.unwrap_or_else(|_| Err(format!("no CONNACK within {CONNECT_TIMEOUT:?}")))
                }
                () = task.cancel.cancelled() => break,
            };
            match attempt {
                Ok((up, closed)) => {
                    if connected_before {
                        metrics.reconnects.increment(1);
                    }
                    connected_before = true;
                    backoff = task.settings.reconnect_min;
                    metrics.connected.set(1.0);
                    tracing::info!(uplink = %task.settings.name, remote = %task.settings.url, "Uplink connected.");
                    let reason = task.session(up.clone(), closed, &metrics).await;
                    metrics.connected.set(0.0);
                    up.close();
                    if task.cancel.is_cancelled() {
                        break;
                    }
                    tracing::warn!(uplink = %task.settings.name, %reason, "Uplink disconnected; reconnecting.");
                }
                Err(error) => {
                    metrics.connect_failures.increment(1);
                    tracing::warn!(
                        uplink = %task.settings.name,
                        remote = %task.settings.url,
                        %error,
                        retry_in = ?backoff,
                        "Uplink cannot connect; retrying."
                    );
                }
            }
            // Jitter: between half and all of the backoff.
            let wait = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            tokio::select! {
                () = ntex::time::sleep(wait) => {}
                () = task.cancel.cancelled() => break,
            }
            backoff = (backoff * 2).min(task.settings.reconnect_max);
        }
    }

    async fn target(&self) -> Result<Target, String> {
        let endpoint = &self.endpoint;
        match &self.settings.tls.server_name {
            Some(name) if self.endpoint.tls && *name != endpoint.host => {
                let (host, port) = (endpoint.host.clone(), endpoint.port);
                let addr = ntex::rt::spawn_blocking(move || {
                    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                })
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", endpoint.host))?
                .map_err(|e| format!("cannot resolve {}: {e}", endpoint.host))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", endpoint.host))?;
                Ok(Target {
                    name: name.clone(),
                    port: endpoint.port,
                    addr: Some(addr),
                })
            }
            _ => Ok(Target {
                name: endpoint.host.clone(),
                port: endpoint.port,
                addr: endpoint
                    .host
                    .parse()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, endpoint.port)),
            }),
        }
    }

    /// Connects and starts the dispatcher; `closed` resolves when the connection ends.
    async fn connect(
        self: &Rc<Self>,
        metrics: &Rc<Metrics>,
    ) -> Result<(Up, oneshot::Receiver<String>), String> {
        let target = self.target().await?;
        let settings = &self.settings;
        let keepalive = u16::try_from(settings.keepalive.as_secs()).unwrap_or(u16::MAX);
        let (closed_tx, closed_rx) = oneshot::channel();
        let downlink = Rc::new(Downlink {
            rules: self
                .downlinks
                .iter()
                .map(|d| CompiledDownlink {
                    remote: d.remote.clone(),
                    template: d.template.clone(),
                    qos: d.qos,
                })
                .collect(),
            local: self.local.clone(),
            metrics: metrics.clone(),
            uplink: settings.name.clone(),
        });
        let up = match settings.protocol {
            Protocol::V5 => {
                let mut connect = v5::client::Connect::new(target)
                    .client_id(ByteString::from(settings.client_id.as_str()))
                    .keep_alive(Seconds(keepalive))
                    .max_receive(u16::MAX);
                if settings.clean_start {
                    connect = connect.clean_start();
                } else {
                    connect =
                        connect.packet(|p| p.session_expiry_interval_secs = SESSION_EXPIRY_SECS);
                }
                if let Some(user) = &settings.username {
                    connect = connect.username(ByteString::from(user.as_str()));
                }
                if let Some(password) = &settings.password {
                    connect = connect.password(Bytes::copy_from_slice(password.as_bytes()));
                }
                let client = match &self.tls {
                    Some(tls) => Pipeline::new(
                        SharedCfg::default(),
                        v5::client::MqttConnector::new().connector(TlsConnector::from(tls)),
                    )
                    .call(connect)
                    .await
                    .map_err(|e| describe(&e))?,
                    None => Pipeline::new(SharedCfg::default(), v5::client::MqttConnector::new())
                        .call(connect)
                        .await
                        .map_err(|e| describe(&e))?,
                };
                let ack = client.packet();
                // The smaller of the announced and the configured maximum.
                let max_packet = match (ack.max_packet_size, settings.max_packet_size) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let up = Up::V5 {
                    sink: client.sink(),
                    max_packet,
                    max_qos: ack.max_qos as u8,
                };
                let handler = downlink.clone();
                ntex::rt::spawn(async move {
                    let result = client
                        .start(fn_service(move |message| {
                            let handler = handler.clone();
                            async move { Ok::<_, ()>(on_v5(&handler, message).await) }
                        }))
                        .await;
                    let _ = closed_tx.send(match result {
                        Ok(()) => "connection closed".to_string(),
                        Err(e) => format!("{e:?}"),
                    });
                });
                up
            }
            Protocol::V311 => {
                let mut connect = v3::client::Connect::new(target)
                    .client_id(ByteString::from(settings.client_id.as_str()))
                    .keep_alive(Seconds(keepalive));
                if settings.clean_start {
                    connect = connect.clean_session();
                }
                if let Some(user) = &settings.username {
                    connect = connect.username(ByteString::from(user.as_str()));
                }
                if let Some(password) = &settings.password {
                    connect = connect.password(Bytes::copy_from_slice(password.as_bytes()));
                }
                let client = match &self.tls {
                    Some(tls) => Pipeline::new(
                        SharedCfg::default(),
                        v3::client::MqttConnector::new().connector(TlsConnector::from(tls)),
                    )
                    .call(connect)
                    .await
                    .map_err(|e| describe(&e))?,
                    None => Pipeline::new(SharedCfg::default(), v3::client::MqttConnector::new())
                        .call(connect)
                        .await
                        .map_err(|e| describe(&e))?,
                };
                let up = Up::V3 {
                    sink: client.sink(),
                    max_packet: settings.max_packet_size,
                };
                let handler = downlink.clone();
                ntex::rt::spawn(async move {
                    let result = client
                        .start(fn_service(move |message| {
                            let handler = handler.clone();
                            async move { Ok::<_, ()>(on_v3(&handler, message).await) }
                        }))
                        .await;
                    let _ = closed_tx.send(match result {
                        Ok(()) => "connection closed".to_string(),
                        Err(e) => format!("{e:?}"),
                    });
                });
                up
            }
        };
        Ok((up, closed_rx))
    }

    /// One connected session: restore the downlink subscriptions, then forward the outbox
    /// until the connection ends. Returns why it ended.
    async fn session(
        &self,
        up: Up,
        mut closed: oneshot::Receiver<String>,
        metrics: &Rc<Metrics>,
    ) -> String {
        let name = &self.settings.name;
        if !self.downlinks.is_empty() {
            let subscribed = self.subscribe(&up);
            tokio::select! {
                result = subscribed => if let Err(error) = result {
                    return format!("subscribing failed: {error}");
                },
                reason = &mut closed => return reason.unwrap_or_default(),
                () = self.cancel.cancelled() => return "stopping".into(),
            }
        }
        // Never more than the connection can send at once: a publish that had to wait for
        // credit could overtake an earlier one and break the order.
        let window = usize::from(self.settings.inflight.max(1)).min(up.credit().max(1));
        let (done_tx, mut done_rx) = mpsc::channel::<(u64, Duration, Result<(), Failure>)>(window);
        // What was sent, in order, and whether it was acknowledged.
        let mut sent: VecDeque<(u64, bool)> = VecDeque::with_capacity(window);
        let mut committed = self.outbox.committed();
        // Made once: a new one per turn of the loop below registers with the token when
        // polled and unregisters when dropped, a lock each, on every burst of PUBACKs.
        let cancelled = self.cancel.cancelled();
        tokio::pin!(cancelled);
        let mut in_flight = 0usize;
        // QoS 1 publishes go out unawaited, one after another, and their PUBACKs come back
        // in the same order through the callback, which pairs each with the oldest of these.
        let unacked: Rc<RefCell<VecDeque<(u64, Instant)>>> =
            Rc::new(RefCell::new(VecDeque::with_capacity(window)));
        {
            let (unacked, done) = (unacked.clone(), done_tx.clone());
            up.on_pubacks(move |result| {
                if let Some((seq, started)) = unacked.borrow_mut().pop_front() {
                    // Never full: the channel holds the whole window.
                    let _ = done.try_send((seq, started.elapsed(), result));
                }
            });
        }
        // Publishes awaited by a task of their own (QoS 0 and 2) and not yet done. While
        // there are any, QoS 1 takes that path too, so nothing overtakes them.
        let spawned = Rc::new(Cell::new(0usize));
        // Everything in the outbox is unacknowledged: start from its oldest entry.
        let mut after = 0u64;
        // Committed entries read ahead of the window, so the outbox's thread serves one read
        // per READ_AHEAD messages rather than one per freed slot. The next read starts
        // when half of them are left, so sending never waits for it.
        let mut ahead: VecDeque<OutboxEntry> = VecDeque::with_capacity(READ_AHEAD);
        type Read<'a> = Pin<Box<dyn Future<Output = Result<Vec<OutboxEntry>, StoreError>> + 'a>>;
        let mut reading: Option<Read<'_>> = None;
        // The last read found everything committed: read again once more is committed.
        let mut caught_up = false;
        loop {
            while in_flight < window {
                let Some(entry) = ahead.pop_front() else {
                    break;
                };
                // When the connection cannot take it now (write backpressure), the publish
                // waits in a task, in order, and the ones after it follow it there.
                let unawaited = spawned.get() == 0 && up.unawaited(entry.qos) && up.is_ready();
                in_flight += 1;
                let seq = entry.seq;
                sent.push_back((seq, false));
                if unawaited {
                    match up.publish_unawaited(entry) {
                        Ok(()) => unacked.borrow_mut().push_back((seq, Instant::now())),
                        Err(Failure::Disconnected(error)) => {
                            return format!("sending failed: {error}");
                        }
                        Err(rejected) => {
                            let _ = done_tx.try_send((seq, Duration::ZERO, Err(rejected)));
                        }
                    }
                    continue;
                }
                spawned.set(spawned.get() + 1);
                let up = up.clone();
                let done = done_tx.clone();
                let spawned = spawned.clone();
                ntex::rt::spawn(async move {
                    let started = Instant::now();
                    let result = up.publish(entry).await;
                    spawned.set(spawned.get() - 1);
                    let _ = done.send((seq, started.elapsed(), result)).await;
                });
            }
            if reading.is_none() && !caught_up && ahead.len() < READ_AHEAD / 2 {
                committed.borrow_and_update();
                reading = Some(Box::pin(self.outbox.fetch(after, READ_AHEAD)));
            }
            tokio::select! {
                result = async {
                    match reading.as_mut() {
                        Some(read) => read.await,
                        None => std::future::pending().await,
                    }
                } => {
                    reading = None;
                    match result {
                        Ok(batch) => {
                            caught_up = batch.len() < READ_AHEAD;
                            if let Some(last) = batch.last() {
                                after = last.seq;
                            }
                            ahead.extend(batch);
                        }
                        Err(error) => return format!("reading the outbox failed: {error}"),
                    }
                }
                Some(first) = done_rx.recv() => {
                    // Every completion already waiting is taken in one go, so the
                    // acknowledged prefix is recorded once per burst, not once per message.
                    let mut next = Some(first);
                    while let Some((seq, rtt, result)) = next.take() {
                        if !matches!(result, Err(Failure::Disconnected(_))) {
                            // Acknowledged (or refused for good): its slot frees once the
                            // acknowledged prefix of what was sent is recorded. A crash
                            // before that re-sends at most the window.
                            if let Some(slot) = sent.iter_mut().find(|(s, _)| *s == seq) {
                                slot.1 = true;
                            }
                        }
                        match result {
                            Ok(()) => {
                                metrics.forwarded.increment(1);
                                metrics.rtt.record(rtt.as_secs_f64());
                            }
                            Err(Failure::Rejected(reason, detail)) => {
                                metrics.too_large.increment(u64::from(reason == "too_large"));
                                if reason != "too_large" {
                                    metrics::counter!(names::UPLINK_DROPPED, "uplink" => name.clone(), "reason" => "refused").increment(1);
                                }
                                tracing::warn!(uplink = %name, seq, %detail, "The cloud broker cannot take this message; dropped.");
                            }
                            Err(Failure::Disconnected(error)) => {
                                return format!("sending failed: {error}");
                            }
                        }
                        next = done_rx.try_recv().ok();
                    }
                    let mut through = None;
                    let mut n = 0;
                    while let Some(&(s, true)) = sent.front() {
                        sent.pop_front();
                        through = Some(s);
                        n += 1;
                    }
                    if let Some(through) = through {
                        // This thread is the uplink's own: the marker write (a few
                        // microseconds) stalls nothing else.
                        if let Err(error) = self.outbox.ack_through(through) {
                            return format!("recording acknowledgements in the outbox failed: {error}");
                        }
                        in_flight -= n;
                    }
                }
                changed = committed.changed(), if caught_up && reading.is_none() => {
                    if changed.is_err() {
                        return "the outbox closed".into();
                    }
                    caught_up = false;
                }
                reason = &mut closed => return reason.unwrap_or_else(|_| "connection closed".into()),
                () = &mut cancelled => return "stopping".into(),
            }
        }
    }

    async fn subscribe(&self, up: &Up) -> Result<(), String> {
        let name = &self.settings.name;
        match up {
            Up::V5 { sink, .. } => {
                let mut builder = sink.subscribe(None);
                for rule in &self.downlinks {
                    builder = builder.topic_filter(
                        ByteString::from(rule.remote.as_str()),
                        v5::codec::SubscriptionOptions {
                            qos: v5_qos(rule.qos),
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: v5::codec::RetainHandling::AtSubscribe,
                        },
                    );
                }
                let ack = builder.send().await.map_err(|e| e.to_string())?;
                for (rule, status) in self.downlinks.iter().zip(&ack.status) {
                    if (*status as u8) >= 0x80 {
                        tracing::error!(uplink = %name, filter = %rule.remote, status = ?status, "The cloud broker refused a downlink subscription.");
                    }
                }
            }
            Up::V3 { sink, .. } => {
                let mut builder = sink.subscribe();
                for rule in &self.downlinks {
                    builder = builder
                        .topic_filter(ByteString::from(rule.remote.as_str()), v3_qos(rule.qos));
                }
                let codes = builder.send().await.map_err(|e| e.to_string())?;
                for (rule, code) in self.downlinks.iter().zip(&codes) {
                    if matches!(code, v3::codec::SubscribeReturnCode::Failure) {
                        tracing::error!(uplink = %name, filter = %rule.remote, "The cloud broker refused a downlink subscription.");
                    }
                }
            }
        }
        tracing::debug!(uplink = %name, count = self.downlinks.len(), "Downlink subscriptions restored.");
        Ok(())
    }
}

/// A connection error in words: the I/O cause (e.g. rustls' "invalid peer certificate:
/// UnknownIssuer", "connection refused") rather than ntex's generic "Tcp connect".
fn describe<T: std::fmt::Debug>(error: &ntex_mqtt::error::MqttClientError<T>) -> String {
    use ntex::connect::ConnectError;
    use ntex_mqtt::error::MqttClientError as E;
    match error {
        E::Connect(ConnectError::Io(io)) => {
            let text = io.to_string();
            if text.contains("certificate") {
                format!("TLS: {text} (check tls.ca, tls.server_name, and the broker's certificate)")
            } else {
                format!("cannot connect: {text}")
            }
        }
        E::Connect(other) => format!("cannot connect: {other}"),
        E::Ack(ack) => format!("the broker refused the connection: {ack:?}"),
        E::Disconnected(Some(io)) => format!("the broker closed the connection: {io}"),
        E::Disconnected(None) => "the broker closed the connection during the handshake (wrong credentials or client certificate?)".into(),
        other => other.to_string(),
    }
}

fn v5_qos(qos: u8) -> v5::codec::QoS {
    match qos {
        0 => v5::codec::QoS::AtMostOnce,
        1 => v5::codec::QoS::AtLeastOnce,
        _ => v5::codec::QoS::ExactlyOnce,
    }
}

fn v3_qos(qos: u8) -> v3::codec::QoS {
    match qos {
        0 => v3::codec::QoS::AtMostOnce,
        1 => v3::codec::QoS::AtLeastOnce,
        _ => v3::codec::QoS::ExactlyOnce,
    }
}

async fn on_v5(
    downlink: &Downlink,
    message: v5::client::ProtocolMessage,
) -> v5::client::ProtocolMessageAck {
    use v5::client::ProtocolMessage as M;
    match message {
        M::Publish(publish) => {
            let packet = publish.packet();
            let (topic, qos, retain) = (packet.topic.clone(), packet.qos as u8, packet.retain);
            let payload = match publish.read_all().await {
                Ok(payload) => payload,
                Err(error) => {
                    tracing::warn!(uplink = %downlink.uplink, %error, "Downlink payload unreadable.");
                    return publish.ack(v5::codec::PublishAckReason::UnspecifiedError);
                }
            };
            match downlink.deliver(&topic, payload, qos, retain).await {
                Ok(()) if qos == 0 => publish.ack_qos0(),
                Ok(()) => publish.ack(v5::codec::PublishAckReason::Success),
                Err(()) => publish.ack(v5::codec::PublishAckReason::UnspecifiedError),
            }
        }
        other => other.ack(),
    }
}

async fn on_v3(
    downlink: &Downlink,
    message: v3::client::ProtocolMessage,
) -> v3::client::ProtocolMessageAck {
    use v3::client::ProtocolMessage as M;
    match message {
        M::Publish(publish) => {
            let packet = publish.packet();
            let (topic, qos, retain) = (packet.topic.clone(), packet.qos as u8, packet.retain);
            let payload = publish.read_all().await.unwrap_or_default();
            // MQTT 3.1.1 has no negative acknowledgement: a message that cannot be stored
            // is still acknowledged (and logged by `deliver`).
            let _ = downlink.deliver(&topic, payload, qos, retain).await;
            publish.ack()
        }
        other => other.ack(),
    }
}

/// For the benchmark: connects the way an uplink does and publishes `count` messages held
/// in memory with the uplink's in-flight window, the baseline the outbox drain is compared
/// with. Returns the time the connection took and the time from the first publish to the
/// last acknowledgement.
pub(crate) fn publish_direct(
    task: Task,
    topic: &str,
    payload: &[u8],
    qos: u8,
    count: usize,
) -> Result<(Duration, Duration), String> {
    let topic = topic.to_string();
    let payload = payload.to_vec();
    let (outcome_tx, outcome_rx) = std::sync::mpsc::channel();
    let driver = task.settings.io_driver;
    let result = ntex::rt::System::new("edgegw-uplink-direct", driver).block_on(async move {
        let outcome = async {
            let metrics = Rc::new(Metrics::new(&task.settings.name));
            let task = Rc::new(task);
            let connecting = Instant::now();
            let (up, _closed) = task.connect(&metrics).await?;
            let connected = connecting.elapsed();
            let window = usize::from(task.settings.inflight.max(1)).min(up.credit().max(1));
            let (done_tx, mut done_rx) = mpsc::channel::<Result<(), String>>(window);
            let message = |f: Failure| match f {
                Failure::Disconnected(e) | Failure::Rejected(_, e) => e,
            };
            {
                let done = done_tx.clone();
                up.on_pubacks(move |result| {
                    let _ = done.try_send(result.map_err(message));
                });
            }
            // The same paths as the forwarder: QoS 1 unawaited while the connection
            // can take it and no task is pending, QoS 0 and 2 (and the rest) a task each.
            let spawned = Rc::new(Cell::new(0usize));
            let started = Instant::now();
            let (mut sent, mut acked) = (0usize, 0usize);
            while acked < count {
                while sent < count && sent - acked < window {
                    let unawaited = spawned.get() == 0 && up.unawaited(qos) && up.is_ready();
                    let entry = OutboxEntry {
                        seq: sent as u64 + 1,
                        topic: topic.clone(),
                        payload: payload.clone(),
                        qos,
                        retain: false,
                        properties: Vec::new(),
                        enqueued_ms: 0,
                    };
                    sent += 1;
                    if unawaited {
                        up.publish_unawaited(entry).map_err(message)?;
                        continue;
                    }
                    spawned.set(spawned.get() + 1);
                    let (up, done, spawned) = (up.clone(), done_tx.clone(), spawned.clone());
                    ntex::rt::spawn(async move {
                        let result = up.publish(entry).await.map_err(message);
                        spawned.set(spawned.get() - 1);
                        let _ = done.send(result).await;
                    });
                }
                match done_rx.recv().await {
                    Some(Ok(())) => acked += 1,
                    Some(Err(error)) => return Err(error),
                    None => return Err("publisher tasks ended".into()),
                }
            }
            let elapsed = started.elapsed();
            up.close();
            Ok((connected, elapsed))
        }
        .await;
        let _ = outcome_tx.send(outcome);
        Ok::<(), std::io::Error>(())
    });
    result.map_err(|e| e.to_string())?;
    outcome_rx
        .recv()
        .unwrap_or_else(|_| Err("did not run".into()))
}
