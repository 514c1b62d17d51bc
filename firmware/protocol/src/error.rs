//! Errors of the codec and the framing. Hand-written `Display` and `core::error::Error`
//! impls: the crate is `no_std` and has no dependencies (thiserror needs std).

use core::fmt;

use crate::types::MessageType;

/// A field of an MQTT-SN message (or of the encapsulation), named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Length,
    MessageType,
    Flags,
    TopicIdType,
    ProtocolId,
    Duration,
    GatewayId,
    GatewayAddress,
    Radius,
    ClientId,
    ReturnCode,
    TopicId,
    MessageId,
    TopicName,
    WillTopic,
    WillMessage,
    Data,
    /// The Ctrl byte of the encapsulation.
    Control,
    WirelessNodeId,
    /// The message inside an encapsulation.
    EncapsulatedMessage,
}

impl Field {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::MessageType => "message type",
            Self::Flags => "flags",
            Self::TopicIdType => "topic id type",
            Self::ProtocolId => "protocol id",
            Self::Duration => "duration",
            Self::GatewayId => "gateway id",
            Self::GatewayAddress => "gateway address",
            Self::Radius => "radius",
            Self::ClientId => "client id",
            Self::ReturnCode => "return code",
            Self::TopicId => "topic id",
            Self::MessageId => "message id",
            Self::TopicName => "topic name",
            Self::WillTopic => "will topic",
            Self::WillMessage => "will message",
            Self::Data => "data",
            Self::Control => "control byte",
            Self::WirelessNodeId => "wireless node id",
            Self::EncapsulatedMessage => "encapsulated message",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes are not an MQTT-SN message. Lengths count whole-message bytes unless the variant
/// says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeError {
    /// The input ends before the message does: the length field (or, before it is complete,
    /// the header) needs `needed` bytes and the input has `available`. On a byte stream, wait
    /// for more; in a frame, the frame is cut short.
    Incomplete { needed: usize, available: usize },
    /// The length field holds `length`, less than the `minimum` its own form and a message
    /// type need.
    InvalidLength { length: usize, minimum: usize },
    /// A reserved MsgType byte.
    UnknownMessageType { value: u8 },
    /// The message ends inside `field`, which needs `needed` more bytes with `available` left.
    Truncated {
        message: MessageType,
        field: Field,
        needed: usize,
        available: usize,
    },
    /// The message is longer than its layout: `expected` bytes, the length field says `found`.
    TrailingData {
        message: MessageType,
        expected: usize,
        found: usize,
    },
    /// `field` holds a value the spec reserves (a return code ≥ 0x04, topic id type 0b11).
    ReservedValue { field: Field, value: u8 },
    /// CONNECT's protocol id is not 0x01 (MQTT-SN 1.2).
    InvalidProtocolId { expected: u8, found: u8 },
    /// `field` is a string and is not UTF-8 (the first `valid_up_to` bytes are).
    InvalidUtf8 { field: Field, valid_up_to: usize },
    /// `field` is longer than the format allows.
    FieldTooLong {
        field: Field,
        maximum: usize,
        found: usize,
    },
    /// An encapsulated message that is itself an encapsulation (not allowed: bounds recursion).
    NestedEncapsulation,
    /// [`decode_exact`](crate::decode_exact): the message is `consumed` bytes and the input
    /// `available`.
    TrailingBytes { consumed: usize, available: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Incomplete { needed, available } => write!(
                f,
                "incomplete message: needs {needed} bytes, input has {available}"
            ),
            Self::InvalidLength { length, minimum } => write!(
                f,
                "invalid length field {length}: at least {minimum} expected"
            ),
            Self::UnknownMessageType { value } => {
                write!(f, "unknown (reserved) message type 0x{value:02X}")
            }
            Self::Truncated {
                message,
                field,
                needed,
                available,
            } => write!(
                f,
                "{message}: message ends inside the {field} (needs {needed} bytes, {available} left)"
            ),
            Self::TrailingData {
                message,
                expected,
                found,
            } => write!(
                f,
                "{message}: length {found} where the layout has {expected} bytes"
            ),
            Self::ReservedValue { field, value } => {
                write!(f, "reserved {field} value 0x{value:02X}")
            }
            Self::InvalidProtocolId { expected, found } => write!(
                f,
                "protocol id 0x{found:02X}, expected 0x{expected:02X} (MQTT-SN 1.2)"
            ),
            Self::InvalidUtf8 { field, valid_up_to } => write!(
                f,
                "{field} is not UTF-8 (invalid after {valid_up_to} bytes)"
            ),
            Self::FieldTooLong {
                field,
                maximum,
                found,
            } => write!(f, "{field} is {found} bytes, at most {maximum} allowed"),
            Self::NestedEncapsulation => {
                f.write_str("an encapsulated message encapsulates another (nesting not allowed)")
            }
            Self::TrailingBytes {
                consumed,
                available,
            } => write!(
                f,
                "{} bytes after the message ({consumed} of {available} used)",
                available.saturating_sub(consumed)
            ),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message (or frame) cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncodeError {
    /// The output buffer holds `available` bytes; the encoding needs `needed`.
    BufferTooSmall { needed: usize, available: usize },
    /// The message would be `length` bytes; the length field holds at most `maximum`.
    MessageTooLong { length: usize, maximum: usize },
    /// An optional field given as present but empty, which the wire cannot tell from absent
    /// (PINGREQ's client id).
    EmptyOptionalField { field: Field },
    /// `field` holds `value`, more than `maximum` (the encapsulation's radius).
    ValueOutOfRange {
        field: Field,
        value: u8,
        maximum: u8,
    },
    /// `field` is `found` bytes, more than the format allows.
    FieldTooLong {
        field: Field,
        maximum: usize,
        found: usize,
    },
    /// An encapsulation's `message` bytes are not exactly one message.
    InvalidEncapsulatedMessage(DecodeError),
    /// An encapsulation around an encapsulation.
    NestedEncapsulation,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BufferTooSmall { needed, available } => write!(
                f,
                "output buffer too small: needs {needed} bytes, has {available}"
            ),
            Self::MessageTooLong { length, maximum } => write!(
                f,
                "message would be {length} bytes, at most {maximum} can be encoded"
            ),
            Self::EmptyOptionalField { field } => write!(
                f,
                "{field} is present but empty, which encodes the same as absent: use None"
            ),
            Self::ValueOutOfRange {
                field,
                value,
                maximum,
            } => write!(f, "{field} {value} is out of range (at most {maximum})"),
            Self::FieldTooLong {
                field,
                maximum,
                found,
            } => write!(f, "{field} is {found} bytes, at most {maximum} allowed"),
            Self::InvalidEncapsulatedMessage(error) => {
                write!(f, "encapsulated message is not one valid message: {error}")
            }
            Self::NestedEncapsulation => {
                f.write_str("cannot encapsulate an encapsulated message (nesting not allowed)")
            }
        }
    }
}

impl core::error::Error for EncodeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::InvalidEncapsulatedMessage(error) => Some(error),
            _ => None,
        }
    }
}

/// Why a received frame was dropped. After any of these the decoder is in sync again at the
/// next delimiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// The frame decodes to more than `capacity` bytes (message + CRC). Reported as soon as
    /// the buffer overflows; the rest of the frame, up to the next delimiter, is skipped.
    Oversize { capacity: usize },
    /// The delimiter came `missing` bytes before the last COBS block ended (noise, a lost
    /// byte, or a frame whose start was lost).
    TruncatedCobsBlock { missing: usize },
    /// The frame decodes to `length` bytes, fewer than the `minimum` (the CRC alone).
    TooShort { length: usize, minimum: usize },
    /// The CRC-16 computed over the message differs from the one received.
    CrcMismatch { computed: u16, received: u16 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Oversize { capacity } => write!(
                f,
                "frame longer than the receive buffer ({capacity} bytes incl. CRC)"
            ),
            Self::TruncatedCobsBlock { missing } => write!(
                f,
                "invalid COBS: frame ended {missing} bytes before its last block"
            ),
            Self::TooShort { length, minimum } => write!(
                f,
                "frame of {length} bytes, at least {minimum} expected (the CRC)"
            ),
            Self::CrcMismatch { computed, received } => write!(
                f,
                "CRC mismatch: computed 0x{computed:04X}, received 0x{received:04X}"
            ),
        }
    }
}

impl core::error::Error for FrameError {}
