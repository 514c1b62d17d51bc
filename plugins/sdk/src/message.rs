use crate::Error;
use serde::{Serialize, de::DeserializeOwned};

/// One MQTT message as it reached the pipeline stage (the WIT record `message`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Topic name (no wildcards).
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// QoS it was published with: 0, 1 or 2.
    pub qos: u8,
    /// Whether it was published as retained.
    pub retain: bool,
    /// MQTT 5 content type, if set.
    pub content_type: Option<String>,
    /// MQTT 5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
}

impl Message {
    /// A QoS 0 message with no properties; for tests, mostly.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// The payload decoded from JSON into `T`. The error names the topic.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(format!("payload is not the JSON expected: {e}")).or_topic(&self.topic)
        })
    }

    /// The payload as a JSON value.
    pub fn json_value(&self) -> Result<serde_json::Value, Error> {
        self.json()
    }

    /// The payload as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| Error::new(format!("payload is not UTF-8: {e}")).or_topic(&self.topic))
    }

    /// The topic's levels (`a/b/c` gives `a`, `b`, `c`).
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.topic.split('/')
    }

    /// The first user property named `key`.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A message to emit (the WIT record `output`): QoS, retain and properties are the input's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Topic to emit on; `None` keeps the input message's topic.
    pub topic: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Output {
    /// An output on the input message's topic.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: None,
            payload: payload.into(),
        }
    }

    /// An output on the input message's topic with `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        Ok(Self::new(serde_json::to_vec(value)?))
    }

    /// The same output on another topic.
    pub fn to_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The payload decoded from JSON (for tests, mostly).
    pub fn json_value(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// Forwarding a message unchanged: same topic, same payload (moved, not copied).
impl From<Message> for Output {
    fn from(msg: Message) -> Self {
        Self::new(msg.payload)
    }
}
