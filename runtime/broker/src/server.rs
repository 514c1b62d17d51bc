//! Listeners: binds sockets, builds the ntex-mqtt service (v3.1.1 and v5 on one port, with
//! optional rustls and optional WebSocket in front, see `websocket.rs`) and runs it on a
//! dedicated ntex system thread with one worker per core. Handshake failures (garbage, bad
//! CONNECT, TLS) never reach a connection's control service, so they are logged and counted
//! by the listener's layers: TLS here (`log_tls_error`), MQTT by the service that runs the
//! MQTT service (`WithAcks` in `acks.rs`, `Upgrader` in `websocket.rs`) with
//! [`log_handshake_error`].

use std::{
    fs::File,
    io::BufReader,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
};

use ntex::{
    SharedCfg,
    io::IoBoxed,
    service::{Pipeline, RequestState, Service},
    time::Seconds,
};
use ntex_mqtt::{MqttError, MqttServer, MqttServiceConfig, v3, v5};

use crate::{
    BrokerError,
    accept::{Accepted, ListenerEntry, MakeService, Workers},
    acks::WithAcks,
    auth::{AuthSettings, Authenticator, ListenerAuth},
    connection::{ConnectionLimits, Shared},
    metrics::BrokerMetrics,
    router::Router,
    websocket::{self, WebSocketSettings},
};

/// How often ntex samples the MQTT workers' scheduling latency, in milliseconds; its
/// watchdog reports a worker that made no progress for this plus 1 s (see the server
/// thread in [`Broker::start`]).
const STALL_SAMPLE_MS: usize = 1000;

/// Where and how one listener serves MQTT.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    pub bind: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// MQTT over WebSocket (inside TLS when `tls` is set).
    pub websocket: Option<WebSocketSettings>,
}

/// PEM files for a TLS listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// The client certificate's subject CN is the client's user name (needs `client_ca`).
    pub use_identity_as_username: bool,
}

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub listeners: Vec<ListenerSettings>,
    pub limits: ConnectionLimits,
    pub auth: AuthSettings,
    /// ntex worker threads; 0 means one per core.
    pub workers: usize,
    /// The kernel interface of the worker threads' I/O.
    pub io_driver: crate::IoDriver,
}

/// A listener after binding.
#[derive(Clone, Debug)]
pub struct BoundListener {
    pub addr: SocketAddr,
    pub tls: bool,
    pub websocket: Option<WebSocketSettings>,
}

impl BoundListener {
    /// The URL clients connect to: `mqtt://`, `mqtts://`, or for WebSocket `ws://` and
    /// `wss://` with the listener's path (`/mqtt` when any path is served).
    pub fn url(&self) -> String {
        match &self.websocket {
            None => format!(
                "{}://{}",
                if self.tls { "mqtts" } else { "mqtt" },
                self.addr
            ),
            Some(websocket) => format!(
                "{}://{}{}",
                if self.tls { "wss" } else { "ws" },
                self.addr,
                websocket.path.as_deref().unwrap_or("/mqtt")
            ),
        }
    }
}

/// The running listeners. Stop with [`Broker::stop`].
pub struct Broker {
    server: ntex_server::Server<Accepted>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    /// Each listener (kept to wake its acceptor) and its accept thread.
    acceptors: Vec<(TcpListener, JoinHandle<()>)>,
    stop: Arc<AtomicBool>,
    listeners: Vec<BoundListener>,
    shared: Arc<Shared>,
}

impl Broker {
    /// Binds every listener and starts serving. Fails before serving anything if a socket
    /// cannot be bound or a TLS file cannot be loaded.
    pub fn start(settings: BrokerSettings, router: Router) -> Result<Self, BrokerError> {
        settings.auth.acl.validate()?;
        let mut sockets = Vec::new();
        for listener in &settings.listeners {
            let tls = match &listener.tls {
                Some(files) => Some(Arc::new(load_tls(files)?)),
                None => None,
            };
            let socket = TcpListener::bind(listener.bind).map_err(|error| BrokerError::Bind {
                addr: listener.bind,
                error,
            })?;
            let addr = socket.local_addr().map_err(|error| BrokerError::Bind {
                addr: listener.bind,
                error,
            })?;
            let hibernate = settings.limits.hibernate_after.is_some()
                && settings.io_driver == crate::IoDriver::Epoll
                && listener.tls.is_none()
                && listener.websocket.is_none();
            let auth = ListenerAuth {
                identity_from_certificate: listener.tls.as_ref().is_some_and(|files| {
                    files.use_identity_as_username && files.client_ca.is_some()
                }),
                hibernate: hibernate.then_some(addr),
            };
            sockets.push((socket, addr, tls, auth, listener.websocket.clone()));
        }
        let listeners: Vec<BoundListener> = sockets
            .iter()
            .map(|(_, addr, tls, _, websocket)| BoundListener {
                addr: *addr,
                tls: tls.is_some(),
                websocket: websocket.clone(),
            })
            .collect();
        let workers = if settings.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            settings.workers
        };
        // Hibernation needs the descriptor ntex's epoll driver lets go of (io_uring's close
        // differs and is not supported).
        let parking = match settings.limits.hibernate_after {
            Some(_) if settings.io_driver == crate::IoDriver::Epoll => {
                match crate::accept::can_duplicate() {
                    Ok(()) => {
                        Some(crate::hibernate::ParkingLot::start().map_err(BrokerError::Thread)?)
                    }
                    Err(error) => {
                        tracing::warn!(
                            %error,
                            "Idle connections cannot hibernate here (broker.limits.hibernate_after): it needs Linux 5.6 or later and the pidfd_getfd system call, which a seccomp filter may refuse (systemd: SystemCallFilter=pidfd_getfd; Docker: a profile that allows it, or CAP_SYS_PTRACE). Set hibernate_after: 0 to silence this."
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            router,
            limits: settings.limits.clone(),
            auth: Authenticator::new(settings.auth),
            connections: AtomicUsize::new(0),
            next_client_number: std::sync::atomic::AtomicU64::new(1),
            parking,
        });
        let limits = settings.limits;
        let io_driver = settings.io_driver;
        let kept = shared.clone();

        let mut accept_sockets = Vec::new();
        let mut entries = Vec::new();
        let max_frame = websocket::max_frame_size(limits.max_packet_size);
        for (socket, addr, tls, auth, ws) in sockets {
            let cfg = service_config(&limits, ws.is_some());
            let note_descriptor = auth.hibernate.is_some();
            let shared = shared.clone();
            let make: MakeService = match (tls, ws) {
                (None, None) => Arc::new(move || {
                    Pipeline::new(
                        (),
                        WithAcks {
                            inner: mqtt_service(shared.clone(), auth),
                            listener: addr,
                        }
                        .map(|_| ())
                        .map_err(|_| ()),
                    )
                }),
                (Some(tls), None) => Arc::new(move || {
                    let shared = shared.clone();
                    Pipeline::new(
                        (),
                        Handshake::new(ntex_tls::rustls::TlsAcceptor::new(tls.clone()))
                            .map_err(move |error: std::io::Error| {
                                log_tls_error(addr, &error);
                                MqttError::<BrokerError>::from(error)
                            })
                            .and_then(WithAcks {
                                inner: mqtt_service(shared, auth),
                                listener: addr,
                            })
                            .map(|_| ())
                            .map_err(|_| ()),
                    )
                }),
                (None, Some(ws)) => Arc::new(move || {
                    let mqtt = mqtt_service(shared.clone(), auth);
                    Pipeline::new((), websocket::service(mqtt, addr, ws.clone(), max_frame))
                }),
                (Some(tls), Some(ws)) => Arc::new(move || {
                    let mqtt = mqtt_service(shared.clone(), auth);
                    Pipeline::new(
                        (),
                        Handshake::new(ntex_tls::rustls::TlsAcceptor::new(tls.clone()))
                            .map_err(move |error: std::io::Error| log_tls_error(addr, &error))
                            .and_then(websocket::service(mqtt, addr, ws.clone(), max_frame)),
                    )
                }),
            };
            entries.push(ListenerEntry {
                addr,
                cfg,
                make,
                note_descriptor,
            });
            accept_sockets.push(socket);
        }
        let workers_config = Workers {
            listeners: entries.into(),
        };

        let (started, server) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("edgegw-mqtt".into())
            .spawn(move || {
                // ntex samples each arbiter's scheduling latency on a timer and a watchdog
                // thread checks the samples for stalls, every 100 ms by default: some 30
                // wake-ups a second of an idle broker's core, each of which can delay a
                // message that arrives meanwhile. Once a second still reports a stall
                // (no progress for 2 s) with the task that caused it.
                ntex::rt::System::build()
                    .name("edgegw-mqtt")
                    .latency_interval(STALL_SAMPLE_MS)
                    .build(io_driver)
                    .block_on(async move {
                        let server = ntex_server::WorkerPool::new()
                            .name("edgegw-mqtt")
                            .workers(workers)
                            .disable_signals()
                            .graceful_shutdown_timeout(Seconds(5))
                            .run(workers_config);
                        let _ = started.send(server.clone());
                        server.await
                    })
            })
            .map_err(BrokerError::Thread)?;
        let server: ntex_server::Server<Accepted> = server.recv().map_err(|_| {
            BrokerError::Thread(std::io::Error::other(
                "the MQTT server thread exited at start",
            ))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut acceptors = Vec::new();
        for (index, socket) in accept_sockets.into_iter().enumerate() {
            let kept = socket.try_clone().map_err(BrokerError::Thread)?;
            let handle = crate::accept::spawn_acceptor(socket, index, server.clone(), stop.clone())
                .map_err(BrokerError::Thread)?;
            acceptors.push((kept, handle));
        }
        Ok(Self {
            server,
            thread: Some(thread),
            acceptors,
            stop,
            listeners,
            shared: kept,
        })
    }

    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// Applies new authentication settings and ACLs (a config reload): new CONNECTs are
    /// checked against them at once; open connections stay, each resolving its ACL again at
    /// its next PUBLISH or SUBSCRIBE, except those whose login the new settings refuse (user
    /// removed, password changed, anonymous access turned off), which are closed; and
    /// subscriptions the new ACL denies are removed, from offline sessions too. An invalid
    /// ACL is refused and nothing changes.
    pub fn reload_auth(&self, auth: AuthSettings) -> Result<crate::auth::Revoked, BrokerError> {
        auth.acl.validate()?;
        self.shared.auth.reload(auth);
        Ok(self.shared.auth.revoke_lost_access(&self.shared.router))
    }

    /// Stops accepting, closes connections (each ends its session as a disconnect would),
    /// and waits for the server thread.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for (listener, _) in &self.acceptors {
            crate::accept::wake_acceptor(listener);
        }
        let acceptors = std::mem::take(&mut self.acceptors);
        let _ = tokio::task::spawn_blocking(move || {
            for (_, handle) in acceptors {
                let _ = handle.join();
            }
        })
        .await;
        self.server.stop(true).await;
        if let Some(parked) = self.shared.parking.as_ref().and_then(|p| p.stop()) {
            let _ = tokio::task::spawn_blocking(move || parked.join()).await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn service_config(limits: &ConnectionLimits, websocket: bool) -> SharedCfg {
    // Write pages of 4 KiB, not ntex's 16 KiB: each connection keeps its drained page, and
    // most MQTT writes (acks, small publishes, batches of them) fit in 4 KiB. Larger payloads
    // go in as pages of their own either way.
    let io = ntex::io::IoConfig::new().set_write_size(ntex::util::BytePageSize::Size4);
    let cfg = SharedCfg::new("edgegw-mqtt").add(io).add(
        MqttServiceConfig::new()
            .set_max_qos(ntex_mqtt::QoS::ExactlyOnce)
            .set_max_size(limits.max_packet_size)
            // Announced as MQTT 5's Receive Maximum and enforced there by ntex-mqtt; on
            // 3.1.1 `AckGuard` enforces it (`AckGuard::v3` in `mqtt_service`, the same
            // value). `set_max_receive_size` is not set: only ntex-mqtt's own in-flight
            // middleware read it, replaced by `AckGuard` (`inflight::MAX_RECEIVE_SIZE`).
            .set_max_receive(limits.receive_maximum)
            // ntex-mqtt stops reading a connection while this many answers are pending
            // (default 64). A PUBLISH that must be durable holds its answer until the next
            // commit, so that default capped a publisher at 64 messages per commit interval
            // whatever its receive maximum (5.8k msg/s in the benchmark's persistent-session
            // line). Room for every PUBLISH the limits allow in flight, and ntex's 64 for
            // the rest (acks, pings, subscriptions).
            .set_max_queue(usize::from(limits.receive_maximum) + 64)
            .set_max_send(limits.max_inflight)
            .set_max_topic_alias(limits.topic_alias_maximum)
            .set_connect_timeout(Seconds(10))
            // A QoS 0 PUBLISH right before DISCONNECT (mosquitto_pub does this) is still
            // routed, as are QoS 1 and 2 publishes already read.
            .set_handle_qos_after_disconnect(Some(ntex_mqtt::QoS::ExactlyOnce))
            // Shared and wildcard filters are allowed; per-filter errors are ours.
            .set_check_subs_availability(false),
    );
    if websocket {
        cfg.add(websocket::http_config()).into()
    } else {
        cfg.into()
    }
}

/// Runs a handshake (TLS) in a box of its own, freed when the handshake ends. The service
/// after it in the chain runs for the connection's whole life, in a future that would
/// otherwise be as large as the handshake's state: rustls's was 2.1 KiB of every TLS
/// connection's 3.2.
struct Handshake<S> {
    inner: S,
}

impl<S> Handshake<S> {
    fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<St, Req, S: Service<St, Req>> Service<St, Req> for Handshake<S> {
    type Res = S::Res;
    type Error = S::Error;

    ntex::forward_bind!(St, inner);
    ntex::forward_shutdown!(St, inner);

    async fn ready(&self, ctx: ntex::service::Ctx<'_, Self, St>) -> Result<(), S::Error> {
        Box::pin(ctx.ready(&self.inner)).await
    }

    async fn call(
        &self,
        request: Req,
        ctx: ntex::service::Ctx<'_, Self, St>,
    ) -> Result<S::Res, S::Error> {
        Box::pin(ctx.call(&self.inner, request)).await
    }
}

fn log_tls_error(listener: SocketAddr, error: &std::io::Error) {
    BrokerMetrics::protocol_error("tls");
    tracing::info!(%listener, %error, "TLS handshake failed.");
}

/// The MQTT service for one connection: version detection, then v3.1.1 or v5. Its callers
/// log its failures ([`log_handshake_error`]): as a `map_err` layer here, the logging was
/// another 120 bytes in every connection's future.
fn mqtt_service<R: RequestState<IoBoxed, State = ()>>(
    shared: Arc<Shared>,
    auth: ListenerAuth,
) -> impl Service<(), R, Res = (), Error = MqttError<BrokerError>> {
    let receive_maximum = shared.limits.receive_maximum;
    let (s3, s5) = (shared.clone(), shared);
    MqttServer::new()
        .v3(v3::MqttServer::new(crate::v3::publish)
            .replace_middlewares(crate::connection::AckGuard::v3(receive_maximum))
            .protocol(crate::v3::protocol)
            .control(crate::v3::control)
            .build(async move |c: v3::Connect| crate::v3::connect(s3.clone(), auth, c).await))
        .v5(v5::MqttServer::new(crate::v5::publish)
            .replace_middlewares(crate::connection::AckGuard::v5())
            .protocol(crate::v5::protocol)
            .control(crate::v5::control)
            .build(async move |c: v5::Connect| crate::v5::connect(s5.clone(), auth, c).await))
}

pub(crate) fn log_handshake_error(listener: SocketAddr, error: &MqttError<BrokerError>) {
    use ntex_mqtt::error::MqttConnectError;
    match error {
        MqttError::Connect(MqttConnectError::Disconnected(_)) => {}
        MqttError::Connect(MqttConnectError::Timeout) => {
            BrokerMetrics::protocol_error("connect_timeout");
            tracing::info!(%listener, "Connection closed: no CONNECT in time.");
        }
        MqttError::Connect(MqttConnectError::Protocol(protocol)) => {
            let kind = crate::protocol_error_kind(protocol);
            BrokerMetrics::protocol_error(kind);
            tracing::warn!(%listener, kind, error = %protocol, "Connection closed at CONNECT: protocol error.");
        }
        other => {
            BrokerMetrics::protocol_error("handshake");
            tracing::warn!(%listener, error = %other, "Connection closed at CONNECT.");
        }
    }
}

fn load_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, BrokerError> {
    let tls_error = |path: &Path, message: String| BrokerError::Tls {
        path: path.to_path_buf(),
        message,
    };
    let open = |path: &Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| tls_error(path, format!("cannot open: {e}")))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(&files.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(&files.cert, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(&files.cert, "contains no PEM certificate".into()));
    }
    let key = rustls_pemfile::private_key(&mut open(&files.key)?)
        .map_err(|e| tls_error(&files.key, format!("not a PEM key file: {e}")))?
        .ok_or_else(|| {
            tls_error(
                &files.key,
                "contains no private key (PKCS#8, PKCS#1 or SEC1 PEM)".into(),
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&files.cert, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut open(ca)?) {
                let cert = cert.map_err(|e| tls_error(ca, format!("not a PEM file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_error(ca, format!("bad CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(tls_error(ca, "contains no CA certificate".into()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls_error(ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&files.key, format!("certificate and key do not match: {e}")))
}
