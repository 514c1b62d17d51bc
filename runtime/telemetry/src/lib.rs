//! Metrics and health: the metric names (one module, [`names`]), the Prometheus recorder,
//! the last warnings and errors ([`recent`]), and a small HTTP listener for `GET /metrics`,
//! `GET /healthz`, `GET /readyz`, the status page `GET /` and its `GET /status.json`.
//!
//! The HTTP side is deliberately minimal (GET only, one request per connection, bounded
//! request head, short timeouts): it serves scrapers, probes and the one self-contained
//! status page, not browsers at large.

pub mod names;
pub mod recent;

pub use recent::{RecentEvent, recent_errors_layer, recent_events};

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often histogram observations are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Bucket bounds (seconds) of every histogram: durations from 10 µs to 10 s.
const HISTOGRAM_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    #[error("cannot listen for metrics on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// The status page: one self-contained HTML file (no CDN), which reads `/metrics` and
/// `/status.json` every few seconds.
const STATUS_PAGE: &str = include_str!("status.html");

/// The installed recorder and the readiness flag shared with the rest of the gateway.
#[derive(Clone)]
pub struct Telemetry {
    handle: PrometheusHandle,
    ready: Arc<AtomicBool>,
    identity: Arc<std::sync::RwLock<Option<Arc<Identity>>>>,
    started: Instant,
}

/// What `/status.json` says about the gateway itself.
#[derive(Clone, Debug)]
pub struct Identity {
    /// `gateway.id`.
    pub gateway_id: String,
    /// The program version.
    pub version: String,
    /// The MQTT listeners, as URLs (`mqtt://127.0.0.1:1883`).
    pub listeners: Vec<String>,
    /// The pipelines' names, and the uplinks' names, in config order.
    pub pipelines: Vec<String>,
    pub uplinks: Vec<String>,
}

impl Telemetry {
    /// Installs the process-wide Prometheus recorder and registers every metric's help.
    pub fn install() -> Result<Self, TelemetryError> {
        let handle = PrometheusBuilder::new()
            .set_buckets(HISTOGRAM_BUCKETS)
            .map_err(|e| TelemetryError::Recorder(e.to_string()))?
            .install_recorder()
            .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
        names::describe();
        Ok(Self {
            handle,
            ready: Arc::new(AtomicBool::new(false)),
            identity: Arc::new(std::sync::RwLock::new(None)),
            started: Instant::now(),
        })
    }

    /// Sets what `/status.json` reports about the gateway (at start and after a reload).
    pub fn set_identity(&self, identity: Identity) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(identity));
    }

    /// The body of `GET /status.json`.
    pub fn status_json(&self) -> String {
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let identity = identity.as_deref();
        let errors: Vec<serde_json::Value> = recent_events()
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "time_ms": e.time_ms,
                    "level": e.level,
                    "target": e.target,
                    "message": e.message,
                })
            })
            .collect();
        serde_json::json!({
            "gateway_id": identity.map(|i| i.gateway_id.as_str()),
            "version": identity.map(|i| i.version.as_str()),
            "listeners": identity.map(|i| i.listeners.clone()).unwrap_or_default(),
            "pipelines": identity.map(|i| i.pipelines.clone()).unwrap_or_default(),
            "uplinks": identity.map(|i| i.uplinks.clone()).unwrap_or_default(),
            "ready": self.ready.load(Ordering::Relaxed),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "errors": errors,
        })
        .to_string()
    }

    /// `/readyz` answers 200 once this is set (listeners up, state loaded).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Binds the HTTP listener and serves it until `shutdown` is cancelled.
    /// Returns the bound address (useful with port 0).
    pub async fn serve(
        &self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<SocketAddr, TelemetryError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| TelemetryError::Bind { addr, error })?;
        let local = listener
            .local_addr()
            .map_err(|error| TelemetryError::Bind { addr, error })?;
        let this = self.clone();
        tokio::spawn(async move {
            // Bound concurrent scrapes so a misbehaving prober cannot pile up tasks.
            let permits = Arc::new(tokio::sync::Semaphore::new(32));
            // Histogram observations wait in the recorder until upkeep folds them into the
            // buckets: a scrape does it, and this does it when nobody scrapes, so that memory
            // stays bounded on a gateway without Prometheus.
            let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
            upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let (stream, peer) = tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = upkeep.tick() => {
                        this.handle.run_upkeep();
                        continue;
                    }
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(error) => {
                            tracing::warn!(%error, "Metrics listener accept failed.");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    continue;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let result =
                        tokio::time::timeout(Duration::from_secs(10), this.answer(stream)).await;
                    if let Ok(Err(error)) = result {
                        tracing::debug!(%peer, %error, "Metrics request failed.");
                    }
                    drop(permit);
                });
            }
        });
        Ok(local)
    }

    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > 8192 {
                return respond(
                    &mut stream,
                    false,
                    431,
                    "text/plain",
                    "request head too large\n",
                )
                .await;
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            return respond(
                &mut stream,
                false,
                405,
                "text/plain",
                "only GET is served\n",
            )
            .await;
        }
        match path {
            "/" | "/index.html" => {
                respond(
                    &mut stream,
                    head_only,
                    200,
                    "text/html; charset=utf-8",
                    STATUS_PAGE,
                )
                .await
            }
            "/status.json" => {
                let body = self.status_json();
                respond(&mut stream, head_only, 200, "application/json", &body).await
            }
            "/metrics" => {
                let body = self.render();
                respond(
                    &mut stream,
                    head_only,
                    200,
                    "text/plain; version=0.0.4",
                    &body,
                )
                .await
            }
            "/healthz" => respond(&mut stream, head_only, 200, "text/plain", "ok\n").await,
            "/readyz" => {
                if self.ready.load(Ordering::Relaxed) {
                    respond(&mut stream, head_only, 200, "text/plain", "ready\n").await
                } else {
                    respond(&mut stream, head_only, 503, "text/plain", "starting\n").await
                }
            }
            _ => {
                respond(
                    &mut stream,
                    head_only,
                    404,
                    "text/plain",
                    "not found: try /, /metrics, /healthz, /readyz, /status.json\n",
                )
                .await
            }
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    head_only: bool,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}
