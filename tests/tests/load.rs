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
    // The first second's worth (50) is never delayed: at most the other 100 are.
    let throttled = gw.metric("edgegw_broker_publishes_throttled_total");
    assert!(
        (90.0..=100.0).contains(&throttled),
        "{throttled} publishes delayed; want the 100 after the burst (90 at least)"
    );
}

/// Bytes waiting in the kernel on a loopback TCP connection, from `/proc/net/tcp`: those
/// `local`'s socket has sent but the peer has not acknowledged (its send queue), those the
/// peer's socket has received but its process has not read (its receive queue), and those
/// `local`'s socket has received and its process has not read.
fn kernel_queues(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> (u64, u64, u64) {
    let key = |addr: std::net::SocketAddr| match addr {
        // The kernel prints the address's bytes as one native-endian word.
        std::net::SocketAddr::V4(a) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            )
        }
        std::net::SocketAddr::V6(_) => panic!("the test gateway listens on IPv4"),
    };
    let (local, peer) = (key(local), key(peer));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let (mut send_queue, mut receive_queue, mut local_unread) = (None, None, None);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (tx, rx) = fields[4].split_once(':').expect("tx_queue:rx_queue");
        if fields[1] == local && fields[2] == peer {
            send_queue = Some(u64::from_str_radix(tx, 16).unwrap());
            local_unread = Some(u64::from_str_radix(rx, 16).unwrap());
        } else if fields[1] == peer && fields[2] == local {
            receive_queue = Some(u64::from_str_radix(rx, 16).unwrap());
        }
    }
    (
        send_queue.expect("the client's socket in /proc/net/tcp"),
        receive_queue.expect("the broker's socket in /proc/net/tcp"),
        local_unread.expect("the client's socket in /proc/net/tcp"),
    )
}

/// While PUBLISHes passed to their handlers are held (here by `max_publish_rate`), the
/// broker stops reading from the connection, so what the client sends waits in the kernel
/// rather than in the broker; reading resumes as the handlers finish, and nothing is lost,
/// repeated or reordered on the way.
///
/// The 1 KiB PUBLISHes often end up split across two reads, so ntex streams their payloads:
/// before `Conn::in_order`, a streamed one was routed after the whole one read right behind
/// it (pairs swapped about every 126 messages). The bound on what the broker reads holds
/// with `AckGuard`'s 65,535-byte limit switched off too (ntex's own read backpressure stops
/// it first here); that limit is checked by the unit tests in `inflight.rs`.
#[test]
fn publishes_held_back_bound_what_is_read_and_are_routed_in_order() {
    use std::{
        io::{ErrorKind, Read},
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    /// `inflight::MAX_RECEIVE_SIZE`: bytes of passed packets in hand above which reading
    /// pauses.
    const MAX_RECEIVE_SIZE: i64 = 65_535;
    /// What else the broker may hold read but unhandled: ntex's read buffer (32 KiB
    /// backpressure watermark, plus one read of up to 64 KiB past it), the ack layer's and
    /// the decoder's buffers, and PUBACKs of handled messages still on their way.
    const READ_SLACK: i64 = 256 * 1024;
    /// 1.5 MiB of 1 KiB QoS 1 PUBLISHes, at 250 a second after a burst of 250: about
    /// 5 s of handling, many times what the broker may hold read.
    const MESSAGES: usize = 1_500;
    const RATE: usize = 250;
    const DEADLINE: Duration = Duration::from_secs(120);

    let gw = Gateway::start_with(&format!("  limits:\n    max_publish_rate: {RATE}\n"), "");
    let started = Instant::now();
    let mut sub = connect(&gw, "pause-sub");
    sub.send(&raw::subscribe_v3(1, "pause/x", 1));
    assert!(sub.read_kind(raw::SUBACK, WAIT).0.is_some());
    // The subscriber acknowledges every delivery and keeps the sequence numbers, up to
    // the last message (`MESSAGES`, sent once all before it are acknowledged).
    let subscriber = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.last() != Some(&(MESSAGES as u64)) && got.len() <= MESSAGES {
            let p = sub.read(WAIT).expect("a delivery within 10 s");
            let publish = Publish::parse(&p, false);
            assert_eq!(publish.qos, 1);
            assert!(!publish.dup, "a delivery re-sent");
            sub.send(&raw::ack(raw::PUBACK, publish.packet_id.unwrap()));
            got.push(u64::from_be_bytes(publish.payload[..8].try_into().unwrap()));
        }
        got
    });

    let message = |seq: usize| {
        let mut payload = vec![b'p'; 1024];
        payload[..8].copy_from_slice(&(seq as u64).to_be_bytes());
        raw::publish_v3("pause/x", 1, (seq % 65_535) as u16 + 1, false, &payload)
    };
    let packet_len = message(0).len();
    let flood: Vec<u8> = (0..MESSAGES).flat_map(message).collect();

    // A small send buffer (the kernel's default grows to 4 MiB): what the broker leaves
    // unread soon fills it, and a send would block.
    let mut publisher = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap()
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(64 * 1024).unwrap();
            let stream = socket.connect(gw.mqtt).await.unwrap();
            stream.into_std().unwrap()
        });
    publisher.set_nonblocking(false).unwrap();
    publisher.set_nodelay(true).unwrap();
    publisher
        .write_all(&raw::connect_v3("pause-pub", true, 0))
        .unwrap();
    let mut connack = [0u8; 4];
    publisher.set_read_timeout(Some(WAIT)).unwrap();
    publisher.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    let (local, peer) = (publisher.local_addr().unwrap(), gw.mqtt);
    publisher.set_nonblocking(true).unwrap();

    // PUBACKs, counted as they arrive (in packet order: ids 1, 2, ...).
    let acked = Arc::new(AtomicUsize::new(0));
    let acks = {
        let acked = acked.clone();
        let mut stream = publisher.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut chunk = [0u8; 4096];
            while acked.load(Ordering::SeqCst) <= MESSAGES && started.elapsed() < DEADLINE {
                match stream.read(&mut chunk) {
                    Ok(0) => panic!("the broker closed the publisher's connection"),
                    Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => panic!("reading PUBACKs: {e}"),
                }
                let whole = pending.len() / 4 * 4;
                for ack in pending[..whole].chunks(4) {
                    let n = acked.load(Ordering::SeqCst);
                    let id = (n % 65_535) as u16 + 1;
                    let [hi, lo] = id.to_be_bytes();
                    assert_eq!(ack, [0x40, 2, hi, lo], "PUBACK {n} in order");
                    acked.store(n + 1, Ordering::SeqCst);
                }
                pending.drain(..whole);
            }
        })
    };

    // The bytes the broker has read and not yet handled (acknowledged), at most: sent,
    // less what waits in the kernel, less what the PUBACKs account for (counted, or
    // received and not yet read by the thread counting them, which may lag on a busy
    // machine).
    let mut sent = 0usize;
    let mut most_held: i64 = 0;
    let mut most_waiting = 0u64;
    let mut most_unread = 0u64;
    let mut sample = |sent: usize| {
        let (send_queue, receive_queue, acks_unread) = kernel_queues(local, peer);
        let read = sent as i64 - send_queue as i64 - receive_queue as i64;
        let acks = acked.load(Ordering::SeqCst) + acks_unread as usize / 4;
        let handled = (acks * packet_len) as i64;
        most_held = most_held.max(read - handled);
        most_waiting = most_waiting.max(send_queue + receive_queue);
        most_unread = most_unread.max(receive_queue);
    };
    let mut blocked = 0u32;
    while sent < flood.len() {
        assert!(started.elapsed() < DEADLINE, "sending took over 120 s");
        let end = flood.len().min(sent + 64 * 1024);
        match publisher.write(&flood[sent..end]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                blocked += 1;
                sample(sent);
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
    // Reading resumes as the handlers finish: every message is acknowledged.
    while acked.load(Ordering::SeqCst) < MESSAGES {
        assert!(
            started.elapsed() < DEADLINE,
            "{} of {MESSAGES} PUBACKs after 120 s",
            acked.load(Ordering::SeqCst)
        );
        sample(sent);
        std::thread::sleep(Duration::from_millis(5));
    }
    sample(sent);
    let (send_queue, receive_queue, _) = kernel_queues(local, peer);
    assert_eq!(
        (send_queue, receive_queue),
        (0, 0),
        "the broker read everything"
    );
    // The last message, after every other one is acknowledged: the subscriber stops there.
    let last = message(MESSAGES);
    let mut at = 0;
    while at < last.len() {
        assert!(started.elapsed() < DEADLINE);
        match publisher.write(&last[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
    acks.join().expect("PUBACKs in order");
    assert_eq!(acked.load(Ordering::SeqCst), MESSAGES + 1, "every PUBACK");
    let got = subscriber.join().expect("deliveries");
    eprintln!(
        "sent {} bytes, blocked {blocked} times; at most {most_held} bytes read and \
         unhandled, {most_waiting} waiting in the kernel, {most_unread} unread in the broker's \
         socket; {:?}",
        flood.len(),
        started.elapsed()
    );
    assert!(
        blocked > 0,
        "the publisher's sends never blocked: the broker read everything at once"
    );
    assert!(
        most_held <= MAX_RECEIVE_SIZE + READ_SLACK,
        "the broker read {most_held} bytes more than it handled, over the {MAX_RECEIVE_SIZE} \
         it may hold (plus {READ_SLACK} of buffers)"
    );
    let out_of_place: Vec<(usize, u64)> = got
        .iter()
        .enumerate()
        .filter(|&(at, &seq)| seq != at as u64)
        .map(|(at, &seq)| (at, seq))
        .take(20)
        .collect();
    assert!(
        got.len() == MESSAGES + 1 && out_of_place.is_empty(),
        "every message exactly once, in order: {} of {} delivered; (position, message) out \
         of place: {out_of_place:?}",
        got.len(),
        MESSAGES + 1
    );
}

/// Under `max_publish_rate`, a QoS 0 PUBLISH whose payload ntex streams (it arrives in two
/// TCP segments) goes through the connection's QoS 0 lane, not its handler; it must still
/// take its rate-limit slot after the PUBLISHes before it, not overtake one waiting for its
/// turn [MQTT-4.6.0-6]. Here a burst uses up the allowance, `a` waits for its slot, `b` for
/// `a`, and `c`'s payload is complete long before `b`'s turn.
#[test]
fn a_streamed_qos0_publish_under_the_rate_limit_keeps_its_place() {
    const RATE: u8 = 5;
    let gw = Gateway::start_with(&format!("  limits:\n    max_publish_rate: {RATE}\n"), "");
    let mut sub = connect(&gw, "lane-sub");
    sub.send(&raw::subscribe_v3(1, "lane/x", 0));
    assert!(sub.read_kind(raw::SUBACK, WAIT).0.is_some());
    let mut publisher = connect(&gw, "lane-pub");
    // One more than a second's worth (the burst allowed), then `a` and `b`.
    let small = RATE + 3;
    let mut burst = Vec::new();
    for seq in 0..small {
        burst.extend(raw::publish_v3("lane/x", 0, 0, false, &[seq]));
    }
    publisher.send(&burst);
    // `c`: its head and part of its payload, then the rest once ntex has read that.
    let mut payload = vec![b'c'; 2048];
    payload[0] = small;
    let c = raw::publish_v3("lane/x", 0, 0, false, &payload);
    publisher.send(&c[..600]);
    std::thread::sleep(Duration::from_millis(50));
    publisher.send(&c[600..]);
    let got: Vec<u8> = (0..=small)
        .map(|i| {
            let p = sub
                .read(WAIT)
                .unwrap_or_else(|| panic!("delivery {i} did not arrive"));
            Publish::parse(&p, false).payload[0]
        })
        .collect();
    assert_eq!(
        got,
        (0..=small).collect::<Vec<u8>>(),
        "QoS 0 deliveries in the order published"
    );
}
