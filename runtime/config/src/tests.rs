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
fn a_key_in_the_wrong_section_says_where_it_belongs() {
    // One level too high: `allow_anonymous` belongs under `broker.auth`.
    let errs = errors("broker:\n  allow_anonymous: false\n");
    assert_eq!(
        errs,
        [
            "site.yaml:2:3: unknown key `allow_anonymous` in broker; `allow_anonymous` is a key \
             of broker.auth (check its indentation). Valid keys: listeners, auth, acl, limits"
        ]
    );
    // One level too deep, inside a list item; a key with two homes names both.
    let errs = errors("broker:\n  listeners:\n    - bind: 127.0.0.1:1883\n      limits: {}\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("site.yaml:4:7: "), "{errs:?}");
    assert!(
        errs[0].contains("`limits` is a key of broker and "),
        "{errs:?}"
    );
    // A section's key at the top level.
    let errs = errors("max_connections: 10\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains(
            "unknown key `max_connections` at the top level; `max_connections` is a key of \
             broker.limits (check its indentation). Valid keys: gateway, "
        ),
        "{errs:?}"
    );
    // A key of another section that is also near a valid key here (`qos`, `tls`): both,
    // the other section first.
    let errs =
        errors("uplinks:\n  - name: cloud\n    url: \"mqtt://127.0.0.1:1884\"\n    qos: 1\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "site.yaml:4:5: unknown key `qos` in uplinks[0]; `qos` is a key of \
             uplinks[].forward[], uplinks[].subscribe[] and nodes.simulated[] (check its \
             indentation), or did you mean `tls`? Valid keys: "
        ),
        "{errs:?}"
    );
    // A key nowhere in the file's schema and not near a valid one: the valid keys, after a
    // full stop.
    let errs = errors("broker:\n  wibble: 1\n");
    assert_eq!(
        errs,
        ["site.yaml:2:3: unknown key `wibble` in broker. Valid keys: listeners, auth, acl, limits"]
    );
}

#[test]
fn the_section_an_unknown_key_is_in_is_not_named_as_its_home() {
    // A key of one variant of a section written in another variant of it (serde reports it
    // unknown there): naming its own section would say nothing.
    let paths = [
        "uplinks",
        "uplinks[].tls",
        "uplinks[].tls.ca",
        "broker.auth.ca",
    ]
    .map(String::from);
    assert_eq!(
        crate::sections_with_key("ca", "uplinks[0].tls", &paths),
        ["broker.auth"]
    );
    // The nearest (longest shared start) first.
    assert_eq!(
        crate::sections_with_key("ca", "broker", &paths),
        ["broker.auth", "uplinks[].tls"]
    );
    assert_eq!(
        crate::sections_with_key("ca", "uplinks[0]", &paths),
        ["uplinks[].tls", "broker.auth"]
    );
    assert_eq!(
        crate::sections_with_key("uplinks", "broker", &paths),
        ["the top level"]
    );
}

#[test]
fn yaml_syntax_and_value_errors_say_what_to_check() {
    let cases = [
        (
            "broker:\n  listeners:\n  - bind: 127.0.0.1:1\n    tls: x\n   acl: {}\n",
            "site.yaml:5:4: did not find expected key; check this line's indentation (the keys \
             of one mapping start in the same column)",
        ),
        (
            "broker:\n  limits:\n    max_connections: 5\n      max_inflight: 3\n",
            "site.yaml:4:19: mapping values are not allowed in this context; check this \
             line's indentation, or quote a value that contains `: `",
        ),
        (
            "broker:\n\tlimits: {}\n",
            "site.yaml:2:1: found character that cannot start any token; it is a tab, and \
             YAML indents with spaces only",
        ),
        (
            "metrics: { bind: \"localhost:9100\" }\n",
            "site.yaml:1:18: metrics.bind: invalid socket address syntax; write an IP address \
             and a port, such as `0.0.0.0:1883` or `[::]:1883` (not a host name)",
        ),
        (
            "broker:\n  limits:\n    max_connections: -3\n",
            "site.yaml:3:22: broker.limits.max_connections: invalid type: integer `-3`, \
             expected a whole number, not negative",
        ),
        (
            "broker:\n  limits:\n    max_connections: 99999999999\n",
            "site.yaml:3:22: broker.limits.max_connections: invalid value: integer \
             `99999999999`, expected a whole number no larger than 4294967295",
        ),
        (
            "broker:\n  limits:\n    max_connections: lots\n",
            "site.yaml:3:22: broker.limits.max_connections: invalid type: string \"lots\", \
             expected a whole number",
        ),
        // Others as the parser words them.
        (
            "broker: [\n",
            "site.yaml:2:1: did not find expected node content",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(errors(text), [expected], "{text}");
    }
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
    let text = text.replace(
        "/etc/edgegw/passwd",
        &fixtures.join("passwd").display().to_string(),
    );
    let config = Config::from_yaml("gateway.yaml", &text, Path::new("")).unwrap();
    // The example shows the auth and ACL keys in use.
    assert!(config.broker.auth.password_file.is_some());
    assert!(!config.broker.acl.rules.is_empty());
    assert!(
        config
            .broker
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.use_identity_as_username))
    );
    // ... and WebSocket listeners, plain and inside TLS.
    let websocket = |tls: bool| {
        config
            .broker
            .listeners
            .iter()
            .any(|l| l.websocket.is_some() && l.tls.is_some() == tls)
    };
    assert!(websocket(false) && websocket(true));
}

#[test]
fn auth_and_acl_parse() {
    let dir = std::env::temp_dir().join(format!("edgegw-config-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users.txt"), "").unwrap();
    let config = Config::from_yaml(
        "site.yaml",
        "broker:\n  auth: { allow_anonymous: false, password_file: users.txt, max_failures: 3, failure_window: 2m }\n  \
         acl:\n    default: deny\n    rules:\n      \
         - { permission: deny,  action: subscribe, topics: [ \"test/nosubscribe\" ] }\n      \
         - { permission: allow, user: \"*\", action: all, topics: [ \"sensors/%u/#\" ] }\n      \
         - permission: allow\n        client_id: dev-1\n        action: publish\n        topics:\n          - \"clients/%c/status\"\n",
        &dir,
    )
    .unwrap();
    let auth = &config.broker.auth;
    assert_eq!(
        auth.password_file.as_deref(),
        Some(dir.join("users.txt").as_path()),
        "relative to the config file"
    );
    assert_eq!((auth.max_failures, auth.failure_window.as_secs()), (3, 120));
    let acl = &config.broker.acl;
    assert_eq!(acl.default, AclPermission::Deny);
    assert_eq!(acl.rules.len(), 3);
    assert_eq!(acl.rules[0].action, AclAction::Subscribe);
    assert_eq!(acl.rules[1].user.as_deref(), Some("*"));
    assert_eq!(acl.rules[1].topics, vec!["sensors/%u/#".to_string()]);
    assert_eq!(acl.rules[2].client_id.as_deref(), Some("dev-1"));
    assert!(
        config.summary().contains("ACL: 3 rules, default deny"),
        "{}",
        config.summary()
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let defaults = load("").unwrap();
    assert_eq!(defaults.broker.auth.max_failures, 5);
    assert_eq!(defaults.broker.auth.failure_window.as_secs(), 60);
    assert!(defaults.broker.auth.password_file.is_none());
    assert_eq!(defaults.broker.acl.default, AclPermission::Allow);
}

#[test]
fn acl_errors_point_at_the_value() {
    let errs = errors(
        "broker:\n  acl:\n    rules:\n      \
         - { permission: allow, action: all, topics: [ \"ok/#\", \"a/#/b\" ] }\n      \
         - { permission: deny, action: publish, user: \"sensor*\", topics: [ \"x/%y\" ] }\n      \
         - { permission: allow, action: all, topics: [] }\n      \
         - { permission: allow, action: all, topics: [ \"$share/g/a\", \"a+\" ] }\n",
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
    assert!(
        errs[0].starts_with("site.yaml:4:61: ACL rule 0: topic filter `a/#/b`"),
        "{errs:#?}"
    );
    assert!(errs[0].contains("`#` must be the last level"), "{errs:#?}");
    assert!(
        errs[1].starts_with("site.yaml:5:52: ACL rule 1: user `sensor*`"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("site.yaml:5:73: ACL rule 1: topic filter `x/%y` has a `%`"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("site.yaml:6:51: ACL rule 2 has no topics"),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with("site.yaml:7:53: ACL rule 3: topic filter `$share/g/a`"),
        "{errs:#?}"
    );
    assert!(
        errs[5].starts_with("site.yaml:7:67: ACL rule 3: topic filter `a+`"),
        "{errs:#?}"
    );
    assert!(
        errs[5].contains("`+` must occupy a whole level"),
        "{errs:#?}"
    );

    // Type errors and unknown keys in a rule are located too.
    let errs = errors(
        "broker:\n  acl:\n    rules:\n      - permission: maybe\n        action: all\n        topics: [a]\n",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("site.yaml:4:"), "{errs:#?}");
    assert!(errs[0].contains("unknown variant `maybe`"), "{errs:#?}");
    let errs = errors(
        "broker:\n  acl:\n    rules:\n      - { permision: allow, action: all, topics: [a] }\n",
    );
    assert!(errs[0].contains("did you mean `permission`?"), "{errs:#?}");
    let errs = errors("broker:\n  acl:\n    rules:\n      - { permission: allow, topics: [a] }\n");
    assert!(errs[0].contains("missing field `action`"), "{errs:#?}");
}

#[test]
fn auth_errors_point_at_the_value() {
    let errs = errors(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:8883\n      tls:\n        cert: /nonexistent/c.pem\n        key: /nonexistent/k.pem\n        use_identity_as_username: true\n  \
         auth:\n    password_file: /nonexistent/passwd\n    failure_window: 0s\n",
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[2].starts_with("site.yaml:7:35: use_identity_as_username needs client_ca"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("site.yaml:9:20: cannot read password_file /nonexistent/passwd"),
        "{errs:#?}"
    );
    assert!(
        errs[3].contains("edgegw passwd /nonexistent/passwd USER"),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with("site.yaml:10:21: failure_window must be at least 1s"),
        "{errs:#?}"
    );
    // max_failures 0 turns the limit off, so any window is fine then.
    assert!(load("broker:\n  auth: { max_failures: 0, failure_window: 0s }\n").is_ok());
}

#[test]
fn websocket_listeners_parse() {
    let config = load(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:1883\n    - { bind: 127.0.0.1:8080, websocket: true }\n    \
         - { bind: 127.0.0.1:8081, websocket: { path: /mqtt } }\n    - { bind: 127.0.0.1:8082, websocket: {} }\n    \
         - { bind: 127.0.0.1:8083, websocket: false }\n",
    )
    .unwrap();
    let websockets: Vec<_> = config
        .broker
        .listeners
        .iter()
        .map(|l| l.websocket.clone())
        .collect();
    assert_eq!(
        websockets,
        [
            None,
            Some(WebSocket { path: None }),
            Some(WebSocket {
                path: Some("/mqtt".into())
            }),
            Some(WebSocket { path: None }),
            None,
        ]
    );
    let summary = config.summary();
    assert!(
        summary.contains(
            "mqtt://127.0.0.1:1883, ws://127.0.0.1:8080/mqtt (any path), ws://127.0.0.1:8081/mqtt, "
        ),
        "{summary}"
    );
}

#[test]
fn websocket_errors_point_at_the_value() {
    let errs = errors(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:8080\n      websocket:\n        path: mqtt\n    \
         - bind: 127.0.0.1:8081\n      websocket: { path: \"/a b?x\" }\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0]
            .starts_with("site.yaml:5:15: listener 0: websocket path `mqtt` must start with `/`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with(
            "site.yaml:7:26: listener 1: websocket path `/a b?x` must be a path alone"
        ),
        "{errs:#?}"
    );

    let errs = errors(
        "broker:\n  listeners:\n    - bind: 127.0.0.1:8080\n      websocket: { paht: /mqtt }\n",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("site.yaml:4:"), "{errs:#?}");
    assert!(errs[0].contains("did you mean `path`?"), "{errs:#?}");

    let errs = errors("broker:\n  listeners:\n    - bind: 127.0.0.1:8080\n      websocket: yes\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("site.yaml:4:18: "), "{errs:#?}");
    assert!(
        errs[0].contains("`true`, `false` or a mapping"),
        "{errs:#?}"
    );
}

#[test]
fn nodes_parse() {
    let config = load(
        "nodes:\n  serial:\n    - { port: /dev/ttyUSB0 }\n    - { port: /dev/ttyACM0, baud: 9600 }\n  predefined_topics: { 1: \"sensors/{node}/temp\" }\n",
    )
    .unwrap();
    assert_eq!(config.nodes.serial.len(), 2);
    assert_eq!(config.nodes.serial[0].baud, 115_200);
    assert_eq!(config.nodes.serial[1].baud, 9600);
    assert_eq!(config.nodes.predefined_topics[&1], "sensors/{node}/temp");
}

#[test]
fn nodes_errors_point_at_the_value() {
    let errs = errors(
        "nodes:\n  serial:\n    - { port: /dev/ttyUSB0 }\n    - { port: /dev/ttyUSB0, baud: 0 }\n  predefined_topics:\n    0: \"sensors/#\"\n",
    );
    let all = errs.join("\n");
    assert!(all.contains("site.yaml:4:"), "{all}");
    assert!(all.contains("already used by entry 0"), "{all}");
    assert!(all.contains("baud must be above 0"), "{all}");
    assert!(
        all.contains("site.yaml:6:5: predefined topic id 0"),
        "{all}"
    );
    assert!(all.contains("reserved"), "{all}");
    assert!(all.contains("without wildcards"), "{all}");
    let unknown = errors("nodes:\n  serial:\n    - { port: /dev/ttyUSB0, speed: 9600 }\n");
    assert!(unknown[0].starts_with("site.yaml:3:"), "{unknown:?}");
}

#[test]
fn ble_nodes_parse_and_bad_addresses_point_at_the_value() {
    let config = load(
        "nodes:\n  ble:\n    - { address: \"AA:BB:CC:DD:EE:FF\" }\n    - { address: \"aa:bb:cc:dd:ee:01\", adapter: hci1 }\n",
    )
    .unwrap();
    assert_eq!(config.nodes.ble.len(), 2);
    assert_eq!(config.nodes.ble[0].adapter, None);
    assert_eq!(config.nodes.ble[1].adapter.as_deref(), Some("hci1"));
    let errs = errors(
        "nodes:\n  ble:\n    - { address: \"AA:BB:CC:DD:EE:FF\" }\n    - { address: \"AA:BB:CC:DD:EE\" }\n    - { address: \"aa:bb:cc:dd:ee:ff\", adapter: \"\" }\n",
    );
    let all = errs.join("\n");
    assert!(
        all.contains("site.yaml:4:") && all.contains("`AA:BB:CC:DD:EE` is not a Bluetooth address"),
        "{all}"
    );
    assert!(
        all.contains("site.yaml:5:") && all.contains("already used by entry 0"),
        "{all}"
    );
    assert!(all.contains("adapter must name an adapter"), "{all}");
}

/// The commented example below `<section>: []` in the shipped config, uncommented.
pub(crate) fn shipped_example(section: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/gateway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find(&format!("\n{section}: []")).unwrap() + 1;
    let mut out = format!("{section}:\n");
    for line in text[start..].lines().skip(1) {
        let Some(rest) = line.strip_prefix('#') else {
            break;
        };
        if rest.trim_start().starts_with('#') {
            continue;
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

/// The commented uplink example in the shipped config, uncommented.
pub(crate) fn shipped_uplink_example() -> String {
    let out = shipped_example("uplinks");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    out.replace("${CLOUD_PASSWORD}", "secret")
        .replace(
            "/etc/edgegw/cloud-ca.pem",
            &fixtures.join("ca.pem").display().to_string(),
        )
        .replace(
            "/etc/edgegw/client.pem",
            &fixtures.join("server.pem").display().to_string(),
        )
        .replace(
            "/etc/edgegw/client.key",
            &fixtures.join("server.key").display().to_string(),
        )
}

#[test]
fn shipped_uplink_example_is_valid() {
    let text = shipped_uplink_example();
    let config = load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let uplink = &config.uplinks[0];
    assert_eq!(uplink.name, "cloud");
    assert_eq!(uplink.protocol, UplinkProtocol::V5);
    assert_eq!(uplink.password.as_deref(), Some("secret"));
    assert_eq!(uplink.forward.len(), 2);
    assert_eq!(uplink.forward[1].to, "site1/temps/{2}");
    assert_eq!(uplink.subscribe[0].local, "control/{3..}");
    assert_eq!(uplink.tls.alpn, ["x-amzn-mqtt-ca"]);
    assert_eq!(uplink.outbox.on_full, OnFull::DropOldest);
    assert_eq!(uplink.outbox.fsync, FsyncPolicy::Batch);
    assert_eq!(uplink.outbox.max_age.unwrap().as_secs(), 7 * 86400);
    assert_eq!(uplink.reconnect.max.as_secs(), 60);
    assert_eq!(uplink.max_packet_size.map(|m| m.bytes()), Some(128 * 1024));
}

#[test]
fn uplink_defaults_and_protocols() {
    let config = load(
        "uplinks:\n  - { name: a, url: \"mqtt://127.0.0.1:1884\", protocol: 3.1.1, forward: [ { from: \"#\" } ] }\n  - { name: b, url: \"mqtts://h\", subscribe: [ { remote: x/# } ] }\n",
    )
    .unwrap();
    assert_eq!(config.uplinks[0].protocol, UplinkProtocol::V311);
    assert_eq!(config.uplinks[0].forward[0].to, "{topic}");
    assert_eq!(config.uplinks[0].forward[0].qos, 1);
    assert_eq!(config.uplinks[1].protocol, UplinkProtocol::V5);
    assert_eq!(config.uplinks[1].keepalive.as_secs(), 30);
    assert_eq!(config.uplinks[1].inflight, 32);
    assert_eq!(config.uplinks[1].max_packet_size, None);
}

#[test]
fn uplink_max_packet_size_is_checked_against_the_mqtt_limits() {
    for (value, ok) in [
        ("64B", true),
        ("128KiB", true),
        ("256MiB", true),
        ("63B", false),
        ("257MiB", false),
    ] {
        let text = format!(
            "uplinks:\n  - name: cloud\n    url: \"mqtt://h\"\n    max_packet_size: {value}\n    forward: [ {{ from: \"#\" }} ]\n"
        );
        if ok {
            load(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
            continue;
        }
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.starts_with("site.yaml:4:")
                && e.contains("max_packet_size")
                && e.contains("between 64B and 256MiB")),
            "{value}: {errs:?}"
        );
    }
}

#[test]
fn uplink_errors_point_at_the_value() {
    let errs = errors(
        "uplinks:\n\
         \x20 - name: cloud\n\
         \x20   url: \"http://example.com\"\n\
         \x20   forward:\n\
         \x20     - { from: \"a/#/b\", to: \"x/{what}\", qos: 3 }\n\
         \x20 - name: cloud\n\
         \x20   url: \"mqtt://h:1883\"\n\
         \x20   tls: { server_name: h }\n\
         \x20   protocol: 4\n\
         \x20   subscribe: [ { remote: \"r/#\", local: \"l/+\" } ]\n",
    );
    let joined = errs.join("\n");
    // A type error (protocol: 4) stops before semantic checks; fix it and look again.
    assert!(joined.contains("site.yaml:9:"), "{joined}");
    assert!(joined.contains("protocol must be 5 or 3.1.1"), "{joined}");

    let errs = errors(
        "uplinks:\n\
         \x20 - name: cloud\n\
         \x20   url: \"http://example.com\"\n\
         \x20   forward:\n\
         \x20     - { from: \"a/#/b\", to: \"x/{what}\", qos: 3 }\n\
         \x20 - name: cloud\n\
         \x20   url: \"mqtt://h:1883\"\n\
         \x20   tls: { server_name: h }\n\
         \x20   subscribe: [ { remote: \"r/#\", local: \"l/+\" } ]\n",
    );
    let joined = errs.join("\n");
    for (line, text) in [
        (3, "must start with mqtts://"),
        (5, "from `a/#/b` is not a valid filter"),
        (5, "to `x/{what}` has `{what}`"),
        (5, "qos must be 0, 1 or 2"),
        (6, "already used by uplink 0"),
        (8, "tls settings need an mqtts:// url"),
        (9, "local `l/+` must produce a topic name"),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("site.yaml:{line}:")) && e.contains(text)),
            "no error at line {line} saying `{text}` in:\n{joined}"
        );
    }
}

/// A directory holding `plugins/c2f.wasm` and `plugins/scale.wasm` (empty: only their
/// existence is checked at load), removed on drop.
pub(crate) struct PluginDir(pub(crate) std::path::PathBuf);

impl PluginDir {
    pub(crate) fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "edgegw-config-plugins-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        for name in ["c2f", "scale"] {
            std::fs::write(dir.join(format!("plugins/{name}.wasm")), b"").unwrap();
        }
        Self(dir)
    }

    pub(crate) fn load(&self, text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml("site.yaml", text, &self.0)
    }

    fn errors(&self, text: &str) -> Vec<String> {
        self.load(text)
            .expect_err("config should be rejected")
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two plugins and an uplink for pipelines to name.
const PLUGINS_AND_UPLINK: &str = "\
uplinks:
  - { name: cloud, url: \"mqtt://127.0.0.1:1884\", forward: [ { from: \"alerts/#\" } ] }
plugins:
  - { name: c2f, path: plugins/c2f.wasm }
  - { name: scale, path: plugins/scale.wasm }
";

#[test]
fn shipped_pipeline_example_is_valid() {
    let dir = PluginDir::new("shipped");
    let text = format!(
        "{}{}{}",
        shipped_uplink_example(),
        shipped_example("plugins"),
        shipped_example("pipelines")
    );
    let config = dir.load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let plugin = &config.plugins[0];
    assert_eq!(plugin.name, "c2f");
    assert_eq!(plugin.path, dir.0.join("plugins/c2f.wasm"));
    assert_eq!(plugin.limits.time.as_std().as_millis(), 5);
    assert_eq!(plugin.limits.memory, 16 << 20);
    assert_eq!(plugin.limits.max_outputs, 100);
    let pipeline = &config.pipelines[0];
    assert_eq!(pipeline.name, "temps");
    assert_eq!(pipeline.from, ["sensors/+/temp"]);
    assert_eq!(pipeline.rules.len(), 1);
    assert_eq!(pipeline.rules[0].plugin, "c2f");
    assert_eq!(pipeline.rules[0].config_json, r#"{"field":"temp"}"#);
    assert_eq!(
        pipeline.to,
        [
            PipelineOutput::Local("processed/{topic}".into()),
            PipelineOutput::Uplink("cloud".into()),
        ]
    );
    assert_eq!(pipeline.queue.capacity, 1000);
    assert_eq!(pipeline.queue.on_full, OnFull::Block);
    assert_eq!(pipeline.dead_letter_topic(), "$edgegw/deadletter/temps");
}

#[test]
fn pipelines_parse() {
    let dir = PluginDir::new("parse");
    let text = format!(
        "{PLUGINS_AND_UPLINK}  - name: tuned
    path: plugins/c2f.wasm
    limits: {{ time: 20ms, memory: 64MiB, max_outputs: 5 }}
pipelines:
  - name: temps
    from: [ \"sensors/+/temp\", \"legacy/#\" ]
    rules:
      - plugin: c2f
      - plugin: scale
        config:
          factor: 2.5
          z: [ 1, -2, true, null, \"a \\\"b\\\"\" ]
          a: {{ 1: one, true: yes, 2.5: half }}
      - plugin: c2f
        config: hello
    to:
      - \"local:processed/{{2..}}\"
      - \"uplink:cloud\"
      - \" local: out/{{1}}/{{topic}} \"
    queue: {{ capacity: 10, on_full: drop_oldest }}
    dead_letter: \"broken/temps\"
  - name: raw
    from: \"raw/#\"
"
    );
    let config = dir.load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.plugins.len(), 3);
    let tuned = &config.plugins[2].limits;
    assert_eq!(tuned.time.as_std().as_millis(), 20);
    assert_eq!(tuned.memory, 64 << 20);
    assert_eq!(tuned.max_outputs, 5);

    let temps = &config.pipelines[0];
    assert_eq!(temps.from, ["sensors/+/temp", "legacy/#"]);
    let configs: Vec<&str> = temps.rules.iter().map(|r| r.config_json.as_str()).collect();
    assert_eq!(
        configs,
        [
            "null",
            // Keys keep their order; scalar keys become strings.
            r#"{"factor":2.5,"z":[1,-2,true,null,"a \"b\""],"a":{"1":"one","true":"yes","2.5":"half"}}"#,
            r#""hello""#,
        ]
    );
    assert_eq!(
        temps.to,
        [
            PipelineOutput::Local("processed/{2..}".into()),
            PipelineOutput::Uplink("cloud".into()),
            PipelineOutput::Local("out/{1}/{topic}".into()),
        ]
    );
    assert_eq!(temps.to[0].to_string(), "local:processed/{2..}");
    assert_eq!(temps.queue.capacity, 10);
    assert_eq!(temps.queue.on_full, OnFull::DropOldest);
    assert_eq!(temps.dead_letter_topic(), "broken/temps");

    // One filter without a list; everything optional left out: pass through, drop, default
    // queue and dead letter.
    let raw = &config.pipelines[1];
    assert_eq!(raw.from, ["raw/#"]);
    assert!(raw.rules.is_empty() && raw.to.is_empty());
    assert_eq!(raw.queue.capacity, 1000);
    assert_eq!(raw.queue.on_full, OnFull::Block);
    assert_eq!(raw.dead_letter, None);
    assert_eq!(raw.dead_letter_topic(), "$edgegw/deadletter/raw");

    let summary = config.summary();
    assert!(
        summary.contains("; plugins: c2f, scale, tuned;"),
        "{summary}"
    );
    assert!(
        summary.contains(
            "; pipelines: temps (sensors/+/temp, legacy/# -> c2f -> scale -> c2f -> local:processed/{2..}, uplink:cloud, local:out/{1}/{topic}), raw (raw/# -> drop);"
        ),
        "{summary}"
    );

    let defaults = load("").unwrap();
    assert!(defaults.plugins.is_empty() && defaults.pipelines.is_empty());
    assert!(!defaults.summary().contains("pipelines"));
}

#[test]
fn a_pipeline_takes_one_filter_or_a_list() {
    let config = load(
        "pipelines:
  - { name: one, from: \"sensors/#\" }
  - { name: numbers, from: [ 5, true ] }
",
    )
    .unwrap();
    let from: Vec<&[String]> = config.pipelines.iter().map(|p| p.from.as_slice()).collect();
    assert_eq!(
        from,
        [
            &["sensors/#".to_owned()][..],
            &["5".to_owned(), "true".to_owned()]
        ]
    );
    let expected = "expected a topic filter or a list of them (quote a filter alone that reads as a number or true/false)";
    for (text, error) in [
        (
            "pipelines:\n  - { name: p, from: { topic: a } }\n",
            format!("site.yaml:2:22: pipelines[0].from: invalid type: map, {expected}"),
        ),
        // Its text would not survive: `1.10` is already the number 1.1.
        (
            "pipelines:\n  - { name: p, from: 1.10 }\n",
            format!(
                "site.yaml:2:22: pipelines[0].from: invalid type: floating point `1.1`, {expected}"
            ),
        ),
        // A bad filter alone is located like one in a list.
        (
            "pipelines:\n  - { name: p, from: \"a/#/b\" }\n",
            "site.yaml:2:22: pipeline `p`: from `a/#/b` is not a valid filter".to_owned(),
        ),
        // Nothing after `from:` is no filters, said as such.
        (
            "pipelines:\n  - name: p\n    from:\n",
            "site.yaml:3:10: pipeline `p`: from is empty".to_owned(),
        ),
    ] {
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&error),
            "{errors:?}\nexpected {error}"
        );
    }
}

#[test]
fn unknown_plugin_is_located() {
    let dir = PluginDir::new("unknown-plugin");
    let errs = dir.errors(&format!(
        "{PLUGINS_AND_UPLINK}\
pipelines:
  - name: temps
    from: [ \"sensors/+/temp\" ]
    rules:
      - plugin: c2f
      - plugin: c2F
        config: {{ field: temp }}
      - {{ plugin: nope }}
"
    ));
    assert_eq!(
        errs,
        [
            "site.yaml:11:17: unknown plugin `c2F` (plugins: c2f, scale); did you mean `c2f`?",
            "site.yaml:13:19: unknown plugin `nope` (plugins: c2f, scale)",
        ]
    );

    // Without any plugins the message says where to declare one.
    let errs = errors("pipelines:\n  - name: t\n    from: [a]\n    rules:\n      - plugin: c2f\n");
    assert_eq!(
        errs,
        [
            "site.yaml:5:17: unknown plugin `c2f` (no plugins are configured; add one under `plugins:`)"
        ]
    );
}

#[test]
fn pipeline_outputs_are_checked() {
    let dir = PluginDir::new("outputs");
    let errs = dir.errors(&format!(
        "{PLUGINS_AND_UPLINK}\
pipelines:
  - name: temps
    from: [ \"sensors/+/temp\" ]
    to:
      - \"uplink:cloud\"
      - \"uplink:clod\"
      - \"local:processed/+/x\"
      - \"local:out/{{what}}\"
      - \"local:\"
"
    ));
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert_eq!(
        errs[0],
        "site.yaml:11:9: unknown uplink `clod` (uplinks: cloud); did you mean `cloud`?"
    );
    assert!(
        errs[1].starts_with(
            "site.yaml:12:9: pipeline `temps`: to `local:processed/+/x`: the topic must produce a topic name: no `+` or `#`"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with(
            "site.yaml:13:9: pipeline `temps`: to `local:out/{what}`: the topic has `{what}`"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("site.yaml:14:9: pipeline `temps`: to `local:`: the topic is empty"),
        "{errs:#?}"
    );

    // Neither form: a type error at the value, naming both forms.
    for (output, line, column) in [
        ("\"mqtt:cloud\"", 5, 9),
        ("cloud", 5, 9),
        ("uplink: cloud", 5, 9),
    ] {
        let errs = errors(&format!(
            "pipelines:\n  - name: t\n    from: [a]\n    to:\n      - {output}\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("site.yaml:{line}:{column}: pipelines[0].to[0]: ")),
            "{errs:#?}"
        );
        assert!(
            errs[0].contains("`local:<topic template>`") && errs[0].contains("`uplink:<name>`"),
            "{errs:#?}"
        );
    }
}

#[test]
fn pipeline_errors_point_at_the_value() {
    let dir = PluginDir::new("pipeline-errors");
    let errs = dir.errors(&format!(
        "{PLUGINS_AND_UPLINK}\
pipelines:
  - name: temps
    from: [ \"sensors/+/temp\", \"a/#/b\", \"x+\" ]
  - name: temps
    from: []
    queue: {{ capacity: 0 }}
    dead_letter: \"dead/+\"
  - name: \"bad name\"
    from: [ \"#\" ]
    queue:
      capacity: 1000001
    dead_letter: \"\"
"
    ));
    let joined = errs.join("\n");
    for (line, text) in [
        (8, "pipeline `temps`: from `a/#/b` is not a valid filter"),
        (8, "pipeline `temps`: from `x+` is not a valid filter"),
        (9, "pipeline name `temps` is already used by pipeline 0"),
        (10, "pipeline `temps`: from is empty"),
        (
            11,
            "queue.capacity 0 is out of range: it must be between 1 and 1000000",
        ),
        (
            12,
            "dead_letter `dead/+` must be a topic name without wildcards",
        ),
        (
            13,
            "pipeline name `bad name` must be non-empty and use only letters",
        ),
        (16, "queue.capacity 1000001 is out of range"),
        (17, "dead_letter `` must be a topic name"),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("site.yaml:{line}:")) && e.contains(text)),
            "no error at line {line} saying `{text}` in:\n{joined}"
        );
    }
    assert_eq!(errs.len(), 9, "{joined}");
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.yaml:9:11: pipeline name `temps`")),
        "the duplicate's own name value: {joined}"
    );

    // Required keys and unknown keys are type errors at the entry.
    let errs = errors("pipelines:\n  - name: t\n    to: []\n");
    assert!(errs[0].contains("missing field `from`"), "{errs:#?}");
    let errs = errors(
        "pipelines:\n  - name: t\n    from: [a]\n    rules:\n      - { plugin: x, confg: 1 }\n",
    );
    assert!(
        errs[0].starts_with("site.yaml:5:") && errs[0].contains("did you mean `config`?"),
        "{errs:#?}"
    );
    let errs = errors("pipelines:\n  - name: t\n    from: [a]\n    queue: { on_full: spill }\n");
    assert!(
        errs[0].starts_with("site.yaml:4:23: ") && errs[0].contains("unknown variant `spill`"),
        "{errs:#?}"
    );
}

#[test]
fn stage_config_must_be_json() {
    let stage = |config: &str| {
        format!(
            "pipelines:\n  - name: t\n    from: [a]\n    rules:\n      - plugin: x\n        config:\n{config}"
        )
    };
    let errs = errors(&stage("          a: 1\n          [1, 2]: x\n"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("site.yaml:8:11: "), "{errs:#?}");
    assert!(
        errs[0].contains("JSON object keys are strings"),
        "{errs:#?}"
    );

    let errs = errors(&stage("          a:\n            b: .nan\n"));
    assert!(errs[0].starts_with("site.yaml:8:16: "), "{errs:#?}");
    assert!(errs[0].contains("no JSON form"), "{errs:#?}");

    let errs = errors(&stage("          a: !celsius 20\n"));
    assert!(errs[0].starts_with("site.yaml:7:14: "), "{errs:#?}");
    assert!(
        errs[0].contains("the tag `!celsius` has no JSON form"),
        "{errs:#?}"
    );

    // `1` and "1" are one JSON key.
    let errs = errors(&stage("          1: a\n          \"1\": b\n"));
    assert!(errs[0].starts_with("site.yaml:8:11: "), "{errs:#?}");
    assert!(errs[0].contains("key `1` appears twice"), "{errs:#?}");
}

#[test]
fn plugin_errors_point_at_the_value() {
    let dir = PluginDir::new("plugin-errors");
    let errs = dir.errors(
        "plugins:
  - name: c2f
    path: plugins/missing.wasm
    limits: { time: 0ms, memory: 512KiB, max_outputs: 0 }
  - name: c2f
    path: plugins
    limits:
      time: 11s
      memory: 5GiB
      max_outputs: 10001
  - { name: \"c2f.v2\", path: plugins/scale.wasm, limits: { time: 10s, memory: 4GiB, max_outputs: 10000 } }
",
    );
    let missing = dir.0.join("plugins/missing.wasm");
    let joined = errs.join("\n");
    for (line, text) in [
        (
            3,
            format!("plugin `c2f`: cannot read {}", missing.display()),
        ),
        (
            4,
            "limits.time 0s is out of range: it must be above 0 and at most 10s".into(),
        ),
        (
            4,
            "limits.memory 512KiB is out of range: it must be between 1MiB and 4GiB".into(),
        ),
        (
            4,
            "limits.max_outputs 0 is out of range: it must be between 1 and 10000".into(),
        ),
        (5, "plugin name `c2f` is already used by plugin 0".into()),
        (
            6,
            format!("{} is a directory", dir.0.join("plugins").display()),
        ),
        (8, "limits.time 11s is out of range".into()),
        (9, "limits.memory 5GiB is out of range".into()),
        (10, "limits.max_outputs 10001 is out of range".into()),
        (
            11,
            "plugin name `c2f.v2` must be non-empty and use only letters".into(),
        ),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("site.yaml:{line}:")) && e.contains(&text)),
            "no error at line {line} saying `{text}` in:\n{joined}"
        );
    }
    // The upper bounds themselves are fine.
    assert_eq!(errs.len(), 10, "{joined}");
    assert!(
        errs[0].starts_with(&format!(
            "site.yaml:3:11: plugin `c2f`: cannot read {}",
            missing.display()
        )),
        "{joined}"
    );

    // Relative paths are relative to the config file's directory, not the working one.
    let errs = errors("plugins:\n  - { name: c2f, path: plugins/c2f.wasm }\n");
    assert!(
        errs[0].starts_with("site.yaml:2:24: plugin `c2f`: cannot read plugins/c2f.wasm"),
        "{errs:#?}"
    );
    let errs = errors("plugins:\n  - { name: c2f, path: x.wasm, limits: { memory: 12XB } }\n");
    assert!(errs[0].contains("unknown unit `XB`"), "{errs:#?}");
}

#[test]
fn uplink_fed_by_a_pipeline_needs_no_forward_rules() {
    let uplink = "uplinks:\n  - { name: cloud, url: \"mqtt://127.0.0.1:1884\" }\n";
    let errs = errors(uplink);
    assert!(errs[0].contains("would do nothing"), "{errs:#?}");
    let config = load(&format!(
        "{uplink}pipelines:\n  - {{ name: t, from: [a], to: [ \"uplink:cloud\" ] }}\n"
    ))
    .unwrap();
    assert_eq!(
        config.pipelines[0].to,
        [PipelineOutput::Uplink("cloud".into())]
    );
}

#[test]
fn errors_across_new_sections_are_formatted_like_the_others() {
    // Type errors in each section, all reported, each `FILE:LINE:COL: message`, one a line,
    // as `edgegw check` prints them.
    let errors = load(
        "plugins:\n  - { name: a, path: a.wasm, limits: { time: 5 } }\npipelines:\n  - { name: t, from: [a], queue: { size: 1 } }\nlog: { level: verbose }\n",
    )
    .unwrap_err();
    let text = errors.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("site.yaml:2:"), "{text}");
    assert!(lines[0].contains("duration `5` has no unit"), "{text}");
    assert!(lines[1].starts_with("site.yaml:4:"), "{text}");
    assert!(lines[1].contains("unknown key `size`"), "{text}");

    // Semantic errors in the new sections come with the other sections' ones.
    let errors = load("pipelines:\n  - { name: t, from: [\"a/#/b\"] }\nlog: { level: verbose }\n")
        .unwrap_err();
    assert_eq!(
        errors
            .to_string()
            .lines()
            .map(|l| l.split(": ").next().unwrap())
            .collect::<Vec<_>>(),
        ["site.yaml:2:23", "site.yaml:3:15"]
    );
}
