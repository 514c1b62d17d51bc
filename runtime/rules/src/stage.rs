use crate::bindings::Rule;
use crate::bindings::edgegw::rule::{host, types};
use crate::engine::EPOCH_TICK;
use crate::metrics::StageMetrics;
use crate::stdio::GuestOutput;
use crate::{Output, Plugin, RuleError, RuleMessage, Verdicts};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Most keys in a stage's kv store (`host.kv-*` in the WIT).
pub const KV_MAX_KEYS: usize = 4096;
/// Most bytes (keys plus values) in a stage's kv store.
pub const KV_MAX_BYTES: usize = 1 << 20;
/// Most messages in one `on-batch` call ([`Stage::call_batch`]). It bounds how long a looping
/// plugin holds a batch (its time limit times this) before the messages run one by one.
pub const MAX_BATCH: usize = 32;
/// Longest log line a plugin can write through `host.log`; longer ones are cut.
const MAX_LOG_TEXT: usize = 1024;

/// One plugin instance serving one pipeline stage: created with the stage's config (the
/// plugin's `init`), then [`call`](Stage::call)ed for every message, reusing the instance and
/// its memory. After a trap, timeout or memory limit the instance is dropped and the next call
/// creates a fresh one (with `init` again); the stage's kv store is kept.
///
/// `Send`, not `Sync`: one worker thread calls it at a time.
pub struct Stage {
    plugin: Plugin,
    pipeline: Arc<str>,
    config: String,
    /// `None` after a fault, until the next call re-creates it.
    instance: Option<Instance>,
    /// The kv store while there is no instance (else it is in the instance's store).
    kv: Kv,
    metrics: StageMetrics,
    /// False once the plugin's `on-batch` returned the wrong number of results: a broken
    /// export, so this stage calls `on-message` from then on rather than paying for both.
    batches: bool,
}

struct Instance {
    store: Store<StageState>,
    rule: Rule,
}

impl Stage {
    /// Creates the instance and calls the plugin's `init` with `config_json` (the stage's
    /// `config:` as JSON; `"null"` when there is none). `pipeline` labels logs and metrics.
    pub fn new(plugin: &Plugin, pipeline: &str, config_json: &str) -> Result<Self, RuleError> {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(config_json) {
            return Err(RuleError::Init {
                plugin: plugin.name().to_owned(),
                reason: format!("config is not JSON: {e}"),
            });
        }
        let mut stage = Self {
            plugin: plugin.clone(),
            pipeline: pipeline.into(),
            config: config_json.to_owned(),
            instance: None,
            kv: Kv::default(),
            metrics: StageMetrics::new(pipeline, plugin.name()),
            batches: true,
        };
        stage.instance = Some(stage.instantiate()?);
        Ok(stage)
    }

    /// The plugin this stage runs.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Runs one message through the plugin: the outputs, in order (empty: drop the message),
    /// or why not. Blocks for at most about the plugin's time limit (plus the re-creation of a
    /// faulted instance, bounded by [`Limits::init_time`](crate::Limits::init_time)).
    pub fn call(&mut self, msg: &RuleMessage<'_>) -> Result<Vec<Output>, RuleError> {
        let started = Instant::now();
        let result = self.call_inner(msg, started);
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.result(),
        };
        self.metrics.invocations(label, 1);
        self.metrics.duration(started.elapsed());
        if let Err(error) = &result {
            self.report(error, msg.topic);
        }
        result
    }

    /// Runs several messages through the plugin, in order: a result for each, as
    /// [`call`](Stage::call) gives it. Messages go to the plugin's `on-batch` in groups (at
    /// most [`MAX_BATCH`] messages and a sixteenth of the memory limit in topics and payloads),
    /// one call each, which costs far less than a call per message. Differences from calling
    /// one by one, all around faults:
    /// - A group's time limit is the plugin's limit times the number of messages in it: a
    ///   slow message among fast ones can pass where alone it would time out.
    /// - When a group faults (trap, timeout, memory limit) or the plugin returns the wrong
    ///   number of results, no result of the group is kept: its key-value store changes are
    ///   undone, the instance is re-created and the group's messages run again one by one.
    ///   Only the faulting message fails, but the messages before it in the group run on the
    ///   fresh instance (memory state as after a restart, which one by one only the messages
    ///   after the fault would see), and their log lines appear twice.
    /// - A plugin whose `on-batch` returned the wrong number of results is not trusted with
    ///   another batch: the stage calls `on-message` only from then on.
    pub fn call_batch(&mut self, msgs: &[RuleMessage<'_>]) -> Vec<Result<Vec<Output>, RuleError>> {
        let mut verdicts = Verdicts::default();
        self.call_batch_into(msgs, &mut verdicts);
        verdicts.into_results()
    }

    /// [`call_batch`](Stage::call_batch), appending the verdicts to `verdicts`: flat vectors
    /// a worker reuses, rather than a vector per message and per output.
    pub fn call_batch_into(&mut self, msgs: &[RuleMessage<'_>], verdicts: &mut Verdicts) {
        let mut rest = msgs;
        while !rest.is_empty() {
            let (group, after) = rest.split_at(self.group_len(rest));
            rest = after;
            if self.batches && group.len() > 1 {
                let started = Instant::now();
                let first = verdicts.len();
                if self.try_batch(group, started, verdicts) {
                    let n = u32::try_from(group.len()).unwrap_or(u32::MAX);
                    self.metrics.duration(started.elapsed() / n);
                    let mut ok = 0;
                    for (i, msg) in group.iter().enumerate() {
                        match verdicts.get(first + i) {
                            Some(Err(error)) => {
                                self.metrics.invocations(error.result(), 1);
                                self.report(error, msg.topic);
                            }
                            _ => ok += 1,
                        }
                    }
                    self.metrics.invocations("ok", ok);
                    continue;
                }
            }
            for msg in group {
                verdicts.push(self.call(msg));
            }
        }
    }

    /// Whether messages still go to the plugin's `on-batch` (see [`Stage::call_batch`]).
    pub fn batches(&self) -> bool {
        self.batches
    }

    /// How many of `msgs` (at least one) go in the next `on-batch` call: at most
    /// [`MAX_BATCH`], and no more bytes of topics and payloads than a sixteenth of the memory
    /// limit, so that a group does not hit the limit only because it is a group.
    pub(crate) fn group_len(&self, msgs: &[RuleMessage<'_>]) -> usize {
        let budget = self.plugin.limits().memory / 16;
        let mut bytes = 0;
        let mut len = 0;
        for msg in msgs.iter().take(MAX_BATCH) {
            bytes += msg.topic.len() + msg.payload.len();
            if len > 0 && bytes > budget {
                break;
            }
            len += 1;
        }
        len.max(1)
    }

    /// One `on-batch` call: appends the verdicts to `results` and returns true, or returns
    /// false (appending nothing) when the messages must be run one by one (the instance could
    /// not be created, the call faulted, or the plugin returned the wrong number of results;
    /// the instance is then gone and the kv store as before the call).
    fn try_batch(
        &mut self,
        msgs: &[RuleMessage<'_>],
        started: Instant,
        verdicts: &mut Verdicts,
    ) -> bool {
        if self.instance.is_none() {
            // The one-by-one calls try again and report why not.
            match self.instantiate() {
                Ok(instance) => self.instance = Some(instance),
                Err(_) => return false,
            }
        }
        let Some(instance) = self.instance.as_mut() else {
            return false;
        };
        let limits = self.plugin.limits();
        let time = limits
            .time
            .saturating_mul(u32::try_from(msgs.len()).unwrap_or(u32::MAX));
        let store = &mut instance.store;
        let state = store.data_mut();
        state.limiter.denied = false;
        state.clock.start(time, started);
        state.kv.begin();
        store.set_epoch_deadline(ticks(time));
        let result = instance
            .rule
            .call_on_batch_fast(&mut *store, crate::lower::batched(msgs));
        let state = store.data_mut();
        match result {
            Ok(batch) if batch.results.len() == msgs.len() => {
                state.kv.commit();
                verdicts.push_batch(
                    batch,
                    |i, count| self.too_many(count, msgs[i].topic),
                    |i, message| self.plugin_error(message, msgs[i].topic),
                );
                true
            }
            Ok(batch) => {
                state.kv.rollback();
                tracing::warn!(
                    pipeline = &*self.pipeline,
                    plugin = self.plugin.name(),
                    results = batch.results.len(),
                    messages = msgs.len(),
                    "A rule plugin's on-batch returned the wrong number of results; running the messages one by one, and this stage calls on-message only from now on (until a reload). Rebuild the plugin with the current SDK."
                );
                self.batches = false;
                self.discard_instance();
                false
            }
            Err(error) => {
                state.kv.rollback();
                // The one-by-one run reports the fault with the message it belongs to.
                let _ = state.stderr.take_tail();
                tracing::debug!(
                    pipeline = &*self.pipeline,
                    plugin = self.plugin.name(),
                    messages = msgs.len(),
                    error = %describe(&error),
                    "A batch of messages faulted; running them one by one."
                );
                // Not counted as a restart: the one-by-one run counts the fault once, when
                // it meets the faulting message.
                self.drop_instance();
                false
            }
        }
    }

    /// A returned result as the stage's verdict: outputs within the limit, or the plugin's error.
    fn verdict(
        &self,
        result: Result<Vec<Output>, String>,
        topic: &str,
    ) -> Result<Vec<Output>, RuleError> {
        match result {
            Ok(outputs) => match self.too_many(outputs.len(), topic) {
                Some(error) => Err(error),
                None => Ok(outputs),
            },
            Err(message) => Err(self.plugin_error(message, topic)),
        }
    }

    /// The error for `count` outputs of one message, if that is over the limit.
    fn too_many(&self, count: usize, topic: &str) -> Option<RuleError> {
        let limit = self.plugin.limits().max_outputs;
        (count > limit).then(|| RuleError::TooManyOutputs {
            plugin: self.plugin.name().to_owned(),
            topic: topic.to_owned(),
            count,
            limit,
        })
    }

    /// The plugin's error `message` for a message on `topic`.
    fn plugin_error(&self, message: String, topic: &str) -> RuleError {
        RuleError::Error {
            plugin: self.plugin.name().to_owned(),
            topic: topic.to_owned(),
            message,
        }
    }

    fn call_inner(
        &mut self,
        msg: &RuleMessage<'_>,
        started: Instant,
    ) -> Result<Vec<Output>, RuleError> {
        if self.instance.is_none() {
            let fresh = self.instantiate()?;
            self.instance = Some(fresh);
        }
        let Some(instance) = &mut self.instance else {
            unreachable!("an instance was just created");
        };
        let limits = self.plugin.limits();
        let store = &mut instance.store;
        let state = store.data_mut();
        state.limiter.denied = false;
        state.clock.start(limits.time, started);
        store.set_epoch_deadline(ticks(limits.time));
        let result = instance.rule.call_on_message(&mut *store, msg.clone());
        match result {
            Ok(result) => self.verdict(result, msg.topic),
            Err(error) => {
                let fault = self.fault(&error, msg.topic, limits.time);
                self.discard_instance();
                Err(fault)
            }
        }
    }

    /// Classifies a failed call: memory limit, timeout or trap.
    fn fault(&self, error: &wasmtime::Error, topic: &str, time: Duration) -> RuleError {
        let plugin = self.plugin.name().to_owned();
        let topic = topic.to_owned();
        let Some(instance) = &self.instance else {
            return RuleError::Trap {
                plugin,
                topic,
                detail: describe(error),
            };
        };
        let state = instance.store.data();
        let stderr = state.stderr.take_tail();
        if state.limiter.denied {
            return RuleError::MemoryLimit {
                plugin,
                topic,
                limit: self.plugin.limits().memory,
            };
        }
        if state.clock.timed_out {
            return RuleError::Timeout {
                plugin,
                topic,
                limit: time,
            };
        }
        let mut detail = describe(error);
        if !stderr.is_empty() {
            detail.push_str("; stderr: ");
            detail.push_str(&stderr);
        }
        RuleError::Trap {
            plugin,
            topic,
            detail,
        }
    }

    /// Drops a faulted instance, keeping its kv store for the next one.
    fn discard_instance(&mut self) {
        self.drop_instance();
        self.metrics.restart();
    }

    /// Drops the instance, keeping its kv store, without counting a restart.
    fn drop_instance(&mut self) {
        if let Some(mut instance) = self.instance.take() {
            self.kv = std::mem::take(&mut instance.store.data_mut().kv);
        }
    }

    /// A fresh store and instance, `init`ed with the stage's config.
    fn instantiate(&mut self) -> Result<Instance, RuleError> {
        let inner = &self.plugin.inner;
        let limits = inner.limits;
        let init_error = |reason: String| RuleError::Init {
            plugin: inner.name.clone(),
            reason,
        };
        let plugin_name: Arc<str> = inner.name.as_str().into();
        let stdout = GuestOutput::new(plugin_name.clone(), self.pipeline.clone(), "stdout");
        let stderr = GuestOutput::new(plugin_name.clone(), self.pipeline.clone(), "stderr");
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = StageState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(limits.memory)
                    .trap_on_grow_failure(false)
                    .build(),
                denied: false,
            },
            kv: std::mem::take(&mut self.kv),
            clock: CallClock::default(),
            plugin: plugin_name,
            pipeline: self.pipeline.clone(),
            stderr,
        };
        let mut store = Store::new(inner.engine.wasmtime(), state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().clock.on_deadline()));
        store
            .data_mut()
            .clock
            .start(limits.init_time(), Instant::now());
        store.set_epoch_deadline(ticks(limits.init_time()));

        let outcome = inner
            .pre
            .instantiate(&mut store)
            .and_then(|rule| Ok((rule.call_init(&mut store, &self.config)?, rule)));
        match outcome {
            Ok((Ok(()), rule)) => Ok(Instance { store, rule }),
            Ok((Err(message), _)) => {
                self.kv = std::mem::take(&mut store.data_mut().kv);
                Err(init_error(message))
            }
            Err(error) => {
                let state = store.data_mut();
                self.kv = std::mem::take(&mut state.kv);
                let mut reason = if state.limiter.denied {
                    format!("memory limit ({} bytes)", limits.memory)
                } else if state.clock.timed_out {
                    format!("time limit ({:?})", limits.init_time())
                } else {
                    describe(&error)
                };
                let stderr = state.stderr.take_tail();
                if !stderr.is_empty() {
                    reason.push_str("; stderr: ");
                    reason.push_str(&stderr);
                }
                Err(init_error(reason))
            }
        }
    }

    /// One log line per failed call; faults at warn (the operator should look), plugin errors
    /// at debug (bad input is the plugin's verdict, counted in the metrics).
    fn report(&self, error: &RuleError, topic: &str) {
        let plugin = self.plugin.name();
        let pipeline = &*self.pipeline;
        let result = error.result();
        if error.restarts_instance() || matches!(error, RuleError::TooManyOutputs { .. }) {
            tracing::warn!(
                pipeline,
                plugin,
                topic,
                result,
                restarted = error.restarts_instance(),
                %error,
                "Rule plugin call failed."
            );
        } else {
            tracing::debug!(pipeline, plugin, topic, result, %error, "Rule plugin call failed.");
        }
    }
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("plugin", &self.plugin.name())
            .field("pipeline", &self.pipeline)
            .field("live", &self.instance.is_some())
            .finish_non_exhaustive()
    }
}

/// A trap by its kind, another error (a host function's, a failed instantiation) with its
/// causes.
fn describe(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}

/// Deadline in epoch ticks for `limit`: at least `limit` (one tick more, since the first may
/// be partly gone).
fn ticks(limit: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    u64::try_from(limit.as_nanos().div_ceil(tick) + 1).unwrap_or(u64::MAX)
}

/// What a plugin's store holds: its WASI context and the host side of its imports.
pub(crate) struct StageState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    kv: Kv,
    clock: CallClock,
    plugin: Arc<str>,
    pipeline: Arc<str>,
    stderr: GuestOutput,
}

impl WasiView for StageState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The time limit of the running call. wasmtime calls [`CallClock::on_deadline`] each time the
/// call has run another `limit` of wall time (epoch ticks). Wall time alone would also count
/// the time the thread waited for a CPU, and a loaded machine would then see timeouts in
/// short calls; so the first deadline opens a window of another `limit`, and the call is
/// interrupted when it kept its thread busy for most of a window (CPU time from
/// `/proc/thread-self/schedstat`). A busy loop thus stops after about 2 × `limit`; a call
/// whose thread waits for a CPU goes on, up to [`CallClock::wall_cap`]. Where the thread's
/// CPU time cannot be read, the first deadline interrupts.
#[derive(Default)]
struct CallClock {
    limit: Duration,
    started: Option<Instant>,
    /// Thread CPU time at the start of the current window.
    window_cpu: Option<Duration>,
    /// Set when the call was interrupted for time.
    timed_out: bool,
}

impl CallClock {
    fn start(&mut self, limit: Duration, now: Instant) {
        self.limit = limit;
        self.started = Some(now);
        self.window_cpu = None;
        self.timed_out = false;
    }

    /// Longest wall time of a call that is mostly waiting for a CPU.
    fn wall_cap(&self) -> Duration {
        (self.limit * 20).max(Duration::from_millis(100))
    }

    fn on_deadline(&mut self) -> UpdateDeadline {
        let wall = self.started.map_or(Duration::MAX, |s| s.elapsed());
        let cpu = thread_cpu_time();
        let busy = match (cpu, self.window_cpu) {
            (None, _) => true,
            (Some(_), None) => false,
            // Most of a window of `limit` spent on the CPU.
            (Some(now), Some(then)) => now.saturating_sub(then) >= self.limit * 4 / 5,
        };
        if busy || wall >= self.wall_cap() {
            self.timed_out = true;
            return UpdateDeadline::Interrupt;
        }
        self.window_cpu = cpu;
        UpdateDeadline::Continue(ticks(self.limit))
    }
}

/// CPU time of the calling thread (Linux: `/proc/thread-self/schedstat`, nanoseconds).
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// [`StoreLimits`] that remembers a refused memory growth, so that the trap that follows (an
/// allocation failure aborts a Rust plugin) is reported as the memory limit.
struct Limiter {
    limits: StoreLimits,
    denied: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.denied |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A stage's key-value store (bounded, see [`KV_MAX_KEYS`] and [`KV_MAX_BYTES`]).
#[derive(Default)]
pub(crate) struct Kv {
    pub(crate) map: HashMap<String, Vec<u8>>,
    /// Keys plus values.
    pub(crate) bytes: usize,
    /// During a batch: for each key changed, the value it had before the batch (`None`: it
    /// was not there), to undo the batch. One entry per key, so it stays within the store's
    /// own bounds however often a plugin rewrites a key.
    pub(crate) journal: Option<HashMap<String, Option<Vec<u8>>>>,
}

impl Kv {
    /// Starts recording changes, so that [`Kv::rollback`] can undo them.
    pub(crate) fn begin(&mut self) {
        self.journal = Some(HashMap::new());
    }

    /// Keeps the changes since [`Kv::begin`].
    pub(crate) fn commit(&mut self) {
        self.journal = None;
    }

    /// Undoes the changes since [`Kv::begin`].
    pub(crate) fn rollback(&mut self) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        for (key, old) in journal {
            if let Some(now) = self.map.remove(&key) {
                self.bytes -= key.len() + now.len();
            }
            if let Some(old) = old {
                self.bytes += key.len() + old.len();
                self.map.insert(key, old);
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    /// Refused (nothing changes) when the bounds would be exceeded.
    pub(crate) fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let old = self.map.get(&key).map(|v| key.len() + v.len());
        if old.is_none() && self.map.len() >= KV_MAX_KEYS {
            return Err(format!("kv store full: {KV_MAX_KEYS} keys"));
        }
        let bytes = self.bytes - old.unwrap_or(0) + key.len() + value.len();
        if bytes > KV_MAX_BYTES {
            return Err(format!("kv store full: {KV_MAX_BYTES} bytes"));
        }
        self.bytes = bytes;
        match &mut self.journal {
            Some(journal) => {
                let old = self.map.insert(key.clone(), value);
                journal.entry(key).or_insert(old);
            }
            None => {
                self.map.insert(key, value);
            }
        }
        Ok(())
    }

    pub(crate) fn delete(&mut self, key: &str) {
        if let Some(value) = self.map.remove(key) {
            self.bytes -= key.len() + value.len();
            if let Some(journal) = &mut self.journal {
                journal.entry(key.to_owned()).or_insert(Some(value));
            }
        }
    }
}

impl types::Host for StageState {}

impl host::Host for StageState {
    fn log(&mut self, level: host::Level, mut text: String) {
        if text.len() > MAX_LOG_TEXT {
            let mut cut = MAX_LOG_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        let plugin = &*self.plugin;
        let pipeline = &*self.pipeline;
        match level {
            host::Level::Trace => tracing::trace!(plugin, pipeline, "{text}"),
            host::Level::Debug => tracing::debug!(plugin, pipeline, "{text}"),
            host::Level::Info => tracing::info!(plugin, pipeline, "{text}"),
            host::Level::Warn => tracing::warn!(plugin, pipeline, "{text}"),
            host::Level::Error => tracing::error!(plugin, pipeline, "{text}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
        self.kv.get(&key)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.kv.set(key, value)
    }

    fn kv_delete(&mut self, key: String) {
        self.kv.delete(&key);
    }
}
