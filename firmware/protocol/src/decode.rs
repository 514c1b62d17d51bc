//! Decoding: bytes → [`Message`], borrowing from the input, never panicking.

use crate::error::{DecodeError, Field};
use crate::message::{
    Connect, Encapsulated, Message, Publish, Register, Subscribe, Unsubscribe, WillTopic,
};
use crate::types::{Flags, MessageType, ReturnCode, Topic, TopicId, TopicIdType};
use crate::{LONG_LENGTH_MARKER, MAX_WIRELESS_NODE_ID_LEN, PROTOCOL_ID};

/// Decodes the message at the start of `input`: the message and how many bytes it took.
///
/// Strings and payloads borrow from `input`. Bytes after the message are left alone (see
/// [`decode_exact`] for a buffer that must hold exactly one message). On a byte stream, an
/// [`DecodeError::Incomplete`] says how many bytes the message needs.
///
/// Lenient where the spec leaves room and nothing is lost: flag bits a message does not use
/// and the encapsulation's reserved Ctrl bits are ignored, and a 3-byte length field is
/// accepted for a message shorter than 256 bytes. Everything else that does not fit the
/// layout is an error: reserved message types and values, a length that disagrees with a
/// fixed layout, strings that are not UTF-8, a CONNECT protocol id other than 0x01, nested
/// encapsulation.
pub fn decode(input: &[u8]) -> Result<(Message<'_>, usize), DecodeError> {
    decode_message(input, true)
}

/// Decodes `input` as exactly one message (e.g. the payload of a frame or a datagram).
pub fn decode_exact(input: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (message, consumed) = decode(input)?;
    exact(message, consumed, input.len())
}

/// Decodes the message inside an encapsulation: exactly one message, not an encapsulation.
pub(crate) fn decode_inner(input: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (message, consumed) = decode_message(input, false)?;
    exact(message, consumed, input.len())
}

fn exact(
    message: Message<'_>,
    consumed: usize,
    available: usize,
) -> Result<Message<'_>, DecodeError> {
    if consumed == available {
        Ok(message)
    } else {
        Err(DecodeError::TrailingBytes {
            consumed,
            available,
        })
    }
}

/// The length field and the message type.
struct Header {
    /// 1 or 3.
    length_field: usize,
    /// The whole message (for an encapsulation: its header), length field included.
    length: usize,
    message_type: MessageType,
}

fn read_header(input: &[u8]) -> Result<Header, DecodeError> {
    let incomplete = |needed| DecodeError::Incomplete {
        needed,
        available: input.len(),
    };
    let (length_field, length) = match *input {
        [] => return Err(incomplete(2)),
        [LONG_LENGTH_MARKER, high, low, ..] => (3, usize::from(u16::from_be_bytes([high, low]))),
        [LONG_LENGTH_MARKER, ..] => return Err(incomplete(4)),
        [short, ..] => (1, usize::from(short)),
    };
    let minimum = length_field + 1;
    if length < minimum {
        return Err(DecodeError::InvalidLength { length, minimum });
    }
    if input.len() < length {
        return Err(incomplete(length));
    }
    let type_byte = input.get(length_field).copied().ok_or(incomplete(length))?;
    let message_type = MessageType::from_byte(type_byte)
        .ok_or(DecodeError::UnknownMessageType { value: type_byte })?;
    Ok(Header {
        length_field,
        length,
        message_type,
    })
}

fn decode_message(
    input: &[u8],
    allow_encapsulated: bool,
) -> Result<(Message<'_>, usize), DecodeError> {
    let header = read_header(input)?;
    let body_start = header.length_field + 1;
    let body = input
        .get(body_start..header.length)
        .ok_or(DecodeError::Incomplete {
            needed: header.length,
            available: input.len(),
        })?;
    let mut r = Reader {
        message: header.message_type,
        bytes: body,
        position: 0,
        offset: body_start,
    };
    let message = match header.message_type {
        MessageType::Advertise => {
            let gateway_id = r.u8(Field::GatewayId)?;
            let duration = r.u16(Field::Duration)?;
            r.finish()?;
            Message::Advertise {
                gateway_id,
                duration,
            }
        }
        MessageType::SearchGw => {
            let radius = r.u8(Field::Radius)?;
            r.finish()?;
            Message::SearchGw { radius }
        }
        MessageType::GwInfo => Message::GwInfo {
            gateway_id: r.u8(Field::GatewayId)?,
            gateway_address: r.rest(),
        },
        MessageType::Connect => {
            let flags = r.flags()?;
            let protocol_id = r.u8(Field::ProtocolId)?;
            if protocol_id != PROTOCOL_ID {
                return Err(DecodeError::InvalidProtocolId {
                    expected: PROTOCOL_ID,
                    found: protocol_id,
                });
            }
            let duration = r.u16(Field::Duration)?;
            Message::Connect(Connect {
                will: flags.will(),
                clean_session: flags.clean_session(),
                duration,
                client_id: r.rest_str(Field::ClientId)?,
            })
        }
        MessageType::ConnAck => Message::ConnAck {
            return_code: r.return_code_last()?,
        },
        MessageType::WillTopicReq => {
            r.finish()?;
            Message::WillTopicReq
        }
        MessageType::WillTopic => Message::WillTopic(r.will_topic()?),
        MessageType::WillMsgReq => {
            r.finish()?;
            Message::WillMsgReq
        }
        MessageType::WillMsg => Message::WillMsg {
            will_message: r.rest(),
        },
        MessageType::Register => Message::Register(Register {
            topic_id: r.u16(Field::TopicId)?,
            message_id: r.u16(Field::MessageId)?,
            topic_name: r.rest_str(Field::TopicName)?,
        }),
        MessageType::RegAck => Message::RegAck {
            topic_id: r.u16(Field::TopicId)?,
            message_id: r.u16(Field::MessageId)?,
            return_code: r.return_code_last()?,
        },
        MessageType::Publish => {
            let flags = r.flags()?;
            let id_type = topic_id_type(flags)?;
            let topic = TopicId::from_parts(id_type, r.array2(Field::TopicId)?);
            Message::Publish(Publish {
                dup: flags.dup(),
                qos: flags.qos(),
                retain: flags.retain(),
                topic,
                message_id: r.u16(Field::MessageId)?,
                data: r.rest(),
            })
        }
        MessageType::PubAck => Message::PubAck {
            topic_id: r.u16(Field::TopicId)?,
            message_id: r.u16(Field::MessageId)?,
            return_code: r.return_code_last()?,
        },
        MessageType::PubComp => Message::PubComp {
            message_id: r.message_id_last()?,
        },
        MessageType::PubRec => Message::PubRec {
            message_id: r.message_id_last()?,
        },
        MessageType::PubRel => Message::PubRel {
            message_id: r.message_id_last()?,
        },
        MessageType::Subscribe => {
            let flags = r.flags()?;
            let message_id = r.u16(Field::MessageId)?;
            Message::Subscribe(Subscribe {
                dup: flags.dup(),
                qos: flags.qos(),
                message_id,
                topic: r.topic(flags)?,
            })
        }
        MessageType::SubAck => {
            let flags = r.flags()?;
            Message::SubAck {
                qos: flags.qos(),
                topic_id: r.u16(Field::TopicId)?,
                message_id: r.u16(Field::MessageId)?,
                return_code: r.return_code_last()?,
            }
        }
        MessageType::Unsubscribe => {
            let flags = r.flags()?;
            let message_id = r.u16(Field::MessageId)?;
            Message::Unsubscribe(Unsubscribe {
                message_id,
                topic: r.topic(flags)?,
            })
        }
        MessageType::UnsubAck => Message::UnsubAck {
            message_id: r.message_id_last()?,
        },
        MessageType::PingReq => {
            let client_id = r.rest_str(Field::ClientId)?;
            Message::PingReq {
                client_id: (!client_id.is_empty()).then_some(client_id),
            }
        }
        MessageType::PingResp => {
            r.finish()?;
            Message::PingResp
        }
        MessageType::Disconnect => {
            let duration = if r.is_empty() {
                None
            } else {
                let duration = r.u16(Field::Duration)?;
                r.finish()?;
                Some(duration)
            };
            Message::Disconnect { duration }
        }
        MessageType::WillTopicUpd => Message::WillTopicUpd(r.will_topic()?),
        MessageType::WillTopicResp => Message::WillTopicResp {
            return_code: r.return_code_last()?,
        },
        MessageType::WillMsgUpd => Message::WillMsgUpd {
            will_message: r.rest(),
        },
        MessageType::WillMsgResp => Message::WillMsgResp {
            return_code: r.return_code_last()?,
        },
        MessageType::Encapsulated => {
            if !allow_encapsulated {
                return Err(DecodeError::NestedEncapsulation);
            }
            // The encapsulation's length field covers only its own header; the inner message
            // follows with its own length field.
            let control = r.u8(Field::Control)?;
            let wireless_node_id = r.rest();
            if wireless_node_id.len() > MAX_WIRELESS_NODE_ID_LEN {
                return Err(DecodeError::FieldTooLong {
                    field: Field::WirelessNodeId,
                    maximum: MAX_WIRELESS_NODE_ID_LEN,
                    found: wireless_node_id.len(),
                });
            }
            let rest = input.get(header.length..).unwrap_or_default();
            let (_, inner_length) = decode_message(rest, false).map_err(|error| match error {
                DecodeError::Incomplete { needed, available } => DecodeError::Incomplete {
                    needed: needed.saturating_add(header.length),
                    available: available.saturating_add(header.length),
                },
                other => other,
            })?;
            let message = rest.get(..inner_length).unwrap_or_default();
            let encapsulated = Encapsulated {
                radius: control & crate::MAX_RADIUS,
                wireless_node_id,
                message,
            };
            return Ok((
                Message::Encapsulated(encapsulated),
                header.length.saturating_add(inner_length),
            ));
        }
    };
    Ok((message, header.length))
}

fn topic_id_type(flags: Flags) -> Result<TopicIdType, DecodeError> {
    flags.topic_id_type().ok_or(DecodeError::ReservedValue {
        field: Field::TopicIdType,
        value: flags.to_byte() & 0b11,
    })
}

/// Reads the fields of one message body; errors name the message and the field.
struct Reader<'a> {
    message: MessageType,
    bytes: &'a [u8],
    position: usize,
    /// Bytes before the body (length field and message type), for whole-message lengths.
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: Field, count: usize) -> Result<&'a [u8], DecodeError> {
        let rest = self.bytes.get(self.position..).unwrap_or_default();
        let taken = rest.get(..count).ok_or(DecodeError::Truncated {
            message: self.message,
            field,
            needed: count,
            available: rest.len(),
        })?;
        self.position += count;
        Ok(taken)
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array2(field)?))
    }

    fn array2(&mut self, field: Field) -> Result<[u8; 2], DecodeError> {
        self.array(field)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(field, N)?;
        let mut array = [0; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn flags(&mut self) -> Result<Flags, DecodeError> {
        Ok(Flags::from_byte(self.u8(Field::Flags)?))
    }

    fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.position..).unwrap_or_default();
        self.position = self.bytes.len();
        rest
    }

    fn rest_str(&mut self, field: Field) -> Result<&'a str, DecodeError> {
        let bytes = self.rest();
        core::str::from_utf8(bytes).map_err(|error| DecodeError::InvalidUtf8 {
            field,
            valid_up_to: error.valid_up_to(),
        })
    }

    /// The message must end here.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingData {
                message: self.message,
                expected: self.offset + self.position,
                found: self.offset + self.bytes.len(),
            })
        }
    }

    /// A return code that ends the message.
    fn return_code_last(&mut self) -> Result<ReturnCode, DecodeError> {
        let value = self.u8(Field::ReturnCode)?;
        let code = ReturnCode::from_byte(value).ok_or(DecodeError::ReservedValue {
            field: Field::ReturnCode,
            value,
        })?;
        self.finish()?;
        Ok(code)
    }

    /// A message id that ends the message.
    fn message_id_last(&mut self) -> Result<u16, DecodeError> {
        let id = self.u16(Field::MessageId)?;
        self.finish()?;
        Ok(id)
    }

    /// The topic of SUBSCRIBE/UNSUBSCRIBE, which ends the message.
    fn topic(&mut self, flags: Flags) -> Result<Topic<'a>, DecodeError> {
        let topic = match topic_id_type(flags)? {
            TopicIdType::Normal => return Ok(Topic::Name(self.rest_str(Field::TopicName)?)),
            TopicIdType::Predefined => Topic::Predefined(self.u16(Field::TopicId)?),
            TopicIdType::Short => Topic::Short(self.array2(Field::TopicName)?),
        };
        self.finish()?;
        Ok(topic)
    }

    /// WILLTOPIC / WILLTOPICUPD: empty (delete the will) or flags and a topic.
    fn will_topic(&mut self) -> Result<Option<WillTopic<'a>>, DecodeError> {
        if self.is_empty() {
            return Ok(None);
        }
        let flags = self.flags()?;
        Ok(Some(WillTopic {
            qos: flags.qos(),
            retain: flags.retain(),
            topic: self.rest_str(Field::WillTopic)?,
        }))
    }
}
