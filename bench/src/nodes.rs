//! The node link suite: MQTT-SN frames per second through the gateway's serial link code
//! (`edgegw_nodes::run_link`, the code every serial port runs) over a real pseudo-terminal,
//! both ways, with the in-process broker router on the other side.
//!
//! A PTY has no baud rate, so the figures are what the gateway's CPU sustains: how many
//! serial links one gateway can serve. For scale, a 115200-baud UART carries about 100 of
//! these frames per second.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use edgegw_broker::{Message as BrokerMessage, QoS as BrokerQoS, Router, RouterLimits, SubOptions};
use edgegw_nodes::{NodeMetrics, gateway::Context};
use edgegw_protocol::{
    Connect, FrameDecoder, Message, Publish, QoS, ReturnCode, Subscribe, Topic, TopicId,
    encode_frame_to_vec, encode_to_vec,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 100;
/// Predefined topic id of the uplink scenarios (no REGISTER needed).
const UP_TOPIC_ID: u16 = 1;
/// Deliveries to the node in flight at most in the QoS 0 downlink scenario: below the
/// session's queue bound, so none is dropped for being published too fast.
const DOWN_WINDOW: u64 = 500;
const WAIT: Duration = Duration::from_secs(60);

pub struct Sizes {
    pub messages: u64,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        Self {
            messages: if quick { 20_000 } else { 100_000 },
        }
    }
}

struct Row {
    scenario: &'static str,
    messages: u64,
    seconds: f64,
    lost: u64,
}

/// The gateway's link code on one end of a fresh PTY pair; returns the other end (the
/// node's) and what stops the link.
fn gateway_on_pty(
    router: &Router,
) -> Result<(SerialStream, CancellationToken, tokio::task::JoinHandle<()>)> {
    let (node_end, gateway_end) = SerialStream::pair().context("cannot open a PTY pair")?;
    let context = Context {
        router: router.clone(),
        predefined_topics: Arc::new([(UP_TOPIC_ID, "bench/{node}/up".to_owned())].into()),
        metrics: NodeMetrics::new(),
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            match edgegw_nodes::run_link(gateway_end, "bench-pty", &context, &cancel).await {
                // The bench closed its end: the scenario is over.
                Ok(()) | Err(edgegw_nodes::LinkError::Closed) => {}
                Err(error) => eprintln!("node link failed: {error}"),
            }
        }
    });
    Ok((node_end, cancel, task))
}

fn frame(message: &Message<'_>) -> Vec<u8> {
    encode_frame_to_vec(&encode_to_vec(message).expect("bench messages encode"))
}

/// Reads frames from the gateway until `done` says enough, handing each decoded message to
/// `on_message`, which may queue answers in the given buffer.
async fn read_frames(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut on_message: impl FnMut(Message<'_>, &mut Vec<u8>) -> bool,
) -> Result<()> {
    let mut decoder = Box::new(FrameDecoder::<2048>::new());
    let mut chunk = vec![0u8; 16 * 1024];
    let mut answers = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, reader.read(&mut chunk))
            .await
            .context("the gateway went silent")??;
        if n == 0 {
            bail!("the PTY closed");
        }
        let mut done = false;
        let mut frames = decoder.feed(&chunk[..n]);
        while let Some(frame) = frames.next_frame() {
            let Ok(bytes) = frame else { continue };
            if let Ok(message) = edgegw_protocol::decode_exact(bytes) {
                done |= on_message(message, &mut answers);
            }
        }
        if !answers.is_empty() {
            writer.write_all(&answers).await?;
            answers.clear();
        }
        if done {
            return Ok(());
        }
    }
}

/// CONNECT `client_id` and wait for CONNACK.
async fn connect(port: &mut SerialStream, client_id: &str) -> Result<()> {
    let mut bytes = vec![edgegw_protocol::DELIMITER];
    bytes.extend(frame(&Message::Connect(Connect {
        will: false,
        clean_session: true,
        duration: 300,
        client_id,
    })));
    port.write_all(&bytes).await?;
    let (mut reader, mut writer) = tokio::io::split(port);
    let mut accepted = false;
    read_frames(&mut reader, &mut writer, |message, _| {
        if let Message::ConnAck { return_code } = message {
            accepted = return_code == ReturnCode::Accepted;
            return true;
        }
        false
    })
    .await?;
    if !accepted {
        bail!("the gateway refused the bench node");
    }
    Ok(())
}

/// Node → broker: `count` PUBLISHes of 100 bytes written as fast as the PTY takes them; a
/// broker subscriber counts what arrives. QoS 1: the node also counts the PUBACKs.
async fn uplink(router: &Router, qos: QoS, count: u64) -> Result<Row> {
    let (mut port, cancel, task) = gateway_on_pty(router)?;
    let client_id = format!("up{}", qos.level());
    connect(&mut port, &client_id).await?;
    let subscriber = router.local_client("bench-subscriber");
    subscriber
        .subscribe("bench/+/up", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .context("subscribe")?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = tokio::spawn({
        let received = received.clone();
        async move {
            while received.load(Ordering::Relaxed) < count {
                match tokio::time::timeout(WAIT, subscriber.recv()).await {
                    Ok(Some(_)) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        }
    });
    let payload = vec![b'x'; PAYLOAD];
    let (mut reader, mut writer) = tokio::io::split(port);
    let acks = tokio::spawn(async move {
        let mut acked = 0u64;
        if qos == QoS::One {
            let mut sink = tokio::io::sink();
            let _ = read_frames(&mut reader, &mut sink, |message, _| {
                if matches!(message, Message::PubAck { .. }) {
                    acked += 1;
                }
                acked >= count
            })
            .await;
        }
        acked
    });
    let start = Instant::now();
    let mut batch = Vec::with_capacity(64 * 1024);
    for i in 0..count {
        batch.extend(frame(&Message::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: TopicId::Predefined(UP_TOPIC_ID),
            message_id: if qos == QoS::Zero {
                0
            } else {
                (i % 65_535 + 1) as u16
            },
            data: &payload,
        })));
        if batch.len() >= 60 * 1024 {
            writer.write_all(&batch).await?;
            batch.clear();
        }
    }
    writer.write_all(&batch).await?;
    let _ = tokio::time::timeout(WAIT, counter).await;
    let seconds = start.elapsed().as_secs_f64();
    let delivered = received.load(Ordering::Relaxed);
    if qos == QoS::One {
        let acked = tokio::time::timeout(WAIT, acks)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if acked < count {
            eprintln!("note: {acked} of {count} PUBACKs came back");
        }
    }
    cancel.cancel();
    let _ = task.await;
    Ok(Row {
        scenario: if qos == QoS::Zero {
            "node → broker, QoS 0 PUBLISH (frames/s)"
        } else {
            "node → broker, QoS 1 PUBLISH + PUBACK (frames/s each way)"
        },
        messages: count,
        seconds,
        lost: count.saturating_sub(delivered),
    })
}

/// Broker → node: `count` messages of 100 bytes published to the node's subscription; the
/// node counts the PUBLISH frames (QoS 1: and acknowledges each, as the gateway waits for
/// acknowledgements with 8 in flight).
async fn downlink(router: &Router, qos: QoS, count: u64) -> Result<Row> {
    let (mut port, cancel, task) = gateway_on_pty(router)?;
    let client_id = format!("down{}", qos.level());
    connect(&mut port, &client_id).await?;
    let topic = format!("bench/{client_id}/down");
    port.write_all(&frame(&Message::Subscribe(Subscribe {
        dup: false,
        qos,
        message_id: 1,
        topic: Topic::Name(&topic),
    })))
    .await?;
    let (mut reader, mut writer) = tokio::io::split(port);
    read_frames(&mut reader, &mut writer, |message, _| {
        matches!(message, Message::SubAck { .. })
    })
    .await?;
    let received = Arc::new(AtomicU64::new(0));
    let node = tokio::spawn({
        let received = received.clone();
        async move {
            let mut seen = 0u64;
            let result = read_frames(&mut reader, &mut writer, |message, answers| {
                if let Message::Publish(publish) = message {
                    seen += 1;
                    received.store(seen, Ordering::Relaxed);
                    if publish.qos == QoS::One {
                        answers.extend(frame(&Message::PubAck {
                            topic_id: u16::from_be_bytes(publish.topic.to_bytes()),
                            message_id: publish.message_id,
                            return_code: ReturnCode::Accepted,
                        }));
                    }
                }
                seen >= count
            })
            .await;
            if let Err(error) = result {
                eprintln!("bench node: {error}");
            }
        }
    });
    let publisher = router.local_client("bench-publisher");
    let broker_qos = if qos == QoS::Zero {
        BrokerQoS::AtMostOnce
    } else {
        BrokerQoS::AtLeastOnce
    };
    let payload = bytes_of(PAYLOAD);
    let start = Instant::now();
    let deadline = start + WAIT;
    for sent in 0..count {
        // Stay within the window so the session queue never overflows.
        while sent >= received.load(Ordering::Relaxed) + DOWN_WINDOW {
            if Instant::now() > deadline {
                bail!(
                    "the node stopped receiving at {}",
                    received.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publisher.publish(BrokerMessage::new(
            topic.clone(),
            payload.clone(),
            broker_qos,
        ));
    }
    let _ = tokio::time::timeout(WAIT, node).await;
    let seconds = start.elapsed().as_secs_f64();
    let delivered = received.load(Ordering::Relaxed);
    cancel.cancel();
    let _ = task.await;
    Ok(Row {
        scenario: if qos == QoS::Zero {
            "broker → node, QoS 0 PUBLISH (frames/s)"
        } else {
            "broker → node, QoS 1 PUBLISH + PUBACK (frames/s each way)"
        },
        messages: count,
        seconds,
        lost: count.saturating_sub(delivered),
    })
}

fn bytes_of(len: usize) -> Vec<u8> {
    vec![b'x'; len]
}

/// Runs the suite and returns its Markdown table (also printed).
pub fn run(sizes: &Sizes) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Queues long enough that the in-process subscriber never drops: the link is measured.
    let router = Router::new(RouterLimits {
        max_queued: 1_000_000,
        ..RouterLimits::default()
    });
    let count = sizes.messages;
    eprintln!("Node link over a PTY: {count} messages of {PAYLOAD} bytes per scenario");
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        for qos in [QoS::Zero, QoS::One] {
            rows.push(uplink(&router, qos, count).await?);
        }
        for qos in [QoS::Zero, QoS::One] {
            rows.push(downlink(&router, qos, count).await?);
        }
        anyhow::Ok(rows)
    })?;
    let mut table = String::from(
        "| Scenario (100-byte payloads, one node, PTY) | frames/s | messages | lost |\n|---|---:|---:|---:|\n",
    );
    for row in &rows {
        let line = format!(
            "| {} | {:.0} | {} | {} |\n",
            row.scenario,
            row.messages as f64 / row.seconds,
            row.messages,
            row.lost
        );
        eprint!("{line}");
        table.push_str(&line);
    }
    Ok(table)
}
