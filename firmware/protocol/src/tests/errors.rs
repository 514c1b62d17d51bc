//! Bad input: each decode and encode error, with its context.

use std::string::ToString;

use super::concat;
use crate::{
    DecodeError, Encapsulated, EncodeError, Field, Message, MessageType, Publish, QoS, TopicId,
    decode, decode_exact, encode, encode_encapsulated, encoded_len,
};

#[test]
fn empty_and_partial_input_is_incomplete() {
    assert_eq!(
        decode(&[]),
        Err(DecodeError::Incomplete {
            needed: 2,
            available: 0
        })
    );
    assert_eq!(
        decode(&[0x05, 0x00, 0x01]),
        Err(DecodeError::Incomplete {
            needed: 5,
            available: 3
        })
    );
    assert_eq!(
        decode(&[0x01, 0x01]),
        Err(DecodeError::Incomplete {
            needed: 4,
            available: 2
        })
    );
    assert_eq!(
        decode(&[0x01, 0x01, 0x35, 0x0C]),
        Err(DecodeError::Incomplete {
            needed: 309,
            available: 4
        })
    );
}

#[test]
fn length_below_the_header_is_invalid() {
    assert_eq!(
        decode(&[0x00, 0x17]),
        Err(DecodeError::InvalidLength {
            length: 0,
            minimum: 2
        })
    );
    assert_eq!(
        decode(&[0x01, 0x00, 0x03, 0x17]),
        Err(DecodeError::InvalidLength {
            length: 3,
            minimum: 4
        })
    );
}

#[test]
fn reserved_message_types_are_unknown() {
    for value in [0x03, 0x11, 0x19, 0x1E, 0x80, 0xFD, 0xFF] {
        assert_eq!(
            decode(&[0x02, value]),
            Err(DecodeError::UnknownMessageType { value })
        );
    }
}

#[test]
fn a_message_ending_inside_a_field_names_it() {
    // REGACK of length 5: topic id complete, message id missing.
    assert_eq!(
        decode(&[0x05, 0x0B, 0x00, 0x01, 0x00]),
        Err(DecodeError::Truncated {
            message: MessageType::RegAck,
            field: Field::MessageId,
            needed: 2,
            available: 1
        })
    );
    assert_eq!(
        decode(&[0x02, 0x05]),
        Err(DecodeError::Truncated {
            message: MessageType::ConnAck,
            field: Field::ReturnCode,
            needed: 1,
            available: 0
        })
    );
    // SUBSCRIBE with a predefined topic id cut to one byte.
    assert_eq!(
        decode(&[0x06, 0x12, 0x01, 0x00, 0x01, 0x00]),
        Err(DecodeError::Truncated {
            message: MessageType::Subscribe,
            field: Field::TopicId,
            needed: 2,
            available: 1
        })
    );
}

#[test]
fn a_fixed_layout_with_extra_bytes_says_expected_and_found() {
    assert_eq!(
        decode(&[0x05, 0x0E, 0x00, 0x01, 0xFF]),
        Err(DecodeError::TrailingData {
            message: MessageType::PubComp,
            expected: 4,
            found: 5
        })
    );
    assert_eq!(
        decode(&[0x03, 0x17, 0x00]),
        Err(DecodeError::TrailingData {
            message: MessageType::PingResp,
            expected: 2,
            found: 3
        })
    );
    // DISCONNECT: duration is 0 or 2 bytes, not 1 or 3.
    assert_eq!(
        decode(&[0x03, 0x18, 0x00]),
        Err(DecodeError::Truncated {
            message: MessageType::Disconnect,
            field: Field::Duration,
            needed: 2,
            available: 1
        })
    );
    assert_eq!(
        decode(&[0x05, 0x18, 0x00, 0x01, 0x02]),
        Err(DecodeError::TrailingData {
            message: MessageType::Disconnect,
            expected: 4,
            found: 5
        })
    );
    // SUBSCRIBE with a short topic name of three characters.
    assert_eq!(
        decode(&[0x08, 0x12, 0x02, 0x00, 0x01, b'a', b'b', b'c']),
        Err(DecodeError::TrailingData {
            message: MessageType::Subscribe,
            expected: 7,
            found: 8
        })
    );
}

#[test]
fn reserved_values_are_refused() {
    assert_eq!(
        decode(&[0x03, 0x05, 0x04]),
        Err(DecodeError::ReservedValue {
            field: Field::ReturnCode,
            value: 0x04
        })
    );
    // PUBLISH with TopicIdType 0b11.
    assert_eq!(
        decode(&[0x07, 0x0C, 0x03, 0x00, 0x01, 0x00, 0x00]),
        Err(DecodeError::ReservedValue {
            field: Field::TopicIdType,
            value: 0b11
        })
    );
    assert_eq!(
        decode(&[0x05, 0x14, 0x03, 0x00, 0x01]),
        Err(DecodeError::ReservedValue {
            field: Field::TopicIdType,
            value: 0b11
        })
    );
}

#[test]
fn connect_must_be_mqtt_sn_1_2() {
    assert_eq!(
        decode(&concat(&[&[0x07, 0x04, 0x04, 0x02, 0x00, 0x3C], b"n"])),
        Err(DecodeError::InvalidProtocolId {
            expected: 0x01,
            found: 0x02
        })
    );
}

#[test]
fn strings_must_be_utf8() {
    assert_eq!(
        decode(&[0x09, 0x04, 0x04, 0x01, 0x00, 0x3C, b'o', b'k', 0xFF]),
        Err(DecodeError::InvalidUtf8 {
            field: Field::ClientId,
            valid_up_to: 2
        })
    );
    assert_eq!(
        decode(&[0x07, 0x0A, 0x00, 0x00, 0x00, 0x01, 0xC3]),
        Err(DecodeError::InvalidUtf8 {
            field: Field::TopicName,
            valid_up_to: 0
        })
    );
}

#[test]
fn encapsulation_errors() {
    // An encapsulation inside an encapsulation.
    assert_eq!(
        decode(&[0x03, 0xFE, 0x00, 0x03, 0xFE, 0x00, 0x02, 0x17]),
        Err(DecodeError::NestedEncapsulation)
    );
    // The inner message is cut short: counted from the start of the input.
    assert_eq!(
        decode(&[0x04, 0xFE, 0x00, 0x09, 0x04, 0x0E]),
        Err(DecodeError::Incomplete {
            needed: 8,
            available: 6
        })
    );
    // No inner message at all.
    assert_eq!(
        decode(&[0x04, 0xFE, 0x00, 0x09]),
        Err(DecodeError::Incomplete {
            needed: 6,
            available: 4
        })
    );
    // The header is too short for the Ctrl byte.
    assert_eq!(
        decode(&[0x02, 0xFE, 0x02, 0x17]),
        Err(DecodeError::Truncated {
            message: MessageType::Encapsulated,
            field: Field::Control,
            needed: 1,
            available: 0
        })
    );
    // A wireless node id longer than a 1-byte length allows (3-byte length form).
    let mut bytes = std::vec![0x01, 0x01, 0x05, 0xFE, 0x00];
    bytes.resize(0x105, 0x77);
    bytes.extend_from_slice(&[0x02, 0x17]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::FieldTooLong {
            field: Field::WirelessNodeId,
            maximum: 252,
            found: 256
        })
    );
}

#[test]
fn decode_exact_refuses_trailing_bytes() {
    assert_eq!(
        decode_exact(&[0x02, 0x17, 0x00]),
        Err(DecodeError::TrailingBytes {
            consumed: 2,
            available: 3
        })
    );
}

#[test]
fn encode_into_a_short_buffer_fails_without_writing_past_it() {
    let mut out = [0u8; 4];
    assert_eq!(
        encode(
            &Message::PubAck {
                topic_id: 1,
                message_id: 2,
                return_code: crate::ReturnCode::Accepted
            },
            &mut out
        ),
        Err(EncodeError::BufferTooSmall {
            needed: 7,
            available: 4
        })
    );
    assert_eq!(
        encode_encapsulated(0, b"id", &Message::PingResp, &mut out),
        Err(EncodeError::BufferTooSmall {
            needed: 7,
            available: 4
        })
    );
}

#[test]
fn encode_refuses_what_would_not_round_trip() {
    assert_eq!(
        encoded_len(&Message::PingReq {
            client_id: Some("")
        }),
        Err(EncodeError::EmptyOptionalField {
            field: Field::ClientId
        })
    );
    let data = std::vec![0u8; 65_530];
    assert_eq!(
        encoded_len(&Message::Publish(Publish {
            dup: false,
            qos: QoS::Zero,
            retain: false,
            topic: TopicId::Normal(1),
            message_id: 0,
            data: &data,
        })),
        Err(EncodeError::MessageTooLong {
            length: 65_539,
            maximum: 65_535
        })
    );
    let encapsulated = |radius, wireless_node_id, message| {
        Message::Encapsulated(Encapsulated {
            radius,
            wireless_node_id,
            message,
        })
    };
    assert_eq!(
        encoded_len(&encapsulated(4, &[], &[0x02, 0x17])),
        Err(EncodeError::ValueOutOfRange {
            field: Field::Radius,
            value: 4,
            maximum: 3
        })
    );
    assert_eq!(
        encoded_len(&encapsulated(0, &[0; 253], &[0x02, 0x17])),
        Err(EncodeError::FieldTooLong {
            field: Field::WirelessNodeId,
            maximum: 252,
            found: 253
        })
    );
    assert_eq!(
        encoded_len(&encapsulated(0, &[], &[0x02, 0x17, 0x00])),
        Err(EncodeError::InvalidEncapsulatedMessage(
            DecodeError::TrailingBytes {
                consumed: 2,
                available: 3
            }
        ))
    );
    assert_eq!(
        encoded_len(&encapsulated(0, &[], &[0x03, 0xFE, 0x00, 0x02, 0x17])),
        Err(EncodeError::NestedEncapsulation)
    );
    let inner = encapsulated(0, &[], &[0x02, 0x17]);
    assert_eq!(
        encode_encapsulated(0, &[], &inner, &mut [0; 32]),
        Err(EncodeError::NestedEncapsulation)
    );
}

#[test]
fn errors_display_their_context() {
    let error = DecodeError::Truncated {
        message: MessageType::RegAck,
        field: Field::MessageId,
        needed: 2,
        available: 1,
    };
    assert_eq!(
        error.to_string(),
        "REGACK: message ends inside the message id (needs 2 bytes, 1 left)"
    );
    let error =
        EncodeError::InvalidEncapsulatedMessage(DecodeError::UnknownMessageType { value: 0x03 });
    assert_eq!(
        error.to_string(),
        "encapsulated message is not one valid message: unknown (reserved) message type 0x03"
    );
    assert!(core::error::Error::source(&error).is_some());
}
