//! The MQTT broker: listeners (TCP, TLS) on ntex-mqtt for MQTT 3.1.1 and 5.0, sessions, and
//! the router every other part of the gateway publishes through.
//!
//! This is the only crate that touches ntex types. What it exposes is plain Rust: a
//! [`Message`], a [`Router`] with [`LocalClient`]s for in-process parts, and [`Broker`] to
//! start and stop the listeners. See `ARCHITECTURE.md` in this directory.

pub mod message;
pub mod metrics;
pub mod router;
pub mod session;
pub mod topic;
pub mod tree;

pub use message::{ByteString, Bytes, Message, Origin, Properties, QoS};
pub use router::{AttachOptions, Attached, LocalClient, Router, RouterLimits, Routed, Will};
pub use session::{Delivery, Session};
pub use tree::SubOptions;
