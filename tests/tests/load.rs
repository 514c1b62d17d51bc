//! Load behaviour that must hold on a small gateway: a subscriber that stops reading costs
//! bounded memory and does not slow anyone else; thousands of idle connections work.
//! These assert bounds and counts, never speed.

use std::{
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use edgegw_tests::{
    Gateway,
    raw::{self, Publish, Raw},
};

const WAIT: Duration = Duration::from_secs(10);

fn connect(gw: &Gateway, id: &str) -> Raw {
    let mut c = Raw::connect(gw.mqtt);
    c.send(&raw::connect_v3(id, true, 0));
    let ack = c.read(WAIT).expect("CONNACK");
    assert_eq!(ack.body, vec![0, 0], "CONNACK for {id}");
    c
}

#[test]
fn a_stalled_subscriber_costs_bounded_memory_and_slows_nobody() {
    let gw = Gateway::start_with("  limits:\n    max_queued: 100\n", "");
    // The stalled subscriber: subscribes and never reads again.
    let mut stalled = connect(&gw, "stalled");
    stalled.send(&raw::subscribe_v3(1, "flood/#", 1));
    assert!(stalled.read_kind(raw::SUBACK, WAIT).0.is_some());
    let mut healthy = connect(&gw, "healthy");
    healthy.send(&raw::subscribe_v3(1, "other/#", 0));
    assert!(healthy.read_kind(raw::SUBACK, WAIT).0.is_some());

    // 100,000 QoS 0 messages of 1 KiB (about 100 MiB) at the stalled subscriber, with a
    // message for the healthy one every 1,000.
    let mut flood = TcpStream::connect(gw.mqtt).unwrap();
    flood.write_all(&raw::connect_v3("flood", true, 0)).unwrap();
    let payload = vec![b'x'; 1024];
    let one = raw::publish_v3("flood/a", 0, 0, false, &payload);
    let mut batch = Vec::with_capacity(one.len() * 100);
    for _ in 0..100 {
        batch.extend_from_slice(&one);
    }
    let started = Instant::now();
    let mut peak_rss = 0;
    for round in 0..1000u32 {
        flood.write_all(&batch).unwrap();
        if round % 10 == 0 {
            flood
                .write_all(&raw::publish_v3(
                    "other/x",
                    0,
                    0,
                    false,
                    round.to_string().as_bytes(),
                ))
                .unwrap();
            peak_rss = peak_rss.max(gw.memory_kib().0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "flood took too long"
        );
    }
    // The healthy subscriber got every one of its 100 messages, in order.
    let mut got = Vec::new();
    while got.len() < 100 {
        let p = healthy.read(WAIT).expect("healthy subscriber starved");
        got.push(String::from_utf8(Publish::parse(&p, false).payload).unwrap());
    }
    let want: Vec<String> = (0..1000).step_by(10).map(|r: u32| r.to_string()).collect();
    assert_eq!(got, want);

    let (_, hwm) = gw.memory_kib();
    let dropped = gw.metric("edgegw_broker_dropped_messages_total{reason=\"queue_full\"}");
    eprintln!(
        "peak RSS {} KiB (sampled {peak_rss} KiB), queue_full drops {dropped}",
        hwm
    );
    assert!(
        dropped > 0.0,
        "the stalled subscriber's queue must overflow and be counted"
    );
    // Bounded: queue (100 × 1 KiB) plus socket buffers, far below the 100 MiB sent.
    assert!(
        hwm < 80 * 1024,
        "gateway peak RSS {hwm} KiB grew with the flood"
    );
    drop(stalled);
}

#[test]
fn ten_thousand_idle_connections() {
    const N: usize = 10_000;
    // This process holds N client sockets (the gateway raises its own limit itself).
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit < N as u64 + 200 {
        eprintln!(
            "\n*** SKIPPED ten_thousand_idle_connections: the open-file hard limit is {limit}, \
             below the {} this test needs (raise it with `ulimit -Hn`). ***\n",
            N + 200
        );
        return;
    }
    let gw = Gateway::start_with("  limits:\n    max_connections: 20000\n", "");
    let (before, _) = gw.memory_kib();
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = TcpStream::connect(gw.mqtt).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(&raw::connect_v3(&format!("idle-{i}"), true, 0))
            .unwrap();
        clients.push(s);
    }
    let connected = gw.wait_metric(
        "edgegw_broker_connections{protocol=\"3.1.1\"}",
        Duration::from_secs(120),
        |v| v as usize == N,
    );
    assert_eq!(connected as usize, N);
    let (after, _) = gw.memory_kib();
    eprintln!(
        "{N} idle connections: RSS {before} -> {after} KiB, {:.2} KiB per connection",
        (after.saturating_sub(before)) as f64 / N as f64
    );
    // Still serving: a round trip through the broker.
    let mut sub = connect(&gw, "probe-sub");
    sub.send(&raw::subscribe_v3(1, "probe", 0));
    assert!(sub.read_kind(raw::SUBACK, WAIT).0.is_some());
    let mut publisher = connect(&gw, "probe-pub");
    publisher.send(&raw::publish_v3("probe", 0, 0, false, b"alive"));
    assert_eq!(
        Publish::parse(&sub.read(WAIT).expect("probe"), false).payload,
        b"alive"
    );
    drop(clients);
    gw.wait_metric(
        "edgegw_broker_connections{protocol=\"3.1.1\"}",
        Duration::from_secs(60),
        |v| v <= 2.0,
    );
}

/// `max_publish_rate` slows a fast publisher down without losing or reordering anything.
#[test]
fn publish_rate_limit_delays_but_keeps_every_message_in_order() {
    let gw = Gateway::start_with("  limits:\n    max_publish_rate: 50\n", "");
    let mut sub = connect(&gw, "rate-sub");
    sub.send(&raw::subscribe_v3(1, "rate/#", 1));
    assert!(sub.read_kind(raw::SUBACK, WAIT).0.is_some());
    let mut publisher = TcpStream::connect(gw.mqtt).unwrap();
    publisher
        .write_all(&raw::connect_v3("rate-pub", true, 0))
        .unwrap();
    let started = Instant::now();
    let mut burst = Vec::new();
    for i in 0..150u16 {
        burst.extend(raw::publish_v3(
            "rate/x",
            0,
            0,
            false,
            i.to_string().as_bytes(),
        ));
    }
    publisher.write_all(&burst).unwrap();
    let mut got = Vec::new();
    while got.len() < 150 {
        let p = sub.read(WAIT).expect("throttled messages still arrive");
        got.push(String::from_utf8(Publish::parse(&p, false).payload).unwrap());
    }
    let elapsed = started.elapsed();
    let want: Vec<String> = (0..150).map(|i: u16| i.to_string()).collect();
    assert_eq!(got, want, "every message, in order");
    // 50 pass in the initial burst, the other 100 at 50/s: at least 2 s minus slack. This
    // is the limiter's own lower bound, not a speed expectation.
    assert!(
        elapsed >= Duration::from_millis(1800),
        "not throttled: {elapsed:?}"
    );
    assert!(gw.metric("edgegw_broker_publishes_throttled_total") >= 90.0);
}
