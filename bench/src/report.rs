//! Printing: one line per scenario and broker as the run goes, then Markdown tables with the
//! ratio edgegw / best peer.

use std::fmt::Write as _;

use crate::{
    broker::{self, BrokerBin, Kind},
    load::{Flood, Idle, Outcome, Timing},
};

#[derive(Clone)]
pub enum Measured {
    Flow(Box<Outcome>),
    Flood(Flood),
    Idle(Idle),
    Failed(String),
}

pub struct Entry {
    pub key: String,
    pub title: String,
    pub unit: &'static str,
    pub kind: Kind,
    pub measured: Measured,
}

/// The load generator is flagged at or above this share of its core.
const LOAD_FLAG: f64 = 0.9;
/// Other processes using this share of a measured core is reported...
const OTHERS_NOTE: f64 = 0.05;
/// ...and marks the summary cell from this share on.
const NOISY: f64 = 0.10;

fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e5 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn count(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn flow_notes(o: &Outcome) -> Vec<String> {
    let mut notes = o.notes.clone();
    if let Some((commits, ops)) = o.store.filter(|&(c, o)| c > 0.0 || o > 0.0) {
        notes.push(format!(
            "state file: {commits:.0} commits/s (fsyncs), {ops:.0} ops/s"
        ));
    }
    if let Some(drops) = o.broker_drops
        && drops > 0.0
    {
        notes.push(format!("broker counted {drops:.0} drops"));
    }
    if o.unacked > 0 {
        notes.push(format!("{} publishes never acknowledged", o.unacked));
    }
    if o.foreign > 0 {
        notes.push(format!("{} unexpected messages", o.foreign));
    }
    if let Some(lag) = &o.pacing_lag {
        notes.push(format!(
            "load generator spins to pace; sends left p50 {:.1} µs / p99 {:.1} µs behind schedule",
            lag.p50_us, lag.p99_us
        ));
    }
    if o.load_cpu >= LOAD_FLAG && !o.spins {
        notes.push("⚠ LOAD GENERATOR AT ≥90% OF ITS CORE: may be load-bound".into());
    }
    if o.broker_others >= OTHERS_NOTE || o.load_others >= OTHERS_NOTE {
        notes.push(format!(
            "noisy machine: other processes took {} of the broker's core and {} of the load generator's",
            pct(o.broker_others),
            pct(o.load_others)
        ));
    }
    notes
}

/// One console line for a finished scenario.
pub fn line(e: &Entry) -> String {
    let head = format!("{:<44} {:<10}", e.title, e.kind.to_string());
    match &e.measured {
        Measured::Failed(msg) => format!("{head} FAILED: {msg}"),
        Measured::Flow(o) => {
            let mut s = format!(
                "{head} {:>12} {:<12} published {:>10}/s  loss {}  dup {}  broker CPU {}  load CPU {}",
                count(o.rate as u64),
                e.unit,
                count(o.publish_rate as u64),
                count(o.loss),
                count(o.dups),
                pct(o.broker_cpu),
                pct(o.load_cpu),
            );
            if let Some(l) = &o.latency {
                let _ = write!(
                    s,
                    "  latency p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs max {:.0} µs ({} samples)",
                    l.p50_us, l.p99_us, l.p999_us, l.max_us, l.samples
                );
            }
            for n in flow_notes(o) {
                let _ = write!(s, "  [{n}]");
            }
            s
        }
        Measured::Flood(f) => {
            let mut s = format!(
                "{head} peak RSS {:.1} MB (start {:.1} MB, end {:.1} MB)  published {}/s  slow subscriber got {}  broker CPU {}  load CPU {}",
                mb(f.peak_kib),
                mb(f.start_kib),
                mb(f.end_kib),
                count(f.publish_rate as u64),
                count(f.received),
                pct(f.broker_cpu),
                pct(f.load_cpu)
            );
            if f.load_cpu >= LOAD_FLAG {
                s.push_str("  [⚠ load generator ≥90% of its core]");
            }
            s
        }
        Measured::Idle(i) => {
            let mut s = format!(
                "{head} {} of {} connections accepted in {:.1} s; RSS {:.1} → {:.1} MB",
                count(i.accepted as u64),
                count(i.attempted as u64),
                i.connect_secs,
                mb(i.before_kib),
                mb(i.after_kib)
            );
            if let Some(per) = i.per_connection_kib() {
                let _ = write!(s, "; {per:.2} KiB per connection");
            }
            if let Some(err) = &i.first_error {
                let _ = write!(s, "  [first failure: {err}]");
            }
            s
        }
    }
}

#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

#[derive(Clone, Copy)]
enum Target {
    /// At least this many times the best peer.
    BestPeer(f64),
    /// At most this many times Mosquitto's figure.
    Mosquitto(f64),
    /// At most this absolute value.
    AtMost(f64),
    None,
}

struct Row {
    label: String,
    /// The p99 latency row: edgegw's median per-round ratio to Mosquitto, which must meet
    /// the target too (a pooled p99 can rest on one broker's noisiest round).
    round_ratio: Option<f64>,
    better: Better,
    target: Target,
    /// Value and cell text per broker (column order).
    cells: Vec<Option<(Option<f64>, String)>>,
}

fn rows(entries: &[Entry], kinds: &[Kind]) -> Vec<Row> {
    let mut keys: Vec<&str> = Vec::new();
    for e in entries {
        if !keys.contains(&e.key.as_str()) {
            keys.push(&e.key);
        }
    }
    let mut rows = Vec::new();
    for key in keys {
        let group: Vec<&Entry> = entries.iter().filter(|e| e.key == key).collect();
        let first = group[0];
        let find = |k: Kind| group.iter().find(|e| e.kind == k).map(|e| &e.measured);
        let is_latency = group
            .iter()
            .any(|e| matches!(&e.measured, Measured::Flow(o) if o.latency.is_some()))
            || key == "latency";
        let failed = |m: &Measured| match m {
            Measured::Failed(_) => Some((None, "failed".to_string())),
            _ => None,
        };
        if is_latency {
            type Pick = fn(&crate::load::Percentiles) -> f64;
            let picks: [(&str, Pick, Target); 3] = [
                ("p50", |l| l.p50_us, Target::None),
                ("p99", |l| l.p99_us, Target::Mosquitto(0.6)),
                ("p99.9", |l| l.p999_us, Target::None),
            ];
            for (name, pick, target) in picks {
                let round_ratio = match (name, find(Kind::Edgegw)) {
                    ("p99", Some(Measured::Flow(o))) => o.p99_round_ratio,
                    _ => None,
                };
                rows.push(Row {
                    label: format!("{} — {name} (µs)", first.title),
                    round_ratio,
                    better: Better::Lower,
                    target,
                    cells: kinds
                        .iter()
                        .map(|&k| {
                            find(k).map(|m| match m {
                                Measured::Flow(o) => match &o.latency {
                                    Some(l) => (Some(pick(l)), format!("{:.0}", pick(l))),
                                    None => (None, "no samples".into()),
                                },
                                other => failed(other).unwrap_or((None, "?".into())),
                            })
                        })
                        .collect(),
                });
            }
            continue;
        }
        let (label, better, target) = match &first.measured {
            _ if key == "flood" => (
                "peak RSS, QoS 0 flood to a slow subscriber, default limits (MB)".to_string(),
                Better::Lower,
                Target::AtMost(100.0),
            ),
            _ if key == "idle" => (
                format!("{} — RSS per connection (KiB)", first.title),
                Better::Lower,
                Target::AtMost(2.0),
            ),
            // edgegw only; summarised under the table.
            _ if key.starts_with("pipe") => (
                format!("{} ({})", first.title, first.unit),
                Better::Higher,
                Target::None,
            ),
            // Only edgegw makes this durable (fsync before the ack); no target.
            _ if key.starts_with("persistent") => (
                format!("{} ({}; durable on edgegw only)", first.title, first.unit),
                Better::Higher,
                Target::None,
            ),
            _ => (
                format!("{} ({})", first.title, first.unit),
                Better::Higher,
                Target::BestPeer(1.2),
            ),
        };
        let cells = kinds
            .iter()
            .map(|&k| {
                find(k).map(|m| match m {
                    Measured::Flow(o) => {
                        let mut text = rate(o.rate);
                        let mut marks = Vec::new();
                        if o.loss > 0 {
                            let share = o.loss as f64 * 100.0 / o.expected.max(1) as f64;
                            marks.push(if share >= 0.1 {
                                format!("loss {share:.1}%")
                            } else {
                                format!("loss {}", count(o.loss))
                            });
                        }
                        if o.dups > 0 {
                            marks.push(format!("{} dup", count(o.dups)));
                        }
                        if o.load_cpu >= LOAD_FLAG && !o.spins {
                            marks.push("⚠ load-gen ≥90%".into());
                        }
                        if o.broker_others >= NOISY || o.load_others >= NOISY {
                            marks.push("⚠ noisy".into());
                        }
                        if !marks.is_empty() {
                            let _ = write!(text, " ({})", marks.join(", "));
                        }
                        (Some(o.rate), text)
                    }
                    Measured::Flood(f) => (Some(mb(f.peak_kib)), format!("{:.1}", mb(f.peak_kib))),
                    Measured::Idle(i) => match i.per_connection_kib() {
                        Some(per) => {
                            let mut text = format!("{per:.2}");
                            if i.accepted < i.attempted {
                                let _ = write!(
                                    text,
                                    " ({} of {} accepted)",
                                    count(i.accepted as u64),
                                    count(i.attempted as u64)
                                );
                            }
                            (Some(per), text)
                        }
                        None => (None, "none accepted".into()),
                    },
                    Measured::Failed(_) => (None, "failed".into()),
                })
            })
            .collect();
        rows.push(Row {
            label,
            round_ratio: None,
            better,
            target,
            cells,
        });
        // edgegw's state-file writes under the persistent-session load.
        let store = group.iter().find_map(|e| match &e.measured {
            Measured::Flow(o) if e.kind == Kind::Edgegw => o.store,
            _ => None,
        });
        if let (Some((commits, ops)), true) = (store, key.starts_with("persistent")) {
            rows.push(Row {
                round_ratio: None,
                label: "edgegw state file during that run: commits (fsyncs) and ops per second"
                    .into(),
                better: Better::Lower,
                target: Target::None,
                cells: kinds
                    .iter()
                    .map(|&k| {
                        (k == Kind::Edgegw)
                            .then(|| (None, format!("{commits:.0} / {}", count(ops as u64))))
                    })
                    .collect(),
            });
        }
    }
    rows
}

/// (ratio edgegw / best peer, target text, met?)
fn judge(row: &Row, kinds: &[Kind]) -> (String, String, String) {
    let value = |k: Kind| {
        kinds
            .iter()
            .position(|&x| x == k)
            .and_then(|i| row.cells[i].as_ref())
            .and_then(|c| c.0)
    };
    let ours = value(Kind::Edgegw);
    let peers: Vec<f64> = kinds
        .iter()
        .filter(|&&k| k != Kind::Edgegw)
        .filter_map(|&k| value(k))
        .collect();
    let best = match row.better {
        Better::Higher => peers
            .iter()
            .copied()
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b)))),
        Better::Lower => peers
            .iter()
            .copied()
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.min(b)))),
    };
    let ratio = match (ours, best) {
        (Some(o), Some(b)) if b > 0.0 => Some(o / b),
        _ => None,
    };
    let ratio_text = ratio.map_or("—".into(), |r| format!("{r:.2}×"));
    let (target, met) = match row.target {
        Target::BestPeer(x) => (format!("≥ {x}× best peer"), ratio.map(|r| r >= x)),
        Target::Mosquitto(x) => {
            let m = value(Kind::Mosquitto);
            let pooled = ours.zip(m).map(|(o, m)| o <= x * m);
            let target = format!("≤ {x}× Mosquitto");
            match row.round_ratio {
                Some(median) if pooled == Some(true) && median > x => {
                    let met = format!("**no** (median per round {median:.2}×)");
                    return (ratio_text, target, met);
                }
                _ => (target, pooled),
            }
        }
        Target::AtMost(x) => (format!("≤ {x}"), ours.map(|o| o <= x)),
        Target::None => ("".into(), None),
    };
    let met = match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "",
    };
    (ratio_text, target, met.into())
}

fn version_of(bin: &BrokerBin) -> String {
    let out = match bin.kind {
        Kind::Mosquitto => std::process::Command::new(&bin.path).arg("-h").output(),
        _ => std::process::Command::new(&bin.path)
            .arg("--version")
            .output(),
    };
    out.ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// `git describe --always --dirty` of the workspace, when the binary was built in it.
fn git_revision(binary: &std::path::Path) -> Option<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    if !binary.starts_with(root) {
        return None;
    }
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root)
        .output()
        .ok()?;
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{date}; {cpu}, {} cores online (load generator pinned to one); Linux {}",
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| cores.to_string()),
        kernel.trim()
    )
}

/// The summary and detail tables, with how they were measured.
pub fn markdown(
    entries: &[Entry],
    kinds: &[Kind],
    timing: Timing,
    latency_rounds: u32,
    idle: usize,
    bins: &[BrokerBin],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Results\n");
    let _ = writeln!(
        md,
        "`cargo run --release -p edgegw-bench` — {}. Each broker pinned to core {} (`taskset`), the load generator (one thread, hand-encoded {}, batched writes) to core {}; a fresh broker per scenario; {:.1} s warm-up + {:.1} s measured; the latency scenario in {} rounds of {:.1} s measured, the brokers taking turns (a fresh broker each round; percentiles over all rounds' samples), so that every broker meets the machine's changing noise alike; 100-byte payloads; QoS 1/2 publishers keep up to {} unacknowledged; the latency scenario's load generator spins rather than sleeps, so each message leaves on schedule (not in timer-tick bursts) and is timestamped as it arrives (its CPU share there is 100% by design; the notes give how late its sends left); at most {} messages on their way to any one subscriber (end-to-end flow control, so brokers are measured at their sustained, CPU-bound rate); idle scenario opens {} connections (CONNECT, then silence) and reads each broker's memory {} s after the last (edgegw: `hibernate_after: {} s`, the default is 30 s).\n",
        machine(),
        broker::BROKER_CORE,
        crate::mqtt::protocol_name(),
        broker::LOAD_CORE,
        timing.warmup.as_secs_f64(),
        timing.duration.as_secs_f64(),
        latency_rounds,
        crate::load::latency_round(timing, latency_rounds).as_secs_f64(),
        crate::load::WINDOW,
        crate::load::CREDIT,
        idle,
        crate::load::IDLE_SETTLE_SECS,
        crate::load::IDLE_HIBERNATE_SECS,
    );
    for bin in bins {
        let mut version = version_of(bin);
        if bin.kind == Kind::Edgegw
            && let Some(rev) = git_revision(&bin.path)
        {
            let _ = write!(version, " (built from {rev})");
        }
        let _ = writeln!(md, "- {}: {}", bin.kind, version);
    }
    let _ = writeln!(md);
    let _ = write!(md, "| Scenario |");
    for k in kinds {
        let _ = write!(md, " {k} |");
    }
    let _ = writeln!(md, " edgegw / best peer | target | met |");
    let _ = write!(md, "|---|");
    for _ in kinds {
        let _ = write!(md, "---:|");
    }
    let _ = writeln!(md, "---:|---|---|");
    for row in rows(entries, kinds) {
        let _ = write!(md, "| {} |", row.label);
        for cell in &row.cells {
            let _ = write!(
                md,
                " {} |",
                cell.as_ref().map_or("—".to_string(), |c| c.1.clone())
            );
        }
        let (ratio, target, met) = judge(&row, kinds);
        let _ = writeln!(md, " {ratio} | {target} | {met} |");
    }
    let _ = writeln!(
        md,
        "\nThroughput is messages received by subscribers per second (fan-out: deliveries, all 10 subscribers summed); higher is better. Latency and memory: lower is better, so there a ratio below 1 is a win. Loss is shown when not 0 (QoS 0 drops and queue-limit drops are broker policy). \"⚠ noisy\": other processes used at least 10% of the broker's or the load generator's core during that measurement; run again on a quiet machine.\n"
    );
    let _ = writeln!(md, "#### Details\n");
    let _ = writeln!(
        md,
        "| Scenario | Broker | Result | Published/s | Loss | Dup | Broker CPU | Load-gen CPU | Notes |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|");
    for e in entries {
        let (result, published, loss, dup, bcpu, lcpu, notes) = match &e.measured {
            Measured::Failed(msg) => (
                "failed".to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                msg.replace('|', "/").replace('\n', " "),
            ),
            Measured::Flow(o) => {
                let mut result = format!("{} {}", count(o.rate as u64), e.unit);
                if let Some(l) = &o.latency {
                    result = format!(
                        "p50 {:.0} / p99 {:.0} / p99.9 {:.0} µs",
                        l.p50_us, l.p99_us, l.p999_us
                    );
                }
                (
                    result,
                    count(o.publish_rate as u64),
                    format!("{} of {}", count(o.loss), count(o.expected)),
                    count(o.dups),
                    pct(o.broker_cpu),
                    pct(o.load_cpu),
                    flow_notes(o).join("; "),
                )
            }
            Measured::Flood(f) => (
                format!("peak {:.1} MB", mb(f.peak_kib)),
                count(f.publish_rate as u64),
                String::new(),
                String::new(),
                pct(f.broker_cpu),
                pct(f.load_cpu),
                format!(
                    "RSS {:.1} MB at start, {:.1} MB at end; slow subscriber received {}",
                    mb(f.start_kib),
                    mb(f.end_kib),
                    count(f.received)
                ),
            ),
            Measured::Idle(i) => (
                i.per_connection_kib()
                    .map_or("—".into(), |p| format!("{p:.2} KiB/conn")),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!(
                    "{} of {} accepted in {:.1} s; RSS {:.1} → {:.1} MB{}",
                    count(i.accepted as u64),
                    count(i.attempted as u64),
                    i.connect_secs,
                    mb(i.before_kib),
                    mb(i.after_kib),
                    i.first_error
                        .as_ref()
                        .map(|e| format!("; first failure: {}", e.replace('|', "/")))
                        .unwrap_or_default()
                ),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {result} | {published} | {loss} | {dup} | {bcpu} | {lcpu} | {notes} |",
            e.title, e.kind
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p99_row(ours: f64, mosquitto: f64, round_ratio: Option<f64>) -> Row {
        Row {
            label: "p99".into(),
            round_ratio,
            better: Better::Lower,
            target: Target::Mosquitto(0.6),
            cells: vec![
                Some((Some(ours), format!("{ours}"))),
                Some((Some(mosquitto), format!("{mosquitto}"))),
            ],
        }
    }

    #[test]
    fn the_p99_target_needs_the_median_round_too() {
        let kinds = [Kind::Edgegw, Kind::Mosquitto];
        let met = |row: Row| judge(&row, &kinds).2;
        assert_eq!(met(p99_row(50.0, 100.0, None)), "yes");
        assert_eq!(met(p99_row(50.0, 100.0, Some(0.55))), "yes");
        assert_eq!(
            met(p99_row(50.0, 100.0, Some(1.06))),
            "**no** (median per round 1.06×)",
            "the pooled p99 rests on Mosquitto's noisiest round"
        );
        assert_eq!(met(p99_row(70.0, 100.0, Some(0.5))), "**no**");
    }
}
