use crate::bindings::RulePre;
use crate::stage::StageState;
use crate::{Engine, RuleError, cache};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::Component;

/// Per-plugin limits (`limits:` of a plugin in the YAML). A call that breaks one fails with
/// [`RuleError::Timeout`], [`RuleError::MemoryLimit`] or [`RuleError::TooManyOutputs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time of one `on-message` call (5 ms): CPU time, checked coarsely. A call is not
    /// stopped before `time` has passed; a call that keeps its thread busy is stopped within
    /// about 2 × `time`; time the thread spent waiting for a CPU (a loaded machine) does not
    /// count, up to 20 × `time` (at least 100 ms) of wall time. `init` gets
    /// [`Limits::init_time`].
    pub time: Duration,
    /// Size of the plugin's linear memory (16 MiB).
    pub memory: usize,
    /// Outputs of one call (100).
    pub max_outputs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_millis(5),
            memory: 16 << 20,
            max_outputs: 100,
        }
    }
}

impl Limits {
    /// `init` parses config and builds tables once per instance: it may take longer than a
    /// message, but not forever.
    pub fn init_time(&self) -> Duration {
        self.time.max(Duration::from_secs(1))
    }
}

/// A compiled plugin, ready to be instantiated by [`Stage`](crate::Stage)s. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) engine: Engine,
    pub(crate) pre: RulePre<StageState>,
    pub(crate) limits: Limits,
    from_cache: bool,
}

impl Plugin {
    /// Loads the component at `path` as plugin `name`: from `cache_dir` when it holds this
    /// exact file compiled by this gateway build, else compiles it (Cranelift) and stores the
    /// result there. A cache that cannot be read or written is logged and skipped. Fails when
    /// the file is not a component or does not fit the `rule` world (e.g. built against
    /// another WIT version).
    pub fn load(
        engine: &Engine,
        name: &str,
        path: &Path,
        limits: Limits,
        cache_dir: Option<&Path>,
    ) -> Result<Self, RuleError> {
        let wasm = std::fs::read(path).map_err(|e| RuleError::Load {
            plugin: name.to_owned(),
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::load_bytes(engine, name, path, &wasm, limits, cache_dir)
    }

    /// As [`Plugin::load`], for a component already in memory (e.g. one built into the
    /// gateway); `path` only names it in logs and errors.
    pub fn load_bytes(
        engine: &Engine,
        name: &str,
        path: &Path,
        wasm: &[u8],
        limits: Limits,
        cache_dir: Option<&Path>,
    ) -> Result<Self, RuleError> {
        let started = Instant::now();
        let load_error = |reason: String| RuleError::Load {
            plugin: name.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let entry = cache_dir.map(|dir| cache::entry_path(dir, name, engine.wasmtime(), wasm));

        let mut component = None;
        if let Some(entry) = &entry {
            match cache::load(engine.wasmtime(), entry) {
                Ok(found) => component = found,
                Err(reason) => {
                    tracing::warn!(plugin = name, %reason, "Plugin cache entry ignored; compiling again.")
                }
            }
        }
        let from_cache = component.is_some();
        let component = match component {
            Some(component) => component,
            None => {
                let component = Component::from_binary(engine.wasmtime(), wasm)
                    .map_err(|e| load_error(format!("{e:#}")))?;
                if let Some(entry) = &entry
                    && let Err(reason) = cache::store(entry, name, &component)
                {
                    tracing::warn!(plugin = name, %reason, "Cannot cache the compiled plugin.");
                }
                component
            }
        };

        let pre = engine
            .linker()
            .instantiate_pre(&component)
            .and_then(RulePre::new)
            .map_err(|e| {
                let reason = format!("does not fit the edgegw:rule world: {e:#}");
                load_error(match rule_version(engine, &component) {
                    Some(built) if built != WIT_VERSION => format!(
                        "was built against edgegw:rule@{built}, this gateway runs \
                         edgegw:rule@{WIT_VERSION}: rebuild it with the current SDK ({reason})"
                    ),
                    _ => reason,
                })
            })?;
        let source = if from_cache { "cache" } else { "compiled" };
        ::metrics::counter!(edgegw_telemetry::names::RULES_PLUGIN_LOADS, "source" => source)
            .increment(1);
        tracing::info!(
            plugin = name,
            path = %path.display(),
            source,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "Plugin loaded."
        );
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                path: path.to_owned(),
                engine: engine.clone(),
                pre,
                limits,
                from_cache,
            }),
        })
    }

    /// The plugin's name (from the config), used in errors, logs and metric labels.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Whether the compiled code came from the cache (else it was compiled by this load).
    pub fn from_cache(&self) -> bool {
        self.inner.from_cache
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("path", &self.inner.path)
            .field("limits", &self.inner.limits)
            .field("from_cache", &self.inner.from_cache)
            .finish_non_exhaustive()
    }
}

/// The version of the WIT package `edgegw:rule` this host implements (`plugins/wit/rule.wit`).
pub const WIT_VERSION: &str = "0.2.0";

/// The `edgegw:rule` version of the interfaces a component imports or exports, if any.
fn rule_version(engine: &Engine, component: &Component) -> Option<String> {
    let ty = component.component_type();
    ty.imports(engine.wasmtime())
        .chain(ty.exports(engine.wasmtime()))
        .find_map(|(name, _)| {
            let rest = name.strip_prefix("edgegw:rule/")?;
            Some(rest.split_once('@')?.1.to_owned())
        })
}
