//! The MQTT broker: listeners (TCP, TLS, WebSocket) on ntex-mqtt for MQTT 3.1.1 and 5.0,
//! sessions, and the router every other part of the gateway publishes through.
//!
//! This is the only crate that touches ntex types. What it exposes is plain Rust: a
//! [`Message`], a [`Router`] with [`LocalClient`]s for in-process parts, and [`Broker`] to
//! start and stop the listeners. See `ARCHITECTURE.md` in this directory.

pub mod acl;
pub mod auth;
pub mod message;
pub mod metrics;
mod persist;
pub mod router;
pub mod session;
pub mod topic;
pub mod tree;

/// What a [`Sink`] hands back for a message it will make durable (or admit) later.
pub use edgegw_store::{StoreError, Ticket};
pub use message::{ByteString, Bytes, Message, Origin, Properties, QoS};
pub use router::{
    AttachOptions, Attached, LocalClient, Offer, Routed, Router, RouterLimits, Sink, SinkId, Will,
};
pub use session::{Credential, Delivery, Session};
pub use tree::SubOptions;

mod accept;
mod acks;
mod connection;
mod driver;
mod hibernate;
mod inflight;
mod order;
mod server;
mod v3;
mod v5;
mod websocket;

pub use acl::{AclRule, AclSettings, Action as AclAction, Permission, Selector};
pub use auth::{AuthSettings, PasswordFile, PasswordFileError};
pub use connection::ConnectionLimits;
pub use driver::IoDriver;
pub use server::{BoundListener, Broker, BrokerSettings, ListenerSettings, TlsFiles};
pub use websocket::WebSocketSettings;

/// Errors of the broker crate.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS file {path}: {message}")]
    Tls {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot start the MQTT server thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Acl(#[from] acl::AclError),
    #[error("reading a PUBLISH payload failed: {0}")]
    Payload(String),
    #[error("state file: {0}")]
    Store(String),
    #[error("invalid topic: {0}")]
    Topic(#[from] topic::TopicError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

impl From<std::convert::Infallible> for BrokerError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// A publish handler error never turns into an ack: it closes the connection.
impl TryFrom<BrokerError> for ntex_mqtt::v5::PublishAck {
    type Error = BrokerError;

    fn try_from(error: BrokerError) -> Result<Self, BrokerError> {
        Err(error)
    }
}

/// A metric label for a protocol error.
pub(crate) fn protocol_error_kind(error: &ntex_mqtt::error::MqttProtocolError) -> &'static str {
    use ntex_mqtt::error::MqttProtocolError as E;
    match error {
        E::Decode(_) => "malformed",
        E::Encode(_) => "encode",
        E::ProtocolViolation(_) => "violation",
        E::KeepAliveTimeout => "keepalive_timeout",
        E::ReadTimeout => "read_timeout",
        E::WriteTimeout => "write_timeout",
    }
}
