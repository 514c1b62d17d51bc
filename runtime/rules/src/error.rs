use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong loading a plugin, creating a stage or calling it. Call
/// failures name the plugin and the message's topic; [`RuleError::result`] is the metric
/// label.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The engine could not be set up (a wasmtime configuration error).
    #[error("cannot start the WASM engine: {reason}")]
    Engine { reason: String },
    /// The file could not be read, is not a component, or does not fit the `rule` world.
    #[error("plugin {plugin:?}: cannot load {}: {reason}", path.display())]
    Load {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    /// Creating an instance or its `init` failed (an error from the plugin, a trap, a timeout).
    #[error("plugin {plugin:?}: init failed: {reason}")]
    Init { plugin: String, reason: String },
    /// The plugin returned an error for the message.
    #[error("plugin {plugin:?} returned an error for topic {topic:?}: {message}")]
    Error {
        plugin: String,
        topic: String,
        message: String,
    },
    /// The plugin trapped (a panic, `unreachable`, a stack overflow…). `detail` has the trap
    /// and the end of what the plugin wrote to stderr (a panic message, usually).
    #[error("plugin {plugin:?} trapped on topic {topic:?}: {detail}")]
    Trap {
        plugin: String,
        topic: String,
        detail: String,
    },
    /// The call ran past the plugin's time limit and was interrupted.
    #[error("plugin {plugin:?} ran past its time limit ({limit:?}) on topic {topic:?}")]
    Timeout {
        plugin: String,
        topic: String,
        limit: Duration,
    },
    /// The plugin tried to grow its memory past its limit.
    #[error("plugin {plugin:?} hit its memory limit ({limit} bytes) on topic {topic:?}")]
    MemoryLimit {
        plugin: String,
        topic: String,
        limit: usize,
    },
    /// The plugin emitted more outputs for one message than its `max_outputs`.
    #[error("plugin {plugin:?} emitted {count} outputs for topic {topic:?}; the limit is {limit}")]
    TooManyOutputs {
        plugin: String,
        topic: String,
        count: usize,
        limit: usize,
    },
}

impl RuleError {
    /// The `result` label of the invocation metric: `error`, `trap`, `timeout` or `limit`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Engine { .. } | Self::Load { .. } | Self::Init { .. } | Self::Error { .. } => {
                "error"
            }
            Self::Trap { .. } => "trap",
            Self::Timeout { .. } => "timeout",
            Self::MemoryLimit { .. } | Self::TooManyOutputs { .. } => "limit",
        }
    }

    /// Whether the instance was thrown away (the next call creates a fresh one).
    pub fn restarts_instance(&self) -> bool {
        matches!(
            self,
            Self::Trap { .. } | Self::Timeout { .. } | Self::MemoryLimit { .. }
        )
    }
}
