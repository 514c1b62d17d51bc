//! The node link end to end: `node-sim` ↔ PTY ↔ the real gateway ↔ an MQTT client.
//!
//! Two PTY pairs and a relay in the test: the gateway opens one pair's terminal, node-sim
//! the other's, and the test copies bytes between the two controlling ends, so it can also
//! inject noise into the gateway's stream. No socat, no hardware.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::Duration,
};

use edgegw_tests::Gateway;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort as _, SerialStream};

const WAIT: Duration = Duration::from_secs(20);

fn node_sim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("edgegw-node-sim")
            .bin("node-sim")
            .manifest_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .run()
            .expect("building node-sim")
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
        let mut child = Command::new(node_sim_binary())
            .args(["--port", port, "--id", id, "--interval", "200ms"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn node-sim");
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
}

impl Drop for NodeSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two PTY pairs joined by a relay; returns (gateway's path, node's path, noise sender).
/// The terminal ends stay open in the test so the controlling ends never see a hang-up.
fn relay() -> (
    String,
    String,
    tokio::sync::mpsc::Sender<Vec<u8>>,
    Vec<SerialStream>,
) {
    let (gateway_master, gateway_tty) = SerialStream::pair().expect("PTY pair");
    let (node_master, node_tty) = SerialStream::pair().expect("PTY pair");
    let gateway_path = gateway_tty.name().expect("PTY name");
    let node_path = node_tty.name().expect("PTY name");
    let (noise, mut noise_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let (mut gateway_read, mut gateway_write) = tokio::io::split(gateway_master);
    let (mut node_read, mut node_write) = tokio::io::split(node_master);
    tokio::spawn(async move {
        let mut buffer = [0u8; 1024];
        loop {
            tokio::select! {
                read = node_read.read(&mut buffer) => match read {
                    Ok(n) if n > 0 => {
                        if gateway_write.write_all(&buffer[..n]).await.is_err() { return; }
                    }
                    // EIO until node-sim opened its end: try again shortly.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Some(bytes) = noise_rx.recv() => {
                    if gateway_write.write_all(&bytes).await.is_err() { return; }
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut buffer = [0u8; 1024];
        loop {
            match gateway_read.read(&mut buffer).await {
                Ok(n) if n > 0 => {
                    if node_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (gateway_path, node_path, noise, vec![gateway_tty, node_tty])
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

fn start_gateway(port: &str) -> Gateway {
    Gateway::start_with(
        &format!(
            "nodes:\n  serial:\n    - {{ port: \"{port}\", baud: 115200 }}\n  predefined_topics: {{ 1: \"sensors/{{node}}/temp\" }}\n"
        ),
        "",
    )
}

/// Readings from node-sim arrive on `sensors/NAME/temp`; a control message published by an
/// MQTT client is printed by node-sim.
async fn readings_and_control(noise: bool) {
    let (gateway_port, node_port, noise_tx, _ttys) = relay();
    let gw = start_gateway(&gateway_port);
    let (subscriber, mut events) = client(&gw, "watcher");
    subscriber
        .subscribe("sensors/+/temp", QoS::AtMostOnce)
        .await
        .unwrap();
    let sim = NodeSim::start(&node_port, "kitchen");

    let reading = next_publish(&mut events).await;
    assert_eq!(reading.topic, "sensors/kitchen/temp");
    let json: serde_json::Value = serde_json::from_slice(&reading.payload).expect("JSON reading");
    assert!(json["temp"].as_f64().is_some(), "{json}");

    if noise {
        noise_tx
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sim_readings_arrive_and_control_messages_reach_it() {
    readings_and_control(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_serial_line_does_not_break_the_link() {
    readings_and_control(true).await;
}
