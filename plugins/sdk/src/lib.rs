//! Write edgegw rule plugins in Rust.
//!
//! A rule is one function, marked [`rule`], that takes a [`Message`] and returns the messages
//! to emit; an optional function marked [`init`] receives the pipeline stage's `config:` (as
//! JSON) once, before any message:
//!
//! ```
//! use edgegw_plugin_sdk::{Error, Message, Output};
//!
//! #[edgegw_plugin_sdk::init]
//! fn init(config: serde_json::Value) -> Result<(), String> {
//!     // Check and keep the config (e.g. in a `thread_local!`).
//!     let _ = config;
//!     Ok(())
//! }
//!
//! #[edgegw_plugin_sdk::rule]
//! fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
//!     // Forward the message unchanged; an empty Vec drops it; an Err sends it to the
//!     // pipeline's dead-letter topic.
//!     Ok(vec![msg.into()])
//! }
//! # fn main() {}
//! ```
//!
//! Build the crate (`crate-type = ["cdylib"]`) with `cargo build --release --target
//! wasm32-wasip2` and the `.wasm` file is a component for the gateway. The same crate also
//! builds natively, where the host capabilities ([`log`], [`clock`], [`kv`]) have stand-ins, so
//! `cargo test` tests the rule's logic by calling the functions directly.
//!
//! The contract with the gateway is the WIT world `edgegw:rule/rule` in `plugins/wit/`. The
//! gateway reuses one instance per pipeline stage: state kept in memory (a `thread_local!`,
//! say) persists between messages, until a trap (panic), timeout or memory limit makes the
//! gateway re-create the instance; [`kv`] survives that.

// The WIT glue names this crate by its full path, from inside it too.
extern crate self as edgegw_plugin_sdk;

mod error;
// The global allocator of the WebAssembly build; natively only its tests use it.
#[cfg_attr(not(target_family = "wasm"), allow(dead_code))]
mod pool;
mod host;
mod message;
pub mod template;

pub use edgegw_plugin_sdk_macros::{init, rule};
pub use error::Error;
pub use message::{Message, Output};
pub use serde_json;
pub use template::TopicTemplate;

/// Log lines in the gateway's log, tagged with the plugin and the pipeline.
pub mod log {
    pub use crate::host::Level;

    /// Writes one line at `level`.
    pub fn log(level: Level, text: impl AsRef<str>) {
        crate::host::log(level, text.as_ref());
    }
    /// Writes one line at trace level.
    pub fn trace(text: impl AsRef<str>) {
        log(Level::Trace, text);
    }
    /// Writes one line at debug level.
    pub fn debug(text: impl AsRef<str>) {
        log(Level::Debug, text);
    }
    /// Writes one line at info level.
    pub fn info(text: impl AsRef<str>) {
        log(Level::Info, text);
    }
    /// Writes one line at warn level.
    pub fn warn(text: impl AsRef<str>) {
        log(Level::Warn, text);
    }
    /// Writes one line at error level.
    pub fn error(text: impl AsRef<str>) {
        log(Level::Error, text);
    }
}

/// The wall clock.
pub mod clock {
    /// Milliseconds since the Unix epoch (UTC), from the gateway's clock.
    pub fn now_ms() -> u64 {
        crate::host::now_ms()
    }

    /// Native builds only: fixes what [`now_ms`] returns on this thread (`None`: the system
    /// clock again), for deterministic tests.
    #[cfg(not(target_family = "wasm"))]
    pub fn set_fixed_now_ms(now: Option<u64>) {
        crate::host::set_fixed_now_ms(now);
    }
}

/// A small key-value store kept by the gateway for this pipeline stage. Unlike memory, it
/// survives the re-creation of the instance after a trap, timeout or memory limit. Bounded:
/// [`kv::MAX_KEYS`] keys and [`kv::MAX_BYTES`] of keys and values in all.
///
/// Natively (tests) it is a map per thread with the same bounds.
pub mod kv {
    use crate::Error;
    use serde::{Serialize, de::DeserializeOwned};

    /// Most keys the store holds.
    pub const MAX_KEYS: usize = 4096;
    /// Most bytes (keys plus values) the store holds.
    pub const MAX_BYTES: usize = 1 << 20;

    /// The value of `key`, if set.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        crate::host::kv_get(key)
    }

    /// Sets `key`; an error when the store's bounds would be exceeded (nothing changes then).
    pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
        crate::host::kv_set(key, value).map_err(Error::new)
    }

    /// Removes `key`, if set.
    pub fn delete(key: &str) {
        crate::host::kv_delete(key);
    }

    /// The value of `key` decoded from JSON; `None` when unset or not valid JSON for `T`.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Sets `key` to `value` encoded as JSON.
    pub fn set_json<T: Serialize>(key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::new(format!("kv {key}: {e}")))?;
        set(key, &bytes)
    }

    /// Native builds only: empties this thread's store (between tests, say).
    #[cfg(not(target_family = "wasm"))]
    pub fn clear() {
        crate::host::kv_clear();
    }
}

#[doc(hidden)]
#[path = "glue.rs"]
pub mod __private;
