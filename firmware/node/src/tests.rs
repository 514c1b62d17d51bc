//! The node against a scripted gateway: what it sends, in what order, and what it does with
//! each answer.

use std::{vec, vec::Vec};

use edgegw_protocol::{
    FrameDecoder, Message, Publish, QoS, Register, ReturnCode, TopicId, decode_exact,
    encode_frame_to_vec, encode_to_vec,
};

use super::*;

/// The node and what it wrote, split into message bytes.
struct Harness {
    node: Node,
    wire: Vec<u8>,
    leds: Vec<Led>,
    temperature: f32,
}

impl Harness {
    fn new() -> Self {
        let node = Node::new(Settings {
            client_id: "n1",
            keepalive_s: 10,
            interval_ms: 1000,
        })
        .unwrap();
        Self {
            node,
            wire: Vec::new(),
            leds: Vec::new(),
            temperature: 21.5,
        }
    }

    fn poll(&mut self, now: u64) -> u64 {
        let wire = &mut self.wire;
        let celsius = self.temperature;
        self.node
            .poll(now, &mut || celsius, &mut |f| wire.extend_from_slice(f))
            .unwrap()
    }

    fn feed_bytes(&mut self, bytes: &[u8], now: u64) {
        let wire = &mut self.wire;
        let leds = &mut self.leds;
        self.node
            .receive(bytes, now, &mut |f| wire.extend_from_slice(f), &mut |l| {
                leds.push(l)
            })
            .unwrap();
    }

    fn feed(&mut self, message: &Message<'_>, now: u64) {
        let frame = encode_frame_to_vec(&encode_to_vec(message).unwrap());
        self.feed_bytes(&frame, now);
    }

    /// The messages written since the last call, as encoded bytes.
    fn sent(&mut self) -> Vec<Vec<u8>> {
        let mut decoder = FrameDecoder::<512>::new();
        let mut out = Vec::new();
        let mut frames = decoder.feed(&self.wire);
        while let Some(frame) = frames.next_frame() {
            out.push(frame.expect("the node writes good frames").to_vec());
        }
        self.wire.clear();
        out
    }

    /// The one message written since the last call.
    fn sent_one(&mut self) -> Vec<u8> {
        let mut sent = self.sent();
        assert_eq!(sent.len(), 1, "expected one message, got {sent:?}");
        sent.remove(0)
    }

    /// Connects, registers and subscribes: sensor topic id 5, control topic id 7.
    fn running(now: u64) -> Self {
        let mut h = Self::new();
        h.poll(now);
        h.sent();
        h.feed(
            &Message::ConnAck {
                return_code: ReturnCode::Accepted,
            },
            now,
        );
        h.poll(now);
        let bytes = h.sent_one();
        let Message::Register(register) = decode_exact(&bytes).unwrap() else {
            panic!("REGISTER expected")
        };
        h.feed(
            &Message::RegAck {
                topic_id: 5,
                message_id: register.message_id,
                return_code: ReturnCode::Accepted,
            },
            now,
        );
        h.poll(now);
        let bytes = h.sent_one();
        let Message::Subscribe(subscribe) = decode_exact(&bytes).unwrap() else {
            panic!("SUBSCRIBE expected")
        };
        h.feed(
            &Message::SubAck {
                qos: QoS::One,
                topic_id: 7,
                message_id: subscribe.message_id,
                return_code: ReturnCode::Accepted,
            },
            now,
        );
        assert_eq!(h.node.state(), State::Running);
        h
    }
}

fn publish(topic_id: u16, qos: QoS, message_id: u16, data: &[u8]) -> Message<'_> {
    Message::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicId::Normal(topic_id),
        message_id,
        data,
    })
}

#[test]
fn connects_registers_subscribes_then_publishes_readings() {
    let mut h = Harness::new();
    h.poll(0);
    assert_eq!(h.wire.first(), Some(&DELIMITER), "a delimiter goes first");
    let connect = h.sent_one();
    assert_eq!(
        decode_exact(&connect).unwrap(),
        Message::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 10,
            client_id: "n1"
        })
    );
    h.feed(
        &Message::ConnAck {
            return_code: ReturnCode::Accepted,
        },
        10,
    );
    h.poll(10);
    let register = h.sent_one();
    let Message::Register(Register {
        topic_id: 0,
        topic_name,
        message_id,
    }) = decode_exact(&register).unwrap()
    else {
        panic!("REGISTER expected")
    };
    assert_eq!(topic_name, "sensors/n1/temp");
    // A REGACK for another request changes nothing.
    h.feed(
        &Message::RegAck {
            topic_id: 9,
            message_id: message_id.wrapping_add(1),
            return_code: ReturnCode::Accepted,
        },
        20,
    );
    assert_eq!(h.node.state(), State::Registering);

    let mut h = Harness::running(0);
    let next = h.poll(0);
    let reading = h.sent_one();
    assert_eq!(
        decode_exact(&reading).unwrap(),
        publish(5, QoS::Zero, 0, b"{\"temp\": 21.5}")
    );
    assert_eq!(next, 1000, "the next reading is one interval later");
    assert!(h.poll(500) <= 1000);
    assert!(h.sent().is_empty(), "nothing due before the interval");
    h.temperature = -3.25;
    h.poll(1000);
    let bytes = h.sent_one();
    let Message::Publish(p) = decode_exact(&bytes).unwrap() else {
        panic!("PUBLISH expected")
    };
    assert_eq!(p.data, b"{\"temp\": -3.2}");
    h.temperature = f32::NAN;
    h.poll(2000);
    assert!(h.sent().is_empty(), "a NaN reading is skipped");
    assert_eq!(h.node.stats().readings, 2);
}

#[test]
fn unanswered_requests_are_repeated_and_a_silent_gateway_restarts_the_node() {
    let mut h = Harness::new();
    h.poll(0);
    assert_eq!(h.sent().len(), 1);
    h.poll(RETRY_MS - 1);
    assert!(h.sent().is_empty());
    h.poll(RETRY_MS);
    let Message::Connect(_) = decode_exact(&h.sent_one()).unwrap() else {
        panic!("CONNECT again expected")
    };
    // Refused: still connecting, asks again later.
    h.feed(
        &Message::ConnAck {
            return_code: ReturnCode::Congestion,
        },
        RETRY_MS,
    );
    assert_eq!(h.node.state(), State::Connecting);

    let mut h = Harness::running(0);
    h.poll(0);
    h.sent();
    // Readings every second keep the link busy; nothing comes back, though the node pings.
    let mut now = 0;
    let mut pings = 0;
    while h.node.state() == State::Running {
        now += 1000;
        assert!(now <= 21_000 + 1000, "the node never gave up");
        h.poll(now);
        for message in h.sent() {
            if decode_exact(&message).unwrap() == (Message::PingReq { client_id: None }) {
                pings += 1;
            }
        }
    }
    assert!(now > 20_000, "restarted at {now} ms, before two keepalives");
    assert!(pings >= 3, "pings while readings went out: {pings}");
    assert_eq!(h.node.stats().restarts, 1);
}

#[test]
fn a_gateway_that_answers_pings_keeps_the_node_running() {
    // Readings every second (QoS 0: never answered), keepalive 10 s, for two minutes.
    let mut h = Harness::running(0);
    for now in (0..120_000).step_by(500) {
        h.poll(now);
        for message in h.sent() {
            if decode_exact(&message).unwrap() == (Message::PingReq { client_id: None }) {
                h.feed(&Message::PingResp, now + 10);
            }
        }
    }
    assert_eq!(h.node.state(), State::Running);
    assert_eq!(h.node.stats().restarts, 0);
    assert!(h.node.stats().readings >= 119);
}

#[test]
fn a_repeated_request_keeps_its_message_id_so_a_late_answer_counts() {
    let mut h = Harness::new();
    h.poll(0);
    h.sent();
    h.feed(
        &Message::ConnAck {
            return_code: ReturnCode::Accepted,
        },
        0,
    );
    h.poll(0);
    let first = h.sent_one();
    h.poll(RETRY_MS);
    let again = h.sent_one();
    assert_eq!(first, again, "the same REGISTER again");
    let Message::Register(register) = decode_exact(&first).unwrap() else {
        panic!("REGISTER expected")
    };
    h.feed(
        &Message::RegAck {
            topic_id: 5,
            message_id: register.message_id,
            return_code: ReturnCode::Accepted,
        },
        RETRY_MS + 100,
    );
    assert_eq!(h.node.state(), State::Subscribing);
    h.poll(RETRY_MS + 100);
    let bytes = h.sent_one();
    let Message::Subscribe(subscribe) = decode_exact(&bytes).unwrap() else {
        panic!("SUBSCRIBE expected")
    };
    assert!(!subscribe.dup);
    h.poll(2 * RETRY_MS + 100);
    let bytes = h.sent_one();
    let Message::Subscribe(repeated) = decode_exact(&bytes).unwrap() else {
        panic!("SUBSCRIBE expected")
    };
    assert!(repeated.dup, "a repeated SUBSCRIBE carries DUP");
    assert_eq!(repeated.message_id, subscribe.message_id);
}

#[test]
fn pings_when_idle() {
    let mut h = Harness::running(0);
    h.node.session.interval_ms = 60_000;
    h.poll(0);
    h.sent(); // the first reading
    let next = h.poll(1000);
    assert_eq!(next, 5000, "a PINGREQ at half the keepalive");
    h.poll(5000);
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::PingReq { client_id: None }
    );
    h.feed(&Message::PingReq { client_id: None }, 5001);
    assert_eq!(decode_exact(&h.sent_one()).unwrap(), Message::PingResp);
}

#[test]
fn control_messages_are_acknowledged_and_act_once() {
    let mut h = Harness::running(0);
    h.feed(&publish(7, QoS::Zero, 0, b"on"), 1);
    assert!(h.sent().is_empty());
    h.feed(&publish(7, QoS::One, 3, b"OFF"), 2);
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::PubAck {
            topic_id: 7,
            message_id: 3,
            return_code: ReturnCode::Accepted
        }
    );
    // QoS 2, sent twice before the PUBREL: acts once, answers PUBREC both times.
    h.feed(&publish(7, QoS::Two, 4, b"\"toggle\""), 3);
    h.feed(
        &Message::Publish(Publish {
            dup: true,
            ..match publish(7, QoS::Two, 4, b"\"toggle\"") {
                Message::Publish(p) => p,
                _ => unreachable!(),
            }
        }),
        4,
    );
    let pubrec = Message::PubRec { message_id: 4 };
    let sent = h.sent();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|m| decode_exact(m).unwrap() == pubrec));
    h.feed(&Message::PubRel { message_id: 4 }, 5);
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::PubComp { message_id: 4 }
    );
    // After the release, the same id is a new message.
    h.feed(&publish(7, QoS::Two, 4, b"1"), 6);
    h.sent();
    assert_eq!(h.leds, vec![Led::On, Led::Off, Led::Toggle, Led::On]);
    h.feed(&publish(7, QoS::One, 8, b"blink"), 7);
    h.sent();
    assert_eq!(h.node.stats().unknown_commands, 1);
    assert_eq!(h.leds.len(), 4);
    // A control message longer than any the node sends is still acknowledged.
    let long = [b' '; 600];
    h.feed(&publish(7, QoS::One, 9, &long), 8);
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::PubAck {
            topic_id: 7,
            message_id: 9,
            return_code: ReturnCode::Accepted
        }
    );
}

#[test]
fn qos_2_ids_are_remembered_for_as_many_as_the_gateway_keeps_in_flight() {
    let mut h = Harness::running(0);
    // Nine unreleased QoS 2 messages (ids 20..=28; id 4 of message 24 released early).
    for id in 20..=28 {
        h.feed(&publish(7, QoS::Two, id, b"toggle"), 1);
        if id == 24 {
            h.feed(&Message::PubRel { message_id: 24 }, 1);
        }
    }
    h.sent();
    assert_eq!(h.leds.len(), 9);
    // All but the released one are remembered (a free slot is used before the oldest goes).
    for id in (20..=28).filter(|id| *id != 24) {
        h.feed(&publish(7, QoS::Two, id, b"toggle"), 2);
    }
    h.sent();
    assert_eq!(h.leds.len(), 9, "re-sent messages act again");
    // A tenth evicts the oldest, 20.
    h.feed(&publish(7, QoS::Two, 29, b"toggle"), 3);
    h.feed(&publish(7, QoS::Two, 20, b"toggle"), 3);
    h.sent();
    assert_eq!(h.leds.len(), 11);
}

#[test]
fn an_unknown_topic_id_is_refused_until_the_gateway_registers_it() {
    let mut h = Harness::running(0);
    h.feed(&publish(9, QoS::One, 11, b"on"), 1);
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::PubAck {
            topic_id: 9,
            message_id: 11,
            return_code: ReturnCode::InvalidTopicId
        }
    );
    assert!(h.leds.is_empty());
    h.feed(
        &Message::Register(Register {
            topic_id: 9,
            message_id: 12,
            topic_name: "control/n1/led",
        }),
        2,
    );
    assert_eq!(
        decode_exact(&h.sent_one()).unwrap(),
        Message::RegAck {
            topic_id: 9,
            message_id: 12,
            return_code: ReturnCode::Accepted
        }
    );
    h.feed(&publish(9, QoS::One, 13, b"on"), 3);
    h.sent();
    assert_eq!(h.leds, vec![Led::On]);
}

#[test]
fn noise_is_counted_and_the_next_frame_still_works() {
    let mut h = Harness::running(0);
    let mut bytes = vec![0x13, 0x37, 0xff, 0x00, 0x05, 0x01, 0x02, 0x03, 0x04, 0x00];
    bytes.extend(encode_frame_to_vec(
        &encode_to_vec(&publish(7, QoS::Zero, 0, b"on")).unwrap(),
    ));
    // In pieces, as a UART delivers it.
    for chunk in bytes.chunks(3) {
        h.feed_bytes(chunk, 1);
    }
    assert_eq!(h.leds, vec![Led::On]);
    let stats = h.node.stats();
    assert_eq!(stats.frame_errors, 2, "{stats:?}");
    // A DISCONNECT from the gateway starts over.
    h.feed(&Message::Disconnect { duration: None }, 2);
    assert_eq!(h.node.state(), State::Connecting);
    h.poll(3);
    let Message::Connect(_) = decode_exact(&h.sent_one()).unwrap() else {
        panic!("CONNECT expected")
    };
}

#[test]
fn settings_are_checked() {
    let settings = |client_id, keepalive_s| Settings {
        client_id,
        keepalive_s,
        interval_ms: 1000,
    };
    assert_eq!(Node::new(settings("", 10)).err(), Some(Error::ClientId));
    assert_eq!(
        Node::new(settings("a-very-long-client-id-24", 10)).err(),
        Some(Error::ClientId)
    );
    assert_eq!(Node::new(settings("a/b", 10)).err(), Some(Error::ClientId));
    assert_eq!(Node::new(settings("n", 1)).err(), Some(Error::Keepalive));
    let node = Node::new(settings("esp32c3-a1b2c3-0123456", 10)).unwrap();
    assert_eq!(node.client_id(), "esp32c3-a1b2c3-0123456");
}

#[test]
fn led_commands() {
    assert_eq!(Led::parse(b" on\n"), Some(Led::On));
    assert_eq!(Led::parse(b"TRUE"), Some(Led::On));
    assert_eq!(Led::parse(b"0"), Some(Led::Off));
    assert_eq!(Led::parse(b"\"off\""), Some(Led::Off));
    assert_eq!(Led::parse(b"Toggle"), Some(Led::Toggle));
    assert_eq!(Led::parse(b"\xff"), None);
    assert_eq!(Led::parse(b"dim"), None);
}
