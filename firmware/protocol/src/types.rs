//! The small value types of MQTT-SN 1.2: message types, the flags byte, QoS, topic ids and
//! return codes (spec §5.2 and §5.3).

use core::fmt;

/// The MsgType byte (spec §5.2.2, table 3). 0x03, 0x11, 0x19, 0x1E–0xFD and 0xFF are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Advertise = 0x00,
    SearchGw = 0x01,
    GwInfo = 0x02,
    Connect = 0x04,
    ConnAck = 0x05,
    WillTopicReq = 0x06,
    WillTopic = 0x07,
    WillMsgReq = 0x08,
    WillMsg = 0x09,
    Register = 0x0A,
    RegAck = 0x0B,
    Publish = 0x0C,
    PubAck = 0x0D,
    PubComp = 0x0E,
    PubRec = 0x0F,
    PubRel = 0x10,
    Subscribe = 0x12,
    SubAck = 0x13,
    Unsubscribe = 0x14,
    UnsubAck = 0x15,
    PingReq = 0x16,
    PingResp = 0x17,
    Disconnect = 0x18,
    WillTopicUpd = 0x1A,
    WillTopicResp = 0x1B,
    WillMsgUpd = 0x1C,
    WillMsgResp = 0x1D,
    /// The forwarder encapsulation (spec §5.5).
    Encapsulated = 0xFE,
}

impl MessageType {
    /// The type for a MsgType byte; `None` for reserved values.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x00 => Self::Advertise,
            0x01 => Self::SearchGw,
            0x02 => Self::GwInfo,
            0x04 => Self::Connect,
            0x05 => Self::ConnAck,
            0x06 => Self::WillTopicReq,
            0x07 => Self::WillTopic,
            0x08 => Self::WillMsgReq,
            0x09 => Self::WillMsg,
            0x0A => Self::Register,
            0x0B => Self::RegAck,
            0x0C => Self::Publish,
            0x0D => Self::PubAck,
            0x0E => Self::PubComp,
            0x0F => Self::PubRec,
            0x10 => Self::PubRel,
            0x12 => Self::Subscribe,
            0x13 => Self::SubAck,
            0x14 => Self::Unsubscribe,
            0x15 => Self::UnsubAck,
            0x16 => Self::PingReq,
            0x17 => Self::PingResp,
            0x18 => Self::Disconnect,
            0x1A => Self::WillTopicUpd,
            0x1B => Self::WillTopicResp,
            0x1C => Self::WillMsgUpd,
            0x1D => Self::WillMsgResp,
            0xFE => Self::Encapsulated,
            _ => return None,
        })
    }

    /// The MsgType byte.
    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    /// The name the spec uses, e.g. `"PUBLISH"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Advertise => "ADVERTISE",
            Self::SearchGw => "SEARCHGW",
            Self::GwInfo => "GWINFO",
            Self::Connect => "CONNECT",
            Self::ConnAck => "CONNACK",
            Self::WillTopicReq => "WILLTOPICREQ",
            Self::WillTopic => "WILLTOPIC",
            Self::WillMsgReq => "WILLMSGREQ",
            Self::WillMsg => "WILLMSG",
            Self::Register => "REGISTER",
            Self::RegAck => "REGACK",
            Self::Publish => "PUBLISH",
            Self::PubAck => "PUBACK",
            Self::PubComp => "PUBCOMP",
            Self::PubRec => "PUBREC",
            Self::PubRel => "PUBREL",
            Self::Subscribe => "SUBSCRIBE",
            Self::SubAck => "SUBACK",
            Self::Unsubscribe => "UNSUBSCRIBE",
            Self::UnsubAck => "UNSUBACK",
            Self::PingReq => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect => "DISCONNECT",
            Self::WillTopicUpd => "WILLTOPICUPD",
            Self::WillTopicResp => "WILLTOPICRESP",
            Self::WillMsgUpd => "WILLMSGUPD",
            Self::WillMsgResp => "WILLMSGRESP",
            Self::Encapsulated => "ENCAPSULATED",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Quality of service (flags bits 6–5). `MinusOne` (0b11) is MQTT-SN's publish without a
/// connection, allowed only with predefined or short topic ids (spec §6.8); the codec carries
/// it wherever the flags byte does and leaves that rule to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    Zero,
    One,
    Two,
    MinusOne,
}

impl QoS {
    /// The QoS for the two flag bits (the low two bits of `bits`).
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0b00 => Self::Zero,
            0b01 => Self::One,
            0b10 => Self::Two,
            _ => Self::MinusOne,
        }
    }

    /// The two flag bits, not yet shifted into place.
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Zero => 0b00,
            Self::One => 0b01,
            Self::Two => 0b10,
            Self::MinusOne => 0b11,
        }
    }

    /// The level as the spec writes it: 0, 1, 2 or −1.
    pub const fn level(self) -> i8 {
        match self {
            Self::Zero => 0,
            Self::One => 1,
            Self::Two => 2,
            Self::MinusOne => -1,
        }
    }
}

/// How the two topic bytes of PUBLISH (and the topic of SUBSCRIBE/UNSUBSCRIBE) are meant
/// (flags bits 1–0). 0b11 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicIdType {
    /// A topic id the gateway assigned with REGISTER/REGACK (in SUBSCRIBE: a topic name).
    Normal,
    /// A topic id both sides know beforehand (from configuration).
    Predefined,
    /// A two-character topic name carried in place of an id.
    Short,
}

impl TopicIdType {
    /// The type for the two flag bits; `None` for the reserved 0b11.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits & 0b11 {
            0b00 => Some(Self::Normal),
            0b01 => Some(Self::Predefined),
            0b10 => Some(Self::Short),
            _ => None,
        }
    }

    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Normal => 0b00,
            Self::Predefined => 0b01,
            Self::Short => 0b10,
        }
    }
}

/// The flags byte (spec §5.3.4). Each message uses only some of the bits; the decoder ignores
/// the others and the encoder writes them as zero.
///
/// ```
/// use edgegw_protocol::{Flags, QoS, TopicIdType};
/// let flags = Flags::new().with_qos(QoS::MinusOne).with_topic_id_type(TopicIdType::Predefined);
/// assert_eq!(flags.to_byte(), 0b0110_0001);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    const DUP: u8 = 0x80;
    const QOS_SHIFT: u8 = 5;
    const RETAIN: u8 = 0x10;
    const WILL: u8 = 0x08;
    const CLEAN_SESSION: u8 = 0x04;
    const TOPIC_ID_TYPE: u8 = 0x03;

    /// All bits clear: QoS 0, normal topic id.
    pub const fn new() -> Self {
        Self(0)
    }

    pub const fn from_byte(byte: u8) -> Self {
        Self(byte)
    }

    pub const fn to_byte(self) -> u8 {
        self.0
    }

    const fn with_bit(self, bit: u8, on: bool) -> Self {
        if on {
            Self(self.0 | bit)
        } else {
            Self(self.0 & !bit)
        }
    }

    pub const fn dup(self) -> bool {
        self.0 & Self::DUP != 0
    }

    pub const fn with_dup(self, dup: bool) -> Self {
        self.with_bit(Self::DUP, dup)
    }

    pub const fn qos(self) -> QoS {
        QoS::from_bits(self.0 >> Self::QOS_SHIFT)
    }

    pub const fn with_qos(self, qos: QoS) -> Self {
        Self((self.0 & !(0b11 << Self::QOS_SHIFT)) | (qos.to_bits() << Self::QOS_SHIFT))
    }

    pub const fn retain(self) -> bool {
        self.0 & Self::RETAIN != 0
    }

    pub const fn with_retain(self, retain: bool) -> Self {
        self.with_bit(Self::RETAIN, retain)
    }

    pub const fn will(self) -> bool {
        self.0 & Self::WILL != 0
    }

    pub const fn with_will(self, will: bool) -> Self {
        self.with_bit(Self::WILL, will)
    }

    pub const fn clean_session(self) -> bool {
        self.0 & Self::CLEAN_SESSION != 0
    }

    pub const fn with_clean_session(self, clean_session: bool) -> Self {
        self.with_bit(Self::CLEAN_SESSION, clean_session)
    }

    /// `None` when the bits hold the reserved value 0b11.
    pub const fn topic_id_type(self) -> Option<TopicIdType> {
        TopicIdType::from_bits(self.0)
    }

    pub const fn with_topic_id_type(self, topic_id_type: TopicIdType) -> Self {
        Self((self.0 & !Self::TOPIC_ID_TYPE) | topic_id_type.to_bits())
    }
}

/// The ReturnCode byte (spec §5.3.10). 0x04–0xFF are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReturnCode {
    Accepted = 0x00,
    /// Rejected: congestion.
    Congestion = 0x01,
    /// Rejected: invalid topic id.
    InvalidTopicId = 0x02,
    /// Rejected: not supported.
    NotSupported = 0x03,
}

impl ReturnCode {
    /// `None` for reserved values.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0x00 => Some(Self::Accepted),
            0x01 => Some(Self::Congestion),
            0x02 => Some(Self::InvalidTopicId),
            0x03 => Some(Self::NotSupported),
            _ => None,
        }
    }

    pub const fn to_byte(self) -> u8 {
        self as u8
    }
}

/// The topic of a PUBLISH: two bytes on the wire, read according to the TopicIdType flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicId {
    /// Assigned with REGISTER/REGACK.
    Normal(u16),
    /// Known to both sides beforehand.
    Predefined(u16),
    /// A two-character topic name, e.g. `*b"t1"`.
    Short([u8; 2]),
}

impl TopicId {
    pub const fn id_type(self) -> TopicIdType {
        match self {
            Self::Normal(_) => TopicIdType::Normal,
            Self::Predefined(_) => TopicIdType::Predefined,
            Self::Short(_) => TopicIdType::Short,
        }
    }

    /// The two bytes on the wire (ids big-endian).
    pub const fn to_bytes(self) -> [u8; 2] {
        match self {
            Self::Normal(id) | Self::Predefined(id) => id.to_be_bytes(),
            Self::Short(name) => name,
        }
    }

    pub const fn from_parts(id_type: TopicIdType, bytes: [u8; 2]) -> Self {
        match id_type {
            TopicIdType::Normal => Self::Normal(u16::from_be_bytes(bytes)),
            TopicIdType::Predefined => Self::Predefined(u16::from_be_bytes(bytes)),
            TopicIdType::Short => Self::Short(bytes),
        }
    }
}

/// The topic of a SUBSCRIBE or UNSUBSCRIBE: a topic name (may hold wildcards), a predefined
/// topic id, or a short topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic<'a> {
    Name(&'a str),
    Predefined(u16),
    Short([u8; 2]),
}

impl Topic<'_> {
    pub const fn id_type(&self) -> TopicIdType {
        match self {
            Self::Name(_) => TopicIdType::Normal,
            Self::Predefined(_) => TopicIdType::Predefined,
            Self::Short(_) => TopicIdType::Short,
        }
    }
}
