//! Simulated MQTT-SN 1.2 sensor nodes (COBS + CRC frames, `edgegw-protocol`) on any byte
//! stream: a serial port or PTY for the `node-sim` program, a PTY inside the gateway for its
//! built-in demo (`nodes.simulated`).
//!
//! Each node connects (CONNECT, client id `NAME` or `NAME-1`..`NAME-N`), registers
//! `sensors/<node>/temp`, subscribes to `control/<node>/led`, then publishes a JSON reading
//! every interval and reports every message it receives as `<node> <last topic level>
//! <payload>` (so `NAME led on`). With more than one node the sim acts as a forwarder: each
//! node's messages travel in the forwarder encapsulation with the node's name as its
//! wireless node id. Requests that go unanswered are repeated; a DISCONNECT from the gateway
//! or a keepalive without any answer starts the node over.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use edgegw_protocol::{
    Connect, FrameDecoder, Message, Publish, QoS, Register, ReturnCode, Subscribe, Topic, TopicId,
    encode_encapsulated, encode_frame_to_vec, encode_to_vec,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a CONNECT, REGISTER or SUBSCRIBE may go unanswered before it is sent again.
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
    /// Time between two readings.
    pub interval: Duration,
    /// QoS of the readings: 0 or 1.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Registering,
    Subscribing,
    Running,
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
            last_sent: now,
            last_received: now,
        }
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.checked_add(1).unwrap_or(1);
        id
    }

    fn restart(&mut self) {
        self.state = State::Connecting;
        self.requested = None;
        self.topics.clear();
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
    nodes: Vec<Node>,
    out: Vec<u8>,
    report: &'a mut (dyn FnMut(SimEvent) + Send),
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
            if node.state != State::Connecting
                && now.duration_since(node.last_received) > keepalive * 2
            {
                (self.report)(SimEvent::Warning(format!(
                    "{}: gateway silent, reconnecting",
                    node.name
                )));
                node.restart();
            }
            let due = node
                .requested
                .is_none_or(|at| now.duration_since(at) >= RETRY);
            match node.state {
                State::Running => {}
                _ if !due => continue,
                _ => node.requested = Some(now),
            }
            match node.state {
                State::Connecting => {
                    let client_id = node.name.clone();
                    self.send(
                        index,
                        &Message::Connect(Connect {
                            will: false,
                            clean_session: true,
                            duration,
                            client_id: &client_id,
                        }),
                    )?;
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
                    )?;
                }
                State::Subscribing => {
                    let message_id = node.message_id();
                    let topic = node.control_topic.clone();
                    self.send(
                        index,
                        &Message::Subscribe(Subscribe {
                            dup: false,
                            qos: QoS::One,
                            message_id,
                            topic: Topic::Name(&topic),
                        }),
                    )?;
                }
                State::Running => {
                    if now >= node.next_reading {
                        node.next_reading = now + self.options.interval;
                        let qos = if self.options.qos == 1 {
                            QoS::One
                        } else {
                            QoS::Zero
                        };
                        let message_id = if qos == QoS::One {
                            node.message_id()
                        } else {
                            0
                        };
                        let topic = TopicId::Normal(node.sensor_topic_id);
                        let data = node.reading();
                        self.send(
                            index,
                            &Message::Publish(Publish {
                                dup: false,
                                qos,
                                retain: false,
                                topic,
                                message_id,
                                data: data.as_bytes(),
                            }),
                        )?;
                    } else if now.duration_since(node.last_sent) >= keepalive / 2 {
                        self.send(index, &Message::PingReq { client_id: None })?;
                    }
                    let node = &self.nodes[index];
                    next = next
                        .min(node.next_reading)
                        .min(node.last_sent + keepalive / 2);
                }
            }
        }
        Ok(next)
    }

    /// One message from the gateway, already unwrapped from its frame.
    async fn receive(&mut self, bytes: &[u8]) -> Result<(), SimError> {
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
        node.last_received = Instant::now();
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
                (self.report)(SimEvent::Received(line.trim_end().to_string()));
            }
            Message::PubRel { message_id } => {
                self.send(index, &Message::PubComp { message_id })?;
            }
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
    mut port: P,
    path: &str,
    options: Options,
    report: &mut (dyn FnMut(SimEvent) + Send),
) -> Result<(), SimError>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.to_string();
    let io_error = |source| SimError::Io {
        path: path.clone(),
        source,
    };
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
    let mut sim = Sim {
        options,
        nodes,
        // A lone delimiter first ends whatever half frame the gateway still holds.
        out: vec![edgegw_protocol::DELIMITER],
        report,
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
                            sim.receive(&bytes).await?;
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
}
