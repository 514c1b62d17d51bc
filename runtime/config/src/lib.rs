//! Typed gateway configuration: load a YAML file, substitute `${ENV}`, reject unknown keys,
//! validate, and report *every* problem with `file:line:column`, the bad value and the fix.
//!
//! Loading runs in passes so that one mistake does not hide the next one:
//! 1. `${NAME}` substitution on the text (an unset variable is an error at its position);
//! 2. YAML syntax (one error: nothing after a syntax error can be trusted);
//! 3. each top-level section is deserialized on its own, so a type error in `broker:` still
//!    lets errors in `metrics:` be reported;
//! 4. semantic checks on the typed values, each located in the file by its key path.
//!
//! `serde_norway` (the maintained `serde_yaml` fork) carries positions only in its errors,
//! so step 4 finds a key's position with a probe: a tiny deserializer walk that stops with
//! an error exactly at the value named by the path, and reads the location off that error.

mod json;
mod locate;
mod model;
mod schema;
mod units;
mod validate;

use std::{fmt, path::Path};

pub use model::*;
pub use schema::json_schema;
pub use units::{ByteSize, Duration};

use locate::{PathSeg, locate};

/// A plugin `path` starting with this names a plugin built into the gateway.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// The plugins built into the gateway (the SDK's example rules), for `path: builtin:NAME`.
pub const BUILTIN_PLUGINS: &[&str] = &[
    "celsius-to-fahrenheit",
    "threshold-alert",
    "deadband",
    "enrich",
];

/// Whether a plugin path is `builtin:NAME` (whatever the name).
pub fn is_builtin(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(BUILTIN_PREFIX))
}

/// The embedded default config (`configs/demo.yaml`): what `edgegw run` without `-c` runs.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../configs/demo.yaml");

/// One problem in a config file, with its position when it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(col)) => write!(f, "{}:{line}:{col}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The embedded default config ([`EMBEDDED_DEFAULT`]), parsed; relative paths are
    /// relative to the working directory.
    pub fn embedded_default() -> Result<Self, ConfigErrors> {
        Self::from_yaml(
            "embedded default config (configs/demo.yaml)",
            EMBEDDED_DEFAULT,
            Path::new(""),
        )
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                column: None,
                message: format!("cannot read the config file: {error}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&file, &text, base)
    }

    /// Parses and validates config text; `file` names it in errors and relative paths in it
    /// (TLS, password and plugin files) are resolved against `base_dir`.
    pub fn from_yaml(file: &str, text: &str, base_dir: &Path) -> Result<Self, ConfigErrors> {
        let error_at = |line, column, message| ConfigError {
            file: file.to_string(),
            line: Some(line),
            column: Some(column),
            message,
        };
        let text = substitute_env_outside_comments(text, |name| std::env::var(name).ok())
            .map_err(|(line, col, msg)| ConfigErrors(vec![error_at(line, col, msg)]))?;

        let root: serde_norway::Value = match serde_norway::from_str(&text) {
            Ok(value) => value,
            Err(error) => return Err(ConfigErrors(vec![from_yaml_error(file, &text, &error)])),
        };
        let mapping = match root {
            serde_norway::Value::Null => serde_norway::Mapping::new(),
            serde_norway::Value::Mapping(mapping) => mapping,
            _ => {
                return Err(ConfigErrors(vec![error_at(
                    1,
                    1,
                    format!(
                        "the config must be a mapping of sections ({}:)",
                        SECTIONS.join(":, ")
                    ),
                )]));
            }
        };

        let mut errors = Vec::new();
        for key in mapping.keys() {
            let Some(name) = key.as_str() else {
                errors.push(ConfigError {
                    file: file.to_string(),
                    line: None,
                    column: None,
                    message: format!("top-level keys must be strings, got {key:?}"),
                });
                continue;
            };
            if !SECTIONS.contains(&name) {
                let (line, column) =
                    locate::locate_key(&text, &[PathSeg::Key(name.to_string())]).unwrap_or((1, 1));
                errors.push(error_at(
                    line,
                    column,
                    unknown_key_message(name, SECTIONS, "the top level"),
                ));
            }
        }

        let mut config = Config::default();
        if mapping.is_empty() {
            return Ok(config);
        }
        section(file, &text, "gateway", &mut config.gateway, &mut errors);
        section(file, &text, "broker", &mut config.broker, &mut errors);
        section(file, &text, "nodes", &mut config.nodes, &mut errors);
        section(file, &text, "uplinks", &mut config.uplinks, &mut errors);
        section(file, &text, "plugins", &mut config.plugins, &mut errors);
        section(file, &text, "pipelines", &mut config.pipelines, &mut errors);
        section(file, &text, "metrics", &mut config.metrics, &mut errors);
        section(file, &text, "log", &mut config.log, &mut errors);

        if errors.is_empty() {
            config.resolve_paths(base_dir);
            for issue in validate::validate(&config) {
                let position = locate(&text, &issue.path);
                errors.push(ConfigError {
                    file: file.to_string(),
                    line: position.map(|p| p.0),
                    column: position.map(|p| p.1),
                    message: issue.message,
                });
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut std::path::PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for listener in &mut self.broker.listeners {
            if let Some(tls) = &mut listener.tls {
                join(&mut tls.cert);
                join(&mut tls.key);
                if let Some(ca) = &mut tls.client_ca {
                    join(ca);
                }
            }
        }
        if let Some(path) = &mut self.broker.auth.password_file {
            join(path);
        }
        for uplink in &mut self.uplinks {
            for path in [
                &mut uplink.tls.ca,
                &mut uplink.tls.cert,
                &mut uplink.tls.key,
                &mut uplink.password_file,
            ]
            .into_iter()
            .flatten()
            {
                join(path);
            }
        }
        for plugin in &mut self.plugins {
            if !is_builtin(&plugin.path) {
                join(&mut plugin.path);
            }
        }
    }

    /// A one-paragraph summary for `edgegw check` and the start-up log.
    pub fn summary(&self) -> String {
        let listeners: Vec<String> = self
            .broker
            .listeners
            .iter()
            .map(|l| match (&l.websocket, l.tls.is_some()) {
                (None, tls) => format!("{}://{}", if tls { "mqtts" } else { "mqtt" }, l.bind),
                (Some(websocket), tls) => format!(
                    "{}://{}{}",
                    if tls { "wss" } else { "ws" },
                    l.bind,
                    websocket.path.as_deref().unwrap_or("/mqtt (any path)")
                ),
            })
            .collect();
        let auth = &self.broker.auth;
        let passwords = match &auth.password_file {
            Some(path) => format!(", users from {}", path.display()),
            None => String::new(),
        };
        let acl = &self.broker.acl;
        let acl = match acl.rules.len() {
            0 if acl.default == AclPermission::Allow => String::new(),
            n => format!(
                "; ACL: {n} rule{}, default {}",
                if n == 1 { "" } else { "s" },
                if acl.default == AclPermission::Allow {
                    "allow"
                } else {
                    "deny"
                }
            ),
        };
        let uplinks = if self.uplinks.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self
                .uplinks
                .iter()
                .map(|u| format!("{} ({})", u.name, u.url))
                .collect();
            format!("; uplinks: {}", list.join(", "))
        };
        let plugins = if self.plugins.is_empty() {
            String::new()
        } else {
            let list: Vec<&str> = self.plugins.iter().map(|p| p.name.as_str()).collect();
            format!("; plugins: {}", list.join(", "))
        };
        let pipelines = if self.pipelines.is_empty() {
            String::new()
        } else {
            // `temps (sensors/+/temp -> c2f -> local:processed/{topic}, uplink:cloud)`
            let list: Vec<String> = self
                .pipelines
                .iter()
                .map(|p| {
                    let mut steps = vec![p.from.join(", ")];
                    steps.extend(p.rules.iter().map(|r| r.plugin.clone()));
                    steps.push(if p.to.is_empty() {
                        "drop".into()
                    } else {
                        let to: Vec<String> = p.to.iter().map(ToString::to_string).collect();
                        to.join(", ")
                    });
                    format!("{} ({})", p.name, steps.join(" -> "))
                })
                .collect();
            format!("; pipelines: {}", list.join(", "))
        };
        let mut nodes = Vec::new();
        if !self.nodes.serial.is_empty() {
            let ports: Vec<&str> = self.nodes.serial.iter().map(|s| s.port.as_str()).collect();
            nodes.push(format!("serial {}", ports.join(", ")));
        }
        if !self.nodes.ble.is_empty() {
            let addresses: Vec<&str> = self.nodes.ble.iter().map(|b| b.address.as_str()).collect();
            nodes.push(format!("BLE {}", addresses.join(", ")));
        }
        if !self.nodes.simulated.is_empty() {
            let names: Vec<&str> = self.nodes.simulated.iter().map(|s| s.id.as_str()).collect();
            nodes.push(format!("simulated {}", names.join(", ")));
        }
        let nodes = if nodes.is_empty() {
            String::new()
        } else {
            format!("; nodes: {}", nodes.join("; "))
        };
        format!(
            "gateway `{}`, data in {}; broker listeners: {}; anonymous clients {}{passwords}{acl}{nodes}{uplinks}{plugins}{pipelines}; metrics on http://{}/metrics",
            self.gateway.id,
            self.gateway.data_dir.display(),
            listeners.join(", "),
            if auth.allow_anonymous {
                "allowed"
            } else {
                "refused"
            },
            self.metrics.bind,
        )
    }
}

/// Deserializes one top-level section into `slot`, leaving the default when it is absent.
fn section<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
    name: &'static str,
    slot: &mut T,
    errors: &mut Vec<ConfigError>,
) {
    match locate::deserialize_section::<T>(text, name) {
        Ok(Some(value)) => *slot = value,
        Ok(None) => {}
        Err(error) => errors.push(from_yaml_error(file, text, &error)),
    }
}

fn from_yaml_error(file: &str, text: &str, error: &serde_norway::Error) -> ConfigError {
    let location = error.location();
    let mut message = error.to_string();
    // serde_norway appends " at line L column C"; the position is printed in front instead.
    if let Some(at) = message.find(" at line ") {
        message.truncate(at);
    }
    ConfigError {
        file: file.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message: with_hint(improve_message(&message), text, location.as_ref()),
    }
}

/// What serde's name of an integer type (`u16`) means in a config file, for `message`.
/// Only the type's own limit is named: a key's validation may allow less (`qos`: 0 to 2).
fn number_expected(rust_type: &str, message: &str) -> Option<String> {
    let max = match rust_type {
        "u8" => u64::from(u8::MAX),
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        "u64" => u64::MAX,
        "usize" => u64::try_from(usize::MAX).unwrap_or(u64::MAX),
        "f32" | "f64" => return Some("a number".to_string()),
        _ => return None,
    };
    Some(if message.starts_with("invalid type: integer `-") {
        "a whole number, not negative".to_string()
    } else if message.starts_with("invalid value: integer") {
        format!("a whole number no larger than {max}")
    } else {
        "a whole number".to_string()
    })
}

/// Adds what to do to the YAML parser's messages that name only what it met, and to a
/// socket address Rust could not parse.
fn with_hint(message: String, text: &str, at: Option<&serde_norway::Location>) -> String {
    let character = at.and_then(|at| {
        text.lines()
            .nth(at.line().checked_sub(1)?)?
            .chars()
            .nth(at.column().checked_sub(1)?)
    });
    let hint = if character == Some('\t') {
        "it is a tab, and YAML indents with spaces only"
    } else if message.ends_with("did not find expected key") {
        "check this line's indentation (the keys of one mapping start in the same column)"
    } else if message.ends_with("mapping values are not allowed in this context") {
        "check this line's indentation, or quote a value that contains `: `"
    } else if let Some((_, rust_type)) = message.rsplit_once(", expected ") {
        // serde names the Rust type (`expected u32`); say what that means. (The message
        // is `key.path: invalid type: ...`; the first `invalid ` is serde's.)
        let Some(expected) = message
            .find("invalid ")
            .and_then(|at| number_expected(rust_type, &message[at..]))
        else {
            return message;
        };
        let message = &message[..message.len() - rust_type.len()];
        return format!("{message}{expected}");
    } else if message.ends_with("invalid socket address syntax") {
        "write an IP address and a port, such as `0.0.0.0:1883` or `[::]:1883` (not a host name)"
    } else {
        return message;
    };
    format!("{message}; {hint}")
}

/// Rewrites serde's `unknown field` message into one that suggests the nearest valid key.
fn improve_message(message: &str) -> String {
    let Some(rest) = message
        .find("unknown field `")
        .map(|i| &message[i + "unknown field `".len()..])
    else {
        return message.to_string();
    };
    let (prefix, _) = message.split_at(message.find("unknown field `").unwrap_or(0));
    let Some(end) = rest.find('`') else {
        return message.to_string();
    };
    let field = &rest[..end];
    let known: Vec<&str> = rest[end..].split('`').skip(2).step_by(2).collect();
    let place = prefix.trim_end_matches(": ").trim();
    let place = if place.is_empty() { "here" } else { place };
    unknown_key_message(field, &known, place)
}

fn unknown_key_message(key: &str, known: &[&str], place: &str) -> String {
    let mut message = match place {
        "the top level" => format!("unknown key `{key}` at the top level"),
        "here" => format!("unknown key `{key}` here"),
        _ => format!("unknown key `{key}` in {place}"),
    };
    // Most often a key indented one level too little or too much: said first, since a
    // near spelling of a short key (`qos`, `tls`) is as likely a coincidence.
    let elsewhere = sections_with_key(key, place, &schema::key_paths());
    if !elsewhere.is_empty() {
        message.push_str(&format!(
            "; `{key}` is a key of {} (check its indentation)",
            and_list(&elsewhere)
        ));
    }
    match nearest(key, known) {
        Some(best) if elsewhere.is_empty() => {
            message.push_str(&format!("; did you mean `{best}`?"))
        }
        Some(best) => message.push_str(&format!(", or did you mean `{best}`?")),
        None if !elsewhere.is_empty() || !known.is_empty() => message.push('.'),
        None => {}
    }
    if !known.is_empty() {
        message.push_str(&format!(" Valid keys: {}", known.join(", ")));
    }
    message
}

/// The sections (`broker.auth`, `the top level`) among `paths` that have `key`, other than
/// `place` (`uplinks[0].tls`), the nearest to it first, at most three. (A place inside a
/// map, `x.name`, is not matched to its path `x.*`; no map in the config has mappings as
/// values.)
fn sections_with_key(key: &str, place: &str, paths: &[String]) -> Vec<String> {
    // `uplinks[0].tls` as the paths have it: `uplinks[].tls`.
    let mut here = String::with_capacity(place.len());
    let mut in_index = false;
    for c in place.chars() {
        match c {
            '[' => in_index = true,
            ']' => {
                in_index = false;
                here.push_str("[]");
            }
            _ if in_index => {}
            _ => here.push(c),
        }
    }
    let mut sections: Vec<String> = Vec::new();
    for path in paths {
        let section = match path.rsplit_once('.') {
            Some((section, last)) if last == key => section,
            None if path == key => "the top level",
            _ => continue,
        };
        if section != here && !sections.iter().any(|s| s == section) {
            sections.push(section.to_string());
        }
    }
    // Nearest first: those sharing the longest start with the place (a sibling section).
    sections.sort_by_key(|section| {
        std::cmp::Reverse(
            section
                .bytes()
                .zip(here.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    sections.truncate(3);
    sections
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The known key closest to `key` by edit distance, when it is close enough to be a typo.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// [`substitute_env`] on each line's content, leaving `#` comments untouched (the example
/// config documents the syntax in comments).
fn substitute_env_outside_comments(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let cut = comment_start(line).unwrap_or(line.len());
        let (content, comment) = line.split_at(cut);
        let replaced = substitute_env(content, &lookup)
            .map_err(|(_, column, message)| (index + 1, column, message))?;
        out.push_str(&replaced);
        out.push_str(comment);
    }
    Ok(out)
}

/// Byte offset of a YAML comment in one line: a `#` at the start or after whitespace,
/// outside quotes.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return Some(i),
            _ => {}
        }
        previous = c;
    }
    None
}

/// Replaces `${NAME}` with the variable's value and `${NAME:-fallback}` with the value or the
/// fallback; `$${` writes a literal `${`. Errors carry (line, column, message).
fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let position = |offset: usize| {
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    };
    while let Some(i) = rest.find("${") {
        let offset = text.len() - rest.len() + i;
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            let (l, c) = position(offset);
            return Err((l, c, "unterminated `${`: write `${NAME}`".into()));
        };
        let inner = &after[..end];
        let (name, fallback) = match inner.split_once(":-") {
            Some((name, fallback)) => (name, Some(fallback)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            let (l, c) = position(offset);
            return Err((l, c, format!("invalid variable name in `${{{inner}}}`")));
        }
        match (lookup(name), fallback) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(fallback)) => out.push_str(fallback),
            (None, None) => {
                let (l, c) = position(offset);
                return Err((
                    l,
                    c,
                    format!(
                        "environment variable `{name}` is not set; set it or write `${{{name}:-default}}`"
                    ),
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
