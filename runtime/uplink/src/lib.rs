//! Uplinks: store-and-forward bridges to cloud MQTT brokers.
//!
//! Each uplink is a [`Sink`] on the router: a message that matches one of its `forward`
//! rules is appended to the uplink's [`Outbox`] (its own SQLite file) before the router
//! returns, and the outbox ticket joins the message's durability, so a QoS 1/2 publisher is
//! acknowledged only once the message is on disk. A connection task on the uplink's own
//! thread (ntex-mqtt's client over rustls) forwards committed entries in order with a
//! bounded in-flight window and deletes each when the cloud broker acknowledges it;
//! `subscribe` rules bring remote messages back into the router.

mod client;
mod tls;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use edgegw_broker::{
    LocalClient, Message, Offer, Origin, QoS, Router, Sink, SinkId,
    topic::{Filter, TopicTemplate, matches},
};
use edgegw_store::{Appended, Outbox, OutboxOptions, OutboxStats, StoreError};
use tokio_util::sync::CancellationToken;

pub use edgegw_store::{Fsync, OnFull};
pub use tls::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink `{uplink}`: {message}")]
    Settings { uplink: String, message: String },
    #[error("uplink TLS file {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("uplink outbox: {0}")]
    Outbox(#[from] StoreError),
    #[error("cannot start the uplink thread: {0}")]
    Thread(std::io::Error),
}

/// MQTT version spoken upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// One forward rule: local filter → remote topic template.
#[derive(Clone, Debug)]
pub struct ForwardRule {
    pub from: String,
    pub to: String,
    pub qos: u8,
    pub retain: bool,
}

/// One downlink rule: remote filter → local topic template.
#[derive(Clone, Debug)]
pub struct DownlinkRule {
    pub remote: String,
    pub local: String,
    pub qos: u8,
}

/// Everything an uplink needs, in plain types (the gateway maps the config onto it).
#[derive(Clone, Debug)]
pub struct UplinkSettings {
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub protocol: Protocol,
    pub keepalive: Duration,
    pub clean_start: bool,
    pub tls: TlsSettings,
    pub forward: Vec<ForwardRule>,
    pub subscribe: Vec<DownlinkRule>,
    pub outbox: OutboxOptions,
    pub inflight: u16,
    /// The cloud broker's maximum packet size when configured (3.1.1 brokers cannot
    /// announce theirs); with MQTT 5 the smaller of this and the announced one applies.
    pub max_packet_size: Option<u32>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The kernel interface of the client thread's I/O.
    pub io_driver: edgegw_broker::IoDriver,
}

/// The parsed url.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("url `{url}` must start with mqtts:// or mqtt://"));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("url `{url}`: unclosed `[`"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("url `{url}`: bad port"))?,
                None => default_port,
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_string(),
                    port.parse().map_err(|_| format!("url `{url}`: bad port"))?,
                ),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("url `{url}` has no host"));
        }
        Ok(Self { tls, host, port })
    }
}

struct CompiledForward {
    filter: String,
    template: TopicTemplate,
    qos: u8,
    retain: bool,
}

/// The router side: appends matching messages to the outbox.
struct ForwardSink {
    /// Swapped whole by [`Uplink::reconfigure`].
    rules: std::sync::RwLock<Arc<Vec<CompiledForward>>>,
    outbox: Outbox,
    /// Messages published by this uplink's downlink are never sent back up.
    downlink_session: u64,
    unmapped: metrics::Counter,
}

impl Sink for ForwardSink {
    fn offer(&self, message: &Arc<Message>) -> Option<Offer> {
        if message.origin == Origin::Session(self.downlink_session) {
            return None;
        }
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut result: Option<Offer> = None;
        let mut sent_to: Vec<String> = Vec::new();
        for rule in rules.iter() {
            if !matches(&rule.filter, &message.topic) {
                continue;
            }
            let Some(remote) = rule.template.render(&message.topic) else {
                self.unmapped.increment(1);
                tracing::debug!(topic = %message.topic, "Uplink forward template names a level the topic lacks; not forwarded.");
                continue;
            };
            if sent_to.contains(&remote) {
                continue;
            }
            let appended = self.outbox.append(
                &remote,
                &message.payload,
                rule.qos,
                rule.retain && message.retain,
                Vec::new(),
            );
            sent_to.push(remote);
            result = Some(match (result.take(), appended) {
                (None | Some(Offer::Dropped), Appended::Queued(ticket)) => {
                    Offer::Accepted(Some(ticket))
                }
                (Some(Offer::Accepted(Some(a))), Appended::Queued(b)) => {
                    Offer::Accepted(Some(a.max(b)))
                }
                (Some(Offer::Accepted(a)), Appended::Queued(b)) => Offer::Accepted(Some(match a {
                    Some(a) => a.max(b),
                    None => b,
                })),
                (Some(accepted @ Offer::Accepted(_)), Appended::Dropped(_)) => accepted,
                (None | Some(Offer::Dropped), Appended::Dropped(_)) => Offer::Dropped,
            });
        }
        result
    }
}

/// A running uplink. [`Uplink::stop`] ends it.
pub struct Uplink {
    name: String,
    settings: UplinkSettings,
    router: Router,
    sink: SinkId,
    forward: Arc<ForwardSink>,
    local: Arc<LocalClient>,
    outbox: Outbox,
    cancel: CancellationToken,
    thread: Option<JoinHandle<()>>,
    /// [`Uplink::stop`] ran (the sink is removed already).
    stopped: bool,
    /// [`connection_settings`] of what the connection thread runs with.
    connected_with: String,
}

/// What [`Uplink::reconfigure`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// The forward rules were replaced.
    pub forward: bool,
    /// The connection was restarted with new connection settings (url, credentials, TLS,
    /// downlinks, window, keepalive, backoff).
    pub reconnected: bool,
    /// The outbox settings changed: they apply only after a restart.
    pub outbox_needs_restart: bool,
}

/// Where a pipeline output bound for an uplink goes (see [`Uplink::handle`]).
#[derive(Clone)]
pub struct UplinkHandle {
    outbox: Outbox,
}

impl UplinkHandle {
    /// What the outbox holds now.
    pub fn stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// Appends a message for the cloud broker as is (topic unchanged, its own QoS);
    /// `Appended::Queued`'s ticket resolves once it is durable.
    pub fn enqueue(&self, message: &Message) -> Appended {
        self.outbox.append(
            &message.topic,
            &message.payload,
            message.qos.as_u8(),
            message.retain,
            Vec::new(),
        )
    }
}

/// Settings checked and compiled, before anything changes.
struct Compiled {
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    rules: Vec<CompiledForward>,
    downlinks: Vec<client::CompiledDownlink>,
}

fn compile(settings: &UplinkSettings) -> Result<Compiled, UplinkError> {
    let settings_error = |message: String| UplinkError::Settings {
        uplink: settings.name.clone(),
        message,
    };
    let endpoint = Endpoint::parse(&settings.url).map_err(settings_error)?;
    let tls = if endpoint.tls {
        Some(Arc::new(tls::client_config(&settings.tls)?))
    } else {
        None
    };
    let mut rules = Vec::new();
    for rule in &settings.forward {
        Filter::parse(&rule.from)
            .map_err(|e| settings_error(format!("forward filter `{}`: {e}", rule.from)))?;
        rules.push(CompiledForward {
            filter: rule.from.clone(),
            template: TopicTemplate::parse(&rule.to).map_err(settings_error)?,
            qos: rule.qos.min(2),
            retain: rule.retain,
        });
    }
    let mut downlinks = Vec::new();
    for rule in &settings.subscribe {
        Filter::parse(&rule.remote)
            .map_err(|e| settings_error(format!("subscribe filter `{}`: {e}", rule.remote)))?;
        downlinks.push(client::CompiledDownlink {
            remote: rule.remote.clone(),
            template: TopicTemplate::parse(&rule.local).map_err(settings_error)?,
            qos: rule.qos.min(2),
        });
    }
    Ok(Compiled {
        endpoint,
        tls,
        rules,
        downlinks,
    })
}

/// Starts the connection thread of an uplink.
fn spawn_client(
    settings: &UplinkSettings,
    compiled: Compiled,
    outbox: &Outbox,
    local: &Arc<LocalClient>,
    cancel: &CancellationToken,
) -> Result<JoinHandle<()>, UplinkError> {
    let task = client::Task {
        settings: settings.clone(),
        endpoint: compiled.endpoint,
        tls: compiled.tls,
        downlinks: compiled.downlinks,
        outbox: outbox.clone(),
        local: local.clone(),
        cancel: cancel.clone(),
    };
    std::thread::Builder::new()
        .name(format!("edgegw-uplink-{}", settings.name))
        .spawn(move || task.run())
        .map_err(UplinkError::Thread)
}

/// The settings the connection thread uses (all but the forward rules and the outbox), with
/// a fingerprint of the TLS files' contents: a certificate renewed at the same path is a
/// change.
fn connection_settings(settings: &UplinkSettings) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let UplinkSettings {
        name,
        url,
        client_id,
        username,
        password,
        protocol,
        keepalive,
        clean_start,
        tls,
        forward: _,
        subscribe,
        outbox: _,
        inflight,
        max_packet_size,
        reconnect_min,
        reconnect_max,
        io_driver,
    } = settings;
    let files: Vec<String> = [&tls.ca, &tls.cert, &tls.key]
        .into_iter()
        .flatten()
        .map(|path| match std::fs::read(path) {
            Ok(bytes) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut hasher);
                format!("{:016x}", hasher.finish())
            }
            Err(error) => format!("unreadable ({error})"),
        })
        .collect();
    format!(
        "{name:?}{url:?}{client_id:?}{username:?}{password:?}{protocol:?}{keepalive:?}{clean_start:?}{tls:?}{files:?}{subscribe:?}{inflight:?}{max_packet_size:?}{reconnect_min:?}{reconnect_max:?}{io_driver:?}"
    )
}

impl Uplink {
    /// Opens the outbox in `data_dir`, adds the forward rules to the router and starts the
    /// connection thread. Fails before anything runs on bad settings or files.
    pub fn start(
        settings: UplinkSettings,
        router: Router,
        data_dir: &Path,
    ) -> Result<Uplink, UplinkError> {
        let connected_with = connection_settings(&settings);
        let mut compiled = compile(&settings)?;
        let outbox_path = data_dir.join(format!("outbox-{}.db", settings.name));
        let outbox = Outbox::open(&outbox_path, settings.outbox.clone())?;
        let stats = outbox.stats();
        tracing::info!(
            uplink = %settings.name,
            remote = %settings.url,
            outbox = %outbox_path.display(),
            queued = stats.messages,
            "Uplink starting."
        );
        let local = Arc::new(router.local_client(&format!("$edgegw/uplink/{}", settings.name)));
        let forward = Arc::new(ForwardSink {
            rules: std::sync::RwLock::new(Arc::new(std::mem::take(&mut compiled.rules))),
            outbox: outbox.clone(),
            downlink_session: local.session_id(),
            unmapped: metrics::counter!(
                edgegw_telemetry::names::UPLINK_DROPPED,
                "uplink" => settings.name.clone(),
                "reason" => "unmapped"
            ),
        });
        let sink = router.add_sink(forward.clone());
        let cancel = CancellationToken::new();
        let thread = match spawn_client(&settings, compiled, &outbox, &local, &cancel) {
            Ok(thread) => thread,
            Err(error) => {
                router.remove_sink(sink);
                return Err(error);
            }
        };
        Ok(Uplink {
            name: settings.name.clone(),
            settings,
            router,
            sink,
            forward,
            local,
            outbox,
            cancel,
            thread: Some(thread),
            stopped: false,
            connected_with,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies changed settings (a config reload) without losing anything: forward rules
    /// are swapped atomically (every message goes by the old rules or the new ones, into the
    /// same outbox); changed connection settings restart the connection thread, which
    /// resumes at the oldest unacknowledged entry (as after a reconnect: at most the window
    /// is sent twice); a TLS file renewed at the same path counts as changed. Outbox settings
    /// apply only after a restart. On an error nothing changes (when the new connection
    /// thread cannot start, the old settings run again). Blocks while the old connection
    /// thread stops: call it off the async workers.
    pub fn reconfigure(&mut self, settings: UplinkSettings) -> Result<Reconfigured, UplinkError> {
        if settings.name != self.name {
            return Err(UplinkError::Settings {
                uplink: self.name.clone(),
                message: format!("cannot become uplink `{}`", settings.name),
            });
        }
        let mut compiled = compile(&settings)?;
        let mut done = Reconfigured {
            outbox_needs_restart: format!("{:?}", settings.outbox)
                != format!("{:?}", self.settings.outbox),
            ..Reconfigured::default()
        };
        let rules = std::mem::take(&mut compiled.rules);
        let connect_with = connection_settings(&settings);
        if connect_with != self.connected_with {
            self.cancel.cancel();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            self.cancel = CancellationToken::new();
            match spawn_client(&settings, compiled, &self.outbox, &self.local, &self.cancel) {
                Ok(thread) => {
                    self.thread = Some(thread);
                    self.connected_with = connect_with;
                }
                Err(error) => {
                    // Back to the old connection settings (they compiled before), so the
                    // uplink keeps forwarding; the error says why the new ones did not run.
                    if let Ok(old) = compile(&self.settings)
                        && let Ok(thread) = spawn_client(
                            &self.settings,
                            old,
                            &self.outbox,
                            &self.local,
                            &self.cancel,
                        )
                    {
                        self.thread = Some(thread);
                    }
                    return Err(error);
                }
            }
            done.reconnected = true;
        }
        if format!("{:?}", settings.forward) != format!("{:?}", self.settings.forward) {
            *self
                .forward
                .rules
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
            done.forward = true;
        }
        let outbox = self.settings.outbox.clone();
        self.settings = settings;
        // What runs is the old outbox configuration until a restart.
        self.settings.outbox = outbox;
        Ok(done)
    }

    /// For pipelines' `uplink:<name>` outputs.
    pub fn handle(&self) -> UplinkHandle {
        UplinkHandle {
            outbox: self.outbox.clone(),
        }
    }

    /// Stops forwarding, disconnects, and commits the outbox. Blocks: call it off the async
    /// workers (e.g. `spawn_blocking`).
    pub fn stop(mut self) {
        self.router.remove_sink(self.sink);
        self.stopped = true;
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.outbox.close();
        tracing::info!(uplink = %self.name, "Uplink stopped.");
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        if !self.stopped {
            self.router.remove_sink(self.sink);
            self.cancel.cancel();
        }
    }
}

/// The QoS of a stored entry.
pub(crate) fn qos_of(value: u8) -> QoS {
    match value {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// For the benchmark: publishes `count` copies of `payload` from memory through a connection
/// made exactly as the uplink `settings` describe (same client, TLS and in-flight window),
/// without an outbox. Returns the time the connection took (TCP, TLS, CONNECT/CONNACK) and
/// the time from the first publish to the last acknowledgement. Blocks the calling thread.
#[doc(hidden)]
pub fn publish_direct(
    settings: UplinkSettings,
    router: Router,
    topic: &str,
    payload: &[u8],
    qos: u8,
    count: usize,
) -> Result<(Duration, Duration), String> {
    let endpoint = Endpoint::parse(&settings.url)?;
    let tls = if endpoint.tls {
        Some(Arc::new(
            tls::client_config(&settings.tls).map_err(|e| e.to_string())?,
        ))
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!(
        "edgegw-direct-{}-{}",
        std::process::id(),
        settings.name
    ));
    // The connection task owns an outbox; this one stays empty.
    let outbox =
        Outbox::open(&dir.join("unused.db"), settings.outbox.clone()).map_err(|e| e.to_string())?;
    let local = router.local_client(&format!("$edgegw/uplink-direct/{}", settings.name));
    let task = client::Task {
        settings,
        endpoint,
        tls,
        downlinks: Vec::new(),
        outbox: outbox.clone(),
        local: Arc::new(local),
        cancel: CancellationToken::new(),
    };
    let result = client::publish_direct(task, topic, payload, qos, count);
    outbox.close();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn a_renewed_tls_file_at_the_same_path_is_a_connection_change() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.pem");
        std::fs::write(&cert, "first").unwrap();
        let settings = super::UplinkSettings {
            name: "cloud".into(),
            url: "mqtts://127.0.0.1:8883".into(),
            client_id: "gw".into(),
            username: None,
            password: None,
            protocol: super::Protocol::V5,
            keepalive: std::time::Duration::from_secs(30),
            clean_start: false,
            tls: super::TlsSettings {
                ca: None,
                cert: Some(cert.clone()),
                key: None,
                server_name: None,
                alpn: Vec::new(),
            },
            forward: Vec::new(),
            subscribe: Vec::new(),
            outbox: edgegw_store::OutboxOptions::new("cloud"),
            inflight: 32,
            max_packet_size: None,
            reconnect_min: std::time::Duration::from_millis(100),
            reconnect_max: std::time::Duration::from_secs(5),
            io_driver: edgegw_broker::IoDriver::Epoll,
        };
        let before = super::connection_settings(&settings);
        assert_eq!(before, super::connection_settings(&settings));
        std::fs::write(&cert, "renewed").unwrap();
        assert_ne!(before, super::connection_settings(&settings));
        let mut forward_only = settings.clone();
        forward_only.forward.push(super::ForwardRule {
            from: "a/#".into(),
            to: "{topic}".into(),
            qos: 1,
            retain: false,
        });
        assert_eq!(
            super::connection_settings(&settings),
            super::connection_settings(&forward_only),
            "forward rules do not restart the connection"
        );
    }

    #[test]
    fn urls_parse_with_default_ports() {
        let e = Endpoint::parse("mqtts://example.com").unwrap();
        assert!(e.tls);
        assert_eq!((e.host.as_str(), e.port), ("example.com", 8883));
        let e = Endpoint::parse("mqtt://127.0.0.1:1999").unwrap();
        assert!(!e.tls);
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 1999));
        let e = Endpoint::parse("mqtts://[::1]:443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 443));
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("mqtt://x:port").is_err());
    }
}
