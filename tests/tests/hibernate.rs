//! Hibernation of idle MQTT 3.1.1 and 5.0 connections (`broker.limits.hibernate_after`): the
//! broker lets go of an idle connection's state but keeps its socket and session, answers
//! its PINGREQs, and wakes it for a delivery or any other packet, with nothing the client
//! could notice (no second CONNACK, packets in order). Ends (EOF, keepalive, takeover) act
//! as they would on an awake connection. Byte-level client, real binary.

use std::time::{Duration, Instant};

use edgegw_tests::{
    Gateway,
    raw::{self, Packet, Raw},
};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);
const HIBERNATING: &str = "edgegw_broker_hibernating_connections";
const WAKES: &str = "edgegw_broker_hibernation_wakes_total";
const V3_CONNECTIONS: &str = r#"edgegw_broker_connections{protocol="3.1.1"}"#;
const WILLS: &str = "edgegw_broker_wills_published_total";
const SESSIONS: &str = "edgegw_broker_sessions";

fn gateway() -> Gateway {
    Gateway::start_with("  limits:\n    hibernate_after: 1s\n", "")
}

/// Sends a CONNECT (3.1.1 or 5.0) and checks it is accepted.
fn connect(gw: &Gateway, packet: &[u8]) -> Raw {
    connect_acked(gw, packet).0
}

/// [`connect`], also giving the CONNACK.
fn connect_acked(gw: &Gateway, packet: &[u8]) -> (Raw, raw::Packet) {
    let mut client = Raw::connect(gw.mqtt);
    client.send(packet);
    let connack = client.read(WAIT).expect("CONNACK");
    assert_eq!(connack.kind(), raw::CONNACK, "{connack:?}");
    assert_eq!(connack.body[1], 0, "CONNACK code (3.1.1) or reason (5.0)");
    (client, connack)
}

fn subscribe(client: &mut Raw, packet_id: u16, filter: &str, qos: u8) {
    client.send(&raw::subscribe_v3(packet_id, filter, qos));
    let (suback, others) = client.read_kind(raw::SUBACK, WAIT);
    assert!(
        suback.is_some() && others.is_empty(),
        "{suback:?} {others:?}"
    );
}

/// Waits until `n` connections hibernate.
fn wait_hibernating(gw: &Gateway, n: f64) {
    let value = gw.wait_metric(HIBERNATING, WAIT, |v| v == n);
    assert_eq!(value, n, "hibernating connections");
}

fn publish_bytes(p: &Packet) -> (String, Vec<u8>) {
    let len = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    let topic = String::from_utf8(p.body[2..2 + len].to_vec()).unwrap();
    let qos = (p.header >> 1) & 3;
    let start = 2 + len + if qos > 0 { 2 } else { 0 };
    (topic, p.body[start..].to_vec())
}

#[test]
fn an_idle_subscriber_hibernates_answers_pings_and_wakes_for_deliveries_unseen() {
    let gw = gateway();
    let mut sub = connect(&gw, &raw::connect_v3("sleeper", true, 30));
    subscribe(&mut sub, 1, "h/#", 1);
    wait_hibernating(&gw, 1.0);
    assert_eq!(
        gw.metric(V3_CONNECTIONS),
        1.0,
        "a hibernating connection still counts"
    );

    // PINGREQ answered without waking it.
    for _ in 0..3 {
        sub.send(&raw::pingreq());
        let pong = sub.read(WAIT).expect("PINGRESP");
        assert_eq!(pong.kind(), raw::PINGRESP);
    }
    assert_eq!(gw.metric(WAKES), 0.0, "a PINGREQ does not wake it");
    assert_eq!(gw.metric(HIBERNATING), 1.0);

    // A delivery wakes it: the client sees exactly the PUBLISH (no second CONNACK).
    let mut publisher = connect(&gw, &raw::connect_v3("pub", true, 30));
    publisher.send(&raw::publish_v3("h/1", 0, 0, false, b"first"));
    let first = sub.read(WAIT).expect("delivery");
    assert_eq!(first.kind(), raw::PUBLISH, "{first:?}");
    assert_eq!(publish_bytes(&first), ("h/1".into(), b"first".to_vec()));
    assert!(gw.metric(WAKES) >= 1.0);

    // QoS 1 after it hibernates again: in flight, acknowledged on the woken connection.
    wait_hibernating(&gw, 2.0);
    publisher.send(&raw::publish_v3("h/2", 1, 9, false, b"second"));
    let (puback, _) = publisher.read_kind(raw::PUBACK, WAIT);
    assert_eq!(puback.expect("PUBACK").body, vec![0, 9]);
    let second = sub.read(WAIT).expect("QoS 1 delivery");
    assert_eq!(second.kind(), raw::PUBLISH, "{second:?}");
    assert_eq!(publish_bytes(&second), ("h/2".into(), b"second".to_vec()));
    let id = [second.body[5], second.body[6]];
    sub.send(&raw::ack(raw::PUBACK, u16::from_be_bytes(id)));
    // Acked: nothing is in flight, so it hibernates again, and is not sent it twice.
    wait_hibernating(&gw, 2.0);
    assert!(sub.read(QUIET).is_none(), "nothing more for the subscriber");

    // Several packets in one write while hibernating: all handled, in order.
    let mut burst = raw::pingreq();
    burst.extend(raw::subscribe_v3(2, "other/#", 0));
    burst.extend(raw::pingreq());
    sub.send(&burst);
    let kinds: Vec<u8> = (0..3)
        .map(|_| sub.read(WAIT).expect("answer").kind())
        .collect();
    assert_eq!(kinds, vec![raw::PINGRESP, raw::SUBACK, raw::PINGRESP]);
    assert!(sub.read(QUIET).is_none(), "no CONNACK or anything else");
}

#[test]
fn a_hibernating_publisher_wakes_on_its_publish_and_is_answered() {
    let gw = gateway();
    let mut sub = connect(&gw, &raw::connect_v3("watcher", true, 30));
    subscribe(&mut sub, 1, "p/#", 0);
    let mut publisher = connect(&gw, &raw::connect_v3("sleepy-pub", true, 30));
    wait_hibernating(&gw, 2.0);
    // QoS 2 from hibernation: PUBREC, PUBREL, PUBCOMP on the woken connection.
    publisher.send(&raw::publish_v3("p/x", 2, 5, false, b"exactly once"));
    let (pubrec, others) = publisher.read_kind(raw::PUBREC, WAIT);
    assert_eq!(pubrec.expect("PUBREC").body, vec![0, 5]);
    assert!(
        others.is_empty(),
        "no CONNACK before the PUBREC: {others:?}"
    );
    publisher.send(&raw::ack(raw::PUBREL, 5));
    let (pubcomp, _) = publisher.read_kind(raw::PUBCOMP, WAIT);
    assert_eq!(pubcomp.expect("PUBCOMP").body, vec![0, 5]);
    let delivered = sub.read(WAIT).expect("delivery");
    assert_eq!(publish_bytes(&delivered).1, b"exactly once".to_vec());

    // A PINGREQ split across two writes while hibernating is still answered.
    wait_hibernating(&gw, 2.0);
    publisher.send(&[0xc0]);
    std::thread::sleep(Duration::from_millis(100));
    publisher.send(&[0x00]);
    assert_eq!(
        publisher.read(WAIT).expect("PINGRESP").kind(),
        raw::PINGRESP
    );
}

#[test]
fn a_hibernating_client_that_vanishes_or_goes_silent_gets_its_will_published() {
    let gw = gateway();
    let mut watcher = connect(&gw, &raw::connect_v3("will-watcher", true, 60));
    subscribe(&mut watcher, 1, "wills/#", 0);
    // Closes its socket while hibernating.
    let gone = connect(
        &gw,
        &raw::connect_v3_will("gone", true, 60, "wills/gone", b"bye", 0, false),
    );
    // Goes silent: keepalive 2 s, so ended 3 s after its last packet.
    let silent = connect(
        &gw,
        &raw::connect_v3_will("silent", true, 2, "wills/silent", b"timeout", 0, false),
    );
    wait_hibernating(&gw, 3.0);
    let start = Instant::now();
    drop(gone);
    let will = watcher.read(WAIT).expect("will of the closed client");
    assert_eq!(publish_bytes(&will), ("wills/gone".into(), b"bye".to_vec()));

    let will = watcher.read(WAIT).expect("will of the silent client");
    assert_eq!(
        publish_bytes(&will),
        ("wills/silent".into(), b"timeout".to_vec())
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let mut silent = silent;
    assert!(
        silent.closed_within(WAIT, &mut Vec::new()),
        "the silent client's socket is closed"
    );
    assert_eq!(gw.metric(WILLS), 2.0);
    let connections = gw.wait_metric(V3_CONNECTIONS, WAIT, |v| v == 1.0);
    assert_eq!(connections, 1.0, "only the watcher is left");

    // DISCONNECT from hibernation is a proper goodbye: no will.
    let mut polite = connect(
        &gw,
        &raw::connect_v3_will("polite", true, 60, "wills/polite", b"no", 0, false),
    );
    wait_hibernating(&gw, 2.0);
    polite.send(&raw::disconnect());
    assert!(polite.closed_within(WAIT, &mut Vec::new()));
    assert!(watcher.read(QUIET).is_none(), "no will after DISCONNECT");
    assert_eq!(gw.metric(WILLS), 2.0);
}

#[test]
fn a_takeover_closes_the_hibernating_connection_and_keeps_the_session() {
    let gw = gateway();
    let mut old = connect(&gw, &raw::connect_v3("twin", false, 60));
    subscribe(&mut old, 1, "twin/#", 1);
    wait_hibernating(&gw, 1.0);
    let mut new = Raw::connect(gw.mqtt);
    new.send(&raw::connect_v3("twin", false, 60));
    let connack = new.read(WAIT).expect("CONNACK");
    assert_eq!(connack.body, vec![1, 0], "session present");
    assert!(
        old.closed_within(WAIT, &mut Vec::new()),
        "the old socket is closed"
    );
    // The subscription made before hibernating is there for the new connection.
    let mut publisher = connect(&gw, &raw::connect_v3("twin-pub", true, 60));
    publisher.send(&raw::publish_v3("twin/a", 1, 1, false, b"still subscribed"));
    let delivery = new.read(WAIT).expect("delivery");
    assert_eq!(publish_bytes(&delivery).1, b"still subscribed".to_vec());
    let connections = gw.wait_metric(V3_CONNECTIONS, WAIT, |v| v == 2.0);
    assert_eq!(connections, 2.0);
}

/// A v5 PUBLISH received by a subscriber: topic, topic alias (0x23) and payload.
fn publish_v5_parts(p: &Packet) -> (String, Option<u16>, Vec<u8>) {
    let publish = raw::Publish::parse(p, true);
    let alias = publish
        .property(0x23)
        .map(|v| u16::from_be_bytes(v.try_into().expect("2-byte alias")));
    (publish.topic, alias, publish.payload)
}

#[test]
fn an_idle_mqtt_5_subscriber_hibernates_and_wakes_with_its_aliases_and_limits() {
    let gw = gateway();
    // Topic alias maximum 5, receive maximum 2, session expiry 60 s, and a will.
    let properties = [0x22, 0, 5, 0x21, 0, 2, 0x11, 0, 0, 0, 60];
    let mut sub = connect(
        &gw,
        &raw::connect_v5_will(
            "five",
            true,
            30,
            &properties,
            &[],
            "five/will",
            b"gone",
            0,
            false,
        ),
    );
    sub.send(&raw::subscribe_v5(1, "a/#", 1, &[]));
    let (suback, others) = sub.read_kind(raw::SUBACK, WAIT);
    assert!(
        suback.is_some() && others.is_empty(),
        "{suback:?} {others:?}"
    );
    let mut publisher = connect(&gw, &raw::connect_v3("pub5", true, 30));

    // The first message on a topic assigns alias 1.
    publisher.send(&raw::publish_v3("a/x", 0, 0, false, b"one"));
    let first = sub.read(WAIT).expect("first delivery");
    assert_eq!(
        publish_v5_parts(&first),
        ("a/x".into(), Some(1), b"one".to_vec())
    );
    wait_hibernating(&gw, 2.0);
    assert_eq!(
        gw.metric(r#"edgegw_broker_connections{protocol="5"}"#),
        1.0,
        "a hibernating 5.0 connection still counts"
    );

    // A PINGREQ is answered without waking it.
    sub.send(&raw::pingreq());
    assert_eq!(sub.read(WAIT).expect("PINGRESP").kind(), raw::PINGRESP);
    assert_eq!(gw.metric(WAKES), 0.0, "a PINGREQ does not wake it");

    // Woken by a delivery, it still knows the alias it gave the client: the message
    // carries the alias alone. No CONNACK comes first.
    publisher.send(&raw::publish_v3("a/x", 0, 0, false, b"two"));
    let second = sub.read(WAIT).expect("delivery after waking");
    assert_eq!(second.kind(), raw::PUBLISH, "{second:?}");
    assert_eq!(
        publish_v5_parts(&second),
        (String::new(), Some(1), b"two".to_vec())
    );
    assert!(gw.metric(WAKES) >= 1.0);

    // The client's receive maximum (2) still holds after waking.
    wait_hibernating(&gw, 2.0);
    for id in 1..=3u16 {
        publisher.send(&raw::publish_v3(
            "a/y",
            1,
            id,
            false,
            format!("q{id}").as_bytes(),
        ));
        let (puback, _) = publisher.read_kind(raw::PUBACK, WAIT);
        assert!(puback.is_some(), "PUBACK {id}");
    }
    let mut ids = Vec::new();
    for expected in [("a/y", Some(2), "q1"), ("", Some(2), "q2")] {
        let p = sub.read(WAIT).expect("QoS 1 delivery");
        let publish = raw::Publish::parse(&p, true);
        ids.push(publish.packet_id.expect("packet id"));
        let (topic, alias, payload) = publish_v5_parts(&p);
        assert_eq!((topic.as_str(), alias), (expected.0, expected.1));
        assert_eq!(payload, expected.2.as_bytes());
    }
    assert!(
        sub.read(QUIET).is_none(),
        "a third message exceeds receive maximum 2"
    );
    sub.send(&raw::ack(raw::PUBACK, ids[0]));
    let third = sub.read(WAIT).expect("the third after an ack");
    let id = raw::Publish::parse(&third, true)
        .packet_id
        .expect("packet id");
    assert_eq!(publish_v5_parts(&third).2, b"q3".to_vec());
    for id in [ids[1], id] {
        sub.send(&raw::ack(raw::PUBACK, id));
    }

    // Hibernating again, it wakes for a DISCONNECT that sets a session expiry, which a
    // client may do only if its CONNECT set one (the replayed CONNECT carries it): a
    // graceful end, so the will is not published.
    wait_hibernating(&gw, 2.0);
    let mut watcher = connect(&gw, &raw::connect_v3("watcher", true, 30));
    subscribe(&mut watcher, 1, "five/will", 0);
    sub.send(&raw::disconnect_v5(0, &[0x11, 0, 0, 0, 30]));
    let mut seen = Vec::new();
    assert!(sub.closed_within(WAIT, &mut seen), "the connection ends");
    assert!(seen.is_empty(), "nothing written back: {seen:?}");
    assert!(
        watcher.read(QUIET).is_none(),
        "no will after a graceful DISCONNECT"
    );
    assert_eq!(gw.metric(WILLS), 0.0);
}

#[test]
fn a_silent_hibernating_mqtt_5_client_told_a_lower_keepalive_gets_its_will_published() {
    let gw = Gateway::start_with(
        "  limits:\n    hibernate_after: 1s\n    max_keepalive: 2s\n",
        "",
    );
    // Keepalive 0: none, so it is not held to the 2 s cap.
    let mut watcher = connect(&gw, &raw::connect_v5("will-watcher5", true, 0, &[]));
    watcher.send(&raw::subscribe_v5(1, "wills5/#", 0, &[]));
    let (suback, _) = watcher.read_kind(raw::SUBACK, WAIT);
    assert!(suback.is_some());
    // Asks for 10 s; told 2 s (Server Keep Alive), so ended about 3 s after its last packet.
    let mut will_properties = vec![0x03];
    will_properties.extend(raw::string("text/plain"));
    let (mut silent, connack) = connect_acked(
        &gw,
        &raw::connect_v5_will(
            "silent5",
            true,
            10,
            &[],
            &will_properties,
            "wills5/silent",
            b"timeout",
            0,
            false,
        ),
    );
    let (length, used) = raw::read_varint(&connack.body[2..]).unwrap();
    let properties = raw::parse_properties(&connack.body[2 + used..2 + used + length]);
    assert!(
        properties.contains(&(0x13, vec![0, 2])),
        "Server Keep Alive 2: {properties:?}"
    );
    let start = Instant::now();
    wait_hibernating(&gw, 2.0);

    let will = watcher.read(WAIT).expect("will of the silent client");
    let will = raw::Publish::parse(&will, true);
    assert_eq!(
        (will.topic.as_str(), will.payload.as_slice()),
        ("wills5/silent", &b"timeout"[..])
    );
    assert_eq!(will.property(0x03), Some(&raw::string("text/plain")[..]));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        silent.closed_within(WAIT, &mut Vec::new()),
        "the silent client's socket is closed"
    );
    assert_eq!(gw.metric(WILLS), 1.0);
    let connections = gw.wait_metric(r#"edgegw_broker_connections{protocol="5"}"#, WAIT, |v| {
        v == 1.0
    });
    assert_eq!(connections, 1.0, "only the watcher is left");
    assert_eq!(gw.metric(V3_CONNECTIONS), 0.0);
    // One "Client disconnected." for it, at the end: none when it hibernated.
    let ends: Vec<_> = gw
        .logs()
        .into_iter()
        .filter(|line| {
            line["fields"]["message"] == "Client disconnected."
                && line["fields"]["client_id"] == "silent5"
        })
        .collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["fields"]["hibernating"], true, "{ends:?}");
}

#[test]
fn a_vanished_hibernating_mqtt_5_client_gets_its_delayed_will_and_its_session_expires() {
    let gw = gateway();
    let mut watcher = connect(&gw, &raw::connect_v3("delay-watcher", true, 60));
    subscribe(&mut watcher, 1, "dw/#", 0);
    // Session expiry 3 s, will delay 1 s: both are timers the broker starts when the
    // connection ends, here on the parking thread.
    let client = connect(
        &gw,
        &raw::connect_v5_will(
            "delayed",
            true,
            30,
            &[0x11, 0, 0, 0, 3],
            &[0x18, 0, 0, 0, 1],
            "dw/x",
            b"late",
            0,
            false,
        ),
    );
    wait_hibernating(&gw, 2.0);
    assert_eq!(gw.metric(SESSIONS), 2.0);
    drop(client);
    let dropped = Instant::now();
    let will = watcher.read(WAIT).expect("the will after its delay");
    assert!(
        dropped.elapsed() >= Duration::from_millis(900),
        "the will waits for its delay (1 s): {:?}",
        dropped.elapsed()
    );
    assert_eq!(publish_bytes(&will), ("dw/x".into(), b"late".to_vec()));
    let sessions = gw.wait_metric(SESSIONS, WAIT, |v| v == 1.0);
    assert_eq!(sessions, 1.0, "the session expired; the watcher's is left");
    assert_eq!(gw.metric(WILLS), 1.0, "published once");
    assert!(watcher.read(QUIET).is_none(), "nothing more");
}

#[test]
fn an_mqtt_5_client_that_used_a_topic_alias_stays_awake() {
    let gw = gateway();
    let mut watcher = connect(&gw, &raw::connect_v3("alias-watcher", true, 30));
    subscribe(&mut watcher, 1, "al/#", 0);
    let _plain = connect(&gw, &raw::connect_v5("plain5", true, 30, &[]));
    let mut aliaser = connect(&gw, &raw::connect_v5("aliaser", true, 30, &[]));
    // Topic and alias 1: ntex-mqtt keeps the alias for this connection.
    aliaser.send(&raw::publish_v5("al/1", 0, 0, &[0x23, 0, 1], b"a"));
    assert_eq!(
        publish_bytes(&watcher.read(WAIT).expect("delivery")).1,
        b"a"
    );

    wait_hibernating(&gw, 2.0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(gw.metric(HIBERNATING), 2.0, "the watcher and plain5 only");
    // The alias alone still names the topic.
    aliaser.send(&raw::publish_v5("", 0, 0, &[0x23, 0, 1], b"b"));
    let delivery = watcher.read(WAIT).expect("delivery by alias");
    assert_eq!(publish_bytes(&delivery), ("al/1".into(), b"b".to_vec()));
}

#[test]
fn a_clean_session_takeover_ends_the_hibernating_connection_at_once() {
    let gw = gateway();
    let mut watcher = connect(&gw, &raw::connect_v3("takeover-watcher", true, 60));
    subscribe(&mut watcher, 1, "wills/#", 0);
    let mut old = connect(
        &gw,
        &raw::connect_v3_will("device", true, 60, "wills/device", b"offline", 0, false),
    );
    wait_hibernating(&gw, 2.0);
    // The device comes back (new address, same id, clean session).
    let _new = connect(&gw, &raw::connect_v3("device", true, 60));
    assert!(
        old.closed_within(Duration::from_secs(3), &mut Vec::new()),
        "the hibernating connection is closed when another takes its client id over"
    );
    let will = watcher.read(WAIT).expect("the old connection's will");
    assert_eq!(
        publish_bytes(&will),
        ("wills/device".into(), b"offline".to_vec())
    );
    let connections = gw.wait_metric(V3_CONNECTIONS, WAIT, |v| v == 2.0);
    assert_eq!(connections, 2.0, "the watcher and the new connection");
}

/// Descriptors the gateway process has open.
fn open_descriptors(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .expect("the gateway's /proc/PID/fd")
        .count()
}

#[test]
fn connections_opened_at_once_hold_one_descriptor_each_and_all_hibernate() {
    const N: usize = 200;
    // Slack for descriptors the gateway opens meanwhile (a metrics scrape, a log file).
    const SLACK: usize = 16;
    let gw = Gateway::start_with("  limits:\n    hibernate_after: 3s\n", "");
    // Settled: the gateway's own descriptors (state file, listeners, threads' pollers).
    std::thread::sleep(QUIET);
    let base = open_descriptors(&gw);
    let clients: Vec<Raw> = (0..N)
        .map(|i| connect(&gw, &raw::connect_v3(&format!("many-{i}"), true, 60)))
        .collect();
    // Awake, each connection has one descriptor: none is duplicated until it hibernates.
    let awake = open_descriptors(&gw);
    assert!(
        awake <= base + N + SLACK,
        "{awake} descriptors with {N} awake connections (before: {base})"
    );
    // Every one hibernates, however many were awake at once, still with one each.
    let value = gw.wait_metric(HIBERNATING, WAIT + Duration::from_secs(5), |v| {
        v == N as f64
    });
    assert_eq!(value, N as f64, "hibernating connections");
    let parked = open_descriptors(&gw);
    assert!(
        parked <= base + N + SLACK,
        "{parked} descriptors with {N} hibernating connections (before: {base})"
    );
    // Closed by their clients: the hibernating connections end and let go of their sockets.
    drop(clients);
    let value = gw.wait_metric(V3_CONNECTIONS, WAIT, |v| v == 0.0);
    assert_eq!(value, 0.0, "connections after the clients closed");
    assert_eq!(gw.metric(HIBERNATING), 0.0);
    let deadline = Instant::now() + WAIT;
    while open_descriptors(&gw) > base + SLACK && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = open_descriptors(&gw);
    assert!(
        after <= base + SLACK,
        "{after} descriptors after every client closed (before: {base})"
    );
}

#[test]
fn a_flood_of_pingreqs_to_a_hibernating_connection_wakes_it_and_each_is_answered() {
    // The parking thread answers at most 16 rounds of PINGREQs (32 each) per event, then
    // hands the connection to its worker, so one client does not hold the thread; every
    // PINGREQ is still answered, once, in order.
    const PINGS: usize = 2_000;
    let gw = gateway();
    let mut pinger = connect(&gw, &raw::connect_v3("pinger", true, 30));
    let mut sub = connect(&gw, &raw::connect_v3("bystander", true, 30));
    subscribe(&mut sub, 1, "b/#", 0);
    wait_hibernating(&gw, 2.0);
    let flood: Vec<u8> = (0..PINGS).flat_map(|_| raw::pingreq()).collect();
    pinger.send(&flood);
    for i in 0..PINGS {
        let pong = pinger
            .read(WAIT)
            .unwrap_or_else(|| panic!("PINGRESP {i} of {PINGS}"));
        assert_eq!(pong.kind(), raw::PINGRESP, "answer {i}");
    }
    assert!(pinger.read(QUIET).is_none(), "nothing but the PINGRESPs");
    assert!(
        gw.metric(WAKES) >= 1.0,
        "the flood was handed to the worker"
    );
    // The other hibernating connection is still served afterwards.
    let mut publisher = connect(&gw, &raw::connect_v3("b-pub", true, 30));
    publisher.send(&raw::publish_v3("b/1", 0, 0, false, b"still here"));
    let delivered = sub.read(WAIT).expect("delivery to the bystander");
    assert_eq!(publish_bytes(&delivered).1, b"still here".to_vec());
}

#[test]
fn a_packet_sent_just_as_the_connection_hibernates_is_not_lost() {
    // Clients publish (QoS 1) about when their connection hibernates, 1 s after the
    // CONNACK plus up to ntex's timer granularity and the worker's lateness. ntex may read
    // such a PUBLISH after the connection was handed over; it must reach the woken
    // connection, not vanish: every PUBLISH is acked. (Before the fix about 1.5% were lost
    // here.) The moment shifts with the load, so each round aims where the last one found
    // it: about half of a round's PUBLISHes should find their connection hibernating.
    const CLIENTS: usize = 200;
    const ROUNDS: usize = 10;
    let gw = gateway();
    // Every PUBLISH is delivered once.
    // Keepalive 0: it sends nothing, and must not be held to a keepalive.
    let mut watcher = connect(&gw, &raw::connect_v3("edge-watcher", true, 0));
    subscribe(&mut watcher, 1, "edge/#", 0);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let watching = watching.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::HashMap::<String, usize>::new();
            let mut unexpected = Vec::new();
            loop {
                let asked = Instant::now();
                match watcher.read(Duration::from_millis(200)) {
                    Some(packet) if packet.kind() == raw::PUBLISH => {
                        *seen.entry(publish_bytes(&packet).0).or_default() += 1;
                    }
                    Some(other) => unexpected.push(format!("{other:?}")),
                    None if !watching.load(std::sync::atomic::Ordering::Relaxed) => break,
                    // Closed (not a timeout): stop rather than spin.
                    None if asked.elapsed() < Duration::from_millis(150) => {
                        unexpected.push("the connection closed".into());
                        break;
                    }
                    None => {}
                }
            }
            (seen, unexpected)
        })
    };
    let lost = std::sync::atomic::AtomicUsize::new(0);
    let stray = std::sync::atomic::AtomicUsize::new(0);
    let mut aim_ms = 10.0f64;
    let mut woke = 0.0;
    let mut shares = Vec::new();
    for round in 0..ROUNDS {
        let wakes_before = gw.metric(WAKES);
        std::thread::scope(|scope| {
            for client in 0..CLIENTS {
                let (gw, lost, stray) = (&gw, &lost, &stray);
                scope.spawn(move || {
                    let id = format!("edge-{round}-{client}");
                    let mut conn = connect(gw, &raw::connect_v3(&id, true, 60));
                    let connected = Instant::now();
                    // Spread over 40 ms around the aim.
                    let offset_ms = aim_ms + client as f64 * 40.0 / CLIENTS as f64 - 20.0;
                    let at = Duration::from_secs_f64((1000.0 + offset_ms) / 1000.0);
                    std::thread::sleep(at.saturating_sub(connected.elapsed()));
                    conn.send(&raw::publish_v3(&format!("edge/{id}"), 1, 1, false, b"x"));
                    let (puback, others) = conn.read_kind(raw::PUBACK, Duration::from_secs(3));
                    if puback.is_none() {
                        lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // No CONNACK of a replayed CONNECT, nothing else before the PUBACK.
                    stray.fetch_add(others.len(), std::sync::atomic::Ordering::Relaxed);
                    conn.send(&raw::disconnect());
                });
            }
        });
        let round_woke = gw.metric(WAKES) - wakes_before;
        woke += round_woke;
        let share = round_woke / CLIENTS as f64;
        shares.push(format!("{share:.2} at {aim_ms:+.0} ms"));
        if share < 0.3 {
            aim_ms += 10.0;
        } else if share > 0.7 {
            aim_ms -= 10.0;
        }
    }
    // The watcher has every message once (each was routed before its PUBACK; it stops
    // after 200 ms without a packet once told to).
    std::thread::sleep(QUIET);
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (seen, unexpected) = watch.join().expect("the watcher");
    let attempts = (CLIENTS * ROUNDS) as f64;
    assert_eq!(
        lost.into_inner(),
        0,
        "PUBLISHes without a PUBACK of {attempts}; share that woke a hibernated connection \
         per round: {shares:?}"
    );
    assert_eq!(stray.into_inner(), 0, "packets before the PUBACK");
    assert!(unexpected.is_empty(), "the watcher: {unexpected:?}");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), CLIENTS * ROUNDS, "messages delivered");
    // Enough PUBLISHes on either side of the hand-over for the test to mean something.
    assert!(
        (0.05..=0.95).contains(&(woke / attempts)),
        "{woke} of {attempts} PUBLISHes woke a hibernated connection: {shares:?}"
    );
}
