//! Uplinks end to end: the real gateway forwarding to a real Mosquitto (Debian) standing in
//! for the cloud broker, over mutual TLS, through a fault-injecting proxy, across kill -9.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use edgegw_tests::{
    Gateway, message,
    mosquitto::{Mosquitto, free_port},
    pki::Pki,
    proxy::Proxy,
    raw::{self, Raw},
};

mod common;

use common::{Observer, WAIT, publish_seq};

/// Starts a gateway whose config has `uplink` (a YAML list item, indented 2 spaces) under
/// `uplinks:`.
fn gateway_with(uplink: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "gateway:\n  id: test\n  data_dir: {data}\n  commit_interval: 5ms\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\nuplinks:\n{uplink}metrics:\n  bind: 127.0.0.1:0\nlog:\n  level: debug\n  format: json\n",
        data = dir.path().join("data").display()
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config).unwrap();
    Gateway::start_file(&path, dir)
}

fn payloads(received: &[(String, String)]) -> Vec<u32> {
    received.iter().map(|(_, p)| p.parse().unwrap()).collect()
}

/// Waits until the uplink `cloud` has forwarded `count` messages and its outbox is empty.
fn wait_forwarded_and_drained(gw: &Gateway, count: f64) {
    gw.wait_metric(
        "edgegw_uplink_forwarded_messages_total{uplink=\"cloud\"}",
        WAIT,
        |v| v == count,
    );
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 0.0,
    );
}

fn outbox_messages(gw: &Gateway) -> f64 {
    gw.metric("edgegw_uplink_outbox_messages{uplink=\"cloud\"}")
}

/// The `uplinks:` entry `cloud`: mutual TLS to 127.0.0.1:`port` with `pki`'s client
/// certificate, `protocol`, `sensors/#` forwarded to `site1/{topic}` at QoS 1, and `extra`
/// (whole lines of more keys).
fn mutual_tls_uplink(port: u16, pki: &Pki, protocol: &str, extra: &str) -> String {
    format!(
        "  - name: cloud\n    url: mqtts://127.0.0.1:{port}\n    protocol: {protocol}\n{extra}    \
         tls: {{ ca: {ca}, cert: {cert}, key: {key} }}\n    \
         forward: [ {{ from: \"sensors/#\", to: \"site1/{{topic}}\", qos: 1 }} ]\n",
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    )
}

#[test]
fn forwards_over_mutual_tls_and_delivers_downlinks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let cloud = Mosquitto::start(Some(&pki));
    let tls = cloud.tls.unwrap();
    for protocol in ["5", "3.1.1"] {
        let observer = Observer::start(cloud.plain, "site1/#");
        let gw = gateway_with(&mutual_tls_uplink(
            tls.port(),
            &pki,
            protocol,
            &format!(
                "    client_id: gw-{}\n    \
                 subscribe: [ {{ remote: \"site1/control/#\", local: \"control/{{3..}}\", qos: 1 }} ]\n",
                protocol.replace('.', "")
            ),
        ));
        gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
            v == 1.0
        });

        let acked = publish_seq(gw.mqtt, "sensors/kitchen/temp", 0..200);
        assert_eq!(acked.len(), 200, "protocol {protocol}");
        let got = observer.wait_for(200, WAIT);
        assert_eq!(
            payloads(&got),
            (0..200).collect::<Vec<_>>(),
            "protocol {protocol}: once each, in order"
        );
        assert!(got.iter().all(|(t, _)| t == "site1/sensors/kitchen/temp"));
        wait_forwarded_and_drained(&gw, 200.0);

        // Downlink: the cloud's control message reaches a local subscriber, mapped.
        let mut local = Raw::connect(gw.mqtt);
        local.send(&raw::connect_v3("local-sub", true, 60));
        assert_eq!(local.read(WAIT).expect("CONNACK").kind(), 2);
        local.send(&raw::subscribe_v3(1, "control/#", 1));
        assert_eq!(local.read(WAIT).expect("SUBACK").kind(), 9);
        observer.publish("site1/control/kitchen/led", "on");
        let (publish, _) = local.read_kind(3, WAIT);
        let publish = raw::Publish::parse(&publish.expect("downlink PUBLISH"), false);
        assert_eq!(publish.topic, "control/kitchen/led");
        assert_eq!(publish.payload, b"on");
        // A downlink message is never forwarded back up, though `control/#` is not
        // forwarded anyway: the observer saw only the readings and its own message.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(observer.wait_for(0, Duration::ZERO).len(), 201);
    }
}

/// Publishes one QoS 1 message to the gateway and waits for its PUBACK.
fn publish_one(gw: std::net::SocketAddr, topic: &str, payload: &[u8]) {
    let mut c = Raw::connect(gw);
    c.send(&raw::connect_v3(&format!("one-{}", free_port()), true, 60));
    assert_eq!(c.read(WAIT).expect("CONNACK").kind(), 2);
    c.send(&raw::publish_v3(topic, 1, 1, false, payload));
    let (puback, _) = c.read_kind(4, WAIT);
    assert!(puback.is_some(), "no PUBACK for {topic}");
}

#[test]
fn what_the_cloud_broker_cannot_take_is_dropped_and_counted_without_blocking_the_rest() {
    // Mosquitto's maximum packet size is 1000 bytes here. MQTT 5 clients learn it from
    // CONNACK; for 3.1.1 the uplink's `max_packet_size` says it (brokers differ in what they
    // do with a larger packet from a 3.1.1 client). With MQTT 5, Mosquitto also answers a
    // publish its ACL denies with PUBACK 0x87. None of these may stall the messages behind or
    // bring the link down.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic readwrite site1/#\ntopic deny site1/sensors/secret\n",
    )
    .unwrap();
    let cloud = Mosquitto::start_with(
        Some(&pki),
        &format!("max_packet_size 1000\nacl_file {}\n", acl.display()),
    );
    for (protocol, extra) in [("5", ""), ("3.1.1", "    max_packet_size: 1000\n")] {
        let observer = Observer::start(cloud.plain, "site1/#");
        let gw = gateway_with(&mutual_tls_uplink(
            cloud.tls.unwrap().port(),
            &pki,
            protocol,
            extra,
        ));
        gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
            v == 1.0
        });
        assert_eq!(publish_seq(gw.mqtt, "sensors/a", 0..5).len(), 5);
        // PUBLISH to `site1/sensors/a` at QoS 1: fixed header 1 + 2 (remaining length),
        // topic 2 + 15, packet id 2, and with MQTT 5 one byte of property length.
        let largest = 1000 - 22 - usize::from(protocol == "5");
        publish_one(gw.mqtt, "sensors/a", format!("{:0>largest$}", 5).as_bytes());
        publish_one(gw.mqtt, "sensors/a", &vec![b'x'; largest + 1]);
        publish_one(gw.mqtt, "sensors/a", &[b'x'; 2000]);
        let refusals = if protocol == "5" {
            // 3.1.1 has no negative PUBACK: Mosquitto acknowledges and drops it.
            publish_one(gw.mqtt, "sensors/secret", b"42");
            1.0
        } else {
            0.0
        };
        assert_eq!(publish_seq(gw.mqtt, "sensors/a", 6..11).len(), 5);

        let got = observer.wait_for(11, WAIT);
        assert_eq!(
            payloads(&got),
            (0..11).collect::<Vec<_>>(),
            "protocol {protocol}: {got:?}"
        );
        for (reason, count) in [("too_large", 2.0), ("refused", refusals)] {
            let sample = format!(
                "edgegw_uplink_dropped_messages_total{{uplink=\"cloud\",reason=\"{reason}\"}}"
            );
            assert_eq!(
                gw.wait_metric(&sample, WAIT, |v| v == count),
                count,
                "protocol {protocol}: {sample}"
            );
        }
        wait_forwarded_and_drained(&gw, 11.0);
        // Dropped for good, not retried: the link never went down.
        assert_eq!(
            gw.metric("edgegw_uplink_reconnects_total{uplink=\"cloud\"}"),
            0.0,
            "protocol {protocol}"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(observer.wait_for(0, Duration::ZERO).len(), 11);
    }
}

#[test]
fn a_wrong_ca_is_reported_and_retried_while_messages_wait() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let cloud = Mosquitto::start(Some(&pki));
    let gw = gateway_with(&format!(
        "  - name: cloud\n    url: mqtts://127.0.0.1:{port}\n    reconnect: {{ min: 100ms, max: 200ms }}\n    \
         tls: {{ ca: {ca}, cert: {cert}, key: {key} }}\n    \
         forward: [ {{ from: \"sensors/#\", qos: 1 }} ]\n",
        port = cloud.tls.unwrap().port(),
        ca = pki.other_ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    ));
    let failed = gw.wait_log(WAIT, |line| {
        message(line) == Some("Uplink cannot connect; retrying.")
            && line["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    assert!(failed, "no certificate error in {:#?}", gw.logs());
    gw.wait_metric(
        "edgegw_uplink_connect_failures_total{uplink=\"cloud\"}",
        WAIT,
        |v| v >= 3.0,
    );
    assert_eq!(gw.metric("edgegw_uplink_connected{uplink=\"cloud\"}"), 0.0);
    // Publishers are served meanwhile; their messages wait in the outbox.
    assert_eq!(publish_seq(gw.mqtt, "sensors/a", 0..10).len(), 10);
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 10.0,
    );
}

#[test]
fn outages_and_stalls_lose_nothing_and_keep_order() {
    let cloud = Mosquitto::start(None);
    let proxy = Proxy::start(cloud.plain);
    let observer = Observer::start(cloud.plain, "up/#");
    let gw = gateway_with(&format!(
        "  - name: cloud\n    url: mqtt://{addr}\n    keepalive: 30s\n    reconnect: {{ min: 100ms, max: 400ms }}\n    \
         forward: [ {{ from: \"sensors/#\", to: \"up/{{topic}}\", qos: 1 }} ]\n",
        addr = proxy.addr,
    ));
    gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
        v == 1.0
    });
    assert_eq!(publish_seq(gw.mqtt, "sensors/t", 0..100).len(), 100);
    assert_eq!(observer.wait_for(100, WAIT).len(), 100);
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 0.0,
    );

    // Outage: the link is cut and new connections refused. Publishers are still
    // acknowledged; messages accumulate in the outbox.
    proxy.cut();
    gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
        v == 0.0
    });
    assert_eq!(publish_seq(gw.mqtt, "sensors/t", 100..400).len(), 300);
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 300.0,
    );
    assert!(gw.metric("edgegw_uplink_outbox_oldest_age_seconds{uplink=\"cloud\"}") >= 0.0);
    assert_eq!(observer.wait_for(0, Duration::ZERO).len(), 100);
    proxy.pass();
    gw.wait_metric(
        "edgegw_uplink_reconnects_total{uplink=\"cloud\"}",
        WAIT,
        |v| v >= 1.0,
    );
    let got = observer.wait_for(400, WAIT);
    assert_eq!(payloads(&got), (0..400).collect::<Vec<_>>());

    // Stall: bytes are held mid-stream (no acks come back), then flow again.
    proxy.stall();
    assert_eq!(publish_seq(gw.mqtt, "sensors/t", 400..500).len(), 100);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        outbox_messages(&gw) > 0.0,
        "nothing can be acknowledged while stalled"
    );
    proxy.pass();
    let got = observer.wait_for(500, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let got_after = observer.wait_for(0, Duration::ZERO);
    assert_eq!(got.len(), got_after.len(), "no duplicates after the stall");
    assert_eq!(payloads(&got_after), (0..500).collect::<Vec<_>>());
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 0.0,
    );
}

#[test]
fn kill_9_while_forwarding_loses_no_acknowledged_message() {
    let cloud = Mosquitto::start(None);
    let observer = Observer::start(cloud.plain, "up/#");
    let inflight = 16;
    let uplink = format!(
        "  - name: cloud\n    url: mqtt://{addr}\n    inflight: {inflight}\n    \
         forward: [ {{ from: \"sensors/#\", to: \"up/{{topic}}\", qos: 1 }} ]\n",
        addr = cloud.plain,
    );
    let gw = gateway_with(&uplink);
    gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
        v == 1.0
    });
    // Publish from another thread while the gateway is killed under it.
    let addr = gw.mqtt;
    let publisher = std::thread::spawn(move || publish_seq(addr, "sensors/k", 0..20_000));
    let deadline = Instant::now() + WAIT;
    while observer.wait_for(0, Duration::ZERO).len() < 500 {
        assert!(Instant::now() < deadline, "forwarding never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let gw = gw.kill_and_restart();
    let acked = publisher.join().unwrap();
    assert!(
        acked.len() >= 500 && acked.len() < 20_000,
        "the kill should land mid-stream ({} acked)",
        acked.len()
    );
    gw.wait_metric(
        "edgegw_uplink_outbox_messages{uplink=\"cloud\"}",
        WAIT,
        |v| v == 0.0,
    );
    std::thread::sleep(Duration::from_millis(300));
    let got = payloads(&observer.wait_for(0, Duration::ZERO));
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for seq in &got {
        *seen.entry(*seq).or_default() += 1;
    }
    let missing: Vec<u32> = acked
        .iter()
        .filter(|s| !seen.contains_key(s))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never forwarded: {missing:?}"
    );
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        duplicates <= inflight,
        "{duplicates} duplicates; at most the in-flight window ({inflight}) may be sent twice"
    );
    // Order: apart from the re-sent window, each message arrives after its predecessor.
    let mut first_seen: Vec<u32> = Vec::new();
    let mut present = std::collections::HashSet::new();
    for seq in got {
        if present.insert(seq) {
            first_seen.push(seq);
        }
    }
    assert!(first_seen.windows(2).all(|w| w[0] < w[1]), "out of order");
}

#[test]
fn outbox_policies_apply_while_the_cloud_is_unreachable() {
    let cloud = Mosquitto::start(None);
    for policy in ["drop_oldest", "drop_new", "block"] {
        let proxy = Proxy::start(cloud.plain);
        proxy.cut();
        let observer = Observer::start(cloud.plain, "up/#");
        let gw = gateway_with(&format!(
            "  - name: cloud\n    url: mqtt://{addr}\n    reconnect: {{ min: 100ms, max: 200ms }}\n    \
             forward: [ {{ from: \"sensors/#\", to: \"up/{{topic}}\", qos: 1 }} ]\n    \
             outbox: {{ max_messages: 5, on_full: {policy} }}\n",
            addr = proxy.addr,
        ));
        let expected: Vec<u32> = match policy {
            "drop_oldest" => {
                assert_eq!(publish_seq(gw.mqtt, "sensors/p", 0..8).len(), 8);
                gw.wait_metric(
                    "edgegw_uplink_dropped_messages_total{uplink=\"cloud\",reason=\"full\"}",
                    WAIT,
                    |v| v == 3.0,
                );
                (3..8).collect()
            }
            "drop_new" => {
                assert_eq!(publish_seq(gw.mqtt, "sensors/p", 0..8).len(), 8);
                assert_eq!(
                    gw.metric(
                        "edgegw_uplink_dropped_messages_total{uplink=\"cloud\",reason=\"full\"}"
                    ),
                    3.0
                );
                (0..5).collect()
            }
            _ => {
                // The sixth publish is not acknowledged while the outbox is full.
                assert_eq!(publish_seq(gw.mqtt, "sensors/p", 0..5).len(), 5);
                let addr = gw.mqtt;
                let blocked = std::thread::spawn(move || publish_seq(addr, "sensors/p", 5..6));
                std::thread::sleep(Duration::from_secs(1));
                assert!(
                    !blocked.is_finished(),
                    "acknowledged although the outbox is full"
                );
                proxy.pass();
                assert_eq!(blocked.join().unwrap(), [5]);
                (0..6).collect()
            }
        };
        proxy.pass();
        let got = observer.wait_for(expected.len(), WAIT);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            payloads(&observer.wait_for(0, Duration::ZERO)),
            expected,
            "policy {policy}: {got:?}"
        );
    }
}

fn reload_config(path: &std::path::Path, data: &std::path::Path, uplinks: &str, pipelines: &str) {
    std::fs::write(
        path,
        format!(
            "gateway:\n  id: test\n  data_dir: {data}\n  commit_interval: 5ms\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\nuplinks:\n{uplinks}pipelines:\n{pipelines}metrics:\n  bind: 127.0.0.1:0\nlog:\n  level: debug\n  format: json\n",
            data = data.display()
        ),
    )
    .unwrap();
}

/// SIGHUP while messages flow: the forward rules and the connection settings of an uplink
/// change, a new uplink (used by a pipeline) starts and later goes away; nothing a publisher
/// had acknowledged is lost and the MQTT connections stay up.
#[test]
fn reload_changes_uplinks_live_without_losing_messages() {
    let cloud = Mosquitto::start(None);
    let observer = Observer::start(cloud.plain, "#");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    let first = format!(
        "  - name: cloud\n    url: mqtt://{addr}\n    client_id: gw-a\n    forward: [ {{ from: \"sensors/#\", to: \"site1/{{topic}}\", qos: 1 }} ]\n",
        addr = cloud.plain
    );
    reload_config(&path, &data, &first, "  []\n");
    let gw = Gateway::start_file(&path, dir);
    gw.wait_metric("edgegw_uplink_connected{uplink=\"cloud\"}", WAIT, |v| {
        v == 1.0
    });

    // A publisher keeps going while the config changes under it.
    let mqtt = gw.mqtt;
    let publisher = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for chunk in 0..20u32 {
            acked.extend(publish_seq(
                mqtt,
                "sensors/a",
                chunk * 100..(chunk + 1) * 100,
            ));
            std::thread::sleep(Duration::from_millis(50));
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));
    let second = format!(
        "{first_changed}  - name: second\n    url: mqtt://{addr}\n    client_id: gw-second\n    forward: [ {{ from: \"alerts/#\", to: \"second/{{topic}}\", qos: 1 }} ]\n",
        first_changed = first
            .replace("client_id: gw-a", "client_id: gw-b")
            .replace("site1/", "site2/"),
        addr = cloud.plain
    );
    reload_config(
        &path,
        &gw.dir.path().join("data"),
        &second,
        "  - { name: toup, from: [ \"metrics/#\" ], to: [ \"uplink:second\" ] }\n",
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        gw.wait_log(WAIT, |l| message(l) == Some("Uplink reconfigured.")
            && l["fields"]["forward_rules"] == true
            && l["fields"]["reconnected"] == true),
        "{:#?}",
        gw.logs()
    );
    gw.wait_metric("edgegw_uplink_connected{uplink=\"second\"}", WAIT, |v| {
        v == 1.0
    });

    let acked = publisher.join().unwrap();
    assert_eq!(acked.len(), 2000, "every publish acknowledged");
    // Each acknowledged message reaches the cloud, under the old or the new rule.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut site1, mut site2);
    loop {
        let got = observer.wait_for(0, Duration::ZERO);
        site1 = got.iter().filter(|(t, _)| t == "site1/sensors/a").count();
        site2 = got.iter().filter(|(t, _)| t == "site2/sensors/a").count();
        let mut seen: Vec<u32> = got
            .iter()
            .filter(|(t, _)| t.ends_with("sensors/a"))
            .map(|(_, p)| p.parse().unwrap())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() == 2000 || Instant::now() > deadline {
            assert_eq!(
                seen,
                (0..2000).collect::<Vec<_>>(),
                "nothing lost across the reload"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        site1 > 0 && site2 > 0,
        "both rules were in force: {site1} / {site2}"
    );
    assert!(
        site1 + site2 <= 2000 + 100,
        "duplicates stay within the window: {}",
        site1 + site2 - 2000
    );

    // The new uplink forwards by its own rule and as a pipeline output.
    observer.publish("alerts/door", "open");
    let mut local = Raw::connect(gw.mqtt);
    local.send(&raw::connect_v3("metrics-pub", true, 60));
    assert_eq!(local.read(WAIT).expect("CONNACK").kind(), 2);
    local.send(&raw::publish_v3("alerts/window", 0, 0, false, b"closed"));
    local.send(&raw::publish_v3("metrics/cpu", 0, 0, false, b"42"));
    let deadline = Instant::now() + WAIT;
    loop {
        let got = observer.wait_for(0, Duration::ZERO);
        let has = |topic: &str, payload: &str| got.iter().any(|(t, p)| t == topic && p == payload);
        if has("second/alerts/window", "closed") && has("metrics/cpu", "42") {
            break;
        }
        assert!(Instant::now() < deadline, "second uplink: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Removing it again stops it; the local connection stays up.
    let third = first
        .replace("client_id: gw-a", "client_id: gw-b")
        .replace("site1/", "site2/");
    reload_config(&path, &gw.dir.path().join("data"), &third, "  []\n");
    std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(
        gw.wait_log(WAIT, |l| message(l)
            == Some(
                "Uplink removed from the config; stopping it (its outbox file stays)."
            )
            && l["fields"]["uplink"] == "second"),
        "{:#?}",
        gw.logs()
    );
    local.send(&raw::publish_v3("sensors/a", 1, 7, false, b"after"));
    let (ack, _) = local.read_kind(4, WAIT);
    assert!(ack.is_some(), "the local connection survived both reloads");
    let deadline = Instant::now() + WAIT;
    while !observer
        .wait_for(0, Duration::ZERO)
        .iter()
        .any(|(t, p)| t == "site2/sensors/a" && p == "after")
    {
        assert!(Instant::now() < deadline, "the kept uplink still forwards");
        std::thread::sleep(Duration::from_millis(50));
    }
}
