//! Starting the brokers under test: a temp config, a free loopback port, pinned to core 0,
//! killed when dropped (also on panic), and with `setpriv --pdeathsig` when the bench dies.

use std::{
    fmt,
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{load::IDLE_HIBERNATE_SECS, procfs};

/// Core the brokers run on; the load generator runs on `LOAD_CORE`.
pub const BROKER_CORE: usize = 0;
pub const LOAD_CORE: usize = 1;

/// Limits for the throughput scenarios, the same for every broker.
pub const MAX_INFLIGHT: u32 = 1000;
pub const MAX_QUEUED: u32 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Edgegw,
    Mosquitto,
    Rumqttd,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Edgegw => "edgegw",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        })
    }
}

/// A broker binary found or built.
#[derive(Clone, Debug)]
pub struct BrokerBin {
    pub kind: Kind,
    pub path: PathBuf,
}

/// Which limits a broker starts with.
#[derive(Clone, Copy, Debug)]
pub enum Profile {
    /// Raised in-flight and queue limits (`MAX_INFLIGHT`, `MAX_QUEUED`), for throughput.
    Throughput,
    /// The broker's shipped defaults: memory under flood must be bounded with them.
    Defaults,
    /// Defaults, with room for this many connections.
    Connections(usize),
    /// Throughput limits plus pipeline `p` from `bench/pipe/#` to `local:out/{2..}`, with the
    /// identity plugin as its one rule or with no rule (edgegw only).
    Pipeline { rule: bool },
}

/// The identity plugin's component, for [`Profile::Pipeline`].
pub static IDENTITY_WASM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// edgegw's `gateway.io_driver` (`--io-driver`; default epoll).
pub static EDGEGW_IO_DRIVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn edgegw_io_driver() -> &'static str {
    EDGEGW_IO_DRIVER.get().map_or("epoll", String::as_str)
}

/// The limits each broker gets per profile, for the printout.
pub fn describe_settings() -> Vec<String> {
    vec![
        format!(
            "edgegw:    broker.limits max_inflight {MAX_INFLIGHT}, receive_maximum {MAX_INFLIGHT}, max_queued {MAX_QUEUED} (throughput); shipped defaults (max_queued 1000, max_inflight 32) for the flood; max_connections N+64 and hibernate_after {IDLE_HIBERNATE_SECS}s (default 30s) for idle; log warn; gateway.io_driver {}",
            edgegw_io_driver()
        ),
        format!(
            "mosquitto: max_inflight_messages 0 (no limit: 2.0.11 strands acknowledged QoS 1/2 messages when a finite quota is used), max_queued_messages {MAX_QUEUED}, persistence false (throughput); defaults (max_queued_messages 1000, max_inflight_messages 20) for the flood"
        ),
        format!(
            "rumqttd:   v4 listener, max_inflight_count {MAX_INFLIGHT} (throughput) / 100 (defaults), max_connections N+64"
        ),
    ]
}

/// A running broker; killed on drop.
pub struct Broker {
    pub kind: Kind,
    pub pid: u32,
    pub addr: SocketAddr,
    /// edgegw's Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    child: Child,
    dir: tempfile::TempDir,
}

/// A port that was free a moment ago (the broker binds it right after).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl Broker {
    pub fn start(bin: &BrokerBin, profile: Profile) -> Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("edgegw-bench-{}-", bin.kind))
            .tempdir()
            .context("creating a temp dir")?;
        let port = free_port()?;
        let max_conn = match profile {
            Profile::Connections(n) => n + 64,
            _ => 10_000,
        };
        let (config, args): (String, Vec<String>) = match bin.kind {
            Kind::Edgegw => {
                let limits = match profile {
                    Profile::Throughput | Profile::Pipeline { .. } => format!(
                        "  limits:\n    max_inflight: {MAX_INFLIGHT}\n    receive_maximum: {MAX_INFLIGHT}\n    max_queued: {MAX_QUEUED}\n"
                    ),
                    Profile::Defaults => String::new(),
                    Profile::Connections(_) => {
                        format!(
                            "  limits:\n    max_connections: {max_conn}\n    hibernate_after: {IDLE_HIBERNATE_SECS}s\n"
                        )
                    }
                };
                let pipeline = match profile {
                    Profile::Pipeline { rule } => {
                        let wasm = IDENTITY_WASM
                            .get()
                            .context("the identity plugin was not built")?;
                        format!(
                            "plugins:\n  - {{ name: identity, path: \"{}\" }}\npipelines:\n  - {{ name: p, from: [ \"bench/pipe/#\" ], rules: [ {} ], to: [ \"local:out/{{2..}}\" ], queue: {{ capacity: 10000 }} }}\n",
                            wasm.display(),
                            if rule { "{ plugin: identity }" } else { "" }
                        )
                    }
                    _ => String::new(),
                };
                let yaml = format!(
                    "gateway:\n  id: bench\n  data_dir: \"{data}\"\n{driver}broker:\n  listeners:\n    - bind: \"127.0.0.1:{port}\"\n{limits}{pipeline}metrics:\n  bind: \"127.0.0.1:0\"\nlog:\n  level: warn\n",
                    data = dir.path().join("data").display(),
                    // Only when not the default, so older binaries (without the key) can
                    // be measured with `--edgegw-bin` in the same run.
                    driver = match edgegw_io_driver() {
                        "epoll" => String::new(),
                        driver => format!("  io_driver: {driver}\n"),
                    },
                );
                let path = dir.path().join("gateway.yaml");
                (yaml, vec!["run".into(), "-c".into(), path_str(&path)])
            }
            Kind::Mosquitto => {
                let limits = match profile {
                    // No in-flight limit: with a finite one, 2.0.11 (Debian bookworm) stops
                    // delivering some publishers' QoS 1/2 messages after acknowledging them
                    // (its in-flight quota leaks). The load never reaches 1000 in flight.
                    Profile::Throughput => {
                        format!("max_inflight_messages 0\nmax_queued_messages {MAX_QUEUED}\n")
                    }
                    _ => String::new(),
                };
                let conf = format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{limits}log_dest stderr\nlog_type error\nlog_type warning\n"
                );
                let path = dir.path().join("mosquitto.conf");
                (conf, vec!["-c".into(), path_str(&path)])
            }
            Kind::Rumqttd => {
                let inflight = match profile {
                    Profile::Throughput => MAX_INFLIGHT,
                    _ => 100,
                };
                let toml = format!(
                    "id = 0\n\n[router]\nid = 0\nmax_connections = {max_conn}\nmax_outgoing_packet_count = 200\nmax_segment_size = 104857600\nmax_segment_count = 10\n\n[v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n    [v4.1.connections]\n    connection_timeout_ms = 60000\n    max_payload_size = 20480\n    max_inflight_count = {inflight}\n    dynamic_filters = true\n"
                );
                let path = dir.path().join("rumqttd.toml");
                (toml, vec!["-c".into(), path_str(&path)])
            }
        };
        let config_path = match bin.kind {
            Kind::Edgegw => dir.path().join("gateway.yaml"),
            Kind::Mosquitto => dir.path().join("mosquitto.conf"),
            Kind::Rumqttd => dir.path().join("rumqttd.toml"),
        };
        std::fs::write(&config_path, config).context("writing the broker config")?;
        if bin.kind == Kind::Mosquitto {
            // Mosquitto drops root privileges to its own user before opening anything else.
            allow_all(dir.path());
        }

        let out = File::create(dir.path().join("broker.out"))?;
        let err = File::create(dir.path().join("broker.err"))?;
        // setpriv: the broker gets SIGKILL if the bench dies without running its drop guards.
        let mut command = if have("setpriv") {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "taskset"]);
            c
        } else {
            Command::new("taskset")
        };
        command
            .args(["-c", &BROKER_CORE.to_string()])
            .arg(&bin.path)
            .args(&args)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} with `taskset -c {BROKER_CORE}` (is util-linux installed?)",
                bin.path.display()
            )
        })?;
        let mut broker = Broker {
            kind: bin.kind,
            pid: child.id(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics: None,
            child,
            dir,
        };
        broker.wait_ready(Duration::from_secs(30))?;
        Ok(broker)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during start-up ({status}); its output:\n{}",
                    self.kind,
                    self.output_tail()
                );
            }
            let mqtt_ready =
                TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok();
            if mqtt_ready && self.kind != Kind::Edgegw {
                return Ok(());
            }
            if mqtt_ready {
                // Metrics listen on port 0: the broker's other listening socket.
                let port = procfs::listening_ports(self.pid)
                    .into_iter()
                    .find(|&p| p != self.addr.port());
                if let Some(port) = port {
                    self.metrics = Some(SocketAddr::from(([127, 0, 0, 1], port)));
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept connections on {} within {timeout:?}; its output:\n{}",
                    self.kind,
                    self.addr,
                    self.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines the broker printed.
    pub fn output_tail(&self) -> String {
        let mut text = String::new();
        for name in ["broker.out", "broker.err"] {
            if let Ok(s) = std::fs::read_to_string(self.dir.path().join(name)) {
                let lines: Vec<&str> = s.lines().collect();
                for line in &lines[lines.len().saturating_sub(20)..] {
                    text.push_str("    ");
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        if text.is_empty() {
            text.push_str("    (nothing)\n");
        }
        text
    }

    /// Still running?
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output:\n{}",
                self.kind,
                self.output_tail()
            );
        }
        Ok(())
    }

    pub fn rss_kib(&self) -> Option<u64> {
        procfs::status_kib(self.pid, "VmRSS")
    }

    pub fn peak_rss_kib(&self) -> Option<u64> {
        procfs::status_kib(self.pid, "VmHWM")
    }

    pub fn pid_str(&self) -> String {
        self.pid.to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn allow_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
        }
    }
}
