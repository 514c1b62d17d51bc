//! Maps the `plugins:` and `pipelines:` config onto running pipelines, and bridges
//! pipelines' `uplink:` outputs to the uplinks' outboxes.

use std::{collections::HashMap, path::Path, sync::Arc};

use anyhow::Context as _;
use edgegw_config::Config;
use edgegw_pipeline::{OnFull, OutputTarget, PipelineSpec, StageSpec, UplinkOutput, Uplinks};
use edgegw_rules::{Engine, Limits, Plugin};
use edgegw_store::Appended;

/// A pipeline's `uplink:<name>` output: appends to that uplink's outbox.
struct UplinkBridge(edgegw_uplink::UplinkHandle);

impl UplinkOutput for UplinkBridge {
    fn send(&self, message: &edgegw_broker::Message) -> Result<(), &'static str> {
        match self.0.enqueue(message) {
            Appended::Queued(_) => Ok(()),
            Appended::Dropped(reason) => Err(reason),
        }
    }
}

pub fn uplink_outputs<'a>(uplinks: impl IntoIterator<Item = &'a edgegw_uplink::Uplink>) -> Uplinks {
    uplinks
        .into_iter()
        .map(|u| {
            (
                u.name().to_string(),
                Arc::new(UplinkBridge(u.handle())) as Arc<dyn UplinkOutput>,
            )
        })
        .collect()
}

mod built_in {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}

/// The component of a built-in plugin (`path: builtin:NAME`: the SDK's examples, built into
/// this binary), or `None` for a plugin file.
pub fn builtin(path: &std::path::Path) -> Option<&'static [u8]> {
    let name = path.to_str()?.strip_prefix(edgegw_config::BUILTIN_PREFIX)?;
    built_in::BUILTIN
        .iter()
        .find(|(builtin, _)| *builtin == name)
        .map(|(_, wasm)| *wasm)
}

/// The compiled-plugin cache: under the data directory, so a restart loads in milliseconds.
pub fn cache_dir(config: &Config) -> std::path::PathBuf {
    config.gateway.data_dir.join("plugin-cache")
}

/// Loads the plugins the pipelines use and builds their specs. Blocking (compiles plugins
/// that are not in the cache yet): call it off the async workers.
pub fn specs(engine: Option<&Engine>, config: &Config) -> anyhow::Result<Vec<PipelineSpec>> {
    let cache = cache_dir(config);
    let mut loaded: HashMap<&str, Plugin> = HashMap::new();
    for plugin in &config.plugins {
        let used = config
            .pipelines
            .iter()
            .any(|p| p.rules.iter().any(|r| r.plugin == plugin.name));
        if !used {
            continue;
        }
        let engine = engine.context("no WASM engine for plugins")?;
        let limits = Limits {
            time: plugin.limits.time.as_std(),
            memory: usize::try_from(plugin.limits.memory).unwrap_or(usize::MAX),
            max_outputs: plugin.limits.max_outputs as usize,
        };
        let compiled = match builtin(&plugin.path) {
            Some(wasm) => Plugin::load_bytes(
                engine,
                &plugin.name,
                &plugin.path,
                wasm,
                limits,
                Some(&cache),
            ),
            None => Plugin::load(engine, &plugin.name, &plugin.path, limits, Some(&cache)),
        }
        .with_context(|| format!("plugin `{}`", plugin.name))?;
        loaded.insert(&plugin.name, compiled);
    }
    config
        .pipelines
        .iter()
        .map(|p| {
            let stages = p
                .rules
                .iter()
                .map(|r| {
                    let plugin = loaded.get(r.plugin.as_str()).with_context(|| {
                        format!("pipeline `{}`: unknown plugin `{}`", p.name, r.plugin)
                    })?;
                    Ok(StageSpec {
                        plugin: plugin.clone(),
                        config_json: r.config_json.clone(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(PipelineSpec {
                name: p.name.clone(),
                from: p.from.clone(),
                stages,
                to: p
                    .to
                    .iter()
                    .map(|t| match t {
                        edgegw_config::PipelineOutput::Local(template) => {
                            OutputTarget::Local(template.clone())
                        }
                        edgegw_config::PipelineOutput::Uplink(name) => {
                            OutputTarget::Uplink(name.clone())
                        }
                    })
                    .collect(),
                capacity: p.queue.capacity,
                on_full: match p.queue.on_full {
                    edgegw_config::OnFull::Block => OnFull::Block,
                    edgegw_config::OnFull::DropOldest => OnFull::DropOldest,
                    edgegw_config::OnFull::DropNew => OnFull::DropNew,
                },
                dead_letter: p.dead_letter_topic(),
            })
        })
        .collect()
}

/// `edgegw plugin test`: one message through a plugin; prints `TOPIC PAYLOAD` per output.
pub fn plugin_test(path: &Path, config: &str, topic: &str, payload: &str) -> anyhow::Result<()> {
    let outputs = match builtin(path) {
        Some(wasm) => {
            edgegw_rules::plugin_test_bytes(path, wasm, config, topic, payload.as_bytes())?
        }
        None => edgegw_rules::plugin_test(path, config, topic, payload.as_bytes())?,
    };
    if outputs.is_empty() {
        eprintln!("(no outputs: the rule dropped the message)");
    }
    for output in outputs {
        println!(
            "{} {}",
            output.topic.as_deref().unwrap_or(topic),
            String::from_utf8_lossy(&output.payload)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_plugins_are_the_ones_the_config_accepts() {
        let names: Vec<&str> = built_in::BUILTIN.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, edgegw_config::BUILTIN_PLUGINS);
        for (name, wasm) in built_in::BUILTIN {
            assert!(wasm.starts_with(b"\0asm"), "{name} is not WebAssembly");
            assert_eq!(
                builtin(std::path::Path::new(&format!("builtin:{name}"))),
                Some(*wasm)
            );
        }
        assert_eq!(builtin(std::path::Path::new("builtin:nope")), None);
        assert_eq!(builtin(std::path::Path::new("plugins/c2f.wasm")), None);
    }
}
