//! Retained messages, wills, persistent sessions, redelivery and exactly-once delivery,
//! through the real binary with the byte-level client (flags, packet ids and reason codes
//! are asserted exactly).

use std::time::{Duration, Instant};

use edgegw_tests::{
    Gateway,
    raw::{self, Packet, Publish, Raw},
};

/// Upper bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);
/// How long a client watches for something that must not arrive.
const QUIET: Duration = Duration::from_millis(1000);

const V3_CONNECTIONS: &str = r#"edgegw_broker_connections{protocol="3.1.1"}"#;
const V5_CONNECTIONS: &str = r#"edgegw_broker_connections{protocol="5"}"#;
const SESSIONS: &str = "edgegw_broker_sessions";
const WILLS: &str = "edgegw_broker_wills_published_total";
const QUEUE_FULL: &str = r#"edgegw_broker_dropped_messages_total{reason="queue_full"}"#;
const OFFLINE_QOS0: &str = r#"edgegw_broker_dropped_messages_total{reason="offline_qos0"}"#;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

struct ConnAck {
    session_present: bool,
    code: u8,
    properties: Vec<(u8, Vec<u8>)>,
}

impl ConnAck {
    fn property(&self, id: u8) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v.as_slice())
    }
}

fn read_connack(c: &mut Raw, v5: bool) -> ConnAck {
    let p = c.read(WAIT).expect("CONNACK");
    assert_eq!(p.kind(), raw::CONNACK, "expected CONNACK, got {p:?}");
    let properties = if v5 && p.body.len() > 2 {
        let (len, used) = raw::read_varint(&p.body[2..]).expect("CONNACK properties length");
        raw::parse_properties(&p.body[2 + used..2 + used + len])
    } else {
        Vec::new()
    };
    ConnAck {
        session_present: p.body[0] & 0x01 != 0,
        code: p.body[1],
        properties,
    }
}

/// A v3 connection that must be accepted; returns it with the session-present flag.
fn connect_v3(gw: &Gateway, id: &str, clean: bool) -> (Raw, bool) {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3(id, clean, 30));
    let ack = read_connack(&mut c, false);
    assert_eq!(ack.code, 0, "{id}: CONNACK return code");
    (c, ack.session_present)
}

/// A v5 connection that must be accepted.
fn connect_v5(gw: &Gateway, id: &str, clean: bool, properties: &[u8]) -> (Raw, ConnAck) {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5(id, clean, 30, properties));
    let ack = read_connack(&mut c, true);
    assert_eq!(ack.code, 0, "{id}: CONNACK reason code");
    (c, ack)
}

/// v5 Session Expiry Interval property (0x11).
fn expiry(secs: u32) -> Vec<u8> {
    let mut p = vec![0x11];
    p.extend(secs.to_be_bytes());
    p
}

/// v5 Will Delay Interval property (0x18).
fn will_delay(secs: u32) -> Vec<u8> {
    let mut p = vec![0x18];
    p.extend(secs.to_be_bytes());
    p
}

/// Sends a SUBSCRIBE and waits for its SUBACK, asserting packet id and the one granted
/// code. Returns the packets (PUBLISHes of retained messages) that came before it.
fn subscribe(c: &mut Raw, v5: bool, packet_id: u16, filter: &str, options: u8) -> Vec<Packet> {
    c.send(&if v5 {
        raw::subscribe_v5(packet_id, filter, options, &[])
    } else {
        raw::subscribe_v3(packet_id, filter, options)
    });
    let (ack, before) = c.read_kind(raw::SUBACK, WAIT);
    let ack = ack.unwrap_or_else(|| panic!("SUBACK for {filter}"));
    assert_eq!(&ack.body[..2], &packet_id.to_be_bytes(), "SUBACK packet id");
    assert_eq!(
        *ack.body.last().unwrap(),
        options & 0x03,
        "granted QoS for {filter}: {ack:?}"
    );
    before
}

/// A clean v3 client subscribed to `filter` at QoS 1.
fn watcher(gw: &Gateway, id: &str, filter: &str) -> Raw {
    let (mut c, _) = connect_v3(gw, id, true);
    let before = subscribe(&mut c, false, 1, filter, 1);
    assert!(before.is_empty(), "unexpected packets: {before:?}");
    c
}

/// A v3 PUBLISH with the RETAIN flag.
fn publish_v3_retained(topic: &str, qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = raw::publish_v3(topic, qos, packet_id, false, payload);
    p[0] |= 0x01;
    p
}

/// Publishes at QoS 1 from a v3 client and waits for the PUBACK: the broker has routed it.
fn publish_acked(c: &mut Raw, topic: &str, packet_id: u16, retain: bool, payload: &[u8]) {
    c.send(&if retain {
        publish_v3_retained(topic, 1, packet_id, payload)
    } else {
        raw::publish_v3(topic, 1, packet_id, false, payload)
    });
    let (ack, others) = c.read_kind(raw::PUBACK, WAIT);
    let ack = ack.unwrap_or_else(|| panic!("PUBACK for {topic}: {others:?}"));
    assert_eq!(ack.body[..2], packet_id.to_be_bytes(), "PUBACK packet id");
}

/// Publishes QoS 2 (MQTT 3.1.1) and completes the publisher's side: PUBREC, PUBREL, PUBCOMP.
fn publish_exactly_once(c: &mut Raw, topic: &str, packet_id: u16, payload: &[u8]) {
    c.send(&raw::publish_v3(topic, 2, packet_id, false, payload));
    let (rec, others) = c.read_kind(raw::PUBREC, WAIT);
    let rec = rec.unwrap_or_else(|| panic!("PUBREC for {topic}: {others:?}"));
    assert_eq!(rec.body[..2], packet_id.to_be_bytes(), "PUBREC packet id");
    c.send(&raw::ack(raw::PUBREL, packet_id));
    let (comp, others) = c.read_kind(raw::PUBCOMP, WAIT);
    let comp = comp.unwrap_or_else(|| panic!("PUBCOMP for {topic}: {others:?}"));
    assert_eq!(comp.body[..2], packet_id.to_be_bytes(), "PUBCOMP packet id");
}

/// The next packet, which must be a PUBLISH (not acknowledged).
fn next_publish(c: &mut Raw, v5: bool, what: &str) -> Publish {
    let p = c
        .read(WAIT)
        .unwrap_or_else(|| panic!("{what}: no PUBLISH within {WAIT:?}"));
    assert_eq!(
        p.kind(),
        raw::PUBLISH,
        "{what}: expected PUBLISH, got {p:?}"
    );
    Publish::parse(&p, v5)
}

/// Acknowledges a received QoS 1 PUBLISH (QoS 0: nothing to do).
fn ack(c: &mut Raw, p: &Publish) {
    match p.qos {
        0 => {}
        1 => c.send(&raw::ack(raw::PUBACK, p.packet_id.unwrap())),
        q => panic!("ack() handles QoS 0/1, got {q}"),
    }
}

/// Reads every PUBLISH until nothing arrives for `quiet`, completing QoS 1 and 2 flows.
fn drain(c: &mut Raw, v5: bool, quiet: Duration) -> Vec<Publish> {
    let mut got = Vec::new();
    while let Some(p) = c.read(quiet) {
        match p.kind() {
            raw::PUBLISH => {
                let publish = Publish::parse(&p, v5);
                match publish.qos {
                    1 => c.send(&raw::ack(raw::PUBACK, publish.packet_id.unwrap())),
                    2 => c.send(&raw::ack(raw::PUBREC, publish.packet_id.unwrap())),
                    _ => {}
                }
                got.push(publish);
            }
            raw::PUBREL => {
                let id = u16::from_be_bytes([p.body[0], p.body[1]]);
                c.send(&raw::ack(raw::PUBCOMP, id));
            }
            _ => panic!("unexpected packet while draining: {p:?}"),
        }
    }
    got
}

fn payloads(publishes: &[Publish]) -> Vec<String> {
    publishes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Asserts nothing arrives for `quiet`, then that the connection is still alive (a closed
/// connection would also be silent).
fn assert_silent(c: &mut Raw, quiet: Duration, what: &str) {
    if let Some(p) = c.read(quiet) {
        panic!("{what}: expected nothing, got {p:?}");
    }
    c.send(&raw::pingreq());
    let p = c
        .read(WAIT)
        .unwrap_or_else(|| panic!("{what}: connection is gone (no PINGRESP)"));
    assert_eq!(p.kind(), raw::PINGRESP, "{what}: got {p:?}");
}

/// A round trip that proves every packet sent before it was processed.
fn ping(c: &mut Raw) {
    c.send(&raw::pingreq());
    let (resp, others) = c.read_kind(raw::PINGRESP, WAIT);
    assert!(resp.is_some(), "no PINGRESP: {others:?}");
    assert!(others.is_empty(), "unexpected packets: {others:?}");
}

fn connections(gw: &Gateway) -> f64 {
    gw.metric(V3_CONNECTIONS) + gw.metric(V5_CONNECTIONS)
}

/// Waits until the broker has `n` open connections (it detaches a session before it
/// counts its connection as closed).
fn wait_connections(gw: &Gateway, n: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = connections(gw);
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} open connections, the broker reports {now}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_metric_eq(gw: &Gateway, sample: &str, n: f64) {
    let value = gw.wait_metric(sample, WAIT, |v| v == n);
    assert_eq!(value, n, "{sample}");
}

// ---------------------------------------------------------------------------------------
// 1. Retained messages
// ---------------------------------------------------------------------------------------

#[test]
fn retained_messages_are_set_replaced_cleared_and_replayed_with_retain() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect_v3(&gw, "ret-pub", true);
    publish_acked(&mut publisher, "r/a", 1, true, b"one");
    publish_acked(&mut publisher, "r/a", 2, true, b"two"); // replaces "one"
    publish_acked(&mut publisher, "r/b", 3, true, b"bee");
    publish_acked(&mut publisher, "r/b", 4, true, b""); // clears r/b
    publish_acked(&mut publisher, "r/c", 5, false, b"not retained");
    wait_metric_eq(&gw, "edgegw_broker_retained_messages", 1.0);

    for v5 in [false, true] {
        let id = format!("ret-sub-{v5}");
        let mut sub = if v5 {
            connect_v5(&gw, &id, true, &[]).0
        } else {
            connect_v3(&gw, &id, true).0
        };
        let mut got: Vec<Publish> = subscribe(&mut sub, v5, 1, "r/#", 1)
            .iter()
            .map(|p| Publish::parse(p, v5))
            .collect();
        for p in &got {
            ack(&mut sub, p);
        }
        got.extend(drain(&mut sub, v5, QUIET));
        assert_eq!(
            payloads(&got),
            vec!["two"],
            "v5={v5}: only the latest retained"
        );
        assert_eq!(got[0].topic, "r/a");
        assert!(got[0].retain, "v5={v5}: a retained replay has RETAIN set");
        assert_eq!(got[0].qos, 1);
        assert!(!got[0].dup);
    }

    // Clearing the last one: a new subscriber gets nothing.
    publish_acked(&mut publisher, "r/a", 6, true, b"");
    wait_metric_eq(&gw, "edgegw_broker_retained_messages", 0.0);
    let (mut late, _) = connect_v3(&gw, "ret-late", true);
    let before = subscribe(&mut late, false, 1, "r/#", 1);
    assert!(before.is_empty(), "{before:?}");
    assert_silent(&mut late, QUIET, "no retained message after clearing");
}

#[test]
fn live_delivery_clears_retain_unless_retain_as_published() {
    let gw = Gateway::start();
    // Subscribers before anything is retained, so every delivery below is live.
    let mut s3 = watcher(&gw, "live-v3", "l/#");
    let (mut s5, _) = connect_v5(&gw, "live-v5", true, &[]);
    assert!(subscribe(&mut s5, true, 1, "l/#", 0x01).is_empty());
    let (mut s5rap, _) = connect_v5(&gw, "live-v5-rap", true, &[]);
    assert!(subscribe(&mut s5rap, true, 1, "l/#", 0x01 | 0x08).is_empty());

    let (mut publisher, _) = connect_v3(&gw, "live-pub", true);
    publish_acked(&mut publisher, "l/x", 1, true, b"retained");
    publish_acked(&mut publisher, "l/x", 2, false, b"plain");

    let got = drain(&mut s3, false, QUIET);
    assert_eq!(payloads(&got), vec!["retained", "plain"]);
    assert!(
        !got[0].retain,
        "v3 live delivery of a retained publish: RETAIN cleared"
    );
    assert!(!got[1].retain);

    let got = drain(&mut s5, true, QUIET);
    assert_eq!(payloads(&got), vec!["retained", "plain"]);
    assert!(
        !got[0].retain,
        "v5 live delivery without retain-as-published: RETAIN cleared"
    );
    assert!(!got[1].retain);

    let got = drain(&mut s5rap, true, QUIET);
    assert_eq!(payloads(&got), vec!["retained", "plain"]);
    assert!(got[0].retain, "v5 retain-as-published keeps RETAIN");
    assert!(
        !got[1].retain,
        "retain-as-published does not set RETAIN on a plain publish"
    );
}

#[test]
fn v5_retain_handling_options() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect_v3(&gw, "rh-pub", true);
    publish_acked(&mut publisher, "rh/x", 1, true, b"kept");
    wait_metric_eq(&gw, "edgegw_broker_retained_messages", 1.0);

    // Retain handling 2: never on subscribe.
    let (mut never, _) = connect_v5(&gw, "rh-2", true, &[]);
    let before = subscribe(&mut never, true, 1, "rh/#", 0x01 | 0x20);
    assert!(before.is_empty(), "retain handling 2 sent {before:?}");
    assert_silent(&mut never, QUIET, "retain handling 2");

    // Retain handling 1: only for a new subscription.
    let (mut new_only, _) = connect_v5(&gw, "rh-1", true, &[]);
    let mut got: Vec<Publish> = subscribe(&mut new_only, true, 1, "rh/#", 0x01 | 0x10)
        .iter()
        .map(|p| Publish::parse(p, true))
        .collect();
    for p in &got {
        ack(&mut new_only, p);
    }
    got.extend(drain(&mut new_only, true, QUIET));
    assert_eq!(
        payloads(&got),
        vec!["kept"],
        "retain handling 1, new subscription"
    );
    assert!(got[0].retain);

    let before = subscribe(&mut new_only, true, 2, "rh/#", 0x01 | 0x10);
    assert!(
        before.is_empty(),
        "retain handling 1 on an existing subscription sent {before:?}"
    );
    assert_silent(
        &mut new_only,
        QUIET,
        "retain handling 1, existing subscription",
    );

    // Control: retain handling 0 on the same existing subscription does send it.
    let mut got: Vec<Publish> = subscribe(&mut new_only, true, 3, "rh/#", 0x01)
        .iter()
        .map(|p| Publish::parse(p, true))
        .collect();
    for p in &got {
        ack(&mut new_only, p);
    }
    got.extend(drain(&mut new_only, true, QUIET));
    assert_eq!(
        payloads(&got),
        vec!["kept"],
        "retain handling 0, existing subscription"
    );
    assert!(got[0].retain);
}

// ---------------------------------------------------------------------------------------
// 2. Wills
// ---------------------------------------------------------------------------------------

#[test]
fn will_on_abnormal_disconnect_not_on_normal_disconnect() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");

    // Abnormal: the socket goes away without DISCONNECT, v5 and v3.
    let mut c5 = Raw::connect(gw.mqtt);
    c5.send(&raw::connect_v5_will(
        "w5-abnormal",
        true,
        30,
        &[],
        &[],
        "will/w5",
        b"v5 gone",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut c5, true).code, 0);
    let mut c3 = Raw::connect(gw.mqtt);
    c3.send(&raw::connect_v3_will(
        "w3-abnormal",
        true,
        30,
        "will/w3",
        b"v3 gone",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut c3, false).code, 0);
    drop(c5);
    let p = next_publish(&mut watch, false, "v5 will");
    ack(&mut watch, &p);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/w5", &b"v5 gone"[..])
    );
    assert!(!p.retain);
    drop(c3);
    let p = next_publish(&mut watch, false, "v3 will");
    ack(&mut watch, &p);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/w3", &b"v3 gone"[..])
    );
    wait_metric_eq(&gw, WILLS, 2.0);

    // Normal: DISCONNECT first, v5 and v3.
    let mut n5 = Raw::connect(gw.mqtt);
    n5.send(&raw::connect_v5_will(
        "w5-normal",
        true,
        30,
        &[],
        &[],
        "will/n5",
        b"must not",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut n5, true).code, 0);
    let mut n3 = Raw::connect(gw.mqtt);
    n3.send(&raw::connect_v3_will(
        "w3-normal",
        true,
        30,
        "will/n3",
        b"must not",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut n3, false).code, 0);
    wait_connections(&gw, 3.0);
    n5.send(&raw::disconnect());
    n3.send(&raw::disconnect());
    assert!(
        n5.closed_within(WAIT, &mut Vec::new()),
        "v5 closed after DISCONNECT"
    );
    assert!(
        n3.closed_within(WAIT, &mut Vec::new()),
        "v3 closed after DISCONNECT"
    );
    drop((n5, n3));
    wait_connections(&gw, 1.0);
    assert_silent(&mut watch, QUIET, "no will after a normal DISCONNECT");
    assert_eq!(gw.metric(WILLS), 2.0);
}

#[test]
fn v5_disconnect_with_will_message_publishes_the_will() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5_will(
        "w-0x04",
        true,
        30,
        &[],
        &[],
        "will/0x04",
        b"asked for",
        0,
        false,
    ));
    assert_eq!(read_connack(&mut c, true).code, 0);
    c.send(&raw::disconnect_v5(0x04, &[]));
    let p = next_publish(&mut watch, false, "will after DISCONNECT 0x04");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/0x04", &b"asked for"[..])
    );
    assert!(c.closed_within(WAIT, &mut Vec::new()));
    assert_eq!(gw.metric(WILLS), 1.0);
}

#[test]
fn v5_will_delay_interval_delays_the_will() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5_will(
        "w-delay",
        false,
        30,
        &expiry(30),
        &will_delay(2),
        "will/delay",
        b"late",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut c, true).code, 0);
    wait_connections(&gw, 2.0);
    drop(c);
    let dropped = Instant::now();
    wait_connections(&gw, 1.0);
    // Shortly before the 2 s delay ends it must not be there yet.
    let early = Duration::from_millis(1500).saturating_sub(dropped.elapsed());
    if let Some(p) = watch.read(early) {
        panic!(
            "will arrived after {:?}, before its 2 s delay: {p:?}",
            dropped.elapsed()
        );
    }
    let p = next_publish(&mut watch, false, "delayed will");
    let after = dropped.elapsed();
    ack(&mut watch, &p);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/delay", &b"late"[..])
    );
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(8),
        "delayed will after {after:?}"
    );
    assert_eq!(gw.metric(WILLS), 1.0);
}

#[test]
fn v5_reconnect_within_will_delay_cancels_the_will() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5_will(
        "w-cancel",
        false,
        30,
        &expiry(30),
        &will_delay(2),
        "will/cancel",
        b"must not",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut c, true).code, 0);
    wait_connections(&gw, 2.0);
    drop(c);
    let dropped = Instant::now();
    wait_connections(&gw, 1.0); // the broker saw it go; the will is pending
    let (mut again, ack) = connect_v5(&gw, "w-cancel", false, &expiry(30));
    assert!(
        dropped.elapsed() < Duration::from_millis(1500),
        "reconnect took too long for this test: {:?}",
        dropped.elapsed()
    );
    assert!(ack.session_present, "session kept across the reconnect");
    // Watch well past the delay.
    let watch_for = Duration::from_millis(4000).saturating_sub(dropped.elapsed());
    assert_silent(&mut watch, watch_for, "will cancelled by the reconnect");
    assert_eq!(gw.metric(WILLS), 0.0);
    // The new connection registered no will: a normal end publishes nothing either.
    again.send(&raw::disconnect());
    assert!(again.closed_within(WAIT, &mut Vec::new()));
    assert_silent(
        &mut watch,
        QUIET,
        "no will after the new connection's DISCONNECT",
    );
}

/// A client whose old connection the broker still thinks alive reconnects: the takeover is
/// a new connection to the session within the will delay, so the will must not be sent
/// (MQTT 5.0 §3.1.4 point 3 refers to §3.1.2.5; [MQTT-3.1.3-9]).
#[test]
fn v5_takeover_within_will_delay_does_not_publish_the_will() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");
    let mut old = Raw::connect(gw.mqtt);
    old.send(&raw::connect_v5_will(
        "w-takeover",
        false,
        30,
        &expiry(30),
        &will_delay(2),
        "will/takeover",
        b"must not",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut old, true).code, 0);
    let (_new, ack) = connect_v5(&gw, "w-takeover", false, &expiry(30));
    assert!(ack.session_present);
    let mut seen = Vec::new();
    assert!(old.closed_within(WAIT, &mut seen), "old connection closed");
    let taken = Instant::now();
    wait_connections(&gw, 2.0);
    let watch_for = Duration::from_millis(4000).saturating_sub(taken.elapsed());
    assert_silent(
        &mut watch,
        watch_for,
        "will of a taken-over connection within its delay",
    );
    assert_eq!(gw.metric(WILLS), 0.0);
}

#[test]
fn v5_will_delay_beyond_session_expiry_publishes_at_session_end() {
    let gw = Gateway::start();
    let mut watch = watcher(&gw, "will-watch", "will/#");
    let baseline_sessions = gw.metric(SESSIONS);
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5_will(
        "w-expiry",
        false,
        30,
        &expiry(1),
        &will_delay(30),
        "will/expiry",
        b"session over",
        1,
        false,
    ));
    assert_eq!(read_connack(&mut c, true).code, 0);
    wait_metric_eq(&gw, SESSIONS, baseline_sessions + 1.0);
    drop(c);
    let dropped = Instant::now();
    // Not at once: the session lives for 1 s.
    if let Some(p) = watch.read(Duration::from_millis(500)) {
        panic!(
            "will after {:?}, before the session ended: {p:?}",
            dropped.elapsed()
        );
    }
    let p = next_publish(&mut watch, false, "will at session end");
    let after = dropped.elapsed();
    ack(&mut watch, &p);
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/expiry", &b"session over"[..])
    );
    assert!(
        after < Duration::from_secs(6),
        "will published {after:?} after the drop; the session expiry is 1 s"
    );
    wait_metric_eq(&gw, SESSIONS, baseline_sessions);
    assert_eq!(gw.metric(WILLS), 1.0);
}

// ---------------------------------------------------------------------------------------
// 3. Sessions
// ---------------------------------------------------------------------------------------

#[test]
fn v3_persistent_session_receives_qos1_published_while_offline() {
    let gw = Gateway::start();
    let (mut sub, present) = connect_v3(&gw, "p3", false);
    assert!(!present, "first connect: no session yet");
    assert!(subscribe(&mut sub, false, 1, "off/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 0.0);

    let (mut publisher, _) = connect_v3(&gw, "p3-pub", true);
    publish_acked(&mut publisher, "off/1", 1, false, b"m1");
    publish_acked(&mut publisher, "off/2", 2, false, b"m2");

    let (mut sub, present) = connect_v3(&gw, "p3", false);
    assert!(present, "CONNACK session present = 1");
    let got = drain(&mut sub, false, QUIET);
    assert_eq!(payloads(&got), vec!["m1", "m2"]);
    assert!(
        got.iter().all(|p| p.qos == 1 && !p.dup && !p.retain),
        "{got:?}"
    );
    assert_eq!(got[0].topic, "off/1");

    // Still subscribed: live delivery continues on the resumed session.
    publish_acked(&mut publisher, "off/3", 3, false, b"m3");
    assert_eq!(payloads(&drain(&mut sub, false, QUIET)), vec!["m3"]);
}

#[test]
fn v3_clean_session_keeps_nothing() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect_v3(&gw, "c3-pub", true);

    // A clean session is gone at disconnect.
    let (mut sub, present) = connect_v3(&gw, "c3", true);
    assert!(!present);
    assert!(subscribe(&mut sub, false, 1, "cs/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 1.0);
    publish_acked(&mut publisher, "cs/1", 1, false, b"lost");
    let (mut sub, present) = connect_v3(&gw, "c3", false);
    assert!(!present, "no session after a clean session");
    assert_silent(&mut sub, QUIET, "nothing queued for a clean session");
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 1.0);

    // A clean session connect discards an existing persistent session.
    let (mut sub, _) = connect_v3(&gw, "c3b", false);
    assert!(subscribe(&mut sub, false, 1, "cs/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 1.0);
    publish_acked(&mut publisher, "cs/2", 2, false, b"discarded");
    let (mut sub, present) = connect_v3(&gw, "c3b", true);
    assert!(!present, "clean session: session present = 0");
    assert_silent(&mut sub, QUIET, "the persistent session was discarded");
    publish_acked(&mut publisher, "cs/3", 3, false, b"unsubscribed");
    assert_silent(&mut sub, QUIET, "its subscriptions went with it");
}

#[test]
fn qos0_is_not_queued_for_an_offline_session() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "q0", false);
    assert!(subscribe(&mut sub, false, 1, "q/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 0.0);

    let (mut publisher, _) = connect_v3(&gw, "q0-pub", true);
    publisher.send(&raw::publish_v3("q/0", 0, 0, false, b"qos0"));
    publish_acked(&mut publisher, "q/1", 1, false, b"qos1");
    wait_metric_eq(&gw, OFFLINE_QOS0, 1.0);

    let (mut sub, present) = connect_v3(&gw, "q0", false);
    assert!(present);
    let got = drain(&mut sub, false, QUIET);
    assert_eq!(payloads(&got), vec!["qos1"]);
}

#[test]
fn max_queued_bounds_the_offline_queue() {
    let gw = Gateway::start_with("  limits:\n    max_queued: 3\n", "");
    let (mut sub, _) = connect_v3(&gw, "mq", false);
    assert!(subscribe(&mut sub, false, 1, "mq/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 0.0);

    let (mut publisher, _) = connect_v3(&gw, "mq-pub", true);
    for i in 0..5u16 {
        publish_acked(
            &mut publisher,
            "mq/x",
            i + 1,
            false,
            format!("m{i}").as_bytes(),
        );
    }
    assert_eq!(gw.metric(QUEUE_FULL), 2.0);
    assert_eq!(gw.metric("edgegw_broker_queued_messages"), 3.0);

    let (mut sub, present) = connect_v3(&gw, "mq", false);
    assert!(present);
    let got = drain(&mut sub, false, QUIET);
    assert_eq!(payloads(&got), vec!["m0", "m1", "m2"]);
    assert_eq!(gw.metric(QUEUE_FULL), 2.0);
}

#[test]
fn v3_takeover_closes_the_first_connection() {
    let gw = Gateway::start();
    let (mut first, _) = connect_v3(&gw, "same", false);
    assert!(subscribe(&mut first, false, 1, "to/#", 1).is_empty());
    let (mut second, present) = connect_v3(&gw, "same", false);
    assert!(present, "the second connection resumes the session");
    let mut seen = Vec::new();
    assert!(
        first.closed_within(WAIT, &mut seen),
        "first connection still open"
    );
    assert!(seen.is_empty(), "v3 has no server DISCONNECT: {seen:?}");
    wait_connections(&gw, 1.0);

    // The second connection owns the session (and its subscription).
    let (mut publisher, _) = connect_v3(&gw, "to-pub", true);
    publish_acked(&mut publisher, "to/1", 1, false, b"to the second");
    assert_eq!(
        payloads(&drain(&mut second, false, QUIET)),
        vec!["to the second"]
    );
}

#[test]
fn v5_takeover_sends_disconnect_session_taken_over() {
    let gw = Gateway::start();
    let (mut first, ack) = connect_v5(&gw, "same5", false, &expiry(60));
    assert!(!ack.session_present);
    assert!(subscribe(&mut first, true, 1, "to/#", 1).is_empty());

    // Takeover that resumes the session.
    let (mut second, ack) = connect_v5(&gw, "same5", false, &expiry(60));
    assert!(ack.session_present);
    let mut seen = Vec::new();
    assert!(
        first.closed_within(WAIT, &mut seen),
        "first connection still open"
    );
    let disconnect = seen
        .iter()
        .find(|p| p.kind() == raw::DISCONNECT)
        .unwrap_or_else(|| panic!("DISCONNECT before the close: {seen:?}"));
    assert_eq!(disconnect.body[0], 0x8E, "reason Session taken over");

    // Takeover with clean start: the session is replaced, the owner still told 0x8E.
    let (mut third, ack) = connect_v5(&gw, "same5", true, &expiry(60));
    assert!(!ack.session_present);
    let mut seen = Vec::new();
    assert!(
        second.closed_within(WAIT, &mut seen),
        "second connection still open"
    );
    let disconnect = seen
        .iter()
        .find(|p| p.kind() == raw::DISCONNECT)
        .unwrap_or_else(|| panic!("DISCONNECT before the close: {seen:?}"));
    assert_eq!(disconnect.body[0], 0x8E, "reason Session taken over");
    wait_connections(&gw, 1.0);

    let (mut publisher, _) = connect_v3(&gw, "to-pub", true);
    assert!(subscribe(&mut third, true, 1, "to/#", 1).is_empty());
    publish_acked(&mut publisher, "to/1", 1, false, b"to the third");
    assert_eq!(
        payloads(&drain(&mut third, true, QUIET)),
        vec!["to the third"]
    );
}

#[test]
fn v5_session_expiry_interval() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect_v3(&gw, "exp-pub", true);
    let baseline_sessions = gw.metric(SESSIONS);

    let (mut sub, ack) = connect_v5(&gw, "exp5", false, &expiry(2));
    assert!(!ack.session_present);
    assert!(subscribe(&mut sub, true, 1, "exp/#", 1).is_empty());
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 1.0);

    // Within the interval the session survives and queues.
    std::thread::sleep(Duration::from_millis(800));
    publish_acked(&mut publisher, "exp/1", 1, false, b"kept");
    let (mut sub, ack) = connect_v5(&gw, "exp5", false, &expiry(2));
    assert!(ack.session_present, "reconnect within the expiry interval");
    assert_eq!(payloads(&drain(&mut sub, true, QUIET)), vec!["kept"]);
    sub.send(&raw::disconnect());
    drop(sub);
    wait_connections(&gw, 1.0);
    let gone = Instant::now();

    // After it the session is gone.
    wait_metric_eq(&gw, SESSIONS, baseline_sessions);
    assert!(
        gone.elapsed() >= Duration::from_millis(1500),
        "session ended after {:?}, its expiry is 2 s",
        gone.elapsed()
    );
    publish_acked(&mut publisher, "exp/2", 2, false, b"nobody");
    let (mut sub, ack) = connect_v5(&gw, "exp5", false, &expiry(2));
    assert!(!ack.session_present, "the session expired");
    assert_silent(&mut sub, QUIET, "no queue, no subscription after expiry");
}

#[test]
fn v5_empty_client_id_gets_an_assigned_identifier() {
    let gw = Gateway::start();
    let (mut a, ack_a) = connect_v5(&gw, "", true, &[]);
    let (_b, ack_b) = connect_v5(&gw, "", true, &[]);
    let id = |ack: &ConnAck| {
        let v = ack
            .property(0x12)
            .expect("Assigned Client Identifier (0x12) in CONNACK");
        let len = usize::from(u16::from_be_bytes([v[0], v[1]]));
        String::from_utf8(v[2..2 + len].to_vec()).unwrap()
    };
    let (ida, idb) = (id(&ack_a), id(&ack_b));
    assert!(!ida.is_empty());
    assert_ne!(ida, idb, "assigned identifiers are unique");
    ping(&mut a);
    // A v3 client with an empty id and a clean session is accepted too.
    let (_c, present) = connect_v3(&gw, "", true);
    assert!(!present);
}

#[test]
fn v3_empty_client_id_with_persistent_session_is_refused() {
    let gw = Gateway::start();
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3("", false, 30));
    let p = c.read(WAIT).expect("CONNACK");
    assert_eq!(p.kind(), raw::CONNACK);
    assert_eq!(p.body, vec![0x00, 0x02], "identifier rejected");
    assert!(
        c.closed_within(WAIT, &mut Vec::new()),
        "closed after refusal"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Redelivery
// ---------------------------------------------------------------------------------------

/// A persistent subscriber, v3 (clean session 0) or v5 (clean start 0, expiry 60 s).
fn connect_persistent(gw: &Gateway, id: &str, v5: bool) -> (Raw, bool) {
    if v5 {
        let (c, ack) = connect_v5(gw, id, false, &expiry(60));
        (c, ack.session_present)
    } else {
        connect_v3(gw, id, false)
    }
}

fn redelivery(qos: u8, v5: bool) {
    let gw = Gateway::start();
    let id = format!("rd{qos}");
    let (mut sub, _) = connect_persistent(&gw, &id, v5);
    assert!(subscribe(&mut sub, v5, 1, "rd/#", qos).is_empty());
    let (mut publisher, _) = connect_v3(&gw, "rd-pub", true);

    // Received but not acknowledged, then the socket drops.
    if qos == 2 {
        publish_exactly_once(&mut publisher, "rd/1", 1, b"hello");
    } else {
        publish_acked(&mut publisher, "rd/1", 1, false, b"hello");
    }
    let first = next_publish(&mut sub, v5, "first delivery");
    assert_eq!((first.qos, first.dup), (qos, false));
    assert_eq!(first.payload, b"hello");
    let packet_id = first.packet_id.expect("packet id");
    drop(sub);
    wait_connections(&gw, 1.0);

    // Re-sent with DUP and the same packet id.
    let (mut sub, present) = connect_persistent(&gw, &id, v5);
    assert!(present);
    let again = next_publish(&mut sub, v5, "redelivery");
    assert_eq!(again.payload, b"hello");
    assert!(again.dup, "redelivery has DUP set: {again:?}");
    assert_eq!(again.packet_id, Some(packet_id), "same packet id");
    assert_eq!(again.qos, qos);
    if qos == 2 {
        sub.send(&raw::ack(raw::PUBREC, packet_id));
        let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
        let rel = rel.unwrap_or_else(|| panic!("PUBREL: {others:?}"));
        assert!(others.is_empty(), "{others:?}");
        assert_eq!(rel.body[..2], packet_id.to_be_bytes());
        sub.send(&raw::ack(raw::PUBCOMP, packet_id));
    } else {
        sub.send(&raw::ack(raw::PUBACK, packet_id));
    }
    ping(&mut sub); // the ack was processed
    drop(sub);
    wait_connections(&gw, 1.0);

    // Acknowledged: not sent again; the next message is the new one.
    let (mut sub, present) = connect_persistent(&gw, &id, v5);
    assert!(present);
    assert_silent(&mut sub, QUIET, "acknowledged message not re-sent");
    publish_acked(&mut publisher, "rd/2", 2, false, b"next");
    let got = drain(&mut sub, v5, QUIET);
    assert_eq!(payloads(&got), vec!["next"]);
    assert!(!got[0].dup);
}

#[test]
fn v3_qos1_unacked_is_redelivered_with_dup_until_puback() {
    redelivery(1, false);
}

#[test]
fn v5_qos1_unacked_is_redelivered_with_dup_until_puback() {
    redelivery(1, true);
}

#[test]
fn v3_qos2_unreceived_is_redelivered_with_dup_until_pubrec() {
    redelivery(2, false);
}

#[test]
fn v5_qos2_unreceived_is_redelivered_with_dup_until_pubrec() {
    redelivery(2, true);
}

/// The broker checks a 3.1.1 client's acknowledgements against the delivery they name: a
/// repeated PUBREC is answered with PUBREL again, acks for no delivery in flight are
/// ignored (a PUBREC still gets its PUBREL), and an ack of the wrong kind for its delivery's
/// QoS is a protocol violation that closes the connection while the session keeps the
/// delivery for the next one.
#[test]
fn v3_acks_are_checked_against_their_delivery() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "acks", false);
    assert!(subscribe(&mut sub, false, 1, "acks/two", 2).is_empty());
    assert!(subscribe(&mut sub, false, 2, "acks/one", 1).is_empty());
    let (mut publisher, _) = connect_v3(&gw, "acks-pub", true);

    publish_exactly_once(&mut publisher, "acks/two", 2, b"exactly");
    let two = next_publish(&mut sub, false, "QoS 2 delivery");
    assert_eq!(two.qos, 2);
    let id = two.packet_id.unwrap();
    for round in ["PUBREL", "PUBREL again for a repeated PUBREC"] {
        sub.send(&raw::ack(raw::PUBREC, id));
        let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
        assert!(others.is_empty(), "{round}: {others:?}");
        assert_eq!(rel.expect(round).body[..2], id.to_be_bytes(), "{round}");
    }
    sub.send(&raw::ack(raw::PUBCOMP, id));
    // Acks for nothing in flight: ignored, a PUBREC answered with PUBREL.
    let unknown = id.wrapping_add(1000).max(1);
    sub.send(&raw::ack(raw::PUBACK, unknown));
    sub.send(&raw::ack(raw::PUBCOMP, unknown));
    sub.send(&raw::ack(raw::PUBREC, unknown));
    let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(
        rel.expect("PUBREL for an unknown PUBREC").body[..2],
        unknown.to_be_bytes()
    );
    ping(&mut sub);

    // A PUBREC for a QoS 1 delivery: the connection is closed, the delivery stays queued
    // in the session and comes again (DUP) on the next connection.
    publisher.send(&raw::publish_v3("acks/one", 1, 3, false, b"at least"));
    assert!(publisher.read_kind(raw::PUBACK, WAIT).0.is_some(), "PUBACK");
    let one = next_publish(&mut sub, false, "QoS 1 delivery");
    assert_eq!(one.qos, 1);
    let errors = gw.metric(r#"edgegw_broker_protocol_errors_total{kind="violation"}"#);
    sub.send(&raw::ack(raw::PUBREC, one.packet_id.unwrap()));
    let mut seen = Vec::new();
    assert!(sub.closed_within(WAIT, &mut seen), "still open: {seen:?}");
    assert!(seen.iter().all(|p| p.kind() != raw::PUBREL), "{seen:?}");
    let after = gw.wait_metric(
        r#"edgegw_broker_protocol_errors_total{kind="violation"}"#,
        WAIT,
        |n| n > errors,
    );
    assert!(after > errors, "protocol violation not counted");
    wait_connections(&gw, 1.0);
    let (mut sub, present) = connect_v3(&gw, "acks", false);
    assert!(present);
    let again = next_publish(&mut sub, false, "QoS 1 delivery again");
    assert!(again.dup, "{again:?}");
    assert_eq!(again.packet_id, one.packet_id);
    assert_eq!(again.payload, b"at least");
    sub.send(&raw::ack(raw::PUBACK, one.packet_id.unwrap()));
    ping(&mut sub);
}

/// MQTT 5: a PUBREC with a failure reason code ends its QoS 2 delivery without PUBREL (it
/// is not sent again after a reconnect), a PUBREC for no delivery in flight is answered with
/// PUBREL 0x92 (packet identifier not found), a normal PUBREC with a plain PUBREL.
#[test]
fn v5_pubrec_reason_codes_end_or_continue_the_flow() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v5(&gw, "acks5", false, &expiry(600));
    assert!(subscribe(&mut sub, true, 1, "acks5/#", 2).is_empty());
    let (mut publisher, _) = connect_v3(&gw, "acks5-pub", true);
    let mut publish = |id, payload| publish_exactly_once(&mut publisher, "acks5/x", id, payload);

    publish(1, b"refused");
    let refused = next_publish(&mut sub, true, "first delivery");
    assert_eq!(
        (refused.qos, refused.payload.as_slice()),
        (2, &b"refused"[..])
    );
    let [hi, lo] = refused.packet_id.unwrap().to_be_bytes();
    // PUBREC, reason 0x80 (unspecified error): no PUBREL follows.
    sub.send(&[0x50, 0x03, hi, lo, 0x80]);
    ping(&mut sub);

    let unknown = refused.packet_id.unwrap().wrapping_add(1000).max(1);
    sub.send(&raw::ack(raw::PUBREC, unknown));
    let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
    assert!(others.is_empty(), "{others:?}");
    let rel = rel.expect("PUBREL for an unknown packet id");
    assert_eq!(rel.body[..2], unknown.to_be_bytes());
    assert_eq!(rel.body.get(2), Some(&0x92), "reason code: {rel:?}");

    publish(2, b"taken");
    let taken = next_publish(&mut sub, true, "second delivery");
    assert_eq!(taken.payload, b"taken");
    let id = taken.packet_id.unwrap();
    sub.send(&raw::ack(raw::PUBREC, id));
    let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
    assert!(others.is_empty(), "{others:?}");
    let rel = rel.expect("PUBREL");
    assert_eq!(rel.body[..2], id.to_be_bytes());
    assert!(rel.body.len() == 2 || rel.body[2] == 0, "success: {rel:?}");
    sub.send(&raw::ack(raw::PUBCOMP, id));
    ping(&mut sub);
    drop(sub);
    wait_connections(&gw, 1.0);

    // Nothing is owed after a reconnect: the refused delivery ended, the other completed.
    let (mut sub, ack) = connect_v5(&gw, "acks5", false, &expiry(600));
    assert!(ack.session_present);
    let mut seen = Vec::new();
    assert!(!sub.closed_within(QUIET, &mut seen), "closed");
    assert!(seen.is_empty(), "owed nothing, got {seen:?}");
    ping(&mut sub);
}

/// Beyond withholding PUBREC: once PUBREC has arrived, what a reconnect owes is the PUBREL,
/// not the PUBLISH again (MQTT 3.1.1 §4.4 [MQTT-4.4.0-1], 5.0 §4.4 [MQTT-4.4.0-1]).
#[test]
fn v3_qos2_pubrec_received_resumes_with_pubrel() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "rel", false);
    assert!(subscribe(&mut sub, false, 1, "rel/#", 2).is_empty());
    let (mut publisher, _) = connect_v3(&gw, "rel-pub", true);
    publish_exactly_once(&mut publisher, "rel/1", 1, b"hello");

    let first = next_publish(&mut sub, false, "first delivery");
    let packet_id = first.packet_id.expect("packet id");
    sub.send(&raw::ack(raw::PUBREC, packet_id));
    let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(rel.expect("PUBREL").body[..2], packet_id.to_be_bytes());
    drop(sub); // PUBCOMP withheld
    wait_connections(&gw, 1.0);

    let (mut sub, present) = connect_v3(&gw, "rel", false);
    assert!(present);
    let p = sub.read(WAIT).expect("the owed PUBREL after reconnect");
    assert_eq!(
        p.kind(),
        raw::PUBREL,
        "expected PUBREL {packet_id}, got {}",
        if p.kind() == raw::PUBLISH {
            format!("{:?}", Publish::parse(&p, false))
        } else {
            format!("{p:?}")
        }
    );
    assert_eq!(p.header, 0x62);
    assert_eq!(p.body[..2], packet_id.to_be_bytes());
    sub.send(&raw::ack(raw::PUBCOMP, packet_id));
    ping(&mut sub);
    drop(sub);
    wait_connections(&gw, 1.0);

    let (mut sub, present) = connect_v3(&gw, "rel", false);
    assert!(present);
    assert_silent(&mut sub, QUIET, "completed QoS 2 flow owes nothing");
}

// ---------------------------------------------------------------------------------------
// 5. Exactly once inbound
// ---------------------------------------------------------------------------------------

/// A PUBLISH as MQTT 3.1.1 or 5 (no properties), DUP set if `dup`.
fn publish_either(v5: bool, topic: &str, qos: u8, id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    if v5 {
        let mut p = raw::publish_v5(topic, qos, id, &[], payload);
        if dup {
            p[0] |= 0x08;
        }
        p
    } else {
        raw::publish_v3(topic, qos, id, dup, payload)
    }
}

/// Reads the ack `kind` for packet `id`, with nothing before it; on MQTT 5 its reason code
/// must be a success.
fn expect_ack(c: &mut Raw, v5: bool, kind: u8, id: u16) {
    let (p, others) = c.read_kind(kind, WAIT);
    let p = p.unwrap_or_else(|| panic!("packet type {kind}: {others:?}"));
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(p.body[..2], id.to_be_bytes());
    if v5 && p.body.len() > 2 {
        assert!(p.body[2] < 0x80, "reason code {:#x}", p.body[2]);
    }
}

fn exactly_once_inbound(v5: bool) {
    let gw = Gateway::start();
    let mut sub = watcher(&gw, "eo-sub", "eo/#");
    let connect = |gw: &Gateway| connect_persistent(gw, "eo-pub", v5);
    let publish = |qos: u8, id: u16, dup: bool, payload: &[u8]| {
        publish_either(v5, "eo/t", qos, id, dup, payload)
    };
    let expect = |c: &mut Raw, kind: u8, id: u16| expect_ack(c, v5, kind, id);

    let (mut publisher, present) = connect(&gw);
    assert!(!present);
    publisher.send(&publish(2, 42, false, b"once"));
    expect(&mut publisher, raw::PUBREC, 42);
    drop(publisher); // PUBREL never sent
    wait_connections(&gw, 1.0);

    let (mut publisher, present) = connect(&gw);
    assert!(present, "persistent session resumed");
    publisher.send(&publish(2, 42, true, b"once"));
    expect(&mut publisher, raw::PUBREC, 42);
    publisher.send(&raw::ack(raw::PUBREL, 42));
    expect(&mut publisher, raw::PUBCOMP, 42);
    // A marker routed after the re-send: any duplicate would come before it.
    publisher.send(&publish(1, 43, false, b"marker"));
    expect(&mut publisher, raw::PUBACK, 43);
    let got = drain(&mut sub, false, QUIET);
    assert_eq!(payloads(&got), vec!["once", "marker"], "v5={v5}");

    // Released: the packet id is free again and a new message with it is routed.
    publisher.send(&publish(2, 42, false, b"new"));
    expect(&mut publisher, raw::PUBREC, 42);
    publisher.send(&raw::ack(raw::PUBREL, 42));
    expect(&mut publisher, raw::PUBCOMP, 42);
    assert_eq!(
        payloads(&drain(&mut sub, false, QUIET)),
        vec!["new"],
        "v5={v5}"
    );
}

#[test]
fn v3_qos2_resent_after_reconnect_is_delivered_exactly_once() {
    exactly_once_inbound(false);
}

#[test]
fn v5_qos2_resent_after_reconnect_is_delivered_exactly_once() {
    exactly_once_inbound(true);
}

/// A publisher that got PUBREC before its connection dropped re-sends only PUBREL after
/// reconnecting [MQTT-4.4.0-1]. That PUBREL must release the packet id the session kept:
/// else a later new message re-sent with DUP under the same id (its first send lost with a
/// dropped connection) would be taken for the old one and dropped.
fn release_after_reconnect(v5: bool) {
    let gw = Gateway::start();
    let mut sub = watcher(&gw, "rr-sub", "rr/#");
    let connect = |gw: &Gateway| connect_persistent(gw, "rr-pub", v5);
    let publish =
        |id: u16, dup: bool, payload: &[u8]| publish_either(v5, "rr/t", 2, id, dup, payload);
    let expect = |c: &mut Raw, kind: u8, id: u16| expect_ack(c, v5, kind, id);

    let (mut publisher, _) = connect(&gw);
    publisher.send(&publish(50, false, b"first"));
    expect(&mut publisher, raw::PUBREC, 50);
    drop(publisher); // PUBREL not sent yet
    wait_connections(&gw, 1.0);

    let (mut publisher, present) = connect(&gw);
    assert!(present, "persistent session resumed");
    publisher.send(&raw::ack(raw::PUBREL, 50));
    expect(&mut publisher, raw::PUBCOMP, 50);
    publisher.send(&publish(50, true, b"second"));
    expect(&mut publisher, raw::PUBREC, 50);
    publisher.send(&raw::ack(raw::PUBREL, 50));
    expect(&mut publisher, raw::PUBCOMP, 50);
    assert_eq!(
        payloads(&drain(&mut sub, false, QUIET)),
        vec!["first", "second"],
        "v5={v5}"
    );
}

#[test]
fn v3_pubrel_after_reconnect_releases_the_packet_id() {
    release_after_reconnect(false);
}

#[test]
fn v5_pubrel_after_reconnect_releases_the_packet_id() {
    release_after_reconnect(true);
}

/// Sends `packet` in two writes, cut in its payload: the broker reads the PUBLISH before its
/// payload is complete, and ntex-mqtt streams the payload.
fn send_split(c: &mut Raw, packet: &[u8]) {
    let cut = packet.len() - 20;
    c.send(&packet[..cut]);
    std::thread::sleep(Duration::from_millis(30));
    c.send(&packet[cut..]);
}

/// Reads acks of `kind` until every id in `ids` got one (in any order), and no other packet.
fn expect_acks(c: &mut Raw, kind: u8, ids: impl IntoIterator<Item = u16>) {
    let mut owed: std::collections::BTreeSet<u16> = ids.into_iter().collect();
    while !owed.is_empty() {
        let p = c
            .read(WAIT)
            .unwrap_or_else(|| panic!("packet type {kind:#x} owed for {owed:?}"));
        assert_eq!(p.kind(), kind, "expected packet type {kind:#x}, got {p:?}");
        let id = u16::from_be_bytes([p.body[0], p.body[1]]);
        assert!(
            owed.remove(&id),
            "ack for {id} not owed (or twice): {owed:?}"
        );
    }
}

/// QoS 2 PUBLISHes whose payload arrives whole and ones whose payload is streamed (which take
/// different paths in the broker) on one connection, their PUBRELs interleaved: each is
/// routed once, in order, and every flow completes.
#[test]
fn v3_qos2_publishes_whole_or_streamed_complete_exactly_once() {
    let gw = Gateway::start();
    let mut sub = watcher(&gw, "mix-sub", "mix/#");
    let (mut publisher, _) = connect_v3(&gw, "mix-pub", true);
    let payload = |n: u16| {
        let mut p = format!("{n:04}").into_bytes();
        p.resize(200, b'.');
        p
    };
    for round in 0..4u16 {
        let ids: Vec<u16> = (1..=6).map(|i| round * 6 + i).collect();
        for &id in &ids {
            let packet = raw::publish_v3("mix/t", 2, id, false, &payload(id));
            if id % 3 == 0 {
                send_split(&mut publisher, &packet);
            } else {
                publisher.send(&packet);
            }
        }
        expect_acks(&mut publisher, raw::PUBREC, ids.iter().copied());
        // Released in reverse order.
        for &id in ids.iter().rev() {
            publisher.send(&raw::ack(raw::PUBREL, id));
        }
        expect_acks(&mut publisher, raw::PUBCOMP, ids.iter().copied());
    }
    let got = drain(&mut sub, false, QUIET);
    let expected: Vec<String> = (1..=24)
        .map(|n| String::from_utf8(payload(n)).unwrap())
        .collect();
    assert_eq!(payloads(&got), expected);
}

/// Until its PUBREL, a QoS 2 packet id gets PUBREC for any PUBLISH that reuses it, DUP or not,
/// whole or streamed, and the message is not routed again [MQTT-4.3.3-2]; the connection
/// goes on. A QoS 1 PUBLISH with that packet id is a protocol violation.
#[test]
fn v3_qos2_packet_id_before_its_pubrel() {
    let gw = Gateway::start();
    let mut sub = watcher(&gw, "reuse-sub", "reuse/#");
    let (mut publisher, _) = connect_v3(&gw, "reuse-pub", true);
    publisher.send(&raw::publish_v3("reuse/t", 2, 5, false, b"first"));
    expect_acks(&mut publisher, raw::PUBREC, [5]);
    publisher.send(&raw::publish_v3("reuse/t", 2, 5, false, b"not a new one"));
    expect_acks(&mut publisher, raw::PUBREC, [5]);
    let mut long = b"streamed re-send ".to_vec();
    long.resize(300, b'.');
    send_split(
        &mut publisher,
        &raw::publish_v3("reuse/t", 2, 5, true, &long),
    );
    expect_acks(&mut publisher, raw::PUBREC, [5]);
    // The streamed payload was dropped whole: the next packets are read as usual.
    ping(&mut publisher);
    publisher.send(&raw::ack(raw::PUBREL, 5));
    expect_acks(&mut publisher, raw::PUBCOMP, [5]);
    publish_exactly_once(&mut publisher, "reuse/t", 5, b"second");
    assert_eq!(
        payloads(&drain(&mut sub, false, QUIET)),
        vec!["first", "second"]
    );

    publisher.send(&raw::publish_v3("reuse/t", 2, 9, false, b"third"));
    expect_acks(&mut publisher, raw::PUBREC, [9]);
    publisher.send(&raw::publish_v3("reuse/t", 1, 9, false, b"clash"));
    let mut seen = Vec::new();
    assert!(
        publisher.closed_within(WAIT, &mut seen),
        "a QoS 1 PUBLISH reusing a QoS 2 packet id before its PUBREL must close the connection"
    );
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(payloads(&drain(&mut sub, false, QUIET)), vec!["third"]);
}

/// PUBACKs go out in the order of their PUBLISHes [MQTT-4.6.0-2], also when the first one
/// waits for the state file (a persistent subscriber's copy) and the next one, which nobody
/// subscribes to, is done at once.
#[test]
fn v3_pubacks_follow_publish_order_when_one_waits_for_the_state_file() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "order-sub", false);
    subscribe(&mut sub, false, 1, "durable/#", 1);
    let (mut publisher, _) = connect_v3(&gw, "order-pub", true);
    for round in 0..5u16 {
        let first = round * 2 + 1;
        let mut both = raw::publish_v3("durable/t", 1, first, false, b"kept");
        both.extend(raw::publish_v3(
            "nobody/t",
            1,
            first + 1,
            false,
            b"not kept",
        ));
        publisher.send(&both);
        for id in [first, first + 1] {
            let p = publisher.read(WAIT).expect("PUBACK");
            assert_eq!(p.kind(), raw::PUBACK, "{p:?}");
            assert_eq!(
                p.body[..2],
                id.to_be_bytes(),
                "PUBACKs out of PUBLISH order in round {round}"
            );
        }
    }
    assert_eq!(drain(&mut sub, false, QUIET).len(), 5);
}

/// The broker takes PUBACKs and PUBCOMPs out of the bytes it reads, ahead of the packet
/// decoder: acks split byte by byte and mixed with other packets still complete their
/// deliveries (nothing is re-sent after a reconnect), and the other packets are answered.
#[test]
fn acks_split_byte_by_byte_among_other_packets_complete_their_deliveries() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "split-acks", false);
    subscribe(&mut sub, false, 1, "split/#", 2);
    let (mut publisher, _) = connect_v3(&gw, "split-pub", true);
    for i in 0..12u16 {
        let qos = if i % 3 == 2 { 2 } else { 1 };
        if qos == 1 {
            publish_acked(&mut publisher, "split/t", i + 1, false, &[b'a' + i as u8]);
        } else {
            publish_exactly_once(&mut publisher, "split/t", i + 1, &[b'a' + i as u8]);
        }
    }
    let mut qos2 = Vec::new();
    let mut bytes = Vec::new();
    let mut pings = 0;
    for i in 0..12 {
        let p = next_publish(&mut sub, false, "delivery");
        match p.qos {
            1 => bytes.extend(raw::ack(raw::PUBACK, p.packet_id.unwrap())),
            2 => {
                // PUBREC goes through the decoder; its PUBREL is answered below.
                sub.send(&raw::ack(raw::PUBREC, p.packet_id.unwrap()));
                qos2.push(p.packet_id.unwrap());
            }
            q => panic!("QoS {q}"),
        }
        if i % 4 == 0 {
            bytes.extend(raw::pingreq());
            pings += 1;
        }
    }
    for _ in &qos2 {
        let (rel, others) = sub.read_kind(raw::PUBREL, WAIT);
        let rel = rel.unwrap_or_else(|| panic!("PUBREL: {others:?}"));
        assert!(others.is_empty(), "{others:?}");
        let id = u16::from_be_bytes([rel.body[0], rel.body[1]]);
        bytes.extend(raw::ack(raw::PUBCOMP, id));
    }
    for byte in bytes {
        sub.send(&[byte]);
        std::thread::sleep(Duration::from_millis(2));
    }
    for _ in 0..pings {
        let p = sub.read(WAIT).expect("PINGRESP");
        assert_eq!(p.kind(), raw::PINGRESP, "{p:?}");
    }
    ping(&mut sub);
    drop(sub);
    wait_connections(&gw, 1.0);
    let (mut sub, present) = connect_v3(&gw, "split-acks", false);
    assert!(present);
    assert_silent(&mut sub, QUIET, "every delivery was acknowledged");
}

/// A subscriber that only sends PUBACKs sends no PINGREQ (any packet counts for the
/// keepalive), so it must not be timed out while its acks are taken ahead of the decoder.
#[test]
fn a_client_sending_only_pubacks_is_not_timed_out() {
    let gw = Gateway::start();
    let mut sub = Raw::connect(gw.mqtt);
    // Keepalive 1 s: the broker closes after 2 s without a packet.
    sub.send(&raw::connect_v3("acks-only", true, 1));
    assert_eq!(read_connack(&mut sub, false).code, 0);
    subscribe(&mut sub, false, 1, "ka/#", 1);
    let (mut publisher, _) = connect_v3(&gw, "ka-pub", true);
    let start = Instant::now();
    let mut id = 0u16;
    while start.elapsed() < Duration::from_secs(5) {
        id += 1;
        publish_acked(&mut publisher, "ka/t", id, false, b"x");
        let p = next_publish(&mut sub, false, "delivery");
        ack(&mut sub, &p);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still connected: it answers a PINGREQ now.
    ping(&mut sub);
    assert_eq!(connections(&gw), 2.0);
}
