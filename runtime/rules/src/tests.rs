//! The example plugins and the hostile fixtures through wasmtime. The plugins are built once
//! per test process (`testing::build_plugins`); each is compiled once per process too.

use crate::stage::Kv;
use crate::testing::build_plugins;
use crate::{
    Engine, Limits, MAX_BATCH, Output, Plugin, RuleError, RuleMessage, Stage, Verdicts,
    WIT_VERSION, plugin_test,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new().expect("engine"))
}

/// Plugin `name` with default limits, compiled once per process.
fn plugin(name: &str) -> Plugin {
    plugin_with(name, Limits::default())
}

fn plugin_with(name: &str, limits: Limits) -> Plugin {
    static LOADED: OnceLock<Mutex<HashMap<(String, String), Plugin>>> = OnceLock::new();
    let key = (name.to_owned(), format!("{limits:?}"));
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap();
    loaded
        .entry(key)
        .or_insert_with(|| {
            let path = build_plugins().path(name);
            Plugin::load(engine(), name, &path, limits, None).expect("load")
        })
        .clone()
}

fn stage(name: &str, config: Value) -> Stage {
    Stage::new(&plugin(name), "test", &config.to_string()).expect("stage")
}

fn call(stage: &mut Stage, topic: &str, payload: &str) -> Result<Vec<Output>, RuleError> {
    stage.call(&RuleMessage::new(topic, payload.as_bytes()))
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.payload).expect("JSON output")
}

#[test]
fn celsius_to_fahrenheit() {
    let mut c2f = stage("celsius-to-fahrenheit", json!({"field": "temp"}));
    let out = call(&mut c2f, "sensors/a/temp", r#"{"temp":20.0}"#).unwrap();
    assert_eq!(
        out,
        vec![Output {
            topic: None,
            payload: br#"{"temp":68.0,"unit":"F"}"#.to_vec()
        }]
    );

    let mut other_field = stage("celsius-to-fahrenheit", json!({"field": "t"}));
    let out = call(&mut other_field, "s/b", r#"{"t": -40, "id": 7}"#).unwrap();
    assert_eq!(json_of(&out[0]), json!({"t": -40.0, "unit": "F", "id": 7}));

    let e = call(&mut c2f, "sensors/x/temp", "warm").unwrap_err();
    assert!(
        matches!(&e, RuleError::Error { topic, .. } if topic == "sensors/x/temp"),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("celsius-to-fahrenheit") && text.contains("sensors/x/temp"),
        "{text}"
    );
    assert_eq!(e.result(), "error");
    // A plugin error does not cost the instance: the stage goes on.
    assert!(call(&mut c2f, "s/a", r#"{"temp": 0}"#).is_ok());
}

#[test]
fn init_errors_fail_the_stage() {
    let e = Stage::new(&plugin("celsius-to-fahrenheit"), "test", "{}").unwrap_err();
    assert!(
        matches!(&e, RuleError::Init { reason, .. } if reason.contains("missing field `field`")),
        "{e:?}"
    );
    let e = Stage::new(&plugin("celsius-to-fahrenheit"), "test", "{not json").unwrap_err();
    assert!(
        matches!(&e, RuleError::Init { reason, .. } if reason.contains("not JSON")),
        "{e:?}"
    );
}

#[test]
fn threshold_alert_with_hysteresis_per_topic() {
    let mut alert = stage(
        "threshold-alert",
        json!({"field": "temp", "threshold": 30.0, "hysteresis": 2.0, "alert_topic": "alerts/{topic}"}),
    );
    let mut states = Vec::new();
    for (topic, value) in [
        ("s/a", 25.0),
        ("s/a", 30.5), // alert
        ("s/b", 31.0), // alert: own state
        ("s/a", 31.0),
        ("s/a", 29.0), // within hysteresis
        ("s/a", 27.9), // clear
        ("s/b", 32.0),
        ("s/a", 30.1), // alert again
    ] {
        let out = call(&mut alert, topic, &format!(r#"{{"temp": {value}}}"#)).unwrap();
        assert!(out.len() <= 1, "{out:?}");
        if let Some(o) = out.first() {
            assert_eq!(o.topic.as_deref(), Some(format!("alerts/{topic}").as_str()));
            let alert = json_of(o);
            assert_eq!(alert["value"], json!(value));
            states.push(format!("{topic}:{}", alert["state"].as_str().unwrap()));
        }
    }
    assert_eq!(states, ["s/a:alert", "s/b:alert", "s/a:clear", "s/a:alert"]);
}

#[test]
fn deadband_keeps_state_in_the_reused_instance() {
    let mut deadband = stage("deadband", json!({"field": "temp", "delta": 0.5}));
    let forwarded: Vec<bool> = [
        ("s/a", 20.0),
        ("s/a", 20.2),
        ("s/b", 20.2),
        ("s/a", 20.4),
        ("s/a", 20.5),
        ("s/b", 20.6),
        ("s/a", 20.9),
        ("s/a", 19.9),
    ]
    .iter()
    .map(|(topic, v)| {
        let payload = format!(r#"{{"temp": {v}}}"#);
        let out = call(&mut deadband, topic, &payload).unwrap();
        if let Some(o) = out.first() {
            assert_eq!(o.payload, payload.as_bytes(), "forwarded unchanged");
        }
        !out.is_empty()
    })
    .collect();
    assert_eq!(
        forwarded,
        [true, false, true, false, true, false, false, true]
    );
}

#[test]
fn enrich_adds_gateway_and_time_and_maps_the_topic() {
    let mut enrich = stage(
        "enrich",
        json!({"gateway_id": "pi-kitchen", "topic": "site1/{gateway_id}/{2}/{topic}"}),
    );
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = now();
    let out = call(&mut enrich, "sensors/attic/temp", r#"{"temp": 21.5}"#).unwrap();
    let after = now();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].topic.as_deref(),
        Some("site1/pi-kitchen/attic/sensors/attic/temp")
    );
    let value = json_of(&out[0]);
    assert_eq!(value["temp"], json!(21.5));
    assert_eq!(value["gateway"], json!("pi-kitchen"));
    let ts = value["ts"].as_u64().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{before} <= {ts} <= {after}"
    );

    let e = call(&mut enrich, "short", "{}").unwrap_err();
    assert!(
        matches!(&e, RuleError::Error { topic, message, .. } if topic == "short" && message.contains("levels")),
        "{e:?}"
    );
}

#[test]
fn identity_forwards_every_field_it_is_given() {
    let mut identity = stage("fixture-identity", Value::Null);
    let properties = [("k", "v"), ("k", "w")];
    let msg = RuleMessage {
        topic: "a/b",
        payload: &[0, 159, 146, 150],
        qos: 2,
        retain: true,
        content_type: Some("application/octet-stream"),
        user_properties: &properties,
    };
    for _ in 0..3 {
        let out = identity.call(&msg).unwrap();
        assert_eq!(
            out,
            vec![Output {
                topic: None,
                payload: vec![0, 159, 146, 150]
            }]
        );
    }
}

/// A stage of the looping fixture with a 20 ms time limit, and those limits.
fn looping_stage() -> (Stage, Limits) {
    let limits = Limits {
        time: Duration::from_millis(20),
        ..Limits::default()
    };
    let plugin = plugin_with("fixture-infinite-loop", limits);
    (Stage::new(&plugin, "test", "null").unwrap(), limits)
}

#[test]
fn infinite_loop_times_out_and_the_stage_recovers() {
    let (mut looping, limits) = looping_stage();
    let started = Instant::now();
    let e = call(&mut looping, "t/loop", "loop").unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(&e, RuleError::Timeout { topic, limit, .. } if topic == "t/loop" && *limit == limits.time),
        "{e:?}"
    );
    assert_eq!(e.result(), "timeout");
    assert!(e.restarts_instance());
    assert!(
        elapsed >= limits.time && elapsed < Duration::from_secs(2),
        "interrupted after {elapsed:?}"
    );
    // A fresh instance serves the next message.
    assert_eq!(
        call(&mut looping, "t/ok", "fine").unwrap(),
        vec![Output {
            topic: None,
            payload: b"fine".to_vec()
        }]
    );
    assert!(call(&mut looping, "t/loop", "loop").is_err());
    assert!(call(&mut looping, "t/ok", "fine").is_ok());
}

#[test]
fn sleeping_traps_at_once() {
    let mut sleeper = stage("fixture-infinite-loop", Value::Null);
    let started = Instant::now();
    let e = call(&mut sleeper, "t/sleep", "sleep").unwrap_err();
    assert!(
        matches!(&e, RuleError::Trap { detail, .. } if detail.contains("cannot sleep")),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(call(&mut sleeper, "t/ok", "fine").is_ok());
}

#[test]
fn unbounded_allocation_hits_the_memory_limit_and_the_stage_recovers() {
    let mut hog = stage("fixture-unbounded-alloc", Value::Null);
    let e = call(&mut hog, "t/alloc", "alloc").unwrap_err();
    assert!(
        matches!(&e, RuleError::MemoryLimit { topic, limit, .. } if topic == "t/alloc" && *limit == 16 << 20),
        "{e:?}"
    );
    assert_eq!(e.result(), "limit");
    assert!(call(&mut hog, "t/ok", "fine").is_ok());

    // A smaller limit is the one enforced.
    let small = Limits {
        memory: 4 << 20,
        ..Limits::default()
    };
    let mut hog = Stage::new(
        &plugin_with("fixture-unbounded-alloc", small),
        "test",
        "null",
    )
    .unwrap();
    let e = call(&mut hog, "t/alloc", "alloc").unwrap_err();
    assert!(
        matches!(&e, RuleError::MemoryLimit { limit, .. } if *limit == 4 << 20),
        "{e:?}"
    );
}

#[test]
fn panic_traps_the_instance_is_recreated_and_kv_survives() {
    let mut panicky = stage("fixture-panic", Value::Null);
    let counts = |stage: &mut Stage| {
        let out = call(stage, "t/ok", "fine").unwrap();
        let v = json_of(&out[0]);
        (
            v["instance_calls"].as_u64().unwrap(),
            v["stage_calls"].as_u64().unwrap(),
        )
    };
    assert_eq!(counts(&mut panicky), (1, 1));
    assert_eq!(counts(&mut panicky), (2, 2), "one instance, reused");

    let e = call(&mut panicky, "t/boom", "panic").unwrap_err();
    assert!(
        matches!(&e, RuleError::Trap { topic, detail, .. }
            if topic == "t/boom" && detail.contains("asked to panic on t/boom")),
        "{e:?}"
    );
    assert_eq!(e.result(), "trap");
    // Memory starts over in the new instance; the host's kv store does not.
    assert_eq!(counts(&mut panicky), (1, 4));
    assert_eq!(counts(&mut panicky), (2, 5));
}

#[test]
fn too_many_outputs_are_refused() {
    // Lifting thousands of outputs in a debug build of wasmtime takes more than 5 ms.
    let slow_host = Limits {
        time: Duration::from_secs(2),
        ..Limits::default()
    };
    let flood_plugin = plugin_with("fixture-flood", slow_host);
    let mut flood = Stage::new(&flood_plugin, "test", "null").unwrap();
    let e = call(&mut flood, "t/f", "x").unwrap_err();
    assert!(
        matches!(&e, RuleError::TooManyOutputs { topic, count: 5000, limit: 100, .. } if topic == "t/f"),
        "{e:?}"
    );
    assert_eq!(e.result(), "limit");
    assert!(!e.restarts_instance());

    let mut few = Stage::new(&flood_plugin, "test", r#"{"count": 100}"#).unwrap();
    let out = call(&mut few, "t/f", "x").unwrap();
    assert_eq!(out.len(), 100);
    assert_eq!(out[99].topic.as_deref(), Some("t/f/99"));

    let generous = Limits {
        max_outputs: 10_000,
        ..slow_host
    };
    let mut allowed = Stage::new(&plugin_with("fixture-flood", generous), "test", "null").unwrap();
    assert_eq!(call(&mut allowed, "t/f", "x").unwrap().len(), 5000);
}

#[test]
fn compiled_plugins_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_plugins().path("fixture-identity");
    let load = || {
        Plugin::load(
            engine(),
            "identity",
            &path,
            Limits::default(),
            Some(dir.path()),
        )
        .unwrap()
    };
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let first = load();
    assert!(!first.from_cache());
    let files = entries();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("identity.") && files[0].ends_with(".cwasm"),
        "{files:?}"
    );

    let second = load();
    assert!(second.from_cache());
    let mut stage = Stage::new(&second, "test", "null").unwrap();
    assert_eq!(call(&mut stage, "a", "b").unwrap().len(), 1);

    // A damaged entry is not loaded: compiled again and rewritten.
    let entry = dir.path().join(&files[0]);
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();
    let third = load();
    assert!(!third.from_cache());
    assert!(load().from_cache());

    // Another file under the same name replaces the entry.
    let other = build_plugins().path("celsius-to-fahrenheit");
    let plugin = Plugin::load(
        engine(),
        "identity",
        &other,
        Limits::default(),
        Some(dir.path()),
    )
    .unwrap();
    assert!(!plugin.from_cache());
    let now = entries();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, files);
}

#[test]
fn files_that_are_not_rule_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let e = Plugin::load(engine(), "junk", &junk, Limits::default(), None).unwrap_err();
    assert!(
        matches!(&e, RuleError::Load { plugin, .. } if plugin == "junk"),
        "{e:?}"
    );
    let missing = dir.path().join("missing.wasm");
    let e = Plugin::load(engine(), "missing", &missing, Limits::default(), None).unwrap_err();
    assert!(e.to_string().contains("missing.wasm"), "{e}");
}

#[test]
fn plugin_test_runs_one_message() {
    let path = build_plugins().path("celsius-to-fahrenheit");
    let out = plugin_test(&path, r#"{"field":"temp"}"#, "s/a", br#"{"temp":100}"#).unwrap();
    assert_eq!(out[0].payload, br#"{"temp":212.0,"unit":"F"}"#);
    let e = plugin_test(&path, "null", "s/a", b"{}").unwrap_err();
    assert!(matches!(e, RuleError::Init { .. }), "{e:?}");
}

#[test]
fn kv_store_is_bounded() {
    let mut kv = Kv::default();
    kv.set("a".into(), vec![1; 10]).unwrap();
    kv.set("a".into(), vec![2; 20]).unwrap();
    assert_eq!(kv.get("a"), Some(vec![2; 20]));
    let e = kv
        .set("big".into(), vec![0; crate::KV_MAX_BYTES])
        .unwrap_err();
    assert!(e.contains("bytes"), "{e}");
    assert_eq!(kv.get("big"), None);
    kv.delete("a");
    kv.set("big".into(), vec![0; crate::KV_MAX_BYTES - 3])
        .unwrap();
    kv.delete("big");
    for i in 0..crate::KV_MAX_KEYS {
        kv.set(i.to_string(), Vec::new()).unwrap();
    }
    let e = kv.set("one more".into(), Vec::new()).unwrap_err();
    assert!(e.contains("keys"), "{e}");
    kv.set("0".into(), vec![1]).unwrap();
}

/// The SDK's, the examples' and the fixtures' own (native) unit tests.
#[test]
fn plugin_workspace_unit_tests_pass() {
    let mut command = crate::testing::cargo(&["test", "--locked"]);
    command
        .arg("--manifest-path")
        .arg(crate::testing::repo_root().join("plugins/Cargo.toml"));
    crate::testing::run(command).unwrap();
}

/// `edgegw plugin new`: the new crate passes its own tests, builds to a component, and the
/// component works.
#[test]
fn scaffolded_plugin_builds_and_passes_its_tests() {
    let dir = tempfile::tempdir().unwrap();
    let root = crate::scaffold("my-rule", dir.path()).unwrap();
    let manifest = root.join("Cargo.toml");
    assert!(
        std::fs::read_to_string(&manifest)
            .unwrap()
            .contains("edgegw-plugin-sdk = { path = \""),
        "depends on the SDK by path"
    );
    assert!(matches!(
        crate::scaffold("my-rule", dir.path()),
        Err(crate::ScaffoldError::Exists(_))
    ));

    for args in [
        &["test"][..],
        &["build", "--release", "--target", "wasm32-wasip2"][..],
    ] {
        let mut command = crate::testing::cargo(args);
        command.arg("--manifest-path").arg(&manifest);
        crate::testing::run(command).unwrap();
    }
    let wasm = crate::testing::target_dir().join("wasm32-wasip2/release/my_rule.wasm");
    let out = plugin_test(&wasm, r#"{"label":"x"}"#, "s/a", br#"{"temp":1}"#).unwrap();
    assert_eq!(json_of(&out[0]), json!({"temp": 1, "label": "x"}));
    // Not one of the workspace's plugins: keep the built directory to those.
    let _ = std::fs::remove_file(wasm);
}

#[test]
fn stages_move_to_worker_threads_and_plugins_are_shared() {
    fn send<T: Send>() {}
    fn shared<T: Send + Sync>() {}
    send::<Stage>();
    shared::<Plugin>();
    shared::<Engine>();

    let plugin = plugin("fixture-identity");
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let mut stage = Stage::new(&plugin, "test", "null").unwrap();
            std::thread::spawn(move || {
                let topic = format!("w/{i}");
                (0..100)
                    .map(|_| call(&mut stage, &topic, "x").unwrap().len())
                    .sum::<usize>()
            })
        })
        .collect();
    for worker in workers {
        assert_eq!(worker.join().unwrap(), 100);
    }
}

/// `(topic, payload)` pairs as rule messages.
fn messages<'a>(pairs: &'a [(String, String)]) -> Vec<RuleMessage<'a>> {
    pairs
        .iter()
        .map(|(t, p)| RuleMessage::new(t, p.as_bytes()))
        .collect()
}

/// `(topic, payload)` pairs, owned.
fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect()
}

/// What a result says, comparable across stages (errors by their text).
fn summary(result: &Result<Vec<Output>, RuleError>) -> Result<Vec<Output>, String> {
    match result {
        Ok(outputs) => Ok(outputs.clone()),
        Err(error) => Err(error.to_string()),
    }
}

#[test]
fn a_batch_gives_each_message_what_calls_one_by_one_give() {
    // Stateful (deadband, per topic), with errors (not JSON) in between, and more messages
    // than one on-batch call takes.
    let n = MAX_BATCH * 2 + 5;
    let pairs: Vec<(String, String)> = (0..n)
        .map(|i| {
            let topic = format!("s/{}", i % 3);
            let payload = if i % 17 == 5 {
                "not json".to_owned()
            } else {
                format!(r#"{{"temp": {}}}"#, (i * 7 % 11) as f64 / 4.0)
            };
            (topic, payload)
        })
        .collect();
    let msgs = messages(&pairs);
    let config = json!({"field": "temp", "delta": 0.5});
    let mut one_by_one = stage("deadband", config.clone());
    let expected: Vec<_> = msgs.iter().map(|m| summary(&one_by_one.call(m))).collect();
    let mut batched = stage("deadband", config);
    let got: Vec<_> = batched.call_batch(&msgs).iter().map(summary).collect();
    assert_eq!(got, expected);
    assert!(expected.iter().any(|r| r.is_err()), "errors included");
    assert!(
        expected.iter().any(|r| matches!(r, Ok(o) if o.is_empty())),
        "drops included"
    );
    assert!(
        expected.iter().any(|r| matches!(r, Ok(o) if !o.is_empty())),
        "outputs included"
    );
    assert!(batched.call_batch(&[]).is_empty());
}

#[test]
fn a_batch_with_the_wrong_number_of_results_runs_again_one_by_one() {
    // The fixture's on-batch returns one result fewer, each `on-batch`; on-message gives
    // `on-message`. None of the batch's results may be kept, and after the first such batch
    // the stage stops calling on-batch.
    let pairs = owned(&[("t/1", "a"), ("t/2", "b"), ("t/3", "c")]);
    let mut short = stage("fixture-short-batch", Value::Null);
    assert!(short.batches());
    for round in 0..2 {
        let results = short.call_batch(&messages(&pairs));
        assert_eq!(results.len(), pairs.len());
        for result in &results {
            let outputs = result.as_ref().expect("each message gets its own call");
            assert_eq!(outputs.len(), 1);
            assert_eq!(outputs[0].payload, b"on-message");
        }
        assert!(
            !short.batches(),
            "round {round}: on-batch is broken, not used again"
        );
    }
    // A sound plugin keeps batching.
    let mut identity = stage("fixture-identity", Value::Null);
    identity.call_batch(&messages(&pairs));
    assert!(identity.batches());
}

#[test]
fn a_faulting_batch_runs_again_one_by_one_with_its_kv_changes_undone() {
    // The panic fixture counts calls in the kv store (stage) and in memory (instance).
    let pairs = owned(&[
        ("t/1", "fine"),
        ("t/2", "fine"),
        ("t/boom", "panic"),
        ("t/3", "fine"),
    ]);
    let mut panicky = stage("fixture-panic", Value::Null);
    let results = panicky.call_batch(&messages(&pairs));
    let counts = |r: &Result<Vec<Output>, RuleError>| {
        let v = json_of(&r.as_ref().unwrap()[0]);
        (
            v["instance_calls"].as_u64().unwrap(),
            v["stage_calls"].as_u64().unwrap(),
        )
    };
    // Exactly what single calls give: the batch's first run left no trace in the kv store.
    assert_eq!(counts(&results[0]), (1, 1));
    assert_eq!(counts(&results[1]), (2, 2));
    assert!(
        matches!(&results[2], Err(RuleError::Trap { topic, detail, .. })
            if topic == "t/boom" && detail.contains("asked to panic on t/boom")),
        "{:?}",
        results[2]
    );
    assert_eq!(counts(&results[3]), (1, 4));
    // The stage goes on batching.
    let more: Vec<(String, String)> = (0..3).map(|i| (format!("t/{i}"), "ok".into())).collect();
    let results = panicky.call_batch(&messages(&more));
    assert_eq!(
        results.iter().map(counts).collect::<Vec<_>>(),
        [(2, 5), (3, 6), (4, 7)]
    );
}

#[test]
fn a_looping_message_in_a_batch_times_out_alone() {
    let (mut looping, limits) = looping_stage();
    let pairs = owned(&[("t/a", "a"), ("t/loop", "loop"), ("t/b", "b")]);
    let started = Instant::now();
    let results = looping.call_batch(&messages(&pairs));
    let elapsed = started.elapsed();
    assert_eq!(results[0].as_ref().unwrap()[0].payload, b"a");
    assert!(
        matches!(&results[1], Err(RuleError::Timeout { topic, limit, .. })
            if topic == "t/loop" && *limit == limits.time),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap()[0].payload, b"b");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn kv_changes_of_a_batch_can_be_undone() {
    let mut kv = Kv::default();
    kv.set("keep".into(), vec![1; 10]).unwrap();
    kv.set("gone".into(), vec![2; 5]).unwrap();
    let (map, bytes) = (kv.map.clone(), kv.bytes);
    kv.begin();
    kv.set("keep".into(), vec![3; 100]).unwrap();
    kv.set("keep".into(), vec![4; 1]).unwrap();
    kv.delete("gone");
    kv.set("new".into(), vec![5; 7]).unwrap();
    kv.rollback();
    assert_eq!((&kv.map, kv.bytes), (&map, bytes));
    // The journal keeps one old value per key, however often the batch rewrites it.
    kv.begin();
    for i in 0..1000 {
        kv.set("keep".into(), vec![7; i % 50]).unwrap();
    }
    assert_eq!(kv.journal.as_ref().map(HashMap::len), Some(1));
    kv.rollback();
    assert_eq!((&kv.map, kv.bytes), (&map, bytes));
    kv.begin();
    kv.set("new".into(), vec![6; 3]).unwrap();
    kv.commit();
    kv.rollback();
    assert_eq!(kv.get("new"), Some(vec![6; 3]));
    assert_eq!(kv.bytes, bytes + 6);
}

#[test]
fn the_host_implements_the_wit_package_version_in_plugins_wit() {
    let wit =
        std::fs::read_to_string(crate::testing::repo_root().join("plugins/wit/rule.wit")).unwrap();
    assert!(
        wit.contains(&format!("package edgegw:rule@{WIT_VERSION};")),
        "plugins/wit/rule.wit and WIT_VERSION disagree"
    );
}

#[test]
fn a_plugin_built_against_another_wit_version_is_refused_with_both_versions() {
    let path = build_plugins().path("fixture-old-wit");
    let error = Plugin::load(engine(), "old", &path, Limits::default(), None)
        .map(|_| ())
        .expect_err("a 0.1.0 plugin cannot run on this host")
        .to_string();
    for expected in [
        "built against edgegw:rule@0.1.0",
        &format!("this gateway runs edgegw:rule@{WIT_VERSION}"),
        "rebuild it with the current SDK",
    ] {
        assert!(error.contains(expected), "{expected:?} not in: {error}");
    }
}

#[test]
fn a_group_holds_at_most_max_batch_messages_and_a_sixteenth_of_the_memory_limit() {
    let small = Limits {
        memory: 4 << 20,
        ..Limits::default()
    };
    let stage = Stage::new(&plugin_with("fixture-identity", small), "test", "null").unwrap();
    let tiny = vec![b'x'; 10];
    let msgs = vec![RuleMessage::new("t", &tiny); 100];
    assert_eq!(stage.group_len(&msgs), MAX_BATCH);
    assert_eq!(stage.group_len(&msgs[..3]), 3);
    // 256 KiB of budget: three 80 KiB messages fit, a fourth does not.
    let big = vec![b'x'; 80 << 10];
    let msgs = vec![RuleMessage::new("t", &big); 10];
    assert_eq!(stage.group_len(&msgs), 3);
    // One message larger than the budget still goes, alone.
    let huge = vec![b'x'; 400 << 10];
    let msgs = vec![RuleMessage::new("t", &huge); 2];
    assert_eq!(stage.group_len(&msgs), 1);
}

/// `on-batch` lowers its messages with `lower.rs`, `on-message` with wasmtime's generic
/// lowering: the plugin receives the same fields either way, whatever they hold (empty,
/// non-ASCII, absent or repeated), also when the guest's memory grows in the middle of a batch.
#[test]
fn a_batch_lowers_every_field_as_a_single_call_does() {
    let none: [(&str, &str); 0] = [];
    let one = [("k", "v")];
    let three = [("k", "v"), ("k", "w"), ("ключ", "")];
    let big = vec![7u8; 300_000];
    let base = [
        RuleMessage {
            topic: "a/b",
            payload: b"x",
            qos: 0,
            retain: false,
            content_type: None,
            user_properties: &none,
        },
        RuleMessage {
            topic: "",
            payload: &[],
            qos: 1,
            retain: true,
            content_type: Some(""),
            user_properties: &one,
        },
        RuleMessage {
            topic: "é/ü/🙂",
            payload: &[0, 159, 146, 150],
            qos: 2,
            retain: true,
            content_type: Some("application/json"),
            user_properties: &three,
        },
        RuleMessage {
            topic: "big",
            payload: &big,
            qos: 1,
            retain: false,
            content_type: Some("application/octet-stream"),
            user_properties: &three,
        },
    ];
    let msgs: Vec<RuleMessage<'_>> = base.iter().chain(base.iter()).cloned().collect();
    // Describing 300 kB as JSON takes longer than the default 5 ms on a busy machine.
    let limits = Limits {
        time: Duration::from_secs(5),
        ..Limits::default()
    };
    let echo = plugin_with("fixture-echo", limits);
    let mut single = Stage::new(&echo, "test", "null").unwrap();
    let expected: Vec<Vec<Output>> = msgs.iter().map(|m| single.call(m).unwrap()).collect();
    let mut batched = Stage::new(&echo, "test", "null").unwrap();
    assert!(batched.batches());
    let got: Vec<Vec<Output>> = batched
        .call_batch(&msgs)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got, expected);
    // And what both delivered is what was sent.
    let third: Value = serde_json::from_slice(&got[2][0].payload).unwrap();
    assert_eq!(
        third,
        json!({
            "topic": "é/ü/🙂", "payload": [0, 159, 146, 150], "qos": 2, "retain": true,
            "content_type": "application/json",
            "user_properties": [["k", "v"], ["k", "w"], ["ключ", ""]],
        })
    );
    let big_out: Value = serde_json::from_slice(&got[7][0].payload).unwrap();
    assert_eq!(big_out["payload"].as_array().unwrap().len(), 300_000);
    assert_eq!(big_out["topic"], "big");
}

/// `on-batch`'s results are lifted by `lift.rs` into [`Verdicts`], `on-message`'s by
/// wasmtime's generic lifting: the same outputs (topics kept or set, non-ASCII or empty, empty
/// payloads, several per message) and the same errors either way, also over several groups
/// and when verdicts are appended to earlier ones.
#[test]
fn a_batch_lifts_every_output_as_a_single_call_does() {
    let topics = [
        "a/b",
        "many/1",
        "error/é",
        "many/ключ",
        "",
        "error/",
        "x",
        "many/",
    ];
    let payloads: Vec<Vec<u8>> = (0..topics.len())
        .map(|i| (0..i * 7).map(|b| b as u8).collect())
        .collect();
    // Three groups of `MAX_BATCH` at most.
    let msgs: Vec<RuleMessage<'_>> = (0..2 * MAX_BATCH + 5)
        .map(|i| RuleMessage::new(topics[i % topics.len()], &payloads[i % topics.len()]))
        .collect();
    let echo = plugin("fixture-echo");
    let mut single = Stage::new(&echo, "test", "null").unwrap();
    let expected: Vec<Result<Vec<Output>, String>> = msgs
        .iter()
        .map(|m| single.call(m).map_err(|e| e.to_string()))
        .collect();
    assert!(expected.iter().any(|r| r.is_err()));
    assert!(
        expected
            .iter()
            .any(|r| r.as_ref().is_ok_and(|o| o.len() == 3))
    );

    let mut batched = Stage::new(&echo, "test", "null").unwrap();
    let mut verdicts = Verdicts::default();
    // Something there already: the batch's verdicts are appended after it.
    batched.call_batch_into(&msgs[..3], &mut verdicts);
    batched.call_batch_into(&msgs, &mut verdicts);
    assert!(batched.batches());
    assert_eq!(verdicts.len(), 3 + msgs.len());
    let got: Vec<Result<Vec<Output>, String>> = verdicts
        .iter()
        .map(|v| match v {
            Ok(outputs) => Ok(outputs.map(|o| o.to_output()).collect()),
            Err(e) => Err(e.to_string()),
        })
        .collect();
    assert_eq!(got[..3], expected[..3]);
    assert_eq!(got[3..], expected[..]);
    let many = got[4].as_ref().unwrap();
    assert_eq!(many[1].topic.as_deref(), Some("ünï/many/1"));
    assert!(many[1].payload.is_empty());
    assert_eq!(many[2].topic.as_deref(), Some(""));
    assert_eq!(many[2].payload, payloads[1]);
    assert!(
        got[5].as_ref().unwrap_err().contains("refused «error/é»"),
        "{:?}",
        got[5]
    );
    // What `call_batch` gives is the same.
    let owned: Vec<_> = batched
        .call_batch(&msgs)
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect();
    assert_eq!(owned, expected);

    // Too many outputs in a batch: that message's error, the others' outputs.
    let slow_host = Limits {
        time: Duration::from_secs(2),
        ..Limits::default()
    };
    let mut flood = Stage::new(
        &plugin_with("fixture-flood", slow_host),
        "test",
        r#"{"count": 101}"#,
    )
    .unwrap();
    let mut verdicts = Verdicts::default();
    flood.call_batch_into(&msgs[..2], &mut verdicts);
    for verdict in verdicts.iter() {
        let error = verdict.unwrap_err();
        assert!(
            matches!(
                error,
                RuleError::TooManyOutputs {
                    count: 101,
                    limit: 100,
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
