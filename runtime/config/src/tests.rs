use std::path::Path;

use super::*;

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml("site.yaml", text, Path::new(""))
}

fn errors(text: &str) -> Vec<String> {
    load(text)
        .expect_err("config should be rejected")
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn empty_file_is_the_default() {
    let config = load("").unwrap();
    assert_eq!(
        config.broker.listeners[0].bind.to_string(),
        "127.0.0.1:1883"
    );
    assert_eq!(config.metrics.bind.to_string(), "127.0.0.1:9100");
    assert_eq!(config.gateway.data_dir, Path::new("./edgegw-data"));
}

#[test]
fn full_example_parses() {
    let config = load(
        "gateway: { id: pi-kitchen, data_dir: /var/lib/edgegw }\n\
         broker:\n  listeners:\n    - { bind: \"0.0.0.0:1883\" }\n  auth: { allow_anonymous: false }\n  \
         limits: { max_connections: 10, max_packet_size: 64KiB, max_keepalive: 2m, receive_maximum: 5 }\n\
         metrics: { bind: \"127.0.0.1:9200\" }\nlog: { level: \"info,edgegw_broker=debug\", format: json }\n",
    )
    .unwrap();
    assert_eq!(config.gateway.id, "pi-kitchen");
    assert!(!config.broker.auth.allow_anonymous);
    assert_eq!(config.broker.limits.max_packet_size.bytes(), 65536);
    assert_eq!(config.broker.limits.max_keepalive.as_secs(), 120);
    assert_eq!(config.broker.limits.receive_maximum, 5);
    assert_eq!(
        config.broker.limits.max_inflight, 32,
        "unset keys keep defaults"
    );
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn unknown_key_is_located_and_suggested() {
    let errs = errors("broker:\n  limits:\n    max_conections: 5\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("site.yaml:3:5: "), "{errs:?}");
    assert!(errs[0].contains("unknown key `max_conections`"), "{errs:?}");
    assert!(
        errs[0].contains("did you mean `max_connections`?"),
        "{errs:?}"
    );
}

#[test]
fn unknown_top_level_section_is_suggested() {
    let errs = errors("gateway: {}\nbrokr:\n  listeners: []\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("site.yaml:2:"), "{errs:?}");
    assert!(errs[0].contains("did you mean `broker`?"), "{errs:?}");
}

#[test]
fn errors_in_several_sections_are_all_reported() {
    let errs = errors(
        "gateway:\n  idd: x\nbroker:\n  limits:\n    max_keepalive: 30\nmetrics:\n  bind: nowhere\n",
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].starts_with("site.yaml:2:3: unknown key `idd`"),
        "{errs:?}"
    );
    assert!(errs[1].starts_with("site.yaml:5:"), "{errs:?}");
    assert!(errs[1].contains("has no unit"), "{errs:?}");
    assert!(errs[2].starts_with("site.yaml:7:"), "{errs:?}");
}

#[test]
fn semantic_errors_point_at_the_value() {
    let errs = errors(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:1883\n    - bind: 127.0.0.1:1883\n  limits:\n    receive_maximum: 0\n    max_packet_size: 1GiB\n",
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].starts_with("site.yaml:4:13: listener 1 binds 127.0.0.1:1883"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("site.yaml:7:22: max_packet_size 1GiB"),
        "{errs:?}"
    );
    assert!(
        errs[2].starts_with("site.yaml:6:22: receive_maximum"),
        "{errs:?}"
    );
}

#[test]
fn missing_tls_files_are_named() {
    let errs = errors(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:8883\n      tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem }\n",
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("/nonexistent/c.pem"), "{errs:?}");
    assert!(errs[0].starts_with("site.yaml:4:"), "{errs:?}");
}

#[test]
fn syntax_error_has_a_position() {
    let errs = errors("broker:\n  listeners: [\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("site.yaml:"), "{errs:?}");
    assert!(
        errs[0].split(':').nth(1).unwrap().parse::<usize>().is_ok(),
        "{errs:?}"
    );
}

#[test]
fn env_substitution() {
    let lookup = |name: &str| (name == "PORT").then(|| "1999".to_string());
    assert_eq!(substitute_env("a: ${PORT}", lookup).unwrap(), "a: 1999");
    assert_eq!(substitute_env("a: ${NOPE:-7}", lookup).unwrap(), "a: 7");
    assert_eq!(substitute_env("a: $${PORT}", lookup).unwrap(), "a: ${PORT}");
    let (line, col, msg) = substitute_env("x: 1\na: ${NOPE}", lookup).unwrap_err();
    assert_eq!((line, col), (2, 4));
    assert!(msg.contains("`NOPE` is not set"));
}

#[test]
fn log_level_is_checked() {
    let errs = errors("log: { level: verbose }\n");
    assert!(errs[0].contains("`verbose` is not valid"), "{errs:?}");
}

#[test]
fn shipped_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/gateway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The example's TLS listener points at files that exist only on a gateway; check the
    // rest by substituting the paths to this crate's test fixtures.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let text = text.replace("/etc/edgegw/tls/", &format!("{}/", fixtures.display()));
    Config::from_yaml("gateway.yaml", &text, Path::new("")).unwrap();
}
