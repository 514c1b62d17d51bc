//! configs/prometheus.yml is valid YAML and scrapes the gateway's `/metrics` on the
//! default metrics listener (the `metrics.bind` documented in configs/gateway.yaml).

use serde_norway::Value;
use std::path::PathBuf;

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

#[test]
fn prometheus_example_scrapes_the_default_metrics_listener() {
    let prometheus = load("prometheus.yml");
    let jobs = prometheus
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("scrape_configs is a list");
    let job = jobs
        .iter()
        .find(|j| str_at(j, "job_name") == Some("edgegw"))
        .expect("a job named edgegw");
    // metrics_path defaults to /metrics; if given, it must be that.
    assert_eq!(
        str_at(job, "metrics_path").unwrap_or("/metrics"),
        "/metrics"
    );
    assert_eq!(str_at(job, "scheme").unwrap_or("http"), "http");
    let targets: Vec<&str> = job
        .get("static_configs")
        .and_then(Value::as_sequence)
        .expect("static_configs")
        .iter()
        .flat_map(|c| {
            c.get("targets")
                .and_then(Value::as_sequence)
                .expect("targets")
        })
        .map(|t| t.as_str().expect("a target is host:port"))
        .collect();

    let gateway = load("gateway.yaml");
    let bind = gateway
        .get("metrics")
        .and_then(|m| str_at(m, "bind"))
        .expect("metrics.bind in configs/gateway.yaml");
    assert_eq!(bind, "127.0.0.1:9100");
    assert_eq!(targets, [bind]);
}

#[test]
fn prometheus_example_intervals_are_sane() {
    let prometheus = load("prometheus.yml");
    let seconds = |s: &str| -> u64 {
        s.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{s:?}: expected whole seconds like 15s"))
    };
    let job = &prometheus["scrape_configs"][0];
    let interval = str_at(job, "scrape_interval")
        .or_else(|| str_at(&prometheus["global"], "scrape_interval"))
        .map_or(60, seconds);
    let timeout = str_at(job, "scrape_timeout").map_or(10, seconds);
    assert!(
        timeout <= interval,
        "scrape_timeout {timeout}s above scrape_interval {interval}s"
    );
    // Grafana's $__rate_interval, used by every dashboard rate, is at least four scrape
    // intervals: a long interval makes every rate panel coarse.
    assert!(interval <= 60, "scrape_interval {interval}s");
}
