//! [`Message`]: one MQTT-SN 1.2 message, borrowing its strings and payloads from the buffer it
//! was decoded from (or that the caller built it from).

use crate::error::DecodeError;
use crate::types::{MessageType, QoS, ReturnCode, Topic, TopicId};

/// One MQTT-SN 1.2 message (spec §5.4). Variants follow the spec's message types; fields the
/// spec fixes (the protocol id in CONNECT, flag bits a message does not use) are not carried.
///
/// Every `Message` that [`encode`](crate::encode) accepts decodes back to an equal `Message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message<'a> {
    /// A gateway announces itself; `duration` (seconds) until the next ADVERTISE.
    Advertise {
        gateway_id: u8,
        duration: u16,
    },
    /// A client looks for a gateway; `radius` is the broadcast radius in hops.
    SearchGw {
        radius: u8,
    },
    /// The answer to SEARCHGW. `gateway_address` is empty when a gateway sends it and holds the
    /// gateway's address when another client answers on its behalf.
    GwInfo {
        gateway_id: u8,
        gateway_address: &'a [u8],
    },
    Connect(Connect<'a>),
    ConnAck {
        return_code: ReturnCode,
    },
    WillTopicReq,
    /// `None` is the empty WILLTOPIC (two bytes, no flags, no topic): it deletes the will.
    WillTopic(Option<WillTopic<'a>>),
    WillMsgReq,
    WillMsg {
        will_message: &'a [u8],
    },
    Register(Register<'a>),
    RegAck {
        topic_id: u16,
        message_id: u16,
        return_code: ReturnCode,
    },
    Publish(Publish<'a>),
    /// `topic_id` echoes the PUBLISH's two topic bytes (PUBACK has no flags to say their type).
    PubAck {
        topic_id: u16,
        message_id: u16,
        return_code: ReturnCode,
    },
    PubComp {
        message_id: u16,
    },
    PubRec {
        message_id: u16,
    },
    PubRel {
        message_id: u16,
    },
    Subscribe(Subscribe<'a>),
    /// `qos` is the granted QoS.
    SubAck {
        qos: QoS,
        topic_id: u16,
        message_id: u16,
        return_code: ReturnCode,
    },
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck {
        message_id: u16,
    },
    /// A sleeping client that wakes up sends its client id (spec §6.14); otherwise `None`.
    /// `Some("")` cannot be told from `None` on the wire, so `encode` refuses it.
    PingReq {
        client_id: Option<&'a str>,
    },
    PingResp,
    /// `duration` (seconds) is present when a client goes to sleep (spec §6.14).
    Disconnect {
        duration: Option<u16>,
    },
    /// `None` is the empty WILLTOPICUPD: it deletes the will.
    WillTopicUpd(Option<WillTopic<'a>>),
    WillTopicResp {
        return_code: ReturnCode,
    },
    WillMsgUpd {
        will_message: &'a [u8],
    },
    WillMsgResp {
        return_code: ReturnCode,
    },
    Encapsulated(Encapsulated<'a>),
}

impl Message<'_> {
    pub const fn message_type(&self) -> MessageType {
        match self {
            Self::Advertise { .. } => MessageType::Advertise,
            Self::SearchGw { .. } => MessageType::SearchGw,
            Self::GwInfo { .. } => MessageType::GwInfo,
            Self::Connect(_) => MessageType::Connect,
            Self::ConnAck { .. } => MessageType::ConnAck,
            Self::WillTopicReq => MessageType::WillTopicReq,
            Self::WillTopic(_) => MessageType::WillTopic,
            Self::WillMsgReq => MessageType::WillMsgReq,
            Self::WillMsg { .. } => MessageType::WillMsg,
            Self::Register(_) => MessageType::Register,
            Self::RegAck { .. } => MessageType::RegAck,
            Self::Publish(_) => MessageType::Publish,
            Self::PubAck { .. } => MessageType::PubAck,
            Self::PubComp { .. } => MessageType::PubComp,
            Self::PubRec { .. } => MessageType::PubRec,
            Self::PubRel { .. } => MessageType::PubRel,
            Self::Subscribe(_) => MessageType::Subscribe,
            Self::SubAck { .. } => MessageType::SubAck,
            Self::Unsubscribe(_) => MessageType::Unsubscribe,
            Self::UnsubAck { .. } => MessageType::UnsubAck,
            Self::PingReq { .. } => MessageType::PingReq,
            Self::PingResp => MessageType::PingResp,
            Self::Disconnect { .. } => MessageType::Disconnect,
            Self::WillTopicUpd(_) => MessageType::WillTopicUpd,
            Self::WillTopicResp { .. } => MessageType::WillTopicResp,
            Self::WillMsgUpd { .. } => MessageType::WillMsgUpd,
            Self::WillMsgResp { .. } => MessageType::WillMsgResp,
            Self::Encapsulated(_) => MessageType::Encapsulated,
        }
    }
}

/// CONNECT (spec §5.4.4). The protocol id is always 0x01 and not carried. The spec limits
/// `client_id` to 1–23 characters; the codec does not, so the gateway can apply (and count)
/// its own policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connect<'a> {
    /// The client will be asked for a will topic and message (WILLTOPICREQ, WILLMSGREQ).
    pub will: bool,
    pub clean_session: bool,
    /// Keep-alive, seconds.
    pub duration: u16,
    pub client_id: &'a str,
}

/// The body of a non-empty WILLTOPIC or WILLTOPICUPD (spec §5.4.7, §5.4.22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WillTopic<'a> {
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
}

/// REGISTER (spec §5.4.10): a client asks for a topic id for `topic_name` (with `topic_id`
/// 0x0000), or the gateway tells a client the id it will use for `topic_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Register<'a> {
    pub topic_id: u16,
    pub message_id: u16,
    pub topic_name: &'a str,
}

/// PUBLISH (spec §5.4.12). `message_id` is meaningful only for QoS 1 and 2 (the spec says
/// 0x0000 otherwise); the codec carries whatever is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: TopicId,
    pub message_id: u16,
    pub data: &'a [u8],
}

/// SUBSCRIBE (spec §5.4.15). `qos` is the requested QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscribe<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub message_id: u16,
    pub topic: Topic<'a>,
}

/// UNSUBSCRIBE (spec §5.4.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Unsubscribe<'a> {
    pub message_id: u16,
    pub topic: Topic<'a>,
}

/// The forwarder encapsulation (spec §5.5): a forwarder (e.g. an ESP32 radio hub) wraps each
/// message of a wireless node with the node's id, and unwraps what the gateway sends back.
///
/// `message` holds the encoded inner message, exactly its bytes. [`decode`](crate::decode)
/// checks it is one well-formed message and not itself encapsulated (no nesting, so decoding
/// recurses at most once); [`Encapsulated::decode_message`] reads it.
/// [`encode_encapsulated`](crate::encode_encapsulated) builds one from a [`Message`] without
/// an intermediate buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encapsulated<'a> {
    /// Broadcast radius, the Ctrl byte's bits 1–0: 0–3. The reserved Ctrl bits are ignored.
    pub radius: u8,
    /// The wireless node's address, at most [`MAX_WIRELESS_NODE_ID_LEN`](crate::MAX_WIRELESS_NODE_ID_LEN) bytes.
    pub wireless_node_id: &'a [u8],
    /// The encoded inner message.
    pub message: &'a [u8],
}

impl<'a> Encapsulated<'a> {
    /// The inner message. Cannot fail for an `Encapsulated` that [`decode`](crate::decode)
    /// returned; may for one built by hand.
    pub fn decode_message(&self) -> Result<Message<'a>, DecodeError> {
        crate::decode::decode_inner(self.message)
    }
}
