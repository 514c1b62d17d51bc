//! Test harness: starts the real `edgegw` binary on free loopback ports and offers a raw
//! MQTT byte-level client for what ordinary client libraries will not send.

pub mod mosquitto;
pub mod pki;
pub mod proxy;
pub mod raw;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The `edgegw` binary, built once per test process.
///
/// It is built with the workspace's test feature set (`--workspace --tests`, what
/// `cargo test --workspace` resolves): then every dependency is the one the test build already
/// compiled and only the binary links. `-p edgegw` alone resolves some shared dependencies'
/// features differently and would build wasmtime, Cranelift and the rest a second time.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let messages = escargot::CargoBuild::new()
            .bin("edgegw")
            .args(["--workspace", "--tests", "--quiet"])
            .manifest_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .exec()
            .expect("building edgegw");
        let mut built = None;
        for message in messages {
            let message = message.expect("building edgegw");
            if let Ok(escargot::format::Message::CompilerArtifact(artifact)) = message.decode()
                && artifact.target.name == "edgegw"
                && artifact.target.kind == ["bin"]
                && !artifact.profile.test
            {
                built = artifact.executable.map(|path| path.to_path_buf());
            }
        }
        built.expect("cargo built no edgegw binary")
    })
    .clone()
}

type Logs = Arc<(Mutex<Vec<Value>>, Condvar)>;

/// A running gateway. Killed on drop.
pub struct Gateway {
    child: Child,
    pub mqtt: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    /// The first WebSocket listener (`ws://ADDR/PATH` in the log), if any.
    pub ws: Option<SocketAddr>,
    /// The first WebSocket-over-TLS listener (`wss://ADDR/PATH`), if any.
    pub wss: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The config file this gateway was started with.
    pub config: PathBuf,
    logs: Logs,
}

impl Gateway {
    /// Starts with the default test config: one plain listener, metrics, JSON logs.
    pub fn start() -> Self {
        Self::start_with("", "")
    }

    /// Starts with extra YAML under `broker:` (indented by the caller with 2 spaces, e.g.
    /// `"  limits:\n    max_queued: 5\n"`) and extra listeners (each a YAML list item,
    /// indented 4 spaces).
    pub fn start_with(broker_extra: &str, listeners_extra: &str) -> Self {
        Self::start_with_gateway("", broker_extra, listeners_extra)
    }

    /// [`Gateway::start_with`] plus extra YAML under `gateway:` (indented 2 spaces, e.g.
    /// `"  io_driver: io_uring\n"`).
    pub fn start_with_gateway(
        gateway_extra: &str,
        broker_extra: &str,
        listeners_extra: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "gateway:\n  id: test\n  data_dir: {data}\n{gateway_extra}broker:\n  listeners:\n    - bind: 127.0.0.1:0\n{listeners_extra}{broker_extra}metrics:\n  bind: 127.0.0.1:0\nlog:\n  level: debug\n  format: json\n",
            data = dir.path().join("data").display()
        );
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config).expect("write config");
        Self::start_file(&path, dir)
    }

    /// Starts with a config file; `dir` is kept alive with the gateway.
    pub fn start_file(path: &Path, dir: tempfile::TempDir) -> Self {
        let mut child = Command::new(binary())
            .args(["run", "-c"])
            .arg(path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgegw");
        let logs: Logs = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("EDGEGW_TEST_LOG").is_some() {
                        eprintln!("edgegw: {line}");
                    }
                    let value = serde_json::from_str(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                    logs.0.lock().unwrap().push(value);
                    logs.1.notify_all();
                }
            });
        }
        let mut gateway = Self {
            child,
            mqtt: "0.0.0.0:0".parse().unwrap(),
            mqtts: None,
            ws: None,
            wss: None,
            metrics: "0.0.0.0:0".parse().unwrap(),
            dir,
            config: path.to_path_buf(),
            logs,
        };
        let ready = gateway.wait_log(Duration::from_secs(60), |line| {
            message(line) == Some("Ready.")
        });
        assert!(ready, "gateway did not start: {:#?}", gateway.logs());
        // All listeners are logged before readiness; read every address out.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for line in gateway.logs() {
                let url = line["fields"]["url"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if let Some(addr) = url.strip_prefix("mqtt://") {
                    gateway.mqtt = addr.parse().unwrap();
                } else if let Some(addr) = url.strip_prefix("mqtts://") {
                    gateway.mqtts = Some(addr.parse().unwrap());
                } else if let Some(rest) = url.strip_prefix("ws://") {
                    gateway.ws.get_or_insert(url_addr(rest));
                } else if let Some(rest) = url.strip_prefix("wss://") {
                    gateway.wss.get_or_insert(url_addr(rest));
                } else if let Some(addr) = url.strip_prefix("http://") {
                    gateway.metrics = addr.trim_end_matches("/metrics").parse().unwrap();
                }
                // "Status page and metrics listening." names the address as `metrics`.
                if let Some(addr) = line["fields"]["metrics"]
                    .as_str()
                    .and_then(|m| m.strip_prefix("http://"))
                {
                    gateway.metrics = addr.trim_end_matches("/metrics").parse().unwrap();
                }
            }
            if gateway.mqtt.port() != 0 && gateway.metrics.port() != 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no listener addresses in {:#?}",
                gateway.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gateway
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.0.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.logs.0.lock().unwrap();
        loop {
            if guard.iter().any(&pred) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self.logs.1.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the gateway process, in KiB (`VmRSS`), and its peak (`VmHWM`).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn port(&self) -> u16 {
        self.mqtt.port()
    }

    /// `GET path` on the metrics listener: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    /// The value of one metric sample, e.g. `edgegw_broker_sessions` or
    /// `edgegw_broker_dropped_messages_total{reason="queue_full"}`; 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Polls `metric` until `pred` holds or the timeout passes; returns the last value.
    pub fn wait_metric(&self, sample: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(sample);
            if pred(value) || Instant::now() >= deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`, then starts a new gateway on the same config and data directory.
    pub fn kill_and_restart(mut self) -> Gateway {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.restart()
    }

    /// SIGTERM (graceful), then starts a new gateway on the same config and data directory.
    pub fn stop_and_restart(mut self) -> Gateway {
        let status = self.signal_and_wait("-TERM");
        assert!(status.success(), "graceful stop failed: {status}");
        self.restart()
    }

    fn restart(mut self) -> Gateway {
        let mut next = Gateway::start_file(&self.config, tempfile::tempdir().expect("tempdir"));
        // The new gateway keeps the data directory; the placeholder goes with `self`.
        std::mem::swap(&mut next.dir, &mut self.dir);
        next
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal_and_wait("-TERM")
    }

    fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not stop on {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of `ADDR/PATH` (a URL after its scheme).
fn url_addr(rest: &str) -> SocketAddr {
    let addr = rest.split_once('/').map_or(rest, |(addr, _)| addr);
    addr.parse()
        .unwrap_or_else(|e| panic!("bad listener URL {rest:?}: {e}"))
}

/// The `fields.message` of a JSON log line.
pub fn message(line: &Value) -> Option<&str> {
    line["fields"]["message"].as_str()
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Panics with what to do when the Debian mosquitto clients are missing (the README's
/// test command installs them).
pub fn require_mosquitto_clients() {
    let found = Command::new("mosquitto_pub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "mosquitto_pub/mosquitto_sub are not installed: run the README's test command, \
         which installs Debian's mosquitto-clients, or `apt-get install mosquitto-clients`"
    );
}

/// The headless browser of the status page tests: Debian's `chromium`.
pub const CHROMIUM: &str = "chromium";

/// Panics with what to do when Debian's chromium is missing (the README's test command
/// installs it).
pub fn require_chromium() {
    let found = Command::new(CHROMIUM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "chromium is not installed: run the README's test command, which installs Debian's \
         chromium, or `apt-get install chromium`"
    );
}

/// Waits for `child` (stdout and stderr piped) with a deadline, collecting its output;
/// kills it and panics, naming `what`, when it does not finish in time.
pub fn finish_within(mut child: Child, timeout: Duration, what: &str) -> std::process::Output {
    let mut pipes = Vec::new();
    for pipe in [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ] {
        pipes.push(std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        }));
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = pipes.pop().unwrap().join().unwrap();
    let stdout = pipes.pop().unwrap().join().unwrap();
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}
