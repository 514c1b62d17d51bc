//! The schema agrees with the loader: the shipped example, the defaults and a table of good
//! configs pass both; a table of bad ones fails both; each custom value form is accepted by
//! one exactly when the other accepts it.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::{
    ConfigErrors,
    tests::{PluginDir, shipped_example, shipped_uplink_example},
};

fn committed_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/gateway.schema.json")
}

fn schema() -> Value {
    serde_json::from_str(&json_schema()).expect("the schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).expect("the schema compiles")
}

/// The YAML document as the JSON an editor's schema check sees (no `${ENV}` substitution).
fn to_json(text: &str) -> Value {
    let yaml: serde_norway::Value =
        serde_norway::from_str(text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"));
    serde_json::to_value(yaml).unwrap_or_else(|e| panic!("no JSON form: {e}\n{text}"))
}

/// Every schema error, leaves inside `anyOf`/`oneOf` included, as `(instance path, message)`.
fn schema_errors(validator: &jsonschema::Validator, text: &str) -> Vec<(String, String)> {
    let instance = to_json(text);
    let evaluation = validator.evaluate(&instance);
    if evaluation.flag().valid {
        return Vec::new();
    }
    let errors: Vec<(String, String)> = evaluation
        .iter_errors()
        .map(|e| {
            (
                e.instance_location.as_str().to_string(),
                e.error.to_string(),
            )
        })
        .collect();
    assert!(!errors.is_empty(), "invalid without errors:\n{text}");
    errors
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `FIXTURES/` in `text` names this crate's test fixtures; plugin paths are relative to `dir`.
fn load_in(dir: &PluginDir, text: &str) -> Result<Config, ConfigErrors> {
    let text = text.replace("FIXTURES/", &format!("{}/", fixtures().display()));
    dir.load(&text)
}

#[test]
fn committed_schema_is_up_to_date() {
    let generated = json_schema();
    assert_eq!(generated, json_schema(), "the output is deterministic");
    let path = committed_path();
    if std::env::var_os("EDGEGW_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "configs/gateway.schema.json is not what the config types generate (first difference at line {}); \
             regenerate it with `EDGEGW_BLESS=1 cargo test -p edgegw-config schema` and commit it",
            line + 1
        );
    }
}

#[test]
fn schema_is_a_valid_draft_2020_12_schema() {
    let schema = schema();
    jsonschema::draft202012::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("not a valid 2020-12 schema: {e}"));
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["title"], "edgegw gateway.yaml");
    assert!(schema.get("$id").is_none());
    assert!(json_schema().ends_with("}\n"));
}

/// Every key has a description (editors show it on hover), and so do the sections.
#[test]
fn every_schema_key_has_a_description() {
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (key, property) in properties {
            let description = property.get("description").and_then(Value::as_str);
            if description.is_none_or(|d| d.trim().is_empty() || d.contains('\n')) {
                missing.push(format!("{path}.{key}"));
            }
        }
    }
    let schema = schema();
    let mut missing = Vec::new();
    walk(&schema, "", &mut missing);
    for (name, definition) in schema["$defs"].as_object().unwrap() {
        walk(definition, name, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "keys without a (one-paragraph) description: {missing:?}"
    );
    assert!(
        schema["properties"].as_object().unwrap().len() == crate::SECTIONS.len(),
        "every top-level section is in the schema"
    );
}

#[test]
fn shipped_example_is_accepted_by_loader_and_schema() {
    let validator = validator();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/gateway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        schema_errors(&validator, &text),
        [] as [(String, String); 0]
    );
    // The loader reads the TLS and password files it names: use the fixtures instead.
    let local = text
        .replace("/etc/edgegw/tls/", "FIXTURES/")
        .replace("/etc/edgegw/passwd", "FIXTURES/passwd");
    let dir = PluginDir::new("schema-shipped");
    load_in(&dir, &local).unwrap_or_else(|e| panic!("{e}"));

    // The commented examples of the sections that default to empty.
    let sections = ["uplinks", "plugins", "pipelines"].map(shipped_example);
    for section in &sections {
        assert_eq!(
            schema_errors(&validator, section),
            [] as [(String, String); 0],
            "{section}"
        );
    }
    let text = format!("{}{}{}", shipped_uplink_example(), sections[1], sections[2]);
    dir.load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}

/// The embedded default is `Config::default()`, which is also what an empty file loads to.
#[test]
fn default_config_is_accepted_by_loader_and_schema() {
    let validator = validator();
    let dir = PluginDir::new("schema-default");
    let default = format!("{:?}", Config::default());
    for text in [
        "",
        "# nothing but a comment\n",
        "{}\n",
        "gateway:\nbroker:\nlog: ~\n",
    ] {
        let config = load_in(&dir, text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(format!("{config:?}"), default, "{text:?}");
        assert_eq!(
            schema_errors(&validator, text),
            [] as [(String, String); 0],
            "{text:?}"
        );
    }
}

/// `instance` with every absent key that has a `default` in the schema set to it, and every
/// absent mapping whose keys all have defaults filled the same way.
fn with_defaults(instance: &Value, schema: &Value, definitions: &Value) -> Value {
    let resolve = |schema: &Value| -> Value {
        let reference = schema
            .get("$ref")
            .or_else(|| schema.get("anyOf")?.get(0)?.get("$ref"))
            .and_then(Value::as_str);
        match reference.and_then(|r| r.strip_prefix("#/$defs/")) {
            Some(name) => definitions[name].clone(),
            None => schema.clone(),
        }
    };
    let schema = resolve(schema);
    match instance {
        Value::Object(object) => {
            let mut out = object.clone();
            let properties = schema.get("properties").and_then(Value::as_object);
            for (key, property) in properties.into_iter().flatten() {
                match (object.get(key), property.get("default")) {
                    (Some(value), _) => {
                        out.insert(key.clone(), with_defaults(value, property, definitions));
                    }
                    (None, Some(default)) => {
                        out.insert(key.clone(), default.clone());
                    }
                    (None, None) => {
                        let target = resolve(property);
                        if target.get("properties").is_some() && target.get("required").is_none() {
                            out.insert(
                                key.clone(),
                                with_defaults(&json!({}), property, definitions),
                            );
                        }
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let item = resolve(&schema["items"]);
            Value::Array(
                items
                    .iter()
                    .map(|i| with_defaults(i, &item, definitions))
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

/// The `default`s the schema shows are what the loader uses for absent keys: a config with
/// them all written out loads to the same as the config without them.
#[test]
fn schema_defaults_are_the_loader_defaults() {
    let schema = schema();
    let validator = validator();
    let dir = PluginDir::new("schema-defaults");
    let minimal = "\
broker:
  listeners:
    - { bind: \"127.0.0.1:1883\" }
    - { bind: \"127.0.0.1:8883\", tls: { cert: FIXTURES/server.pem, key: FIXTURES/server.key } }
    - { bind: \"127.0.0.1:8080\", websocket: {} }
  acl:
    rules:
      - { permission: allow, action: all, topics: [ \"#\" ] }
nodes:
  serial:
    - { port: /dev/ttyUSB0 }
uplinks:
  - name: cloud
    url: \"mqtt://127.0.0.1:1884\"
    forward: [ { from: \"a/#\" } ]
    subscribe: [ { remote: \"b/#\" } ]
plugins:
  - { name: c2f, path: plugins/c2f.wasm }
pipelines:
  - { name: temps, from: [ \"sensors/+/temp\" ], rules: [ { plugin: c2f } ], to: [ \"uplink:cloud\" ] }
";
    let filled = with_defaults(&to_json(minimal), &schema, &schema["$defs"]);
    let filled_text = serde_json::to_string_pretty(&filled).unwrap();
    // Spot checks that the filling reached the nested sections.
    assert_eq!(filled["gateway"]["commit_interval"], "10ms");
    assert_eq!(filled["broker"]["limits"]["max_session_expiry"], "7d");
    assert_eq!(filled["uplinks"][0]["outbox"]["on_full"], "drop_oldest");
    assert_eq!(filled["uplinks"][0]["forward"][0]["to"], "{topic}");
    assert_eq!(filled["plugins"][0]["limits"]["memory"], "16MiB");
    assert_eq!(filled["pipelines"][0]["queue"]["on_full"], "block");
    assert_eq!(filled["nodes"]["serial"][0]["baud"], 115_200);

    let expected = load_in(&dir, minimal).unwrap_or_else(|e| panic!("{e}"));
    let loaded = load_in(&dir, &filled_text).unwrap_or_else(|e| panic!("{e}\n{filled_text}"));
    assert_eq!(
        format!("{loaded:#?}"),
        format!("{expected:#?}"),
        "with the schema's defaults written out:\n{filled_text}"
    );
    assert_eq!(
        schema_errors(&validator, &filled_text),
        [] as [(String, String); 0]
    );
}

const UPLINK: &str =
    "{ name: cloud, url: \"mqtt://127.0.0.1:1884\", forward: [ { from: \"a/#\" } ] }";

/// Configs each mistake of which the loader and the schema both reject: (what, config, part
/// of the loader's message, the instance path a schema error names).
fn bad_configs() -> Vec<(&'static str, String, &'static str, &'static str)> {
    let uplink = |extra: &str| {
        format!(
            "uplinks:\n  - {{ name: cloud, url: \"mqtt://127.0.0.1:1884\", forward: [ {{ from: \"a/#\" }} ]{extra} }}\n"
        )
    };
    let plugin =
        |extra: &str| format!("plugins:\n  - {{ name: c2f, path: plugins/c2f.wasm{extra} }}\n");
    let pipeline = |extra: &str| {
        format!("pipelines:\n  - {{ name: temps, from: [ \"sensors/#\" ]{extra} }}\n")
    };
    let listener = |extra: &str| {
        format!("broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:1883\"{extra} }}\n")
    };
    vec![
        // Unknown keys.
        ("unknown top-level key", "brokr:\n  listeners: []\n".into(), "unknown key `brokr`", ""),
        ("unknown key in gateway", "gateway: { idd: x }\n".into(), "unknown key `idd`", "/gateway"),
        (
            "unknown key in broker.limits",
            "broker:\n  limits:\n    max_conections: 5\n".into(),
            "unknown key `max_conections`",
            "/broker/limits",
        ),
        (
            "unknown key in a listener",
            listener(", tls_cert: x.pem"),
            "unknown key `tls_cert`",
            "/broker/listeners/0",
        ),
        (
            "unknown key in a websocket mapping",
            listener(", websocket: { paths: /mqtt }"),
            "unknown key `paths`",
            "/broker/listeners/0/websocket",
        ),
        (
            "unknown key in an ACL rule",
            "broker:\n  acl:\n    rules: [ { permission: allow, action: all, topic: [ \"#\" ] } ]\n"
                .into(),
            "unknown key `topic`",
            "/broker/acl/rules/0",
        ),
        (
            "unknown key in uplinks[0].outbox",
            uplink(", outbox: { max_size: 1MiB }"),
            "unknown key `max_size`",
            "/uplinks/0/outbox",
        ),
        (
            "unknown key in uplinks[0].tls",
            uplink(", tls: { ca_file: ca.pem }"),
            "unknown key `ca_file`",
            "/uplinks/0/tls",
        ),
        (
            "unknown key in pipelines[0].queue",
            pipeline(", queue: { size: 10 }"),
            "unknown key `size`",
            "/pipelines/0/queue",
        ),
        (
            "unknown key in a pipeline stage",
            pipeline(", rules: [ { plugin: c2f, conf: {} } ]"),
            "unknown key `conf`",
            "/pipelines/0/rules/0",
        ),
        (
            "unknown key in plugins[0].limits",
            plugin(", limits: { cpu: 5ms }"),
            "unknown key `cpu`",
            "/plugins/0/limits",
        ),
        // Wrong types.
        ("not a mapping", "- gateway\n".into(), "must be a mapping of sections", ""),
        ("section as a list", "gateway: [ id ]\n".into(), "invalid type", "/gateway"),
        (
            "text for a number",
            "broker:\n  limits: { max_connections: many }\n".into(),
            "invalid type: string \"many\", expected a whole number",
            "/broker/limits/max_connections",
        ),
        (
            "quoted boolean",
            "broker:\n  auth: { allow_anonymous: \"false\" }\n".into(),
            "expected a boolean",
            "/broker/auth/allow_anonymous",
        ),
        (
            "a mapping for a topic filter",
            pipeline("").replace("[ \"sensors/#\" ]", "{ topic: \"sensors/#\" }"),
            "invalid type: map, expected a topic filter or a list of them",
            "/pipelines/0/from",
        ),
        (
            "mapping for a pipeline output",
            pipeline(", to: [ { local: x } ]"),
            "invalid type: map",
            "/pipelines/0/to/0",
        ),
        (
            "text for websocket",
            listener(", websocket: \"true\""),
            "expected `true`, `false` or a mapping",
            "/broker/listeners/0/websocket",
        ),
        (
            "text predefined topic id",
            "nodes:\n  predefined_topics: { temp: \"sensors/{node}/temp\" }\n".into(),
            "expected a whole number",
            "/nodes/predefined_topics",
        ),
        (
            "negative baud",
            "nodes:\n  serial: [ { port: /dev/ttyUSB0, baud: -1 } ]\n".into(),
            "invalid type: integer `-1`",
            "/nodes/serial/0/baud",
        ),
        (
            "missing required key",
            "uplinks:\n  - { name: cloud, forward: [ { from: \"a/#\" } ] }\n".into(),
            "missing field `url`",
            "/uplinks/0",
        ),
        (
            "host name in bind",
            "metrics: { bind: \"localhost:9100\" }\n".into(),
            "invalid socket address syntax",
            "/metrics/bind",
        ),
        // Bad enum values.
        (
            "bad outbox on_full",
            uplink(", outbox: { on_full: drop_newest }"),
            "unknown variant `drop_newest`",
            "/uplinks/0/outbox/on_full",
        ),
        (
            "bad queue on_full",
            pipeline(", queue: { on_full: wait }"),
            "unknown variant `wait`",
            "/pipelines/0/queue/on_full",
        ),
        (
            "bad fsync",
            uplink(", outbox: { fsync: sometimes }"),
            "unknown variant `sometimes`",
            "/uplinks/0/outbox/fsync",
        ),
        ("bad log format", "log: { format: xml }\n".into(), "unknown variant `xml`", "/log/format"),
        (
            "bad ACL permission",
            "broker:\n  acl:\n    rules: [ { permission: permit, action: all, topics: [ \"#\" ] } ]\n"
                .into(),
            "unknown variant `permit`",
            "/broker/acl/rules/0/permission",
        ),
        (
            "bad ACL default",
            "broker:\n  acl: { default: Deny }\n".into(),
            "unknown variant `Deny`",
            "/broker/acl/default",
        ),
        (
            "bad ACL action",
            "broker:\n  acl:\n    rules: [ { permission: allow, action: read, topics: [ \"#\" ] } ]\n"
                .into(),
            "unknown variant `read`",
            "/broker/acl/rules/0/action",
        ),
        (
            "bad protocol",
            uplink(", protocol: 4"),
            "protocol must be 5 or 3.1.1",
            "/uplinks/0/protocol",
        ),
        (
            "bad pipeline output",
            pipeline(", to: [ \"mqtt:processed\" ]"),
            "is neither form",
            "/pipelines/0/to/0",
        ),
        // Bad durations and sizes.
        (
            "duration without unit",
            "gateway: { commit_interval: 10 }\n".into(),
            "has no unit",
            "/gateway/commit_interval",
        ),
        (
            "duration with a space",
            "broker:\n  auth: { failure_window: 10 s }\n".into(),
            "unknown unit ` s`",
            "/broker/auth/failure_window",
        ),
        (
            "fractional duration",
            uplink(", keepalive: 1.5s"),
            "unknown unit `.`",
            "/uplinks/0/keepalive",
        ),
        (
            "duration unit case",
            uplink(", reconnect: { min: 1S }"),
            "unknown unit `S`",
            "/uplinks/0/reconnect/min",
        ),
        (
            "bad size unit",
            "broker:\n  limits: { max_packet_size: 1XB }\n".into(),
            "unknown unit `XB`",
            "/broker/limits/max_packet_size",
        ),
        (
            "fractional size",
            uplink(", outbox: { max_bytes: 1.5GiB }"),
            "unknown unit `.5GiB`",
            "/uplinks/0/outbox/max_bytes",
        ),
        (
            "negative size",
            plugin(", limits: { memory: -1 }"),
            "size must not be negative",
            "/plugins/0/limits/memory",
        ),
        (
            "float size",
            "broker:\n  limits: { max_packet_size: 1.5 }\n".into(),
            "invalid type: floating point",
            "/broker/limits/max_packet_size",
        ),
        // Single-key ranges and forms that validate.rs checks and the schema carries.
        (
            "qos above 2",
            uplink("").replace("from: \"a/#\"", "from: \"a/#\", qos: 3"),
            "qos must be 0, 1 or 2",
            "/uplinks/0/forward/0/qos",
        ),
        (
            "zero max_connections",
            "broker:\n  limits: { max_connections: 0 }\n".into(),
            "max_connections must be at least 1",
            "/broker/limits/max_connections",
        ),
        (
            "max_outputs above 10000",
            plugin(", limits: { max_outputs: 10001 }"),
            "max_outputs 10001 is out of range",
            "/plugins/0/limits/max_outputs",
        ),
        (
            "zero queue capacity",
            pipeline(", queue: { capacity: 0 }"),
            "queue.capacity 0 is out of range",
            "/pipelines/0/queue/capacity",
        ),
        (
            "no listeners",
            "broker:\n  listeners: []\n".into(),
            "broker.listeners is empty",
            "/broker/listeners",
        ),
        (
            "ACL rule without topics",
            "broker:\n  acl:\n    rules: [ { permission: allow, action: all, topics: [] } ]\n".into(),
            "has no topics",
            "/broker/acl/rules/0/topics",
        ),
        (
            "websocket path without /",
            listener(", websocket: { path: mqtt }"),
            "must start with `/`",
            "/broker/listeners/0/websocket/path",
        ),
        (
            "uplink url scheme",
            uplink("").replace("mqtt://", "http://"),
            "must start with mqtts://",
            "/uplinks/0/url",
        ),
    ]
}

#[test]
fn bad_configs_are_rejected_by_loader_and_schema() {
    let validator = validator();
    let dir = PluginDir::new("schema-bad");
    let mut problems = Vec::new();
    for (what, text, loader_says, schema_at) in bad_configs() {
        match load_in(&dir, &text) {
            Ok(_) => problems.push(format!("{what}: the loader accepts\n{text}")),
            Err(errors) if !errors.to_string().contains(loader_says) => problems.push(format!(
                "{what}: the loader does not say `{loader_says}` but\n{errors}\n{text}"
            )),
            Err(_) => {}
        }
        let errors = schema_errors(&validator, &text);
        if errors.is_empty() {
            problems.push(format!("{what}: the schema accepts\n{text}"));
        } else if !errors.iter().any(|(at, _)| at == schema_at) {
            problems.push(format!(
                "{what}: no schema error at `{schema_at}`: {errors:?}\n{text}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert!(bad_configs().len() >= 12);
}

/// Non-trivial configs both accept.
fn good_configs() -> Vec<(&'static str, String)> {
    vec![
        (
            "uplink with TLS, forward and subscribe",
            "\
gateway: { id: 42, data_dir: /var/lib/edgegw, commit_interval: 0s }
uplinks:
  - name: cloud
    url: \"mqtts://broker.example.com:8883\"
    client_id: 1234
    username: gateway
    password: 123456
    protocol: 3.1.1
    keepalive: 1m30s
    clean_start: true
    inflight: 10
    reconnect: { min: 250ms, max: 2m }
    tls:
      ca: FIXTURES/ca.pem
      cert: FIXTURES/server.pem
      key: FIXTURES/server.key
      server_name: broker.example.com
      alpn: [ x-amzn-mqtt-ca ]
    forward:
      - { from: \"alerts/#\", to: \"site1/{topic}\", qos: 2, retain: true }
      - { from: \"sensors/+/temp\", to: \"site1/temps/{2}\", qos: 0 }
    subscribe:
      - { remote: \"site1/control/#\", local: \"control/{3..}\", qos: 0 }
    outbox: { max_bytes: 64MiB, max_messages: 1000, max_age: 7d, on_full: block, fsync: always }
  - name: backup
    url: \"mqtt://10.0.0.2\"
    protocol: 311
    subscribe: [ { remote: \"cmd/#\" } ]
    outbox: { max_bytes: 1024, max_age: ~, fsync: off }
    tls:
"
            .into(),
        ),
        (
            "plugins and pipelines",
            "\
uplinks:
  - { name: cloud, url: \"mqtt://127.0.0.1:1884\", protocol: \"5\" }
plugins:
  - { name: c2f, path: plugins/c2f.wasm, limits: { time: 10s, memory: 1073741824, max_outputs: 10000 } }
  - name: scale
    path: plugins/scale.wasm
    limits:
      memory: 4GiB
pipelines:
  - name: temps
    from: [ \"sensors/+/temp\", \"lab/#\" ]
    rules:
      - plugin: c2f
        config: { field: temp, factor: 1.8, nested: { list: [ 1, two, ~ ] }, 1: one }
      - plugin: scale
        config: 2
      - plugin: c2f
    to: [ \"local:processed/{topic}\", \" uplink: cloud \" ]
    queue: { capacity: 1000000, on_full: drop_oldest }
    dead_letter: dead/temps
  - { name: passthrough, from: [ \"raw/#\" ], rules: [], to: [], dead_letter: ~ }
"
            .into(),
        ),
        (
            "auth, ACL rules and limits",
            "\
broker:
  auth: { allow_anonymous: false, password_file: FIXTURES/passwd, max_failures: 0, failure_window: 0s }
  acl:
    default: deny
    rules:
      - { permission: deny, action: subscribe, topics: [ \"debug/raw\" ] }
      - { permission: allow, user: \"*\", action: all, topics: [ \"sensors/%u/#\" ] }
      - { permission: allow, user: dashboard, client_id: 7, action: subscribe, topics: [ \"#\" ] }
      - { permission: allow, action: publish, topics: [ \"clients/%c/status\", 1234 ] }
  limits:
    max_connections: 1
    max_packet_size: \" 64 KiB \"
    max_keepalive: 65535s
    receive_maximum: 65535
    max_inflight: 1
    max_queued: 1
    topic_alias_maximum: 0
    max_session_expiry: 0s
    max_publish_rate: 100
log: { level: \"info,edgegw_broker=debug\", format: json }
metrics: { bind: \"[::1]:9100\" }
"
            .into(),
        ),
        (
            "every listener form",
            "\
broker:
  listeners:
    - { bind: \"127.0.0.1:0\" }
    - { bind: \"127.0.0.1:0\", websocket: true }
    - { bind: \"127.0.0.1:0\", websocket: false }
    - { bind: \"127.0.0.1:0\", websocket: ~, tls: ~ }
    - { bind: \"127.0.0.1:0\", websocket: {} }
    - { bind: \"127.0.0.1:0\", websocket: { path: /mqtt } }
    - { bind: \"[::1]:0\", websocket: { path: ~ }, tls: { cert: FIXTURES/server.pem, key: FIXTURES/server.key } }
    - bind: \"0.0.0.0:8883\"
      tls:
        cert: FIXTURES/server.pem
        key: FIXTURES/server.key
        client_ca: FIXTURES/ca.pem
        use_identity_as_username: true
      websocket:
        path: \"/mqtt/v1%20x\"
    - bind: \"0.0.0.0:8080\"
      websocket:
"
            .into(),
        ),
        (
            "nodes",
            "\
nodes:
  serial:
    - { port: /dev/ttyUSB0 }
    - { port: /dev/ttyUSB1, baud: 9600 }
  predefined_topics:
    1: \"sensors/{node}/temp\"
    65534: sensors/{node}/humidity
    0x10: status
"
            .into(),
        ),
        (
            "keys left empty (their lines commented out)",
            "\
gateway:
broker:
  auth:
  acl:
  limits:
  #  max_connections: 10
nodes:
  serial:
  predefined_topics:
uplinks:
plugins:
pipelines:
metrics:
log:
"
            .into(),
        ),
    ]
}

#[test]
fn good_configs_are_accepted_by_loader_and_schema() {
    let validator = validator();
    let dir = PluginDir::new("schema-good");
    let mut problems = Vec::new();
    for (what, text) in good_configs() {
        if let Err(errors) = load_in(&dir, &text) {
            problems.push(format!("{what}: the loader rejects:\n{errors}\n{text}"));
        }
        let errors = schema_errors(&validator, &text);
        if !errors.is_empty() {
            problems.push(format!("{what}: the schema rejects: {errors:?}\n{text}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// Writes each value into `template` at `VALUE`; the loader and the schema must both accept
/// the values in `good` and both reject those in `bad`.
fn check_values(template: &str, good: &[&str], bad: &[&str]) {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let validator = validator();
    let dir = PluginDir::new(&format!("schema-values-{call}"));
    let mut problems = Vec::new();
    for (values, want) in [(good, true), (bad, false)] {
        for value in values {
            let text = template.replace("VALUE", value);
            let loader = load_in(&dir, &text);
            let schema = schema_errors(&validator, &text);
            if loader.is_ok() != want {
                let said = loader.err().map(|e| e.to_string()).unwrap_or_default();
                problems.push(format!("loader, {value}: want accepted={want} {said}"));
            }
            if schema.is_empty() != want {
                problems.push(format!("schema, {value}: want accepted={want} {schema:?}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "in {template}:\n{}",
        problems.join("\n")
    );
}

#[test]
fn schema_durations_match_the_loader() {
    check_values(
        "broker:\n  auth: { max_failures: 0, failure_window: VALUE }\n",
        &[
            "30s",
            "\"1m30s\"",
            "\" 250ms \"",
            "7d",
            "1h",
            "0s",
            "10ms5s",
            "1d1h1m1s1ms",
        ],
        &[
            "30", "\"30\"", "1.5s", "10 ms", "s", "\"\"", "1x", "1sm", "-1s", "1S", "true",
            "[ 1s ]", "~",
        ],
    );
}

#[test]
fn schema_sizes_match_the_loader() {
    check_values(
        "uplinks:\n  - { name: cloud, url: \"mqtt://127.0.0.1:1884\", forward: [ { from: \"a/#\" } ], outbox: { max_bytes: VALUE } }\n",
        &[
            "1024",
            "\"1024\"",
            "64KiB",
            "1 MB",
            "\" 2GiB \"",
            "2kB",
            "1TB",
            "1048576B",
            "1TiB",
            "0x400",
        ],
        &[
            "1XB", "1.5MiB", "1.5", "-1", "MiB", "\"\"", "1 Mi B", "1mib", "true", "~",
        ],
    );
}

#[test]
fn schema_protocols_match_the_loader() {
    check_values(
        "uplinks:\n  - { name: cloud, url: \"mqtt://127.0.0.1:1884\", forward: [ { from: \"a/#\" } ], protocol: VALUE }\n",
        &[
            "5",
            "5.0",
            "311",
            "\"5\"",
            "\"5.0\"",
            "v5",
            "3.1.1",
            "\"311\"",
            "v3.1.1",
            "v311",
            "\" 3.1.1 \"",
        ],
        &[
            "4", "3", "\"3.1\"", "v4", "3.11", "true", "~", "[ 5 ]", "\"\"",
        ],
    );
}

#[test]
fn schema_websocket_forms_match_the_loader() {
    check_values(
        "broker:\n  listeners:\n    - { bind: \"127.0.0.1:1883\", websocket: VALUE }\n",
        &[
            "true",
            "false",
            "~",
            "{}",
            "{ path: /mqtt }",
            "{ path: ~ }",
            "{ path: \"/\" }",
        ],
        &[
            "\"true\"",
            "1",
            "[]",
            "{ paths: /x }",
            "yes",
            "{ path: mqtt }",
            "{ path: \"/a?b\" }",
            "{ path: \"/a b\" }",
        ],
    );
}

#[test]
fn schema_pipeline_outputs_match_the_loader() {
    check_values(
        &format!(
            "uplinks:\n  - {}\npipelines:\n  - {{ name: p, from: [ \"a/#\" ], to: [ VALUE ] }}\n",
            UPLINK
        ),
        &[
            "\"local:x/{topic}\"",
            "\"uplink:cloud\"",
            "\" local: x \"",
            "local:x",
        ],
        &[
            "x",
            "\"mqtt:x\"",
            "{ local: x }",
            "5",
            "\"Local:x\"",
            "~",
            "[ \"local:x\" ]",
        ],
    );
}

#[test]
fn schema_socket_addresses_match_the_loader() {
    check_values(
        "metrics: { bind: VALUE }\n",
        &[
            "\"127.0.0.1:9101\"",
            "0.0.0.0:0",
            "\"[::1]:9100\"",
            "\"[::]:80\"",
            "\"[fe80::1%2]:80\"",
        ],
        &[
            "\"localhost:9100\"",
            "127.0.0.1",
            "\" 127.0.0.1:9100\"",
            "9100",
            "\"127.0.0.1:\"",
            "\":9100\"",
            "~",
            "\"[::1]\"",
        ],
    );
}

/// Where text is expected the loader takes any scalar as its text; so does the schema.
#[test]
fn schema_text_keys_take_any_scalar_like_the_loader() {
    check_values(
        "gateway: { id: VALUE }\nlog: { level: info }\n",
        &["pi-kitchen", "42", "\"42\"", "true", "1.5"],
        &["[ a ]", "{ a: b }"],
    );
    check_values(
        "nodes:\n  predefined_topics: { VALUE }\n",
        &["1: a/b", "65534: 7", "0x10: a", "5: true"],
        &["a: a/b", "-1: a/b", "1: [ a ]"],
    );
}

/// What the schema cannot tell apart, pinned so that a change in the loader shows here. Each
/// case's YAML has the same JSON form as one the loader treats differently, or needs the
/// environment, or a range the schema does not carry.
#[test]
fn known_deviations_between_loader_and_schema() {
    let validator = validator();
    let dir = PluginDir::new("schema-deviations");
    // (config, the loader accepts, the schema accepts)
    let cases = [
        // `limits:` with nothing after it is an empty mapping; `~` is null: both are JSON null.
        ("broker:\n  limits:\n", true, true),
        ("broker:\n  limits: ~\n", false, true),
        ("broker:\n  listeners: ~\n", false, true),
        // Text keys: a bare `~` or nothing is the text `~` or `` to the loader, null to JSON.
        ("nodes:\n  serial: [ { port: ~ } ]\n", true, false),
        // 5.0 is an integer in JSON Schema; serde's u32 refuses a float.
        ("broker:\n  limits: { max_queued: 5.0 }\n", false, true),
        // `${NAME:-fallback}` is replaced before typing; the schema sees the text.
        (
            "broker:\n  limits:\n    max_queued: ${EDGEGW_SCHEMA_TEST_UNSET:-5}\n",
            true,
            false,
        ),
        // A quoted number is a string key: not a topic id to the loader, `"5"` to JSON.
        ("nodes:\n  predefined_topics: { \"5\": a/b }\n", false, true),
        // A number alone for a pipeline's filters: the schema takes any scalar as text, the
        // loader asks for it quoted (its text would not survive: `1.10` is 1.1).
        ("pipelines:\n  - { name: p, from: 5 }\n", false, true),
        // Values out of range inside a valid-looking form.
        ("metrics: { bind: \"127.0.0.1:99999\" }\n", false, true),
        ("gateway: { commit_interval: 2s }\n", false, true),
        (
            "broker:\n  limits: { max_packet_size: 1GiB }\n",
            false,
            true,
        ),
    ];
    for (text, loader, schema) in cases {
        assert_eq!(load_in(&dir, text).is_ok(), loader, "loader on {text}");
        assert_eq!(
            schema_errors(&validator, text).is_empty(),
            schema,
            "schema on {text}"
        );
    }
}

/// The embedded default (configs/demo.yaml, what `edgegw run` runs without -c) and the
/// Debian package's /etc/edgegw/gateway.yaml load, and the schema accepts them.
#[test]
fn demo_and_packaged_configs_are_accepted_by_loader_and_schema() {
    let validator = validator();
    let demo = Config::embedded_default().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(demo.nodes.simulated.len(), 1);
    assert_eq!(demo.nodes.simulated[0].id, "demo-node");
    assert!(
        demo.plugins.iter().all(|p| crate::is_builtin(&p.path)),
        "the demo needs no plugin files: {:?}",
        demo.plugins
    );
    assert_eq!(demo.pipelines.len(), 2);
    assert_eq!(
        schema_errors(&validator, crate::EMBEDDED_DEFAULT),
        [] as [(String, String); 0]
    );
    let packaged_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/gateway.yaml");
    let packaged = std::fs::read_to_string(&packaged_path).unwrap();
    let config = Config::load(&packaged_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/edgegw"));
    assert_eq!(
        schema_errors(&validator, &packaged),
        [] as [(String, String); 0]
    );
}

#[test]
fn builtin_plugins_and_simulated_nodes_are_checked() {
    let validator = validator();
    let good = "nodes:\n  simulated:\n    - { id: kitchen, nodes: 3, interval: 250ms, qos: 1 }\nplugins:\n  - { name: c2f, path: \"builtin:celsius-to-fahrenheit\" }\n";
    let config = Config::from_yaml("good.yaml", good, Path::new("/nonexistent"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.plugins[0].path,
        Path::new("builtin:celsius-to-fahrenheit"),
        "builtin paths are not resolved against the config's directory"
    );
    assert_eq!(schema_errors(&validator, good), [] as [(String, String); 0]);
    let sim = &config.nodes.simulated[0];
    assert_eq!((sim.nodes, sim.qos), (3, 1));
    assert_eq!(sim.interval.as_std(), std::time::Duration::from_millis(250));

    for (text, line, expected) in [
        (
            "plugins:\n  - { name: x, path: \"builtin:nope\" }\n",
            2,
            "there is no built-in plugin `nope`; built in are builtin:celsius-to-fahrenheit",
        ),
        (
            "nodes:\n  simulated:\n    - { id: \"a/b\" }\n",
            3,
            "id `a/b` must be 1 to 60 letters",
        ),
        (
            "nodes:\n  simulated:\n    - { id: a, nodes: 0 }\n",
            3,
            "nodes 0 is out of range: 1 to 100",
        ),
        (
            "nodes:\n  simulated:\n    - { id: a, interval: 1ms }\n",
            3,
            "interval 1ms is too short",
        ),
        (
            "nodes:\n  simulated:\n    - { id: a, qos: 2 }\n",
            3,
            "qos 2 must be 0 or 1",
        ),
        (
            "nodes:\n  simulated:\n    - { id: a }\n    - { id: a }\n",
            4,
            "id `a` is already used by entry 0",
        ),
        (
            "nodes:\n  simulated:\n    - { id: a, colour: red }\n",
            3,
            "unknown key `colour` in nodes.simulated[0]",
        ),
    ] {
        let errors = Config::from_yaml("bad.yaml", text, Path::new("/nonexistent"))
            .expect_err(text)
            .to_string();
        assert!(
            errors.contains(&format!("bad.yaml:{line}:")) && errors.contains(expected),
            "{text}: {errors}"
        );
    }
    // What the schema can carry of those: ranges and unknown keys.
    for text in [
        "nodes:\n  simulated:\n    - { id: a, nodes: 0 }\n",
        "nodes:\n  simulated:\n    - { id: a, qos: 2 }\n",
        "nodes:\n  simulated:\n    - { id: a, colour: red }\n",
        "nodes:\n  simulated:\n    - { nodes: 2 }\n",
    ] {
        assert!(!schema_errors(&validator, text).is_empty(), "{text}");
    }
}
