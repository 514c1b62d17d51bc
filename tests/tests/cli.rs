//! The `edgegw` binary and its operations: version and help, `check`, exit codes, port
//! conflicts, SIGTERM, the metrics/health endpoints, and TLS listeners (server and client
//! certificates) exercised with Debian's mosquitto clients.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use edgegw_tests::{
    Gateway, binary,
    raw::{self, Publish, Raw},
    require_mosquitto_clients,
};

const WAIT: Duration = Duration::from_secs(10);

/// Runs a command to completion, killing it (and failing) after `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    edgegw_tests::finish_within(child, timeout, &format!("{cmd:?}"))
}

fn edgegw(args: &[&str]) -> Output {
    output_within(
        Command::new(binary()).args(args).env_remove("RUST_LOG"),
        Duration::from_secs(30),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/gateway.yaml")
}

// ---------------------------------------------------------------------------------------
// Version and help.

#[test]
fn version_and_help() {
    let out = edgegw(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("edgegw {}", env!("CARGO_PKG_VERSION"))
    );

    let out = edgegw(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "Usage: edgegw <COMMAND>",
        "run",
        "Run the gateway until SIGINT or SIGTERM",
        "check",
        "Validate a config file and exit",
        "--version",
        "edgegw check -c gateway.yaml",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }

    let out = edgegw(&["run", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "Usage: edgegw run",
        "-c, --config <FILE>",
        "127.0.0.1:1883",
        "SIGTERM",
        "0 after a clean shutdown",
        "64 for a bad config",
        "1 for any other failure",
    ] {
        assert!(
            help.contains(needle),
            "run --help lacks {needle:?}:\n{help}"
        );
    }

    let out = edgegw(&["check", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "Usage: edgegw check --config <FILE>",
        "-c, --config <FILE>",
        "FILE:LINE:COLUMN",
        "Exit code 0 when",
        "64 when not",
    ] {
        assert!(
            help.contains(needle),
            "check --help lacks {needle:?}:\n{help}"
        );
    }

    // No command: usage on stderr, failure.
    let out = edgegw(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Usage: edgegw <COMMAND>"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// `edgegw check`.

/// 1-based (line, column) of the first occurrence of `needle` in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    positions_of(text, needle)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("{needle:?} not in the file"))
}

/// 1-based (line, column) of each line's first occurrence of `needle` in `text`.
fn positions_of(text: &str, needle: &str) -> Vec<(usize, usize)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .collect()
}

#[test]
fn shipped_example_is_rejected_for_its_missing_files() {
    let config = shipped_config();
    let yaml = std::fs::read_to_string(&config).unwrap();
    let files = [
        ("cert", "/etc/edgegw/tls/server.pem"),
        ("key", "/etc/edgegw/tls/server.key"),
        ("client_ca", "/etc/edgegw/tls/ca.pem"),
    ];
    let password_file = "/etc/edgegw/passwd";
    for path in files.iter().map(|(_, path)| *path).chain([password_file]) {
        assert!(
            !Path::new(path).exists(),
            "{path} exists on this machine; this test expects it missing"
        );
    }
    let out = edgegw(&["check", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = text(&out.stderr);
    let shown = config.display().to_string();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{shown}:")))
        .collect();
    assert_eq!(
        errors.len(),
        6,
        "exactly the TLS files (three of the mqtts listener, two of the wss one) and the password file:\n{stderr}"
    );
    // In listener order: the mqtts listener's files, then the wss listener's.
    let mut expected: Vec<(&str, &str, (usize, usize))> = Vec::new();
    for (key, path) in files {
        for position in positions_of(&yaml, &format!("{key}: {path}")) {
            expected.push((key, path, position));
        }
    }
    expected.sort_by_key(|(_, _, position)| *position);
    assert_eq!(expected.len(), 5, "{expected:?}");
    for ((key, path, (l, c)), line) in expected.iter().zip(&errors) {
        let value_column = c + key.len() + 2;
        let prefix = format!("{shown}:{l}:{value_column}: ");
        assert!(
            line.starts_with(&prefix),
            "{key}: want {prefix:?}, got {line:?}"
        );
        assert!(line.contains(&format!("TLS {key} file {path}")), "{line}");
        assert!(line.contains("No such file"), "{line}");
    }
    let (l, c) = position_of(&yaml, &format!("password_file: {password_file}"));
    let prefix = format!("{shown}:{l}:{}: ", c + "password_file: ".len());
    assert!(errors[5].starts_with(&prefix), "want {prefix:?}: {stderr}");
    assert!(
        errors[5].contains(&format!("edgegw passwd {password_file} USER")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("6 problems found in {shown}")),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        text(&out.stdout)
    );

    // Apart from those files the example is valid: with real files it passes.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let users = dir.path().join("passwd");
    std::fs::write(&users, "# no users yet\n").unwrap();
    let fixed = yaml
        .replace(password_file, users.to_str().unwrap())
        .replace(
            "/etc/edgegw/tls/server.pem",
            pki.server_cert.to_str().unwrap(),
        )
        .replace(
            "/etc/edgegw/tls/server.key",
            pki.server_key.to_str().unwrap(),
        )
        .replace("/etc/edgegw/tls/ca.pem", pki.ca_cert.to_str().unwrap());
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, fixed).unwrap();
    let out = edgegw(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("ok: "), "{stdout}");
    for needle in [
        "pi-kitchen",
        "mqtt://0.0.0.0:1883",
        "mqtts://0.0.0.0:8883",
        "ws://0.0.0.0:8080/mqtt (any path)",
        "wss://0.0.0.0:8443/mqtt",
        "anonymous clients refused",
        &format!("users from {}", users.display()),
        "ACL: 4 rules, default deny",
        "http://127.0.0.1:9100/metrics",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}: {stdout}"
        );
    }

    // A bad line in the password file is a config error naming file and line.
    std::fs::write(&users, "# users\nalice:not-a-hash\n").unwrap();
    let out = edgegw(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:2: user `alice`: not a PHC hash string",
            users.display()
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn check_accepts_a_valid_file_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.yaml");
    std::fs::write(
        &path,
        format!(
            "gateway:\n  id: shed-2\n  data_dir: {}\nbroker:\n  listeners:\n    - bind: 127.0.0.1:1884\n  limits:\n    max_keepalive: 2m\n    max_packet_size: 64KiB\nmetrics:\n  bind: 127.0.0.1:9201\nlog:\n  level: info,edgegw_broker=debug\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = edgegw(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("ok: "), "{stdout}");
    for needle in [
        "shed-2",
        "mqtt://127.0.0.1:1884",
        "anonymous clients allowed",
        "http://127.0.0.1:9201/metrics",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}: {stdout}"
        );
    }
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    assert!(
        !dir.path().join("data").exists(),
        "check must not create the data directory"
    );
}

/// Runs `check` on `yaml`; returns (exit code, error lines, whole stderr, file name shown).
fn check_text(yaml: &str) -> (Option<i32>, Vec<String>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = edgegw(&["check", "-c", path.to_str().unwrap()]);
    let shown = path.display().to_string();
    let stderr = text(&out.stderr);
    let errors = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{shown}:")))
        .map(str::to_string)
        .collect();
    assert!(
        out.stdout.is_empty(),
        "no `ok` for a broken file: {}",
        text(&out.stdout)
    );
    (out.status.code(), errors, stderr, shown)
}

#[test]
fn check_reports_every_error_with_its_position() {
    // Errors in three sections: all reported, each with file:line:col.
    let (code, errors, stderr, file) = check_text(
        "gateway:\n  id: t\nbroker:\n  limits:\n    max_conections: 5\nmetrics:\n  bind: nowhere\nlog:\n  levle: debug\n",
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(errors.len(), 3, "{stderr}");
    assert!(
        errors[0].starts_with(&format!("{file}:5:5: unknown key `max_conections`")),
        "{stderr}"
    );
    assert!(
        errors[0].contains("did you mean `max_connections`?"),
        "{stderr}"
    );
    assert!(errors[1].starts_with(&format!("{file}:7:9: ")), "{stderr}");
    assert!(
        errors[1].contains("metrics.bind") && errors[1].contains("socket address"),
        "{stderr}"
    );
    assert!(
        errors[2].starts_with(&format!("{file}:9:3: unknown key `levle`")),
        "{stderr}"
    );
    assert!(errors[2].contains("did you mean `level`?"), "{stderr}");
    assert!(
        stderr.contains(&format!("3 problems found in {file}")),
        "{stderr}"
    );

    // A duration without unit, and a listener address without port.
    let (code, errors, stderr, file) =
        check_text("broker:\n  limits:\n    max_keepalive: 30\nmetrics:\n  bind: 127.0.0.1\n");
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[0].starts_with(&format!("{file}:3:20: ")), "{stderr}");
    assert!(
        errors[0].contains("no unit") && errors[0].contains("`30s`"),
        "{stderr}"
    );
    assert!(errors[1].starts_with(&format!("{file}:5:9: ")), "{stderr}");
    assert!(errors[1].contains("socket address"), "{stderr}");

    // Value checks: every one is reported, each at its key.
    let (code, errors, stderr, file) = check_text(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:1883\n  limits:\n    receive_maximum: 0\n    max_packet_size: 10\n    max_queued: 0\n",
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(errors.len(), 3, "{stderr}");
    for (line, column, needle) in [
        (5, 22, "receive_maximum"),
        (6, 22, "max_packet_size"),
        (7, 17, "max_queued"),
    ] {
        let prefix = format!("{file}:{line}:{column}: {needle}");
        assert!(
            errors.iter().any(|e| e.starts_with(&prefix)),
            "{prefix}: {stderr}"
        );
    }
    assert!(stderr.contains("3 problems found"), "{stderr}");

    // YAML syntax: one error at the broken line.
    let (code, errors, stderr, file) =
        check_text("broker:\n  listeners:\n    - bind: 127.0.0.1:0\n   limits: [\n");
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].starts_with(&format!("{file}:4:")), "{stderr}");
    assert!(stderr.contains("1 problem found"), "{stderr}");
}

#[test]
fn run_with_a_broken_config_exits_64_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        format!(
            "gateway:\n  data_dir: {}\nbroker:\n  limits:\n    max_conections: 5\nmetrics:\n  bind: 127.0.0.1:0\n",
            data.display()
        ),
    )
    .unwrap();
    let out = edgegw(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:5:5: unknown key `max_conections`",
            path.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("not started"), "{stderr}");
    assert!(
        !stderr.contains("Ready.") && !text(&out.stdout).contains("Ready."),
        "{out:?}"
    );
    assert!(
        !data.exists(),
        "a rejected config must not create the data directory"
    );

    // A missing file is a config error too.
    let out = edgegw(&[
        "run",
        "-c",
        dir.path().join("missing.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        text(&out.stderr).contains("cannot read the config file"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------
// `edgegw run`: start-up failures and shutdown.

#[test]
fn port_in_use_exits_1_naming_the_address() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, mqtt, metrics) in [
        ("mqtt", busy.to_string(), "127.0.0.1:0".to_string()),
        ("metrics", "127.0.0.1:0".to_string(), busy.to_string()),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "gateway:\n  data_dir: {}\nbroker:\n  listeners:\n    - bind: {mqtt}\nmetrics:\n  bind: {metrics}\nlog:\n  format: json\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out = edgegw(&["run", "-c", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stderr = text(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("edgegw: "))
            .unwrap_or_else(|| panic!("{name}: no `edgegw: ` error line: {stderr}"));
        assert!(
            line.contains(&busy.to_string()),
            "{name}: the address is named: {line}"
        );
        assert!(line.contains("in use"), "{name}: {line}");
        assert!(!text(&out.stdout).contains("\"Ready.\""), "{name}: {out:?}");
    }
    drop(held);
}

#[test]
fn sigterm_stops_the_gateway_with_exit_code_0() {
    let gw = Gateway::start();
    let mut client = Raw::connect(gw.mqtt);
    client.send(&raw::connect_v3("bye", true, 30));
    assert_eq!(client.read(WAIT).expect("CONNACK").body, vec![0, 0]);
    let status = gw.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut seen = Vec::new();
    assert!(
        client.closed_within(WAIT, &mut seen),
        "clients are disconnected on shutdown"
    );
}

// ---------------------------------------------------------------------------------------
// Metrics and health.

const BROKER_METRICS: &[(&str, &str)] = &[
    ("edgegw_broker_connections", "gauge"),
    ("edgegw_broker_connections_accepted_total", "counter"),
    ("edgegw_broker_connections_refused_total", "counter"),
    ("edgegw_broker_messages_received_total", "counter"),
    ("edgegw_broker_messages_sent_total", "counter"),
    ("edgegw_broker_received_payload_bytes_total", "counter"),
    ("edgegw_broker_sent_payload_bytes_total", "counter"),
    ("edgegw_broker_dropped_messages_total", "counter"),
    ("edgegw_broker_subscriptions", "gauge"),
    ("edgegw_broker_retained_messages", "gauge"),
    ("edgegw_broker_sessions", "gauge"),
    ("edgegw_broker_queued_messages", "gauge"),
    ("edgegw_broker_protocol_errors_total", "counter"),
    ("edgegw_broker_wills_published_total", "counter"),
];

#[test]
fn metrics_and_health_endpoints() {
    let gw = Gateway::start();
    assert_eq!(gw.http_get("/readyz").0, 200, "ready after start");
    let (status, body) = gw.http_get("/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    assert_eq!(gw.http_get("/nope").0, 404);
    assert_eq!(gw.http_get("/metrics/extra").0, 404);

    // Some traffic, a refused client and a protocol error, so every metric has a sample.
    let mut sub = Raw::connect(gw.mqtt);
    sub.send(&raw::connect_v3("m-sub", true, 30));
    sub.read(WAIT).expect("CONNACK");
    sub.send(&raw::subscribe_v3(1, "m/#", 1));
    sub.read(WAIT).expect("SUBACK");
    let mut publisher = Raw::connect(gw.mqtt);
    publisher.send(&raw::connect_v3("m-pub", true, 30));
    publisher.read(WAIT).expect("CONNACK");
    publisher.send(&raw::publish_v3("m/1", 1, 1, false, b"12345"));
    assert_eq!(publisher.read(WAIT).expect("PUBACK").kind(), raw::PUBACK);
    let p = sub.read(WAIT).expect("PUBLISH");
    let p = Publish::parse(&p, false);
    sub.send(&raw::ack(raw::PUBACK, p.packet_id.unwrap()));
    let mut refused = Raw::connect(gw.mqtt);
    refused.send(&raw::connect_v3("m-refused", true, 3600));
    assert_eq!(refused.read(WAIT).expect("CONNACK").body, vec![0, 2]);
    let mut garbage = Raw::connect(gw.mqtt);
    garbage.try_send(b"\xff\xff\xff\xff\x7f");
    assert!(garbage.closed_within(WAIT, &mut Vec::new()));
    gw.wait_metric("edgegw_broker_messages_sent_total{qos=\"1\"}", WAIT, |v| {
        v >= 1.0
    });

    let (status, body) = gw.http_get("/metrics");
    assert_eq!(status, 200);
    for (name, kind) in BROKER_METRICS {
        let help = format!("# HELP {name} ");
        let help_line = body.lines().find(|l| l.starts_with(&help));
        assert!(
            help_line.is_some_and(|l| l.len() > help.len() + 10),
            "{name}: no HELP text in\n{body}"
        );
        assert!(
            body.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "{name}: no `# TYPE {name} {kind}` in\n{body}"
        );
        assert!(
            body.lines().any(|l| !l.starts_with('#')
                && (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))),
            "{name}: no sample in\n{body}"
        );
    }
    assert_eq!(
        gw.metric("edgegw_broker_messages_received_total{qos=\"1\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("edgegw_broker_received_payload_bytes_total{qos=\"1\"}"),
        5.0
    );
    assert_eq!(
        gw.metric("edgegw_broker_connections{protocol=\"3.1.1\"}"),
        2.0
    );
    assert_eq!(gw.metric("edgegw_broker_subscriptions"), 1.0);
    assert!(
        gw.metric("edgegw_broker_connections_refused_total{reason=\"keepalive_too_long\"}") >= 1.0
    );
    assert!(gw.metric("edgegw_broker_protocol_errors_total{kind=\"malformed\"}") >= 1.0);
}

// ---------------------------------------------------------------------------------------
// TLS.

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all
/// signed by the CA; plus an unrelated CA with its own client certificate.
struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca_cert: PathBuf,
    other_client_cert: PathBuf,
    other_client_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let leaf = |name: &str,
                    sans: Vec<String>,
                    usage: ExtendedKeyUsagePurpose,
                    issuer: &(rcgen::Certificate, KeyPair)| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer.0, &issuer.1).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let main = ca("edgegw test CA");
        let other = ca("someone else's CA");
        let server = leaf(
            "127.0.0.1",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &main,
        );
        let client = leaf(
            "sensor-1",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            &main,
        );
        let other_client = leaf(
            "intruder",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        );
        Self {
            ca_cert: write("ca.pem", main.0.pem()),
            server_cert: write("server.pem", server.0),
            server_key: write("server.key", server.1),
            client_cert: write("client.pem", client.0),
            client_key: write("client.key", client.1),
            other_ca_cert: write("other-ca.pem", other.0.pem()),
            other_client_cert: write("other-client.pem", other_client.0),
            other_client_key: write("other-client.key", other_client.1),
        }
    }
}

/// mosquitto_pub over TLS at QoS 1; `extra` adds e.g. `--cafile`/`--cert`/`--key`.
fn mosquitto_pub_tls(port: u16, topic: &str, message: &str, extra: &[&Path]) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        message,
    ]);
    let flags = ["--cafile", "--cert", "--key"];
    for (flag, path) in flags.iter().zip(extra) {
        cmd.arg(flag).arg(path);
    }
    output_within(&mut cmd, Duration::from_secs(30))
}

/// A plain-TCP subscriber (QoS 0) that tells what arrived over any listener.
fn watcher(gw: &Gateway, filter: &str) -> Raw {
    let mut w = Raw::connect(gw.mqtt);
    w.send(&raw::connect_v3("tls-watcher", true, 30));
    assert_eq!(w.read(WAIT).expect("CONNACK").body, vec![0, 0]);
    w.send(&raw::subscribe_v3(1, filter, 0));
    assert_eq!(w.read(WAIT).expect("SUBACK").kind(), raw::SUBACK);
    w
}

fn next_payload(w: &mut Raw) -> String {
    let p = w.read(WAIT).expect("a PUBLISH on the watcher");
    String::from_utf8(Publish::parse(&p, false).payload).unwrap()
}

#[test]
fn tls_listener_with_mosquitto_clients() {
    require_mosquitto_clients();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let gw = Gateway::start_with(
        "",
        &format!(
            "    - bind: 127.0.0.1:0\n      tls: {{ cert: {}, key: {} }}\n",
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    );
    let tls = gw.mqtts.expect("the TLS listener is logged as mqtts://");
    let port = tls.port().to_string();
    let mut w = watcher(&gw, "tls/#");

    // Subscribe and publish over TLS, MQTT 5 and 3.1.1.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile"])
        .arg(&pki.ca_cert)
        .args([
            "-V", "mqttv5", "-q", "1", "-t", "tls/#", "-v", "-C", "2", "-W", "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(
        gw.wait_metric("edgegw_broker_subscriptions", WAIT, |v| v >= 2.0),
        2.0,
        "mosquitto_sub subscribed over TLS"
    );
    let out = mosquitto_pub_tls(tls.port(), "tls/a", "over tls", &[&pki.ca_cert]);
    assert!(
        out.status.success(),
        "mosquitto_pub over TLS: {}",
        text(&out.stderr)
    );
    assert_eq!(next_payload(&mut w), "over tls");
    let out = output_within(
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port, "--cafile"])
            .arg(&pki.ca_cert)
            .args(["-V", "mqttv311", "-q", "2", "-t", "tls/b", "-m", "by name"]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "mosquitto_pub to localhost: {}",
        text(&out.stderr)
    );
    assert_eq!(next_payload(&mut w), "by name");
    let sub_out = output_within_child(sub, Duration::from_secs(40));
    assert!(
        sub_out.status.success(),
        "mosquitto_sub: {}",
        text(&sub_out.stderr)
    );
    assert_eq!(
        text(&sub_out.stdout).lines().collect::<Vec<_>>(),
        vec!["tls/a over tls", "tls/b by name"]
    );

    // A client that trusts another CA refuses the server; nothing is published.
    let errors_before = gw.metric("edgegw_broker_protocol_errors_total{kind=\"tls\"}");
    let out = mosquitto_pub_tls(tls.port(), "tls/c", "wrong ca", &[&pki.other_ca_cert]);
    assert!(!out.status.success(), "wrong CA must fail: {out:?}");
    // Plain MQTT on the TLS port gets no CONNACK.
    let mut plain = Raw::connect(tls);
    plain.send(&raw::connect_v3("plain-on-tls", true, 30));
    let mut seen = Vec::new();
    assert!(
        plain.closed_within(WAIT, &mut seen),
        "plain MQTT on the TLS port is closed"
    );
    assert!(seen.iter().all(|p| p.kind() != raw::CONNACK), "{seen:?}");
    let errors = gw.wait_metric(
        "edgegw_broker_protocol_errors_total{kind=\"tls\"}",
        WAIT,
        |v| v >= errors_before + 2.0,
    );
    assert!(
        errors >= errors_before + 2.0,
        "failed handshakes are counted: {errors}"
    );

    let out = mosquitto_pub_tls(tls.port(), "tls/d", "after", &[&pki.ca_cert]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        next_payload(&mut w),
        "after",
        "the wrong-CA message never arrived"
    );
}

fn output_within_child(mut child: std::process::Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("process did not finish within {timeout:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_listener_requiring_client_certificates() {
    require_mosquitto_clients();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let gw = Gateway::start_with(
        "",
        &format!(
            "    - bind: 127.0.0.1:0\n      tls:\n        cert: {}\n        key: {}\n        client_ca: {}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_cert.display()
        ),
    );
    let tls = gw.mqtts.expect("the TLS listener is logged as mqtts://");
    let mut w = watcher(&gw, "cc/#");

    let out = mosquitto_pub_tls(tls.port(), "cc/none", "no cert", &[&pki.ca_cert]);
    assert!(
        !out.status.success(),
        "a client without a certificate must be rejected: {out:?}"
    );

    let out = mosquitto_pub_tls(
        tls.port(),
        "cc/other",
        "foreign cert",
        &[&pki.ca_cert, &pki.other_client_cert, &pki.other_client_key],
    );
    assert!(
        !out.status.success(),
        "a certificate from another CA must be rejected: {out:?}"
    );

    let out = mosquitto_pub_tls(
        tls.port(),
        "cc/ok",
        "with cert",
        &[&pki.ca_cert, &pki.client_cert, &pki.client_key],
    );
    assert!(
        out.status.success(),
        "a certificate signed by client_ca works: {}",
        text(&out.stderr)
    );
    assert_eq!(
        next_payload(&mut w),
        "with cert",
        "only the authenticated client's message arrives"
    );
    assert!(gw.metric("edgegw_broker_protocol_errors_total{kind=\"tls\"}") >= 2.0);
}

#[test]
fn ble_nodes_need_a_build_with_the_ble_feature() {
    // The tests run the default build, which leaves the BlueZ binding out.
    let (code, _, stderr, _) =
        check_text("nodes:\n  ble:\n    - { address: \"AA:BB:CC:DD:EE:FF\" }\n");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("built without BLE support") && stderr.contains("--features ble"),
        "{stderr}"
    );
}

#[test]
fn reload_command_applies_the_config_or_says_why_not() {
    let gw = Gateway::start();
    let config = gw.config.to_str().unwrap().to_string();
    let socket = gw.dir.path().join("data").join("control.sock");
    let out = edgegw(&["reload", "-c", &config]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("ok: reloaded") && stdout.contains("0 pipelines"),
        "{stdout}"
    );
    assert!(gw.metric("edgegw_pipeline_reloads_total{result=\"ok\"}") >= 1.0);

    // A broken config: the gateway refuses it, says where, and keeps running as it was.
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, good.replace("level: debug", "level: loud")).unwrap();
    let out = edgegw(&["reload", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("everything keeps running")
            && stderr.contains(&format!("{config}:"))
            && stderr.contains("log.level directive `loud`"),
        "{stderr}"
    );
    assert!(gw.metric("edgegw_pipeline_reloads_total{result=\"failed\"}") >= 1.0);
    // Through -c the command reads the broken file itself and refuses the same way.
    let out = edgegw(&["reload", "-c", &config]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(text(&out.stderr).contains("log.level directive `loud`"));
    // The control socket is the gateway's own: mode 0600.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // No gateway there: exit code 1 and what to check.
    drop(gw);
    let out = edgegw(&["reload", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no gateway answers"), "{out:?}");
}
