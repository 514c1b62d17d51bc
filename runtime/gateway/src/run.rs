//! `edgegw run`: wires the parts together and waits for a signal.

use anyhow::Context as _;
use edgegw_broker::{
    AuthSettings, Broker, BrokerSettings, ConnectionLimits, ListenerSettings, Router, RouterLimits,
    TlsFiles, WebSocketSettings,
};
use edgegw_config::{Config, LogFormat};
use edgegw_store::{Store, StoreOptions};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// ntex logs connection-level details at info; keep them at warn unless asked.
/// Cranelift and wasmtime log every compiled function at debug: keep them at warn too.
const QUIET_DEPENDENCIES: &str = "ntex=warn,ntex_io=warn,ntex_mqtt=warn,ntex_server=warn,ntex_rt=warn,ntex_net=warn,ntex_tls=warn,cranelift_codegen=warn,cranelift_frontend=warn,cranelift_wasm=warn,regalloc2=warn,wasmtime=warn,wasmtime_cranelift=warn,wasmtime_environ=warn,wasmtime_internal_cranelift=warn,wasmtime_internal_environ=warn,wasmtime_internal_jit_icache_coherence=warn,wasmtime_wasi=warn,wasmparser=warn,wit_parser=warn";

/// Changes the log level while running (SIGHUP applies `log.level` from the new config).
pub struct LogControl {
    filter: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// `RUST_LOG` was set: it wins over the config, at start and on reload.
    from_env: bool,
    level: std::sync::Mutex<String>,
}

impl LogControl {
    /// Applies `level` (a `log.level` value) unless `RUST_LOG` rules; says whether it changed.
    pub fn set_level(&self, level: &str) -> anyhow::Result<bool> {
        if self.from_env {
            return Ok(false);
        }
        let mut current = self.level.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if *current == level {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(format!("{QUIET_DEPENDENCIES},{level}"))
            .with_context(|| format!("log.level {level:?} is not a valid filter"))?;
        self.filter
            .reload(filter)
            .context("cannot change the log filter")?;
        *current = level.to_string();
        Ok(true)
    }
}

/// Sets up logging: the configured format and level (or `RUST_LOG`), plus the ring of recent
/// warnings and errors of the gateway's own modules (and dependencies' errors) that the
/// status page shows.
pub fn init_tracing(log: &edgegw_config::Log) -> LogControl {
    use tracing_subscriber::{Layer as _, filter::LevelFilter, prelude::*};
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => (EnvFilter::new(from_env), true),
        _ => (
            EnvFilter::new(format!("{QUIET_DEPENDENCIES},{}", log.level)),
            false,
        ),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // The level filters what is printed only: the status page's ring sees every warning.
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(
            edgegw_telemetry::recent_errors_layer().with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    // Dependencies' warnings are noise on the status page unless they are errors.
                    *meta.level() == tracing::Level::ERROR
                        || (*meta.level() == tracing::Level::WARN
                            && meta.target().starts_with("edgegw"))
                })
                // Without this hint the subscriber's maximum level is TRACE: every `debug!`
                // and `trace!` (ntex logs each packet through `log`) is then built and
                // offered to the filters, which cost 15-20% of the broker's throughput.
                .with_max_level_hint(LevelFilter::WARN),
            ),
        )
        .init();
    LogControl {
        filter: handle,
        from_env,
        level: std::sync::Mutex::new(log.level.clone()),
    }
}

pub fn run(
    config: Config,
    auth: AuthSettings,
    config_path: Option<std::path::PathBuf>,
    log: LogControl,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edgegw")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, auth, config_path, log))
}

async fn serve(
    config: Config,
    auth: AuthSettings,
    config_path: Option<std::path::PathBuf>,
    log: LogControl,
) -> anyhow::Result<()> {
    let systemd = crate::systemd::Notifier::from_env();
    // From here on a stop or reload signal is kept until the loop below takes it.
    let mut signals = Signals::new();
    let embedded = config_path.is_none();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = if embedded { "embedded default" } else { "file" },
        "{}",
        config.summary()
    );
    raise_file_limit(config.broker.limits.max_connections);
    let telemetry = edgegw_telemetry::Telemetry::install().context("cannot set up metrics")?;
    std::fs::create_dir_all(&config.gateway.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (gateway.data_dir)",
            config.gateway.data_dir.display()
        )
    })?;

    let shutdown = CancellationToken::new();
    let metrics_addr = telemetry
        .serve(config.metrics.bind, shutdown.child_token())
        .await?;
    tracing::info!(
        status = %format!("http://{metrics_addr}/"),
        metrics = %format!("http://{metrics_addr}/metrics"),
        "Status page and metrics listening."
    );

    let limits = &config.broker.limits;
    let state_path = config.gateway.data_dir.join("state.db");
    let (store, snapshot) = Store::open(
        &state_path,
        StoreOptions {
            commit_interval: config.gateway.commit_interval.as_std(),
        },
    )
    .context("cannot open the state file; the gateway does not start with empty state")?;
    // `edgegw reload` asks through here (one gateway per data directory, as for the state
    // file).
    let (control, requests) = tokio::sync::mpsc::channel(4);
    let socket = crate::control::start(&config.gateway.data_dir, control, shutdown.child_token())?;
    tracing::info!(socket = %socket.display(), "Control socket listening (edgegw reload).");
    signals.control = Some(requests);
    let router = Router::with_store(
        RouterLimits {
            max_queued: limits.max_queued as usize,
            max_session_expiry_secs: u32::try_from(limits.max_session_expiry.as_secs())
                .unwrap_or(u32::MAX),
        },
        store.clone(),
        snapshot,
    );
    let settings = BrokerSettings {
        listeners: config
            .broker
            .listeners
            .iter()
            .map(|l| ListenerSettings {
                bind: l.bind,
                tls: l.tls.as_ref().map(|t| TlsFiles {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    client_ca: t.client_ca.clone(),
                    use_identity_as_username: t.use_identity_as_username,
                }),
                websocket: l.websocket.as_ref().map(|w| WebSocketSettings {
                    path: w.path.clone(),
                }),
            })
            .collect(),
        limits: ConnectionLimits {
            max_connections: limits.max_connections as usize,
            max_packet_size: u32::try_from(limits.max_packet_size.bytes()).unwrap_or(u32::MAX),
            max_keepalive_secs: u16::try_from(limits.max_keepalive.as_secs()).unwrap_or(u16::MAX),
            receive_maximum: limits.receive_maximum,
            max_inflight: limits.max_inflight,
            topic_alias_maximum: limits.topic_alias_maximum,
            max_publish_rate: limits.max_publish_rate,
            hibernate_after: Some(limits.hibernate_after.as_std()).filter(|after| !after.is_zero()),
        },
        auth,
        workers: 0,
        io_driver: io_driver(config.gateway.io_driver),
    };
    // Uplinks before the listeners: their forward rules must see the first publish.
    let mut uplinks: Vec<edgegw_uplink::Uplink> = Vec::new();
    for uplink in &config.uplinks {
        let settings = uplink_settings(&config, uplink)?;
        uplinks.push(
            edgegw_uplink::Uplink::start(settings, router.clone(), &config.gateway.data_dir)
                .with_context(|| format!("cannot start uplink `{}`", uplink.name))?,
        );
    }
    // Pipelines too: their filters must see the first publish.
    let engine = if config.plugins.is_empty() {
        None
    } else {
        Some(edgegw_rules::Engine::new().context("cannot start the WASM engine for plugins")?)
    };
    let pipelines = {
        let engine = engine.clone();
        let config = config.clone();
        let router = router.clone();
        let outputs = crate::pipelines::uplink_outputs(&uplinks);
        tokio::task::spawn_blocking(move || -> anyhow::Result<edgegw_pipeline::Pipelines> {
            let specs = crate::pipelines::specs(engine.as_ref(), &config)?;
            Ok(edgegw_pipeline::Pipelines::start(router, specs, outputs)?)
        })
        .await
        .context("pipeline start-up panicked")?
        .context("cannot start the pipelines")?
    };
    let pipelines = std::sync::Arc::new(pipelines);
    let broker = Broker::start(settings, router.clone()).context("cannot start the MQTT broker")?;
    for listener in broker.listeners() {
        tracing::info!(url = %listener.url(), "MQTT listening (3.1.1 and 5.0).");
    }
    let (simulated_ports, simulated) = crate::simulated::start(&config.nodes.simulated, &shutdown)?;
    let nodes = edgegw_nodes::NodeLink::start(
        edgegw_nodes::NodesSettings {
            serial: config
                .nodes
                .serial
                .iter()
                .map(|s| edgegw_nodes::SerialSettings {
                    port: s.port.clone(),
                    baud: s.baud,
                })
                .chain(simulated_ports)
                .collect(),
            ble: config
                .nodes
                .ble
                .iter()
                .map(|b| edgegw_nodes::BleSettings {
                    address: b.address.clone(),
                    adapter: b.adapter.clone(),
                })
                .collect(),
            predefined_topics: config.nodes.predefined_topics.clone(),
            ..edgegw_nodes::NodesSettings::default()
        },
        router.clone(),
        shutdown.child_token(),
    );
    telemetry.set_identity(identity(&config, &broker));
    telemetry.set_ready(true);
    systemd.notify("READY=1\nSTATUS=Ready.");
    if let Some(period) = systemd.watchdog() {
        // Pinged from the async runtime: a stalled runtime misses the deadline and systemd
        // restarts the gateway.
        let shutdown = shutdown.child_token();
        let systemd = crate::systemd::Notifier::from_env();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => systemd.notify("WATCHDOG=1"),
                }
            }
        });
        tracing::info!(period = ?period, "systemd watchdog enabled.");
    }
    tracing::info!(status = %format!("http://{metrics_addr}/"), "Ready.");

    let mut engine = engine;
    let mut running = config;
    while let Signal::Reload(reply) = signals.next().await {
        systemd.notify("RELOADING=1\nSTATUS=Reloading the config.");
        let outcome = reload(
            config_path.as_deref(),
            &mut running,
            &mut engine,
            &pipelines,
            &mut uplinks,
            &router,
            &broker,
            &telemetry,
            &log,
        )
        .await;
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
        systemd.notify("READY=1\nSTATUS=Ready.");
    }
    systemd.notify("STOPPING=1\nSTATUS=Shutting down.");
    tracing::info!("Shutting down.");
    telemetry.set_ready(false);
    // Nodes first: their sessions end before the broker and the state file close.
    simulated.stop();
    nodes.stop().await;
    drop(simulated);
    broker.stop().await;
    // Pipelines finish their queues (their outputs may still reach uplinks).
    if let Some(pipelines) = std::sync::Arc::into_inner(pipelines) {
        let _ = tokio::task::spawn_blocking(move || pipelines.stop()).await;
    }
    // Uplinks commit their outboxes; what is not forwarded yet goes on after a restart.
    let _ = tokio::task::spawn_blocking(move || {
        for uplink in uplinks {
            uplink.stop();
        }
    })
    .await;
    // Commit what is pending and stop the writer thread (off the async workers).
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    shutdown.cancel();
    let _ = std::fs::remove_file(&socket);
    tracing::info!("Stopped.");
    Ok(())
}

/// Maps an uplink's config onto its settings (reads `password_file`).
fn uplink_settings(
    config: &Config,
    uplink: &edgegw_config::Uplink,
) -> anyhow::Result<edgegw_uplink::UplinkSettings> {
    use edgegw_config::{FsyncPolicy, OnFull, UplinkProtocol};
    let password = match (&uplink.password, &uplink.password_file) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "uplink `{}`: cannot read password_file {}",
                    uplink.name,
                    path.display()
                )
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
        (None, None) => None,
    };
    let outbox = &uplink.outbox;
    Ok(edgegw_uplink::UplinkSettings {
        io_driver: io_driver(config.gateway.io_driver),
        name: uplink.name.clone(),
        url: uplink.url.clone(),
        client_id: uplink
            .client_id
            .clone()
            .unwrap_or_else(|| config.gateway.id.clone()),
        username: uplink.username.clone(),
        password,
        protocol: match uplink.protocol {
            UplinkProtocol::V311 => edgegw_uplink::Protocol::V311,
            UplinkProtocol::V5 => edgegw_uplink::Protocol::V5,
        },
        keepalive: uplink.keepalive.as_std(),
        clean_start: uplink.clean_start,
        tls: edgegw_uplink::TlsSettings {
            ca: uplink.tls.ca.clone(),
            cert: uplink.tls.cert.clone(),
            key: uplink.tls.key.clone(),
            server_name: uplink.tls.server_name.clone(),
            alpn: uplink.tls.alpn.clone(),
        },
        forward: uplink
            .forward
            .iter()
            .map(|f| edgegw_uplink::ForwardRule {
                from: f.from.clone(),
                to: f.to.clone(),
                qos: f.qos,
                retain: f.retain,
            })
            .collect(),
        subscribe: uplink
            .subscribe
            .iter()
            .map(|d| edgegw_uplink::DownlinkRule {
                remote: d.remote.clone(),
                local: d.local.clone(),
                qos: d.qos,
            })
            .collect(),
        outbox: edgegw_store::OutboxOptions {
            max_messages: outbox.max_messages,
            max_bytes: outbox.max_bytes.bytes(),
            max_age: outbox.max_age.map(|d| d.as_std()),
            on_full: match outbox.on_full {
                OnFull::DropOldest => edgegw_store::OnFull::DropOldest,
                OnFull::DropNew => edgegw_store::OnFull::DropNew,
                OnFull::Block => edgegw_store::OnFull::Block,
            },
            fsync: match outbox.fsync {
                FsyncPolicy::Always => edgegw_store::Fsync::Always,
                FsyncPolicy::Batch => edgegw_store::Fsync::Batch,
                FsyncPolicy::Off => edgegw_store::Fsync::Off,
            },
            commit_interval: config.gateway.commit_interval.as_std(),
            ..edgegw_store::OutboxOptions::new(uplink.name.clone())
        },
        inflight: uplink.inflight,
        // Validated at load: at most 256 MiB.
        max_packet_size: uplink
            .max_packet_size
            .map(|max| u32::try_from(max.bytes()).unwrap_or(u32::MAX)),
        reconnect_min: uplink.reconnect.min.as_std(),
        reconnect_max: uplink.reconnect.max.as_std(),
    })
}

/// Each connection is a file descriptor: raise the soft limit to the hard one so
/// `max_connections` can be reached, and say so when even that is too low.
fn raise_file_limit(max_connections: u32) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // Listeners, the state file, metrics and logs need some descriptors too.
            let needed = u64::from(max_connections) + 64;
            if limit < needed {
                tracing::warn!(
                    limit,
                    max_connections,
                    "Open-file limit is below broker.limits.max_connections; raise LimitNOFILE (systemd) or ulimit -n."
                );
            } else {
                tracing::debug!(limit, "Open-file limit.");
            }
        }
        Err(error) => tracing::warn!(%error, "Cannot raise the open-file limit."),
    }
}

enum Signal {
    Stop,
    /// SIGHUP (no one to answer) or `edgegw reload` (the answer goes back to it).
    Reload(Option<crate::control::Reply>),
}

/// SIGINT, SIGTERM and SIGHUP, listened to for the whole run: a signal that arrives while a
/// reload is in progress is kept for the next wait, not lost.
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
    /// Reload requests from the control socket, once it listens.
    control: Option<tokio::sync::mpsc::Receiver<crate::control::Reply>>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(%error, "Cannot watch {name}.");
                None
            }
        };
        Self {
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            hangup: listen(SignalKind::hangup(), "SIGHUP; reload needs a restart"),
            control: None,
        }
    }

    async fn next(&mut self) -> Signal {
        async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        async fn request(
            control: Option<&mut tokio::sync::mpsc::Receiver<crate::control::Reply>>,
        ) -> crate::control::Reply {
            match control {
                Some(control) => match control.recv().await {
                    Some(reply) => reply,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(self.terminate.as_mut()) => Signal::Stop,
            () = recv(self.interrupt.as_mut()) => Signal::Stop,
            () = recv(self.hangup.as_mut()) => Signal::Reload(None),
            reply = request(self.control.as_mut()) => Signal::Reload(Some(reply)),
        }
    }
}

/// SIGHUP: re-reads the config file and applies what can change live: pipelines and
/// plugins (swapped atomically), uplinks (added, removed, forward rules swapped, connection
/// settings applied by reconnecting; their outboxes are kept), broker users, anonymous access
/// and ACLs, the log level. A config with errors, a password file that cannot be read, a
/// plugin that fails to load or initialise, or a new uplink that cannot start leaves
/// everything running as it is. Changes that need a restart (listeners, limits, state
/// directory, outbox settings …) are named in the log.
#[allow(clippy::too_many_arguments)]
async fn reload(
    path: Option<&std::path::Path>,
    running: &mut Config,
    engine: &mut Option<edgegw_rules::Engine>,
    pipelines: &std::sync::Arc<edgegw_pipeline::Pipelines>,
    uplinks: &mut Vec<edgegw_uplink::Uplink>,
    router: &Router,
    broker: &Broker,
    telemetry: &edgegw_telemetry::Telemetry,
    log: &LogControl,
) -> Result<String, String> {
    let reloads = |result: &'static str| {
        metrics::counter!(edgegw_telemetry::names::PIPELINE_RELOADS, "result" => result)
            .increment(1);
    };
    let Some(path) = path else {
        tracing::warn!("Reload: running on the embedded default config; nothing to reload.");
        return Err(
            "the gateway runs on its embedded default config: nothing to reload (start it with -c FILE)"
                .into(),
        );
    };
    tracing::info!(config = %path.display(), "Reloading the config.");
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            reloads("failed");
            tracing::error!(config = %path.display(), problems = errors.0.len(), "Reload refused; everything keeps running as it was:\n{errors}");
            return Err(format!(
                "reload refused, everything keeps running as it was; {} problem{} in {}:\n{errors}",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" },
                path.display()
            ));
        }
    };
    let auth = match crate::auth::broker_auth(&config) {
        Ok(auth) => auth,
        Err(error) => {
            reloads("failed");
            tracing::error!("Reload refused; everything keeps running as it was: {error}");
            return Err(format!(
                "reload refused, everything keeps running as it was:\n{error}"
            ));
        }
    };
    let mut uplink_settings_list = Vec::new();
    for uplink in &config.uplinks {
        match uplink_settings(&config, uplink) {
            // The network threads keep the driver they started with (`gateway` needs a
            // restart), restarted uplinks too.
            Ok(settings) => uplink_settings_list.push(edgegw_uplink::UplinkSettings {
                io_driver: io_driver(running.gateway.io_driver),
                ..settings
            }),
            Err(error) => {
                reloads("failed");
                tracing::error!("Reload refused; everything keeps running as it was: {error:#}");
                return Err(format!(
                    "reload refused, everything keeps running as it was: {error:#}"
                ));
            }
        }
    }
    if engine.is_none() && !config.plugins.is_empty() {
        match edgegw_rules::Engine::new() {
            Ok(new) => *engine = Some(new),
            Err(error) => {
                reloads("failed");
                tracing::error!(%error, "Reload refused: cannot start the WASM engine; everything keeps running as it was.");
                return Err(format!(
                    "reload refused, cannot start the WASM engine: {error}; everything keeps running as it was"
                ));
            }
        }
    }
    let result = {
        let engine = engine.clone();
        let pipelines = pipelines.clone();
        let config = config.clone();
        let router = router.clone();
        let mut list = std::mem::take(uplinks);
        tokio::task::spawn_blocking(move || {
            // A panic must not take the running uplinks with it: they come back either way.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply_pipelines_and_uplinks(
                    engine.as_ref(),
                    &config,
                    &pipelines,
                    &router,
                    &mut list,
                    uplink_settings_list,
                )
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the reload panicked")));
            (list, result)
        })
        .await
    };
    let (count, restart_uplinks) = match result {
        Ok((list, Ok(done))) => {
            *uplinks = list;
            done
        }
        Ok((list, Err(error))) => {
            *uplinks = list;
            reloads("failed");
            tracing::error!("Reload failed; everything keeps running as it was: {error:#}");
            return Err(format!(
                "reload failed, everything keeps running as it was: {error:#}"
            ));
        }
        Err(error) => {
            reloads("failed");
            tracing::error!(%error, "Reload panicked; the pipelines and uplinks may be stopped: restart the gateway.");
            return Err(format!(
                "reload panicked ({error}); the pipelines and uplinks may be stopped: restart the gateway"
            ));
        }
    };
    let auth_problem = match broker.reload_auth(auth) {
        Ok(revoked) => {
            tracing::info!(
                connections_closed = revoked.connections,
                subscriptions_removed = revoked.subscriptions,
                "Broker auth (password file re-read, anonymous access) and ACLs reloaded."
            );
            None
        }
        Err(error) => {
            tracing::error!(%error, "Broker auth and ACLs not reloaded; the old ones stay.");
            Some(error.to_string())
        }
    };
    match log.set_level(&config.log.level) {
        Ok(true) => tracing::info!(level = %config.log.level, "Log level changed."),
        Ok(false) => {}
        Err(error) => tracing::warn!("log.level not changed: {error:#}"),
    }
    let mut needs_restart: Vec<String> = restart_only_changes(running, &config)
        .into_iter()
        .map(str::to_string)
        .collect();
    needs_restart.extend(restart_uplinks);
    reloads("ok");
    if needs_restart.is_empty() {
        tracing::info!(pipelines = count, uplinks = uplinks.len(), "Reloaded.");
    } else {
        tracing::warn!(
            pipelines = count,
            uplinks = uplinks.len(),
            sections = %needs_restart.join(", "),
            "Reloaded pipelines, plugins, uplinks, broker auth and ACLs, and the log level; these other changes take effect only after a restart."
        );
    }
    let mut shown = identity(&config, broker);
    // gateway.id changes only with a restart.
    shown.gateway_id.clone_from(&running.gateway.id);
    telemetry.set_identity(shown);
    *running = config;
    let mut summary = format!(
        "reloaded {}: {count} pipeline{}, {} uplink{}, broker users and ACLs, log level",
        path.display(),
        if count == 1 { "" } else { "s" },
        uplinks.len(),
        if uplinks.len() == 1 { "" } else { "s" },
    );
    if let Some(problem) = auth_problem {
        summary.push_str(&format!(
            "; but broker auth and ACLs were NOT reloaded (the old ones stay): {problem}"
        ));
    }
    if !needs_restart.is_empty() {
        summary.push_str(&format!(
            "; these changes take effect only after a restart: {}",
            needs_restart.join(", ")
        ));
    }
    Ok(summary)
}

/// What the status page says about the gateway.
fn identity(config: &Config, broker: &Broker) -> edgegw_telemetry::Identity {
    edgegw_telemetry::Identity {
        gateway_id: config.gateway.id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        listeners: broker.listeners().iter().map(|l| l.url()).collect(),
        pipelines: config.pipelines.iter().map(|p| p.name.clone()).collect(),
        uplinks: config.uplinks.iter().map(|u| u.name.clone()).collect(),
    }
}

/// The blocking part of a reload: loads plugins, starts new uplinks, swaps the pipelines,
/// reconfigures kept uplinks and stops removed ones. Fails with nothing changed until the
/// pipelines are swapped. Returns the pipeline count and the uplink settings that need a
/// restart.
fn apply_pipelines_and_uplinks(
    engine: Option<&edgegw_rules::Engine>,
    config: &Config,
    pipelines: &edgegw_pipeline::Pipelines,
    router: &edgegw_broker::Router,
    uplinks: &mut Vec<edgegw_uplink::Uplink>,
    settings: Vec<edgegw_uplink::UplinkSettings>,
) -> anyhow::Result<(usize, Vec<String>)> {
    let specs = crate::pipelines::specs(engine, config)?;
    let count = specs.len();
    // New uplinks first, so pipelines can output to them.
    let mut started: Vec<edgegw_uplink::Uplink> = Vec::new();
    let mut kept = Vec::new();
    for s in settings {
        if uplinks.iter().any(|u| u.name() == s.name) {
            kept.push(s);
            continue;
        }
        let name = s.name.clone();
        match edgegw_uplink::Uplink::start(s, router.clone(), &config.gateway.data_dir) {
            Ok(uplink) => started.push(uplink),
            Err(error) => {
                for uplink in started {
                    uplink.stop();
                }
                return Err(anyhow::anyhow!(error).context(format!("cannot start uplink `{name}`")));
            }
        }
    }
    let names: Vec<&str> = config.uplinks.iter().map(|u| u.name.as_str()).collect();
    let outputs = crate::pipelines::uplink_outputs(
        started
            .iter()
            .chain(uplinks.iter().filter(|u| names.contains(&u.name()))),
    );
    if let Err(error) = pipelines.reload_with_uplinks(specs, Some(outputs)) {
        for uplink in started {
            uplink.stop();
        }
        return Err(error.into());
    }
    // From here on the new pipelines run: apply the rest, reporting what fails.
    let mut restart = Vec::new();
    let (keep, removed): (Vec<_>, Vec<_>) = std::mem::take(uplinks)
        .into_iter()
        .partition(|u| names.contains(&u.name()));
    *uplinks = keep;
    for uplink in uplinks.iter_mut() {
        let Some(settings) = kept.iter().find(|s| s.name == uplink.name()).cloned() else {
            continue;
        };
        match uplink.reconfigure(settings) {
            Ok(done) => {
                if done.forward || done.reconnected {
                    tracing::info!(
                        uplink = uplink.name(),
                        forward_rules = done.forward,
                        reconnected = done.reconnected,
                        "Uplink reconfigured."
                    );
                }
                if done.outbox_needs_restart {
                    restart.push(format!("uplinks.{}.outbox", uplink.name()));
                }
            }
            Err(error) => tracing::error!(
                uplink = uplink.name(),
                %error,
                "Uplink not reconfigured; it keeps its old settings."
            ),
        }
    }
    for uplink in removed {
        let queued = uplink.handle().stats().messages;
        if queued > 0 {
            tracing::warn!(
                uplink = uplink.name(),
                queued,
                "Uplink removed from the config with messages not yet forwarded; they stay in its outbox file and go out if it is configured again."
            );
        }
        tracing::info!(
            uplink = uplink.name(),
            "Uplink removed from the config; stopping it (its outbox file stays)."
        );
        uplink.stop();
    }
    uplinks.extend(started);
    Ok((count, restart))
}

/// `gateway.io_driver` for the broker and uplink threads.
fn io_driver(driver: edgegw_config::IoDriver) -> edgegw_broker::IoDriver {
    match driver {
        edgegw_config::IoDriver::Epoll => edgegw_broker::IoDriver::Epoll,
        edgegw_config::IoDriver::IoUring => edgegw_broker::IoDriver::IoUring,
    }
}

/// The changed parts of the config that a reload does not apply, by key.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
    check(
        "broker.listeners",
        debug(&old.broker.listeners) != debug(&new.broker.listeners),
    );
    check(
        "broker.limits",
        debug(&old.broker.limits) != debug(&new.broker.limits),
    );
    check("gateway", debug(&old.gateway) != debug(&new.gateway));
    check("nodes", debug(&old.nodes) != debug(&new.nodes));
    check("metrics", debug(&old.metrics) != debug(&new.metrics));
    check("log.format", old.log.format != new.log.format);
    changed
}

#[cfg(test)]
mod tests {
    use tracing::level_filters::LevelFilter;

    /// The status page's ring takes the gateway's warnings whatever level is printed, and
    /// only errors from dependencies; and its filter does not lift the subscriber's maximum
    /// level, so with `log.level: error` a `debug!` or `trace!` (ntex logs every packet at
    /// trace) stops at the global level check instead of being built for the filters.
    #[test]
    fn status_ring_takes_warnings_without_lifting_the_max_level() {
        if std::env::var_os("RUST_LOG").is_some() {
            eprintln!("SKIPPED: RUST_LOG is set, it replaces the configured level this test sets");
            return;
        }
        let log = edgegw_config::Log {
            level: "error".into(),
            ..Default::default()
        };
        let _control = super::init_tracing(&log);
        assert_eq!(LevelFilter::current(), LevelFilter::WARN);
        tracing::warn!(target: "edgegw_gateway::probe", "probe: gateway warning");
        tracing::warn!(target: "ntex_io::probe", "probe: dependency warning");
        tracing::error!(target: "ntex_io::probe", "probe: dependency error");
        tracing::debug!(target: "edgegw_gateway::probe", "probe: gateway debug");
        let events = edgegw_telemetry::recent_events();
        let seen = |text: &str| events.iter().any(|e| e.message.contains(text));
        assert!(seen("probe: gateway warning"), "{events:?}");
        assert!(seen("probe: dependency error"), "{events:?}");
        assert!(!seen("probe: dependency warning"), "{events:?}");
        assert!(!seen("probe: gateway debug"), "{events:?}");
    }
}
