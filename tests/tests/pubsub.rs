//! Publish/subscribe through the real binary with independent clients: rumqttc (v3.1.1 and
//! v5) and Debian's mosquitto_pub/mosquitto_sub.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use edgegw_tests::{
    Gateway,
    raw::{self, Publish, Raw},
    require_mosquitto_clients,
};

const WAIT: Duration = Duration::from_secs(10);

mod v3 {
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

    use super::*;

    pub fn client(gw: &Gateway, id: &str) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", gw.port());
        options.set_keep_alive(Duration::from_secs(30));
        AsyncClient::new(options, 100)
    }

    /// Polls until a PUBLISH arrives.
    pub async fn next_publish(events: &mut EventLoop) -> rumqttc::Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) =
                    events.poll().await.expect("connection")
                {
                    return p;
                }
            }
        })
        .await
        .expect("a PUBLISH within the wait")
    }

    /// Polls until SUBACK arrives.
    pub async fn suback(events: &mut EventLoop) -> rumqttc::SubAck {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(a)) = events.poll().await.expect("connection")
                {
                    return a;
                }
            }
        })
        .await
        .expect("SUBACK")
    }

    pub fn qos(n: u8) -> QoS {
        match n {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    /// Drives an event loop in the background (for publishers).
    pub fn drive(mut events: EventLoop) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { while events.poll().await.is_ok() {} })
    }
}

mod v5 {
    use rumqttc::v5::{
        AsyncClient, Event, EventLoop, MqttOptions, mqttbytes::QoS, mqttbytes::v5::Packet,
    };

    use super::*;

    pub fn client(gw: &Gateway, id: &str) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", gw.port());
        options.set_keep_alive(Duration::from_secs(30));
        AsyncClient::new(options, 100)
    }

    pub async fn next_publish(events: &mut EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) =
                    events.poll().await.expect("connection")
                {
                    return p;
                }
            }
        })
        .await
        .expect("a PUBLISH within the wait")
    }

    pub async fn suback(events: &mut EventLoop) -> rumqttc::v5::mqttbytes::v5::SubAck {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(a)) = events.poll().await.expect("connection")
                {
                    return a;
                }
            }
        })
        .await
        .expect("SUBACK")
    }

    pub fn qos(n: u8) -> QoS {
        match n {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    pub fn drive(mut events: EventLoop) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { while events.poll().await.is_ok() {} })
    }
}

#[tokio::test]
async fn every_qos_both_directions_v3_and_v5() {
    every_qos_both_directions(&Gateway::start()).await;
}

/// The same exchange with the broker's network threads on io_uring (`gateway.io_driver`).
#[tokio::test]
async fn every_qos_both_directions_over_io_uring() {
    let gw = Gateway::start_with_gateway("  io_driver: io_uring\n", "", "");
    every_qos_both_directions(&gw).await;
    let logs: Vec<String> = gw.logs().iter().map(|line| line.to_string()).collect();
    let started = |driver: &str| {
        logs.iter().any(|line| {
            line.contains("Network event loop started.") && line.contains(&format!("\"{driver}\""))
        })
    };
    let fallback = logs
        .iter()
        .any(|line| line.contains("io_uring is not available"));
    // The key reaches the network threads: they start on io_uring, or on epoll only after
    // saying why.
    assert!(
        started("io_uring") || (fallback && started("epoll")),
        "no network event loop started on io_uring, nor a logged fallback: {logs:#?}"
    );
    assert!(
        !started("io_uring") || !started("epoll") || fallback,
        "{logs:#?}"
    );
    if fallback {
        eprintln!(
            "NOTE: this kernel refuses io_uring; the broker fell back to epoll (as documented), \
             so this run checked the fallback, not io_uring"
        );
    }
}

async fn every_qos_both_directions(gw: &Gateway) {
    for sub_qos in 0..=2u8 {
        // A v3 subscriber and a v5 subscriber at this QoS; publishers of both versions at
        // every QoS. Delivery QoS is min(publish, granted).
        let (s3, mut e3) = v3::client(gw, &format!("s3-{sub_qos}"));
        s3.subscribe(format!("q/{sub_qos}"), v3::qos(sub_qos))
            .await
            .unwrap();
        assert_eq!(v3::suback(&mut e3).await.return_codes.len(), 1);
        let (s5, mut e5) = v5::client(gw, &format!("s5-{sub_qos}"));
        s5.subscribe(format!("q/{sub_qos}"), v5::qos(sub_qos))
            .await
            .unwrap();
        v5::suback(&mut e5).await;

        let (p3, pe3) = v3::client(gw, &format!("p3-{sub_qos}"));
        let _d3 = v3::drive(pe3);
        let (p5, pe5) = v5::client(gw, &format!("p5-{sub_qos}"));
        let _d5 = v5::drive(pe5);
        for pub_qos in 0..=2u8 {
            let payload = format!("v3 {pub_qos}->{sub_qos}");
            p3.publish(
                format!("q/{sub_qos}"),
                v3::qos(pub_qos),
                false,
                payload.clone(),
            )
            .await
            .unwrap();
            let got = v3::next_publish(&mut e3).await;
            assert_eq!(&got.payload[..], payload.as_bytes());
            assert_eq!(got.qos as u8, pub_qos.min(sub_qos));
            let got = v5::next_publish(&mut e5).await;
            assert_eq!(&got.payload[..], payload.as_bytes());
            assert_eq!(got.qos as u8, pub_qos.min(sub_qos));

            let payload = format!("v5 {pub_qos}->{sub_qos}");
            p5.publish(
                format!("q/{sub_qos}"),
                v5::qos(pub_qos),
                false,
                payload.clone(),
            )
            .await
            .unwrap();
            let got = v3::next_publish(&mut e3).await;
            assert_eq!(&got.payload[..], payload.as_bytes());
            assert_eq!(got.qos as u8, pub_qos.min(sub_qos));
            let got = v5::next_publish(&mut e5).await;
            assert_eq!(&got.payload[..], payload.as_bytes());
        }
    }
    assert!(gw.metric("edgegw_broker_messages_received_total{qos=\"2\"}") >= 6.0);
}

#[test]
fn mosquitto_clients_v311_and_v5() {
    require_mosquitto_clients();
    let gw = Gateway::start();
    let port = gw.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-q",
                "2",
                "-t",
                "m/#",
                "-v",
                "-C",
                "3",
                "-W",
                "20",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the subscription exists before publishing.
        gw.wait_metric("edgegw_broker_subscriptions", WAIT, |v| v >= 1.0);
        for qos in ["0", "1", "2"] {
            let status = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-q",
                    qos,
                    "-t",
                    &format!("m/{qos}"),
                    "-m",
                    &format!("{version} q{qos}"),
                ])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let out = sub.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            vec![
                format!("m/0 {version} q0"),
                format!("m/1 {version} q1"),
                format!("m/2 {version} q2")
            ],
            "{version}"
        );
        gw.wait_metric("edgegw_broker_subscriptions", WAIT, |v| v == 0.0);
    }
}

#[test]
fn wildcards_and_dollar_topics() {
    let gw = Gateway::start();
    let mut sub = Raw::connect(gw.mqtt);
    sub.send(&raw::connect_v3("wild", true, 30));
    assert_eq!(sub.read(WAIT).unwrap().kind(), raw::CONNACK);
    for (id, filter) in [(1, "a/+/c"), (2, "#"), (3, "+/sys")] {
        sub.send(&raw::subscribe_v3(id, filter, 0));
        assert_eq!(sub.read(WAIT).unwrap().body, vec![0, id as u8, 0]);
    }
    let mut publisher = Raw::connect(gw.mqtt);
    publisher.send(&raw::connect_v3("wild-pub", true, 30));
    publisher.read(WAIT).unwrap();
    for topic in ["a/b/c", "$SYS/sys", "a/b/c/d", "x/sys"] {
        publisher.send(&raw::publish_v3(topic, 0, 0, false, topic.as_bytes()));
    }
    // Overlapping `a/+/c` and `#` give one copy; `$SYS/sys` matches neither `#` nor `+/sys`.
    let mut topics = Vec::new();
    while let Some(p) = sub.read(Duration::from_millis(1500)) {
        topics.push(Publish::parse(&p, false).topic);
    }
    assert_eq!(topics, vec!["a/b/c", "a/b/c/d", "x/sys"]);
}

/// A malformed filter is a protocol violation (MQTT 3.1.1 §4.8, 5.0 §4.13): the broker
/// closes that connection only, logs one line and counts it; others carry on.
#[test]
fn malformed_filters_close_only_that_connection() {
    let gw = Gateway::start();
    let mut bystander = Raw::connect(gw.mqtt);
    bystander.send(&raw::connect_v3("bystander", true, 30));
    bystander.read(WAIT).unwrap();
    bystander.send(&raw::subscribe_v3(1, "ok/#", 0));
    bystander.read(WAIT).unwrap();
    let cases: [(&str, bool); 4] = [
        ("a/#/b", false),
        ("a+", false),
        ("a/#/b", true),
        ("x/+y", true),
    ];
    for (n, (filter, v5)) in cases.into_iter().enumerate() {
        let mut c = Raw::connect(gw.mqtt);
        let id = format!("badfilter{n}");
        c.send(&if v5 {
            raw::connect_v5(&id, true, 30, &[])
        } else {
            raw::connect_v3(&id, true, 30)
        });
        assert_eq!(c.read(WAIT).unwrap().kind(), raw::CONNACK);
        c.send(&if v5 {
            raw::subscribe_v5(7, filter, 1, &[])
        } else {
            raw::subscribe_v3(7, filter, 1)
        });
        let mut seen = Vec::new();
        assert!(
            c.closed_within(WAIT, &mut seen),
            "{filter} v5={v5}: connection stays open: {seen:?}"
        );
        assert!(
            seen.iter().all(|p| p.kind() != raw::SUBACK),
            "{filter}: no SUBACK for a malformed filter"
        );
        if v5 {
            let disconnect = seen
                .iter()
                .find(|p| p.kind() == raw::DISCONNECT)
                .expect("v5 DISCONNECT");
            assert!(
                disconnect.body[0] >= 0x80,
                "reason code {:#x}",
                disconnect.body[0]
            );
        }
    }
    assert_eq!(
        gw.metric("edgegw_broker_protocol_errors_total{kind=\"violation\"}"),
        4.0
    );
    let mut publisher = Raw::connect(gw.mqtt);
    publisher.send(&raw::connect_v3("pub", true, 30));
    publisher.read(WAIT).unwrap();
    publisher.send(&raw::publish_v3("ok/1", 0, 0, false, b"still here"));
    let p = Publish::parse(
        &bystander.read(WAIT).expect("bystander still served"),
        false,
    );
    assert_eq!(p.payload, b"still here");
}

/// Eclipse Paho (Python, paho-mqtt 2.x installed under target/ by the README's test
/// command) publishes and subscribes at every QoS over both protocol versions; v5 user
/// properties, content type and correlation data arrive unchanged.
#[test]
fn paho_python_client_v311_and_v5() {
    let deps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-deps/paho");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("paho/pubsub.py");
    let importable = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .env("PYTHONPATH", &deps)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        importable,
        "paho-mqtt is not installed in {}: run the README's test command (./scripts/test)",
        deps.display()
    );
    let gw = Gateway::start();
    for version in ["3.1.1", "5"] {
        let out = Command::new("python3")
            .arg(&script)
            .args([&gw.port().to_string(), version])
            .env("PYTHONPATH", &deps)
            .env("PYTHONWARNINGS", "ignore::DeprecationWarning")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "paho {version}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        if version == "5" {
            assert_eq!(
                lines,
                vec![
                    "paho/0 0 paho q0 [('k', 'v0')] text/plain b'c'",
                    "paho/1 1 paho q1 [('k', 'v1')] text/plain b'c'",
                    "paho/2 2 paho q2 [('k', 'v2')] text/plain b'c'",
                ]
            );
        } else {
            assert_eq!(
                lines,
                vec!["paho/0 0 paho q0", "paho/1 1 paho q1", "paho/2 2 paho q2"]
            );
        }
    }
}

/// A raw MQTT 3.1.1 client subscribed to `filter` at QoS 0.
fn qos0_subscriber(gw: &Gateway, client_id: &str, filter: &str) -> Raw {
    let mut sub = Raw::connect(gw.mqtt);
    sub.send(&raw::connect_v3(client_id, true, 30));
    assert_eq!(sub.read(WAIT).unwrap().kind(), raw::CONNACK);
    sub.send(&raw::subscribe_v3(1, filter, 0));
    assert_eq!(sub.read(WAIT).unwrap().body, vec![0, 1, 0]);
    sub
}

/// A PUBLISH that arrives split across socket reads reaches ntex-mqtt with a streamed
/// payload. QoS 0 messages like that must still arrive whole, each once, and in the order
/// the client sent them, also when the rest of the split packet comes in one read with the
/// packets after it (those must not overtake it). Both protocol versions.
#[test]
fn split_qos0_publishes_arrive_whole_and_in_order() {
    const COUNT: u32 = 1500;
    let gw = Gateway::start();
    let mut sub = qos0_subscriber(&gw, "split-sub", "split/#");

    let publishers: Vec<_> = [false, true]
        .into_iter()
        .map(|v5| {
            let addr = gw.mqtt;
            std::thread::spawn(move || {
                let (id, topic) = if v5 {
                    ("split-v5", "split/v5")
                } else {
                    ("split-v3", "split/v3")
                };
                let mut publisher = Raw::connect(addr);
                publisher.send(&if v5 {
                    raw::connect_v5(id, true, 30, &[])
                } else {
                    raw::connect_v3(id, true, 30)
                });
                assert_eq!(publisher.read(WAIT).unwrap().kind(), raw::CONNACK);
                let mut pending = Vec::new();
                for seq in 0..COUNT {
                    let mut payload = format!("{seq:08}").into_bytes();
                    payload.resize(100, b'.');
                    let packet = if v5 {
                        raw::publish_v5(topic, 0, 0, &[], &payload)
                    } else {
                        raw::publish_v3(topic, 0, 0, false, &payload)
                    };
                    if seq % 7 == 3 {
                        // Everything so far plus this packet's header and half its payload;
                        // the rest goes out with the packets after it.
                        let cut = packet.len() - 50;
                        pending.extend_from_slice(&packet[..cut]);
                        publisher.send(&pending);
                        pending = packet[cut..].to_vec();
                        std::thread::sleep(Duration::from_millis(3));
                    } else {
                        pending.extend_from_slice(&packet);
                        if pending.len() > 4000 {
                            publisher.send(&std::mem::take(&mut pending));
                        }
                    }
                }
                publisher.send(&pending);
                publisher
            })
        })
        .collect();

    let mut seen = std::collections::HashMap::<String, Vec<u32>>::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.values().map(Vec::len).sum::<usize>() < 2 * COUNT as usize
        && std::time::Instant::now() < deadline
    {
        let Some(p) = sub.read(Duration::from_secs(5)) else {
            break;
        };
        let publish = Publish::parse(&p, false);
        assert_eq!(publish.payload.len(), 100, "payload cut: {publish:?}");
        let seq: u32 = std::str::from_utf8(&publish.payload[..8])
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            publish.payload[8..].iter().all(|&b| b == b'.'),
            "payload mangled: {publish:?}"
        );
        seen.entry(publish.topic).or_default().push(seq);
    }
    let _publishers: Vec<Raw> = publishers.into_iter().map(|t| t.join().unwrap()).collect();
    let want: Vec<u32> = (0..COUNT).collect();
    for topic in ["split/v3", "split/v5"] {
        let got = seen.get(topic).map(Vec::as_slice).unwrap_or_default();
        let missing = want.iter().filter(|s| !got.contains(s)).count();
        assert_eq!(
            got.len(),
            want.len(),
            "{topic}: {} received, {missing} missing",
            got.len()
        );
        assert!(
            got == want.as_slice(),
            "{topic}: out of order, first difference at {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
}

/// A QoS 1 or 2 PUBLISH whose payload arrives in a later socket read (ntex streams it, and
/// the handler waits for it rather than answering at once) is acknowledged once and delivered
/// whole. Both protocol versions.
#[test]
fn split_qos1_and_qos2_publishes_are_acknowledged_and_arrive_whole() {
    let gw = Gateway::start();
    let mut sub = qos0_subscriber(&gw, "split12-sub", "split12/#");
    for v5 in [false, true] {
        let id = if v5 { "split12-v5" } else { "split12-v3" };
        let mut publisher = Raw::connect(gw.mqtt);
        publisher.send(&if v5 {
            raw::connect_v5(id, true, 30, &[])
        } else {
            raw::connect_v3(id, true, 30)
        });
        assert_eq!(publisher.read(WAIT).unwrap().kind(), raw::CONNACK);
        for (qos, packet_id) in [(1u8, 11u16), (2, 12)] {
            let topic = format!("split12/{id}/{qos}");
            let payload: Vec<u8> = (0..200u8).collect();
            let packet = if v5 {
                raw::publish_v5(&topic, qos, packet_id, &[], &payload)
            } else {
                raw::publish_v3(&topic, qos, packet_id, false, &payload)
            };
            let cut = packet.len() - 120;
            publisher.send(&packet[..cut]);
            std::thread::sleep(Duration::from_millis(50));
            publisher.send(&packet[cut..]);
            let ack = publisher.read(WAIT).expect("an acknowledgement");
            let want = if qos == 1 { raw::PUBACK } else { raw::PUBREC };
            assert_eq!(ack.kind(), want, "{id} QoS {qos}: {ack:?}");
            assert_eq!(ack.body[..2], packet_id.to_be_bytes(), "{id} QoS {qos}");
            if qos == 2 {
                publisher.send(&raw::ack(raw::PUBREL, packet_id));
                let complete = publisher.read(WAIT).expect("PUBCOMP");
                assert_eq!(complete.kind(), raw::PUBCOMP, "{id}: {complete:?}");
            }
            let delivered = Publish::parse(&sub.read(WAIT).expect("the message"), false);
            assert_eq!(delivered.topic, topic);
            assert_eq!(
                delivered.payload, payload,
                "{id} QoS {qos}: payload cut or mangled"
            );
        }
        // Nothing more: each was acknowledged and delivered once.
        assert!(publisher.read(Duration::from_millis(200)).is_none());
    }
    assert!(
        sub.read(Duration::from_millis(200)).is_none(),
        "delivered twice"
    );
}

/// A client that dies right after its last QoS 0 messages (one of them split across reads, so
/// they wait in the connection's QoS 0 lane): its will comes after those messages, not before.
#[test]
fn will_follows_the_last_qos0_messages_of_a_dead_client() {
    let gw = Gateway::start();
    let mut sub = qos0_subscriber(&gw, "will-order-sub", "order/#");

    for round in 0..5 {
        let mut client = Raw::connect(gw.mqtt);
        client.send(&raw::connect_v3_will(
            "will-order",
            true,
            30,
            "order/will",
            b"gone",
            0,
            false,
        ));
        assert_eq!(client.read(WAIT).unwrap().kind(), raw::CONNACK);
        let split = raw::publish_v3("order/data", 0, 0, false, &[b's'; 100]);
        let cut = split.len() - 40;
        client.send(&split[..cut]);
        std::thread::sleep(Duration::from_millis(20));
        let mut rest = split[cut..].to_vec();
        for n in 0..3u8 {
            rest.extend(raw::publish_v3("order/data", 0, 0, false, &[n; 10]));
        }
        client.send(&rest);
        drop(client); // no DISCONNECT: the will goes out

        let mut topics = Vec::new();
        while topics.len() < 5 {
            let Some(p) = sub.read(WAIT) else { break };
            topics.push(Publish::parse(&p, false).topic);
        }
        assert_eq!(
            topics,
            [
                "order/data",
                "order/data",
                "order/data",
                "order/data",
                "order/will"
            ],
            "round {round}"
        );
    }
}
