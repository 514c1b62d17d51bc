//! The sensor node's side of the node link: an MQTT-SN 1.2 client for one node on a byte
//! stream (UART, USB serial), in COBS + CRC frames (`edgegw-protocol`). `no_std`, no
//! allocation, no clock of its own: the caller passes the time in milliseconds, the bytes it
//! read, and a closure that writes frames. The ESP32-C3 firmware (`firmware/esp32c3`) runs
//! it on the chip; the host tests run it against the real gateway.
//!
//! What the node does: CONNECT with its client id, REGISTER `sensors/<id>/temp`, SUBSCRIBE
//! to `control/<id>/led` (QoS 1), then publish a reading `{"temp": 21.5}` (QoS 0) every
//! interval and turn each control message into an [`Led`] command. A request that goes
//! unanswered is sent again every [`RETRY_MS`] (same message id); a PINGREQ goes out when
//! nothing was sent, or nothing heard, for half the keepalive (readings are QoS 0, so the
//! gateway does not answer them); a gateway that stays silent for two keepalives, or that
//! sends DISCONNECT, makes the node start over. QoS 1 and 2 control messages are acknowledged
//! (PUBACK; PUBREC, PUBCOMP), a QoS 2 one acts once even when the gateway re-sends it.
//!
//! ```
//! use edgegw_node::{Led, Node, Settings};
//!
//! let mut node = Node::new(Settings { client_id: "n1", keepalive_s: 30, interval_ms: 1000 })?;
//! let mut wire = Vec::new();
//! node.poll(0, &mut || 21.5, &mut |frame| wire.extend_from_slice(frame))?;
//! assert!(!wire.is_empty()); // a delimiter, then the CONNECT frame
//! // … and for each chunk read from the link:
//! node.receive(&[], 0, &mut |frame| wire.extend_from_slice(frame), &mut |led: Led| {})?;
//! # Ok::<(), edgegw_node::Error>(())
//! ```

#![no_std]

#[cfg(test)]
extern crate std;

use core::fmt::{self, Write as _};

use edgegw_protocol::{
    Connect, EncodeError, FrameDecoder, Message, Publish, QoS, Register, ReturnCode, Subscribe,
    Topic, TopicId, encode, encode_frame, max_frame_len,
};

/// Ends every frame; a lone one cuts off whatever half frame the other side holds.
pub use edgegw_protocol::DELIMITER;

/// How long a CONNECT, REGISTER or SUBSCRIBE may go unanswered before it is sent again.
pub const RETRY_MS: u64 = 2_000;
/// The longest message the node sends or accepts (a control payload up to ~100 bytes).
pub const MAX_MESSAGE: usize = 160;
/// Longest client id MQTT-SN allows (spec §5.3.1).
pub const MAX_CLIENT_ID: usize = 23;
/// The longest frame the node accepts from the gateway (message + CRC): longer control
/// messages than it sends, so a long payload is still acknowledged (and ignored as a command).
pub const MAX_RECEIVE: usize = 1024;
/// QoS 2 control messages received and not yet released that the node remembers: as many as
/// the gateway keeps in flight to one node.
const QOS2_SLOTS: usize = 8;

/// What the node is and how often it reports.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// 1–23 characters, no `/`, `+` or `#` (it is a topic level too).
    pub client_id: &'a str,
    /// Keepalive announced in CONNECT, seconds (at least 2).
    pub keepalive_s: u16,
    /// Time between two readings.
    pub interval_ms: u32,
}

/// What a control message asks of the LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Led {
    On,
    Off,
    Toggle,
}

impl Led {
    /// `on`/`1`/`true`, `off`/`0`/`false`, `toggle` (any case, surrounding blanks or quotes
    /// ignored, so a JSON string works too); anything else is `None`.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let text = core::str::from_utf8(payload).ok()?;
        let text = text.trim().trim_matches('"').trim();
        let is = |word: &str| text.eq_ignore_ascii_case(word);
        if is("on") || is("1") || is("true") {
            Some(Self::On)
        } else if is("off") || is("0") || is("false") {
            Some(Self::Off)
        } else if is("toggle") {
            Some(Self::Toggle)
        } else {
            None
        }
    }
}

/// Where the node is in its session with the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Registering,
    Subscribing,
    Running,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The client id is empty, longer than 23 bytes, or holds `/`, `+` or `#`.
    ClientId,
    /// The keepalive is below 2 seconds (a PINGREQ goes out at half of it).
    Keepalive,
    /// A message did not fit [`MAX_MESSAGE`] (cannot happen with a valid client id).
    Encode(EncodeError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientId => write!(
                f,
                "the client id must be 1 to {MAX_CLIENT_ID} bytes without '/', '+' or '#'"
            ),
            Self::Keepalive => f.write_str("the keepalive must be at least 2 seconds"),
            Self::Encode(error) => write!(f, "cannot encode a message: {error}"),
        }
    }
}

impl core::error::Error for Error {}

impl From<EncodeError> for Error {
    fn from(error: EncodeError) -> Self {
        Self::Encode(error)
    }
}

/// What the node counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_in: u32,
    pub frames_out: u32,
    /// Frames with a bad CRC or COBS block, or too long.
    pub frame_errors: u32,
    /// Good frames that were no valid MQTT-SN message.
    pub decode_errors: u32,
    pub readings: u32,
    /// Control messages that were no LED command.
    pub unknown_commands: u32,
    /// Times the node started over (refused, silent gateway, DISCONNECT).
    pub restarts: u32,
}

/// Text in a fixed buffer.
#[derive(Clone)]
struct Text<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    const fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever written.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl<const N: usize> fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// One MQTT-SN node on one link.
pub struct Node {
    decoder: FrameDecoder<MAX_RECEIVE>,
    session: Session,
}

struct Session {
    client_id: Text<MAX_CLIENT_ID>,
    sensor_topic: Text<48>,
    control_topic: Text<48>,
    keepalive_s: u16,
    keepalive_ms: u64,
    interval_ms: u64,
    state: State,
    /// When the current state's request was last sent.
    requested_at: Option<u64>,
    /// The message id of the REGISTER or SUBSCRIBE in flight; kept across its re-sends, so a
    /// late answer still counts.
    request_id: u16,
    sensor_topic_id: u16,
    control_topic_id: Option<u16>,
    next_message_id: u16,
    next_reading_at: u64,
    last_sent_at: u64,
    last_received_at: u64,
    /// When the last PINGREQ went out.
    last_ping_at: u64,
    /// QoS 2 control messages acted on and not yet released (PUBREL): message id and arrival
    /// order (the oldest makes way when all slots are taken).
    unreleased: [Option<(u16, u32)>; QOS2_SLOTS],
    arrivals: u32,
    /// A lone delimiter goes out before the first frame, to cut off any half frame.
    started: bool,
    stats: Stats,
}

impl Node {
    pub fn new(settings: Settings<'_>) -> Result<Self, Error> {
        let id = settings.client_id;
        if id.is_empty() || id.len() > MAX_CLIENT_ID || id.contains(['/', '+', '#']) {
            return Err(Error::ClientId);
        }
        if settings.keepalive_s < 2 {
            return Err(Error::Keepalive);
        }
        let mut client_id = Text::new();
        let mut sensor_topic = Text::new();
        let mut control_topic = Text::new();
        // Cannot fail: 23 bytes fit each buffer with their fixed levels.
        let written = client_id.write_str(id).is_ok()
            && write!(sensor_topic, "sensors/{id}/temp").is_ok()
            && write!(control_topic, "control/{id}/led").is_ok();
        if !written {
            return Err(Error::ClientId);
        }
        Ok(Self {
            decoder: FrameDecoder::new(),
            session: Session {
                client_id,
                sensor_topic,
                control_topic,
                keepalive_s: settings.keepalive_s,
                keepalive_ms: u64::from(settings.keepalive_s) * 1000,
                interval_ms: u64::from(settings.interval_ms.max(1)),
                state: State::Connecting,
                requested_at: None,
                request_id: 0,
                sensor_topic_id: 0,
                control_topic_id: None,
                next_message_id: 1,
                next_reading_at: 0,
                last_sent_at: 0,
                last_received_at: 0,
                last_ping_at: 0,
                unreleased: [None; QOS2_SLOTS],
                arrivals: 0,
                started: false,
                stats: Stats::default(),
            },
        })
    }

    pub fn state(&self) -> State {
        self.session.state
    }

    pub fn stats(&self) -> Stats {
        self.session.stats
    }

    pub fn client_id(&self) -> &str {
        self.session.client_id.as_str()
    }

    /// Sends what is due at `now_ms`: a (repeated) request, a reading (`temperature` is
    /// called only then; a NaN reading is skipped), a PINGREQ. Each frame goes to `tx` whole,
    /// delimiter included. Returns when something is next due, in the same milliseconds.
    pub fn poll(
        &mut self,
        now_ms: u64,
        temperature: &mut dyn FnMut() -> f32,
        tx: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, Error> {
        self.session.poll(now_ms, temperature, tx)
    }

    /// Takes bytes read from the link: each frame they complete is checked and handled;
    /// answers go to `tx`, LED commands to `led`. Noise and bad frames are counted and
    /// skipped (the decoder resynchronises at the next delimiter).
    pub fn receive(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        tx: &mut dyn FnMut(&[u8]),
        led: &mut dyn FnMut(Led),
    ) -> Result<(), Error> {
        let mut frames = self.decoder.feed(bytes);
        while let Some(frame) = frames.next_frame() {
            match frame {
                Ok(bytes) => {
                    self.session.stats.frames_in = self.session.stats.frames_in.wrapping_add(1);
                    match edgegw_protocol::decode_exact(bytes) {
                        Ok(message) => self.session.handle(message, now_ms, tx, led)?,
                        Err(_) => {
                            self.session.stats.decode_errors =
                                self.session.stats.decode_errors.wrapping_add(1);
                        }
                    }
                }
                Err(_) => {
                    self.session.stats.frame_errors =
                        self.session.stats.frame_errors.wrapping_add(1);
                }
            }
        }
        Ok(())
    }
}

impl Session {
    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.checked_add(1).unwrap_or(1);
        id
    }

    fn restart(&mut self) {
        self.state = State::Connecting;
        self.requested_at = None;
        self.control_topic_id = None;
        self.unreleased = [None; QOS2_SLOTS];
        self.stats.restarts = self.stats.restarts.wrapping_add(1);
    }

    /// Encodes `message` into a frame for `tx`.
    fn send(
        &mut self,
        message: &Message<'_>,
        now_ms: u64,
        tx: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Error> {
        send(message, tx)?;
        self.last_sent_at = now_ms;
        self.stats.frames_out = self.stats.frames_out.wrapping_add(1);
        Ok(())
    }

    fn poll(
        &mut self,
        now: u64,
        temperature: &mut dyn FnMut() -> f32,
        tx: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, Error> {
        if !self.started {
            self.started = true;
            tx(&[DELIMITER]);
            self.last_received_at = now;
        }
        if self.state != State::Connecting
            && now.saturating_sub(self.last_received_at) > 2 * self.keepalive_ms
        {
            self.restart();
        }
        if self.state == State::Running {
            if now >= self.next_reading_at {
                self.next_reading_at = now + self.interval_ms;
                let celsius = temperature();
                if !celsius.is_nan() {
                    let mut data = Text::<32>::new();
                    // Cannot fail: `{"temp": -40.0}` to `{"temp": 125.0}` is far below 32.
                    write!(data, "{{\"temp\": {celsius:.1}}}").map_err(|_| {
                        Error::Encode(EncodeError::BufferTooSmall {
                            needed: 33,
                            available: 32,
                        })
                    })?;
                    let publish = Message::Publish(Publish {
                        dup: false,
                        qos: QoS::Zero,
                        retain: false,
                        topic: TopicId::Normal(self.sensor_topic_id),
                        message_id: 0,
                        data: data.as_str().as_bytes(),
                    });
                    self.send(&publish, now, tx)?;
                    self.stats.readings = self.stats.readings.wrapping_add(1);
                }
            }
            let half = self.keepalive_ms / 2;
            // Heard from the gateway, or pinged it, within half the keepalive.
            let heard = self.last_received_at.max(self.last_ping_at);
            if now.saturating_sub(self.last_sent_at) >= half || now.saturating_sub(heard) >= half {
                self.send(&Message::PingReq { client_id: None }, now, tx)?;
                self.last_ping_at = now;
            }
            let heard = self.last_received_at.max(self.last_ping_at);
            return Ok(self
                .next_reading_at
                .min(self.last_sent_at + half)
                .min(heard + half));
        }
        let due = self
            .requested_at
            .is_none_or(|at| now.saturating_sub(at) >= RETRY_MS);
        if due {
            let repeat = self.requested_at.is_some();
            if !repeat {
                self.request_id = self.message_id();
            }
            self.requested_at = Some(now);
            match self.state {
                State::Connecting => {
                    let connect = Message::Connect(Connect {
                        will: false,
                        clean_session: true,
                        duration: self.keepalive_s,
                        client_id: self.client_id.as_str(),
                    });
                    send(&connect, tx)?;
                }
                State::Registering => {
                    let register = Message::Register(Register {
                        topic_id: 0,
                        message_id: self.request_id,
                        topic_name: self.sensor_topic.as_str(),
                    });
                    send(&register, tx)?;
                }
                State::Subscribing => {
                    let subscribe = Message::Subscribe(Subscribe {
                        dup: repeat,
                        qos: QoS::One,
                        message_id: self.request_id,
                        topic: Topic::Name(self.control_topic.as_str()),
                    });
                    send(&subscribe, tx)?;
                }
                State::Running => {}
            }
            self.last_sent_at = now;
            self.stats.frames_out = self.stats.frames_out.wrapping_add(1);
        }
        Ok(self.requested_at.unwrap_or(now) + RETRY_MS)
    }

    fn handle(
        &mut self,
        message: Message<'_>,
        now: u64,
        tx: &mut dyn FnMut(&[u8]),
        led: &mut dyn FnMut(Led),
    ) -> Result<(), Error> {
        self.last_received_at = now;
        match message {
            Message::ConnAck { return_code } if self.state == State::Connecting => {
                if return_code == ReturnCode::Accepted {
                    self.state = State::Registering;
                    self.requested_at = None;
                }
                // Refused: the CONNECT is repeated after RETRY_MS.
            }
            Message::RegAck {
                topic_id,
                message_id,
                return_code,
            } if self.state == State::Registering && message_id == self.request_id => {
                if return_code == ReturnCode::Accepted {
                    self.sensor_topic_id = topic_id;
                    self.state = State::Subscribing;
                    self.requested_at = None;
                }
            }
            Message::SubAck {
                topic_id,
                message_id,
                return_code,
                ..
            } if self.state == State::Subscribing && message_id == self.request_id => {
                if return_code == ReturnCode::Accepted {
                    if topic_id != 0 {
                        self.control_topic_id = Some(topic_id);
                    }
                    self.state = State::Running;
                    self.requested_at = None;
                    self.next_reading_at = now;
                }
            }
            Message::Register(register) => {
                // The gateway names a topic before it publishes on it.
                if register.topic_name == self.control_topic.as_str() {
                    self.control_topic_id = Some(register.topic_id);
                }
                let regack = Message::RegAck {
                    topic_id: register.topic_id,
                    message_id: register.message_id,
                    return_code: ReturnCode::Accepted,
                };
                self.send(&regack, now, tx)?;
            }
            Message::Publish(publish) => self.control(publish, now, tx, led)?,
            Message::PubRel { message_id } => {
                if let Some(slot) = self
                    .unreleased
                    .iter_mut()
                    .find(|s| s.is_some_and(|(id, _)| id == message_id))
                {
                    *slot = None;
                }
                self.send(&Message::PubComp { message_id }, now, tx)?;
            }
            Message::PingReq { .. } => self.send(&Message::PingResp, now, tx)?,
            Message::Disconnect { .. } => self.restart(),
            _ => {}
        }
        Ok(())
    }

    /// Remembers a QoS 2 message id until its PUBREL: in a free slot, else in place of the
    /// oldest (the gateway released that one long ago or never will).
    fn remember_unreleased(&mut self, message_id: u16) {
        self.arrivals = self.arrivals.wrapping_add(1);
        let slot = match self.unreleased.iter().position(Option::is_none) {
            Some(free) => free,
            None => self
                .unreleased
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.map_or(0, |(_, order)| order))
                .map_or(0, |(i, _)| i),
        };
        self.unreleased[slot] = Some((message_id, self.arrivals));
    }

    /// A PUBLISH from the gateway: acknowledged per its QoS, acted on once.
    fn control(
        &mut self,
        publish: Publish<'_>,
        now: u64,
        tx: &mut dyn FnMut(&[u8]),
        led: &mut dyn FnMut(Led),
    ) -> Result<(), Error> {
        let known = match publish.topic {
            TopicId::Normal(id) | TopicId::Predefined(id) => self.control_topic_id == Some(id),
            TopicId::Short(_) => false,
        };
        let topic_id = u16::from_be_bytes(publish.topic.to_bytes());
        if !known {
            // Spec §6.7: an unknown topic id is answered with PUBACK "invalid topic id", so
            // the gateway registers it again. Nothing to answer at QoS 0.
            if publish.qos != QoS::Zero {
                let puback = Message::PubAck {
                    topic_id,
                    message_id: publish.message_id,
                    return_code: ReturnCode::InvalidTopicId,
                };
                self.send(&puback, now, tx)?;
            }
            return Ok(());
        }
        let repeated = publish.qos == QoS::Two
            && self
                .unreleased
                .iter()
                .any(|s| s.is_some_and(|(id, _)| id == publish.message_id));
        match publish.qos {
            QoS::One => {
                let puback = Message::PubAck {
                    topic_id,
                    message_id: publish.message_id,
                    return_code: ReturnCode::Accepted,
                };
                self.send(&puback, now, tx)?;
            }
            QoS::Two => {
                if !repeated {
                    // The oldest slot makes way: the gateway released it long ago or never will.
                    self.remember_unreleased(publish.message_id);
                }
                let pubrec = Message::PubRec {
                    message_id: publish.message_id,
                };
                self.send(&pubrec, now, tx)?;
            }
            QoS::Zero | QoS::MinusOne => {}
        }
        if !repeated {
            match Led::parse(publish.data) {
                Some(command) => led(command),
                None => self.stats.unknown_commands = self.stats.unknown_commands.wrapping_add(1),
            }
        }
        Ok(())
    }
}

/// Encodes `message` and its frame on the stack and hands the frame to `tx`.
fn send(message: &Message<'_>, tx: &mut dyn FnMut(&[u8])) -> Result<(), Error> {
    let mut bytes = [0u8; MAX_MESSAGE];
    let len = encode(message, &mut bytes)?;
    let mut frame = [0u8; max_frame_len(MAX_MESSAGE)];
    let frame_len = encode_frame(&bytes[..len], &mut frame)?;
    tx(&frame[..frame_len]);
    Ok(())
}

#[cfg(test)]
mod tests;
