//! `node-sim`: behaves as one or more sensor nodes on a serial port or PTY, speaking MQTT-SN
//! 1.2 in COBS + CRC frames (`edgegw-protocol`), so the gateway can be shown and tested
//! without hardware. Every control message a node receives is printed on stdout as
//! `<node> <last topic level> <payload>` (so `NAME led on`); warnings go to stderr. The
//! simulation itself is the library (`edgegw_node_sim::simulate`).

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use edgegw_node_sim::{Options, SimError, SimEvent, simulate, simulate_sleeping};
use tokio_serial::SerialPortBuilderExt as _;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Simulated MQTT-SN sensor nodes on a serial port or PTY"
)]
struct Args {
    /// Serial device or PTY, e.g. /dev/ttyUSB0 or /dev/pts/3.
    #[arg(long)]
    port: String,
    /// Node name: client id and topic level.
    #[arg(long)]
    id: String,
    /// Number of nodes; with more than one they are NAME-1..NAME-N behind a forwarder.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    nodes: u16,
    /// Time between two readings, e.g. 200ms, 1s, 2m.
    #[arg(long, default_value = "1s", value_parser = edgegw_node_sim::parse_duration)]
    interval: Duration,
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// QoS of the readings: 0, 1 or 2. At 1 and 2 a reading is sent again (DUP) until
    /// acknowledged and the next one waits for it; at 2 the node also subscribes to its
    /// control topic at QoS 2.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Keepalive announced in CONNECT; a PINGREQ is sent when nothing else was sent for
    /// half of it.
    #[arg(long, default_value = "30s", value_parser = edgegw_node_sim::parse_duration)]
    keepalive: Duration,
    /// Sleeping nodes: each publishes one reading, goes to sleep (DISCONNECT announcing 1.5
    /// times DURATION), is silent for DURATION, then wakes (PINGREQ with its client id) for
    /// the messages the gateway kept for it, and again; --interval is not used.
    #[arg(long, value_name = "DURATION", value_parser = edgegw_node_sim::parse_duration)]
    sleep: Option<Duration>,
}

async fn run(args: Args) -> Result<(), SimError> {
    let port = tokio_serial::new(&args.port, args.baud)
        .open_native_async()
        .map_err(|source| SimError::Open {
            path: args.port.clone(),
            baud: args.baud,
            source,
        })?;
    let options = Options {
        id: args.id,
        nodes: args.nodes,
        interval: args.interval,
        qos: args.qos,
        keepalive: args.keepalive,
    };
    // Printed from the simulation's own task: a closed stdout (e.g. piped into `head`) is
    // not a reason to stop being a node.
    let mut report = |event: SimEvent| {
        use std::io::Write as _;
        match event {
            SimEvent::Received(line) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            SimEvent::Warning(text) => eprintln!("node-sim: {text}"),
        }
    };
    match args.sleep {
        None => simulate(port, &args.port, options, &mut report).await,
        Some(sleep) => simulate_sleeping(port, &args.port, options, sleep, &mut report).await,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("node-sim: {error}");
            ExitCode::FAILURE
        }
    }
}
