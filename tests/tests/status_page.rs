//! The status page (`GET /` on the metrics listener) end to end: Debian's headless Chromium
//! loads it from the real gateway while an MQTT client is connected and messages flow through
//! pipelines; the page's JavaScript fetches `/metrics` and `/status.json`, and the DOM it
//! leaves (`--dump-dom`, after a few refreshes in virtual time) must show the live figures,
//! with no console message or uncaught exception in Chromium's log. A second run loads the
//! page through a proxy that stops answering after the first refresh, as a stopped gateway
//! would; a third checks that the page is self-contained.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use edgegw_tests::{CHROMIUM, Gateway, finish_within, mosquitto::free_port, require_chromium};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

mod common;

use common::WAIT;

const GATEWAY_ID: &str = "status-page-gw";
/// Virtual time the page runs for in Chromium: refreshes at 0, 2 and 4 s, so rates (from the
/// deltas between two refreshes) are shown too.
const BUDGET_MS: u32 = 5000;
/// Messages published through each pipeline.
const MESSAGES: u32 = 5;

fn wasm(name: &str) -> String {
    edgegw_rules::testing::build_plugins()
        .path(name)
        .display()
        .to_string()
}

/// A gateway with a pipeline without rules (`raw`), one with a rule (`temps`) and an uplink
/// to a port nobody listens on (so that warnings show up in the page's error list).
fn start_gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let config = format!(
        "gateway:\n  id: {GATEWAY_ID}\n  data_dir: {data}\n\
         broker:\n  listeners:\n    - bind: 127.0.0.1:0\n\
         plugins:\n  - {{ name: c2f, path: {c2f} }}\n\
         pipelines:\n\
         \x20 - {{ name: raw, from: [ \"raw/#\" ], to: [ \"local:out/{{topic}}\" ] }}\n\
         \x20 - {{ name: temps, from: [ \"sensors/+/temp\" ], rules: [ {{ plugin: c2f, config: {{ field: temp }} }} ], to: [ \"local:out/{{topic}}\" ] }}\n\
         uplinks:\n\
         \x20 - {{ name: cloud, url: \"mqtt://127.0.0.1:{closed}\", forward: [ {{ from: \"out/#\" }} ] }}\n\
         metrics:\n  bind: 127.0.0.1:0\n\
         log:\n  level: debug\n  format: json\n",
        data = dir.path().join("data").display(),
        c2f = wasm("celsius-to-fahrenheit"),
        closed = free_port(),
    );
    std::fs::write(&path, config).unwrap();
    Gateway::start_file(&path, dir)
}

/// Loads `url` in headless Chromium for [`BUDGET_MS`] of virtual time: (the DOM it leaves,
/// Chromium's log).
fn chromium_dump(url: &str) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--enable-logging=stderr", "--v=0"])
        .arg(format!("--virtual-time-budget={BUDGET_MS}"))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let output = finish_within(child, Duration::from_secs(90), "chromium --dump-dom");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium failed ({}); log:\n{log}",
        output.status
    );
    (dom, log)
}

/// Lines of Chromium's log about the page's console or an uncaught exception, e.g.
/// `[..:INFO:CONSOLE:2] "message", source: http://127.0.0.1:1234/ (2)` (every level of
/// `console.*` is logged like this).
fn console_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect()
}

/// The start tag of the first element of `html` (from `from` on) containing `needle` in its
/// start tag, and the text right after it (up to the next tag).
fn element<'a>(html: &'a str, needle: &str) -> (&'a str, &'a str) {
    let at = html
        .find(needle)
        .unwrap_or_else(|| panic!("no element with {needle} in the DOM:\n{html}"));
    let start = html[..at].rfind('<').unwrap();
    let end = at + html[at..].find('>').unwrap();
    let text = html[end + 1..].split('<').next().unwrap();
    (&html[start..=end], text)
}

/// The value of attribute `name` in a start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    tag[at..].split('"').next()
}

/// The `data-value` of the element with `needle`, as a number (panics when it is empty).
fn value(html: &str, needle: &str) -> f64 {
    let (tag, _) = element(html, needle);
    let raw = attr(tag, "data-value").unwrap_or_else(|| panic!("no data-value in {tag}"));
    raw.parse()
        .unwrap_or_else(|_| panic!("{needle}: data-value {raw:?} is not a number: {tag}"))
}

/// The table row (`<tr ...>` to `</tr>`) whose start tag contains `needle`.
fn row<'a>(html: &'a str, needle: &str) -> &'a str {
    let (tag, _) = element(html, needle);
    let start = html.find(tag).unwrap();
    let end = start + html[start..].find("</tr>").expect("</tr>");
    &html[start..end]
}

/// The sum over all series of `name` in a Prometheus text body.
fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// An MQTT client (v3.1.1) that stays connected while it lives.
fn connect(gw: &Gateway) -> Client {
    let mut options = MqttOptions::new("status-page-client", "127.0.0.1", gw.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 100);
    let (connected_tx, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = connected_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    connected.recv_timeout(WAIT).expect("CONNACK");
    client
}

#[test]
fn status_page_shows_live_figures_in_headless_chromium() {
    require_chromium();
    let gw = start_gateway();
    let client = connect(&gw);
    for i in 0..MESSAGES {
        client
            .publish(
                "raw/a",
                QoS::AtLeastOnce,
                false,
                format!("{i}").into_bytes(),
            )
            .unwrap();
        client
            .publish(
                "sensors/kitchen/temp",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"temp": {i}}}"#).into_bytes(),
            )
            .unwrap();
    }
    for pipeline in ["raw", "temps"] {
        let sample = format!("edgegw_pipeline_messages_total{{pipeline=\"{pipeline}\"}}");
        let got = gw.wait_metric(&sample, WAIT, |v| v >= f64::from(MESSAGES));
        assert_eq!(got, f64::from(MESSAGES), "{sample}");
    }
    let invocations =
        "edgegw_rules_invocations_total{pipeline=\"temps\",plugin=\"c2f\",result=\"ok\"}";
    gw.wait_metric(invocations, WAIT, |v| v >= f64::from(MESSAGES));
    assert!(
        gw.wait_log(WAIT, |l| l["level"] == "WARN"
            && l["fields"]["uplink"] == "cloud"),
        "no uplink warning: {:#?}",
        gw.logs()
    );
    let (_, metrics) = gw.http_get("/metrics");
    let clients = metric_sum(&metrics, "edgegw_broker_connections");
    assert_eq!(clients, 1.0, "the gateway's own count:\n{metrics}");

    let (dom, log) = chromium_dump(&format!("http://{}/", gw.metrics));
    let (_, metrics) = gw.http_get("/metrics");
    assert_eq!(metric_sum(&metrics, "edgegw_broker_connections"), 1.0);

    let console = console_lines(&log);
    assert!(
        console.is_empty(),
        "the page wrote to the console or threw:\n{}",
        console.join("\n")
    );
    // Header.
    assert_eq!(element(&dom, "id=\"gw-id\"").1, GATEWAY_ID, "{dom}");
    assert_eq!(element(&dom, "id=\"version\"").1, env!("CARGO_PKG_VERSION"));
    assert_eq!(element(&dom, "id=\"ready\"").1, "ready");
    assert!(
        element(&dom, "id=\"listeners\"")
            .1
            .contains(&format!("mqtt://{}", gw.mqtt)),
        "{dom}"
    );
    let (banner, _) = element(&dom, "id=\"banner\"");
    assert!(banner.contains(" hidden"), "error banner shown: {banner}");
    assert!(value(&dom, "id=\"updated\"") > 0.0, "never updated");
    // Tiles.
    assert_eq!(value(&dom, "id=\"clients\""), clients);
    assert_eq!(element(&dom, "id=\"clients\"").1, "1");
    assert_eq!(value(&dom, "id=\"nodes\""), 0.0);
    assert!(value(&dom, "id=\"msg-in-total\"") >= f64::from(2 * MESSAGES));
    // Refreshed more than once: rates are shown (their size depends on virtual time).
    assert!(value(&dom, "id=\"msg-in-rate\"") >= 0.0);
    assert_eq!(value(&dom, "id=\"dropped\""), 0.0);
    // Pipelines: a row each, with the messages taken in; the rule's calls under `temps`.
    for pipeline in ["raw", "temps"] {
        let tr = row(&dom, &format!("data-pipeline=\"{pipeline}\""));
        assert_eq!(
            value(tr, "data-field=\"messages\""),
            f64::from(MESSAGES),
            "{tr}"
        );
        assert!(value(tr, "data-field=\"rate\"") >= 0.0, "{tr}");
        assert_eq!(value(tr, "data-field=\"queue\""), 0.0, "{tr}");
        assert_eq!(value(tr, "data-field=\"deadletter\""), 0.0, "{tr}");
    }
    let rule = row(&dom, "data-rule=\"temps/c2f\"");
    assert_eq!(
        value(rule, "data-field=\"invocations\""),
        f64::from(MESSAGES),
        "{rule}"
    );
    assert!(
        element(rule, "data-field=\"invocations\"")
            .1
            .contains(&format!("ok {MESSAGES}")),
        "{rule}"
    );
    let mean = value(rule, "data-field=\"mean\"");
    let p99 = value(rule, "data-field=\"p99\"");
    assert!(mean > 0.0 && mean < 10.0 && p99 > 0.0, "{rule}");
    // Uplinks: `cloud` cannot connect.
    let tr = row(&dom, "data-uplink=\"cloud\"");
    assert_eq!(value(tr, "data-field=\"connected\""), 0.0, "{tr}");
    assert_eq!(element(tr, "data-field=\"connected\"").1, "no", "{tr}");
    // Recent warnings, as text: the uplink's connection failures.
    assert!(value(&dom, "id=\"error-count\"") >= 1.0);
    let (_, target) = element(&dom, "class=\"tgt\"");
    assert!(target.starts_with("edgegw_uplink"), "{dom}");
    assert!(dom.contains("<li data-level=\"WARN\">"), "{dom}");
    drop(client);
}

/// A loopback proxy in front of the gateway's metrics listener that forwards `GET /` and the
/// first `/metrics` and `/status.json`, then closes every other connection unanswered, as a
/// gateway that stopped.
struct FirstRoundProxy {
    addr: SocketAddr,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FirstRoundProxy {
    fn start(gateway: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(HashSet::new()));
        let (refused2, stop2) = (refused.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (served, refused) = (served.clone(), refused2.clone());
                std::thread::spawn(move || proxy_one(stream, gateway, &served, &refused));
            }
        });
        Self {
            addr,
            refused,
            stop,
        }
    }
}

impl Drop for FirstRoundProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn proxy_one(
    mut stream: TcpStream,
    gateway: SocketAddr,
    served: &Mutex<HashSet<String>>,
    refused: &AtomicUsize,
) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return, // e.g. a preconnect that never sent a request
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split(' ').nth(1).unwrap_or("").to_owned();
    let first = path == "/" || served.lock().unwrap().insert(path);
    if !first {
        refused.fetch_add(1, Ordering::SeqCst);
        return; // closed without an answer
    }
    let mut upstream = TcpStream::connect(gateway).expect("connect to the gateway");
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    upstream.write_all(&head).unwrap();
    let mut response = Vec::new();
    let _ = upstream.read_to_end(&mut response);
    let _ = stream.write_all(&response);
}

#[test]
fn status_page_reports_a_stopped_gateway_and_keeps_the_last_figures() {
    require_chromium();
    let gw = start_gateway();
    let proxy = FirstRoundProxy::start(gw.metrics);

    let (dom, log) = chromium_dump(&format!("http://{}/", proxy.addr));
    assert!(
        proxy.refused.load(Ordering::SeqCst) >= 2,
        "the page did not refresh after the first round"
    );
    drop(proxy);
    let console = console_lines(&log);
    assert!(
        console.is_empty(),
        "the page wrote to the console or threw:\n{}",
        console.join("\n")
    );
    let (banner, text) = element(&dom, "id=\"banner\"");
    assert!(!banner.contains(" hidden"), "no error banner: {dom}");
    assert!(text.starts_with("Gateway unreachable"), "{text}");
    assert!(text.contains("showing data from"), "{text}");
    assert_eq!(element(&dom, "id=\"ready\"").1, "unreachable");
    assert!(dom.contains("<body class=\"stale\">"), "{dom}");
    // The first round's figures stay.
    assert_eq!(element(&dom, "id=\"gw-id\"").1, GATEWAY_ID);
    row(&dom, "data-pipeline=\"raw\"");
    assert_eq!(value(&dom, "id=\"clients\""), 0.0);
}

#[test]
fn status_page_is_self_contained_html() {
    let gw = Gateway::start();
    let mut stream = TcpStream::connect(gw.metrics).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, page) = response.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(page.starts_with("<!doctype html>"), "{page}");
    assert!(page.len() < 20 * 1024, "{} bytes", page.len());
    let lower = page.to_ascii_lowercase();
    for external in [
        "http://", "https://", "src=", "url(", "@import", "\"//", "'//",
    ] {
        assert!(
            !lower.contains(external),
            "the page must not load anything from elsewhere: {external}"
        );
    }
    // No favicon request; the data comes from relative URLs on the same listener.
    assert!(page.contains("<link rel=\"icon\" href=\"data:,\">"));
    assert!(page.contains("get(\"metrics\"") && page.contains("get(\"status.json\""));
    let (status, json) = gw.http_get("/status.json");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["gateway_id"], "test");
    assert_eq!(json["ready"], true);
}
