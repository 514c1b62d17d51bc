//! BLE links: the same MQTT-SN messages in the same COBS + CRC frames as on a serial port,
//! carried by a GATT "UART" service of the node (the Nordic UART Service layout): the gateway
//! writes to the node's RX characteristic and receives the node's TX characteristic's
//! notifications.
//!
//! GATT moves packets of at most the negotiated MTU, not a byte stream. Since frames are
//! delimited by 0x00 (COBS), the packet boundaries carry no meaning: outgoing bytes are cut
//! into packets of at most [`GattLink::mtu`] bytes, incoming notifications are concatenated,
//! and the frame decoder finds the frames, as it does on a serial line that delivers bytes in
//! arbitrary chunks. A frame may span packets; a lost packet costs the frames it touched (the
//! CRC catches it) and the decoder resynchronises at the next delimiter.
//!
//! Everything here but the radio is transport-independent and tested with an in-memory link;
//! the BlueZ binding (`bluez`, cargo feature `ble`) only finds the node, connects, and opens
//! the two characteristics.

use std::{future::Future, io, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::{LinkError, gateway::Context, serial::Backoff};

#[cfg(feature = "ble")]
pub mod bluez;

/// The GATT service of a node's BLE UART (Nordic UART Service).
pub const SERVICE_UUID: &str = "6e400001-b5a3-f393-e0a9-e50e24dcca9e";
/// Written by the gateway: bytes for the node (node ← gateway).
pub const RX_CHARACTERISTIC_UUID: &str = "6e400002-b5a3-f393-e0a9-e50e24dcca9e";
/// Notified by the node: bytes for the gateway (node → gateway).
pub const TX_CHARACTERISTIC_UUID: &str = "6e400003-b5a3-f393-e0a9-e50e24dcca9e";

/// A connection must stay up this long before a failure counts as a new outage (backoff
/// from its minimum, a new warning); shorter ones keep backing off, so a node that connects
/// and fails at once is not hammered.
const STABLE: Duration = Duration::from_secs(10);
/// After cancel: how long a packet write stalled on the radio may hold up the stop.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Bytes in flight between the gateway and the packet pump, each way.
const PUMP_BUFFER: usize = 4096;

/// One BLE node's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BleSettings {
    /// The node's address, `AA:BB:CC:DD:EE:FF`.
    pub address: String,
    /// Bluetooth adapter, e.g. `hci0`; `None` for the system's default.
    pub adapter: Option<String>,
}

/// A connected GATT UART: packets of at most [`mtu`](Self::mtu) bytes each way. Both methods
/// take `&self` and must be cancel-safe (the pump waits on both at once).
pub trait GattLink: Send + Sync + 'static {
    /// The most bytes one write may carry (what the link accepts; for BlueZ, less than the
    /// negotiated ATT MTU).
    fn mtu(&self) -> usize;
    /// Writes one packet (at most `mtu` bytes) to the node.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// The next notification from the node; an error when the connection is gone.
    fn recv(&self) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
}

/// Finds and connects one node; called again after each failure, with backoff.
pub trait GattConnector: Send + Sync + 'static {
    type Link: GattLink;
    /// Names the node in logs and metrics (its address).
    fn name(&self) -> &str;
    fn connect(&self) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;
}

/// `bytes` cut into packets for a link whose writes carry at most `mtu` bytes.
pub fn packets(bytes: &[u8], mtu: usize) -> std::slice::Chunks<'_, u8> {
    bytes.chunks(mtu.max(1))
}

/// Runs the gateway over one connected link until the link fails (`Err`) or `cancel` fires
/// (`Ok`). The gateway side is the same as for a serial port ([`crate::run_link`]); a pump
/// between it and the link cuts and joins packets.
pub async fn run_gatt_link<L: GattLink>(
    link: L,
    name: &str,
    context: &Context,
    cancel: &CancellationToken,
) -> Result<(), LinkError> {
    let (gateway_end, pump_end) = tokio::io::duplex(PUMP_BUFFER);
    let gateway = crate::gateway::run_link(gateway_end, name, context, cancel);
    let pump = async {
        // When the pump ends, `pump_end` is gone: the gateway reads the end of the stream and
        // stops, losing the link's nodes as for an unplugged serial port. On cancel the
        // gateway stops first and the pump follows, unless a write is stuck on the radio.
        tokio::select! {
            result = pump(&link, pump_end) => result,
            () = async {
                cancel.cancelled().await;
                tokio::time::sleep(STOP_GRACE).await;
            } => Ok(()),
        }
    };
    let (gateway, pump) = tokio::join!(gateway, pump);
    match (gateway, pump) {
        (Ok(()), _) => Ok(()),
        // The link failed: that is the reason, not what it caused on the gateway's side.
        (Err(_), Err(error)) | (Err(error), Ok(())) => Err(error),
    }
}

/// Moves bytes between the gateway's stream and the link until either ends. The two
/// directions run independently, so a slow radio one way never holds up the other.
async fn pump<L: GattLink>(link: &L, stream: tokio::io::DuplexStream) -> Result<(), LinkError> {
    let (mut from_gateway, mut to_gateway) = tokio::io::split(stream);
    let to_node = async {
        let mut buffer = vec![0u8; PUMP_BUFFER];
        loop {
            let n = from_gateway
                .read(&mut buffer)
                .await
                .map_err(|source| LinkError::Read { source })?;
            if n == 0 {
                // The gateway stopped.
                return Ok(());
            }
            for packet in packets(&buffer[..n], link.mtu()) {
                link.send(packet)
                    .await
                    .map_err(|source| LinkError::Write { source })?;
            }
        }
    };
    let from_node = async {
        loop {
            let bytes = link
                .recv()
                .await
                .map_err(|source| LinkError::Read { source })?;
            if to_gateway.write_all(&bytes).await.is_err() {
                // The gateway stopped.
                return Ok(());
            }
        }
    };
    tokio::select! {
        result = to_node => result,
        result = from_node => result,
    }
}

/// Connects the node, runs the gateway over it, and connects again with backoff when the
/// connection fails or cannot be made, until `cancel` fires.
pub async fn run<C: GattConnector>(
    connector: C,
    mut backoff: Backoff,
    context: Context,
    cancel: CancellationToken,
) {
    let name = connector.name().to_owned();
    let mut failing = false;
    let mut connected_before = false;
    loop {
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect()) => {
                connected.unwrap_or(Err(LinkError::ConnectTimeout { after: CONNECT_TIMEOUT }))
            }
        };
        let result = match connected {
            Ok(link) => {
                if connected_before {
                    context.metrics.link_reconnects.increment(1);
                }
                connected_before = true;
                tracing::info!(node = %name, mtu = link.mtu(), "BLE node link connected.");
                context.metrics.links_up.increment(1.0);
                let since = tokio::time::Instant::now();
                let result = run_gatt_link(link, &name, &context, &cancel).await;
                context.metrics.links_up.decrement(1.0);
                if since.elapsed() >= STABLE {
                    failing = false;
                    backoff.reset();
                }
                result
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => {
                tracing::info!(node = %name, "BLE node link stopped.");
                return;
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(node = %name, %error, "BLE node link down; retrying with backoff.");
            }
            Err(error) => tracing::debug!(node = %name, %error, "BLE node link still down."),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long a BLE connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests;
