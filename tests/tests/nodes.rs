//! The node link end to end: `node-sim` ↔ PTY ↔ the real gateway ↔ an MQTT client.
//!
//! Two PTY pairs and a relay in the test: the gateway opens one pair's terminal, node-sim
//! the other's, and the test copies bytes between the two controlling ends, so it can also
//! inject noise into the gateway's stream, and unplug the gateway's pair and plug in a new one
//! (as a USB adapter pulled out and put back). No socat, no hardware.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, PoisonError, RwLock, mpsc},
    time::{Duration, Instant},
};

use edgegw_tests::Gateway;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tokio_serial::{SerialPort as _, SerialStream};

const WAIT: Duration = Duration::from_secs(20);

/// `SerialStream::pair` opens both ends without `O_CLOEXEC`, so a process spawned while a pair
/// is open (by any test here: they run in parallel) inherits both ends and keeps the pair
/// open, and closing it in the test then hangs nothing up. Spawns hold this shared
/// ([`spawning`]); a test that must really close a pair holds it exclusively for as long as
/// that pair exists.
static SPAWNS: RwLock<()> = RwLock::new(());

fn spawning<T>(spawn: impl FnOnce() -> T) -> T {
    let _shared = SPAWNS.read().unwrap_or_else(PoisonError::into_inner);
    spawn()
}

fn node_sim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        spawning(|| {
            escargot::CargoBuild::new()
                .package("edgegw-node-sim")
                .bin("node-sim")
                .manifest_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
                .run()
                .expect("building node-sim")
        })
        .path()
        .to_path_buf()
    })
    .clone()
}

/// node-sim with its stdout lines on a channel. Killed on drop.
struct NodeSim {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl NodeSim {
    fn start(port: &str, id: &str) -> Self {
        Self::start_with(port, id, &[])
    }

    /// With more options, e.g. `&["--qos", "2"]`.
    fn start_with(port: &str, id: &str, options: &[&str]) -> Self {
        let binary = node_sim_binary();
        let mut child = spawning(|| {
            Command::new(binary)
                .args(["--port", port, "--id", id, "--interval", "200ms"])
                .args(options)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn node-sim")
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits (off the async workers) for a line equal to `expected`.
    async fn wait_line(self, expected: String) -> Self {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) if line == expected => return self,
                    Ok(_) => {}
                    Err(error) => panic!("node-sim never printed `{expected}`: {error}"),
                }
            }
        })
        .await
        .unwrap()
    }

    /// Waits (off the async workers) for the next `count` lines.
    async fn next_lines(self, count: usize) -> (Self, Vec<String>) {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + WAIT;
            let mut lines = Vec::new();
            while lines.len() < count {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => lines.push(line),
                    Err(error) => panic!("node-sim printed only {lines:?}: {error}"),
                }
            }
            (self, lines)
        })
        .await
        .unwrap()
    }

    /// The lines printed and not taken yet, without waiting.
    fn printed(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for NodeSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A change of the gateway's PTY pair, acknowledged by the relay task.
enum Plug {
    Out(oneshot::Sender<()>),
    In(SerialStream, oneshot::Sender<()>),
}

/// Two PTY pairs joined by a relay task that copies between their controlling ends. The
/// terminal ends stay open in the test so the controlling ends never see a hang-up (EIO)
/// while the gateway or node-sim has not opened theirs.
struct Relay {
    /// What the gateway opens: the terminal end of its pair, or a symlink to it.
    gateway_path: String,
    /// What node-sim opens.
    node_path: String,
    /// Bytes written into the gateway's stream.
    noise: tokio::sync::mpsc::Sender<Vec<u8>>,
    plugs: tokio::sync::mpsc::Sender<Plug>,
    /// The symlink `gateway_path` is (in its own directory), when the pair can be replaced.
    link: Option<(tempfile::TempDir, PathBuf)>,
    gateway_tty: Option<SerialStream>,
    _node_tty: SerialStream,
}

impl Relay {
    /// The gateway opens its pair's terminal end directly.
    fn start() -> Self {
        let (gateway_master, gateway_tty) = SerialStream::pair().expect("PTY pair");
        let gateway_path = gateway_tty.name().expect("PTY name");
        Self::with(gateway_path, Some(gateway_master), Some(gateway_tty), None)
    }

    /// Nothing plugged in for the gateway yet: it opens a symlink that [`Relay::plug`] points
    /// at the terminal end of a new pair (and [`Relay::unplug`] removes).
    fn unplugged() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("ttyNODES");
        let gateway_path = link.to_str().expect("UTF-8 path").to_owned();
        Self::with(gateway_path, None, None, Some((dir, link)))
    }

    fn with(
        gateway_path: String,
        gateway_master: Option<SerialStream>,
        gateway_tty: Option<SerialStream>,
        link: Option<(tempfile::TempDir, PathBuf)>,
    ) -> Self {
        let (node_master, node_tty) = SerialStream::pair().expect("PTY pair");
        let (noise, noise_rx) = tokio::sync::mpsc::channel(4);
        let (plugs, plugs_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(relay(node_master, gateway_master, noise_rx, plugs_rx));
        Self {
            gateway_path,
            node_path: node_tty.name().expect("PTY name"),
            noise,
            plugs,
            link,
            gateway_tty,
            _node_tty: node_tty,
        }
    }

    /// Closes both ends of the gateway's pair (the gateway's reads fail) and removes the
    /// symlink (reopening fails). node-sim's bytes are lost meanwhile.
    async fn unplug(&mut self) {
        let (done, unplugged) = oneshot::channel();
        self.plugs.send(Plug::Out(done)).await.expect("relay");
        unplugged.await.expect("relay");
        self.gateway_tty = None;
        let (_, link) = self.link.as_ref().expect("a replugable relay");
        std::fs::remove_file(link).expect("remove the symlink");
    }

    /// A new pair for the gateway, under the same symlink.
    async fn plug(&mut self) {
        let (master, tty) = SerialStream::pair().expect("PTY pair");
        let (done, plugged) = oneshot::channel();
        self.plugs
            .send(Plug::In(master, done))
            .await
            .expect("relay");
        plugged.await.expect("relay");
        let (_, link) = self.link.as_ref().expect("a replugable relay");
        std::os::unix::fs::symlink(tty.name().expect("PTY name"), link).expect("symlink");
        self.gateway_tty = Some(tty);
    }
}

/// Copies between the controlling ends of node-sim's pair and the gateway's (while one is
/// plugged in), and noise into the gateway's.
async fn relay(
    mut node: SerialStream,
    mut gateway: Option<SerialStream>,
    mut noise: tokio::sync::mpsc::Receiver<Vec<u8>>,
    mut plugs: tokio::sync::mpsc::Receiver<Plug>,
) {
    async fn read(port: Option<&mut SerialStream>, buffer: &mut [u8]) -> std::io::Result<usize> {
        match port {
            Some(port) => port.read(buffer).await,
            None => std::future::pending().await,
        }
    }
    let mut from_node = [0u8; 1024];
    let mut from_gateway = [0u8; 1024];
    loop {
        tokio::select! {
            read = node.read(&mut from_node) => match read {
                Ok(n) if n > 0 => {
                    // Unplugged, the bytes are lost (as on a pulled cable).
                    if let Some(gateway) = gateway.as_mut() {
                        let _ = gateway.write_all(&from_node[..n]).await;
                    }
                }
                // EIO until node-sim opened its end: try again shortly.
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            read = read(gateway.as_mut(), &mut from_gateway) => match read {
                Ok(n) if n > 0 => {
                    if node.write_all(&from_gateway[..n]).await.is_err() {
                        return;
                    }
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(bytes) = noise.recv() => {
                if let Some(gateway) = gateway.as_mut() {
                    let _ = gateway.write_all(&bytes).await;
                }
            }
            plug = plugs.recv() => match plug {
                Some(Plug::Out(done)) => {
                    gateway = None;
                    let _ = done.send(());
                }
                Some(Plug::In(port, done)) => {
                    gateway = Some(port);
                    let _ = done.send(());
                }
                None => return,
            },
        }
    }
}

fn client(gw: &Gateway, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", gw.port());
    options.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(options, 100)
}

async fn next_publish(events: &mut EventLoop) -> rumqttc::Publish {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("connection") {
                return p;
            }
        }
    })
    .await
    .expect("a PUBLISH within the wait")
}

/// What the broker sends an MQTT client, its event loop driven in a task: the PUBLISHes (with
/// when they came) and how many of the client's own QoS 1 and 2 publishes were acknowledged.
struct Incoming {
    packets: tokio::sync::mpsc::UnboundedReceiver<(Instant, Packet)>,
    publishes: VecDeque<(Instant, rumqttc::Publish)>,
    acked: usize,
}

impl Incoming {
    fn start(mut events: EventLoop) -> Self {
        let (tx, packets) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // A connection error ends the channel: the test's next wait fails.
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(packet) = event
                    && tx.send((Instant::now(), packet)).is_err()
                {
                    return;
                }
            }
        });
        Self {
            packets,
            publishes: VecDeque::new(),
            acked: 0,
        }
    }

    fn take(&mut self, at: Instant, packet: Packet) {
        match packet {
            Packet::Publish(p) => self.publishes.push_back((at, p)),
            Packet::PubAck(_) | Packet::PubComp(_) => self.acked += 1,
            _ => {}
        }
    }

    async fn recv(&mut self) {
        let (at, packet) = tokio::time::timeout(WAIT, self.packets.recv())
            .await
            .expect("a packet from the broker within the wait")
            .expect("the MQTT connection");
        self.take(at, packet);
    }

    /// Takes what has come so far, without waiting.
    fn poll(&mut self) {
        while let Ok((at, packet)) = self.packets.try_recv() {
            self.take(at, packet);
        }
    }

    async fn next_publish(&mut self) -> (Instant, rumqttc::Publish) {
        loop {
            if let Some(next) = self.publishes.pop_front() {
                return next;
            }
            self.recv().await;
        }
    }

    /// Waits until `count` of the client's publishes were acknowledged in all.
    async fn wait_acked(&mut self, count: usize) {
        while self.acked < count {
            self.recv().await;
        }
    }
}

/// Which of node-sim's readings `payload` is, modulo 50: its n-th reading (from 0) is
/// `{"temp": T}` with T = 20.0 + ((7 n) mod 50) / 10, and 43 · 7 ≡ 1 (mod 50).
fn reading_index(payload: &[u8]) -> u32 {
    let json: serde_json::Value = serde_json::from_slice(payload).expect("JSON reading");
    let temp = json["temp"].as_f64().expect("a temp");
    let tenths = (temp * 10.0).round() as u32;
    assert!((200..250).contains(&tenths), "reading {temp}");
    (tenths - 200) * 43 % 50
}

fn start_gateway(port: &str) -> Gateway {
    spawning(|| {
        Gateway::start_with(
            &format!(
                "nodes:\n  serial:\n    - {{ port: \"{port}\", baud: 115200 }}\n  predefined_topics: {{ 1: \"sensors/{{node}}/temp\" }}\n"
            ),
            "",
        )
    })
}

/// Readings from node-sim arrive on `sensors/NAME/temp`; a control message published by an
/// MQTT client is printed by node-sim.
async fn readings_and_control(noise: bool) {
    let relay = Relay::start();
    let gw = start_gateway(&relay.gateway_path);
    let (subscriber, mut events) = client(&gw, "watcher");
    subscriber
        .subscribe("sensors/+/temp", QoS::AtMostOnce)
        .await
        .unwrap();
    let sim = NodeSim::start(&relay.node_path, "kitchen");

    let reading = next_publish(&mut events).await;
    assert_eq!(reading.topic, "sensors/kitchen/temp");
    let json: serde_json::Value = serde_json::from_slice(&reading.payload).expect("JSON reading");
    assert!(json["temp"].as_f64().is_some(), "{json}");

    if noise {
        relay
            .noise
            .send(b"\x42garbage\xff\x00\x11\x22\x33\x00".to_vec())
            .await
            .unwrap();
        // Readings keep arriving after the noise.
        for _ in 0..3 {
            assert_eq!(
                next_publish(&mut events).await.topic,
                "sensors/kitchen/temp"
            );
        }
        assert!(gw.metric("edgegw_nodes_frame_errors_total{kind=\"cobs\"}") >= 1.0);
    }

    // The node subscribes right after it registers its topic: publish until it hears it.
    let printed = tokio::spawn(sim.wait_line("kitchen led on".into()));
    let publisher = subscriber.clone();
    let repeat = tokio::spawn(async move {
        loop {
            publisher
                .publish("control/kitchen/led", QoS::AtLeastOnce, false, "on")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let drive = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let _sim = tokio::time::timeout(WAIT, printed)
        .await
        .expect("node-sim prints the control message")
        .unwrap();
    repeat.abort();
    drive.abort();

    // The node's own series: its messages and frames to it counted, last seen just now.
    let received = gw.metric("edgegw_nodes_node_frames_received_total{node=\"kitchen\"}");
    assert!(
        received >= 4.0,
        "CONNECT, REGISTER, SUBSCRIBE, a reading: {received}"
    );
    let sent = gw.metric("edgegw_nodes_node_frames_sent_total{node=\"kitchen\"}");
    assert!(
        sent >= 4.0,
        "CONNACK, REGACK, SUBACK, the control message: {sent}"
    );
    let last_seen = gw.metric("edgegw_nodes_node_last_seen_timestamp_seconds{node=\"kitchen\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 30.0..=now + 1.0).contains(&last_seen),
        "last seen {last_seen}, now {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sim_readings_arrive_and_control_messages_reach_it() {
    readings_and_control(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_serial_line_does_not_break_the_link() {
    readings_and_control(true).await;
}

/// node-sim with `--qos QOS`: its readings reach a QoS 2 subscriber at that QoS, in order and
/// none lost (and at QoS 2 none twice); control messages published at QoS 2 and at QoS 1 are
/// each printed once, in order, those at QoS 2 delivered to the node at QoS 2 when it
/// subscribed at QoS 2 (`--qos 2`), else at QoS 1. More than the gateway's window of 8
/// unacknowledged deliveries per node: they flow only as the node completes each handshake.
async fn qos_both_ways(qos: u8) {
    let expected = match qos {
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let relay = Relay::start();
    let gw = start_gateway(&relay.gateway_path);
    let (watcher, events) = client(&gw, "watcher");
    watcher
        .subscribe("sensors/garden/temp", QoS::ExactlyOnce)
        .await
        .unwrap();
    let mut incoming = Incoming::start(events);
    let sim = NodeSim::start_with(&relay.node_path, "garden", &["--qos", &qos.to_string()]);

    let mut readings = Vec::new();
    for _ in 0..8 {
        let (_, p) = incoming.next_publish().await;
        assert_eq!(p.topic, "sensors/garden/temp");
        assert_eq!(p.qos, expected, "delivered at the node's QoS");
        readings.push(reading_index(&p.payload));
    }
    for pair in readings.windows(2) {
        let next = (pair[0] + 1) % 50;
        // At QoS 1 a reading whose PUBACK was late may come twice, one after the other.
        let again = expected == QoS::AtLeastOnce && pair[1] == pair[0];
        assert!(
            pair[1] == next || again,
            "readings in order, none lost, at QoS 2 none twice: {readings:?}"
        );
    }

    // The broker counts deliveries by QoS, to the node's session too. The readings go out at
    // `expected`; the other of QoS 1 and 2 counts control messages only.
    let other = if expected == QoS::ExactlyOnce { 1 } else { 2 };
    let sent_at_other = || {
        gw.metric(&format!(
            "edgegw_broker_messages_sent_total{{qos=\"{other}\"}}"
        ))
    };
    let before = sent_at_other();
    // The node is subscribed (it reads only once it is).
    let mut sim = sim;
    let (mut published, mut at_other) = (0, 0);
    for qos in [QoS::ExactlyOnce, QoS::AtLeastOnce] {
        let payloads: Vec<String> = (1..=10).map(|i| format!("{qos:?}-{i}")).collect();
        for payload in &payloads {
            watcher
                .publish("control/garden/led", qos, false, payload.clone())
                .await
                .unwrap();
        }
        let (next, lines) = sim.next_lines(payloads.len()).await;
        sim = next;
        let expected_lines: Vec<String> =
            payloads.iter().map(|p| format!("garden led {p}")).collect();
        assert_eq!(lines, expected_lines, "each at {qos:?} once, in order");
        published += payloads.len();
        incoming.wait_acked(published).await;
        // QoS 2 through node-sim's QoS 2 subscription (`--qos 2`), else QoS 1.
        let delivered_at = match (qos, expected) {
            (QoS::ExactlyOnce, QoS::ExactlyOnce) => 2,
            _ => 1,
        };
        if delivered_at == other {
            at_other += payloads.len();
        }
        assert_eq!(
            sent_at_other() - before,
            at_other as f64,
            "control messages published at {qos:?} delivered to the node at QoS {delivered_at}"
        );
    }
    // A few readings later, nothing was printed twice.
    for _ in 0..3 {
        incoming.next_publish().await;
    }
    assert_eq!(sim.printed(), Vec::<String>::new(), "printed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_both_ways() {
    qos_both_ways(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_1_both_ways() {
    qos_both_ways(1).await;
}

fn asleep(line: &serde_json::Value, client_id: &str) -> bool {
    edgegw_tests::message(line) == Some("Node asleep.")
        && line["fields"]["client_id"].as_str() == Some(client_id)
}

/// node-sim with `--sleep 2s`: control messages published while it sleeps wait at the
/// gateway and are printed, in order and once each, when it wakes; it reads once per
/// wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_node_gets_what_was_published_while_it_slept() {
    const SLEEP: Duration = Duration::from_secs(2);
    let relay = Relay::start();
    let gw = start_gateway(&relay.gateway_path);
    let (watcher, events) = client(&gw, "watcher");
    watcher
        .subscribe("sensors/dozy/temp", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut incoming = Incoming::start(events);
    let sim = NodeSim::start_with(&relay.node_path, "dozy", &["--qos", "1", "--sleep", "2s"]);

    // Its first reading, then it goes to sleep.
    let (first_at, first) = incoming.next_publish().await;
    assert_eq!(first.topic, "sensors/dozy/temp");
    assert!(
        tokio::task::block_in_place(|| gw.wait_log(WAIT, |l| asleep(l, "dozy"))),
        "the node went to sleep"
    );
    let payloads = ["1", "2", "3", "4", "5"];
    for payload in payloads {
        watcher
            .publish("control/dozy/led", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    incoming.wait_acked(payloads.len()).await;
    let mut lines = sim.printed();
    // It fell asleep after `first_at`: it cannot have woken yet.
    if first_at.elapsed() < SLEEP {
        assert_eq!(
            lines,
            Vec::<String>::new(),
            "nothing reaches a sleeping node"
        );
    }

    // Awake: all of them, in order.
    let (sim, rest) = sim.next_lines(payloads.len() - lines.len()).await;
    lines.extend(rest);
    let expected: Vec<String> = payloads.iter().map(|p| format!("dozy led {p}")).collect();
    assert_eq!(lines, expected);

    // One reading per wake-up, a sleep apart, none lost.
    let (mut last_at, mut last) = (first_at, reading_index(&first.payload));
    let mut wake_ups = 0;
    while wake_ups < 2 {
        let (at, p) = incoming.next_publish().await;
        assert_eq!(p.topic, "sensors/dozy/temp");
        let index = reading_index(&p.payload);
        if index == last {
            // QoS 1: sent again as its PUBACK was late.
            continue;
        }
        assert_eq!(index, (last + 1) % 50, "the next reading");
        assert!(
            // (less a margin for the two readings' different ways to the watcher)
            at - last_at >= SLEEP * 3 / 4,
            "readings a sleep apart: {:?}",
            at - last_at
        );
        (last_at, last) = (at, index);
        wake_ups += 1;
    }
    incoming.poll();
    assert!(incoming.publishes.is_empty());
    let asleep_count = gw.logs().iter().filter(|l| asleep(l, "dozy")).count();
    assert!(asleep_count >= 2, "asleep {asleep_count} times");
    assert_eq!(sim.printed(), Vec::<String>::new(), "printed twice");
}

/// The gateway's serial port (a symlink, as `/dev/serial/by-id/...`) disappears and comes
/// back with a new PTY behind it: the gateway opens it again and node-sim, untouched, starts
/// over and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The guard keeps the other tests from spawning processes, which block on it in their own
// threads: nothing in this test's runtime waits for it.
#[allow(clippy::await_holding_lock)]
async fn a_replugged_port_is_opened_again_and_the_node_resumes() {
    let mut relay = Relay::unplugged();
    // The gateway tries to open the port until it is plugged in.
    let gw = start_gateway(&relay.gateway_path);
    let (watcher, events) = client(&gw, "watcher");
    watcher
        .subscribe("sensors/shed/temp", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut incoming = Incoming::start(events);
    let sim = NodeSim::start_with(&relay.node_path, "shed", &["--qos", "1"]);

    // No process may start while the first pair exists, or unplugging it would not close it.
    let exclusive = SPAWNS.write().unwrap_or_else(PoisonError::into_inner);
    relay.plug().await;
    let (_, reading) = incoming.next_publish().await;
    assert_eq!(reading.topic, "sensors/shed/temp");
    // Subscribed, as it reads.
    watcher
        .publish("control/shed/led", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    let sim = sim.wait_line("shed led before".into()).await;
    assert_eq!(gw.metric("edgegw_nodes_links_up"), 1.0);

    relay.unplug().await;
    let up =
        tokio::task::block_in_place(|| gw.wait_metric("edgegw_nodes_links_up", WAIT, |v| v == 0.0));
    assert_eq!(up, 0.0, "the gateway noticed that the port is gone");
    drop(exclusive);
    // What was on its way has come; nothing more while unplugged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    incoming.poll();
    incoming.publishes.clear();
    tokio::time::sleep(Duration::from_millis(700)).await;
    incoming.poll();
    assert!(incoming.publishes.is_empty(), "readings while unplugged");

    relay.plug().await;
    let reconnects = tokio::task::block_in_place(|| {
        gw.wait_metric("edgegw_nodes_link_reconnects_total", WAIT, |v| v >= 1.0)
    });
    assert_eq!(reconnects, 1.0, "opened again");
    assert_eq!(gw.metric("edgegw_nodes_links_up"), 1.0);
    // node-sim is told to start over (DISCONNECT) and goes on.
    for _ in 0..3 {
        let (_, reading) = incoming.next_publish().await;
        assert_eq!(reading.topic, "sensors/shed/temp");
    }
    watcher
        .publish("control/shed/led", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    let _sim = sim.wait_line("shed led after".into()).await;
}
