//! Pipelines end to end: the real gateway running the SDK's example plugins and the hostile
//! fixtures (built for wasm32-wasip2 by `edgegw_rules::testing`), MQTT clients on both sides,
//! SIGHUP reloads while messages flow, and the CLI's `check` and `plugin` commands.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use edgegw_tests::{Gateway, binary, message};

mod common;

use common::{Observer, WAIT, publish_seq};

fn wasm(name: &str) -> String {
    edgegw_rules::testing::build_plugins()
        .path(name)
        .display()
        .to_string()
}

/// Writes a config with `plugins` and `pipelines` (YAML list items, 2-space indent) and
/// starts a gateway on it.
fn gateway_with(plugins: &str, pipelines: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    write_config(&path, &dir.path().join("data"), plugins, pipelines);
    Gateway::start_file(&path, dir)
}

fn write_config(path: &Path, data: &Path, plugins: &str, pipelines: &str) {
    let config = format!(
        "gateway:\n  id: test\n  data_dir: {data}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:0\nplugins:\n{plugins}pipelines:\n{pipelines}metrics:\n  bind: 127.0.0.1:0\nlog:\n  level: debug\n  format: json\n",
        data = data.display()
    );
    std::fs::write(path, config).unwrap();
}

fn sighup(gw: &Gateway) {
    let status = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn payloads_on<'a>(got: &'a [(String, String)], topic: &str) -> Vec<&'a str> {
    got.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| p.as_str())
        .collect()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

#[test]
fn example_rules_transform_and_hostile_plugins_are_contained() {
    let plugins = format!(
        "  - {{ name: c2f, path: {c2f} }}\n\
         \x20 - {{ name: alert, path: {alert} }}\n\
         \x20 - {{ name: deadband, path: {deadband} }}\n\
         \x20 - {{ name: enrich, path: {enrich} }}\n\
         \x20 - {{ name: loop, path: {looping}, limits: {{ time: 20ms }} }}\n\
         \x20 - {{ name: alloc, path: {alloc}, limits: {{ memory: 4MiB }} }}\n\
         \x20 - {{ name: panic, path: {panic} }}\n\
         \x20 - {{ name: flood, path: {flood}, limits: {{ max_outputs: 100, time: 2s }} }}\n",
        c2f = wasm("celsius-to-fahrenheit"),
        alert = wasm("threshold-alert"),
        deadband = wasm("deadband"),
        enrich = wasm("enrich"),
        looping = wasm("fixture-infinite-loop"),
        alloc = wasm("fixture-unbounded-alloc"),
        panic = wasm("fixture-panic"),
        flood = wasm("fixture-flood"),
    );
    let pipelines = "  - { name: temps, from: [ \"sensors/+/temp\" ], rules: [ { plugin: c2f, config: { field: temp } } ], to: [ \"local:processed/{topic}\" ] }\n\
         \x20 - name: alerts\n    from: [ \"sensors/+/temp\" ]\n    rules:\n      - plugin: alert\n        config: { field: temp, threshold: 30.0, hysteresis: 1.0, direction: above, alert_topic: \"alerts/{2}\" }\n    to: [ \"local:{topic}\" ]\n\
         \x20 - { name: db, from: [ \"db/#\" ], rules: [ { plugin: deadband, config: { field: temp, delta: 0.5 } } ], to: [ \"local:dbout/{2..}\" ] }\n\
         \x20 - { name: en, from: [ \"en/#\" ], rules: [ { plugin: enrich, config: { gateway_id: pi, topic: \"site1/{gateway_id}/{topic}\" } } ], to: [ \"local:{topic}\" ] }\n\
         \x20 - { name: h-loop, from: [ \"hostile/loop\" ], rules: [ { plugin: loop } ], to: [ \"local:survived/loop\" ] }\n\
         \x20 - { name: h-alloc, from: [ \"hostile/alloc\" ], rules: [ { plugin: alloc } ], to: [ \"local:survived/alloc\" ] }\n\
         \x20 - { name: h-panic, from: [ \"hostile/panic\" ], rules: [ { plugin: panic } ], to: [ \"local:survived/panic\" ] }\n\
         \x20 - { name: h-flood, from: [ \"hostile/flood\" ], rules: [ { plugin: flood } ], to: [ \"local:survived/flood\" ] }\n";
    let gw = gateway_with(&plugins, pipelines);
    let all = Observer::start(gw.mqtt, "#");
    let dead = Observer::start(gw.mqtt, "$edgegw/deadletter/#");

    all.publish("sensors/kitchen/temp", r#"{"temp": 20.0}"#);
    all.publish("sensors/kitchen/temp", r#"{"temp": 35.0}"#);
    for reading in ["21.0", "21.2", "22.0"] {
        all.publish("db/room", &format!(r#"{{"temp": {reading}}}"#));
    }
    all.publish("en/x", r#"{"v": 1}"#);
    for (topic, payload) in [
        ("hostile/loop", "loop"),
        ("hostile/alloc", "alloc"),
        ("hostile/panic", "panic"),
        ("hostile/flood", "x"),
    ] {
        all.publish(topic, payload);
    }
    // The same pipelines serve the next message; other clients were never disturbed.
    for topic in ["hostile/loop", "hostile/alloc", "hostile/panic"] {
        all.publish(topic, "fine");
    }
    all.publish("plain/topic", "still routed");

    let deadline = Instant::now() + WAIT;
    let done = |got: &[(String, String)]| {
        [
            "survived/loop",
            "survived/alloc",
            "survived/panic",
            "plain/topic",
        ]
        .iter()
        .all(|t| got.iter().any(|(topic, _)| topic == t))
            && got.iter().any(|(t, _)| t.starts_with("site1/"))
            && got.iter().any(|(t, _)| t.starts_with("alerts/"))
            && payloads_on(got, "dbout/room").len() >= 2
            && payloads_on(got, "processed/sensors/kitchen/temp").len() >= 2
    };
    let got = loop {
        let got = all.received.lock().unwrap().clone();
        if done(&got) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(done(&got), "not everything arrived: {got:#?}");

    let converted = payloads_on(&got, "processed/sensors/kitchen/temp");
    assert_eq!(json(converted[0])["temp"], 68.0);
    assert_eq!(json(converted[0])["unit"], "F");
    assert_eq!(json(converted[1])["temp"], 95.0);
    let alerts: Vec<_> = got
        .iter()
        .filter(|(t, _)| t.starts_with("alerts/"))
        .collect();
    assert_eq!(alerts.len(), 1, "one alert for one crossing: {alerts:?}");
    assert_eq!(alerts[0].0, "alerts/kitchen");
    let deadband: Vec<f64> = payloads_on(&got, "dbout/room")
        .iter()
        .map(|p| json(p)["temp"].as_f64().unwrap())
        .collect();
    assert_eq!(
        deadband,
        [21.0, 22.0],
        "the 0.2 change is inside the deadband"
    );
    let enriched = got.iter().find(|(t, _)| t.starts_with("site1/")).unwrap();
    assert_eq!(enriched.0, "site1/pi/en/x");
    assert_eq!(json(&enriched.1)["gateway"], "pi");
    assert_eq!(json(&enriched.1)["v"], 1);
    for topic in ["survived/loop", "survived/alloc"] {
        assert_eq!(payloads_on(&got, topic), ["fine"], "{topic}");
    }
    // The panic fixture counts calls in its memory and in the host's kv store: a fresh
    // instance served the second message, and the kv store survived the fault.
    let counts = json(payloads_on(&got, "survived/panic")[0]);
    assert_eq!(counts["instance_calls"], 1);
    assert_eq!(counts["stage_calls"], 2);
    assert!(
        payloads_on(&got, "survived/flood").is_empty(),
        "a call over max_outputs emits nothing"
    );

    let dead_letters = dead.wait_for(4, WAIT);
    let mut topics: Vec<&str> = dead_letters.iter().map(|(t, _)| t.as_str()).collect();
    topics.sort();
    assert_eq!(
        topics,
        [
            "$edgegw/deadletter/h-alloc",
            "$edgegw/deadletter/h-flood",
            "$edgegw/deadletter/h-loop",
            "$edgegw/deadletter/h-panic"
        ]
    );
    for (result, pipeline) in [
        ("timeout", "h-loop"),
        ("trap", "h-panic"),
        ("limit", "h-alloc"),
        ("limit", "h-flood"),
    ] {
        let sample = format!(
            "edgegw_rules_invocations_total{{pipeline=\"{pipeline}\",plugin=\"{}\",result=\"{result}\"}}",
            &pipeline[2..]
        );
        assert_eq!(gw.metric(&sample), 1.0, "{sample}");
    }
    assert_eq!(
        gw.metric("edgegw_pipeline_deadletter_total{pipeline=\"h-loop\"}"),
        1.0
    );
    assert!(
        gw.logs()
            .iter()
            .any(|l| { l["fields"]["plugin"] == "loop" && l["fields"]["topic"] == "hostile/loop" })
    );
}

/// The two configs the reload test switches between: the same pipeline `p` with another
/// plugin and output topic.
fn reload_config(path: &Path, data: &Path, second: bool) {
    let plugins = format!(
        "  - {{ name: identity, path: {} }}\n  - {{ name: deadband, path: {} }}\n",
        wasm("fixture-identity"),
        wasm("deadband")
    );
    let pipeline = if second {
        "  - { name: p, from: [ \"in/#\" ], rules: [ { plugin: deadband, config: { delta: 0 } } ], to: [ \"local:out/b\" ] }\n"
    } else {
        "  - { name: p, from: [ \"in/#\" ], rules: [ { plugin: identity } ], to: [ \"local:out/a\" ] }\n"
    };
    write_config(path, data, &plugins, pipeline);
}

fn count_logs(gw: &Gateway, text: &str) -> usize {
    gw.logs()
        .iter()
        .filter(|l| message(l).is_some_and(|m| m.starts_with(text)))
        .count()
}

#[test]
fn sighup_swaps_plugins_while_messages_flow_without_losing_any() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let data = dir.path().join("data");
    reload_config(&path, &data, false);
    let gw = Gateway::start_file(&path, dir);
    let observer = Observer::start(gw.mqtt, "out/#");
    let addr: SocketAddr = gw.mqtt;
    // Publishes in chunks of 100 until told to stop: the stream flows through every reload.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut chunk = 0;
            while chunk < 5 || !stop.load(std::sync::atomic::Ordering::SeqCst) {
                acked.extend(publish_seq(addr, "in/x", chunk * 100..(chunk + 1) * 100));
                chunk += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (acked, chunk * 100)
        })
    };
    for (round, second) in [(1, true), (2, false), (3, true)] {
        std::thread::sleep(Duration::from_millis(250));
        reload_config(&path, &data, second);
        sighup(&gw);
        let deadline = Instant::now() + WAIT;
        while count_logs(&gw, "Reloaded") < round {
            assert!(
                Instant::now() < deadline,
                "reload {round} not done: {:#?}",
                gw.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(250));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, total) = publisher.join().unwrap();
    assert_eq!(acked.len(), total as usize, "every publish acknowledged");
    let got = observer.wait_for(total as usize, WAIT);
    let seqs: Vec<u32> = got.iter().map(|(_, p)| p.parse().unwrap()).collect();
    assert_eq!(
        seqs,
        (0..total).collect::<Vec<_>>(),
        "none lost, none twice, in order"
    );
    // out/a, then out/b, out/a, out/b: each switch happened once, in stream order.
    let mut switches: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    switches.dedup();
    assert_eq!(switches, ["out/a", "out/b", "out/a", "out/b"]);
    assert!(gw.metric("edgegw_pipeline_reloads_total{result=\"ok\"}") >= 3.0);

    // A reload whose plugin cannot load keeps the running pipeline and says why.
    let broken = gw.dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not wasm").unwrap();
    write_config(
        &path,
        &data,
        &format!("  - {{ name: identity, path: {} }}\n", broken.display()),
        "  - { name: p, from: [ \"in/#\" ], rules: [ { plugin: identity } ], to: [ \"local:out/c\" ] }\n",
    );
    sighup(&gw);
    assert!(
        gw.wait_log(WAIT, |l| message(l).is_some_and(|m| m
            .starts_with("Reload failed")
            && m.contains("broken.wasm"))),
        "{:#?}",
        gw.logs()
    );
    // Deadband (without `field`) takes numbers.
    observer.publish("in/x", "1000000");
    let got = observer.wait_for(total as usize + 1, WAIT);
    assert_eq!(
        got.last().unwrap(),
        &("out/b".to_string(), "1000000".to_string()),
        "the old pipeline still runs"
    );
}

#[test]
fn check_rejects_a_pipeline_naming_an_unknown_plugin_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        "gateway:\n  id: test\n  data_dir: data\npipelines:\n  - name: temps\n    from: [ \"sensors/#\" ]\n    rules:\n      - plugin: nope\n",
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:8:", path.display()))
            && stderr.contains("unknown plugin `nope`"),
        "{stderr}"
    );
}

#[test]
fn plugin_test_prints_outputs_and_plugin_new_scaffolds_a_crate() {
    let output = Command::new(binary())
        .args(["plugin", "test", &wasm("celsius-to-fahrenheit")])
        .args(["--config", r#"{"field":"temp"}"#])
        .args(["--topic", "sensors/a/temp", "--payload", r#"{"temp": 20}"#])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let (topic, payload) = stdout.trim().split_once(' ').unwrap();
    assert_eq!(topic, "sensors/a/temp");
    assert_eq!(json(payload)["temp"], 68.0);

    let output = Command::new(binary())
        .args(["plugin", "test", &wasm("celsius-to-fahrenheit")])
        .args(["--config", r#"{"field":"temp"}"#])
        .args(["--topic", "sensors/a/temp", "--payload", "not json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("celsius_to_fahrenheit"),
        "{output:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["plugin", "new", "my-rule", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    for file in ["Cargo.toml", "src/lib.rs", "README.md"] {
        assert!(dir.path().join("my-rule").join(file).is_file(), "{file}");
    }
    // Building and testing a scaffolded crate is covered by the rules crate's tests.
}
