//! Simulated MQTT-SN 1.2 sensor nodes (COBS + CRC frames, `edgegw-protocol`) on any byte
//! stream: a serial port or PTY for the `node-sim` program, a PTY inside the gateway for its
//! built-in demo (`nodes.simulated`).
//!
//! Each node connects (CONNECT, client id `NAME` or `NAME-1`..`NAME-N`), registers
//! `sensors/<node>/temp`, subscribes to `control/<node>/led` (at QoS 2 when its readings are
//! QoS 2, else at QoS 1), then publishes a JSON reading every interval and reports every
//! message it receives as `<node> <last topic level> <payload>` (so `NAME led on`); a QoS 2
//! message sent again before its PUBREL is reported once. A QoS 1 or 2 reading stays in flight
//! until the gateway acknowledges it (PUBACK, or PUBREC then PUBCOMP) and is sent again (DUP,
//! or PUBREL after PUBREC) while unanswered; the next reading waits for it. Sleeping nodes
//! ([`simulate_sleeping`], spec §6.14) publish one reading per wake-up instead: reading (and
//! its acknowledgement), DISCONNECT with a duration, silence, then a PINGREQ with the client
//! id that has the gateway send what waited, up to its PINGRESP, and again. With more than one
//! node the sim acts as a forwarder: each node's messages travel in the forwarder
//! encapsulation with the node's name as its wireless node id. Requests that go unanswered
//! are repeated; a DISCONNECT from the gateway or a keepalive without any answer starts the
//! node over.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use edgegw_protocol::{
    Connect, FrameDecoder, Message, Publish, QoS, Register, ReturnCode, Subscribe, Topic, TopicId,
    encode_encapsulated, encode_frame_to_vec, encode_to_vec,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a CONNECT, REGISTER, SUBSCRIBE, QoS 1 or 2 reading, going-to-sleep DISCONNECT or
/// wake-up PINGREQ may go unanswered before it is sent again.
const RETRY: Duration = Duration::from_secs(2);
/// Longest frame accepted from the gateway (message + CRC).
const MAX_FRAME: usize = 1024;

/// What the simulated nodes do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Node name: client id and topic level.
    pub id: String,
    /// Number of nodes; with more than one they are NAME-1..NAME-N behind a forwarder.
    pub nodes: u16,
    /// Time between two readings (not used by sleeping nodes: one reading per wake-up).
    pub interval: Duration,
    /// QoS of the readings: 0, 1 or 2.
    pub qos: u8,
    /// Keepalive announced in CONNECT; a PINGREQ is sent when nothing else was sent for
    /// half of it.
    pub keepalive: Duration,
}

/// What the simulation reports as it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// A message for a node: `<node> <last topic level> <payload>`.
    Received(String),
    /// Something went wrong but the nodes go on (a refused request, a bad frame …).
    Warning(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot open serial port {path} at {baud} baud: {source}")]
    Open {
        path: String,
        baud: u32,
        source: tokio_serial::Error,
    },
    #[error("serial port {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("serial port {path} closed by the other end")]
    Closed { path: String },
    #[error("cannot encode {message_type} for node {node}: {source}")]
    Encode {
        node: String,
        message_type: &'static str,
        source: edgegw_protocol::EncodeError,
    },
    #[error("keepalive {keepalive:?} does not fit MQTT-SN's 16-bit seconds")]
    Keepalive { keepalive: Duration },
    #[error(
        "sleep {sleep:?} does not fit MQTT-SN's 16-bit seconds (DISCONNECT announces 1.5 times it)"
    )]
    Sleep { sleep: Duration },
}

/// `200ms`, `1s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 200ms, 1s or 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use ms, s, m or h"
            ));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("`{text}`: a duration must be greater than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The QoS of the readings for `Options::qos` (anything but 1 or 2 is QoS 0).
fn reading_qos(qos: u8) -> QoS {
    match qos {
        1 => QoS::One,
        2 => QoS::Two,
        _ => QoS::Zero,
    }
}

/// The duration (seconds) the DISCONNECT of a node that sleeps for `sleep` announces: 1.5
/// times it, rounded up, at least 1 (the gateway gives up on a node silent for 1.5 announced
/// durations). `None` when that does not fit MQTT-SN's 16 bits.
fn announced_sleep(sleep: Duration) -> Option<u16> {
    let millis = sleep.as_millis().saturating_mul(3) / 2;
    u16::try_from(millis.div_ceil(1000).max(1)).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Registering,
    Subscribing,
    Running,
    /// A sleeping node sent DISCONNECT with a duration and waits for the gateway's DISCONNECT.
    FallingAsleep,
    /// A sleeping node, silent until `until`.
    Asleep {
        until: Instant,
    },
    /// A sleeping node woke with PINGREQ (its client id): it takes what waited for it until
    /// PINGRESP.
    Waking,
}

/// How the nodes sleep between two readings (sleeping nodes only).
#[derive(Clone, Copy, Debug)]
struct Sleep {
    /// How long a node stays silent each time.
    period: Duration,
    /// The duration (seconds) its DISCONNECT announces.
    announced: u16,
}

/// A QoS 1 or 2 reading sent and not acknowledged yet.
#[derive(Debug)]
struct InFlight {
    message_id: u16,
    qos: QoS,
    data: String,
    /// PUBREC came (QoS 2): PUBREL is what is sent again.
    released: bool,
    /// When it (or its PUBREL) was last sent.
    at: Instant,
}

struct Node {
    name: String,
    /// The forwarder encapsulation's wireless node id; `None` for a lone node.
    wireless_id: Option<Vec<u8>>,
    state: State,
    /// When the request for the current state was last sent.
    requested: Option<Instant>,
    sensor_topic: String,
    control_topic: String,
    sensor_topic_id: u16,
    /// Topic ids the gateway registered (or granted in SUBACK) → names.
    topics: HashMap<u16, String>,
    next_message_id: u16,
    next_reading: Instant,
    readings: u32,
    /// The QoS 1 or 2 reading waiting for its acknowledgement.
    inflight: Option<InFlight>,
    /// Message ids of QoS 2 messages received and reported, until their PUBREL.
    unreleased: HashSet<u16>,
    /// A sleeping node sent this wake-up's reading.
    woke_reading_sent: bool,
    last_sent: Instant,
    last_received: Instant,
}

impl Node {
    fn new(name: String, wireless_id: Option<Vec<u8>>) -> Self {
        let now = Instant::now();
        Self {
            sensor_topic: format!("sensors/{name}/temp"),
            control_topic: format!("control/{name}/led"),
            name,
            wireless_id,
            state: State::Connecting,
            requested: None,
            sensor_topic_id: 0,
            topics: HashMap::new(),
            next_message_id: 1,
            next_reading: now,
            readings: 0,
            inflight: None,
            unreleased: HashSet::new(),
            woke_reading_sent: false,
            last_sent: now,
            last_received: now,
        }
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Starts over with CONNECT (a new session: what was in flight is dropped).
    fn restart(&mut self) {
        self.state = State::Connecting;
        self.requested = None;
        self.topics.clear();
        self.inflight = None;
        self.unreleased.clear();
        self.woke_reading_sent = false;
    }

    /// A varying reading: a slow saw-tooth between 20.0 and 24.9.
    fn reading(&mut self) -> String {
        let tenths = 200 + (self.readings * 7) % 50;
        self.readings = self.readings.wrapping_add(1);
        format!("{{\"temp\": {}.{}}}", tenths / 10, tenths % 10)
    }
}

struct Sim<'a> {
    options: Options,
    /// `Some` for sleeping nodes.
    sleep: Option<Sleep>,
    nodes: Vec<Node>,
    out: Vec<u8>,
    report: &'a mut (dyn FnMut(SimEvent) + Send),
}

impl<'a> Sim<'a> {
    fn new(
        options: Options,
        sleep: Option<Duration>,
        report: &'a mut (dyn FnMut(SimEvent) + Send),
    ) -> Result<Self, SimError> {
        let sleep = sleep
            .map(|period| {
                announced_sleep(period)
                    .map(|announced| Sleep { period, announced })
                    .ok_or(SimError::Sleep { sleep: period })
            })
            .transpose()?;
        let nodes = if options.nodes <= 1 {
            vec![Node::new(options.id.clone(), None)]
        } else {
            (1..=options.nodes)
                .map(|i| {
                    let name = format!("{}-{i}", options.id);
                    let wireless_id = name.clone().into_bytes();
                    Node::new(name, Some(wireless_id))
                })
                .collect()
        };
        Ok(Self {
            options,
            sleep,
            nodes,
            // A lone delimiter first ends whatever half frame the gateway still holds.
            out: vec![edgegw_protocol::DELIMITER],
            report,
        })
    }
}

impl Sim<'_> {
    /// Encodes `message` for node `index` (encapsulated when behind the forwarder) and queues
    /// its frame in `out`.
    fn send(&mut self, index: usize, message: &Message<'_>) -> Result<(), SimError> {
        let Some(node) = self.nodes.get_mut(index) else {
            return Ok(());
        };
        let encode_error = |source| SimError::Encode {
            node: node.name.clone(),
            message_type: message.message_type().name(),
            source,
        };
        let bytes = match &node.wireless_id {
            None => encode_to_vec(message).map_err(encode_error)?,
            Some(id) => {
                let mut buffer = vec![0; MAX_FRAME];
                let n = encode_encapsulated(0, id, message, &mut buffer).map_err(encode_error)?;
                buffer.truncate(n);
                buffer
            }
        };
        self.out.extend_from_slice(&encode_frame_to_vec(&bytes));
        node.last_sent = Instant::now();
        Ok(())
    }

    /// Sends what each node's state calls for now: a (repeated) request, a reading, a
    /// PINGREQ. Returns the earliest time something may be due next.
    fn poll(&mut self, now: Instant) -> Result<Instant, SimError> {
        let keepalive = self.options.keepalive;
        let duration =
            u16::try_from(keepalive.as_secs()).map_err(|_| SimError::Keepalive { keepalive })?;
        let mut next = now + RETRY;
        for index in 0..self.nodes.len() {
            let node = &mut self.nodes[index];
            if !matches!(node.state, State::Connecting | State::Asleep { .. })
                && now.duration_since(node.last_received) > keepalive * 2
            {
                (self.report)(SimEvent::Warning(format!(
                    "{}: gateway silent, reconnecting",
                    node.name
                )));
                node.restart();
            }
            match node.state {
                State::Running => next = next.min(self.run(index, now)?),
                State::Asleep { until } if now < until => next = next.min(until),
                State::Asleep { .. } => {
                    // Awake: the gateway sends what waited, then PINGRESP. Its silence counts
                    // from now.
                    node.state = State::Waking;
                    node.requested = Some(now);
                    node.last_received = now;
                    self.request(index, duration)?;
                }
                _ => {
                    if let Some(at) = node.requested
                        && now.duration_since(at) < RETRY
                    {
                        next = next.min(at + RETRY);
                        continue;
                    }
                    node.requested = Some(now);
                    self.request(index, duration)?;
                }
            }
        }
        Ok(next)
    }

    /// Sends the request of node `index`'s state (again). `keepalive` goes into CONNECT.
    fn request(&mut self, index: usize, keepalive: u16) -> Result<(), SimError> {
        let node = &mut self.nodes[index];
        match node.state {
            State::Connecting => {
                let client_id = node.name.clone();
                self.send(
                    index,
                    &Message::Connect(Connect {
                        will: false,
                        clean_session: true,
                        duration: keepalive,
                        client_id: &client_id,
                    }),
                )
            }
            State::Registering => {
                let message_id = node.message_id();
                let topic_name = node.sensor_topic.clone();
                self.send(
                    index,
                    &Message::Register(Register {
                        topic_id: 0,
                        message_id,
                        topic_name: &topic_name,
                    }),
                )
            }
            State::Subscribing => {
                let message_id = node.message_id();
                let topic = node.control_topic.clone();
                // QoS 2 deliveries need a QoS 2 subscription.
                let qos = match reading_qos(self.options.qos) {
                    QoS::Two => QoS::Two,
                    _ => QoS::One,
                };
                self.send(
                    index,
                    &Message::Subscribe(Subscribe {
                        dup: false,
                        qos,
                        message_id,
                        topic: Topic::Name(&topic),
                    }),
                )
            }
            State::FallingAsleep => {
                let duration = self.sleep.map(|s| s.announced);
                self.send(index, &Message::Disconnect { duration })
            }
            State::Waking => {
                let client_id = node.name.clone();
                self.send(
                    index,
                    &Message::PingReq {
                        client_id: Some(&client_id),
                    },
                )
            }
            State::Running | State::Asleep { .. } => Ok(()),
        }
    }

    /// A running node: the reading in flight sent again, a new reading (every interval, or
    /// once per wake-up for a sleeping node, which then goes back to sleep), a keepalive
    /// PINGREQ. Returns when it may be due next.
    fn run(&mut self, index: usize, now: Instant) -> Result<Instant, SimError> {
        let keepalive = self.options.keepalive;
        let node = &mut self.nodes[index];
        if let Some(at) = node.inflight.as_ref().map(|sent| sent.at) {
            if now.duration_since(at) >= RETRY {
                self.resend(index, now)?;
            }
        } else if let Some(sleep) = self.sleep {
            if !node.woke_reading_sent {
                node.woke_reading_sent = true;
                self.publish_reading(index, now)?;
            }
            let node = &mut self.nodes[index];
            if node.inflight.is_none() {
                // Nothing left to wait for: back to sleep.
                node.state = State::FallingAsleep;
                node.requested = Some(now);
                self.send(
                    index,
                    &Message::Disconnect {
                        duration: Some(sleep.announced),
                    },
                )?;
                return Ok(now + RETRY);
            }
        } else if now >= node.next_reading {
            node.next_reading = now + self.options.interval;
            self.publish_reading(index, now)?;
        }
        if now.duration_since(self.nodes[index].last_sent) >= keepalive / 2 {
            self.send(index, &Message::PingReq { client_id: None })?;
        }
        let node = &self.nodes[index];
        let next = node.last_sent + keepalive / 2;
        Ok(match &node.inflight {
            Some(sent) => next.min(sent.at + RETRY),
            None => next.min(node.next_reading),
        })
    }

    /// Publishes node `index`'s next reading; at QoS 1 or 2 it stays in flight.
    fn publish_reading(&mut self, index: usize, now: Instant) -> Result<(), SimError> {
        let qos = reading_qos(self.options.qos);
        let node = &mut self.nodes[index];
        let data = node.reading();
        let message_id = if qos == QoS::Zero {
            0
        } else {
            let message_id = node.message_id();
            node.inflight = Some(InFlight {
                message_id,
                qos,
                data: data.clone(),
                released: false,
                at: now,
            });
            message_id
        };
        self.send_reading(index, qos, message_id, false, &data)
    }

    /// Sends node `index`'s unacknowledged reading again: the PUBLISH with DUP, or PUBREL
    /// after PUBREC.
    fn resend(&mut self, index: usize, now: Instant) -> Result<(), SimError> {
        let Some(sent) = self.nodes[index].inflight.as_mut() else {
            return Ok(());
        };
        sent.at = now;
        let (message_id, qos, data) = (sent.message_id, sent.qos, sent.data.clone());
        if sent.released {
            self.send(index, &Message::PubRel { message_id })
        } else {
            self.send_reading(index, qos, message_id, true, &data)
        }
    }

    fn send_reading(
        &mut self,
        index: usize,
        qos: QoS,
        message_id: u16,
        dup: bool,
        data: &str,
    ) -> Result<(), SimError> {
        let topic = TopicId::Normal(self.nodes[index].sensor_topic_id);
        self.send(
            index,
            &Message::Publish(Publish {
                dup,
                qos,
                retain: false,
                topic,
                message_id,
                data: data.as_bytes(),
            }),
        )
    }

    /// One message from the gateway, already unwrapped from its frame, arrived at `now`.
    fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), SimError> {
        let message = match edgegw_protocol::decode_exact(bytes) {
            Ok(message) => message,
            Err(error) => {
                (self.report)(SimEvent::Warning(format!(
                    "undecodable message from the gateway: {error}"
                )));
                return Ok(());
            }
        };
        let (index, message) =
            match message {
                Message::Encapsulated(encapsulated) => {
                    let Some(index) = self.nodes.iter().position(|n| {
                        n.wireless_id.as_deref() == Some(encapsulated.wireless_node_id)
                    }) else {
                        return Ok(());
                    };
                    match encapsulated.decode_message() {
                        Ok(inner) => (index, inner),
                        Err(_) => return Ok(()),
                    }
                }
                // A lone node gets plain messages; behind a forwarder they would be ambiguous.
                other if self.nodes.len() == 1 => (0, other),
                _ => return Ok(()),
            };
        let node = &mut self.nodes[index];
        node.last_received = now;
        if node.state == State::Waking {
            // The gateway is still sending what waited: PINGREQ again only after RETRY of
            // silence.
            node.requested = Some(now);
        }
        match message {
            Message::ConnAck { return_code } if node.state == State::Connecting => {
                if return_code == ReturnCode::Accepted {
                    node.state = State::Registering;
                    node.requested = None;
                } else {
                    (self.report)(SimEvent::Warning(format!(
                        "{}: CONNECT refused: {return_code:?}",
                        node.name
                    )));
                }
            }
            Message::RegAck {
                topic_id,
                return_code,
                ..
            } if node.state == State::Registering => {
                if return_code == ReturnCode::Accepted {
                    node.sensor_topic_id = topic_id;
                    node.topics.insert(topic_id, node.sensor_topic.clone());
                    node.state = State::Subscribing;
                    node.requested = None;
                } else {
                    (self.report)(SimEvent::Warning(format!(
                        "{}: REGISTER refused: {return_code:?}",
                        node.name
                    )));
                }
            }
            Message::SubAck {
                topic_id,
                return_code,
                ..
            } if node.state == State::Subscribing => {
                if return_code == ReturnCode::Accepted {
                    if topic_id != 0 {
                        node.topics.insert(topic_id, node.control_topic.clone());
                    }
                    node.state = State::Running;
                    node.requested = None;
                } else {
                    (self.report)(SimEvent::Warning(format!(
                        "{}: SUBSCRIBE refused: {return_code:?}",
                        node.name
                    )));
                }
            }
            Message::Register(register) => {
                node.topics
                    .insert(register.topic_id, register.topic_name.to_owned());
                self.send(
                    index,
                    &Message::RegAck {
                        topic_id: register.topic_id,
                        message_id: register.message_id,
                        return_code: ReturnCode::Accepted,
                    },
                )?;
            }
            Message::Publish(publish) => {
                let topic = match publish.topic {
                    TopicId::Normal(id) | TopicId::Predefined(id) => node
                        .topics
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{id}")),
                    TopicId::Short(name) => String::from_utf8_lossy(&name).into_owned(),
                };
                let leaf = topic.rsplit('/').next().unwrap_or_default();
                let line = format!(
                    "{} {leaf} {}\n",
                    node.name,
                    String::from_utf8_lossy(publish.data)
                );
                // A QoS 2 message is the same one until its PUBREL: a re-send (the gateway
                // missed the PUBREC) is acknowledged again but not reported again.
                let fresh = publish.qos != QoS::Two || node.unreleased.insert(publish.message_id);
                let reply = match publish.qos {
                    QoS::One => Some(Message::PubAck {
                        topic_id: u16::from_be_bytes(publish.topic.to_bytes()),
                        message_id: publish.message_id,
                        return_code: ReturnCode::Accepted,
                    }),
                    QoS::Two => Some(Message::PubRec {
                        message_id: publish.message_id,
                    }),
                    _ => None,
                };
                if let Some(reply) = reply {
                    self.send(index, &reply)?;
                }
                if fresh {
                    (self.report)(SimEvent::Received(line.trim_end().to_string()));
                }
            }
            Message::PubRel { message_id } => {
                node.unreleased.remove(&message_id);
                self.send(index, &Message::PubComp { message_id })?;
            }
            Message::PubAck {
                message_id,
                return_code,
                ..
            } => {
                if let Some(sent) = node.inflight.as_mut()
                    && sent.message_id == message_id
                {
                    match return_code {
                        ReturnCode::Accepted if sent.qos == QoS::One => node.inflight = None,
                        // Not how a QoS 2 PUBLISH is answered: it goes on.
                        ReturnCode::Accepted => {}
                        // Busy: sent again after RETRY.
                        ReturnCode::Congestion => sent.at = now,
                        refused => {
                            (self.report)(SimEvent::Warning(format!(
                                "{}: reading refused: {refused:?}",
                                node.name
                            )));
                            node.inflight = None;
                        }
                    }
                }
            }
            Message::PubRec { message_id } => {
                if let Some(sent) = node.inflight.as_mut()
                    && sent.message_id == message_id
                    && sent.qos == QoS::Two
                {
                    sent.released = true;
                    sent.at = now;
                }
                // Also for one already complete (a PUBCOMP got lost): the gateway answers.
                self.send(index, &Message::PubRel { message_id })?;
            }
            Message::PubComp { message_id } => {
                if node
                    .inflight
                    .as_ref()
                    .is_some_and(|s| s.message_id == message_id && s.qos == QoS::Two)
                {
                    node.inflight = None;
                }
            }
            Message::PingResp if node.state == State::Waking => {
                // All that waited has come: the next reading, then back to sleep.
                node.state = State::Running;
                node.requested = None;
                node.woke_reading_sent = false;
            }
            Message::Disconnect { .. } if node.state == State::FallingAsleep => {
                let period = self.sleep.map_or(Duration::ZERO, |s| s.period);
                node.state = State::Asleep {
                    until: now + period,
                };
                node.requested = None;
            }
            // The answer to a DISCONNECT sent again.
            Message::Disconnect { .. } if matches!(node.state, State::Asleep { .. }) => {}
            Message::Disconnect { .. } => {
                (self.report)(SimEvent::Warning(format!(
                    "{}: disconnected by the gateway",
                    node.name
                )));
                node.restart();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs the nodes on `port` until it fails or closes (`path` names it in errors); every
/// control message and warning goes to `report`.
pub async fn simulate<P>(
    port: P,
    path: &str,
    options: Options,
    report: &mut (dyn FnMut(SimEvent) + Send),
) -> Result<(), SimError>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    run(port, path, Sim::new(options, None, report)?).await
}

/// Like [`simulate`], with sleeping nodes (spec §6.14): once connected, registered and
/// subscribed, each node publishes one reading (waiting for its acknowledgement at QoS 1 or
/// 2), sends DISCONNECT announcing 1.5 times `sleep` (whole seconds, rounded up), and on the
/// gateway's DISCONNECT stays silent for `sleep`; then it wakes with a PINGREQ carrying its
/// client id, takes what the gateway kept for it (REGISTERs, PUBLISHes) until PINGRESP, and
/// starts the next round with its next reading. `Options::interval` is not used.
pub async fn simulate_sleeping<P>(
    port: P,
    path: &str,
    options: Options,
    sleep: Duration,
    report: &mut (dyn FnMut(SimEvent) + Send),
) -> Result<(), SimError>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    run(port, path, Sim::new(options, Some(sleep), report)?).await
}

async fn run<P>(mut port: P, path: &str, mut sim: Sim<'_>) -> Result<(), SimError>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.to_string();
    let io_error = |source| SimError::Io {
        path: path.clone(),
        source,
    };
    let mut decoder = FrameDecoder::<MAX_FRAME>::new();
    let mut chunk = [0u8; 512];
    loop {
        let next = sim.poll(Instant::now())?;
        if !sim.out.is_empty() {
            port.write_all(&sim.out).await.map_err(io_error)?;
            sim.out.clear();
        }
        let sleep = tokio::time::sleep_until(next.into());
        tokio::select! {
            read = port.read(&mut chunk) => {
                let n = read.map_err(io_error)?;
                if n == 0 {
                    return Err(SimError::Closed { path: path.clone() });
                }
                let mut frames = decoder.feed(&chunk[..n]);
                while let Some(frame) = frames.next_frame() {
                    match frame {
                        Ok(bytes) => {
                            let bytes = bytes.to_vec();
                            sim.receive(&bytes, Instant::now())?;
                        }
                        Err(error) => (sim.report)(SimEvent::Warning(format!(
                            "bad frame from the gateway: {error}"
                        ))),
                    }
                }
            }
            () = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1 parsec").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn readings_vary_and_are_json() {
        let mut node = Node::new("n".into(), None);
        let first = node.reading();
        let second = node.reading();
        assert_eq!(first, "{\"temp\": 20.0}");
        assert_ne!(first, second);
    }

    #[test]
    fn a_sleeping_node_announces_one_and_a_half_times_its_sleep() {
        assert_eq!(announced_sleep(Duration::from_secs(1)), Some(2));
        assert_eq!(announced_sleep(Duration::from_secs(2)), Some(3));
        assert_eq!(announced_sleep(Duration::from_millis(1500)), Some(3));
        assert_eq!(announced_sleep(Duration::from_millis(100)), Some(1));
        assert_eq!(announced_sleep(Duration::from_secs(43_690)), Some(65_535));
        assert_eq!(announced_sleep(Duration::from_secs(43_691)), None);
        let mut report = |_| {};
        assert!(matches!(
            Sim::new(options(0), Some(Duration::from_secs(100_000)), &mut report),
            Err(SimError::Sleep { .. })
        ));
    }

    fn options(qos: u8) -> Options {
        Options {
            id: "n".into(),
            nodes: 1,
            interval: Duration::from_secs(1),
            qos,
            keepalive: Duration::from_secs(30),
        }
    }

    /// The frames the sim queued since the last call, unwrapped.
    fn sent(sim: &mut Sim<'_>) -> Vec<Vec<u8>> {
        let out = std::mem::take(&mut sim.out);
        let mut decoder = FrameDecoder::<MAX_FRAME>::new();
        let mut frames = decoder.feed(&out);
        let mut all = Vec::new();
        while let Some(frame) = frames.next_frame() {
            all.push(frame.expect("a good frame").to_vec());
        }
        all
    }

    fn decoded(frames: &[Vec<u8>]) -> Vec<Message<'_>> {
        frames
            .iter()
            .map(|f| edgegw_protocol::decode_exact(f).expect("decodes"))
            .collect()
    }

    fn feed(sim: &mut Sim<'_>, message: &Message<'_>, now: Instant) {
        sim.receive(&encode_to_vec(message).unwrap(), now).unwrap();
    }

    fn reading(dup: bool, qos: QoS, message_id: u16, data: &str) -> Message<'_> {
        Message::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: TopicId::Normal(SENSOR),
            message_id,
            data: data.as_bytes(),
        })
    }

    const SENSOR: u16 = 5;
    const CONTROL: u16 = 6;

    /// Connects, registers and subscribes the sim's one node; returns the SUBSCRIBE's QoS.
    fn run_node(sim: &mut Sim<'_>, now: Instant) -> QoS {
        sim.poll(now).unwrap();
        let frames = sent(sim);
        assert!(matches!(decoded(&frames)[..], [Message::Connect(_)]));
        let accepted = ReturnCode::Accepted;
        feed(
            sim,
            &Message::ConnAck {
                return_code: accepted,
            },
            now,
        );
        sim.poll(now).unwrap();
        let frames = sent(sim);
        let [Message::Register(register)] = decoded(&frames)[..] else {
            panic!("REGISTER expected");
        };
        let message_id = register.message_id;
        feed(
            sim,
            &Message::RegAck {
                topic_id: SENSOR,
                message_id,
                return_code: accepted,
            },
            now,
        );
        sim.poll(now).unwrap();
        let frames = sent(sim);
        let [Message::Subscribe(subscribe)] = decoded(&frames)[..] else {
            panic!("SUBSCRIBE expected");
        };
        feed(
            sim,
            &Message::SubAck {
                qos: subscribe.qos,
                topic_id: CONTROL,
                message_id: subscribe.message_id,
                return_code: accepted,
            },
            now,
        );
        subscribe.qos
    }

    #[test]
    fn qos_0_readings_go_every_interval() {
        let mut report = |_| {};
        let mut sim = Sim::new(options(0), None, &mut report).unwrap();
        let t0 = Instant::now();
        assert_eq!(run_node(&mut sim, t0), QoS::One);
        assert_eq!(sim.poll(t0).unwrap(), t0 + Duration::from_secs(1));
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(false, QoS::Zero, 0, "{\"temp\": 20.0}")]
        );
        sim.poll(t0 + Duration::from_millis(500)).unwrap();
        assert!(sent(&mut sim).is_empty());
        sim.poll(t0 + Duration::from_secs(1)).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(false, QoS::Zero, 0, "{\"temp\": 20.7}")]
        );
    }

    #[test]
    fn a_qos_1_reading_is_sent_again_until_its_puback_and_the_next_one_waits() {
        let mut report = |_| {};
        let mut sim = Sim::new(options(1), None, &mut report).unwrap();
        let t0 = Instant::now();
        assert_eq!(run_node(&mut sim, t0), QoS::One);
        sim.poll(t0).unwrap();
        let frames = sent(&mut sim);
        let [Message::Publish(first)] = decoded(&frames)[..] else {
            panic!("PUBLISH expected");
        };
        assert_eq!((first.qos, first.dup), (QoS::One, false));
        // The interval passed, but the reading in flight holds the next one back.
        assert_eq!(sim.poll(t0 + Duration::from_secs(1)).unwrap(), t0 + RETRY);
        assert!(sent(&mut sim).is_empty());
        sim.poll(t0 + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(
                true,
                QoS::One,
                first.message_id,
                "{\"temp\": 20.0}"
            )]
        );
        // Another message's PUBACK changes nothing.
        let puback = |message_id| Message::PubAck {
            topic_id: SENSOR,
            message_id,
            return_code: ReturnCode::Accepted,
        };
        feed(&mut sim, &puback(first.message_id + 1), t0 + RETRY);
        sim.poll(t0 + RETRY).unwrap();
        assert!(sent(&mut sim).is_empty());
        feed(&mut sim, &puback(first.message_id), t0 + RETRY);
        sim.poll(t0 + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(
                false,
                QoS::One,
                first.message_id + 1,
                "{\"temp\": 20.7}"
            )]
        );
    }

    #[test]
    fn a_qos_2_reading_is_released_and_sent_again_until_its_pubcomp() {
        let mut report = |_| {};
        let mut sim = Sim::new(options(2), None, &mut report).unwrap();
        let t0 = Instant::now();
        assert_eq!(run_node(&mut sim, t0), QoS::Two, "QoS 2 control messages");
        sim.poll(t0).unwrap();
        let frames = sent(&mut sim);
        let [Message::Publish(first)] = decoded(&frames)[..] else {
            panic!("PUBLISH expected");
        };
        let id = first.message_id;
        assert_eq!(
            Message::Publish(first),
            reading(false, QoS::Two, id, "{\"temp\": 20.0}")
        );
        sim.poll(t0 + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(true, QoS::Two, id, "{\"temp\": 20.0}")]
        );
        let t1 = t0 + RETRY + Duration::from_millis(100);
        feed(&mut sim, &Message::PubRec { message_id: id }, t1);
        let frames = sent(&mut sim);
        assert_eq!(decoded(&frames), [Message::PubRel { message_id: id }]);
        // Unanswered, PUBREL goes again (not the PUBLISH); the next reading waits.
        sim.poll(t1 + Duration::from_secs(1)).unwrap();
        assert!(sent(&mut sim).is_empty());
        sim.poll(t1 + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(decoded(&frames), [Message::PubRel { message_id: id }]);
        // A PUBACK does not complete a QoS 2 message.
        let t2 = t1 + RETRY;
        let puback = Message::PubAck {
            topic_id: SENSOR,
            message_id: id,
            return_code: ReturnCode::Accepted,
        };
        feed(&mut sim, &puback, t2);
        sim.poll(t2).unwrap();
        assert!(sent(&mut sim).is_empty());
        feed(&mut sim, &Message::PubComp { message_id: id }, t2);
        sim.poll(t2).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [reading(false, QoS::Two, id + 1, "{\"temp\": 20.7}")]
        );
    }

    #[test]
    fn a_qos_2_message_sent_again_before_its_pubrel_is_reported_once() {
        let (tx, events) = mpsc::channel();
        let mut report = move |event| tx.send(event).unwrap();
        let mut sim = Sim::new(options(2), None, &mut report).unwrap();
        let t0 = Instant::now();
        run_node(&mut sim, t0);
        sent(&mut sim);
        let led = |dup, message_id, data: &'static str| {
            Message::Publish(Publish {
                dup,
                qos: QoS::Two,
                retain: false,
                topic: TopicId::Normal(CONTROL),
                message_id,
                data: data.as_bytes(),
            })
        };
        feed(&mut sim, &led(false, 7, "on"), t0);
        feed(&mut sim, &led(true, 7, "on"), t0);
        let frames = sent(&mut sim);
        assert_eq!(
            decoded(&frames),
            [
                Message::PubRec { message_id: 7 },
                Message::PubRec { message_id: 7 }
            ]
        );
        feed(&mut sim, &Message::PubRel { message_id: 7 }, t0);
        let frames = sent(&mut sim);
        assert_eq!(decoded(&frames), [Message::PubComp { message_id: 7 }]);
        // Released: the id is free for the next message.
        feed(&mut sim, &led(false, 7, "off"), t0);
        let received: Vec<_> = events
            .try_iter()
            .filter(|e| matches!(e, SimEvent::Received(_)))
            .collect();
        assert_eq!(
            received,
            [
                SimEvent::Received("n led on".into()),
                SimEvent::Received("n led off".into())
            ]
        );
    }

    #[test]
    fn a_sleeping_node_reads_sleeps_and_wakes_for_what_waited() {
        let (tx, events) = mpsc::channel();
        let mut report = move |event| tx.send(event).unwrap();
        let sleep = Duration::from_secs(1);
        let mut sim = Sim::new(options(1), Some(sleep), &mut report).unwrap();
        let t0 = Instant::now();
        run_node(&mut sim, t0);
        for round in 0..2u16 {
            // One reading, acknowledged.
            sim.poll(t0).unwrap();
            let frames = sent(&mut sim);
            let [Message::Publish(publish)] = decoded(&frames)[..] else {
                panic!("PUBLISH expected in round {round}");
            };
            let data = if round == 0 {
                "{\"temp\": 20.0}"
            } else {
                "{\"temp\": 20.7}"
            };
            assert_eq!(publish.data, data.as_bytes());
            let puback = Message::PubAck {
                topic_id: SENSOR,
                message_id: publish.message_id,
                return_code: ReturnCode::Accepted,
            };
            feed(&mut sim, &puback, t0);
            // Then DISCONNECT announcing 1.5 sleeps, sent again until answered.
            sim.poll(t0).unwrap();
            let frames = sent(&mut sim);
            let disconnect = Message::Disconnect { duration: Some(2) };
            assert_eq!(decoded(&frames), [disconnect]);
            sim.poll(t0 + RETRY).unwrap();
            let frames = sent(&mut sim);
            assert_eq!(decoded(&frames), [disconnect]);
            let asleep = t0 + RETRY;
            feed(&mut sim, &Message::Disconnect { duration: None }, asleep);
            // The answer to the first DISCONNECT, late: still asleep.
            feed(&mut sim, &Message::Disconnect { duration: None }, asleep);
            // Silent for the sleep, whatever the interval or keepalive.
            let half = asleep + sleep / 2;
            assert_eq!(sim.poll(half).unwrap(), asleep + sleep);
            assert!(sent(&mut sim).is_empty());
            let t1 = asleep + sleep;
            sim.poll(t1).unwrap();
            let frames = sent(&mut sim);
            assert_eq!(
                decoded(&frames),
                [Message::PingReq {
                    client_id: Some("n")
                }]
            );
            // What waited: a REGISTER and a message on its topic, one for the known topic.
            let register = Message::Register(Register {
                topic_id: 9,
                message_id: 1,
                topic_name: "control/all/led",
            });
            feed(&mut sim, &register, t1);
            for (topic, message_id, data) in [(9, 2, "all"), (CONTROL, 3, "mine")] {
                let publish = Message::Publish(Publish {
                    dup: false,
                    qos: QoS::One,
                    retain: false,
                    topic: TopicId::Normal(topic),
                    message_id,
                    data: data.as_bytes(),
                });
                feed(&mut sim, &publish, t1);
            }
            let frames = sent(&mut sim);
            assert_eq!(frames.len(), 3, "REGACK and two PUBACKs");
            // The gateway still sends: no PINGREQ again yet.
            sim.poll(t1 + Duration::from_secs(1)).unwrap();
            assert!(sent(&mut sim).is_empty());
            feed(&mut sim, &Message::PingResp, t1 + Duration::from_secs(1));
            let received: Vec<_> = events
                .try_iter()
                .filter_map(|e| match e {
                    SimEvent::Received(line) => Some(line),
                    SimEvent::Warning(_) => None,
                })
                .collect();
            assert_eq!(received, ["n led all", "n led mine"]);
        }
    }

    #[test]
    fn a_waking_node_asks_again_when_the_gateway_stays_silent() {
        let mut report = |_| {};
        let sleep = Duration::from_secs(1);
        let mut sim = Sim::new(options(0), Some(sleep), &mut report).unwrap();
        let t0 = Instant::now();
        run_node(&mut sim, t0);
        sim.poll(t0).unwrap();
        let frames = sent(&mut sim);
        assert!(matches!(
            decoded(&frames)[..],
            [
                Message::Publish(_),
                Message::Disconnect { duration: Some(2) }
            ]
        ));
        feed(&mut sim, &Message::Disconnect { duration: None }, t0);
        sim.poll(t0 + sleep).unwrap();
        let wake = Message::PingReq {
            client_id: Some("n"),
        };
        let frames = sent(&mut sim);
        assert_eq!(decoded(&frames), [wake]);
        sim.poll(t0 + sleep + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert_eq!(decoded(&frames), [wake]);
        // A gateway that does not know the node any more: it starts over.
        feed(
            &mut sim,
            &Message::Disconnect { duration: None },
            t0 + sleep + RETRY,
        );
        sim.poll(t0 + sleep + RETRY).unwrap();
        let frames = sent(&mut sim);
        assert!(matches!(decoded(&frames)[..], [Message::Connect(_)]));
    }
}
