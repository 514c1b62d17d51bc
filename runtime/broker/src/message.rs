//! The one message type every part of the gateway moves around.

use std::{sync::Arc, time::Instant};

pub use ntex_bytes::{ByteString, Bytes};

/// MQTT quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn label(self) -> &'static str {
        match self {
            QoS::AtMostOnce => "0",
            QoS::AtLeastOnce => "1",
            QoS::ExactlyOnce => "2",
        }
    }
}

impl From<ntex_mqtt::QoS> for QoS {
    fn from(q: ntex_mqtt::QoS) -> Self {
        match q {
            ntex_mqtt::QoS::AtMostOnce => QoS::AtMostOnce,
            ntex_mqtt::QoS::AtLeastOnce => QoS::AtLeastOnce,
            ntex_mqtt::QoS::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

impl From<QoS> for ntex_mqtt::QoS {
    fn from(q: QoS) -> Self {
        match q {
            QoS::AtMostOnce => ntex_mqtt::QoS::AtMostOnce,
            QoS::AtLeastOnce => ntex_mqtt::QoS::AtLeastOnce,
            QoS::ExactlyOnce => ntex_mqtt::QoS::ExactlyOnce,
        }
    }
}

/// MQTT 5 publish properties that travel with a message unchanged from publisher to
/// subscribers. Shared behind an `Arc` so fan-out does not copy them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_utf8: bool,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    /// Message expiry interval as the publisher set it, in seconds.
    pub message_expiry_secs: Option<u32>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// Who published a message: used for no-local and loop guards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A session of the broker (network client or in-process client), by session id.
    Session(u64),
    /// A will message of a session that is gone.
    Will(u64),
    /// Published by the broker itself (tests, `$SYS`).
    Broker,
}

/// A message on its way through the router. Cloning is cheap: payload and topic are
/// reference-counted, properties are shared.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Arc<Properties>,
    pub origin: Origin,
    /// When the router accepted it; message expiry counts from here.
    pub received: Instant,
    /// How many in-process stages (pipelines) produced it from an earlier message; pipelines
    /// stop at a limit, so two pipelines feeding each other cannot loop forever.
    pub hops: u8,
}

impl Message {
    pub fn new(topic: impl Into<ByteString>, payload: impl Into<Bytes>, qos: QoS) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain: false,
            properties: Arc::new(Properties::default()),
            origin: Origin::Broker,
            received: Instant::now(),
            hops: 0,
        }
    }

    pub fn with_retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    pub fn with_properties(mut self, properties: Properties) -> Self {
        self.properties = Arc::new(properties);
        self
    }

    /// Seconds left before the message expires; `None` when it never expires,
    /// `Some(0)` never happens: an expired message reports [`Message::is_expired`].
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let total = self.properties.message_expiry_secs?;
        let elapsed = now.saturating_duration_since(self.received).as_secs();
        let left = u64::from(total).saturating_sub(elapsed);
        Some(left.max(1) as u32)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        match self.properties.message_expiry_secs {
            Some(total) => {
                now.saturating_duration_since(self.received).as_secs() >= u64::from(total)
            }
            None => false,
        }
    }
}
