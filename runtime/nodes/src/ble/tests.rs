//! The BLE transport over an in-memory GATT link with the smallest MTU, the node on the other
//! end being the firmware's own protocol client (`edgegw-node`): frames cut into packets and
//! joined again, both ways, through the real gateway and broker.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use edgegw_broker::{Message as BrokerMessage, QoS as BrokerQoS, Router, RouterLimits, SubOptions};
use edgegw_node::{Led, Node, Settings};
use tokio::sync::mpsc;

use super::*;
use crate::NodeMetrics;

const TIMEOUT: Duration = Duration::from_secs(10);
/// What BlueZ lets through at the default ATT MTU (23, less its header and bluer's margin).
const MTU: usize = 18;

/// Packet counts of one in-memory link, as the test sees them.
#[derive(Default)]
struct Counts {
    to_node: AtomicUsize,
    /// Packets to the node that were cut at the MTU (a frame continued in the next one).
    full: AtomicUsize,
    oversize: AtomicUsize,
}

struct MemoryLink {
    to_node: mpsc::Sender<Vec<u8>>,
    from_node: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    counts: Arc<Counts>,
}

impl GattLink for MemoryLink {
    fn mtu(&self) -> usize {
        MTU
    }

    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.counts.to_node.fetch_add(1, Ordering::Relaxed);
        if packet.len() > MTU {
            self.counts.oversize.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other("packet longer than the MTU"));
        }
        if packet.len() == MTU {
            self.counts.full.fetch_add(1, Ordering::Relaxed);
        }
        self.to_node
            .send(packet.to_vec())
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionReset))
    }

    async fn recv(&self) -> io::Result<Vec<u8>> {
        self.from_node
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset))
    }
}

/// A node on the far end of a [`MemoryLink`]; dropping `stop` (or the link) ends it.
struct FarNode {
    leds: mpsc::UnboundedReceiver<Led>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// A link and the firmware's node client behind it, notifying in packets of at most the MTU.
fn link(client_id: &'static str, counts: Arc<Counts>) -> (MemoryLink, FarNode) {
    let (to_node, mut node_rx) = mpsc::channel::<Vec<u8>>(64);
    let (node_tx, from_node) = mpsc::channel::<Vec<u8>>(64);
    let (led_tx, leds) = mpsc::unbounded_channel();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let start = Instant::now();
        let now = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut node = Node::new(Settings {
            client_id,
            keepalive_s: 30,
            interval_ms: 100,
        })
        .unwrap();
        let mut out = Vec::new();
        loop {
            node.poll(now(), &mut || 21.5, &mut |frame| {
                out.extend_from_slice(frame)
            })
            .unwrap();
            for packet in packets(&out, MTU) {
                if node_tx.send(packet.to_vec()).await.is_err() {
                    return;
                }
            }
            out.clear();
            tokio::select! {
                _ = &mut stopped => return,
                packet = node_rx.recv() => {
                    let Some(packet) = packet else { return };
                    node.receive(
                        &packet,
                        now(),
                        &mut |frame| out.extend_from_slice(frame),
                        &mut |led| { let _ = led_tx.send(led); },
                    )
                    .unwrap();
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    let link = MemoryLink {
        to_node,
        from_node: tokio::sync::Mutex::new(from_node),
        counts,
    };
    (link, FarNode { leds, stop })
}

fn context(router: &Router) -> Context {
    Context {
        router: router.clone(),
        predefined_topics: Arc::new(Default::default()),
        metrics: NodeMetrics::new(),
    }
}

async fn reading(subscriber: &edgegw_broker::LocalClient) -> edgegw_broker::Delivery {
    tokio::time::timeout(TIMEOUT, subscriber.recv())
        .await
        .expect("a reading in time")
        .expect("session alive")
}

async fn led(node: &mut FarNode) -> Led {
    tokio::time::timeout(TIMEOUT, node.leds.recv())
        .await
        .expect("an LED command in time")
        .expect("node running")
}

#[test]
fn packets_never_exceed_the_mtu() {
    let bytes: Vec<u8> = (0..=255).collect();
    let sizes: Vec<usize> = packets(&bytes, 100).map(<[u8]>::len).collect();
    assert_eq!(sizes, [100, 100, 56]);
    assert!(packets(&bytes, 18).all(|p| p.len() <= 18));
    assert_eq!(packets(&bytes, 18).count(), 15);
    assert_eq!(
        packets(&bytes, 0).count(),
        256,
        "never an empty packet size"
    );
    assert_eq!(packets(&[], 20).count(), 0);
}

#[tokio::test]
async fn a_node_over_ble_packets_publishes_and_receives_control_messages() {
    let router = Router::new(RouterLimits::default());
    let subscriber = router.local_client("subscriber");
    subscriber
        .subscribe("sensors/#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    let counts = Arc::new(Counts::default());
    let (link, mut node) = link("ble-node", counts.clone());
    let cancel = CancellationToken::new();
    let gateway = tokio::spawn({
        let context = context(&router);
        let cancel = cancel.clone();
        async move { run_gatt_link(link, "test-ble", &context, &cancel).await }
    });

    let delivery = reading(&subscriber).await;
    assert_eq!(&*delivery.message.topic, "sensors/ble-node/temp");
    assert_eq!(&delivery.message.payload[..], b"{\"temp\": 21.5}");

    // Control messages: the node acknowledges each and switches its LED once per message.
    let control = router.local_client("app");
    // The last payload is long enough that its frame spans three packets. Twelve QoS 1
    // messages: more than the gateway keeps unacknowledged (8), so the node's PUBACKs must
    // get through for the last ones to arrive.
    let long = format!("toggle{}", " ".repeat(40));
    let mut commands = [("on", Led::On), ("off", Led::Off)].repeat(5);
    commands.extend([("on", Led::On), (long.as_str(), Led::Toggle)]);
    for (payload, expected) in commands {
        control.publish(BrokerMessage::new(
            "control/ble-node/led",
            payload.as_bytes().to_vec(),
            BrokerQoS::AtLeastOnce,
        ));
        assert_eq!(led(&mut node).await, expected);
    }
    assert_eq!(counts.oversize.load(Ordering::Relaxed), 0);
    assert!(
        counts.full.load(Ordering::Relaxed) > 0,
        "some frame spanned packets"
    );
    // Readings keep coming after the control traffic.
    let before = Instant::now();
    while Instant::now() - before < Duration::from_millis(300) {
        assert_eq!(
            &*reading(&subscriber).await.message.topic,
            "sensors/ble-node/temp"
        );
    }

    cancel.cancel();
    gateway.await.unwrap().unwrap();
    drop(node.stop);
}

/// Hands out prepared links, one per connection attempt; fails when none is left.
struct Links(Mutex<Vec<MemoryLink>>);

impl GattConnector for Links {
    type Link = MemoryLink;

    fn name(&self) -> &str {
        "AA:BB:CC:DD:EE:FF"
    }

    async fn connect(&self) -> Result<MemoryLink, LinkError> {
        self.0.lock().unwrap().pop().ok_or(LinkError::Ble {
            address: "AA:BB:CC:DD:EE:FF".into(),
            reason: "out of range".into(),
        })
    }
}

#[tokio::test]
async fn a_dropped_connection_is_made_again_and_the_node_resumes() {
    let router = Router::new(RouterLimits::default());
    let subscriber = router.local_client("subscriber");
    subscriber
        .subscribe("sensors/#", SubOptions::qos(BrokerQoS::AtLeastOnce))
        .unwrap();
    let counts = Arc::new(Counts::default());
    let (first, first_node) = link("roamer", counts.clone());
    let (second, mut second_node) = link("roamer", counts.clone());
    // Popped from the end: `first` connects first.
    let connector = Links(Mutex::new(vec![second, first]));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(
        connector,
        Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        context(&router),
        cancel.clone(),
    ));

    assert_eq!(
        &*reading(&subscriber).await.message.topic,
        "sensors/roamer/temp"
    );
    // The node goes out of range: its side of the link closes.
    drop(first_node.stop);
    // The link is made again; the node (the same id) connects and publishes again, and a
    // control message reaches it on the new connection.
    let resumed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let delivery = reading(&subscriber).await;
            let control = router.local_client("app");
            control.publish(BrokerMessage::new(
                "control/roamer/led",
                b"on".to_vec(),
                BrokerQoS::AtLeastOnce,
            ));
            if let Ok(Some(led)) =
                tokio::time::timeout(Duration::from_millis(500), second_node.leds.recv()).await
            {
                return (delivery, led);
            }
        }
    })
    .await
    .expect("the node resumed on the second connection");
    assert_eq!(resumed.1, Led::On);
    // The first node is gone: what arrives now comes over the second connection.
    while subscriber.try_recv().is_some() {}
    assert_eq!(
        &*reading(&subscriber).await.message.topic,
        "sensors/roamer/temp"
    );
    cancel.cancel();
    tokio::time::timeout(TIMEOUT, task)
        .await
        .expect("the BLE task stops on cancel")
        .unwrap();
}
