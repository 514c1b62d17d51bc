//! Pipelines with real plugins (the SDK's examples and the misbehaving fixtures, built for
//! wasm32-wasip2 by `edgegw_rules::testing`) on a real router.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use edgegw_broker::{QoS, RouterLimits, SubOptions};
use edgegw_rules::{Engine, Limits};

use super::*;

fn engine() -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| Engine::new().expect("wasmtime engine"))
}

fn plugin(name: &str, limits: Limits) -> Plugin {
    let built = edgegw_rules::testing::build_plugins();
    Plugin::load(engine(), name, &built.path(name), limits, None).expect("plugin loads")
}

fn spec(name: &str, from: &str, stages: Vec<StageSpec>, to: &[&str]) -> PipelineSpec {
    PipelineSpec {
        name: name.into(),
        from: vec![from.into()],
        stages,
        to: to
            .iter()
            .map(|t| match t.strip_prefix("uplink:") {
                Some(u) => OutputTarget::Uplink(u.into()),
                None => OutputTarget::Local(t.strip_prefix("local:").unwrap_or(t).into()),
            })
            .collect(),
        capacity: 1000,
        on_full: OnFull::Block,
        dead_letter: format!("$edgegw/deadletter/{name}"),
    }
}

fn stage(plugin: &Plugin, config: &str) -> StageSpec {
    StageSpec {
        plugin: plugin.clone(),
        config_json: config.into(),
    }
}

fn watcher(router: &Router, filter: &str) -> LocalClient {
    let client = router.local_client(&format!("watch-{filter}"));
    client
        .subscribe(filter, SubOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    client
}

/// Collects `n` deliveries (topic, payload) within `within`.
async fn take(client: &LocalClient, n: usize, within: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, client.recv()).await {
            Ok(Some(d)) => got.push((d.message.topic.to_string(), d.message.payload.to_vec())),
            _ => break,
        }
    }
    got
}

fn publish(router: &Router, topic: &str, payload: &str) {
    router.publish(Message::new(
        topic.to_string(),
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_rule_transforms_and_outputs_go_to_their_templates() {
    let router = Router::new(RouterLimits::default());
    let c2f = plugin("celsius-to-fahrenheit", Limits::default());
    let out = watcher(&router, "processed/#");
    let pipelines = Pipelines::start(
        router.clone(),
        vec![spec(
            "temps",
            "sensors/+/temp",
            vec![stage(&c2f, r#"{"field":"temp"}"#)],
            &["local:processed/{2}/{topic}"],
        )],
        Uplinks::new(),
    )
    .unwrap();
    publish(&router, "sensors/kitchen/temp", r#"{"temp": 20.0}"#);
    publish(&router, "other/kitchen/temp", r#"{"temp": 20.0}"#);
    let got = take(&out, 2, Duration::from_secs(5)).await;
    assert_eq!(
        got.len(),
        1,
        "only the matching message is processed: {got:?}"
    );
    assert_eq!(got[0].0, "processed/kitchen/sensors/kitchen/temp");
    let json: serde_json_like::Value = serde_json_like::parse(&got[0].1);
    assert_eq!(json.temp, 68.0);
    assert_eq!(json.unit, "F");
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

/// Just enough JSON for the assertions above (the crate does not depend on serde_json).
mod serde_json_like {
    pub struct Value {
        pub temp: f64,
        pub unit: String,
    }
    pub fn parse(bytes: &[u8]) -> Value {
        let text = std::str::from_utf8(bytes).unwrap();
        let field = |name: &str| -> String {
            let at = text
                .find(&format!("\"{name}\""))
                .unwrap_or_else(|| panic!("{name} in {text}"));
            let rest = &text[at + name.len() + 2..];
            let rest = rest.trim_start().strip_prefix(':').unwrap().trim_start();
            let end = rest.find([',', '}']).unwrap();
            rest[..end].trim().trim_matches('"').to_string()
        };
        Value {
            temp: field("temp").parse().unwrap(),
            unit: field("unit"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rule_sends_the_message_to_the_dead_letter_topic_and_the_pipeline_goes_on() {
    let router = Router::new(RouterLimits::default());
    let looping = plugin(
        "fixture-infinite-loop",
        Limits {
            time: Duration::from_millis(20),
            ..Limits::default()
        },
    );
    let panicking = plugin("fixture-panic", Limits::default());
    let out = watcher(&router, "out/#");
    let dead = watcher(&router, "$edgegw/deadletter/#");
    let pipelines = Pipelines::start(
        router.clone(),
        vec![
            spec(
                "loops",
                "in/loop",
                vec![stage(&looping, "null")],
                &["local:out/loop"],
            ),
            spec(
                "panics",
                "in/panic",
                vec![stage(&panicking, "null")],
                &["local:out/panic"],
            ),
        ],
        Uplinks::new(),
    )
    .unwrap();
    publish(&router, "in/loop", "loop");
    publish(&router, "in/panic", "panic");
    publish(&router, "in/loop", "fine");
    publish(&router, "in/panic", "fine");
    let mut got = take(&out, 2, Duration::from_secs(10)).await;
    got.sort();
    assert_eq!(
        got.len(),
        2,
        "both pipelines serve the next message: {got:?}"
    );
    assert_eq!(got[0].0, "out/loop");
    assert_eq!(got[0].1, b"fine");
    assert_eq!(got[1].0, "out/panic");
    let mut dead_letters = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), dead.recv())
            .await
            .expect("a dead letter")
            .unwrap();
        dead_letters.push(d.message);
    }
    dead_letters.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(dead_letters[0].topic, "$edgegw/deadletter/loops");
    assert_eq!(dead_letters[0].payload.as_ref(), b"loop");
    let props = |m: &Message, key: &str| {
        m.properties
            .user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.to_string())
    };
    assert_eq!(
        props(&dead_letters[0], "edgegw-result").as_deref(),
        Some("timeout")
    );
    assert_eq!(
        props(&dead_letters[0], "edgegw-plugin").as_deref(),
        Some("fixture-infinite-loop")
    );
    assert_eq!(
        props(&dead_letters[0], "edgegw-topic").as_deref(),
        Some("in/loop")
    );
    assert_eq!(dead_letters[1].topic, "$edgegw/deadletter/panics");
    assert_eq!(
        props(&dead_letters[1], "edgegw-result").as_deref(),
        Some("trap")
    );
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

/// Messages that wait in the queue go through each stage in one batch; a message that faults
/// in the second stage of a chain goes to the dead-letter topic alone, and the others come out
/// once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_inside_a_batch_dead_letters_only_its_message() {
    let router = Router::new(RouterLimits::default());
    let identity = plugin("fixture-identity", Limits::default());
    let looping = plugin(
        "fixture-infinite-loop",
        Limits {
            time: Duration::from_millis(20),
            ..Limits::default()
        },
    );
    let out = watcher(&router, "out/#");
    let dead = watcher(&router, "$edgegw/deadletter/#");
    let pipelines = Pipelines::start(
        router.clone(),
        vec![spec(
            "chain",
            "in/chain",
            vec![stage(&identity, "null"), stage(&looping, "null")],
            &["local:out/chain"],
        )],
        Uplinks::new(),
    )
    .unwrap();
    // The first "loop" holds the worker for its time limit, so the 49 messages after it wait
    // in the queue and go through the stages as a batch (two on-batch calls: 32 and 17),
    // the second "loop" among them.
    let payloads: Vec<String> = (0..50)
        .map(|i| match i {
            0 | 25 => "loop".to_owned(),
            _ => format!("m{i}"),
        })
        .collect();
    for p in &payloads {
        publish(&router, "in/chain", p);
    }
    let got = take(&out, 48, Duration::from_secs(20)).await;
    let expected: Vec<(String, Vec<u8>)> = payloads
        .iter()
        .filter(|p| *p != "loop")
        .map(|p| ("out/chain".to_owned(), p.as_bytes().to_vec()))
        .collect();
    assert_eq!(got, expected);
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), dead.recv())
            .await
            .expect("a dead letter")
            .unwrap();
        assert_eq!(d.message.topic.as_ref(), "$edgegw/deadletter/chain");
        assert_eq!(d.message.payload.as_ref(), b"loop");
    }
    // Nothing else: no output twice, no other dead letter.
    assert!(take(&out, 1, Duration::from_millis(300)).await.is_empty());
    assert!(take(&dead, 1, Duration::from_millis(10)).await.is_empty());
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_feeding_each_other_stop_at_the_hop_limit_and_never_take_their_own_outputs() {
    let router = Router::new(RouterLimits::default());
    let all = watcher(&router, "#");
    // `a` takes everything under t/ and writes back under t/: without the guards this
    // would loop forever on itself and with `b`.
    let pipelines = Pipelines::start(
        router.clone(),
        vec![
            spec("a", "t/#", vec![], &["local:t/a"]),
            spec("b", "t/#", vec![], &["local:t/b"]),
        ],
        Uplinks::new(),
    )
    .unwrap();
    publish(&router, "t/start", "x");
    // Bounded: at most 2^MAX_HOPS copies, and it stops.
    let got = take(&all, 10_000, Duration::from_secs(3)).await;
    assert!(got.len() > 3, "outputs re-enter the router: {}", got.len());
    assert!(
        got.len() <= 1 + 2 * MAX_HOPS as usize,
        "each pipeline skips its own outputs, so the chain is a→b→a… up to the hop limit: {}",
        got.len()
    );
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

/// An uplink that records what it gets.
struct Recorder(Mutex<Vec<String>>);

impl UplinkOutput for Recorder {
    fn send(&self, message: &Message) -> Result<(), &'static str> {
        lock(&self.0).push(message.topic.to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_rules_while_messages_flow_without_losing_or_reordering_any() {
    let router = Router::new(RouterLimits::default());
    let identity = plugin("fixture-identity", Limits::default());
    let c2f = plugin("celsius-to-fahrenheit", Limits::default());
    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let mut uplinks = Uplinks::new();
    uplinks.insert("cloud".into(), recorder.clone() as Arc<dyn UplinkOutput>);
    let out = watcher(&router, "out/#");
    let first = vec![spec(
        "p",
        "in/#",
        vec![stage(&identity, "null")],
        &["local:out/{2}", "uplink:cloud"],
    )];
    let second = vec![spec(
        "p",
        "in/#",
        vec![stage(&c2f, r#"{"field":"temp"}"#)],
        &["local:out/{2}", "uplink:cloud"],
    )];
    let pipelines = Arc::new(Pipelines::start(router.clone(), first.clone(), uplinks).unwrap());
    let total = 2000;
    let publisher = {
        let router = router.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                publish(&router, &format!("in/{i}"), r#"{"temp": 0}"#);
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let reloader = {
        let pipelines = pipelines.clone();
        std::thread::spawn(move || {
            for round in 0..6 {
                std::thread::sleep(Duration::from_millis(10));
                let next = if round % 2 == 0 { &second } else { &first };
                pipelines.reload(next.clone()).unwrap();
            }
        })
    };
    let got = take(&out, total, Duration::from_secs(30)).await;
    publisher.join().unwrap();
    reloader.join().unwrap();
    let order: Vec<usize> = got
        .iter()
        .map(|(t, _)| t.strip_prefix("out/").unwrap().parse().unwrap())
        .collect();
    assert_eq!(order.len(), total, "no message lost across six reloads");
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "order kept across reloads"
    );
    let converted = got
        .iter()
        .filter(|(_, p)| p.starts_with(b"{\"temp\":32"))
        .count();
    assert!(
        converted > 0 && converted < total,
        "both rule sets ran: {converted} converted"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock(&recorder.0).len() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        lock(&recorder.0).len(),
        total,
        "uplink output got every one"
    );
    let pipelines = Arc::into_inner(pipelines).expect("reloader finished");
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_keeps_the_running_pipelines() {
    let router = Router::new(RouterLimits::default());
    let c2f = plugin("celsius-to-fahrenheit", Limits::default());
    let out = watcher(&router, "out/#");
    let good = vec![spec("p", "in", vec![], &["local:out/x"])];
    let pipelines = Pipelines::start(router.clone(), good, Uplinks::new()).unwrap();
    // c2f's init refuses a config without `field`.
    let bad = vec![spec(
        "p",
        "in",
        vec![stage(&c2f, r#"{"nope":1}"#)],
        &["local:out/y"],
    )];
    let error = pipelines.reload(bad).unwrap_err().to_string();
    assert!(error.contains("pipeline `p`"), "{error}");
    let unknown = vec![spec("p", "in", vec![], &["uplink:nowhere"])];
    let error = pipelines.reload(unknown).unwrap_err().to_string();
    assert!(error.contains("unknown uplink `nowhere`"), "{error}");
    publish(&router, "in", "still here");
    let got = take(&out, 1, Duration::from_secs(5)).await;
    assert_eq!(got, vec![("out/x".to_string(), b"still here".to_vec())]);
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_policies() {
    let router = Router::new(RouterLimits::default());
    // Each `sleep` message holds the worker for the time limit (then goes to dead letters).
    let slow = plugin(
        "fixture-infinite-loop",
        Limits {
            time: Duration::from_millis(50),
            ..Limits::default()
        },
    );
    for on_full in [OnFull::DropNew, OnFull::DropOldest, OnFull::Block] {
        let name = format!("{on_full:?}").to_lowercase();
        let out = watcher(&router, &format!("out/{name}/#"));
        let mut s = spec(
            &name,
            &format!("in/{name}/#"),
            vec![stage(&slow, "null")],
            &["local:out/{2..}"],
        );
        s.capacity = 3;
        s.on_full = on_full;
        let pipelines = Pipelines::start(router.clone(), vec![s], Uplinks::new()).unwrap();
        // One message keeps the worker busy, then ten arrive for a queue of three.
        let mut offers = Vec::new();
        offers.push(router.publish(Message::new(
            format!("in/{name}/busy"),
            b"loop".to_vec(),
            QoS::AtLeastOnce,
        )));
        std::thread::sleep(Duration::from_millis(10));
        for i in 0..10 {
            offers.push(router.publish(Message::new(
                format!("in/{name}/{i}"),
                b"x".to_vec(),
                QoS::AtLeastOnce,
            )));
        }
        let got = take(&out, 10, Duration::from_secs(3)).await;
        let seen: Vec<String> = got
            .iter()
            .map(|(t, _)| t.rsplit('/').next().unwrap().to_string())
            .collect();
        match on_full {
            OnFull::DropNew => assert_eq!(seen, ["0", "1", "2"], "the first three kept"),
            OnFull::DropOldest => assert_eq!(seen, ["7", "8", "9"], "the last three kept"),
            OnFull::Block => {
                assert_eq!(seen.len(), 6, "three queued and three blocked: {seen:?}");
                assert_eq!(seen, ["0", "1", "2", "3", "4", "5"]);
                let waiting = offers.iter().filter(|r| r.durable.is_some()).count();
                assert_eq!(waiting, 3, "blocked publishers got tickets to wait on");
            }
        }
        tokio::task::spawn_blocking(move || pipelines.stop())
            .await
            .unwrap();
    }
}

/// A two-stage chain where the first stage emits several items per message (topics set,
/// payloads kept or changed): the second stage sees every item, its outputs go out in the
/// order of the messages, and a message one of whose items fails in the second stage goes to
/// the dead-letter topic once, with none of its outputs (not even those of its items that
/// passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_stage_failing_one_item_drops_all_of_its_messages_outputs() {
    let router = Router::new(RouterLimits::default());
    let echo = plugin("fixture-echo", Limits::default());
    let identity = plugin("fixture-identity", Limits::default());
    let panicky = plugin("fixture-panic", Limits::default());
    let out = watcher(&router, "#");
    let dead = watcher(&router, "$edgegw/deadletter/#");
    let pipelines = Pipelines::start(
        router.clone(),
        vec![
            // echo: "many/…" gives the description, "ünï/many/…" (empty) and "" (the payload).
            spec(
                "fan",
                "many/+",
                vec![stage(&echo, "null"), stage(&identity, "null")],
                &["local:fanned/{topic}"],
            ),
            // The third item of a "panic" message traps in the second stage.
            spec(
                "trap",
                "many/t/+",
                vec![stage(&echo, "null"), stage(&panicky, "null")],
                &["local:trapped/{topic}"],
            ),
        ],
        Uplinks::new(),
    )
    .unwrap();
    publish(&router, "many/a", "one");
    publish(&router, "many/t/x", "panic");
    publish(&router, "many/t/y", "calm");
    publish(&router, "many/b", "");

    // The four inputs themselves (`#`), six fanned, three trapped.
    let got = take(&out, 13, Duration::from_secs(20)).await;
    assert!(take(&out, 1, Duration::from_millis(300)).await.is_empty());
    let fanned: Vec<(&str, &[u8])> = got
        .iter()
        .filter(|(t, _)| t.starts_with("fanned/"))
        .map(|(t, p)| (t.as_str(), p.as_slice()))
        .collect();
    let topics: Vec<&str> = fanned.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        topics,
        [
            "fanned/many/a",
            "fanned/ünï/many/a",
            "fanned/",
            "fanned/many/b",
            "fanned/ünï/many/b",
            "fanned/",
        ]
    );
    assert_eq!(fanned[1].1, b"");
    assert_eq!(fanned[2].1, b"one");
    assert_eq!(fanned[5].1, b"");
    let description = String::from_utf8(fanned[0].1.to_vec()).unwrap();
    assert!(description.contains(r#""topic":"many/a""#), "{description}");
    // "calm": its three items pass the panic fixture; "panic": none of its outputs.
    let trapped: Vec<&str> = got
        .iter()
        .filter(|(t, _)| t.starts_with("trapped/"))
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(
        trapped,
        ["trapped/many/t/y", "trapped/ünï/many/t/y", "trapped/"]
    );
    let d = tokio::time::timeout(Duration::from_secs(5), dead.recv())
        .await
        .expect("a dead letter")
        .unwrap();
    assert_eq!(d.message.topic.as_ref(), "$edgegw/deadletter/trap");
    assert_eq!(d.message.payload.as_ref(), b"panic");
    assert!(take(&dead, 1, Duration::from_millis(300)).await.is_empty());
    tokio::task::spawn_blocking(move || pipelines.stop())
        .await
        .unwrap();
}
