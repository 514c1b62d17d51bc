//! The cost of one rule stage, for the project's benchmark.

use crate::{Engine, Limits, Plugin, RuleError, RuleMessage, Stage};
use std::path::Path;
use std::time::{Duration, Instant};

/// What [`per_call`] measured.
#[derive(Debug, Clone, Copy)]
pub struct PerCall {
    /// Calls timed (after a warm-up).
    pub calls: u64,
    /// Their total time.
    pub total: Duration,
}

impl PerCall {
    /// Mean time of one call.
    pub fn mean(&self) -> Duration {
        self.total / u32::try_from(self.calls.max(1)).unwrap_or(u32::MAX)
    }
}

/// Times `calls` messages through one stage of the plugin at `wasm` (the identity fixture, for
/// the benchmark's figure) with a `payload_size`-byte JSON-ish payload on a three-level topic,
/// reusing the stage as a pipeline does: one [`Stage::call`] per message when `batch` is 1,
/// else [`Stage::call_batch`] with `batch` messages at a time (as a pipeline whose queue holds
/// that many; into one reused [`Verdicts`](crate::Verdicts), as a pipeline worker does).
/// Build in release mode for meaningful numbers.
pub fn per_call(
    wasm: &Path,
    payload_size: usize,
    calls: u64,
    batch: usize,
) -> Result<PerCall, RuleError> {
    let engine = Engine::new()?;
    let plugin = Plugin::load(&engine, "bench", wasm, Limits::default(), None)?;
    let mut stage = Stage::new(&plugin, "bench", "null")?;
    let payload: Vec<u8> = (0..payload_size).map(|i| b'a' + (i % 26) as u8).collect();
    let batch = batch.max(1);
    let msgs = vec![RuleMessage::new("sensors/kitchen/temp", &payload); batch];
    let mut verdicts = crate::Verdicts::default();
    let mut run = |n: u64| -> Result<(), RuleError> {
        for _ in 0..n.div_ceil(batch as u64) {
            if batch == 1 {
                std::hint::black_box(stage.call(std::hint::black_box(&msgs[0]))?);
            } else {
                verdicts.clear();
                stage.call_batch_into(std::hint::black_box(&msgs), &mut verdicts);
                if verdicts.iter().any(|v| std::hint::black_box(v).is_err()) {
                    let results = std::mem::take(&mut verdicts).into_results();
                    return Err(results.into_iter().find_map(Result::err).expect("an error"));
                }
            }
        }
        Ok(())
    };
    run(calls.min(10_000))?;
    let started = Instant::now();
    run(calls)?;
    Ok(PerCall {
        calls: calls.div_ceil(batch as u64) * batch as u64,
        total: started.elapsed(),
    })
}

/// What [`load_times`] measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadTimes {
    /// Loading with an empty cache: read, compile (Cranelift), store in the cache.
    pub compile: Duration,
    /// Loading again: from the cache.
    pub cached: Duration,
}

/// Loads the plugin at `wasm` twice with an empty cache in `cache_dir` (which it clears): the
/// cost of a gateway's first start and of every later one.
pub fn load_times(wasm: &Path, cache_dir: &Path) -> Result<LoadTimes, RuleError> {
    let engine = Engine::new()?;
    let _ = std::fs::remove_dir_all(cache_dir);
    let load = || {
        let started = Instant::now();
        let plugin = Plugin::load(&engine, "bench", wasm, Limits::default(), Some(cache_dir))?;
        Ok::<_, RuleError>((started.elapsed(), plugin.from_cache()))
    };
    let (compile, _) = load()?;
    let (cached, hit) = load()?;
    debug_assert!(hit, "second load comes from the cache");
    Ok(LoadTimes { compile, cached })
}
