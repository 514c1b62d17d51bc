//! `cargo run --release -p edgegw-bench [-- --quick]`: edgegw against Mosquitto (and rumqttd
//! when it is on PATH), same scenarios, same run. Each broker runs pinned to core 0, the load
//! generator (one current-thread tokio runtime, hand-encoded MQTT 3.1.1, or 5.0 with
//! `--mqtt5`) on core 1.
//!
//! How it measures:
//! - a fresh broker per scenario and broker (temp config, free loopback port);
//! - publishers encode batches of PUBLISHes into one buffer per write; QoS 1/2 publishers keep
//!   up to `load::WINDOW` unacknowledged; end to end, at most `load::CREDIT` messages are on
//!   their way to any one subscriber, so the figure is the rate a broker sustains (CPU-bound)
//!   rather than an overload figure (the flood scenario is the overload test);
//! - payloads carry publisher id, sequence number and send time: subscribers count loss,
//!   duplicates and end-to-end latency;
//! - throughput is what subscribers receive during the measured window, after a warm-up;
//! - CPU shares come from /proc (utime + stime over wall time) for the broker and for this
//!   process; a load generator at 90% of its core or more is flagged.
//!
//! `BENCH_DEBUG=1` prints per-publisher sent/received counts after each scenario, the first
//! sequence numbers each subscriber missed, and edgegw's broker metrics.

mod broker;
mod load;
mod mqtt;
mod nodes;
mod procfs;
mod report;
mod uplink;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;

use broker::{Broker, BrokerBin, Kind, Profile};
use load::{Scenario, SubSpec, Timing};
use report::{Entry, Measured};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark edgegw against Mosquitto (and rumqttd if on PATH), same scenarios, same run"
)]
struct Args {
    /// About a minute in all: 0.5 s warm-up and 2 s per scenario (default 1 s + 5 s).
    #[arg(long)]
    quick: bool,
    /// Seconds measured per scenario.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up before each measurement.
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds the latency scenario is measured in, the brokers taking turns (each round a
    /// fresh broker; `2 × duration / rounds` measured per round, percentiles over all
    /// rounds' samples), so that every broker meets the machine's noise alike.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    latency_rounds: u32,
    /// Idle connections opened for the memory-per-connection scenario.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Brokers to run, comma-separated (edgegw,mosquitto,rumqttd); default: all found.
    #[arg(long)]
    brokers: Option<String>,
    /// Only scenarios whose key contains one of these, comma-separated (e.g. fanin,latency).
    #[arg(long)]
    only: Option<String>,
    /// Use this edgegw binary instead of building target/release/edgegw.
    #[arg(long)]
    edgegw_bin: Option<PathBuf>,
    /// edgegw's `gateway.io_driver`: epoll (default) or io_uring.
    #[arg(long, default_value = "epoll", value_parser = ["epoll", "io_uring"])]
    io_driver: String,
    /// Do not run `cargo build --release -p edgegw`; use the existing binary.
    #[arg(long)]
    no_build: bool,
    /// Suites to run, comma-separated: broker, uplink, nodes (default: all).
    #[arg(long)]
    suite: Option<String>,
    /// Where to write the Markdown results (default: target/bench-results.md).
    #[arg(long)]
    output: Option<PathBuf>,
    /// The load generator speaks MQTT 5.0 instead of 3.1.1 (packets without properties).
    /// rumqttd is left out: its v5 listener is incomplete in the version measured.
    #[arg(long)]
    mqtt5: bool,
}

/// One step of the run.
enum Step {
    Flow(Scenario),
    Flood,
    Idle,
}

impl Step {
    fn key(&self) -> &str {
        match self {
            Step::Flow(s) => s.key,
            Step::Flood => "flood",
            Step::Idle => "idle",
        }
    }
}

fn steps() -> Vec<Step> {
    let topics = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}/{i}")).collect()
    };
    let mut steps = Vec::new();
    for qos in 0..=2 {
        steps.push(Step::Flow(Scenario {
            key: ["fanin-q0", "fanin-q1", "fanin-q2"][qos as usize],
            title: format!("fan-in 8→1, QoS {qos}"),
            qos,
            publishers: topics("bench/fanin", 8),
            subscribers: vec![SubSpec {
                filter: "bench/#".into(),
                clean: true,
                from: (0..8).collect(),
            }],
            rate: None,
            latency: false,
            unit: "msg/s",
        }));
    }
    for qos in 0..=1 {
        steps.push(Step::Flow(Scenario {
            key: ["fanout-q0", "fanout-q1"][qos as usize],
            title: format!("fan-out 1→10, QoS {qos}"),
            qos,
            publishers: vec!["bench/fanout".into()],
            subscribers: (0..10)
                .map(|_| SubSpec {
                    filter: "bench/fanout".into(),
                    clean: true,
                    from: vec![0],
                })
                .collect(),
            rate: None,
            latency: false,
            unit: "deliveries/s",
        }));
    }
    for qos in 0..=1 {
        steps.push(Step::Flow(Scenario {
            key: ["pairs-q0", "pairs-q1"][qos as usize],
            title: format!("8 pairs 1→1, QoS {qos}"),
            qos,
            publishers: topics("bench/pair", 8),
            subscribers: (0..8)
                .map(|i| SubSpec {
                    filter: format!("bench/pair/{i}"),
                    clean: true,
                    from: vec![i],
                })
                .collect(),
            rate: None,
            latency: false,
            unit: "msg/s",
        }));
    }
    steps.push(Step::Flow(Scenario {
        key: "persistent-q1",
        title: "1→1 QoS 1, persistent-session subscriber".into(),
        qos: 1,
        publishers: vec!["bench/persist".into()],
        subscribers: vec![SubSpec {
            filter: "bench/persist".into(),
            clean: false,
            from: vec![0],
        }],
        rate: None,
        latency: false,
        unit: "msg/s",
    }));
    steps.push(Step::Flow(Scenario {
        key: "latency",
        title: "latency, QoS 1 at 5,000 msg/s".into(),
        qos: 1,
        publishers: vec!["bench/latency".into()],
        subscribers: vec![SubSpec {
            filter: "bench/latency".into(),
            clean: true,
            from: vec![0],
        }],
        rate: Some(5000.0),
        latency: true,
        unit: "msg/s",
    }));
    // Pipelines (edgegw only): the same 8 pairs, routed directly, through a pipeline with no
    // rule, and through one with the identity plugin as its rule.
    for (key, title, sub) in [
        (
            "pipe-plain",
            "pipelines: 8 pairs routed directly, QoS 0",
            "bench/pipe",
        ),
        (
            "pipe-none",
            "pipelines: 8 pairs through a pipeline with no rule, QoS 0",
            "out/pipe",
        ),
        (
            "pipe-rule",
            "pipelines: 8 pairs through a pipeline with one identity rule, QoS 0",
            "out/pipe",
        ),
    ] {
        steps.push(Step::Flow(Scenario {
            key,
            title: title.into(),
            qos: 0,
            publishers: topics("bench/pipe", 8),
            subscribers: (0..8)
                .map(|i| SubSpec {
                    filter: format!("{sub}/{i}"),
                    clean: true,
                    from: vec![i],
                })
                .collect(),
            rate: None,
            latency: false,
            unit: "msg/s",
        }));
    }
    steps.push(Step::Flood);
    steps.push(Step::Idle);
    steps
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// `cargo build --release -p edgegw` (cargo decides whether it is stale); returns the binary.
fn build_edgegw(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("Building edgegw: cargo build --release -p edgegw");
    let output = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "edgegw",
            "--bin",
            "edgegw",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo}"))?;
    if !output.status.success() {
        bail!(
            "`cargo build --release -p edgegw` failed ({}); fix the build, or pass --edgegw-bin PATH / --no-build",
            output.status
        );
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "edgegw"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built edgegw but did not say where the binary is")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn find_brokers(args: &Args, root: &Path) -> Result<Vec<BrokerBin>> {
    let wanted: Option<Vec<String>> = args
        .brokers
        .as_ref()
        .map(|s| s.split(',').map(|b| b.trim().to_lowercase()).collect());
    let want = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|b| b == name));
    let _ = broker::EDGEGW_IO_DRIVER.set(args.io_driver.clone());
    let mut bins = Vec::new();
    if want("edgegw") {
        let path = if let Some(path) = &args.edgegw_bin {
            path.clone()
        } else if args.no_build {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("release/edgegw")
        } else {
            build_edgegw(root)?
        };
        if !path.is_file() {
            bail!(
                "edgegw binary {} not found: run `cargo build --release -p edgegw` first",
                path.display()
            );
        }
        bins.push(BrokerBin {
            kind: Kind::Edgegw,
            path,
        });
    }
    if want("mosquitto") {
        let path = [PathBuf::from("/usr/sbin/mosquitto")]
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| on_path("mosquitto"));
        match path {
            Some(path) => bins.push(BrokerBin {
                kind: Kind::Mosquitto,
                path,
            }),
            None => eprintln!(
                "note: mosquitto not found (/usr/sbin/mosquitto): `apt-get install mosquitto` to compare against it"
            ),
        }
    }
    if want("rumqttd") && args.mqtt5 {
        eprintln!("note: rumqttd skipped with --mqtt5");
    } else if want("rumqttd") {
        match on_path("rumqttd") {
            Some(path) => bins.push(BrokerBin {
                kind: Kind::Rumqttd,
                path,
            }),
            None => eprintln!(
                "note: rumqttd is not on PATH, skipped (`cargo install rumqttd` to compare against it)"
            ),
        }
    }
    if bins.is_empty() {
        bail!("no broker to benchmark");
    }
    Ok(bins)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

async fn run_step(bin: &BrokerBin, step: &Step, timing: Timing, idle: usize) -> Measured {
    let profile = match step {
        Step::Flow(s) if s.key == "pipe-none" => Profile::Pipeline { rule: false },
        Step::Flow(s) if s.key == "pipe-rule" => Profile::Pipeline { rule: true },
        Step::Flow(_) => Profile::Throughput,
        Step::Flood => Profile::Defaults,
        Step::Idle => Profile::Connections(idle),
    };
    let mut broker = match Broker::start(bin, profile) {
        Ok(b) => b,
        Err(e) => return Measured::Failed(format!("{e:#}")),
    };
    // Every scenario is bounded by its own timeouts; this is the backstop.
    let limit = timing.warmup + timing.duration + Duration::from_secs(120);
    let result = match step {
        Step::Flow(sc) => tokio::time::timeout(limit, load::run_flow(&mut broker, sc, timing))
            .await
            .map(|r| r.map(|o| Measured::Flow(Box::new(o)))),
        Step::Flood => tokio::time::timeout(limit, load::run_flood(&mut broker, timing.duration))
            .await
            .map(|r| r.map(Measured::Flood)),
        Step::Idle => tokio::time::timeout(limit, load::run_idle(&mut broker, idle))
            .await
            .map(|r| r.map(Measured::Idle)),
    };
    match result {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => Measured::Failed(format!("{e:#}")),
        Err(_) => Measured::Failed(format!("scenario did not finish within {limit:?}")),
    }
}

/// Every step against every broker, scenario by scenario so that brokers meet the same
/// machine conditions; each result is printed as it comes. The latency scenario runs in
/// rounds (see [`run_latency_rounds`]).
async fn run_all(
    steps: &[Step],
    bins: &[BrokerBin],
    timing: Timing,
    idle: usize,
    rounds: u32,
    entries: &std::cell::RefCell<Vec<Entry>>,
) {
    for step in steps {
        if let Step::Flow(sc) = step
            && sc.latency
        {
            run_latency_rounds(step, bins, timing, rounds, entries).await;
            continue;
        }
        for bin in bins {
            if step.key().starts_with("pipe") && bin.kind != Kind::Edgegw {
                continue;
            }
            let measured = run_step(bin, step, timing, idle).await;
            let entry = entry(step, bin, idle, measured);
            println!("{}", report::line(&entry));
            entries.borrow_mut().push(entry);
        }
    }
}

fn entry(step: &Step, bin: &BrokerBin, idle: usize, measured: Measured) -> Entry {
    Entry {
        key: step.key().to_string(),
        title: match step {
            Step::Flow(s) => s.title.clone(),
            Step::Flood => "memory: QoS 0 flood, 8→1 slow subscriber".into(),
            Step::Idle => format!("memory: {idle} idle connections"),
        },
        unit: match step {
            Step::Flow(s) => s.unit,
            _ => "",
        },
        kind: bin.kind,
        measured,
    }
}

/// The latency scenario in rounds, the brokers taking turns (the first broker of each round
/// rotates): a tail latency is mostly the machine's noise, which comes and goes over
/// seconds, so one window per broker compares the noise of two moments more than the
/// brokers. Each broker's percentiles are over its rounds' samples pooled; its notes give
/// the p99 of every round and, for edgegw, the median of its per-round ratio to Mosquitto.
async fn run_latency_rounds(
    step: &Step,
    bins: &[BrokerBin],
    timing: Timing,
    rounds: u32,
    entries: &std::cell::RefCell<Vec<Entry>>,
) {
    let per_round = Timing {
        warmup: timing.warmup,
        duration: load::latency_round(timing, rounds),
    };
    let mut results: Vec<Vec<Measured>> = bins.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds as usize {
        for turn in 0..bins.len() {
            let i = (round + turn) % bins.len();
            let measured = run_step(&bins[i], step, per_round, 0).await;
            let mut shown = entry(step, &bins[i], 0, measured.clone());
            shown.title = format!("{} (round {}/{rounds})", shown.title, round + 1);
            println!("{}", report::line(&shown));
            results[i].push(measured);
        }
    }
    let p99s = |measured: &[Measured]| -> Vec<Option<f64>> {
        measured
            .iter()
            .map(|m| match m {
                Measured::Flow(o) => o.latency.as_ref().map(|l| l.p99_us),
                _ => None,
            })
            .collect()
    };
    let mosquitto = bins
        .iter()
        .position(|b| b.kind == Kind::Mosquitto)
        .map(|i| p99s(&results[i]));
    for (bin, measured) in bins.iter().zip(&results) {
        let outcomes: Vec<load::Outcome> = measured
            .iter()
            .filter_map(|m| match m {
                Measured::Flow(o) => Some((**o).clone()),
                _ => None,
            })
            .collect();
        // The rounds that worked count; a failed round is named in the notes (all failed:
        // the entry fails).
        let pooled = match measured.iter().find(|m| !matches!(m, Measured::Flow(_))) {
            Some(failed) if outcomes.is_empty() => failed.clone(),
            _ => {
                let mut pooled = load::pool_rounds(&outcomes);
                for (round, m) in measured.iter().enumerate() {
                    if let Measured::Failed(error) = m {
                        pooled
                            .notes
                            .push(format!("round {} failed: {error}", round + 1));
                    }
                }
                let own = p99s(measured);
                let shown: Vec<String> = own
                    .iter()
                    .map(|p| p.map_or("-".into(), |p| format!("{p:.0}")))
                    .collect();
                pooled.notes.push(format!(
                    "{rounds} rounds of {:.1} s, brokers taking turns; p99 per round {} µs",
                    per_round.duration.as_secs_f64(),
                    shown.join(" / ")
                ));
                if bin.kind == Kind::Edgegw
                    && let Some(theirs) = &mosquitto
                {
                    let ratios: Vec<f64> = own
                        .iter()
                        .zip(theirs)
                        .filter_map(|(a, b)| Some(a.as_ref()? / b.as_ref()?))
                        .collect();
                    if let Some(median) = median(&ratios) {
                        pooled.p99_round_ratio = Some(median);
                        pooled.notes.push(format!(
                            "p99 / Mosquitto's, round by round: {}; median {median:.2}×",
                            ratios
                                .iter()
                                .map(|r| format!("{r:.2}×"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
                Measured::Flow(Box::new(pooled))
            }
        };
        let entry = entry(step, bin, 0, pooled);
        println!("{}", report::line(&entry));
        entries.borrow_mut().push(entry);
    }
}

/// The median of the values.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn run(args: Args) -> Result<()> {
    let root = workspace_root();
    let suites: Vec<String> = args
        .suite
        .as_deref()
        .unwrap_or("broker,uplink,nodes")
        .split(',')
        .map(|s| s.trim().to_lowercase())
        .collect();
    if let Some(unknown) = suites
        .iter()
        .find(|s| !["broker", "uplink", "nodes"].contains(&s.as_str()))
    {
        bail!("unknown suite `{unknown}` (broker, uplink, nodes)");
    }
    let mut extra = String::new();
    // Before any pinning: the outbox writer, the uplink thread and Mosquitto use both cores
    // as they would on a gateway.
    if suites.iter().any(|s| s == "uplink") {
        let table = uplink::run(&root, &uplink::Sizes::new(args.quick))?;
        extra.push_str("\n## Uplink\n\n");
        extra.push_str(&table);
    }
    if suites.iter().any(|s| s == "nodes") {
        let table = nodes::run(&nodes::Sizes::new(args.quick))?;
        extra.push_str("\n## Node link\n\n");
        extra.push_str(&table);
    }
    if !suites.iter().any(|s| s == "broker") {
        let output = args
            .output
            .unwrap_or_else(|| root.join("target").join("bench-results.md"));
        if let Err(e) = std::fs::write(&output, &extra) {
            eprintln!("could not write {}: {e}", output.display());
        }
        return Ok(());
    }
    // Build before pinning: cargo would inherit the one-core affinity.
    mqtt::set_mqtt5(args.mqtt5);
    let bins = find_brokers(&args, &root)?;
    if args.only.as_deref().is_none_or(|o| o.contains("pipe")) {
        eprintln!("Building the plugins (identity for the pipeline scenarios)");
        let built = edgegw_rules::testing::build_plugins();
        let _ = broker::IDENTITY_WASM.set(built.path("fixture-identity"));
    }
    let (warmup, duration) = if args.quick { (0.5, 2.0) } else { (1.0, 5.0) };
    let timing = Timing {
        warmup: secs(args.warmup.unwrap_or(warmup)),
        duration: secs(args.duration.unwrap_or(duration)),
    };

    // The idle scenario needs one descriptor per connection here and in the broker, which
    // inherits this limit.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let mut idle = args.idle_connections;
    if (idle as u64) + 256 > nofile {
        let fit = nofile.saturating_sub(256) as usize;
        eprintln!("note: RLIMIT_NOFILE is {nofile}; idle connections lowered from {idle} to {fit}");
        idle = fit;
    }

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() < 2 {
        eprintln!(
            "warning: fewer than 2 cores visible; the broker and the load generator share a core"
        );
    }
    if !core_affinity::set_for_current(core_affinity::CoreId {
        id: broker::LOAD_CORE,
    }) {
        eprintln!(
            "warning: could not pin the load generator to core {}",
            broker::LOAD_CORE
        );
    }

    let mut steps = steps();
    if let Some(only) = &args.only {
        let keys: Vec<&str> = only.split(',').map(str::trim).collect();
        steps.retain(|s| keys.iter().any(|k| s.key().contains(k)));
    }

    println!(
        "edgegw benchmark: brokers {} on core {}, load generator on core {} (one thread, {})",
        bins.iter()
            .map(|b| format!("{} ({})", b.kind, b.path.display()))
            .collect::<Vec<_>>()
            .join(", "),
        broker::BROKER_CORE,
        broker::LOAD_CORE,
        mqtt::protocol_name()
    );
    println!(
        "timing: {:.1} s warm-up + {:.1} s measured per scenario (latency: {} rounds, brokers taking turns); 100-byte payloads; up to {} publishes per write; QoS 1/2 window {} per publisher; at most {} messages on their way to each subscriber; idle connections {idle}",
        timing.warmup.as_secs_f64(),
        timing.duration.as_secs_f64(),
        args.latency_rounds,
        load::BATCH,
        load::WINDOW,
        load::CREDIT
    );
    println!("broker settings (a fresh broker per scenario):");
    for line in broker::describe_settings() {
        println!("  {line}");
    }
    println!();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let started = Instant::now();
    let interrupted = std::cell::Cell::new(false);
    let entries = std::cell::RefCell::new(Vec::new());
    local.block_on(&rt, async {
        // On Ctrl-C or SIGTERM the run stops: dropping it kills the running broker and
        // removes its temp dir, and the scenarios done so far are still reported.
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let signalled = async {
            match term.as_mut() {
                Some(t) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = t.recv() => {}
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            () = run_all(&steps, &bins, timing, idle, args.latency_rounds, &entries) => {}
            () = signalled => interrupted.set(true),
        }
    });
    let entries = entries.into_inner();
    if interrupted.get() {
        eprintln!("\ninterrupted: brokers stopped; reporting the scenarios that finished");
    }
    println!("\n(run took {:.0} s)\n", started.elapsed().as_secs_f64());

    let kinds: Vec<Kind> = bins.iter().map(|b| b.kind).collect();
    let mut markdown = report::markdown(&entries, &kinds, timing, args.latency_rounds, idle, &bins);
    markdown.push_str(&pipeline_summary(&entries));
    markdown.push_str(&extra);
    println!("{markdown}");
    let output = args
        .output
        .unwrap_or_else(|| root.join("target").join("bench-results.md"));
    match std::fs::write(&output, &markdown) {
        Ok(()) => println!("(written to {})", output.display()),
        Err(e) => eprintln!("could not write {}: {e}", output.display()),
    }
    Ok(())
}

/// Pipeline figures from the three `pipe-*` scenarios (edgegw's rates) and the in-process
/// cost of one identity call.
fn pipeline_summary(entries: &[Entry]) -> String {
    let rate = |key: &str| {
        entries.iter().find_map(|e| match (&e.measured, e.kind) {
            (Measured::Flow(o), Kind::Edgegw) if e.key == key => Some(o.rate),
            _ => None,
        })
    };
    let mut out = String::new();
    if let (Some(plain), Some(none), Some(rule)) =
        (rate("pipe-plain"), rate("pipe-none"), rate("pipe-rule"))
    {
        out.push_str("\n## Pipelines\n\n| figure | value | target |\n|---|---:|---|\n");
        out.push_str(&format!(
            "| throughput through a pipeline with one identity rule / routed directly | {:.0}% ({:.0} / {:.0} msg/s) | ≥ 70% |\n",
            100.0 * rule / plain,
            rule,
            plain
        ));
        out.push_str(&format!(
            "| broker core time per message added by the rule stage (1/rate with rule − 1/rate without) | {:.2} µs | ≤ 1 µs |\n",
            1e6 / rule - 1e6 / none
        ));
        out.push_str(&format!(
            "| … and by the pipeline itself (no rule) over direct routing | {:.2} µs | |\n",
            1e6 / none - 1e6 / plain
        ));
    }
    if let Some(wasm) = broker::IDENTITY_WASM.get() {
        for batch in [1, edgegw_rules::MAX_BATCH] {
            let what = if batch == 1 {
                "one identity call in process (100-byte payload)".to_owned()
            } else {
                format!(
                    "identity in process, {batch} messages per call (a queued batch), per message"
                )
            };
            match edgegw_rules::bench::per_call(wasm, 100, 200_000, batch) {
                Ok(per) => out.push_str(&format!(
                    "| {what} | {:.2} µs | |\n",
                    per.mean().as_secs_f64() * 1e6
                )),
                Err(e) => out.push_str(&format!("| {what} | failed: {e} | |\n")),
            }
        }
    }
    if !out.is_empty() {
        println!("{out}");
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegw-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_unsorted_values() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
