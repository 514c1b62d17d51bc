//! Semantic checks on the typed config: each states the constraint with the values involved
//! and names the key path so the loader can point at the line.

use std::collections::{HashMap, HashSet};

use crate::{ByteSize, Config, locate::PathSeg};

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
    let mut addresses = HashMap::new();
    for (i, node) in nodes.ble.iter().enumerate() {
        let index = i.to_string();
        let parts: Vec<&str> = node.address.split(':').collect();
        let valid = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
        if !valid {
            issue(
                &["nodes", "ble", &index, "address"],
                format!(
                    "nodes.ble {i}: address `{}` is not a Bluetooth address; write six hex pairs such as AA:BB:CC:DD:EE:FF",
                    node.address
                ),
            );
        } else if let Some(first) = addresses.insert(node.address.to_ascii_uppercase(), i) {
            issue(
                &["nodes", "ble", &index, "address"],
                format!(
                    "nodes.ble {i}: address {} is already used by entry {first}",
                    node.address
                ),
            );
        }
        if node.adapter.as_deref() == Some("") {
            issue(
                &["nodes", "ble", &index, "adapter"],
                format!(
                    "nodes.ble {i}: adapter must name an adapter such as hci0, or be left out for the default"
                ),
            );
        }
    }
    let mut names = HashMap::new();
    for (i, sim) in nodes.simulated.iter().enumerate() {
        let index = i.to_string();
        let valid = !sim.id.is_empty()
            && sim.id.len() <= 60
            && sim
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            issue(
                &["nodes", "simulated", &index, "id"],
                format!(
                    "nodes.simulated {i}: id `{}` must be 1 to 60 letters, digits, `-` or `_` (it is a client id and a topic level), e.g. demo-node",
                    sim.id
                ),
            );
        } else if let Some(first) = names.insert(sim.id.as_str(), i) {
            issue(
                &["nodes", "simulated", &index, "id"],
                format!(
                    "nodes.simulated {i}: id `{}` is already used by entry {first}",
                    sim.id
                ),
            );
        }
        if !(1..=100).contains(&sim.nodes) {
            issue(
                &["nodes", "simulated", &index, "nodes"],
                format!(
                    "nodes.simulated {i}: nodes {} is out of range: 1 to 100",
                    sim.nodes
                ),
            );
        }
        if sim.interval.as_std() < std::time::Duration::from_millis(10) {
            issue(
                &["nodes", "simulated", &index, "interval"],
                format!(
                    "nodes.simulated {i}: interval {} is too short: at least 10ms",
                    sim.interval
                ),
            );
        }
        if sim.qos > 1 {
            issue(
                &["nodes", "simulated", &index, "qos"],
                format!("nodes.simulated {i}: qos {} must be 0 or 1", sim.qos),
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
    // An uplink that only pipelines send to has work without forward rules.
    let pipeline_targets: HashSet<&str> = config
        .pipelines
        .iter()
        .flat_map(|p| &p.to)
        .filter_map(|output| match output {
            crate::PipelineOutput::Uplink(name) => Some(name.as_str()),
            crate::PipelineOutput::Local(_) => None,
        })
        .collect();
    uplink_issues(&config.uplinks, &pipeline_targets, &mut issue);
    plugin_issues(&config.plugins, &mut issue);
    pipeline_issues(config, &mut issue);

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
    let hibernate = limits.hibernate_after.as_std();
    if hibernate.subsec_nanos() != 0 || hibernate.as_secs() > 86_400 {
        issue(
            &path("hibernate_after"),
            format!(
                "hibernate_after {} must be whole seconds up to 1d (0 turns hibernation off)",
                limits.hibernate_after
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

/// Why a topic filter is unusable (plain MQTT syntax).
fn filter_problem(filter: &str) -> Option<String> {
    if filter.contains('%') {
        return acl_filter_problem(&filter.replace('%', "_"));
    }
    acl_filter_problem(filter)
}

/// Why a topic template (`{topic}`, `{N}`, `{N..}`) is unusable.
pub fn template_problem(template: &str) -> Option<String> {
    if template.is_empty() {
        return Some("is empty; `{topic}` keeps the topic as it is".into());
    }
    let mut rest = template;
    let mut literal = String::new();
    while let Some(open) = rest.find('{') {
        literal.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Some("has a `{` without `}`".into());
        };
        let inner = &rest[open + 1..open + close];
        let number = inner.strip_suffix("..").unwrap_or(inner);
        if inner != "topic" && !matches!(number.parse::<usize>(), Ok(n) if n >= 1) {
            return Some(format!(
                "has `{{{inner}}}`; use `{{topic}}`, a topic level `{{1}}`, `{{2}}`… or the levels from one on, e.g. `{{2..}}`"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    literal.push_str(rest);
    if literal.contains('}') {
        return Some("has a `}` without `{`".into());
    }
    if literal.contains(['+', '#', '\0']) {
        return Some("must produce a topic name: no `+` or `#`".into());
    }
    None
}

/// `uplinks`.
fn uplink_issues(
    uplinks: &[crate::Uplink],
    pipeline_targets: &HashSet<&str>,
    issue: &mut impl FnMut(&[&str], String),
) {
    let mut names = HashMap::new();
    for (i, uplink) in uplinks.iter().enumerate() {
        let index = i.to_string();
        let at = |key: &str| -> Vec<String> { vec!["uplinks".into(), index.clone(), key.into()] };
        let mut report = |path: Vec<String>, message: String| {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            issue(&path, message);
        };
        let name = &uplink.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            report(
                at("name"),
                format!(
                    "uplink name `{name}` must be non-empty and use only letters, digits, `-` and `_`"
                ),
            );
        } else if let Some(first) = names.insert(name.as_str(), i) {
            report(
                at("name"),
                format!("uplink name `{name}` is already used by uplink {first}"),
            );
        }
        let tls_url = match url_problem(&uplink.url) {
            Ok(tls) => Some(tls),
            Err(problem) => {
                report(
                    at("url"),
                    format!("uplink `{name}`: url `{}` {problem}", uplink.url),
                );
                None
            }
        };
        let tls = &uplink.tls;
        let tls_set = tls.ca.is_some()
            || tls.cert.is_some()
            || tls.key.is_some()
            || tls.server_name.is_some()
            || !tls.alpn.is_empty();
        if tls_url == Some(false) && tls_set {
            report(
                at("tls"),
                format!("uplink `{name}`: tls settings need an mqtts:// url"),
            );
        }
        if tls.cert.is_some() != tls.key.is_some() {
            report(
                at("tls"),
                format!(
                    "uplink `{name}`: tls.cert and tls.key go together (mutual TLS needs both)"
                ),
            );
        }
        for (key, path) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            if let Some(path) = path
                && let Err(error) = std::fs::metadata(path)
            {
                report(
                    vec!["uplinks".into(), index.clone(), "tls".into(), key.into()],
                    format!(
                        "uplink `{name}`: cannot read tls.{key} {}: {error}",
                        path.display()
                    ),
                );
            }
        }
        if let Some(path) = &uplink.password_file {
            if uplink.password.is_some() {
                report(
                    at("password_file"),
                    format!("uplink `{name}`: set password or password_file, not both"),
                );
            } else if let Err(error) = std::fs::read(path) {
                report(
                    at("password_file"),
                    format!(
                        "uplink `{name}`: cannot read password_file {}: {error}",
                        path.display()
                    ),
                );
            }
        }
        if let Some(client_id) = &uplink.client_id
            && (client_id.is_empty() || client_id.len() > 65_535)
        {
            report(
                at("client_id"),
                format!("uplink `{name}`: client_id must be 1 to 65535 bytes"),
            );
        }
        if uplink.keepalive.as_secs() > 65_535 {
            report(
                at("keepalive"),
                format!(
                    "uplink `{name}`: keepalive {} is above MQTT's 65535 s",
                    uplink.keepalive
                ),
            );
        }
        if let Some(max) = uplink.max_packet_size
            && !(64..=268_435_460).contains(&max.bytes())
        {
            report(
                at("max_packet_size"),
                format!(
                    "uplink `{name}`: max_packet_size {max} is out of range: it must be between 64B and 256MiB (the MQTT limit)"
                ),
            );
        }
        if uplink.inflight == 0 {
            report(
                at("inflight"),
                format!("uplink `{name}`: inflight must be at least 1"),
            );
        }
        let reconnect = &uplink.reconnect;
        if reconnect.min.as_std().is_zero() || reconnect.min.as_std() > reconnect.max.as_std() {
            report(
                at("reconnect"),
                format!(
                    "uplink `{name}`: reconnect needs 0 < min <= max (min {}, max {})",
                    reconnect.min, reconnect.max
                ),
            );
        }
        if uplink.forward.is_empty()
            && uplink.subscribe.is_empty()
            && !pipeline_targets.contains(name.as_str())
        {
            report(
                at("name"),
                format!(
                    "uplink `{name}` has neither forward nor subscribe rules and no pipeline sends to it: it would do nothing"
                ),
            );
        }
        for (j, rule) in uplink.forward.iter().enumerate() {
            let place = |key: &str| -> Vec<String> {
                vec![
                    "uplinks".into(),
                    index.clone(),
                    "forward".into(),
                    j.to_string(),
                    key.into(),
                ]
            };
            if let Some(problem) = filter_problem(&rule.from) {
                report(
                    place("from"),
                    format!(
                        "uplink `{name}` forward {j}: from `{}` {problem}",
                        rule.from
                    ),
                );
            }
            if let Some(problem) = template_problem(&rule.to) {
                report(
                    place("to"),
                    format!("uplink `{name}` forward {j}: to `{}` {problem}", rule.to),
                );
            }
            if rule.qos > 2 {
                report(
                    place("qos"),
                    format!("uplink `{name}` forward {j}: qos must be 0, 1 or 2"),
                );
            }
        }
        for (j, rule) in uplink.subscribe.iter().enumerate() {
            let place = |key: &str| -> Vec<String> {
                vec![
                    "uplinks".into(),
                    index.clone(),
                    "subscribe".into(),
                    j.to_string(),
                    key.into(),
                ]
            };
            if let Some(problem) = filter_problem(&rule.remote) {
                report(
                    place("remote"),
                    format!(
                        "uplink `{name}` subscribe {j}: remote `{}` {problem}",
                        rule.remote
                    ),
                );
            }
            if let Some(problem) = template_problem(&rule.local) {
                report(
                    place("local"),
                    format!(
                        "uplink `{name}` subscribe {j}: local `{}` {problem}",
                        rule.local
                    ),
                );
            }
            if rule.qos > 2 {
                report(
                    place("qos"),
                    format!("uplink `{name}` subscribe {j}: qos must be 0, 1 or 2"),
                );
            }
        }
        let outbox = &uplink.outbox;
        if outbox.max_messages == 0 {
            report(
                vec![
                    "uplinks".into(),
                    index.clone(),
                    "outbox".into(),
                    "max_messages".into(),
                ],
                format!("uplink `{name}`: outbox.max_messages must be at least 1"),
            );
        }
        if outbox.max_bytes.bytes() < 1024 {
            report(
                vec![
                    "uplinks".into(),
                    index.clone(),
                    "outbox".into(),
                    "max_bytes".into(),
                ],
                format!("uplink `{name}`: outbox.max_bytes must be at least 1KiB"),
            );
        }
    }
}

/// A name other keys refer to (`plugin: c2f`, `uplink:cloud`): `[A-Za-z0-9_-]+`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// `unknown plugin `x` (plugins: a, b)`, with a suggestion when one is close.
fn unknown_reference(kind: &str, name: &str, known: &[&str]) -> String {
    if known.is_empty() {
        return format!(
            "unknown {kind} `{name}` (no {kind}s are configured; add one under `{kind}s:`)"
        );
    }
    let mut message = format!("unknown {kind} `{name}` ({kind}s: {})", known.join(", "));
    if let Some(best) = crate::nearest(name, known) {
        message.push_str(&format!("; did you mean `{best}`?"));
    }
    message
}

/// The largest linear memory a 32-bit WebAssembly module can have.
const WASM_MAX_MEMORY: u64 = 4 << 30;

/// `plugins`.
fn plugin_issues(plugins: &[crate::PluginConfig], issue: &mut impl FnMut(&[&str], String)) {
    let mut names = HashMap::new();
    for (i, plugin) in plugins.iter().enumerate() {
        let index = i.to_string();
        let name = &plugin.name;
        if !is_valid_name(name) {
            issue(
                &["plugins", &index, "name"],
                format!(
                    "plugin name `{name}` must be non-empty and use only letters, digits, `-` and `_`"
                ),
            );
        } else if let Some(first) = names.insert(name.as_str(), i) {
            issue(
                &["plugins", &index, "name"],
                format!("plugin name `{name}` is already used by plugin {first}"),
            );
        }
        let path = &plugin.path;
        if let Some(builtin) = path
            .to_str()
            .and_then(|p| p.strip_prefix(crate::BUILTIN_PREFIX))
        {
            if !crate::BUILTIN_PLUGINS.contains(&builtin) {
                issue(
                    &["plugins", &index, "path"],
                    format!(
                        "plugin `{name}`: there is no built-in plugin `{builtin}`; built in are {}",
                        crate::BUILTIN_PLUGINS
                            .iter()
                            .map(|b| format!("builtin:{b}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        } else {
            match std::fs::metadata(path) {
                Err(error) => issue(
                    &["plugins", &index, "path"],
                    format!(
                        "plugin `{name}`: cannot read {}: {error}; give the path of a WebAssembly component (.wasm), relative to this file's directory",
                        path.display()
                    ),
                ),
                Ok(meta) if meta.is_dir() => issue(
                    &["plugins", &index, "path"],
                    format!(
                        "plugin `{name}`: {} is a directory; give the path of the component file (.wasm)",
                        path.display()
                    ),
                ),
                Ok(_) => {}
            }
        }
        let limits = &plugin.limits;
        let time = limits.time.as_std();
        if time.is_zero() || time > std::time::Duration::from_secs(10) {
            issue(
                &["plugins", &index, "limits", "time"],
                format!(
                    "plugin `{name}`: limits.time {} is out of range: it must be above 0 and at most 10s (default 5ms)",
                    limits.time
                ),
            );
        }
        if !(ByteSize::mib(1).bytes()..=WASM_MAX_MEMORY).contains(&limits.memory) {
            issue(
                &["plugins", &index, "limits", "memory"],
                format!(
                    "plugin `{name}`: limits.memory {} is out of range: it must be between 1MiB and 4GiB (default 16MiB)",
                    ByteSize(limits.memory)
                ),
            );
        }
        if !(1..=10_000).contains(&limits.max_outputs) {
            issue(
                &["plugins", &index, "limits", "max_outputs"],
                format!(
                    "plugin `{name}`: limits.max_outputs {} is out of range: it must be between 1 and 10000 (default 100)",
                    limits.max_outputs
                ),
            );
        }
    }
}

/// `pipelines`, checked against the `plugins` and `uplinks` they name.
fn pipeline_issues(config: &Config, issue: &mut impl FnMut(&[&str], String)) {
    let plugins: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
    let uplinks: Vec<&str> = config.uplinks.iter().map(|u| u.name.as_str()).collect();
    let mut names = HashMap::new();
    for (i, pipeline) in config.pipelines.iter().enumerate() {
        let index = i.to_string();
        let name = &pipeline.name;
        if !is_valid_name(name) {
            issue(
                &["pipelines", &index, "name"],
                format!(
                    "pipeline name `{name}` must be non-empty and use only letters, digits, `-` and `_`"
                ),
            );
        } else if let Some(first) = names.insert(name.as_str(), i) {
            issue(
                &["pipelines", &index, "name"],
                format!("pipeline name `{name}` is already used by pipeline {first}"),
            );
        }
        if pipeline.from.is_empty() {
            issue(
                &["pipelines", &index, "from"],
                format!(
                    "pipeline `{name}`: from is empty; list at least one topic filter, e.g. `from: [ \"sensors/+/temp\" ]`"
                ),
            );
        }
        for (j, filter) in pipeline.from.iter().enumerate() {
            if let Some(problem) = filter_problem(filter) {
                issue(
                    &["pipelines", &index, "from", &j.to_string()],
                    format!("pipeline `{name}`: from `{filter}` {problem}"),
                );
            }
        }
        for (j, stage) in pipeline.rules.iter().enumerate() {
            if !plugins.contains(&stage.plugin.as_str()) {
                issue(
                    &["pipelines", &index, "rules", &j.to_string(), "plugin"],
                    unknown_reference("plugin", &stage.plugin, &plugins),
                );
            }
        }
        for (j, output) in pipeline.to.iter().enumerate() {
            let place = ["pipelines", &index, "to", &j.to_string()];
            match output {
                crate::PipelineOutput::Local(template) => {
                    if let Some(problem) = template_problem(template) {
                        issue(
                            &place,
                            format!(
                                "pipeline `{name}`: to `local:{template}`: the topic {problem}"
                            ),
                        );
                    }
                }
                crate::PipelineOutput::Uplink(uplink) => {
                    if !uplinks.contains(&uplink.as_str()) {
                        issue(&place, unknown_reference("uplink", uplink, &uplinks));
                    }
                }
            }
        }
        let capacity = pipeline.queue.capacity;
        if !(1..=1_000_000).contains(&capacity) {
            issue(
                &["pipelines", &index, "queue", "capacity"],
                format!(
                    "pipeline `{name}`: queue.capacity {capacity} is out of range: it must be between 1 and 1000000 (default 1000)"
                ),
            );
        }
        if let Some(topic) = &pipeline.dead_letter
            && (topic.is_empty() || topic.contains(['+', '#', '\0']))
        {
            issue(
                &["pipelines", &index, "dead_letter"],
                format!(
                    "pipeline `{name}`: dead_letter `{topic}` must be a topic name without wildcards (+, #); leave it out for `$edgegw/deadletter/{name}`"
                ),
            );
        }
    }
}

/// `Ok(true)` for mqtts://, `Ok(false)` for mqtt://, else what is wrong.
pub fn url_problem(url: &str) -> Result<bool, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err("must start with mqtts:// (or mqtt:// without TLS)".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '@', ' ']) {
        return Err("must be mqtts://HOST[:PORT] (no path, no user in the url)".into());
    }
    let host = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            if !host.contains(':') || host.starts_with('[') {
                if port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("has an invalid port `{port}`"));
                }
                host
            } else {
                rest
            }
        }
        _ => rest,
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok(tls)
}
