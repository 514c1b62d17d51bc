use crate::RuleError;
use crate::stage::StageState;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};

/// The epoch ticker's period: the granularity of time limits. A call is interrupted between
/// its limit and its limit plus one tick (plus scheduling delays).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The wasmtime engine, the linker every plugin is instantiated with, and the epoch ticker.
/// One per process; clones share all three. The ticker thread stops when the last clone (and
/// every [`Plugin`](crate::Plugin) and [`Stage`](crate::Stage) made from it) is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<StageState>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Configures wasmtime (Cranelift, component model, epoch interruption), links WASI p2 and
    /// the `host` interface, and starts the ticker thread.
    pub fn new() -> Result<Self, RuleError> {
        let engine_error = |e: wasmtime::Error| RuleError::Engine {
            reason: format!("{e:#}"),
        };
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        // Time limits: each call gets a deadline in ticks; the ticker advances the epoch.
        config.epoch_interruption(true);
        // Plugins are stripped: a backtrace of unnamed functions says nothing to an operator,
        // and capturing one makes every trap slower.
        config.wasm_backtrace_max_frames(None);
        let engine = wasmtime::Engine::new(&config).map_err(engine_error)?;

        let mut linker = Linker::new(&engine);
        // A std wasm32-wasip2 build imports WASI even when it does no I/O; what it can reach
        // through it is decided by the context each stage builds (see `StageState`).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_error)?;
        deny_waiting(&mut linker).map_err(engine_error)?;
        crate::bindings::Rule::add_to_linker::<StageState, HasSelf<StageState>>(
            &mut linker,
            |state| state,
        )
        .map_err(engine_error)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("edgegw-rules-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| RuleError::Engine {
                    reason: format!("cannot start the epoch ticker thread: {e}"),
                })?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                stop,
                ticker: Some(ticker),
            }),
        })
    }

    pub(crate) fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }

    pub(crate) fn linker(&self) -> &Linker<StageState> {
        &self.inner.linker
    }
}

/// A plugin must not wait: a sleep blocks the thread inside the host, where no time limit can
/// reach it. Waiting in WASI p2 starts with a monotonic-clock pollable, so creating one traps.
/// (The version is wasmtime-wasi's; plugins built against older 0.2 versions link to it.)
fn deny_waiting(linker: &mut Linker<StageState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    for name in ["subscribe-duration", "subscribe-instant"] {
        clock.func_new(name, |_, _, _, _| {
            Err(wasmtime::format_err!(
                "plugins cannot sleep or wait: a rule must return promptly"
            ))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}
