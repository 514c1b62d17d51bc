//! Semantic checks on the typed config: each states the constraint with the values involved
//! and names the key path so the loader can point at the line.

use std::collections::HashMap;

use crate::{Config, locate::PathSeg};

pub struct Issue {
    pub path: Vec<PathSeg>,
    pub message: String,
}

/// The protocol limit on an MQTT packet (the remaining length is a 4-byte varint).
const MQTT_MAX_PACKET: u64 = 268_435_455;

/// `nodes`.
fn nodes_issues(nodes: &crate::Nodes, issue: &mut impl FnMut(&[&str], String)) {
    let mut seen = HashMap::new();
    for (i, serial) in nodes.serial.iter().enumerate() {
        let index = i.to_string();
        if serial.port.is_empty() {
            issue(
                &["nodes", "serial", &index, "port"],
                format!("nodes.serial {i}: port must be a device path, e.g. /dev/ttyUSB0"),
            );
        } else if let Some(first) = seen.insert(serial.port.as_str(), i) {
            issue(
                &["nodes", "serial", &index, "port"],
                format!(
                    "nodes.serial {i}: port {} is already used by entry {first}; each port can be opened once",
                    serial.port
                ),
            );
        }
        if serial.baud == 0 {
            issue(
                &["nodes", "serial", &index, "baud"],
                format!("nodes.serial {i}: baud must be above 0, e.g. 115200"),
            );
        }
    }
    for (id, topic) in &nodes.predefined_topics {
        // The map key is a number, which the locator would read as a list index: point at
        // the mapping instead and name the id in the message.
        let place = ["nodes", "predefined_topics"];
        if *id == 0 || *id == u16::MAX {
            issue(
                &place,
                format!("predefined topic id {id} is reserved by MQTT-SN; use 1 to 65534"),
            );
        }
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            issue(
                &place,
                format!(
                    "predefined topic {id}: `{topic}` must be a topic name without wildcards (+, #), e.g. sensors/{{node}}/temp"
                ),
            );
        }
    }
}

/// `broker.auth` and `broker.acl`.
fn auth_issues(broker: &crate::Broker, issue: &mut impl FnMut(&[&str], String)) {
    let auth = &broker.auth;
    if let Some(path) = &auth.password_file
        && let Err(error) = std::fs::metadata(path)
    {
        issue(
            &["broker", "auth", "password_file"],
            format!(
                "cannot read password_file {}: {error}; create it with `edgegw passwd {} USER`",
                path.display(),
                path.display()
            ),
        );
    }
    if auth.max_failures > 0 && auth.failure_window.as_std().is_zero() {
        issue(
            &["broker", "auth", "failure_window"],
            "failure_window must be at least 1s while max_failures is above 0 (max_failures: 0 turns the limit off)".into(),
        );
    }
    for (i, rule) in broker.acl.rules.iter().enumerate() {
        let index = i.to_string();
        for (key, value) in [("user", &rule.user), ("client_id", &rule.client_id)] {
            let Some(value) = value else { continue };
            if value.is_empty() || (value.contains('*') && value != "*") {
                issue(
                    &["broker", "acl", "rules", &index, key],
                    format!(
                        "ACL rule {i}: {key} `{value}` must be an exact name or `*` (patterns are not supported)"
                    ),
                );
            }
        }
        if rule.topics.is_empty() {
            issue(
                &["broker", "acl", "rules", &index, "topics"],
                format!(
                    "ACL rule {i} has no topics; list at least one filter, e.g. `topics: [\"sensors/#\"]`"
                ),
            );
        }
        for (j, filter) in rule.topics.iter().enumerate() {
            if let Some(problem) = acl_filter_problem(filter) {
                issue(
                    &["broker", "acl", "rules", &index, "topics", &j.to_string()],
                    format!("ACL rule {i}: topic filter `{filter}` {problem}"),
                );
            }
        }
    }
}

/// Why a WebSocket path cannot match a request: it is compared with the request target's
/// path as sent (percent-encoded, without the query).
fn websocket_path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("must start with `/`, e.g. `/mqtt`");
    }
    if path.contains(['?', '#']) {
        return Some("must be a path alone, without `?` or `#` (the query string is ignored)");
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(
            "must be printable ASCII without spaces (percent-encode other characters, e.g. `%20`)",
        );
    }
    None
}

/// Why an ACL topic filter is unusable (`%u`/`%c` stand for one level's text).
fn acl_filter_problem(filter: &str) -> Option<String> {
    let mut text = String::with_capacity(filter.len());
    let mut chars = filter.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        match chars.next() {
            Some('u' | 'c') => text.push('x'),
            _ => {
                return Some("has a `%` that is not `%u` (user name) or `%c` (client id)".into());
            }
        }
    }
    if text.is_empty() {
        return Some("is empty".into());
    }
    if text.starts_with("$share/") {
        return Some(
            "starts with `$share/`: ACLs check the filter inside a shared subscription; write the filter alone".into(),
        );
    }
    if text.contains('\0') {
        return Some("contains U+0000".into());
    }
    let levels: Vec<&str> = text.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('+') && *level != "+" {
            return Some("is not a valid filter: `+` must occupy a whole level".into());
        }
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Some(
                "is not a valid filter: `#` must be the last level and occupy it whole".into(),
            );
        }
    }
    None
}

pub fn validate(config: &Config) -> Vec<Issue> {
    let mut issues = Vec::new();
    let mut issue = |path: &[&str], message: String| {
        issues.push(Issue {
            path: path
                .iter()
                .map(|s| match s.parse::<usize>() {
                    Ok(i) => PathSeg::Index(i),
                    Err(_) => PathSeg::key(s),
                })
                .collect(),
            message,
        });
    };

    nodes_issues(&config.nodes, &mut issue);

    let id = &config.gateway.id;
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        issue(
            &["gateway", "id"],
            format!(
                "gateway.id `{id}` must be non-empty and use only letters, digits, `-`, `_` and `.`"
            ),
        );
    }

    let interval = config.gateway.commit_interval.as_std();
    if interval > std::time::Duration::from_secs(1) {
        issue(
            &["gateway", "commit_interval"],
            format!(
                "gateway.commit_interval {} is too long: acknowledgements wait for it; use at most 1s (10ms is a good start)",
                config.gateway.commit_interval
            ),
        );
    }

    let broker = &config.broker;
    if broker.listeners.is_empty() {
        issue(
            &["broker", "listeners"],
            "broker.listeners is empty: add at least one, e.g. `- { bind: \"127.0.0.1:1883\" }`"
                .into(),
        );
    }
    let mut seen = HashMap::new();
    for (i, listener) in broker.listeners.iter().enumerate() {
        let index = i.to_string();
        if listener.bind.port() != 0 {
            if let Some(first) = seen.insert(listener.bind, i) {
                issue(
                    &["broker", "listeners", &index, "bind"],
                    format!(
                        "listener {i} binds {} which listener {first} already binds; give each listener its own port",
                        listener.bind
                    ),
                );
            }
            if listener.bind == config.metrics.bind {
                issue(
                    &["broker", "listeners", &index, "bind"],
                    format!(
                        "listener {i} binds {} which is also metrics.bind; use another port",
                        listener.bind
                    ),
                );
            }
        }
        if let Some(tls) = &listener.tls {
            let files = [("cert", Some(&tls.cert)), ("key", Some(&tls.key))];
            let ca = [("client_ca", tls.client_ca.as_ref())];
            for (key, path) in files.iter().chain(ca.iter()) {
                let Some(path) = path else { continue };
                if let Err(error) = std::fs::metadata(path) {
                    issue(
                        &["broker", "listeners", &index, "tls", key],
                        format!(
                            "cannot read TLS {key} file {}: {error}; give the path of a PEM file",
                            path.display()
                        ),
                    );
                }
            }
            if tls.use_identity_as_username && tls.client_ca.is_none() {
                issue(
                    &["broker", "listeners", &index, "tls", "use_identity_as_username"],
                    "use_identity_as_username needs client_ca: without client certificates there is no identity; set client_ca to the CA bundle that signs them".into(),
                );
            }
        }
        if let Some(path) = listener.websocket.as_ref().and_then(|w| w.path.as_ref())
            && let Some(problem) = websocket_path_problem(path)
        {
            issue(
                &["broker", "listeners", &index, "websocket", "path"],
                format!("listener {i}: websocket path `{path}` {problem}"),
            );
        }
    }
    auth_issues(broker, &mut issue);

    let limits = &broker.limits;
    let path = |key: &'static str| ["broker", "limits", key];
    if limits.max_connections == 0 {
        issue(
            &path("max_connections"),
            "max_connections must be at least 1".into(),
        );
    }
    let size = limits.max_packet_size.bytes();
    if !(64..=MQTT_MAX_PACKET).contains(&size) {
        issue(
            &path("max_packet_size"),
            format!(
                "max_packet_size {} is out of range: it must be between 64B and 256MiB (the MQTT limit)",
                limits.max_packet_size
            ),
        );
    }
    let keepalive = limits.max_keepalive.as_std();
    if keepalive.as_secs() == 0 || keepalive.as_secs() > 65_535 || keepalive.subsec_nanos() != 0 {
        issue(
            &path("max_keepalive"),
            format!(
                "max_keepalive {} must be whole seconds between 1s and 65535s (the MQTT limit)",
                limits.max_keepalive
            ),
        );
    }
    if limits.receive_maximum == 0 {
        issue(
            &path("receive_maximum"),
            "receive_maximum must be between 1 and 65535".into(),
        );
    }
    if limits.max_inflight == 0 {
        issue(
            &path("max_inflight"),
            "max_inflight must be between 1 and 65535".into(),
        );
    }
    if limits.max_queued == 0 {
        issue(&path("max_queued"), "max_queued must be at least 1".into());
    }
    if limits.max_session_expiry.as_secs() > u64::from(u32::MAX) {
        issue(
            &path("max_session_expiry"),
            format!(
                "max_session_expiry {} exceeds the MQTT limit of 4294967295s",
                limits.max_session_expiry
            ),
        );
    }

    for directive in config.log.level.split(',').map(str::trim) {
        let level = directive.rsplit('=').next().unwrap_or("");
        let known = ["trace", "debug", "info", "warn", "error", "off"];
        if directive.is_empty() || !known.contains(&level.to_ascii_lowercase().as_str()) {
            issue(
                &["log", "level"],
                format!(
                    "log.level directive `{directive}` is not valid: write a level ({}) or `target=level`",
                    known.join(", ")
                ),
            );
        }
    }
    issues
}
