//! Node link: ESP32 (or simulated) sensor nodes on serial ports become broker clients.
//!
//! One task per configured serial port opens it (`tokio-serial`), runs an MQTT-SN 1.2
//! gateway over its COBS + CRC frames ([`gateway`]), and when the port fails, disappears
//! (USB unplugged) or cannot be opened, tries again after a jittered exponential backoff
//! until the link is stopped. BLE nodes ([`ble`]) carry the same frames over a GATT UART
//! service, cut to the connection's MTU; the BlueZ binding is behind the `ble` cargo feature
//! and reconnects with the same backoff. Each node that connects is an in-process broker client
//! (`Router::local_client`) named by its MQTT-SN client id.
//!
//! Supported: CONNECT, REGISTER/REGACK both ways, predefined (`{node}` substituted) and short
//! topic ids, PUBLISH QoS −1/0/1/2 from nodes, deliveries to nodes at QoS 0/1/2 (REGISTER first
//! for new topic names), SUBSCRIBE/UNSUBSCRIBE, PINGREQ/PINGRESP, DISCONNECT, keepalive,
//! SEARCHGW, the forwarder encapsulation, wills (WILLTOPICREQ/WILLMSGREQ at CONNECT,
//! WILLTOPICUPD/WILLMSGUPD), sleeping clients (DISCONNECT with a duration, wake-up PINGREQ,
//! CONNECT resuming the session), QoS 1/2 deliveries to nodes kept in flight (8 per node)
//! until acknowledged and sent again with DUP every 10 s, a node that answers none of 3
//! re-sends being lost.

pub mod ble;
pub mod gateway;
pub mod metrics;
mod serial;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use edgegw_broker::Router;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::ble::BleSettings;
use crate::gateway::Context;
pub use crate::gateway::run_link;
pub use crate::metrics::NodeMetrics;

/// Why a link stopped working (it is reopened after a backoff).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open serial port {port} at {baud} baud: {source}")]
    Open {
        port: String,
        baud: u32,
        source: tokio_serial::Error,
    },
    #[error("reading from the link failed: {source}")]
    Read { source: std::io::Error },
    #[error("writing to the link failed: {source}")]
    Write { source: std::io::Error },
    #[error("the link was closed (end of stream)")]
    Closed,
    #[error("cannot connect to BLE node {address}: {reason}")]
    Ble { address: String, reason: String },
    #[error("no connection within {after:?}")]
    ConnectTimeout { after: std::time::Duration },
}

/// One serial port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialSettings {
    pub port: String,
    pub baud: u32,
}

#[derive(Clone, Debug)]
pub struct NodesSettings {
    pub serial: Vec<SerialSettings>,
    /// BLE nodes; connected only when built with the `ble` feature (see [`BLE_SUPPORTED`]).
    pub ble: Vec<BleSettings>,
    /// Predefined topic ids; `{node}` in a name is the node's client id.
    pub predefined_topics: BTreeMap<u16, String>,
    /// First reopen delay after a link failure; doubles per failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for NodesSettings {
    fn default() -> Self {
        Self {
            serial: Vec::new(),
            ble: Vec::new(),
            predefined_topics: BTreeMap::new(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// Whether this build can connect BLE nodes (the `ble` cargo feature).
pub const BLE_SUPPORTED: bool = cfg!(feature = "ble");

#[cfg(feature = "ble")]
fn start_ble(
    tracker: &TaskTracker,
    node: &BleSettings,
    settings: &NodesSettings,
    context: &Context,
    cancel: &CancellationToken,
) {
    match ble::bluez::BluezConnector::new(node.clone()) {
        Ok(connector) => {
            tracker.spawn(ble::run(
                connector,
                serial::Backoff::new(settings.reconnect_min, settings.reconnect_max),
                context.clone(),
                cancel.clone(),
            ));
        }
        Err(error) => tracing::error!(%error, "BLE node not started."),
    }
}

#[cfg(not(feature = "ble"))]
fn start_ble(
    _tracker: &TaskTracker,
    node: &BleSettings,
    _settings: &NodesSettings,
    _context: &Context,
    _cancel: &CancellationToken,
) {
    tracing::error!(
        address = %node.address,
        "BLE node not started: this gateway was built without BLE support (cargo feature `ble`)."
    );
}

/// The running node links. [`NodeLink::stop`] ends them (nodes' broker sessions end too).
pub struct NodeLink {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl NodeLink {
    /// Starts one task per serial port on the current tokio runtime.
    pub fn start(settings: NodesSettings, router: Router, cancel: CancellationToken) -> Self {
        let tracker = TaskTracker::new();
        let context = Context {
            router,
            predefined_topics: Arc::new(settings.predefined_topics.clone()),
            metrics: NodeMetrics::new(),
        };
        for port in &settings.serial {
            tracker.spawn(serial::run(
                port.clone(),
                serial::Backoff::new(settings.reconnect_min, settings.reconnect_max),
                context.clone(),
                cancel.clone(),
            ));
        }
        for node in &settings.ble {
            start_ble(&tracker, node, &settings, &context, &cancel);
        }
        tracker.close();
        Self { cancel, tracker }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}
