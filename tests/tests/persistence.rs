//! Durable state: retained messages and persistent sessions survive a graceful restart and
//! `kill -9`; an unreadable state file stops the gateway with a clear error.

use std::{process::Command, time::Duration};

use edgegw_tests::{
    Gateway,
    raw::{self, Publish, Raw},
};

const WAIT: Duration = Duration::from_secs(10);

fn connect_v3(gw: &Gateway, id: &str, clean: bool) -> (Raw, bool) {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3(id, clean, 60));
    let ack = c.read(WAIT).expect("CONNACK");
    assert_eq!(ack.kind(), raw::CONNACK);
    assert_eq!(ack.body[1], 0, "CONNACK return code");
    (c, ack.body[0] & 1 == 1)
}

/// Publishes at QoS 1 and waits for the PUBACK: from then on the message is acknowledged.
fn publish_acked(c: &mut Raw, topic: &str, packet_id: u16, retain: bool, payload: &[u8]) {
    let mut bytes = raw::publish_v3(topic, 1, packet_id, false, payload);
    if retain {
        bytes[0] |= 0x01;
    }
    c.send(&bytes);
    let (ack, _) = c.read_kind(raw::PUBACK, WAIT);
    assert_eq!(ack.expect("PUBACK").body, packet_id.to_be_bytes());
}

fn subscribe(c: &mut Raw, filter: &str, qos: u8) {
    c.send(&raw::subscribe_v3(1, filter, qos));
    let (ack, _) = c.read_kind(raw::SUBACK, WAIT);
    assert_eq!(ack.expect("SUBACK").body[2], qos);
}

/// Makes sure the broker has processed everything `c` sent (a PINGREQ round trip: packets
/// are handled in order) and that the state file has committed it.
fn settle(gw: &Gateway, c: &mut Raw) {
    c.send(&raw::pingreq());
    assert!(c.read_kind(raw::PINGRESP, WAIT).0.is_some(), "PINGRESP");
    let pending = gw.wait_metric("edgegw_store_pending_ops", WAIT, |v| v == 0.0);
    // `pending_ops` drops only after the batch's transaction has committed (and synced).
    assert_eq!(pending, 0.0, "state file did not commit");
}

fn next_publish(c: &mut Raw) -> Publish {
    let (p, _) = c.read_kind(raw::PUBLISH, WAIT);
    Publish::parse(&p.expect("PUBLISH"), false)
}

#[test]
fn retained_messages_survive_kill_9_and_graceful_restart() {
    let gw = Gateway::start();
    let (mut publisher, _) = connect_v3(&gw, "pub", true);
    publish_acked(&mut publisher, "r/1", 1, true, b"one");
    publish_acked(&mut publisher, "r/2", 2, true, b"two");
    publish_acked(&mut publisher, "r/2", 3, true, b"");
    publish_acked(&mut publisher, "r/3", 4, true, b"three");
    drop(publisher);

    let gw = gw.kill_and_restart();
    let (mut sub, _) = connect_v3(&gw, "sub", true);
    subscribe(&mut sub, "r/#", 1);
    let got: Vec<(String, Vec<u8>, bool)> = (0..2)
        .map(|_| {
            let p = next_publish(&mut sub);
            (p.topic, p.payload, p.retain)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("r/1".to_string(), b"one".to_vec(), true),
            ("r/3".to_string(), b"three".to_vec(), true)
        ]
    );
    assert!(
        sub.read(Duration::from_millis(500)).is_none(),
        "r/2 was cleared"
    );
    drop(sub);

    let gw = gw.stop_and_restart();
    assert_eq!(gw.metric("edgegw_broker_retained_messages"), 2.0);
}

#[test]
fn offline_queue_of_a_persistent_session_survives_kill_9() {
    let gw = Gateway::start();
    let (mut sub, present) = connect_v3(&gw, "keeper", false);
    assert!(!present);
    subscribe(&mut sub, "q/#", 1);
    drop(sub);
    gw.wait_metric("edgegw_broker_connections{protocol=\"3.1.1\"}", WAIT, |v| {
        v == 0.0
    });

    let (mut publisher, _) = connect_v3(&gw, "pub", true);
    for i in 1..=20u16 {
        publish_acked(&mut publisher, "q/a", i, false, format!("m{i}").as_bytes());
    }
    drop(publisher);

    let gw = gw.kill_and_restart();
    let (mut sub, present) = connect_v3(&gw, "keeper", false);
    assert!(present, "session restored");
    let mut got = Vec::new();
    for _ in 0..20 {
        let p = next_publish(&mut sub);
        sub.send(&raw::ack(raw::PUBACK, p.packet_id.unwrap()));
        got.push(String::from_utf8(p.payload).unwrap());
    }
    let want: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every acknowledged message, in order");

    // The subscription itself survived too: new messages still reach the session.
    let (mut publisher, _) = connect_v3(&gw, "pub2", true);
    publish_acked(&mut publisher, "q/b", 1, false, b"after");
    let p = next_publish(&mut sub);
    assert_eq!(p.payload, b"after");
    sub.send(&raw::ack(raw::PUBACK, p.packet_id.unwrap()));

    // Acknowledged deliveries are gone from the state file.
    settle(&gw, &mut sub);
    drop(sub);
    drop(publisher);
    let gw = gw.kill_and_restart();
    let (mut sub, present) = connect_v3(&gw, "keeper", false);
    assert!(present);
    assert!(
        sub.read(Duration::from_millis(800)).is_none(),
        "nothing owed after the acks"
    );
}

#[test]
fn qos2_in_flight_state_survives_kill_9() {
    let gw = Gateway::start();
    let (mut sub, _) = connect_v3(&gw, "q2", false);
    subscribe(&mut sub, "x/#", 2);
    let (mut publisher, _) = connect_v3(&gw, "pub", true);
    publisher.send(&raw::publish_v3("x/1", 2, 7, false, b"once"));
    assert!(publisher.read_kind(raw::PUBREC, WAIT).0.is_some());
    publisher.send(&raw::ack(raw::PUBREL, 7));
    assert!(publisher.read_kind(raw::PUBCOMP, WAIT).0.is_some());

    let p = next_publish(&mut sub);
    let id = p.packet_id.unwrap();
    sub.send(&raw::ack(raw::PUBREC, id));
    assert!(sub.read_kind(raw::PUBREL, WAIT).0.is_some());
    settle(&gw, &mut sub);
    drop(sub); // PUBCOMP withheld
    drop(publisher);

    let gw = gw.kill_and_restart();
    let (mut sub, present) = connect_v3(&gw, "q2", false);
    assert!(present);
    let p = sub.read(WAIT).expect("owed PUBREL");
    assert_eq!(
        p.kind(),
        raw::PUBREL,
        "PUBREC was stored: only PUBREL is owed, got {p:?}"
    );
    assert_eq!(p.body[..2], id.to_be_bytes());
    sub.send(&raw::ack(raw::PUBCOMP, id));
    assert!(sub.read(Duration::from_millis(500)).is_none());
}

#[test]
fn inbound_qos2_dedup_survives_kill_9() {
    let gw = Gateway::start();
    let (mut watcher, _) = connect_v3(&gw, "watch", false);
    subscribe(&mut watcher, "eo/#", 1);
    let (mut publisher, _) = connect_v3(&gw, "eo-pub", false);
    publisher.send(&raw::publish_v3("eo/1", 2, 9, false, b"exactly once"));
    assert!(publisher.read_kind(raw::PUBREC, WAIT).0.is_some());
    let first = next_publish(&mut watcher);
    watcher.send(&raw::ack(raw::PUBACK, first.packet_id.unwrap()));
    settle(&gw, &mut watcher);
    drop(publisher);
    drop(watcher);

    let gw = gw.kill_and_restart();
    let (mut watcher, _) = connect_v3(&gw, "watch", false);
    let (mut publisher, present) = connect_v3(&gw, "eo-pub", false);
    assert!(present);
    // The publisher never saw PUBCOMP: it re-sends with DUP, then releases.
    publisher.send(&raw::publish_v3("eo/1", 2, 9, true, b"exactly once"));
    assert!(publisher.read_kind(raw::PUBREC, WAIT).0.is_some());
    publisher.send(&raw::ack(raw::PUBREL, 9));
    assert!(publisher.read_kind(raw::PUBCOMP, WAIT).0.is_some());
    assert!(
        watcher.read(Duration::from_millis(800)).is_none(),
        "the re-sent QoS 2 message was routed a second time"
    );
}

#[test]
fn unreadable_state_file_stops_the_gateway() {
    // A directory this test owns, so it outlives the first gateway.
    let own = tempfile::tempdir().unwrap();
    let config = own.path().join("gateway.yaml");
    let data = own.path().join("data");
    std::fs::write(
        &config,
        format!(
            "gateway: {{ data_dir: {} }}\nbroker: {{ listeners: [ {{ bind: \"127.0.0.1:0\" }} ] }}\nmetrics: {{ bind: \"127.0.0.1:0\" }}\nlog: {{ format: json }}\n",
            data.display()
        ),
    )
    .unwrap();
    let gw = Gateway::start_file(&config, tempfile::tempdir().unwrap());
    assert_eq!(gw.terminate().code(), Some(0));
    let state = data.join("state.db");
    assert!(state.exists(), "the state file is created at start");
    for f in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    std::fs::write(&state, vec![0x5a; 16384]).unwrap();
    let out = Command::new(edgegw_tests::binary())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&state.display().to_string())
            && stderr.contains("not a valid edgegw state file"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        vec![0x5a; 16384],
        "left untouched"
    );
}

/// Clean sessions (the common case) never touch the state file: no fsyncs for them.
#[test]
fn clean_sessions_do_not_write_the_state_file() {
    let gw = Gateway::start();
    for i in 0..20 {
        let (mut c, _) = connect_v3(&gw, &format!("clean-{i}"), true);
        subscribe(&mut c, "c/#", 1);
        c.send(&raw::publish_v3("c/x", 1, 1, false, b"x"));
        assert!(c.read_kind(raw::PUBACK, WAIT).0.is_some());
        c.send(&raw::disconnect());
    }
    gw.wait_metric("edgegw_broker_sessions", WAIT, |v| v == 0.0);
    assert_eq!(gw.metric("edgegw_store_ops_total"), 0.0);
}

/// A publisher whose messages must be made durable gets `receive_maximum` of them into one
/// commit: 250 QoS 1 PUBLISHes sent at once, each queued for an offline persistent session,
/// are acknowledged after at most two commits (the first can take only what was read when
/// the writer woke). ntex-mqtt's response queue held 64 answers by default and stopped
/// reading beyond, so each commit took at most 64 and these 250 needed at least four.
#[test]
fn a_publisher_waiting_for_commits_gets_receive_maximum_into_one() {
    const COUNT: u16 = 250;
    let gw = Gateway::start_with_gateway(
        "  commit_interval: 1s\n",
        "  limits:\n    receive_maximum: 300\n",
        "",
    );
    let (mut sub, _) = connect_v3(&gw, "durable-sub", false);
    subscribe(&mut sub, "d/t", 1);
    sub.send(&raw::disconnect());
    assert!(
        sub.closed_within(WAIT, &mut Vec::new()),
        "DISCONNECT closes"
    );
    let (mut publisher, _) = connect_v3(&gw, "durable-pub", true);
    settle(&gw, &mut publisher);

    let commits = gw.metric("edgegw_store_commits_total");
    let burst: Vec<u8> = (1..=COUNT)
        .flat_map(|id| raw::publish_v3("d/t", 1, id, false, &[b'x'; 100]))
        .collect();
    publisher.send(&burst);
    for id in 1..=COUNT {
        let (ack, _) = publisher.read_kind(raw::PUBACK, WAIT);
        assert_eq!(ack.expect("PUBACK").body, id.to_be_bytes());
    }
    let used = gw.metric("edgegw_store_commits_total") - commits;
    assert!(
        used <= 2.0,
        "{COUNT} publishes took {used} commits of the state file"
    );

    // They are all queued for the persistent session.
    let (mut sub, present) = connect_v3(&gw, "durable-sub", false);
    assert!(present, "session present");
    for id in 1..=COUNT {
        let p = next_publish(&mut sub);
        assert_eq!(p.payload, vec![b'x'; 100], "message {id}");
        sub.send(&raw::ack(raw::PUBACK, p.packet_id.expect("QoS 1")));
    }
}
