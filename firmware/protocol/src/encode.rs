//! Encoding: [`Message`] → bytes in a caller's buffer, no allocation.

use crate::decode::decode_inner;
use crate::error::{DecodeError, EncodeError, Field};
use crate::message::{Encapsulated, Message, WillTopic};
use crate::types::{Flags, MessageType, Topic};
use crate::{
    LONG_LENGTH_MARKER, MAX_MESSAGE_LEN, MAX_RADIUS, MAX_WIRELESS_NODE_ID_LEN, PROTOCOL_ID,
};

/// The encapsulation header: length, message type, Ctrl byte (then the wireless node id).
const ENCAPSULATION_HEADER_LEN: usize = 3;

/// How many bytes [`encode`] writes for `message`, or why it cannot be encoded.
pub fn encoded_len(message: &Message<'_>) -> Result<usize, EncodeError> {
    if let Message::Encapsulated(encapsulated) = message {
        validate_encapsulation(encapsulated.radius, encapsulated.wireless_node_id)?;
        decode_inner(encapsulated.message).map_err(|error| match error {
            DecodeError::NestedEncapsulation => EncodeError::NestedEncapsulation,
            other => EncodeError::InvalidEncapsulatedMessage(other),
        })?;
        return Ok(
            (ENCAPSULATION_HEADER_LEN + encapsulated.wireless_node_id.len())
                .saturating_add(encapsulated.message.len()),
        );
    }
    if let Message::PingReq {
        client_id: Some(""),
    } = message
    {
        return Err(EncodeError::EmptyOptionalField {
            field: Field::ClientId,
        });
    }
    total_len(body_len(message))
}

/// Encodes `message` at the start of `out` and returns how many bytes it wrote. The length
/// field takes one byte below 256 bytes and three (0x01, then big-endian) from there up to
/// [`MAX_MESSAGE_LEN`]. Flag bits the message does not use are written as zero.
///
/// Refuses what would not decode back to an equal message: see [`EncodeError`].
pub fn encode(message: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let total = encoded_len(message)?;
    if out.len() < total {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            available: out.len(),
        });
    }
    let mut w = Writer { out, position: 0 };
    match message {
        Message::Encapsulated(Encapsulated {
            radius,
            wireless_node_id,
            message: inner,
        }) => {
            write_encapsulation_header(&mut w, *radius, wireless_node_id)?;
            w.bytes(inner)?;
        }
        _ => write_message(&mut w, message, total)?,
    }
    Ok(w.position)
}

/// Encodes `message` wrapped in a forwarder encapsulation (spec §5.5) for the wireless node
/// `wireless_node_id`, without an intermediate buffer. Equivalent to encoding a
/// [`Message::Encapsulated`] whose `message` holds the encoded `message`.
pub fn encode_encapsulated(
    radius: u8,
    wireless_node_id: &[u8],
    message: &Message<'_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    validate_encapsulation(radius, wireless_node_id)?;
    if let Message::Encapsulated(_) = message {
        return Err(EncodeError::NestedEncapsulation);
    }
    let header = ENCAPSULATION_HEADER_LEN + wireless_node_id.len();
    let total = header.saturating_add(encoded_len(message)?);
    if out.len() < total {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            available: out.len(),
        });
    }
    let (head, tail) = out.split_at_mut(header);
    write_encapsulation_header(
        &mut Writer {
            out: head,
            position: 0,
        },
        radius,
        wireless_node_id,
    )?;
    Ok(header + encode(message, tail)?)
}

/// Encodes `message` into a new vector.
#[cfg(any(feature = "alloc", test))]
pub fn encode_to_vec(message: &Message<'_>) -> Result<alloc::vec::Vec<u8>, EncodeError> {
    let mut out = alloc::vec![0; encoded_len(message)?];
    let written = encode(message, &mut out)?;
    out.truncate(written);
    Ok(out)
}

fn validate_encapsulation(radius: u8, wireless_node_id: &[u8]) -> Result<(), EncodeError> {
    if radius > MAX_RADIUS {
        return Err(EncodeError::ValueOutOfRange {
            field: Field::Radius,
            value: radius,
            maximum: MAX_RADIUS,
        });
    }
    if wireless_node_id.len() > MAX_WIRELESS_NODE_ID_LEN {
        return Err(EncodeError::FieldTooLong {
            field: Field::WirelessNodeId,
            maximum: MAX_WIRELESS_NODE_ID_LEN,
            found: wireless_node_id.len(),
        });
    }
    Ok(())
}

fn write_encapsulation_header(
    w: &mut Writer<'_>,
    radius: u8,
    wireless_node_id: &[u8],
) -> Result<(), EncodeError> {
    let length = ENCAPSULATION_HEADER_LEN + wireless_node_id.len();
    w.u8(u8::try_from(length).map_err(|_| EncodeError::FieldTooLong {
        field: Field::WirelessNodeId,
        maximum: MAX_WIRELESS_NODE_ID_LEN,
        found: wireless_node_id.len(),
    })?)?;
    w.u8(MessageType::Encapsulated.to_byte())?;
    w.u8(radius)?;
    w.bytes(wireless_node_id)
}

/// The whole message for a body (message type and fields) of `body` bytes.
fn total_len(body: usize) -> Result<usize, EncodeError> {
    let short = body.saturating_add(1);
    if short <= usize::from(u8::MAX) {
        return Ok(short);
    }
    let long = body.saturating_add(3);
    if long <= MAX_MESSAGE_LEN {
        Ok(long)
    } else {
        Err(EncodeError::MessageTooLong {
            length: long,
            maximum: MAX_MESSAGE_LEN,
        })
    }
}

/// Message type byte plus fields: everything but the length field.
fn body_len(message: &Message<'_>) -> usize {
    let variable = match message {
        Message::Advertise { .. } => 3,
        Message::SearchGw { .. } | Message::ConnAck { .. } => 1,
        Message::GwInfo {
            gateway_address, ..
        } => 1usize.saturating_add(gateway_address.len()),
        Message::Connect(connect) => 4usize.saturating_add(connect.client_id.len()),
        Message::WillTopicReq | Message::WillMsgReq | Message::PingResp => 0,
        Message::WillTopic(will) | Message::WillTopicUpd(will) => match will {
            None => 0,
            Some(will) => 1usize.saturating_add(will.topic.len()),
        },
        Message::WillMsg { will_message } | Message::WillMsgUpd { will_message } => {
            will_message.len()
        }
        Message::Register(register) => 4usize.saturating_add(register.topic_name.len()),
        Message::RegAck { .. } | Message::PubAck { .. } => 5,
        Message::Publish(publish) => 5usize.saturating_add(publish.data.len()),
        Message::PubComp { .. }
        | Message::PubRec { .. }
        | Message::PubRel { .. }
        | Message::UnsubAck { .. } => 2,
        Message::Subscribe(subscribe) => 3usize.saturating_add(topic_len(&subscribe.topic)),
        Message::SubAck { .. } => 6,
        Message::Unsubscribe(unsubscribe) => 3usize.saturating_add(topic_len(&unsubscribe.topic)),
        Message::PingReq { client_id } => client_id.map_or(0, str::len),
        Message::Disconnect { duration } => duration.map_or(0, |_| 2),
        Message::WillTopicResp { .. } | Message::WillMsgResp { .. } => 1,
        // Sized by `encoded_len` itself; never reaches here.
        Message::Encapsulated(encapsulated) => encapsulated.message.len(),
    };
    variable.saturating_add(1)
}

fn topic_len(topic: &Topic<'_>) -> usize {
    match topic {
        Topic::Name(name) => name.len(),
        Topic::Predefined(_) | Topic::Short(_) => 2,
    }
}

fn write_message(
    w: &mut Writer<'_>,
    message: &Message<'_>,
    total: usize,
) -> Result<(), EncodeError> {
    let too_long = EncodeError::MessageTooLong {
        length: total,
        maximum: MAX_MESSAGE_LEN,
    };
    match u8::try_from(total) {
        Ok(short) => w.u8(short)?,
        Err(_) => {
            w.u8(LONG_LENGTH_MARKER)?;
            w.u16(u16::try_from(total).map_err(|_| too_long)?)?;
        }
    }
    w.u8(message.message_type().to_byte())?;
    match message {
        Message::Advertise {
            gateway_id,
            duration,
        } => {
            w.u8(*gateway_id)?;
            w.u16(*duration)
        }
        Message::SearchGw { radius } => w.u8(*radius),
        Message::GwInfo {
            gateway_id,
            gateway_address,
        } => {
            w.u8(*gateway_id)?;
            w.bytes(gateway_address)
        }
        Message::Connect(connect) => {
            let flags = Flags::new()
                .with_will(connect.will)
                .with_clean_session(connect.clean_session);
            w.u8(flags.to_byte())?;
            w.u8(PROTOCOL_ID)?;
            w.u16(connect.duration)?;
            w.bytes(connect.client_id.as_bytes())
        }
        Message::ConnAck { return_code }
        | Message::WillTopicResp { return_code }
        | Message::WillMsgResp { return_code } => w.u8(return_code.to_byte()),
        Message::WillTopicReq | Message::WillMsgReq | Message::PingResp => Ok(()),
        Message::WillTopic(will) | Message::WillTopicUpd(will) => match will {
            None => Ok(()),
            Some(WillTopic { qos, retain, topic }) => {
                w.u8(Flags::new().with_qos(*qos).with_retain(*retain).to_byte())?;
                w.bytes(topic.as_bytes())
            }
        },
        Message::WillMsg { will_message } | Message::WillMsgUpd { will_message } => {
            w.bytes(will_message)
        }
        Message::Register(register) => {
            w.u16(register.topic_id)?;
            w.u16(register.message_id)?;
            w.bytes(register.topic_name.as_bytes())
        }
        Message::RegAck {
            topic_id,
            message_id,
            return_code,
        }
        | Message::PubAck {
            topic_id,
            message_id,
            return_code,
        } => {
            w.u16(*topic_id)?;
            w.u16(*message_id)?;
            w.u8(return_code.to_byte())
        }
        Message::Publish(publish) => {
            let flags = Flags::new()
                .with_dup(publish.dup)
                .with_qos(publish.qos)
                .with_retain(publish.retain)
                .with_topic_id_type(publish.topic.id_type());
            w.u8(flags.to_byte())?;
            w.bytes(&publish.topic.to_bytes())?;
            w.u16(publish.message_id)?;
            w.bytes(publish.data)
        }
        Message::PubComp { message_id }
        | Message::PubRec { message_id }
        | Message::PubRel { message_id }
        | Message::UnsubAck { message_id } => w.u16(*message_id),
        Message::Subscribe(subscribe) => {
            let flags = Flags::new()
                .with_dup(subscribe.dup)
                .with_qos(subscribe.qos)
                .with_topic_id_type(subscribe.topic.id_type());
            w.u8(flags.to_byte())?;
            w.u16(subscribe.message_id)?;
            write_topic(w, &subscribe.topic)
        }
        Message::SubAck {
            qos,
            topic_id,
            message_id,
            return_code,
        } => {
            w.u8(Flags::new().with_qos(*qos).to_byte())?;
            w.u16(*topic_id)?;
            w.u16(*message_id)?;
            w.u8(return_code.to_byte())
        }
        Message::Unsubscribe(unsubscribe) => {
            w.u8(Flags::new()
                .with_topic_id_type(unsubscribe.topic.id_type())
                .to_byte())?;
            w.u16(unsubscribe.message_id)?;
            write_topic(w, &unsubscribe.topic)
        }
        Message::PingReq { client_id } => w.bytes(client_id.unwrap_or_default().as_bytes()),
        Message::Disconnect { duration } => match duration {
            Some(duration) => w.u16(*duration),
            None => Ok(()),
        },
        // `encode` writes encapsulations itself.
        Message::Encapsulated(_) => Err(EncodeError::NestedEncapsulation),
    }
}

fn write_topic(w: &mut Writer<'_>, topic: &Topic<'_>) -> Result<(), EncodeError> {
    match topic {
        Topic::Name(name) => w.bytes(name.as_bytes()),
        Topic::Predefined(id) => w.u16(*id),
        Topic::Short(name) => w.bytes(name),
    }
}

/// Writes into the caller's buffer; running out is an error, never a panic (the length is
/// checked up front, so it does not happen).
struct Writer<'b> {
    out: &'b mut [u8],
    position: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.position.saturating_add(bytes.len());
        let available = self.out.len();
        let slot = self
            .out
            .get_mut(self.position..end)
            .ok_or(EncodeError::BufferTooSmall {
                needed: end,
                available,
            })?;
        slot.copy_from_slice(bytes);
        self.position = end;
        Ok(())
    }

    fn u8(&mut self, value: u8) -> Result<(), EncodeError> {
        self.bytes(&[value])
    }

    fn u16(&mut self, value: u16) -> Result<(), EncodeError> {
        self.bytes(&value.to_be_bytes())
    }
}
