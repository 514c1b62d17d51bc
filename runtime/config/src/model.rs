//! The typed configuration. Every field here is a public config key: each one is documented
//! in `configs/gateway.yaml`, and unknown keys are rejected at load time.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    json::JsonText,
    schema::socket_addr,
    units::{ByteSize, Duration},
};

/// The whole gateway configuration (`gateway.yaml`).
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: Gateway,
    pub broker: Broker,
    pub nodes: Nodes,
    /// Cloud brokers that local messages are forwarded to, store-and-forward.
    pub uplinks: Vec<Uplink>,
    /// WebAssembly rule plugins, run by pipelines.
    pub plugins: Vec<PluginConfig>,
    /// Local messages through plugin stages to local topics and uplinks.
    pub pipelines: Vec<Pipeline>,
    pub metrics: Metrics,
    pub log: Log,
}

/// Top-level section names, in file order of the documented example.
pub const SECTIONS: &[&str] = &[
    "gateway",
    "broker",
    "nodes",
    "uplinks",
    "plugins",
    "pipelines",
    "metrics",
    "log",
];

/// This gateway's name and state.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    /// Names this gateway in logs, metrics and (later) uplink client ids.
    pub id: String,
    /// Directory for the gateway's state (`state.db`, uplink outboxes).
    pub data_dir: PathBuf,
    /// Minimum time between two commits of the state file: bounds fsyncs per second.
    /// QoS 1/2 publishes that must be durable wait up to this long for their ack. 0s to 1s.
    pub commit_interval: Duration,
    /// The kernel interface of the network threads (MQTT broker workers, uplinks): `epoll`
    /// or `io_uring` (falls back to epoll, with a warning, where the kernel refuses it).
    pub io_driver: IoDriver,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            id: "edgegw".into(),
            data_dir: PathBuf::from("./edgegw-data"),
            commit_interval: Duration::from_millis(10),
            io_driver: IoDriver::Epoll,
        }
    }
}

/// `gateway.io_driver`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    #[default]
    Epoll,
    IoUring,
}

/// The MQTT 3.1.1 / 5.0 broker.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    /// Where clients connect: MQTT over TCP, TLS, WebSocket or WebSocket inside TLS.
    /// Default: one plain listener on `127.0.0.1:1883`.
    #[schemars(length(min = 1))]
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

/// One port serving MQTT 3.1.1 and 5.0.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address and port, e.g. `0.0.0.0:1883`; port 0 picks a free port.
    #[schemars(schema_with = "socket_addr")]
    pub bind: SocketAddr,
    /// When present the listener speaks MQTT over TLS.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// When present the listener speaks MQTT over WebSocket (inside TLS when `tls` is set).
    #[serde(default, deserialize_with = "websocket_option")]
    #[schemars(with = "WebSocket")]
    pub websocket: Option<WebSocket>,
}

/// MQTT over WebSocket on a listener. `websocket: true` (or `{}`) serves the upgrade on
/// any request path; `websocket: { path: /mqtt }` only on that path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebSocket {
    /// The one request path served (the query string is ignored); `None`: any path.
    pub path: Option<String>,
}

/// `true`, `false`, null or the mapping.
impl JsonSchema for WebSocket {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "WebSocket".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`true`: WebSocket on any request path; `false` or absent: plain MQTT; `{ path: /mqtt }`: only that path.",
            "oneOf": [
                { "type": ["boolean", "null"] },
                generator.subschema_for::<WebSocketOptions>(),
            ],
        })
    }
}

/// The mapping form of `websocket:`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WebSocketOptions {
    /// The one request path served (exact match as sent, query string ignored; other paths
    /// get 404); default: any path.
    #[serde(default)]
    #[schemars(pattern(r"^/[!-\x22$->@-~]*$"))]
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

/// TLS (rustls) on a listener.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
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

/// Who may connect.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Accept clients that send no user name.
    pub allow_anonymous: bool,
    /// `user:argon2id-PHC` lines, made with `edgegw passwd FILE USER`.
    pub password_file: Option<PathBuf>,
    /// Failed logins from one address within `failure_window` before further CONNECTs
    /// from it are refused for `failure_window`; 0 turns this off.
    pub max_failures: u32,
    /// How long failed logins are counted, and how long an address is then refused.
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
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Acl {
    /// What happens when no rule applies.
    pub default: AclPermission,
    /// Checked in order; the first rule that applies decides.
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

/// One ACL rule: it applies when `user`, `client_id` and `action` fit and one of `topics`
/// does.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// `allow` or `deny` what the rule applies to.
    pub permission: AclPermission,
    /// `publish`, `subscribe` or `all`.
    pub action: AclAction,
    /// An exact user name, or `*` for every authenticated user; absent: every client,
    /// anonymous ones included.
    #[serde(default)]
    pub user: Option<String>,
    /// An exact client id, or `*`; absent: every client.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic filters; `%u` is the user name, `%c` the client id.
    #[schemars(length(min = 1))]
    pub topics: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclPermission {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

/// Broker-wide and per-client limits.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent client connections; further connections are refused.
    #[schemars(range(min = 1))]
    pub max_connections: u32,
    /// Largest MQTT packet accepted from a client (announced in v5 CONNACK); 64B to 256MiB.
    pub max_packet_size: ByteSize,
    /// Upper bound on the keepalive a client may ask for (v5: Server Keep Alive); whole
    /// seconds, 1s to 65535s.
    pub max_keepalive: Duration,
    /// QoS 1/2 publishes a client may have unacknowledged towards the broker (v5 CONNACK).
    #[schemars(range(min = 1))]
    pub receive_maximum: u16,
    /// QoS 1/2 publishes the broker keeps unacknowledged towards one client.
    #[schemars(range(min = 1))]
    pub max_inflight: u16,
    /// Messages queued per session (offline, or behind the in-flight window).
    #[schemars(range(min = 1))]
    pub max_queued: u32,
    /// Topic aliases accepted from a v5 client (announced in CONNACK).
    pub topic_alias_maximum: u16,
    /// Longest session expiry a v5 client may ask for.
    pub max_session_expiry: Duration,
    /// PUBLISH packets per second one connection may send; 0 = unlimited.
    pub max_publish_rate: u32,
    /// An MQTT connection on a plain TCP listener idle this long hibernates (its memory is
    /// given back until it has something to do); 0 = never.
    pub hibernate_after: Duration,
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
            hibernate_after: Duration::from_secs(30),
        }
    }
}

/// The node link: sensor nodes speaking MQTT-SN 1.2 over serial ports and BLE.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Nodes {
    /// Serial ports (USB serial adapters, PTYs); each is reopened with backoff when it
    /// disappears or cannot be opened.
    pub serial: Vec<SerialPort>,
    /// BLE nodes offering the UART service (Nordic UART Service UUIDs); each is connected,
    /// and connected again with backoff when the connection drops. Needs a gateway built with
    /// the `ble` feature, BlueZ (bluetoothd) and a Bluetooth adapter.
    pub ble: Vec<BleNode>,
    /// Topic ids (1 to 65534) nodes may use without REGISTER; `{node}` is replaced by the
    /// node's client id.
    #[schemars(extend("propertyNames" = { "pattern": "^[1-9][0-9]{0,4}$" }))]
    pub predefined_topics: BTreeMap<u16, String>,
    /// Simulated sensor nodes for demos and trying pipelines without hardware: each entry
    /// runs on a pseudo-terminal that the node link opens like a serial port.
    pub simulated: Vec<SimulatedNodes>,
}

/// Simulated nodes on one pseudo-terminal (what `node-sim` does, inside the gateway): each
/// publishes `{"temp": ..}` to `sensors/<id>/temp` every interval and logs what it receives
/// on `control/<id>/led`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulatedNodes {
    /// Node name: its client id and topic level (with `nodes` > 1: `<id>-1` … `<id>-N`
    /// behind a simulated forwarder).
    pub id: String,
    /// How many nodes; 1 to 100.
    #[serde(default = "default_simulated_nodes")]
    #[schemars(range(min = 1, max = 100))]
    pub nodes: u16,
    /// Time between two readings of each node; at least 10ms.
    #[serde(default = "default_simulated_interval")]
    pub interval: Duration,
    /// QoS of the readings: 0 or 1.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub qos: u8,
}

fn default_simulated_nodes() -> u16 {
    1
}

fn default_simulated_interval() -> Duration {
    Duration::from_secs(2)
}

/// A BLE node.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BleNode {
    /// The node's Bluetooth address, `AA:BB:CC:DD:EE:FF`.
    #[schemars(pattern(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"))]
    pub address: String,
    /// The Bluetooth adapter to use, e.g. `hci0`. Default: the system's default adapter.
    #[serde(default)]
    pub adapter: Option<String>,
}

/// A serial port with MQTT-SN nodes behind it.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Device path, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/...`.
    pub port: String,
    /// Bits per second.
    #[serde(default = "default_baud")]
    #[schemars(range(min = 1))]
    pub baud: u32,
}

fn default_baud() -> u32 {
    115_200
}

/// Prometheus metrics and health over HTTP.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of the HTTP listener for `/metrics` and `/healthz`.
    #[schemars(schema_with = "socket_addr")]
    pub bind: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9100".parse().expect("valid literal address"),
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
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

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A cloud broker the gateway forwards to (store-and-forward through an outbox) and takes
/// downlink messages from.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Names the uplink in logs, metrics, the outbox file and `uplink:<name>` outputs.
    pub name: String,
    /// `mqtts://host:port` (TLS, port 8883 by default) or `mqtt://host:port` (1883).
    #[schemars(pattern(r"^mqtts?://"))]
    pub url: String,
    /// Client id at the cloud broker; default: `gateway.id`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name at the cloud broker.
    #[serde(default)]
    pub username: Option<String>,
    /// The password, typically `${ENV_VAR}`; or use `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// A file whose content (trailing newline removed) is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// MQTT version spoken to the cloud broker: `5` or `3.1.1`.
    #[serde(default)]
    pub protocol: UplinkProtocol,
    /// MQTT keepalive towards the cloud broker; at most 65535s.
    #[serde(default = "default_uplink_keepalive")]
    pub keepalive: Duration,
    /// Start a new session at the cloud broker on every connect. `false` keeps the
    /// downlink subscriptions' queued messages across reconnects.
    #[serde(default)]
    pub clean_start: bool,
    /// TLS settings for `mqtts://`.
    #[serde(default)]
    pub tls: UplinkTls,
    /// Local topic filter → remote topic, QoS.
    #[serde(default)]
    pub forward: Vec<Forward>,
    /// Remote topic filter → local topic, QoS.
    #[serde(default)]
    pub subscribe: Vec<Downlink>,
    /// The on-disk queue of messages bound for the cloud broker.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// The cloud broker's maximum packet size, for brokers that cannot announce it (MQTT
    /// 3.1.1, where a broker closes the connection on a larger packet): a larger message is
    /// dropped and counted (`too_large`) instead of sent. With MQTT 5 the smaller of this
    /// and the broker's announced maximum applies. Default: none.
    #[serde(default)]
    pub max_packet_size: Option<ByteSize>,
    /// Messages sent and not yet acknowledged (capped by the broker's receive maximum).
    #[serde(default = "default_uplink_inflight")]
    #[schemars(range(min = 1))]
    pub inflight: u16,
    #[serde(default)]
    pub reconnect: Reconnect,
}

fn default_uplink_keepalive() -> Duration {
    Duration::from_secs(30)
}

fn default_uplink_inflight() -> u16 {
    32
}

/// `protocol:` accepts `5`, `"5"`, `5.0`, `3.1.1`, `"3.1.1"`, `311`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UplinkProtocol {
    V311,
    #[default]
    V5,
}

/// `5` as a number, `3.1.1` as a string (the schema's default shows it).
impl Serialize for UplinkProtocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::V5 => serializer.serialize_u8(5),
            Self::V311 => serializer.serialize_str("3.1.1"),
        }
    }
}

/// What the deserializer below accepts: 5 and 311 as numbers (5.0 too), the text forms as
/// strings.
impl JsonSchema for UplinkProtocol {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UplinkProtocol".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "MQTT version: `5` or `3.1.1`.",
            "oneOf": [
                { "type": "number", "enum": [5, 311] },
                {
                    "type": "string",
                    "pattern": r"^\s*(?:5|5\.0|v5|3\.1\.1|311|v3\.1\.1|v311)\s*$",
                    "examples": ["3.1.1"],
                },
            ],
        })
    }
}

impl<'de> Deserialize<'de> for UplinkProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};

        struct ProtocolVisitor;

        impl ProtocolVisitor {
            fn parse<E: de::Error>(text: &str) -> Result<UplinkProtocol, E> {
                match text.trim() {
                    "5" | "5.0" | "v5" => Ok(UplinkProtocol::V5),
                    "3.1.1" | "311" | "v3.1.1" | "v311" => Ok(UplinkProtocol::V311),
                    _ => Err(E::custom(format!(
                        "protocol must be 5 or 3.1.1, not `{text}`"
                    ))),
                }
            }
        }

        impl Visitor<'_> for ProtocolVisitor {
            type Value = UplinkProtocol;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("5 or 3.1.1")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<UplinkProtocol, E> {
                Self::parse(text)
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<UplinkProtocol, E> {
                Self::parse(&n.to_string())
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<UplinkProtocol, E> {
                Self::parse(&n.to_string())
            }

            fn visit_f64<E: de::Error>(self, n: f64) -> Result<UplinkProtocol, E> {
                Self::parse(&n.to_string())
            }
        }

        deserializer.deserialize_any(ProtocolVisitor)
    }
}

/// TLS towards the cloud broker.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkTls {
    /// CA certificates (PEM) that sign the cloud broker's certificate; default: the
    /// system's roots (`/etc/ssl/certs`).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, e.g. AWS IoT Core.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The name checked against the broker's certificate and sent as SNI, when it differs
    /// from the url's host.
    pub server_name: Option<String>,
    /// ALPN protocols, e.g. `[x-amzn-mqtt-ca]` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
}

/// A forward rule: local messages to the cloud broker.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Local topic filter (`+`, `#`).
    pub from: String,
    /// Remote topic template: `{topic}` is the local topic, `{1}`, `{2}`… its levels,
    /// `{2..}` the levels from the 2nd on. Default: `{topic}`.
    #[serde(default = "default_template")]
    pub to: String,
    /// QoS towards the cloud broker: 0, 1 or 2.
    #[serde(default = "default_uplink_qos")]
    #[schemars(range(max = 2))]
    pub qos: u8,
    /// Keep the retain flag of local messages upstream.
    #[serde(default)]
    pub retain: bool,
}

/// A downlink: messages from the cloud broker to the local broker.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Downlink {
    /// Remote topic filter subscribed at the cloud broker.
    pub remote: String,
    /// Local topic template, as in `forward.to`, applied to the remote topic.
    #[serde(default = "default_template")]
    pub local: String,
    /// QoS of the subscription at the cloud broker: 0, 1 or 2.
    #[serde(default = "default_uplink_qos")]
    #[schemars(range(max = 2))]
    pub qos: u8,
}

fn default_template() -> String {
    "{topic}".into()
}

fn default_uplink_qos() -> u8 {
    1
}

/// An uplink's outbox: bounds and durability.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Most bytes (topics and payloads) kept; at least 1KiB.
    pub max_bytes: ByteSize,
    /// Most messages kept.
    #[schemars(range(min = 1))]
    pub max_messages: u64,
    /// Drop messages older than this; absent: keep until forwarded or pushed out.
    pub max_age: Option<Duration>,
    /// When a bound is reached: `drop_oldest`, `drop_new`, or `block` (publishers' acks wait
    /// for room).
    pub on_full: OnFull,
    /// `always` (fsync per commit, commits as soon as anything waits), `batch` (at most one
    /// commit per `gateway.commit_interval`), `off` (no fsync: survives a crash of the
    /// gateway but not a power cut).
    pub fsync: FsyncPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: ByteSize(1 << 30),
            max_messages: 1_000_000,
            max_age: None,
            on_full: OnFull::DropOldest,
            fsync: FsyncPolicy::Batch,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    DropOldest,
    DropNew,
    Block,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    Always,
    Batch,
    Off,
}

/// Reconnect backoff: doubles from `min` to `max`, with up to 50% random jitter.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// First delay; above 0 and at most `max`.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

/// A WebAssembly rule plugin (a component of the `plugins/wit` world); pipeline stages name
/// it in `rules: - plugin: <name>`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Names the plugin in stages, logs and metrics.
    pub name: String,
    /// The component file (`.wasm`); relative paths are relative to the config file's
    /// directory. `builtin:NAME` is one of the example rules built into the gateway:
    /// `celsius-to-fahrenheit`, `threshold-alert`, `deadband`, `enrich`.
    pub path: PathBuf,
    #[serde(default)]
    pub limits: PluginLimits,
}

/// What one call of a plugin may use.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Time one call may take; 0 < time <= 10s.
    pub time: Duration,
    /// Cap on the plugin's linear memory, in bytes (written as a size, `16MiB`); 1MiB to 4GiB.
    #[serde(deserialize_with = "size_in_bytes")]
    #[schemars(with = "ByteSize", extend("default" = "16MiB"))]
    pub memory: u64,
    /// Messages one call may return; 1 to 10000.
    #[schemars(range(min = 1, max = 10_000))]
    pub max_outputs: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            time: Duration::from_millis(5),
            memory: ByteSize::mib(16).bytes(),
            max_outputs: 100,
        }
    }
}

/// `from: "sensors/#"` as well as `from: [ "sensors/#", "lab/#" ]`.
fn one_or_more<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    use serde::de::{self, Visitor};

    struct OneOrMore;

    impl<'de> Visitor<'de> for OneOrMore {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(
                "a topic filter or a list of them (quote a filter alone that reads as a number or true/false)",
            )
        }

        fn visit_str<E: de::Error>(self, filter: &str) -> Result<Self::Value, E> {
            Ok(vec![filter.to_owned()])
        }

        // No visit_bool/visit_i64/visit_f64: a number or boolean alone is refused (serde's
        // invalid-type error, with the quoting hint above) rather than turned into text. YAML
        // has typed it already and its text would not survive (`1.10` is 1.1, `0x10` is 16).

        // `from:` with nothing after it, or `~`: no filters, which validation reports as
        // "from is empty". Inside the list a `~` stays the text `~`, as for any text value.
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }

    deserializer.deserialize_any(OneOrMore)
}

fn size_in_bytes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(deserializer).map(ByteSize::bytes)
}

/// Local messages matching `from` go through the `rules` stages in order; what the last stage
/// returns is published to every `to` output.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Names the pipeline in logs, metrics and the default dead-letter topic.
    pub name: String,
    /// Local topic filters (`+`, `#`) whose messages enter the pipeline: one, or a list of
    /// at least one.
    #[serde(deserialize_with = "one_or_more")]
    #[schemars(schema_with = "crate::schema::one_or_more_filters")]
    pub from: Vec<String>,
    /// Plugin stages applied in order; empty: messages pass through unchanged.
    #[serde(default)]
    pub rules: Vec<RuleStage>,
    /// Where the messages leaving the last stage go; empty: they are dropped.
    #[serde(default)]
    pub to: Vec<PipelineOutput>,
    #[serde(default)]
    pub queue: PipelineQueue,
    /// Topic for messages a stage fails on; default `$edgegw/deadletter/<name>`.
    #[serde(default)]
    pub dead_letter: Option<String>,
}

impl Pipeline {
    /// The configured dead-letter topic, or `$edgegw/deadletter/<name>`.
    pub fn dead_letter_topic(&self) -> String {
        match &self.dead_letter {
            Some(topic) => topic.clone(),
            None => format!("$edgegw/deadletter/{}", self.name),
        }
    }
}

/// One stage of a pipeline: a plugin and the configuration its `init` receives.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(from = "RuleStageFields")]
pub struct RuleStage {
    /// A `plugins:` entry's name.
    pub plugin: String,
    /// The stage's `config:` value as JSON text; `null` when absent.
    pub config_json: String,
}

/// `RuleStage` as written in the file.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleStageFields {
    /// A `plugins:` entry's name.
    plugin: String,
    /// Any value, handed to the plugin's init as JSON; absent: null.
    #[serde(default)]
    config: Option<JsonText>,
}

impl From<RuleStageFields> for RuleStage {
    fn from(fields: RuleStageFields) -> Self {
        Self {
            plugin: fields.plugin,
            config_json: fields.config.map_or_else(|| "null".into(), |json| json.0),
        }
    }
}

/// Where a pipeline publishes, written `local:<topic template>` or `uplink:<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineOutput {
    /// Published to the local broker on the topic the template makes of the message's topic
    /// (`{topic}`, `{1}`, `{2..}` as in uplink `forward.to`).
    Local(String),
    /// Forwarded through the named uplink's outbox.
    Uplink(String),
}

impl std::fmt::Display for PipelineOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(template) => write!(f, "local:{template}"),
            Self::Uplink(name) => write!(f, "uplink:{name}"),
        }
    }
}

impl JsonSchema for PipelineOutput {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PipelineOutput".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`local:<topic template>` publishes to the local broker (`{topic}`, `{1}`, `{2..}` as in uplink `forward.to`); `uplink:<name>` forwards through that uplink's outbox.",
            "type": "string",
            "pattern": r"^\s*(?:local|uplink):",
            "examples": ["local:processed/{topic}", "uplink:cloud"],
        })
    }
}

impl<'de> Deserialize<'de> for PipelineOutput {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};

        const FORMS: &str = "`local:<topic template>` (publish to the local broker, e.g. `local:processed/{topic}`) or `uplink:<name>` (forward through an uplink, e.g. `uplink:cloud`)";

        struct OutputVisitor;

        impl Visitor<'_> for OutputVisitor {
            type Value = PipelineOutput;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a quoted string: {FORMS}")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<PipelineOutput, E> {
                let text = text.trim();
                if let Some(template) = text.strip_prefix("local:") {
                    Ok(PipelineOutput::Local(template.trim().into()))
                } else if let Some(name) = text.strip_prefix("uplink:") {
                    Ok(PipelineOutput::Uplink(name.trim().into()))
                } else {
                    Err(E::custom(format!(
                        "output `{text}` is neither form: write {FORMS}"
                    )))
                }
            }
        }

        deserializer.deserialize_str(OutputVisitor)
    }
}

/// The bounded queue in front of a pipeline's first stage.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineQueue {
    /// Messages waiting for the pipeline; 1 to 1000000.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub capacity: usize,
    /// `block` (the publisher waits: backpressure), `drop_oldest` or `drop_new` (counted).
    pub on_full: OnFull,
}

impl Default for PipelineQueue {
    fn default() -> Self {
        Self {
            capacity: 1000,
            on_full: OnFull::Block,
        }
    }
}
