//! The WASM rule plugin host: loads rule plugins (WebAssembly components of the
//! `edgegw:rule/rule` world in `plugins/wit/`), caches their compiled code on disk, and runs
//! messages through them under limits. The only crate that uses wasmtime.
//!
//! - [`Engine`]: one per process. Owns the wasmtime engine, the linker (WASI p2, locked down,
//!   plus the `host` interface) and the epoch ticker thread that bounds call time.
//! - [`Plugin`]: one compiled component ([`Plugin::load`]), with its [`Limits`]. Cheap to clone,
//!   shared by every stage that uses it.
//! - [`Stage`]: one instance of a plugin for one pipeline stage, created with the stage's
//!   config (the plugin's `init`), reused for every message ([`Stage::call`]). Never
//!   instantiated per message. After a trap, timeout or memory limit the instance is dropped
//!   and a fresh one (with `init` again) serves the next message.
//!
//! No broker types here: a message is a [`RuleMessage`] (borrowed fields), results are
//! [`Output`]s, or for a batch [`Verdicts`] (flat vectors a worker reuses, borrowed
//! [`OutputRef`]s). Calls block the calling thread for up to the plugin's time limit: run them on
//! pipeline worker threads, not on network threads (nor directly inside an async task).
//!
//! [`plugin_test`] and [`scaffold`] serve `edgegw plugin test` and `edgegw plugin new`;
//! [`testing::build_plugins`] builds the SDK's examples and the test fixtures for tests;
//! [`bench::per_call`] measures the cost of one stage.

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../plugins/wit",
        world: "edgegw:rule/rule",
        // Messages go in as borrowed fields (no copy on the host side); outputs come back owned.
        ownership: Borrowing { duplicate_if_necessary: true },
        additional_derives: [PartialEq, Eq],
    });

    impl Rule {
        /// `on-batch` with the batch lowered by [`crate::lower`] and the results lifted by
        /// [`crate::lift`] (the generated `call_on_batch`, with other Rust types for the same
        /// WIT types).
        pub(crate) fn call_on_batch_fast<S: wasmtime::AsContextMut>(
            &self,
            mut store: S,
            msgs: &[crate::lower::Batched<'_>],
        ) -> wasmtime::Result<crate::lift::LiftedBatch>
        where
            <S as wasmtime::AsContext>::Data: Send,
        {
            #[allow(unsafe_code)]
            // SAFETY: the function's type was checked against the world's `on-batch` when the
            // component was instantiated; `Batched` has that parameter's type and
            // `LiftedBatch` the result's (their `typecheck`s are the generated types').
            let callee = unsafe {
                wasmtime::component::TypedFunc::<
                    (&[crate::lower::Batched<'_>],),
                    (crate::lift::LiftedBatch,),
                >::new_unchecked(self.on_batch)
            };
            let (results,) = callee.call(store.as_context_mut(), (msgs,))?;
            Ok(results)
        }
    }
}

pub mod bench;
mod cache;
mod engine;
mod error;
mod lift;
mod lower;
mod metrics;
mod plugin;
mod scaffold;
mod stage;
mod stdio;
pub mod testing;
mod verdicts;

pub use bindings::edgegw::rule::host::Level;
pub use engine::{EPOCH_TICK, Engine};
pub use error::RuleError;
pub use plugin::{Limits, Plugin, WIT_VERSION};
pub use scaffold::{ScaffoldError, scaffold, scaffold_with_sdk, sdk_dir};
pub use stage::{KV_MAX_BYTES, KV_MAX_KEYS, MAX_BATCH, Stage};
pub use verdicts::{OutputRef, Outputs, Verdicts};

/// A message going into a rule: the WIT record `message`, fields borrowed from the caller.
pub use bindings::edgegw::rule::types::Message as RuleMessage;
/// A message a rule emits: the WIT record `output`. `topic: None` keeps the input's topic;
/// QoS, retain and properties are the input's.
pub use bindings::edgegw::rule::types::Output;

impl<'a> RuleMessage<'a> {
    /// A QoS 0, not retained message without properties.
    pub fn new(topic: &'a str, payload: &'a [u8]) -> Self {
        Self {
            topic,
            payload,
            qos: 0,
            retain: false,
            content_type: None,
            user_properties: &[],
        }
    }
}

/// Runs one message through a plugin, as `edgegw plugin test` does: loads `path` (no cache,
/// default limits), creates a stage with `config_json` (`"null"` for none) and calls it once
/// with a QoS 0 message on `topic`.
pub fn plugin_test(
    path: &std::path::Path,
    config_json: &str,
    topic: &str,
    payload: &[u8],
) -> Result<Vec<Output>, RuleError> {
    let wasm = std::fs::read(path).map_err(|e| RuleError::Load {
        plugin: plugin_name(path),
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    plugin_test_bytes(path, &wasm, config_json, topic, payload)
}

/// As [`plugin_test`] for a component in memory; `path` names it.
pub fn plugin_test_bytes(
    path: &std::path::Path,
    wasm: &[u8],
    config_json: &str,
    topic: &str,
    payload: &[u8],
) -> Result<Vec<Output>, RuleError> {
    let engine = Engine::new()?;
    let name = plugin_name(path);
    let plugin = Plugin::load_bytes(&engine, &name, path, wasm, Limits::default(), None)?;
    let mut stage = Stage::new(&plugin, "plugin-test", config_json)?;
    stage.call(&RuleMessage::new(topic, payload))
}

fn plugin_name(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map_or_else(|| "plugin".to_owned(), |s| s.to_string_lossy().into_owned());
    stem.rsplit(':').next().unwrap_or("plugin").to_owned()
}

#[cfg(test)]
mod tests;
