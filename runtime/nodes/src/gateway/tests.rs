//! The gateway over an in-memory link: a test node on one end of a duplex pipe.

use std::time::Duration;

use edgegw_broker::{QoS as BrokerQoS, RouterLimits};
use edgegw_protocol::{decode_exact, encode_frame_to_vec};
use tokio::io::DuplexStream;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);

struct TestNode {
    io: DuplexStream,
    decoder: Box<FrameDecoder<MAX_FRAME>>,
    /// Wireless node id when behind a forwarder.
    wireless_id: Option<Vec<u8>>,
}

impl TestNode {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, message: &Message<'_>) {
        let bytes = match &self.wireless_id {
            None => encode_to_vec(message).unwrap(),
            Some(id) => {
                let mut buffer = vec![0; 2048];
                let n = encode_encapsulated(0, id, message, &mut buffer).unwrap();
                buffer.truncate(n);
                buffer
            }
        };
        self.send_raw(&encode_frame_to_vec(&bytes)).await;
    }

    /// The next message's bytes (unwrapped from its encapsulation).
    async fn recv(&mut self) -> Vec<u8> {
        let mut chunk = [0u8; 1];
        loop {
            let n = tokio::time::timeout(TIMEOUT, self.io.read(&mut chunk))
                .await
                .expect("a message from the gateway in time")
                .unwrap();
            assert!(n > 0, "link closed");
            let mut frames = self.decoder.feed(&chunk[..n]);
            if let Some(frame) = frames.next_frame() {
                let bytes = frame.unwrap().to_vec();
                return match decode_exact(&bytes).unwrap() {
                    Message::Encapsulated(e) => {
                        assert_eq!(Some(e.wireless_node_id), self.wireless_id.as_deref());
                        e.message.to_vec()
                    }
                    _ => bytes,
                };
            }
        }
    }

    async fn connect(&mut self, client_id: &str) {
        self.send(&Message::Connect(Connect {
            will: false,
            clean_session: true,
            duration: 30,
            client_id,
        }))
        .await;
        assert_eq!(
            decode_exact(&self.recv().await).unwrap(),
            Message::ConnAck {
                return_code: ReturnCode::Accepted
            }
        );
    }

    async fn register(&mut self, topic_name: &str) -> u16 {
        self.send(&Message::Register(Register {
            topic_id: 0,
            message_id: 7,
            topic_name,
        }))
        .await;
        match decode_exact(&self.recv().await).unwrap() {
            Message::RegAck {
                topic_id,
                message_id: 7,
                return_code: ReturnCode::Accepted,
            } => topic_id,
            other => panic!("expected REGACK, got {other:?}"),
        }
    }
}

struct Harness {
    router: Router,
    cancel: CancellationToken,
    link: JoinHandle<Result<(), LinkError>>,
    /// The gateway side, kept to open more test nodes on the same link (forwarder tests).
    node: TestNode,
}

fn start(predefined: &[(u16, &str)]) -> Harness {
    let router = Router::new(RouterLimits::default());
    let context = Context {
        router: router.clone(),
        predefined_topics: Arc::new(
            predefined
                .iter()
                .map(|(id, name)| (*id, (*name).to_owned()))
                .collect(),
        ),
        metrics: NodeMetrics::new(),
    };
    let (node_end, gateway_end) = tokio::io::duplex(4096);
    let cancel = CancellationToken::new();
    let link = tokio::spawn({
        let cancel = cancel.clone();
        async move { run_link(gateway_end, "test", &context, &cancel).await }
    });
    Harness {
        router,
        cancel,
        link,
        node: TestNode {
            io: node_end,
            decoder: Box::new(FrameDecoder::new()),
            wireless_id: None,
        },
    }
}

async fn next(client: &LocalClient) -> Delivery {
    tokio::time::timeout(TIMEOUT, client.recv())
        .await
        .expect("a delivery in time")
        .expect("session alive")
}

#[tokio::test]
async fn registered_publishes_reach_the_broker_at_qos_0_and_1() {
    let mut h = start(&[]);
    let subscriber = h.router.local_client("subscriber");
    subscriber
        .subscribe("sensors/#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    h.node.connect("kitchen").await;
    let id = h.node.register("sensors/kitchen/temp").await;
    assert_eq!(
        h.node.register("sensors/kitchen/temp").await,
        id,
        "stable id"
    );

    h.node
        .send(&Message::Publish(Publish {
            dup: false,
            qos: QoS::Zero,
            retain: false,
            topic: TopicId::Normal(id),
            message_id: 0,
            data: b"{\"temp\": 21.5}",
        }))
        .await;
    let delivery = next(&subscriber).await;
    assert_eq!(&*delivery.message.topic, "sensors/kitchen/temp");
    assert_eq!(&delivery.message.payload[..], b"{\"temp\": 21.5}");
    assert_eq!(delivery.qos, BrokerQoS::AtMostOnce);

    h.node
        .send(&Message::Publish(Publish {
            dup: false,
            qos: QoS::One,
            retain: false,
            topic: TopicId::Normal(id),
            message_id: 9,
            data: b"1",
        }))
        .await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PubAck {
            topic_id: id,
            message_id: 9,
            return_code: ReturnCode::Accepted
        }
    );
    assert_eq!(next(&subscriber).await.qos, BrokerQoS::AtLeastOnce);

    // An id nobody registered is refused per spec.
    h.node
        .send(&Message::Publish(Publish {
            dup: false,
            qos: QoS::One,
            retain: false,
            topic: TopicId::Normal(999),
            message_id: 10,
            data: b"x",
        }))
        .await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PubAck {
            topic_id: 999,
            message_id: 10,
            return_code: ReturnCode::InvalidTopicId
        }
    );
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}

#[tokio::test]
async fn qos_2_from_a_node_is_routed_once_at_pubrel() {
    let mut h = start(&[]);
    let subscriber = h.router.local_client("subscriber");
    subscriber
        .subscribe("t/#", SubOptions::qos(BrokerQoS::ExactlyOnce))
        .unwrap();
    h.node.connect("n").await;
    let id = h.node.register("t/a").await;
    let publish = Message::Publish(Publish {
        dup: false,
        qos: QoS::Two,
        retain: false,
        topic: TopicId::Normal(id),
        message_id: 3,
        data: b"once",
    });
    h.node.send(&publish).await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PubRec { message_id: 3 }
    );
    h.node.send(&publish).await; // a DUP re-send
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PubRec { message_id: 3 }
    );
    assert_eq!(subscriber.queued(), 0);
    h.node.send(&Message::PubRel { message_id: 3 }).await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PubComp { message_id: 3 }
    );
    assert_eq!(&next(&subscriber).await.message.payload[..], b"once");
    assert_eq!(subscriber.queued(), 0);
}

#[tokio::test]
async fn subscriptions_deliver_with_suback_ids_and_register_new_names_first() {
    let mut h = start(&[]);
    h.node.connect("n1").await;
    h.node
        .send(&Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::One,
            message_id: 5,
            topic: Topic::Name("control/n1/led"),
        }))
        .await;
    let led = match decode_exact(&h.node.recv().await).unwrap() {
        Message::SubAck {
            qos: QoS::One,
            topic_id,
            message_id: 5,
            return_code: ReturnCode::Accepted,
        } => topic_id,
        other => panic!("expected SUBACK, got {other:?}"),
    };
    assert_ne!(led, 0);
    h.router.publish(BrokerMessage::new(
        "control/n1/led",
        "on",
        BrokerQoS::AtMostOnce,
    ));
    match decode_exact(&h.node.recv().await).unwrap() {
        Message::Publish(p) => {
            assert_eq!(p.topic, TopicId::Normal(led));
            assert_eq!(p.qos, QoS::Zero);
            assert_eq!(p.data, b"on");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // A wildcard: SUBACK carries id 0; a new topic name is REGISTERed before its PUBLISH.
    h.node
        .send(&Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::Zero,
            message_id: 6,
            topic: Topic::Name("alerts/#"),
        }))
        .await;
    assert!(matches!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::SubAck { topic_id: 0, .. }
    ));
    h.router.publish(BrokerMessage::new(
        "alerts/fire",
        "1",
        BrokerQoS::AtMostOnce,
    ));
    h.router.publish(BrokerMessage::new(
        "alerts/fire",
        "2",
        BrokerQoS::AtMostOnce,
    ));
    let (topic_id, message_id) = match decode_exact(&h.node.recv().await).unwrap() {
        Message::Register(r) => {
            assert_eq!(r.topic_name, "alerts/fire");
            (r.topic_id, r.message_id)
        }
        other => panic!("expected REGISTER, got {other:?}"),
    };
    h.node
        .send(&Message::RegAck {
            topic_id,
            message_id,
            return_code: ReturnCode::Accepted,
        })
        .await;
    for payload in [b"1", b"2"] {
        match decode_exact(&h.node.recv().await).unwrap() {
            Message::Publish(p) => {
                assert_eq!(p.topic, TopicId::Normal(topic_id));
                assert_eq!(p.data, payload);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn garbage_is_counted_and_ignored() {
    let mut h = start(&[]);
    // Line noise, a frame with a bad CRC, an oversize run, a good frame holding no message.
    h.node.send_raw(b"\x13\x37noise\xff\xfe\x00").await;
    let mut bad_crc = encode_frame_to_vec(b"\x02\x18");
    bad_crc[1] ^= 0x40;
    h.node.send_raw(&bad_crc).await;
    h.node.send_raw(&vec![0x55; 3 * MAX_FRAME]).await;
    h.node.send_raw(&[0]).await;
    h.node.send_raw(&encode_frame_to_vec(b"\x05\x99zz")).await;
    // Then the link works as ever.
    h.node.connect("survivor").await;
    h.node.send(&Message::PingReq { client_id: None }).await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::PingResp
    );
    assert!(!h.link.is_finished());
}

#[tokio::test]
async fn messages_before_connect_get_disconnect() {
    let mut h = start(&[]);
    h.node.send(&Message::PingReq { client_id: None }).await;
    assert_eq!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::Disconnect { duration: None }
    );
}

#[tokio::test]
async fn forwarded_nodes_are_separate_clients_with_predefined_topics() {
    let mut h = start(&[(1, "sensors/{node}/temp")]);
    let subscriber = h.router.local_client("subscriber");
    subscriber
        .subscribe("sensors/+/temp", SubOptions::qos(BrokerQoS::AtMostOnce))
        .unwrap();
    for name in ["hub-1", "hub-2"] {
        h.node.wireless_id = Some(name.as_bytes().to_vec());
        h.node.connect(name).await;
    }
    for name in ["hub-1", "hub-2"] {
        h.node.wireless_id = Some(name.as_bytes().to_vec());
        h.node
            .send(&Message::Publish(Publish {
                dup: false,
                qos: QoS::Zero,
                retain: false,
                topic: TopicId::Predefined(1),
                message_id: 0,
                data: name.as_bytes(),
            }))
            .await;
        let delivery = next(&subscriber).await;
        assert_eq!(&*delivery.message.topic, format!("sensors/{name}/temp"));
    }
    // QoS −1 needs no connection: a third, unconnected wireless node.
    h.node.wireless_id = Some(b"loner".to_vec());
    h.node
        .send(&Message::Publish(Publish {
            dup: false,
            qos: QoS::MinusOne,
            retain: false,
            topic: TopicId::Predefined(1),
            message_id: 0,
            data: b"-1",
        }))
        .await;
    assert_eq!(
        &*next(&subscriber).await.message.topic,
        "sensors/loner/temp"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_is_dropped_after_its_keepalive() {
    let mut h = start(&[]);
    h.node.connect("sleepy").await; // keepalive 30 s
    assert_eq!(h.router.session_count(), 1);
    tokio::time::sleep(Duration::from_secs(46)).await;
    tokio::task::yield_now().await;
    assert_eq!(h.router.session_count(), 0);
}

impl TestNode {
    /// SUBSCRIBE to a topic name at QoS 1; the topic id from SUBACK.
    async fn subscribe(&mut self, name: &str) -> u16 {
        self.send(&Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::One,
            message_id: 5,
            topic: Topic::Name(name),
        }))
        .await;
        match decode_exact(&self.recv().await).unwrap() {
            Message::SubAck {
                topic_id,
                return_code: ReturnCode::Accepted,
                ..
            } => topic_id,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The payload of the next message, which must be a PUBLISH on `topic`; acknowledged
    /// (PUBACK) at QoS 1.
    async fn expect_publish(&mut self, topic: TopicId) -> Vec<u8> {
        let (message_id, qos, data) = match decode_exact(&self.recv().await).unwrap() {
            Message::Publish(p) => {
                assert_eq!(p.topic, topic);
                (p.message_id, p.qos, p.data.to_vec())
            }
            other => panic!("expected PUBLISH on {topic:?}, got {other:?}"),
        };
        if qos == QoS::One {
            self.puback(topic, message_id).await;
        }
        data
    }

    async fn puback(&mut self, topic: TopicId, message_id: u16) {
        self.send(&Message::PubAck {
            topic_id: u16::from_be_bytes(topic.to_bytes()),
            message_id,
            return_code: ReturnCode::Accepted,
        })
        .await;
    }

    /// The next message, which must be a PUBLISH: (message id, dup, payload), not acked.
    async fn publish_unacked(&mut self) -> (u16, bool, Vec<u8>) {
        match decode_exact(&self.recv().await).unwrap() {
            Message::Publish(p) => (p.message_id, p.dup, p.data.to_vec()),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// CONNECT with a will: WILLTOPICREQ, WILLTOPIC, WILLMSGREQ, WILLMSG, CONNACK accepted.
    async fn connect_with_will(
        &mut self,
        connect: &Message<'_>,
        will: WillTopic<'_>,
        message: &[u8],
    ) {
        self.send(connect).await;
        self.expect(Message::WillTopicReq).await;
        self.send(&Message::WillTopic(Some(will))).await;
        self.expect(Message::WillMsgReq).await;
        self.send(&Message::WillMsg {
            will_message: message,
        })
        .await;
        self.expect(Message::ConnAck {
            return_code: ReturnCode::Accepted,
        })
        .await;
    }

    async fn expect(&mut self, expected: Message<'_>) {
        assert_eq!(decode_exact(&self.recv().await).unwrap(), expected);
    }

    /// Nothing arrives for a while (paused-clock tests only).
    async fn expect_silence(&mut self) {
        let mut chunk = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), self.io.read(&mut chunk))
                .await
                .is_err(),
            "the gateway sent something"
        );
    }
}

#[tokio::test]
async fn a_sleeping_node_gets_its_messages_when_it_wakes() {
    let mut h = start(&[]);
    h.node.connect("sleeper").await;
    let led = h.node.subscribe("control/sleeper/led").await;
    h.node.subscribe("alerts/#").await;
    h.node
        .send(&Message::Disconnect { duration: Some(60) })
        .await;
    h.node.expect(Message::Disconnect { duration: None }).await;

    // While it sleeps, messages wait (nothing is sent to the node).
    for payload in ["on", "off"] {
        h.router.publish(BrokerMessage::new(
            "control/sleeper/led",
            payload,
            BrokerQoS::AtLeastOnce,
        ));
    }
    h.router.publish(BrokerMessage::new(
        "alerts/fire",
        "1",
        BrokerQoS::AtMostOnce,
    ));
    h.node.expect_silence().await;
    assert_eq!(h.router.session_count(), 1, "the session is kept");

    // Awake: the waiting messages in order (a REGISTER first for the new name), then
    // PINGRESP only after the REGACK.
    h.node
        .send(&Message::PingReq {
            client_id: Some("sleeper"),
        })
        .await;
    assert_eq!(h.node.expect_publish(TopicId::Normal(led)).await, b"on");
    assert_eq!(h.node.expect_publish(TopicId::Normal(led)).await, b"off");
    let (topic_id, message_id) = match decode_exact(&h.node.recv().await).unwrap() {
        Message::Register(r) => {
            assert_eq!(r.topic_name, "alerts/fire");
            (r.topic_id, r.message_id)
        }
        other => panic!("expected REGISTER, got {other:?}"),
    };
    h.node.expect_silence().await;
    // The REGACK got lost; the node asks again: the REGISTER is sent again.
    let _ = message_id;
    h.node
        .send(&Message::PingReq {
            client_id: Some("sleeper"),
        })
        .await;
    let message_id = match decode_exact(&h.node.recv().await).unwrap() {
        Message::Register(r) => {
            assert_eq!((r.topic_id, r.topic_name), (topic_id, "alerts/fire"));
            r.message_id
        }
        other => panic!("expected the REGISTER again, got {other:?}"),
    };
    h.node
        .send(&Message::RegAck {
            topic_id,
            message_id,
            return_code: ReturnCode::Accepted,
        })
        .await;
    assert_eq!(h.node.expect_publish(TopicId::Normal(topic_id)).await, b"1");
    h.node.expect(Message::PingResp).await;
    h.node.expect_silence().await;

    // Back asleep: the next message waits for the next wake-up.
    h.router.publish(BrokerMessage::new(
        "control/sleeper/led",
        "blink",
        BrokerQoS::AtLeastOnce,
    ));
    h.node.expect_silence().await;
    h.node
        .send(&Message::PingReq {
            client_id: Some("sleeper"),
        })
        .await;
    assert_eq!(h.node.expect_publish(TopicId::Normal(led)).await, b"blink");
    h.node.expect(Message::PingResp).await;

    // CONNECT without a clean session makes it active again, with its subscriptions.
    h.router.publish(BrokerMessage::new(
        "control/sleeper/led",
        "queued",
        BrokerQoS::AtLeastOnce,
    ));
    h.node
        .send(&Message::Connect(Connect {
            will: false,
            clean_session: false,
            duration: 30,
            client_id: "sleeper",
        }))
        .await;
    h.node
        .expect(Message::ConnAck {
            return_code: ReturnCode::Accepted,
        })
        .await;
    assert_eq!(h.node.expect_publish(TopicId::Normal(led)).await, b"queued");
    h.router.publish(BrokerMessage::new(
        "control/sleeper/led",
        "live",
        BrokerQoS::AtMostOnce,
    ));
    assert_eq!(h.node.expect_publish(TopicId::Normal(led)).await, b"live");
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_node_that_oversleeps_is_lost_and_its_will_published() {
    let mut h = start(&[]);
    let watcher = h.router.local_client("watcher");
    watcher
        .subscribe("status/#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    h.node
        .connect_with_will(
            &Message::Connect(Connect {
                will: true,
                clean_session: true,
                duration: 30,
                client_id: "w1",
            }),
            WillTopic {
                qos: QoS::One,
                retain: true,
                topic: "status/w1",
            },
            b"offline",
        )
        .await;
    // The will's message can be changed while connected.
    h.node
        .send(&Message::WillMsgUpd {
            will_message: b"lost",
        })
        .await;
    h.node
        .expect(Message::WillMsgResp {
            return_code: ReturnCode::Accepted,
        })
        .await;

    // Asleep for 10 s: 14 s of silence is fine, 16 s is not (1.5 sleep durations).
    h.node
        .send(&Message::Disconnect { duration: Some(10) })
        .await;
    h.node.expect(Message::Disconnect { duration: None }).await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert_eq!(h.router.session_count(), 2);
    assert_eq!(watcher.queued(), 0, "no will while asleep in time");
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::yield_now().await;
    let will = next(&watcher).await;
    assert_eq!(&*will.message.topic, "status/w1");
    assert_eq!(&will.message.payload[..], b"lost");
    assert_eq!(will.qos, BrokerQoS::AtLeastOnce);
    assert_eq!(
        h.router.retained_count(),
        1,
        "the will's retain flag is kept"
    );
    assert_eq!(h.router.session_count(), 1, "only the watcher's session");
}

#[tokio::test]
async fn wills_are_not_published_after_disconnect_and_bad_will_topics_are_refused() {
    let mut h = start(&[]);
    let watcher = h.router.local_client("watcher");
    watcher
        .subscribe("#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    let connect_with_will = Message::Connect(Connect {
        will: true,
        clean_session: true,
        duration: 30,
        client_id: "w2",
    });
    let w2_will = WillTopic {
        qos: QoS::Zero,
        retain: false,
        topic: "status/w2",
    };
    // A wildcard will topic: refused.
    h.node.send(&connect_with_will).await;
    h.node.expect(Message::WillTopicReq).await;
    h.node
        .send(&Message::WillTopic(Some(WillTopic {
            qos: QoS::Zero,
            retain: false,
            topic: "status/#",
        })))
        .await;
    h.node
        .expect(Message::ConnAck {
            return_code: ReturnCode::NotSupported,
        })
        .await;

    // A proper will, then DISCONNECT: the will is discarded.
    h.node
        .connect_with_will(&connect_with_will, w2_will, b"gone")
        .await;
    h.node.send(&Message::Disconnect { duration: None }).await;
    h.node.expect(Message::Disconnect { duration: None }).await;

    // Connected again with a will, then replaced by a new CONNECT (the node rebooted): the
    // old connection's will goes out.
    h.node
        .connect_with_will(&connect_with_will, w2_will, b"rebooted")
        .await;
    h.node.connect("w2").await;
    let will = next(&watcher).await;
    assert_eq!(
        (&*will.message.topic, &will.message.payload[..]),
        ("status/w2", &b"rebooted"[..]),
        "only the will of the replaced connection, none after DISCONNECT"
    );

    // The gateway stopping publishes no will.
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
    assert_eq!(watcher.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn unacknowledged_deliveries_are_sent_again_and_a_deaf_node_is_lost() {
    let mut h = start(&[]);
    h.node.connect("deaf").await;
    let cmd = h.node.subscribe("cmd/deaf").await;
    let publish = |payload: &'static str| {
        h.router.publish(BrokerMessage::new(
            "cmd/deaf",
            payload,
            BrokerQoS::AtLeastOnce,
        ));
    };
    publish("1");
    let (id, dup, data) = h.node.publish_unacked().await;
    assert_eq!((dup, &data[..]), (false, &b"1"[..]));
    // No PUBACK: the same message again after 10 s, with DUP.
    tokio::time::sleep(Duration::from_millis(10_600)).await;
    assert_eq!(h.node.publish_unacked().await, (id, true, b"1".to_vec()));
    h.node.puback(TopicId::Normal(cmd), id).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    h.node.expect_silence().await;

    // A node that answers nothing: three re-sends, then it is lost.
    publish("2");
    let (id, _, _) = h.node.publish_unacked().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(10_600)).await;
        assert_eq!(h.node.publish_unacked().await, (id, true, b"2".to_vec()));
        // Keepalive alone would not end it: the node still talks.
        h.node.send(&Message::PingReq { client_id: None }).await;
        h.node.expect(Message::PingResp).await;
    }
    assert_eq!(h.router.session_count(), 1);
    tokio::time::sleep(Duration::from_millis(10_600)).await;
    tokio::task::yield_now().await;
    assert_eq!(h.router.session_count(), 0, "the node is lost");
}

#[tokio::test]
async fn the_window_bounds_unacknowledged_deliveries_and_keeps_order() {
    let mut h = start(&[]);
    h.node.connect("busy").await;
    let cmd = h.node.subscribe("cmd/busy").await;
    for n in 0..13 {
        h.router.publish(BrokerMessage::new(
            "cmd/busy",
            format!("{n}"),
            // Every third at QoS 0: it waits its turn behind the QoS 1 ones.
            if n % 3 == 2 {
                BrokerQoS::AtMostOnce
            } else {
                BrokerQoS::AtLeastOnce
            },
        ));
    }
    // QoS 1 deliveries 0,1,3,4,6,7,9,10 fill the window of 8; QoS 0 ones (2,5,8,11) pass;
    // 12 waits for a slot.
    let mut ids = Vec::new();
    for n in 0..12 {
        let (id, dup, data) = h.node.publish_unacked().await;
        assert_eq!((dup, data), (false, format!("{n}").into_bytes()));
        if n % 3 != 2 {
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), 8);
    // A QoS 0 message now waits behind 12 rather than overtaking it.
    h.router
        .publish(BrokerMessage::new("cmd/busy", "13", BrokerQoS::AtMostOnce));
    h.node.expect_silence().await;
    h.node.puback(TopicId::Normal(cmd), ids[0]).await;
    assert_eq!(h.node.expect_publish(TopicId::Normal(cmd)).await, b"12");
    assert_eq!(h.node.expect_publish(TopicId::Normal(cmd)).await, b"13");
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_burst_on_a_new_topic_waits_for_its_regack_without_loss() {
    let mut h = start(&[]);
    h.node.connect("burst").await;
    h.node
        .send(&Message::Subscribe(Subscribe {
            dup: false,
            qos: QoS::One,
            message_id: 5,
            topic: Topic::Name("data/#"),
        }))
        .await;
    assert!(matches!(
        decode_exact(&h.node.recv().await).unwrap(),
        Message::SubAck { topic_id: 0, .. }
    ));
    for n in 0..30 {
        h.router.publish(BrokerMessage::new(
            "data/x",
            format!("{n}"),
            BrokerQoS::AtLeastOnce,
        ));
    }
    let (topic_id, message_id) = match decode_exact(&h.node.recv().await).unwrap() {
        Message::Register(r) => (r.topic_id, r.message_id),
        other => panic!("expected REGISTER, got {other:?}"),
    };
    h.node.expect_silence().await;
    h.node
        .send(&Message::RegAck {
            topic_id,
            message_id,
            return_code: ReturnCode::Accepted,
        })
        .await;
    // All 30, in order, none dropped while the REGACK was awaited.
    for n in 0..30 {
        assert_eq!(
            h.node.expect_publish(TopicId::Normal(topic_id)).await,
            format!("{n}").into_bytes()
        );
    }
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_node_that_forgot_a_topic_id_gets_it_registered_again() {
    let mut h = start(&[]);
    h.node.connect("forgetful").await;
    let led = h.node.subscribe("control/forgetful/led").await;
    h.router.publish(BrokerMessage::new(
        "control/forgetful/led",
        "on",
        BrokerQoS::AtLeastOnce,
    ));
    let (id, _, _) = h.node.publish_unacked().await;
    h.node
        .send(&Message::PubAck {
            topic_id: led,
            message_id: id,
            return_code: ReturnCode::InvalidTopicId,
        })
        .await;
    let (topic_id, message_id) = match decode_exact(&h.node.recv().await).unwrap() {
        Message::Register(r) => {
            assert_eq!(r.topic_name, "control/forgetful/led");
            (r.topic_id, r.message_id)
        }
        other => panic!("expected REGISTER, got {other:?}"),
    };
    h.node
        .send(&Message::RegAck {
            topic_id,
            message_id,
            return_code: ReturnCode::Accepted,
        })
        .await;
    assert_eq!(
        h.node.expect_publish(TopicId::Normal(topic_id)).await,
        b"on"
    );
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_flooding_node_does_not_hold_up_another_on_the_same_link() {
    let mut h = start(&[(1, "sensors/{node}/temp")]);
    let quiet_watcher = h.router.local_client("watcher");
    quiet_watcher
        .subscribe("sensors/quiet/#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    let flood_watcher = h.router.local_client("flood-watcher");
    flood_watcher
        .subscribe("sensors/flood/#", SubOptions::qos(BrokerQoS::AtMostOnce))
        .unwrap();
    for name in ["flood", "quiet"] {
        h.node.wireless_id = Some(name.as_bytes().to_vec());
        h.node.connect(name).await;
    }
    let encapsulated = |id: &[u8], message: &Message<'_>| {
        let mut buffer = vec![0; 256];
        let n = encode_encapsulated(0, id, message, &mut buffer).unwrap();
        encode_frame_to_vec(&buffer[..n])
    };
    let reading = |qos, message_id, data: &'static [u8]| {
        Message::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: TopicId::Predefined(1),
            message_id,
            data,
        })
    };
    // 20,000 readings from one node, the other's QoS 1 reading in the middle, then 20,000 more.
    const FLOOD: usize = 20_000;
    let flood_frame = encapsulated(b"flood", &reading(QoS::Zero, 0, b"{\"temp\": 1}"));
    let mut bytes = flood_frame.repeat(FLOOD);
    bytes.extend(encapsulated(
        b"quiet",
        &reading(QoS::One, 77, b"{\"temp\": 2}"),
    ));
    bytes.extend(flood_frame.repeat(FLOOD));

    let (mut from_gateway, mut to_gateway) = tokio::io::split(&mut h.node.io);
    let write = async {
        to_gateway.write_all(&bytes).await.unwrap();
    };
    // The PUBACK for the quiet node comes back while the flood goes on.
    let read = async {
        let mut decoder = Box::new(FrameDecoder::<MAX_FRAME>::new());
        let mut chunk = [0u8; 256];
        loop {
            let n = from_gateway.read(&mut chunk).await.unwrap();
            assert!(n > 0, "link closed");
            let mut frames = decoder.feed(&chunk[..n]);
            while let Some(frame) = frames.next_frame() {
                let bytes = frame.unwrap().to_vec();
                if let Message::Encapsulated(e) = decode_exact(&bytes).unwrap() {
                    assert_eq!(
                        e.wireless_node_id, b"quiet",
                        "only the quiet node gets an answer"
                    );
                    if let Message::PubAck {
                        message_id: 77,
                        return_code,
                        ..
                    } = decode_exact(e.message).unwrap()
                    {
                        assert_eq!(return_code, ReturnCode::Accepted);
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
        .await
        .expect("the flood is taken and the quiet node answered");
    let delivery = next(&quiet_watcher).await;
    assert_eq!(&*delivery.message.topic, "sensors/quiet/temp");
    assert_eq!(&delivery.message.payload[..], b"{\"temp\": 2}");
    // The flood reached the broker (a slow subscriber's queue bounds what it keeps), and
    // both nodes are still connected: a PINGREQ from each is answered.
    assert!(flood_watcher.try_recv().is_some());
    for name in ["flood", "quiet"] {
        h.node.wireless_id = Some(name.as_bytes().to_vec());
        h.node.send(&Message::PingReq { client_id: None }).await;
        assert_eq!(
            decode_exact(&h.node.recv().await).unwrap(),
            Message::PingResp
        );
    }
    h.cancel.cancel();
    h.link.await.unwrap().unwrap();
}
