//! The typed configuration. Every field here is a public config key: each one is documented
//! in `configs/gateway.yaml`, and unknown keys are rejected at load time.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use crate::units::{ByteSize, Duration};

/// The whole gateway configuration (`gateway.yaml`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: Gateway,
    pub broker: Broker,
    pub nodes: Nodes,
    pub metrics: Metrics,
    pub log: Log,
}

/// Top-level section names, in file order of the documented example.
pub const SECTIONS: &[&str] = &["gateway", "broker", "nodes", "metrics", "log"];

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    /// Names this gateway in logs, metrics and (later) uplink client ids.
    pub id: String,
    /// Where the state file lives.
    pub data_dir: PathBuf,
    /// Minimum time between two commits of the state file: bounds fsyncs per second.
    /// QoS 1/2 publishes that must be durable wait up to this long for their ack.
    pub commit_interval: Duration,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            id: "edgegw".into(),
            data_dir: PathBuf::from("./edgegw-data"),
            commit_interval: Duration::from_millis(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub listeners: Vec<Listener>,
    pub auth: Auth,
    pub acl: Acl,
    pub limits: Limits,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            listeners: vec![Listener {
                bind: "127.0.0.1:1883".parse().expect("valid literal address"),
                tls: None,
                websocket: None,
            }],
            auth: Auth::default(),
            acl: Acl::default(),
            limits: Limits::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address and port, e.g. `0.0.0.0:1883`; port 0 picks a free port.
    pub bind: SocketAddr,
    /// When present the listener speaks MQTT over TLS.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// When present the listener speaks MQTT over WebSocket (inside TLS when `tls` is set).
    #[serde(default, deserialize_with = "websocket_option")]
    pub websocket: Option<WebSocket>,
}

/// MQTT over WebSocket on a listener. `websocket: true` (or `{}`) serves the upgrade on
/// any request path; `websocket: { path: /mqtt }` only on that path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebSocket {
    /// The one request path served (the query string is ignored); `None`: any path.
    pub path: Option<String>,
}

/// The mapping form of `websocket:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebSocketOptions {
    #[serde(default)]
    path: Option<String>,
}

/// `websocket:` is `true`/`false` or a mapping; `false` and null mean plain MQTT.
fn websocket_option<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<WebSocket>, D::Error> {
    use serde::de::{self, Visitor};

    struct WebSocketVisitor;

    impl<'de> Visitor<'de> for WebSocketVisitor {
        type Value = Option<WebSocket>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("`true`, `false` or a mapping such as `{ path: /mqtt }`")
        }

        fn visit_bool<E: de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(WebSocket::default))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }

        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let options =
                WebSocketOptions::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok(Some(WebSocket { path: options.path }))
        }
    }

    deserializer.deserialize_any(WebSocketVisitor)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The client certificate's subject CN is the client's user name (no password
    /// needed); requires `client_ca`.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Accept clients that send no user name.
    pub allow_anonymous: bool,
    /// `user:argon2id-PHC` lines, made with `edgegw passwd FILE USER`.
    pub password_file: Option<PathBuf>,
    /// Failed logins from one address within `failure_window` before further CONNECTs
    /// from it are refused for `failure_window`; 0 turns this off.
    pub max_failures: u32,
    pub failure_window: Duration,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            password_file: None,
            max_failures: 5,
            failure_window: Duration::from_secs(60),
        }
    }
}

/// Access control: the first rule that applies decides, else `default`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Acl {
    pub default: AclPermission,
    pub rules: Vec<AclRule>,
}

impl Default for Acl {
    fn default() -> Self {
        Self {
            default: AclPermission::Allow,
            rules: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub permission: AclPermission,
    pub action: AclAction,
    /// An exact user name, or `*` for every authenticated user; absent: every client,
    /// anonymous ones included.
    #[serde(default)]
    pub user: Option<String>,
    /// An exact client id, or `*`; absent: every client.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic filters; `%u` is the user name, `%c` the client id.
    pub topics: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclPermission {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent client connections; further connections are refused.
    pub max_connections: u32,
    /// Largest MQTT packet accepted from a client (announced in v5 CONNACK).
    pub max_packet_size: ByteSize,
    /// Upper bound on the keepalive a client may ask for (v5: Server Keep Alive).
    pub max_keepalive: Duration,
    /// QoS 1/2 publishes a client may have unacknowledged towards the broker (v5 CONNACK).
    pub receive_maximum: u16,
    /// QoS 1/2 publishes the broker keeps unacknowledged towards one client.
    pub max_inflight: u16,
    /// Messages queued per session (offline, or behind the in-flight window).
    pub max_queued: u32,
    /// Topic aliases accepted from a v5 client (announced in CONNACK).
    pub topic_alias_maximum: u16,
    /// Longest session expiry a v5 client may ask for.
    pub max_session_expiry: Duration,
    /// PUBLISH packets per second one connection may send; 0 = unlimited.
    pub max_publish_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_packet_size: ByteSize::mib(1),
            max_keepalive: Duration::from_secs(60),
            receive_maximum: 20,
            max_inflight: 32,
            max_queued: 1000,
            topic_alias_maximum: 32,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_publish_rate: 0,
        }
    }
}

/// The node link: sensor nodes speaking MQTT-SN 1.2 over serial ports.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nodes {
    /// Serial ports (USB serial adapters, PTYs); each is reopened with backoff when it
    /// disappears or cannot be opened.
    pub serial: Vec<SerialPort>,
    /// Topic ids nodes may use without REGISTER; `{node}` is replaced by the node's client id.
    pub predefined_topics: BTreeMap<u16, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Device path, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/...`.
    pub port: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
}

fn default_baud() -> u32 {
    115_200
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of the HTTP listener for `/metrics` and `/healthz`.
    pub bind: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9100".parse().expect("valid literal address"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A tracing filter: `info`, `debug`, or per module, e.g. `info,edgegw_broker=debug`.
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}
