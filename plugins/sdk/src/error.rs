use std::fmt;

/// Why a rule failed on a message. The gateway sends the message to the pipeline's
/// dead-letter topic and logs this error with the plugin's name and the message's topic.
///
/// Errors leaving a [`rule`](crate::rule) function always carry the topic of the message
/// that failed (the attribute adds it), also in native tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    topic: Option<String>,
}

impl Error {
    /// An error with this text.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            topic: None,
        }
    }

    /// The error's text, without the topic.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The topic of the message that failed, once known.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// Sets the topic unless one is set already.
    pub fn or_topic(mut self, topic: impl Into<String>) -> Self {
        if self.topic.is_none() {
            self.topic = Some(topic.into());
        }
        self
    }

    /// The text the gateway receives: the host adds the topic itself, so only the message.
    #[cfg(target_family = "wasm")]
    pub(crate) fn into_message(self) -> String {
        self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.topic {
            Some(topic) => write!(f, "topic {topic:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Self::new(format!("JSON: {error}"))
    }
}
