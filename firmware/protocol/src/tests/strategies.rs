//! proptest strategies for every message type with arbitrary field values. Strings and
//! payloads are leaked so that messages can be `Message<'static>` (tests only).

use std::boxed::Box;
use std::string::String;
use std::vec::Vec;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::Union;

use crate::{
    Connect, Encapsulated, MAX_WIRELESS_NODE_ID_LEN, Message, Publish, QoS, Register, ReturnCode,
    Subscribe, Topic, TopicId, Unsubscribe, WillTopic, encode_to_vec,
};

fn leak_str(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

fn leak_bytes(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

/// Lengths: mostly short, sometimes past 255 so that the 3-byte length form is used.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..40, 1 => 240usize..700]
}

fn bytes() -> impl Strategy<Value = &'static [u8]> {
    length()
        .prop_flat_map(|len| vec(any::<u8>(), len))
        .prop_map(leak_bytes)
}

/// Any Unicode, control characters and all.
fn text() -> impl Strategy<Value = &'static str> {
    length()
        .prop_flat_map(|len| vec(any::<char>(), len / 4..=len / 2 + 1))
        .prop_map(|chars| leak_str(chars.into_iter().collect()))
}

fn qos() -> impl Strategy<Value = QoS> {
    (0u8..4).prop_map(QoS::from_bits)
}

fn return_code() -> impl Strategy<Value = ReturnCode> {
    prop_oneof![
        Just(ReturnCode::Accepted),
        Just(ReturnCode::Congestion),
        Just(ReturnCode::InvalidTopicId),
        Just(ReturnCode::NotSupported),
    ]
}

fn topic_id() -> impl Strategy<Value = TopicId> {
    prop_oneof![
        any::<u16>().prop_map(TopicId::Normal),
        any::<u16>().prop_map(TopicId::Predefined),
        any::<[u8; 2]>().prop_map(TopicId::Short),
    ]
}

fn topic() -> impl Strategy<Value = Topic<'static>> {
    prop_oneof![
        text().prop_map(Topic::Name),
        any::<u16>().prop_map(Topic::Predefined),
        any::<[u8; 2]>().prop_map(Topic::Short),
    ]
}

fn will_topic() -> impl Strategy<Value = Option<WillTopic<'static>>> {
    proptest::option::of(
        (qos(), any::<bool>(), text()).prop_map(|(qos, retain, topic)| WillTopic {
            qos,
            retain,
            topic,
        }),
    )
}

/// Every message type but the encapsulation.
pub(super) fn plain_message() -> BoxedStrategy<Message<'static>> {
    Union::new([
        (any::<u8>(), any::<u16>())
            .prop_map(|(gateway_id, duration)| Message::Advertise {
                gateway_id,
                duration,
            })
            .boxed(),
        any::<u8>()
            .prop_map(|radius| Message::SearchGw { radius })
            .boxed(),
        (any::<u8>(), bytes())
            .prop_map(|(gateway_id, gateway_address)| Message::GwInfo {
                gateway_id,
                gateway_address,
            })
            .boxed(),
        (any::<bool>(), any::<bool>(), any::<u16>(), text())
            .prop_map(|(will, clean_session, duration, client_id)| {
                Message::Connect(Connect {
                    will,
                    clean_session,
                    duration,
                    client_id,
                })
            })
            .boxed(),
        return_code()
            .prop_map(|return_code| Message::ConnAck { return_code })
            .boxed(),
        Just(Message::WillTopicReq).boxed(),
        will_topic().prop_map(Message::WillTopic).boxed(),
        Just(Message::WillMsgReq).boxed(),
        bytes()
            .prop_map(|will_message| Message::WillMsg { will_message })
            .boxed(),
        (any::<u16>(), any::<u16>(), text())
            .prop_map(|(topic_id, message_id, topic_name)| {
                Message::Register(Register {
                    topic_id,
                    message_id,
                    topic_name,
                })
            })
            .boxed(),
        (any::<u16>(), any::<u16>(), return_code())
            .prop_map(|(topic_id, message_id, return_code)| Message::RegAck {
                topic_id,
                message_id,
                return_code,
            })
            .boxed(),
        (
            any::<bool>(),
            qos(),
            any::<bool>(),
            topic_id(),
            any::<u16>(),
            bytes(),
        )
            .prop_map(|(dup, qos, retain, topic, message_id, data)| {
                Message::Publish(Publish {
                    dup,
                    qos,
                    retain,
                    topic,
                    message_id,
                    data,
                })
            })
            .boxed(),
        (any::<u16>(), any::<u16>(), return_code())
            .prop_map(|(topic_id, message_id, return_code)| Message::PubAck {
                topic_id,
                message_id,
                return_code,
            })
            .boxed(),
        any::<u16>()
            .prop_map(|message_id| Message::PubComp { message_id })
            .boxed(),
        any::<u16>()
            .prop_map(|message_id| Message::PubRec { message_id })
            .boxed(),
        any::<u16>()
            .prop_map(|message_id| Message::PubRel { message_id })
            .boxed(),
        (any::<bool>(), qos(), any::<u16>(), topic())
            .prop_map(|(dup, qos, message_id, topic)| {
                Message::Subscribe(Subscribe {
                    dup,
                    qos,
                    message_id,
                    topic,
                })
            })
            .boxed(),
        (qos(), any::<u16>(), any::<u16>(), return_code())
            .prop_map(|(qos, topic_id, message_id, return_code)| Message::SubAck {
                qos,
                topic_id,
                message_id,
                return_code,
            })
            .boxed(),
        (any::<u16>(), topic())
            .prop_map(|(message_id, topic)| Message::Unsubscribe(Unsubscribe { message_id, topic }))
            .boxed(),
        any::<u16>()
            .prop_map(|message_id| Message::UnsubAck { message_id })
            .boxed(),
        proptest::option::of(text().prop_filter("empty is None", |id| !id.is_empty()))
            .prop_map(|client_id| Message::PingReq { client_id })
            .boxed(),
        Just(Message::PingResp).boxed(),
        proptest::option::of(any::<u16>())
            .prop_map(|duration| Message::Disconnect { duration })
            .boxed(),
        will_topic().prop_map(Message::WillTopicUpd).boxed(),
        return_code()
            .prop_map(|return_code| Message::WillTopicResp { return_code })
            .boxed(),
        bytes()
            .prop_map(|will_message| Message::WillMsgUpd { will_message })
            .boxed(),
        return_code()
            .prop_map(|return_code| Message::WillMsgResp { return_code })
            .boxed(),
    ])
    .boxed()
}

/// Every message type, the encapsulation (around any other message) included.
pub(super) fn message() -> BoxedStrategy<Message<'static>> {
    let encapsulated = (
        0..=crate::MAX_RADIUS,
        vec(any::<u8>(), 0..=MAX_WIRELESS_NODE_ID_LEN),
        plain_message(),
    )
        .prop_map(|(radius, wireless_node_id, inner)| {
            let message = leak_bytes(encode_to_vec(&inner).expect("strategy makes valid messages"));
            Message::Encapsulated(Encapsulated {
                radius,
                wireless_node_id: leak_bytes(wireless_node_id),
                message,
            })
        });
    prop_oneof![8 => plain_message(), 1 => encapsulated].boxed()
}
