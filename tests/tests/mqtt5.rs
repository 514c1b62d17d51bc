//! MQTT 5 features and the broker's limits, checked on the wire with the byte-level client:
//! CONNACK properties, keepalive, receive maximum, maximum packet size, topic aliases,
//! message expiry, property pass-through, subscription identifiers, no-local, shared
//! subscriptions, PUBACK reason codes and malformed input.

use std::time::{Duration, Instant};

use edgegw_tests::{
    Gateway,
    raw::{self, Packet, Publish, Raw},
};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Property encoding and decoding helpers.

mod prop {
    pub fn byte(id: u8, v: u8) -> Vec<u8> {
        vec![id, v]
    }

    pub fn u16(id: u8, v: u16) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(v.to_be_bytes());
        out
    }

    pub fn u32(id: u8, v: u32) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(v.to_be_bytes());
        out
    }

    pub fn string(id: u8, s: &str) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(edgegw_tests::raw::string(s));
        out
    }

    pub fn binary(id: u8, b: &[u8]) -> Vec<u8> {
        let mut out = vec![id];
        out.extend((b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
        out
    }

    pub fn user(k: &str, v: &str) -> Vec<u8> {
        let mut out = vec![0x26];
        out.extend(edgegw_tests::raw::string(k));
        out.extend(edgegw_tests::raw::string(v));
        out
    }

    pub fn varint(id: u8, n: usize) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(edgegw_tests::raw::varint(n));
        out
    }

    pub fn as_u16(v: &[u8]) -> u16 {
        u16::from_be_bytes(v.try_into().expect("2-byte property"))
    }

    pub fn as_u32(v: &[u8]) -> u32 {
        u32::from_be_bytes(v.try_into().expect("4-byte property"))
    }
}

/// Properties of a v5 CONNACK.
fn connack_properties(p: &Packet) -> Vec<(u8, Vec<u8>)> {
    assert_eq!(p.kind(), raw::CONNACK, "not a CONNACK: {p:?}");
    let (len, used) = raw::read_varint(&p.body[2..]).expect("CONNACK property length");
    raw::parse_properties(&p.body[2 + used..2 + used + len])
}

fn find(props: &[(u8, Vec<u8>)], id: u8) -> Option<&[u8]> {
    props
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, v)| v.as_slice())
}

/// The reason code of a v5 DISCONNECT/PUBACK/PUBREC (0x00 when omitted).
fn reason_at(p: &Packet, index: usize) -> u8 {
    p.body.get(index).copied().unwrap_or(0)
}

/// Connects a v5 client and returns it with its CONNACK (asserted successful).
fn connect5(gw: &Gateway, id: &str, clean: bool, keep_alive: u16, props: &[u8]) -> (Raw, Packet) {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v5(id, clean, keep_alive, props));
    let ack = c.read(WAIT).unwrap_or_else(|| panic!("{id}: no CONNACK"));
    assert_eq!(ack.kind(), raw::CONNACK, "{id}: {ack:?}");
    assert_eq!(ack.body[1], 0, "{id}: CONNACK reason {:#x}", ack.body[1]);
    (c, ack)
}

fn connect3(gw: &Gateway, id: &str) -> Raw {
    connect3_keepalive(gw, id, 30)
}

/// A clean 3.1.1 connection with this keepalive (seconds), its CONNACK checked.
fn connect3_keepalive(gw: &Gateway, id: &str, keep_alive: u16) -> Raw {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3(id, true, keep_alive));
    let ack = c.read(WAIT).unwrap_or_else(|| panic!("{id}: no CONNACK"));
    assert_eq!(ack.kind(), raw::CONNACK, "{id}: {ack:?}");
    assert_eq!(ack.body, vec![0, 0], "{id}: CONNACK");
    c
}

/// Sends a v5 SUBSCRIBE and asserts the SUBACK grants `expected` (one reason code).
fn subscribe5(c: &mut Raw, packet_id: u16, filter: &str, options: u8, props: &[u8], expected: u8) {
    c.send(&raw::subscribe_v5(packet_id, filter, options, props));
    let (ack, others) = c.read_kind(raw::SUBACK, WAIT);
    let ack = ack.unwrap_or_else(|| panic!("no SUBACK for {filter}; got {others:?}"));
    assert_eq!(&ack.body[..2], &packet_id.to_be_bytes(), "SUBACK packet id");
    let (len, used) = raw::read_varint(&ack.body[2..]).unwrap();
    assert_eq!(
        ack.body[2 + used + len..],
        [expected],
        "SUBACK for {filter}"
    );
}

fn subscribe3(c: &mut Raw, packet_id: u16, filter: &str, qos: u8) {
    c.send(&raw::subscribe_v3(packet_id, filter, qos));
    let (ack, others) = c.read_kind(raw::SUBACK, WAIT);
    let ack = ack.unwrap_or_else(|| panic!("no SUBACK for {filter}; got {others:?}"));
    let [hi, lo] = packet_id.to_be_bytes();
    assert_eq!(ack.body, vec![hi, lo, qos], "SUBACK for {filter}");
}

/// Reads the next PUBLISH and acknowledges it as its QoS requires (QoS 1: PUBACK, QoS 2:
/// PUBREC; a PUBREL read on the way is answered with PUBCOMP). Any other packet is a test
/// failure. `None` when nothing arrives in time.
fn next_publish(c: &mut Raw, v5: bool, timeout: Duration) -> Option<Publish> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = c.read(deadline.checked_duration_since(Instant::now())?)?;
        match p.kind() {
            raw::PUBREL => {
                let id = u16::from_be_bytes([p.body[0], p.body[1]]);
                c.send(&raw::ack(raw::PUBCOMP, id));
            }
            raw::PUBLISH => {
                let publish = Publish::parse(&p, v5);
                match (publish.qos, publish.packet_id) {
                    (1, Some(id)) => c.send(&raw::ack(raw::PUBACK, id)),
                    (2, Some(id)) => c.send(&raw::ack(raw::PUBREC, id)),
                    _ => {}
                }
                return Some(publish);
            }
            _ => panic!("expected a PUBLISH, got {p:?}"),
        }
    }
}

/// Asserts no PUBLISH arrives within `period` (PUBRELs still owed are answered).
fn assert_quiet(c: &mut Raw, v5: bool, period: Duration, what: &str) {
    if let Some(p) = next_publish(c, v5, period) {
        panic!("{what}: unexpected PUBLISH {p:?}");
    }
}

/// Publishes QoS 1 (v5) and returns the PUBACK reason code.
fn publish5_qos1(c: &mut Raw, topic: &str, packet_id: u16, props: &[u8], payload: &[u8]) -> u8 {
    c.send(&raw::publish_v5(topic, 1, packet_id, props, payload));
    let (ack, others) = c.read_kind(raw::PUBACK, WAIT);
    let ack = ack.unwrap_or_else(|| panic!("no PUBACK for {topic}; got {others:?}"));
    assert_eq!(&ack.body[..2], &packet_id.to_be_bytes(), "PUBACK packet id");
    reason_at(&ack, 2)
}

/// Sum of every sample of a metric (all label sets).
fn metric_sum(gw: &Gateway, name: &str) -> f64 {
    let (_, body) = gw.http_get("/metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn wait_metric_sum(gw: &Gateway, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric_sum(gw, name);
        if pred(v) || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the broker closes `c` within the wait; returns what it sent before closing.
fn expect_closed(c: &mut Raw, what: &str) -> Vec<Packet> {
    let mut seen = Vec::new();
    assert!(
        c.closed_within(WAIT, &mut seen),
        "{what}: connection stays open; got {seen:?}"
    );
    seen
}

/// The reason code of the DISCONNECT among `seen` (asserting there is one).
fn disconnect_reason(seen: &[Packet], what: &str) -> u8 {
    let d = seen
        .iter()
        .find(|p| p.kind() == raw::DISCONNECT)
        .unwrap_or_else(|| panic!("{what}: no DISCONNECT before close; got {seen:?}"));
    reason_at(d, 0)
}

// ---------------------------------------------------------------------------------------
// CONNACK and keepalive.

#[test]
fn connack_announces_limits_and_server_keep_alive() {
    let gw = Gateway::start_with(
        "  limits:\n    receive_maximum: 7\n    max_packet_size: 2KiB\n    topic_alias_maximum: 5\n    max_keepalive: 10s\n",
        "",
    );
    // Keepalive above the cap: Server Keep Alive tells the client to use the cap.
    let (_c, ack) = connect5(&gw, "connack-long", true, 30, &[]);
    let props = connack_properties(&ack);
    assert_eq!(
        find(&props, 0x21).map(prop::as_u16),
        Some(7),
        "Receive Maximum: {props:?}"
    );
    assert_eq!(
        find(&props, 0x27).map(prop::as_u32),
        Some(2048),
        "Maximum Packet Size: {props:?}"
    );
    assert_eq!(
        find(&props, 0x22).map(prop::as_u16),
        Some(5),
        "Topic Alias Maximum: {props:?}"
    );
    assert_eq!(
        find(&props, 0x13).map(prop::as_u16),
        Some(10),
        "Server Keep Alive: {props:?}"
    );

    // Within the cap: the client's keepalive stands, no Server Keep Alive.
    let (_c, ack) = connect5(&gw, "connack-short", true, 5, &[]);
    let props = connack_properties(&ack);
    assert_eq!(
        find(&props, 0x13),
        None,
        "no Server Keep Alive for keepalive 5: {props:?}"
    );
    assert_eq!(find(&props, 0x21).map(prop::as_u16), Some(7), "{props:?}");
}

#[test]
fn silent_v3_client_is_disconnected_after_one_and_a_half_keepalives() {
    let gw = Gateway::start();
    let mut c = connect3_keepalive(&gw, "silent", 2);
    let start = Instant::now();
    let mut seen = Vec::new();
    let closed = c.closed_within(Duration::from_secs(8), &mut seen);
    let elapsed = start.elapsed();
    assert!(
        closed,
        "a silent client with keepalive 2s is still connected after 8s"
    );
    assert!(
        elapsed >= Duration::from_millis(2500),
        "disconnected too early: after {elapsed:?} (keepalive 2s, limit 3s)"
    );
    assert!(seen.is_empty(), "v3 has no server DISCONNECT: {seen:?}");
}

#[test]
fn keepalive_zero_is_never_timed_out() {
    let gw = Gateway::start();
    let mut c = connect3_keepalive(&gw, "no-keepalive", 0);
    let mut seen = Vec::new();
    assert!(
        !c.closed_within(Duration::from_secs(4), &mut seen),
        "keepalive 0 connection was closed"
    );
    assert!(seen.is_empty(), "{seen:?}");
    c.send(&raw::pingreq());
    let pong = c.read(WAIT).expect("PINGRESP after 4s idle");
    assert_eq!(pong.kind(), raw::PINGRESP);

    // The same for v5 (the broker answers Server Keep Alive 0, i.e. none).
    let (mut c5, ack) = connect5(&gw, "no-keepalive-5", true, 0, &[]);
    let props = connack_properties(&ack);
    assert!(
        matches!(find(&props, 0x13).map(prop::as_u16), None | Some(0)),
        "{props:?}"
    );
    assert!(
        !c5.closed_within(Duration::from_secs(4), &mut seen),
        "v5 keepalive 0 connection was closed"
    );
    c5.send(&raw::pingreq());
    assert_eq!(c5.read(WAIT).expect("v5 PINGRESP").kind(), raw::PINGRESP);
}

/// With `max_inflight: 2` a QoS 1 subscriber has at most two deliveries unacknowledged;
/// each PUBACK lets the next queued one go (the writer waits at the full window and the
/// ack wakes it), in order, until all arrived.
#[test]
fn full_inflight_window_is_refilled_by_each_ack() {
    let gw = Gateway::start_with("  limits:\n    max_inflight: 2\n", "");
    let mut sub = connect3(&gw, "window-sub");
    subscribe3(&mut sub, 1, "window/t", 1);
    let mut publisher = connect3(&gw, "window-pub");
    for i in 0..10u16 {
        publisher.send(&raw::publish_v3("window/t", 1, i + 1, false, &[i as u8]));
        let (ack, _) = publisher.read_kind(raw::PUBACK, WAIT);
        assert!(ack.is_some(), "no PUBACK for publish {i}");
    }
    let mut next = 0u8;
    let mut unacked = Vec::new();
    while next < 10 {
        // Two arrive without acks; a third must not.
        while unacked.len() < 2 && next < 10 {
            let p = sub
                .read(WAIT)
                .unwrap_or_else(|| panic!("delivery {next} did not arrive"));
            let publish = raw::Publish::parse(&p, false);
            assert_eq!(publish.payload, vec![next], "out of order: {publish:?}");
            unacked.push(publish.packet_id.expect("QoS 1"));
            next += 1;
        }
        if next < 10 {
            assert!(
                sub.read(Duration::from_millis(300)).is_none(),
                "a third delivery went out with two unacknowledged (max_inflight 2)"
            );
        }
        sub.send(&raw::ack(raw::PUBACK, unacked.remove(0)));
    }
}

/// PINGREQ is answered before ntex's pipeline; it must still count as the client's
/// activity for the keepalive, in both versions.
#[test]
fn pinging_client_outlives_its_keepalive() {
    let gw = Gateway::start();
    let mut c3 = connect3_keepalive(&gw, "pinging-3", 2);
    let (mut c5, _) = connect5(&gw, "pinging-5", true, 2, &[]);
    // 6 s: twice the 3 s a silent client gets.
    for round in 0..6 {
        for (c, version) in [(&mut c3, 3), (&mut c5, 5)] {
            c.send(&raw::pingreq());
            let pong = c
                .read(WAIT)
                .unwrap_or_else(|| panic!("v{version}: no PINGRESP in round {round}"));
            assert_eq!(pong.kind(), raw::PINGRESP, "v{version}: {pong:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn v3_keepalive_above_the_maximum_is_refused() {
    let gw = Gateway::start_with("  limits:\n    max_keepalive: 10s\n", "");
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3("too-long", true, 11));
    let ack = c.read(WAIT).expect("CONNACK");
    assert_eq!(ack.kind(), raw::CONNACK);
    assert_eq!(ack.body, vec![0, 0x02], "CONNACK identifier rejected");
    expect_closed(&mut c, "refused client");
    assert_eq!(
        gw.wait_metric(
            "edgegw_broker_connections_refused_total{reason=\"keepalive_too_long\"}",
            WAIT,
            |v| v >= 1.0
        ),
        1.0
    );
    // Exactly at the maximum is fine.
    let mut ok = Raw::connect(gw.mqtt);
    ok.send(&raw::connect_v3("at-max", true, 10));
    assert_eq!(ok.read(WAIT).expect("CONNACK").body, vec![0, 0]);
}

// ---------------------------------------------------------------------------------------
// Receive maximum and maximum packet size.

#[test]
fn exceeding_receive_maximum_disconnects_with_0x93() {
    let gw = Gateway::start_with("  limits:\n    receive_maximum: 2\n", "");
    let mut sub = connect3(&gw, "rm-sub");
    subscribe3(&mut sub, 1, "rm/#", 0);

    let (mut c, ack) = connect5(&gw, "rm-pub", true, 30, &[]);
    assert_eq!(
        find(&connack_properties(&ack), 0x21).map(prop::as_u16),
        Some(2)
    );
    // QoS 2 publishes stay outstanding until PUBREL; two fit the window.
    for id in 1..=2u16 {
        c.send(&raw::publish_v5(
            "rm/t",
            2,
            id,
            &[],
            format!("m{id}").as_bytes(),
        ));
        let rec = c.read(WAIT).expect("PUBREC");
        assert_eq!(rec.kind(), raw::PUBREC, "{rec:?}");
        assert_eq!(&rec.body[..2], &id.to_be_bytes());
    }
    // Releasing one frees one slot.
    c.send(&raw::ack(raw::PUBREL, 1));
    let comp = c.read(WAIT).expect("PUBCOMP");
    assert_eq!(comp.kind(), raw::PUBCOMP, "{comp:?}");
    c.send(&raw::publish_v5("rm/t", 2, 3, &[], b"m3"));
    let rec = c.read(WAIT).expect("PUBREC for 3");
    assert_eq!(rec.kind(), raw::PUBREC, "{rec:?}");
    // Now 2 and 3 are outstanding: a third one exceeds the receive maximum.
    c.send(&raw::publish_v5("rm/t", 2, 4, &[], b"m4"));
    let seen = expect_closed(&mut c, "receive maximum exceeded");
    assert!(
        seen.iter().all(|p| p.kind() != raw::PUBREC),
        "no PUBREC for the excess publish: {seen:?}"
    );
    assert_eq!(
        disconnect_reason(&seen, "receive maximum"),
        0x93,
        "{seen:?}"
    );

    // m4 was never routed: the subscriber gets m1..m3, then a later marker.
    let mut marker = connect3(&gw, "rm-marker");
    marker.send(&raw::publish_v3("rm/marker", 0, 0, false, b"marker"));
    let mut got = Vec::new();
    while let Some(p) = next_publish(&mut sub, false, WAIT) {
        got.push(String::from_utf8(p.payload).unwrap());
        if got.last().map(String::as_str) == Some("marker") {
            break;
        }
    }
    assert_eq!(got, vec!["m1", "m2", "m3", "marker"]);
}

#[test]
fn packets_above_max_packet_size_close_the_connection() {
    let gw = Gateway::start_with("  limits:\n    max_packet_size: 1KiB\n", "");
    let mut bystander = connect3(&gw, "mps-bystander");
    subscribe3(&mut bystander, 1, "big/#", 0);

    let (mut c5, ack) = connect5(&gw, "mps-v5", true, 30, &[]);
    assert_eq!(
        find(&connack_properties(&ack), 0x27).map(prop::as_u32),
        Some(1024)
    );
    // Exactly 1024 bytes in all (1 + 2 length bytes + 2+6 topic + 1 property length + 1012).
    let fits = raw::publish_v5("big/ok", 0, 0, &[], &[b'a'; 1012]);
    assert_eq!(fits.len(), 1024);
    c5.send(&fits);
    let p = next_publish(&mut bystander, false, WAIT).expect("a 1024-byte packet is accepted");
    assert_eq!(p.topic, "big/ok");
    // One byte more is too large: DISCONNECT 0x95 (Packet too large), then close.
    let too_big = raw::publish_v5("big/no", 0, 0, &[], &[b'b'; 1013]);
    assert_eq!(too_big.len(), 1025);
    c5.try_send(&too_big);
    let seen_v5 = expect_closed(&mut c5, "v5 oversized PUBLISH");

    // v3 has no DISCONNECT from the server: the connection is just closed.
    let mut c3 = connect3(&gw, "mps-v3");
    c3.try_send(&raw::publish_v3("big/v3", 0, 0, false, &[b'c'; 1500]));
    let seen = expect_closed(&mut c3, "v3 oversized PUBLISH");
    assert!(seen.is_empty(), "{seen:?}");

    // Others are unaffected and the oversized messages went nowhere.
    let mut other = connect3(&gw, "mps-other");
    other.send(&raw::publish_v3("big/small", 0, 0, false, b"small"));
    let p = next_publish(&mut bystander, false, WAIT).expect("bystander still served");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("big/small", &b"small"[..])
    );
    assert_quiet(
        &mut bystander,
        false,
        Duration::from_millis(500),
        "oversized messages are not routed",
    );

    // Checked last so that the checks above still run when it fails.
    assert_eq!(
        disconnect_reason(&seen_v5, "v5 oversized PUBLISH"),
        0x95,
        "v5 oversized PUBLISH: DISCONNECT reason must be 0x95 Packet too large: {seen_v5:?}"
    );
}

#[test]
fn subscriber_maximum_packet_size_drops_larger_messages() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "mps-sub", true, 30, &prop::u32(0x27, 200));
    subscribe5(&mut sub, 1, "mps/#", 1, &[], 1);
    let (mut publisher, _) = connect5(&gw, "mps-pub", true, 30, &[]);
    publisher.send(&raw::publish_v5("mps/big0", 0, 0, &[], &[b'x'; 300]));
    assert_eq!(
        publish5_qos1(&mut publisher, "mps/big1", 1, &[], &[b'y'; 300]),
        0x00
    );
    assert_eq!(
        publish5_qos1(&mut publisher, "mps/small", 2, &[], b"small"),
        0x00
    );
    // Deliveries are in order: the first one to arrive must be the small one.
    let p = next_publish(&mut sub, true, WAIT).expect("the small message is delivered");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("mps/small", &b"small"[..])
    );
    assert_quiet(
        &mut sub,
        true,
        Duration::from_millis(500),
        "nothing else arrives",
    );
    assert_eq!(
        gw.wait_metric(
            "edgegw_broker_dropped_messages_total{reason=\"too_large\"}",
            WAIT,
            |v| v >= 2.0
        ),
        2.0
    );
    // The connection keeps working afterwards.
    assert_eq!(
        publish5_qos1(&mut publisher, "mps/small", 3, &[], b"again"),
        0x00
    );
    let p = next_publish(&mut sub, true, WAIT).expect("later small message");
    assert_eq!(p.payload, b"again");
}

/// A topic's first message, too large for the subscriber, must not leave behind a topic
/// alias the subscriber never learnt: the next message on the topic carries its name.
#[test]
fn a_dropped_first_message_does_not_assign_its_topic_alias() {
    let gw = Gateway::start();
    let mut properties = prop::u32(0x27, 200);
    properties.extend(prop::u16(0x22, 4));
    let (mut sub, _) = connect5(&gw, "alias-mps-sub", true, 30, &properties);
    subscribe5(&mut sub, 1, "amps/#", 1, &[], 1);
    let (mut publisher, _) = connect5(&gw, "alias-mps-pub", true, 30, &[]);
    assert_eq!(
        publish5_qos1(&mut publisher, "amps/t", 1, &[], &[b'x'; 300]),
        0x00
    );
    for (id, payload) in [(2, &b"small"[..]), (3, b"again")] {
        assert_eq!(
            publish5_qos1(&mut publisher, "amps/t", id, &[], payload),
            0x00
        );
    }
    let first = next_publish(&mut sub, true, WAIT).expect("the small message is delivered");
    assert_eq!(
        (first.topic.as_str(), first.payload.as_slice()),
        ("amps/t", &b"small"[..]),
        "the first message sent on the topic names it"
    );
    let alias = first.property(0x23).map(prop::as_u16);
    assert!(alias.is_some(), "it sets the alias: {first:?}");
    let second = next_publish(&mut sub, true, WAIT).expect("the next message");
    assert_eq!(second.property(0x23).map(prop::as_u16), alias);
    assert_eq!(second.payload, b"again");
}

// ---------------------------------------------------------------------------------------
// Topic aliases.

#[test]
fn inbound_topic_aliases_resolve_to_the_topic() {
    let gw = Gateway::start_with("  limits:\n    topic_alias_maximum: 2\n", "");
    let mut sub = connect3(&gw, "ta-sub");
    subscribe3(&mut sub, 1, "ta/#", 0);
    let (mut c, _) = connect5(&gw, "ta-pub", true, 30, &[]);
    c.send(&raw::publish_v5("ta/x", 0, 0, &prop::u16(0x23, 2), b"one"));
    c.send(&raw::publish_v5("", 0, 0, &prop::u16(0x23, 2), b"two"));
    // Re-mapping an alias to another topic.
    c.send(&raw::publish_v5(
        "ta/y",
        0,
        0,
        &prop::u16(0x23, 2),
        b"three",
    ));
    c.send(&raw::publish_v5("", 0, 0, &prop::u16(0x23, 2), b"four"));
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = next_publish(&mut sub, false, WAIT).expect("aliased publish delivered");
        got.push((p.topic, String::from_utf8(p.payload).unwrap()));
    }
    let want: Vec<(String, String)> = [
        ("ta/x", "one"),
        ("ta/x", "two"),
        ("ta/y", "three"),
        ("ta/y", "four"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    assert_eq!(got, want);

    // An alias above the announced maximum is a protocol error: DISCONNECT 0x94.
    c.send(&raw::publish_v5("ta/z", 0, 0, &prop::u16(0x23, 3), b"bad"));
    let seen = expect_closed(&mut c, "alias above maximum");
    assert_eq!(
        disconnect_reason(&seen, "alias above maximum"),
        0x94,
        "{seen:?}"
    );
}

#[test]
fn outbound_topic_aliases_when_the_subscriber_allows_them() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "tao-sub", true, 30, &prop::u16(0x22, 4));
    subscribe5(&mut sub, 1, "tao/#", 0, &[], 0);
    let (mut plain, _) = connect5(&gw, "tao-plain", true, 30, &[]);
    subscribe5(&mut plain, 1, "tao/#", 0, &[], 0);
    let mut publisher = connect3(&gw, "tao-pub");
    for payload in ["first", "second", "third"] {
        publisher.send(&raw::publish_v3("tao/t", 0, 0, false, payload.as_bytes()));
    }
    let first = next_publish(&mut sub, true, WAIT).expect("first");
    assert_eq!(
        (first.topic.as_str(), first.payload.as_slice()),
        ("tao/t", &b"first"[..])
    );
    let alias = prop::as_u16(
        first
            .property(0x23)
            .expect("first message sets a topic alias"),
    );
    assert!(
        (1..=4).contains(&alias),
        "alias {alias} within the client's maximum 4"
    );
    for payload in ["second", "third"] {
        let p = next_publish(&mut sub, true, WAIT).expect(payload);
        assert_eq!(
            p.topic, "",
            "{payload}: later messages carry only the alias"
        );
        assert_eq!(p.property(0x23).map(prop::as_u16), Some(alias), "{payload}");
        assert_eq!(p.payload, payload.as_bytes());
    }
    // A client that did not announce Topic Alias Maximum never gets aliases.
    for payload in ["first", "second", "third"] {
        let p = next_publish(&mut plain, true, WAIT).expect(payload);
        assert_eq!(p.topic, "tao/t");
        assert_eq!(
            p.property(0x23),
            None,
            "{payload}: no alias without Topic Alias Maximum"
        );
    }

    // With a maximum of 1, only the first topic gets an alias; others go out in full.
    let (mut one, _) = connect5(&gw, "tao-one", true, 30, &prop::u16(0x22, 1));
    subscribe5(&mut one, 1, "tao1/#", 0, &[], 0);
    for topic in ["tao1/a", "tao1/b", "tao1/a", "tao1/b"] {
        publisher.send(&raw::publish_v3(topic, 0, 0, false, topic.as_bytes()));
    }
    let got: Vec<(String, Option<u16>, Vec<u8>)> = (0..4)
        .map(|_| {
            let p = next_publish(&mut one, true, WAIT).expect("publish with alias maximum 1");
            let alias = p.property(0x23).map(prop::as_u16);
            (p.topic, alias, p.payload)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("tao1/a".to_string(), Some(1), b"tao1/a".to_vec()),
            ("tao1/b".to_string(), None, b"tao1/b".to_vec()),
            (String::new(), Some(1), b"tao1/a".to_vec()),
            ("tao1/b".to_string(), None, b"tao1/b".to_vec()),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Message expiry and property pass-through.

#[test]
fn message_expiry_for_an_offline_session() {
    let gw = Gateway::start();
    let session = prop::u32(0x11, 300);
    let (mut sub, _) = connect5(&gw, "exp-sub", true, 30, &session);
    subscribe5(&mut sub, 1, "exp/#", 1, &[], 1);
    sub.send(&raw::disconnect());
    expect_closed(&mut sub, "DISCONNECT");
    assert_eq!(
        gw.wait_metric("edgegw_broker_connections{protocol=\"5\"}", WAIT, |v| v
            == 0.0),
        0.0,
        "subscriber offline"
    );

    let (mut publisher, _) = connect5(&gw, "exp-pub", true, 30, &[]);
    assert_eq!(
        publish5_qos1(
            &mut publisher,
            "exp/short",
            1,
            &prop::u32(0x02, 1),
            b"short"
        ),
        0x00
    );
    assert_eq!(
        publish5_qos1(&mut publisher, "exp/long", 2, &prop::u32(0x02, 60), b"long"),
        0x00
    );
    // Time is the feature here: let the 1 s expiry pass.
    std::thread::sleep(Duration::from_millis(2500));

    let (mut sub, ack) = connect5(&gw, "exp-sub", false, 30, &session);
    assert_eq!(ack.body[0] & 1, 1, "session present");
    let p = next_publish(&mut sub, true, WAIT).expect("the unexpired message");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("exp/long", &b"long"[..]),
        "the expired message is not delivered"
    );
    let left = prop::as_u32(p.property(0x02).expect("remaining message expiry"));
    assert!(
        (50..=58).contains(&left),
        "remaining expiry {left}s after waiting 2.5s of 60s"
    );
    assert_quiet(&mut sub, true, Duration::from_millis(500), "nothing else");
    assert_eq!(
        gw.wait_metric(
            "edgegw_broker_dropped_messages_total{reason=\"expired\"}",
            WAIT,
            |v| v >= 1.0
        ),
        1.0
    );
}

#[test]
fn publish_properties_reach_the_subscriber_unchanged() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "pt-sub", true, 30, &[]);
    subscribe5(&mut sub, 1, "pt/#", 1, &[], 1);
    let (mut publisher, _) = connect5(&gw, "pt-pub", true, 30, &[]);
    let correlation = [0u8, 0xff, 0x10, 0x80, 7];
    let mut props = Vec::new();
    props.extend(prop::byte(0x01, 1));
    props.extend(prop::string(0x03, "application/json"));
    props.extend(prop::string(0x08, "pt/reply"));
    props.extend(prop::binary(0x09, &correlation));
    props.extend(prop::user("b", "2"));
    props.extend(prop::user("a", "1"));
    props.extend(prop::user("b", "3"));
    assert_eq!(
        publish5_qos1(&mut publisher, "pt/x", 1, &props, br#"{"t":21.5}"#),
        0x00
    );

    let p = next_publish(&mut sub, true, WAIT).expect("publish with properties");
    assert_eq!(p.payload, br#"{"t":21.5}"#);
    assert_eq!(
        p.property(0x01),
        Some(&[1u8][..]),
        "payload format indicator"
    );
    assert_eq!(
        p.property(0x03),
        Some(&raw::string("application/json")[..]),
        "content type"
    );
    assert_eq!(
        p.property(0x08),
        Some(&raw::string("pt/reply")[..]),
        "response topic"
    );
    assert_eq!(
        p.property(0x09),
        Some(&prop::binary(0x09, &correlation)[1..]),
        "correlation data"
    );
    let users: Vec<&[u8]> = p
        .properties
        .iter()
        .filter(|(id, _)| *id == 0x26)
        .map(|(_, v)| v.as_slice())
        .collect();
    let want = [
        prop::user("b", "2"),
        prop::user("a", "1"),
        prop::user("b", "3"),
    ];
    let want: Vec<&[u8]> = want.iter().map(|u| &u[1..]).collect();
    assert_eq!(users, want, "user properties, in order, duplicates kept");

    // A message without properties gets none added.
    assert_eq!(publish5_qos1(&mut publisher, "pt/y", 2, &[], b"bare"), 0x00);
    let p = next_publish(&mut sub, true, WAIT).expect("bare publish");
    assert_eq!(p.payload, b"bare");
    let ids: Vec<u8> = p.properties.iter().map(|(id, _)| *id).collect();
    assert!(
        !ids.iter()
            .any(|id| [0x01, 0x02, 0x03, 0x08, 0x09, 0x26].contains(id)),
        "no properties invented: {:?}",
        p.properties
    );
}

// ---------------------------------------------------------------------------------------
// Subscriptions: identifiers, overlap, no-local, shared.

#[test]
fn overlapping_subscriptions_give_one_copy_with_every_identifier() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "sid-sub", true, 30, &[]);
    subscribe5(&mut sub, 1, "a/+", 0, &prop::varint(0x0b, 1), 0);
    subscribe5(&mut sub, 2, "a/#", 1, &prop::varint(0x0b, 2), 1);
    subscribe5(&mut sub, 3, "a/b", 2, &prop::varint(0x0b, 300), 2);

    let (mut publisher, _) = connect5(&gw, "sid-pub", true, 30, &[]);
    publisher.send(&raw::publish_v5("a/b", 2, 1, &[], b"ab"));
    let rec = publisher.read(WAIT).expect("PUBREC");
    assert_eq!(rec.kind(), raw::PUBREC);
    publisher.send(&raw::ack(raw::PUBREL, 1));
    assert_eq!(publisher.read(WAIT).expect("PUBCOMP").kind(), raw::PUBCOMP);
    // Matches only a/+ and a/# (ids 1 and 2).
    assert_eq!(publish5_qos1(&mut publisher, "a/c", 2, &[], b"ac"), 0x00);

    // Different topics and QoS: no order between them is promised, so collect both.
    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let p = next_publish(&mut sub, true, WAIT).expect("a/b and a/c");
        let mut ids: Vec<usize> = p
            .properties
            .iter()
            .filter(|(id, _)| *id == 0x0b)
            .map(|(_, v)| raw::read_varint(v).unwrap().0)
            .collect();
        ids.sort_unstable();
        let topic = p.topic.clone();
        assert!(
            got.insert(topic.clone(), (p.qos, ids)).is_none(),
            "a second copy of {topic}"
        );
    }
    assert_quiet(
        &mut sub,
        true,
        Duration::from_millis(500),
        "only one copy of each message",
    );
    assert_eq!(
        got["a/b"],
        (2, vec![1, 2, 300]),
        "a/b: highest granted QoS, every matching subscription's identifier"
    );
    assert_eq!(got["a/c"], (1, vec![1, 2]), "a/c");
}

#[test]
fn no_local_skips_the_publishers_own_messages() {
    let gw = Gateway::start();
    let (mut c, _) = connect5(&gw, "nl-self", true, 30, &[]);
    subscribe5(&mut c, 1, "nl/#", 0x04 | 1, &[], 1);
    subscribe5(&mut c, 2, "marker/#", 1, &[], 1);
    let (mut other, _) = connect5(&gw, "nl-other", true, 30, &[]);
    subscribe5(&mut other, 1, "nl/#", 1, &[], 1);

    // Another subscriber to nl/# exists, so the PUBACK is a plain success.
    assert_eq!(publish5_qos1(&mut c, "nl/x", 1, &[], b"own"), 0x00);
    assert_eq!(publish5_qos1(&mut c, "marker/x", 2, &[], b"marker"), 0x00);
    let p = next_publish(&mut c, true, WAIT).expect("the marker");
    assert_eq!(
        p.topic, "marker/x",
        "own message on a no-local subscription was delivered"
    );
    let p = next_publish(&mut other, true, WAIT).expect("others still get it");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("nl/x", &b"own"[..])
    );

    // Someone else's message on the same subscription does arrive.
    assert_eq!(publish5_qos1(&mut other, "nl/y", 1, &[], b"theirs"), 0x00);
    let p = next_publish(&mut c, true, WAIT).expect("others' messages arrive");
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("nl/y", &b"theirs"[..])
    );
}

#[test]
fn shared_subscription_spreads_messages_over_members() {
    const N: usize = 20;
    let gw = Gateway::start();
    let mut members = Vec::new();
    for name in ["sh-m1", "sh-m2"] {
        let (mut m, _) = connect5(&gw, name, true, 30, &[]);
        subscribe5(&mut m, 1, "$share/g/t/#", 1, &[], 1);
        members.push(m);
    }
    let (mut normal, _) = connect5(&gw, "sh-normal", true, 30, &[]);
    subscribe5(&mut normal, 1, "t/#", 1, &[], 1);

    let (mut publisher, _) = connect5(&gw, "sh-pub", true, 30, &[]);
    for i in 0..N {
        assert_eq!(
            publish5_qos1(
                &mut publisher,
                &format!("t/{i}"),
                i as u16 + 1,
                &[],
                i.to_string().as_bytes()
            ),
            0x00
        );
    }

    let mut got: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let deadline = Instant::now() + WAIT;
    while got.iter().map(Vec::len).sum::<usize>() < N && Instant::now() < deadline {
        for (m, list) in members.iter_mut().zip(got.iter_mut()) {
            if let Some(p) = next_publish(m, true, Duration::from_millis(100)) {
                list.push(String::from_utf8(p.payload).unwrap());
            }
        }
    }
    // Look a little longer for duplicates.
    for (m, list) in members.iter_mut().zip(got.iter_mut()) {
        while let Some(p) = next_publish(m, true, Duration::from_millis(300)) {
            list.push(String::from_utf8(p.payload).unwrap());
        }
    }
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both members get some: {got:?}"
    );
    let mut all: Vec<String> = got.concat();
    assert_eq!(all.len(), N, "each message to exactly one member: {got:?}");
    all.sort_by_key(|s| s.parse::<usize>().unwrap());
    all.dedup();
    assert_eq!(
        all,
        (0..N).map(|i| i.to_string()).collect::<Vec<_>>(),
        "no duplicates, none missing"
    );

    let mut normal_got = Vec::new();
    while normal_got.len() < N {
        let Some(p) = next_publish(&mut normal, true, WAIT) else {
            break;
        };
        normal_got.push(String::from_utf8(p.payload).unwrap());
    }
    assert_eq!(
        normal_got,
        (0..N).map(|i| i.to_string()).collect::<Vec<_>>(),
        "a normal subscriber gets all"
    );
    assert_quiet(
        &mut normal,
        true,
        Duration::from_millis(300),
        "no more than N",
    );
}

// ---------------------------------------------------------------------------------------
// Reason codes and malformed input.

#[test]
fn puback_reports_no_matching_subscribers() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect5(&gw, "rc-pub", true, 30, &[]);
    assert_eq!(
        publish5_qos1(&mut publisher, "rc/t", 1, &[], b"nobody"),
        0x10,
        "PUBACK 0x10 without subscribers"
    );
    publisher.send(&raw::publish_v5("rc/t", 2, 2, &[], b"nobody"));
    let rec = publisher.read(WAIT).expect("PUBREC");
    assert_eq!(rec.kind(), raw::PUBREC);
    assert_eq!(reason_at(&rec, 2), 0x10, "PUBREC 0x10 without subscribers");
    publisher.send(&raw::ack(raw::PUBREL, 2));
    assert_eq!(publisher.read(WAIT).expect("PUBCOMP").kind(), raw::PUBCOMP);

    let mut sub = connect3(&gw, "rc-sub");
    subscribe3(&mut sub, 1, "rc/#", 1);
    assert_eq!(
        publish5_qos1(&mut publisher, "rc/t", 3, &[], b"someone"),
        0x00,
        "PUBACK success with a subscriber"
    );
    let p = next_publish(&mut sub, false, WAIT).expect("delivered");
    assert_eq!(p.payload, b"someone");
}

/// Deterministic pseudo-random bytes (xorshift), never starting with a CONNECT header.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    if out[0] & 0xf0 == 0x10 {
        out[0] ^= 0x40;
    }
    out
}

#[test]
fn malformed_packets_close_only_the_offending_connection() {
    let gw = Gateway::start();
    let mut bystander = connect3(&gw, "mal-bystander");
    subscribe3(&mut bystander, 1, "mal/#", 0);
    let (mut bystander5, _) = connect5(&gw, "mal-bystander5", true, 30, &[]);
    subscribe5(&mut bystander5, 1, "mal/#", 0, &[], 0);

    let connect_body = |name: &[u8], level: u8, flags: u8, rest: &[u8]| {
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(name);
        body.push(level);
        body.push(flags);
        body.extend(30u16.to_be_bytes());
        body.extend_from_slice(rest);
        let mut out = vec![0x10];
        out.extend(raw::varint(body.len()));
        out.extend(body);
        out
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("max varint garbage", b"\xff\xff\xff\xff\x7f".to_vec()),
        ("random bytes 1", noise(0x9e37_79b9_7f4a_7c15, 64)),
        ("random bytes 2", noise(0x2545_f491_4f6c_dd1d, 200)),
        (
            "remaining length of 5 bytes",
            b"\x10\xff\xff\xff\xff\x01".to_vec(),
        ),
        (
            "PUBLISH before CONNECT",
            raw::publish_v3("mal/x", 0, 0, false, b"early"),
        ),
        (
            "protocol name MQTX",
            connect_body(b"MQTX", 4, 0x02, &raw::string("bad-name")),
        ),
        (
            "protocol level 9",
            connect_body(b"MQTT", 9, 0x02, &raw::string("bad-level")),
        ),
        (
            "v3 reserved connect flag",
            connect_body(b"MQTT", 4, 0x03, &raw::string("bad-flag")),
        ),
        ("v5 unknown CONNECT property", {
            let mut rest = vec![2, 0x7f, 0x01];
            rest.extend(raw::string("bad-prop"));
            connect_body(b"MQTT", 5, 0x02, &rest)
        }),
        (
            "v3 client id not UTF-8",
            connect_body(b"MQTT", 4, 0x02, &[0, 2, 0xc3, 0x28]),
        ),
    ];
    let mut expected = metric_sum(&gw, "edgegw_broker_protocol_errors_total");
    for (what, bytes) in &cases {
        let mut c = Raw::connect(gw.mqtt);
        c.try_send(bytes);
        let seen = expect_closed(&mut c, what);
        assert!(
            seen.iter()
                .all(|p| p.kind() != raw::CONNACK || p.body.get(1).copied().unwrap_or(0) != 0),
            "{what}: no successful CONNACK: {seen:?}"
        );
        expected += 1.0;
        let now = wait_metric_sum(&gw, "edgegw_broker_protocol_errors_total", |v| {
            v >= expected
        });
        assert_eq!(now, expected, "{what}: counted once as a protocol error");
    }

    // Garbage after a successful CONNECT: v5 gets DISCONNECT 0x81 (malformed), v3 a close.
    let (mut c5, _) = connect5(&gw, "mal-late5", true, 30, &[]);
    c5.send(b"\x00\x00");
    let seen = expect_closed(&mut c5, "v5 reserved packet type 0");
    assert_eq!(
        disconnect_reason(&seen, "v5 reserved packet type"),
        0x81,
        "{seen:?}"
    );
    let mut c3 = connect3(&gw, "mal-late3");
    c3.send(b"\x36\x05\x00\x01x\x00\x01"); // PUBLISH with QoS 3
    expect_closed(&mut c3, "v3 PUBLISH with QoS 3");
    expected += 2.0;
    let now = wait_metric_sum(&gw, "edgegw_broker_protocol_errors_total", |v| {
        v >= expected
    });
    assert_eq!(now, expected, "late garbage counted once per connection");

    // The bystanders never noticed.
    bystander.send(&raw::publish_v3("mal/ok", 0, 0, false, b"from v3"));
    bystander5.send(&raw::publish_v5("mal/ok", 0, 0, &[], b"from v5"));
    for (c, v5) in [(&mut bystander, false), (&mut bystander5, true)] {
        let mut got: Vec<Vec<u8>> = (0..2)
            .filter_map(|_| next_publish(c, v5, WAIT))
            .map(|p| p.payload)
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![b"from v3".to_vec(), b"from v5".to_vec()],
            "bystander v5={v5}"
        );
    }
    bystander.send(&raw::pingreq());
    assert_eq!(
        bystander.read(WAIT).expect("PINGRESP").kind(),
        raw::PINGRESP
    );
}

/// A PUBLISH whose bytes arrive in two TCP segments (as on any real network) is streamed by
/// ntex; the whole PUBLISH read right behind it must not be routed first [MQTT-4.6.0-6].
/// Before `Conn::in_order`, MQTT 5 subscribers got such pairs swapped.
#[test]
fn a_publish_split_across_segments_is_not_overtaken_by_the_next() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "split-sub", true, 30, &[]);
    subscribe5(&mut sub, 1, "split/t", 1, &[], 1);
    let (mut publisher, _) = connect5(&gw, "split-pub", true, 30, &[]);
    for round in 0..3u16 {
        let first = raw::publish_v5("split/t", 1, 2 * round + 1, &[], &[2 * round as u8; 1024]);
        let second = raw::publish_v5("split/t", 1, 2 * round + 2, &[], &[2 * round as u8 + 1; 8]);
        // The first PUBLISH's head and part of its payload, then (after ntex has read that)
        // the rest of it with the second one.
        publisher.send(&first[..500]);
        std::thread::sleep(Duration::from_millis(100));
        let mut rest = first[500..].to_vec();
        rest.extend_from_slice(&second);
        publisher.send(&rest);
        for id in [2 * round + 1, 2 * round + 2] {
            let (ack, others) = publisher.read_kind(raw::PUBACK, WAIT);
            let ack =
                ack.unwrap_or_else(|| panic!("round {round}: no PUBACK {id}; got {others:?}"));
            assert_eq!(
                &ack.body[..2],
                &id.to_be_bytes(),
                "round {round}: PUBACK order"
            );
        }
        let got: Vec<(u8, usize)> = (0..2)
            .map(|_| {
                let p = next_publish(&mut sub, true, WAIT)
                    .unwrap_or_else(|| panic!("round {round}: a delivery is missing"));
                (p.payload[0], p.payload.len())
            })
            .collect();
        assert_eq!(
            got,
            vec![(2 * round as u8, 1024), (2 * round as u8 + 1, 8)],
            "round {round}: deliveries (first byte, length) in the order published"
        );
    }
}

/// A QoS 2 PUBLISH cut short by its connection ending (its payload never arrived whole) is
/// not routed, and must not count as received: the client re-sends it (DUP) after
/// reconnecting, and that copy is routed. Recorded at the start, the re-send looked like a
/// duplicate, got its PUBREC and the message was lost.
#[test]
fn a_qos2_publish_cut_short_is_routed_when_sent_again() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "cut-sub", true, 30, &[]);
    subscribe5(&mut sub, 1, "cut/t", 2, &[], 2);
    let expiry = prop::u32(0x11, 300);
    let (mut publisher, _) = connect5(&gw, "cut-pub", false, 30, &expiry);
    let whole = raw::publish_v5("cut/t", 2, 7, &[], &[7u8; 1024]);
    publisher.send(&whole[..500]);
    // ntex has read the PUBLISH's head and called its handler; then the connection ends.
    std::thread::sleep(Duration::from_millis(100));
    drop(publisher);
    std::thread::sleep(Duration::from_millis(100));

    let (mut publisher, connack) = connect5(&gw, "cut-pub", false, 30, &expiry);
    assert_eq!(connack.body[0] & 1, 1, "session present");
    let mut again = whole.clone();
    again[0] |= 0x08; // DUP
    publisher.send(&again);
    let (rec, others) = publisher.read_kind(raw::PUBREC, WAIT);
    let rec = rec.unwrap_or_else(|| panic!("no PUBREC; got {others:?}"));
    assert_eq!(&rec.body[..2], &7u16.to_be_bytes(), "PUBREC packet id");
    publisher.send(&raw::ack(raw::PUBREL, 7));
    assert!(
        publisher.read_kind(raw::PUBCOMP, WAIT).0.is_some(),
        "no PUBCOMP"
    );
    let delivered =
        next_publish(&mut sub, true, WAIT).expect("the message sent again is delivered");
    assert_eq!(delivered.payload, vec![7u8; 1024]);
    assert_quiet(&mut sub, true, Duration::from_millis(300), "one copy only");
}

/// An MQTT 5 QoS 1 PUBLISH handled before ntex's pipeline keeps what ntex would enforce
/// while it waits for the state file: its packet id stays in use, so a re-send with DUP is
/// acknowledged once, by the first one's PUBACK [MQTT-4.3.2-5], and a new PUBLISH with the
/// id gets 0x91 (Packet Identifier in use: PUBACK, or PUBREC for QoS 2, which ntex handles)
/// and is not routed, and a PUBREL for it closes the connection. Its PUBACK comes once the
/// message is durable, and the retained message survives kill -9.
#[test]
fn a_v5_publish_waiting_for_the_state_file_holds_its_packet_id() {
    let gw = Gateway::start_with_gateway("  commit_interval: 1s\n", "", "");
    let mut sub = connect3(&gw, "hold-sub");
    subscribe3(&mut sub, 1, "hold/#", 0);
    let (mut c, _) = connect5(&gw, "hold-pub", true, 30, &[]);
    let retained = |id: u16, payload: &[u8], dup: bool| {
        let mut p = raw::publish_v5("hold/r", 1, id, &[], payload);
        p[0] |= 0x01 | if dup { 0x08 } else { 0 };
        p
    };
    // A first durable PUBLISH: the next commit is a whole interval after its own.
    c.send(&retained(1, b"first", false));
    let (ack, _) = c.read_kind(raw::PUBACK, WAIT);
    assert_eq!(&ack.expect("PUBACK 1").body[..2], &1u16.to_be_bytes());

    let mut burst = retained(7, b"kept", false);
    burst.extend(retained(7, b"kept", true));
    burst.extend(raw::publish_v5("hold/other", 1, 7, &[], b"not routed"));
    // Not one the broker takes itself (QoS 2): ntex does not know the id either.
    burst.extend(raw::publish_v5("hold/q2", 2, 7, &[], b"not routed"));
    c.send(&burst);
    let mut acks = Vec::new();
    while let Some(p) = c.read(Duration::from_secs(3)) {
        acks.push((
            p.kind(),
            u16::from_be_bytes([p.body[0], p.body[1]]),
            reason_at(&p, 2),
        ));
    }
    assert_eq!(
        acks,
        [
            (raw::PUBACK, 7, 0x00),
            (raw::PUBACK, 7, 0x91),
            (raw::PUBREC, 7, 0x91)
        ],
        "acks (kind, id, reason) after the burst"
    );

    // Routed once; the PUBLISH answered 0x91 not at all.
    c.send(&raw::publish_v5("hold/end", 0, 0, &[], b"end"));
    let mut got = Vec::new();
    while let Some(p) = next_publish(&mut sub, false, WAIT) {
        let end = p.topic == "hold/end";
        got.push((p.topic, p.payload));
        if end {
            break;
        }
    }
    let expected: Vec<(String, Vec<u8>)> = [
        ("hold/r", &b"first"[..]),
        ("hold/r", b"kept"),
        ("hold/end", b"end"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_vec()))
    .collect();
    assert_eq!(got, expected);

    // A PUBREL for the id of a PUBLISH still waiting for the state file is a protocol
    // error: the connection closes, no PUBCOMP.
    let mut pair = raw::publish_v5("hold/s", 1, 8, &[], b"second");
    pair[0] |= 0x01; // retained: it waits for the state file
    pair.extend(raw::ack(raw::PUBREL, 8));
    c.send(&pair);
    let seen = expect_closed(&mut c, "PUBREL before PUBREC");
    assert!(
        seen.iter().all(|p| p.kind() != raw::PUBCOMP),
        "no PUBCOMP: {seen:?}"
    );

    drop((c, sub));
    let gw = gw.kill_and_restart();
    let mut late = connect3(&gw, "hold-late");
    subscribe3(&mut late, 1, "hold/r", 0);
    let p = next_publish(&mut late, false, WAIT).expect("retained after kill -9");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("hold/r", &b"kept"[..], true)
    );
}

/// A QoS 2 PUBLISH refused with a PUBREC reason code of 0x80 or more ends its exchange: no
/// PUBREL follows, and the client may use the id again at once. So the id is not kept as
/// received: a later PUBLISH with it and DUP set (a re-send after a reconnect, of a message
/// whose PUBREC the client did not get) is a new message, routed, not taken for a
/// duplicate and dropped.
#[test]
fn a_refused_qos2_publish_keeps_no_packet_id() {
    let gw = Gateway::start();
    let (mut sub, _) = connect5(&gw, "q2-sub", true, 30, &[]);
    subscribe5(&mut sub, 1, "q2/t", 2, &[], 2);
    let expiry = prop::u32(0x11, 60);
    let (mut c, _) = connect5(&gw, "q2-refused", true, 30, &expiry);
    // The payload format indicator says UTF-8; the payload is not: PUBREC 0x99.
    c.send(&raw::publish_v5(
        "q2/t",
        2,
        1,
        &prop::byte(0x01, 1),
        &[0xff, 0xfe],
    ));
    let rec = c.read(WAIT).expect("PUBREC");
    assert_eq!(rec.kind(), raw::PUBREC, "{rec:?}");
    assert_eq!(&rec.body[..3], &[0, 1, 0x99]);
    drop(c);
    // Id 1 again, for a message the client sent (it says) before the connection broke.
    let (mut c, ack) = connect5(&gw, "q2-refused", false, 30, &expiry);
    assert_eq!(ack.body[0] & 1, 1, "session present: {ack:?}");
    let mut resend = raw::publish_v5("q2/t", 2, 1, &[], b"resent");
    resend[0] |= 0x08;
    c.send(&resend);
    let rec = c.read(WAIT).expect("PUBREC");
    assert_eq!(rec.kind(), raw::PUBREC, "{rec:?}");
    assert_eq!(&rec.body[..2], &[0, 1]);
    let got = next_publish(&mut sub, true, WAIT).expect("the re-sent message is routed");
    assert_eq!(&got.payload[..], b"resent");
}
