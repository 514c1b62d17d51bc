//! `nodes.simulated`: sensor nodes simulated inside the gateway, for the demo and for trying
//! pipelines without hardware. Each entry gets a pseudo-terminal pair: the simulated nodes
//! (`edgegw-node-sim`) speak MQTT-SN in COBS + CRC frames on one end, and the gateway's own
//! serial node link opens the other end by its path, exactly as it opens a USB-UART. Control
//! messages the nodes receive are logged.

use std::time::Duration;

use tokio_serial::{SerialPort as _, SerialStream};
use tokio_util::sync::CancellationToken;

/// Keeps the terminal ends open while the gateway runs (a closed end hangs up the link).
pub struct Simulated {
    _terminals: Vec<SerialStream>,
    stop: CancellationToken,
}

impl Simulated {
    /// Stops the simulated nodes (before the node link closes its end).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the simulated nodes; returns the serial ports the node link must open.
pub fn start(
    entries: &[edgegw_config::SimulatedNodes],
    shutdown: &CancellationToken,
) -> anyhow::Result<(Vec<edgegw_nodes::SerialSettings>, Simulated)> {
    use anyhow::Context as _;
    let mut ports = Vec::new();
    let mut terminals = Vec::new();
    let stop = shutdown.child_token();
    for entry in entries {
        let (controller, terminal) = SerialStream::pair().with_context(|| {
            format!(
                "nodes.simulated `{}`: cannot open a pseudo-terminal",
                entry.id
            )
        })?;
        let path = terminal.name().with_context(|| {
            format!(
                "nodes.simulated `{}`: the pseudo-terminal has no path",
                entry.id
            )
        })?;
        tracing::info!(
            node = %entry.id,
            nodes = entry.nodes,
            port = %path,
            interval = %entry.interval,
            "Simulated node on a pseudo-terminal."
        );
        ports.push(edgegw_nodes::SerialSettings {
            port: path.clone(),
            baud: 115_200,
        });
        terminals.push(terminal);
        let options = edgegw_node_sim::Options {
            id: entry.id.clone(),
            nodes: entry.nodes,
            interval: entry.interval.as_std(),
            qos: entry.qos,
            keepalive: Duration::from_secs(30),
        };
        tokio::spawn(run(controller, path, options, stop.clone()));
    }
    Ok((
        ports,
        Simulated {
            _terminals: terminals,
            stop,
        },
    ))
}

/// Runs the nodes until the gateway stops; after an error they start over a second later.
async fn run(
    mut port: SerialStream,
    path: String,
    options: edgegw_node_sim::Options,
    shutdown: CancellationToken,
) {
    let node = options.id.clone();
    let mut report = move |event: edgegw_node_sim::SimEvent| match event {
        edgegw_node_sim::SimEvent::Received(line) => {
            tracing::info!(node = %node, received = %line, "Simulated node received a message.");
        }
        edgegw_node_sim::SimEvent::Warning(text) => {
            tracing::debug!(node = %node, "Simulated node: {text}");
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = edgegw_node_sim::simulate(&mut port, &path, options.clone(), &mut report) => {
                if let Err(error) = result {
                    tracing::warn!(node = %options.id, %error, "Simulated node failed; starting it over in 1s.");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
