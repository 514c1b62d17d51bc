//! One known byte vector (or more) per message type, following the layouts of spec §5.4:
//! `Length | MsgType | fields…`, big-endian 16-bit fields.

use std::vec;

use super::{assert_vector, concat};
use crate::{
    Connect, Encapsulated, Message, Publish, QoS, Register, ReturnCode, Subscribe, Topic, TopicId,
    Unsubscribe, WillTopic, decode, encode_encapsulated,
};

#[test]
fn advertise() {
    // GwId 1, Duration 900 s.
    assert_vector(
        &[0x05, 0x00, 0x01, 0x03, 0x84],
        Message::Advertise {
            gateway_id: 1,
            duration: 900,
        },
    );
}

#[test]
fn searchgw() {
    assert_vector(&[0x03, 0x01, 0x02], Message::SearchGw { radius: 2 });
}

#[test]
fn gwinfo_from_a_gateway_has_no_address() {
    assert_vector(
        &[0x03, 0x02, 0x07],
        Message::GwInfo {
            gateway_id: 7,
            gateway_address: &[],
        },
    );
}

#[test]
fn gwinfo_from_a_client_carries_the_gateway_address() {
    assert_vector(
        &[0x07, 0x02, 0x07, 0xC0, 0xA8, 0x01, 0x02],
        Message::GwInfo {
            gateway_id: 7,
            gateway_address: &[0xC0, 0xA8, 0x01, 0x02],
        },
    );
}

#[test]
fn connect() {
    // Flags: CleanSession; ProtocolId 0x01; Duration 60 s; ClientId "node-1".
    assert_vector(
        &concat(&[&[0x0C, 0x04, 0x04, 0x01, 0x00, 0x3C], b"node-1"]),
        Message::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 60,
            client_id: "node-1",
        }),
    );
    // Flags: Will + CleanSession.
    assert_vector(
        &concat(&[&[0x07, 0x04, 0x0C, 0x01, 0xFF, 0xFF], b"n"]),
        Message::Connect(Connect {
            will: true,
            clean_session: true,
            duration: 0xFFFF,
            client_id: "n",
        }),
    );
}

#[test]
fn connack() {
    assert_vector(
        &[0x03, 0x05, 0x00],
        Message::ConnAck {
            return_code: ReturnCode::Accepted,
        },
    );
    assert_vector(
        &[0x03, 0x05, 0x01],
        Message::ConnAck {
            return_code: ReturnCode::Congestion,
        },
    );
}

#[test]
fn willtopicreq() {
    assert_vector(&[0x02, 0x06], Message::WillTopicReq);
}

#[test]
fn willtopic() {
    // Flags: QoS 1 (0b01 << 5), Retain.
    assert_vector(
        &concat(&[&[0x09, 0x07, 0x30], b"will/t"]),
        Message::WillTopic(Some(WillTopic {
            qos: QoS::One,
            retain: true,
            topic: "will/t",
        })),
    );
}

#[test]
fn empty_willtopic_deletes_the_will() {
    assert_vector(&[0x02, 0x07], Message::WillTopic(None));
}

#[test]
fn willmsgreq() {
    assert_vector(&[0x02, 0x08], Message::WillMsgReq);
}

#[test]
fn willmsg() {
    assert_vector(
        &concat(&[&[0x05, 0x09], b"bye"]),
        Message::WillMsg {
            will_message: b"bye",
        },
    );
}

#[test]
fn register() {
    // TopicId 0 (a client asks for one), MsgId 1.
    assert_vector(
        &concat(&[&[0x15, 0x0A, 0x00, 0x00, 0x00, 0x01], b"sensors/n1/temp"]),
        Message::Register(Register {
            topic_id: 0,
            message_id: 1,
            topic_name: "sensors/n1/temp",
        }),
    );
}

#[test]
fn regack() {
    assert_vector(
        &[0x07, 0x0B, 0x00, 0x05, 0x00, 0x01, 0x00],
        Message::RegAck {
            topic_id: 5,
            message_id: 1,
            return_code: ReturnCode::Accepted,
        },
    );
}

#[test]
fn publish_normal_topic_qos1() {
    // Flags: QoS 1, TopicIdType normal; TopicId 5; MsgId 2.
    assert_vector(
        &concat(&[&[0x0B, 0x0C, 0x20, 0x00, 0x05, 0x00, 0x02], b"21.5"]),
        Message::Publish(Publish {
            dup: false,
            qos: QoS::One,
            retain: false,
            topic: TopicId::Normal(5),
            message_id: 2,
            data: b"21.5",
        }),
    );
}

#[test]
fn publish_qos_minus_one_predefined_topic() {
    // Flags: QoS −1 (0b11 << 5), TopicIdType predefined (0b01).
    assert_vector(
        &[0x08, 0x0C, 0x61, 0x00, 0x01, 0x00, 0x00, 0x2A],
        Message::Publish(Publish {
            dup: false,
            qos: QoS::MinusOne,
            retain: false,
            topic: TopicId::Predefined(1),
            message_id: 0,
            data: &[0x2A],
        }),
    );
}

#[test]
fn publish_short_topic_dup_retain_qos2() {
    // Flags: DUP, QoS 2, Retain, TopicIdType short (0b10): 0x80 | 0x40 | 0x10 | 0x02.
    assert_vector(
        &[0x07, 0x0C, 0xD2, b't', b'1', 0x12, 0x34],
        Message::Publish(Publish {
            dup: true,
            qos: QoS::Two,
            retain: true,
            topic: TopicId::Short(*b"t1"),
            message_id: 0x1234,
            data: &[],
        }),
    );
}

#[test]
fn long_publish_uses_the_three_byte_length() {
    // 300 bytes of data: 306 bytes after the length field, so 0x01 + 2-byte length 309.
    let data = vec![0x5A; 300];
    let bytes = concat(&[
        &[0x01, 0x01, 0x35, 0x0C, 0x00, 0x00, 0x05, 0x00, 0x00],
        &data,
    ]);
    assert_eq!(bytes.len(), 309);
    assert_vector(
        &bytes,
        Message::Publish(Publish {
            dup: false,
            qos: QoS::Zero,
            retain: false,
            topic: TopicId::Normal(5),
            message_id: 0,
            data: &data,
        }),
    );
}

#[test]
fn length_form_switches_at_256_bytes() {
    // 248 bytes of data: 254 after the length field, 255 in all: the last 1-byte length.
    let data = vec![1; 248];
    let publish = |data| {
        Message::Publish(Publish {
            dup: false,
            qos: QoS::Zero,
            retain: false,
            topic: TopicId::Normal(1),
            message_id: 0,
            data,
        })
    };
    assert_vector(
        &concat(&[&[0xFF, 0x0C, 0, 0, 1, 0, 0], &data]),
        publish(&data),
    );
    // One more byte: 256 would not fit one byte, so 3 + 255 = 258.
    let data = vec![1; 249];
    assert_vector(
        &concat(&[&[0x01, 0x01, 0x02, 0x0C, 0, 0, 1, 0, 0], &data]),
        publish(&data),
    );
}

#[test]
fn three_byte_length_for_a_short_message_is_accepted() {
    // Not canonical (the encoder would use one byte) but unambiguous.
    let (message, consumed) = decode(&[0x01, 0x00, 0x04, 0x17]).unwrap();
    assert_eq!((message, consumed), (Message::PingResp, 4));
}

#[test]
fn puback() {
    assert_vector(
        &[0x07, 0x0D, 0x00, 0x05, 0x00, 0x02, 0x02],
        Message::PubAck {
            topic_id: 5,
            message_id: 2,
            return_code: ReturnCode::InvalidTopicId,
        },
    );
}

#[test]
fn pubcomp_pubrec_pubrel() {
    assert_vector(
        &[0x04, 0x0E, 0x12, 0x34],
        Message::PubComp { message_id: 0x1234 },
    );
    assert_vector(
        &[0x04, 0x0F, 0x12, 0x34],
        Message::PubRec { message_id: 0x1234 },
    );
    assert_vector(
        &[0x04, 0x10, 0x12, 0x34],
        Message::PubRel { message_id: 0x1234 },
    );
}

#[test]
fn subscribe_topic_name() {
    // Flags: QoS 1, TopicIdType normal (a name, here with a wildcard); MsgId 3.
    assert_vector(
        &concat(&[&[0x12, 0x12, 0x20, 0x00, 0x03], b"control/+/led"]),
        Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::One,
            message_id: 3,
            topic: Topic::Name("control/+/led"),
        }),
    );
}

#[test]
fn subscribe_predefined_and_short() {
    assert_vector(
        &[0x07, 0x12, 0xC1, 0x00, 0x03, 0x00, 0x09],
        Message::Subscribe(Subscribe {
            dup: true,
            qos: QoS::Two,
            message_id: 3,
            topic: Topic::Predefined(9),
        }),
    );
    assert_vector(
        &[0x07, 0x12, 0x02, 0x00, 0x03, b'a', b'b'],
        Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::Zero,
            message_id: 3,
            topic: Topic::Short(*b"ab"),
        }),
    );
}

#[test]
fn suback() {
    // Flags: granted QoS 1.
    assert_vector(
        &[0x08, 0x13, 0x20, 0x00, 0x07, 0x00, 0x03, 0x00],
        Message::SubAck {
            qos: QoS::One,
            topic_id: 7,
            message_id: 3,
            return_code: ReturnCode::Accepted,
        },
    );
}

#[test]
fn unsubscribe() {
    assert_vector(
        &concat(&[&[0x0A, 0x14, 0x00, 0x00, 0x04], b"a/b/c"]),
        Message::Unsubscribe(Unsubscribe {
            message_id: 4,
            topic: Topic::Name("a/b/c"),
        }),
    );
    assert_vector(
        &[0x07, 0x14, 0x01, 0x00, 0x04, 0x00, 0x01],
        Message::Unsubscribe(Unsubscribe {
            message_id: 4,
            topic: Topic::Predefined(1),
        }),
    );
    assert_vector(
        &[0x07, 0x14, 0x02, 0x00, 0x04, b'x', b'y'],
        Message::Unsubscribe(Unsubscribe {
            message_id: 4,
            topic: Topic::Short(*b"xy"),
        }),
    );
}

#[test]
fn unsuback() {
    assert_vector(
        &[0x04, 0x15, 0x00, 0x04],
        Message::UnsubAck { message_id: 4 },
    );
}

#[test]
fn pingreq() {
    assert_vector(&[0x02, 0x16], Message::PingReq { client_id: None });
}

#[test]
fn pingreq_of_a_waking_client_carries_its_id() {
    assert_vector(
        &concat(&[&[0x08, 0x16], b"node-1"]),
        Message::PingReq {
            client_id: Some("node-1"),
        },
    );
}

#[test]
fn pingresp() {
    assert_vector(&[0x02, 0x17], Message::PingResp);
}

#[test]
fn disconnect() {
    assert_vector(&[0x02, 0x18], Message::Disconnect { duration: None });
}

#[test]
fn disconnect_to_sleep_carries_a_duration() {
    assert_vector(
        &[0x04, 0x18, 0x0E, 0x10],
        Message::Disconnect {
            duration: Some(3600),
        },
    );
}

#[test]
fn willtopicupd() {
    // Flags: QoS 2.
    assert_vector(
        &concat(&[&[0x06, 0x1A, 0x40], b"w/t"]),
        Message::WillTopicUpd(Some(WillTopic {
            qos: QoS::Two,
            retain: false,
            topic: "w/t",
        })),
    );
    assert_vector(&[0x02, 0x1A], Message::WillTopicUpd(None));
}

#[test]
fn willtopicresp() {
    assert_vector(
        &[0x03, 0x1B, 0x00],
        Message::WillTopicResp {
            return_code: ReturnCode::Accepted,
        },
    );
}

#[test]
fn willmsgupd() {
    assert_vector(
        &concat(&[&[0x06, 0x1C], b"gone"]),
        Message::WillMsgUpd {
            will_message: b"gone",
        },
    );
}

#[test]
fn willmsgresp() {
    assert_vector(
        &[0x03, 0x1D, 0x03],
        Message::WillMsgResp {
            return_code: ReturnCode::NotSupported,
        },
    );
}

#[test]
fn encapsulated() {
    // Length 5 covers Length, MsgType 0xFE, Ctrl (radius 1) and the 2-byte node id; the
    // inner PINGREQ follows with its own length.
    let bytes = [0x05, 0xFE, 0x01, 0xAB, 0xCD, 0x02, 0x16];
    let message = Message::Encapsulated(Encapsulated {
        radius: 1,
        wireless_node_id: &[0xAB, 0xCD],
        message: &[0x02, 0x16],
    });
    assert_vector(&bytes, message);
    let Message::Encapsulated(encapsulated) = message else {
        unreachable!()
    };
    assert_eq!(
        encapsulated.decode_message(),
        Ok(Message::PingReq { client_id: None })
    );

    let mut out = [0; 16];
    let n = encode_encapsulated(
        1,
        &[0xAB, 0xCD],
        &Message::PingReq { client_id: None },
        &mut out,
    );
    assert_eq!(n, Ok(bytes.len()));
    assert_eq!(&out[..bytes.len()], &bytes);
}

#[test]
fn encapsulated_ignores_reserved_control_bits() {
    let (message, _) = decode(&[0x03, 0xFE, 0xFE, 0x02, 0x17]).unwrap();
    assert_eq!(
        message,
        Message::Encapsulated(Encapsulated {
            radius: 2,
            wireless_node_id: &[],
            message: &[0x02, 0x17],
        })
    );
}

#[test]
fn decode_leaves_following_bytes_alone() {
    let bytes = [0x02, 0x17, 0x02, 0x16];
    assert_eq!(decode(&bytes), Ok((Message::PingResp, 2)));
    assert_eq!(
        decode(&bytes[2..]),
        Ok((Message::PingReq { client_id: None }, 2))
    );
}

#[test]
fn unused_flag_bits_are_ignored_on_decode_and_zero_on_encode() {
    // CONNECT with DUP, QoS and Retain set (not used by CONNECT).
    let bytes = concat(&[&[0x07, 0x04, 0xF4, 0x01, 0x00, 0x0A], b"n"]);
    let (message, _) = decode(&bytes).unwrap();
    assert_eq!(
        message,
        Message::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 10,
            client_id: "n",
        })
    );
    let mut out = [0; 16];
    let n = crate::encode(&message, &mut out).unwrap();
    assert_eq!(out[2], 0x04);
    assert_eq!(n, bytes.len());
}
