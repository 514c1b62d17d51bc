//! The BlueZ binding (cargo feature `ble`, `bluer` over D-Bus): finds the node (discovering
//! it if BlueZ does not know it yet), connects, and opens the UART service's two
//! characteristics as sockets (`AcquireWrite`, `AcquireNotify`), so packets bypass D-Bus.
//! Needs a running `bluetoothd` and a Bluetooth adapter; what cannot be tested without a radio
//! is listed in the README's manual BLE test.

use std::{io, time::Duration};

use bluer::{
    Address, Session, Uuid,
    gatt::{CharacteristicReader, CharacteristicWriter},
};

use super::{BleSettings, GattConnector, GattLink};
use crate::LinkError;

const SERVICE: Uuid = Uuid::from_u128(0x6e400001_b5a3_f393_e0a9_e50e24dcca9e);
const RX: Uuid = Uuid::from_u128(0x6e400002_b5a3_f393_e0a9_e50e24dcca9e);
const TX: Uuid = Uuid::from_u128(0x6e400003_b5a3_f393_e0a9_e50e24dcca9e);

/// How often the adapter is asked whether discovery has found the node.
const DISCOVERY_POLL: Duration = Duration::from_millis(250);

/// Connects one node by address.
pub struct BluezConnector {
    settings: BleSettings,
    address: Address,
}

impl BluezConnector {
    /// Fails on an address that is not `AA:BB:CC:DD:EE:FF` (the config check refuses those
    /// first).
    pub fn new(settings: BleSettings) -> Result<Self, LinkError> {
        let address = settings.address.parse().map_err(|_| LinkError::Ble {
            address: settings.address.clone(),
            reason: "not a Bluetooth address such as AA:BB:CC:DD:EE:FF".into(),
        })?;
        Ok(Self { settings, address })
    }

    fn error(&self, what: &str, error: impl std::fmt::Display) -> LinkError {
        LinkError::Ble {
            address: self.settings.address.clone(),
            reason: format!("{what}: {error}"),
        }
    }
}

/// A connected node: the two characteristics' sockets, and the D-Bus session they came from.
pub struct BluezLink {
    writer: CharacteristicWriter,
    reader: CharacteristicReader,
    _session: Session,
}

impl GattLink for BluezLink {
    fn mtu(&self) -> usize {
        self.writer.mtu()
    }

    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.writer.send(packet).await
    }

    async fn recv(&self) -> io::Result<Vec<u8>> {
        let packet = self.reader.recv().await?;
        if packet.is_empty() {
            // The socket's end of stream: BlueZ released it (disconnected).
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node's notifications stopped (disconnected)",
            ));
        }
        Ok(packet)
    }
}

impl GattConnector for BluezConnector {
    type Link = BluezLink;

    fn name(&self) -> &str {
        &self.settings.address
    }

    async fn connect(&self) -> Result<BluezLink, LinkError> {
        let session = Session::new().await.map_err(|e| {
            self.error(
                "BlueZ is not reachable over D-Bus (is bluetoothd running?)",
                e,
            )
        })?;
        let adapter = match &self.settings.adapter {
            Some(name) => session.adapter(name),
            None => session.default_adapter().await,
        }
        .map_err(|e| self.error("no Bluetooth adapter", e))?;
        adapter
            .set_powered(true)
            .await
            .map_err(|e| self.error("cannot power the adapter on", e))?;
        let known = adapter
            .device_addresses()
            .await
            .map_err(|e| self.error("cannot list devices", e))?;
        if !known.contains(&self.address) {
            // Discovery runs while its stream is held.
            let _discovery = adapter
                .discover_devices()
                .await
                .map_err(|e| self.error("cannot start discovery", e))?;
            loop {
                tokio::time::sleep(DISCOVERY_POLL).await;
                let found = adapter
                    .device_addresses()
                    .await
                    .map_err(|e| self.error("cannot list devices", e))?;
                if found.contains(&self.address) {
                    break;
                }
            }
        }
        let device = adapter
            .device(self.address)
            .map_err(|e| self.error("unknown device", e))?;
        if !device.is_connected().await.unwrap_or(false) {
            device
                .connect()
                .await
                .map_err(|e| self.error("cannot connect", e))?;
        }
        let mut rx = None;
        let mut tx = None;
        for service in device
            .services()
            .await
            .map_err(|e| self.error("cannot read its GATT services", e))?
        {
            if service.uuid().await.ok() != Some(SERVICE) {
                continue;
            }
            for characteristic in service
                .characteristics()
                .await
                .map_err(|e| self.error("cannot read the UART service", e))?
            {
                match characteristic.uuid().await.ok() {
                    Some(uuid) if uuid == RX => rx = Some(characteristic),
                    Some(uuid) if uuid == TX => tx = Some(characteristic),
                    _ => {}
                }
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(self.error(
                "no UART service",
                format!("the node must offer service {SERVICE} with characteristics {RX} (write) and {TX} (notify)"),
            ));
        };
        let writer = rx
            .write_io()
            .await
            .map_err(|e| self.error("cannot open the RX characteristic for writing", e))?;
        let reader = tx
            .notify_io()
            .await
            .map_err(|e| self.error("cannot subscribe to the TX characteristic", e))?;
        Ok(BluezLink {
            writer,
            reader,
            _session: session,
        })
    }
}
