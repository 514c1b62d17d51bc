//! `edgegw plugin new NAME`: a new plugin crate that depends on the SDK by path, builds to a
//! component with `cargo build --release --target wasm32-wasip2` and passes its own
//! `cargo test`.

use std::path::{Component, Path, PathBuf};

/// Why a plugin crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("invalid plugin name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{} already exists; choose another name or directory", .0.display())]
    Exists(PathBuf),
    #[error("the plugin SDK is not at {}; pass the path of plugins/sdk in an edgegw checkout", .0.display())]
    SdkNotFound(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The SDK of the checkout this gateway was built from (`plugins/sdk`).
pub fn sdk_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/sdk");
    dir.canonicalize().unwrap_or(dir)
}

/// Creates the crate `dir/name` using the SDK of [`sdk_dir`]; returns its directory.
pub fn scaffold(name: &str, dir: &Path) -> Result<PathBuf, ScaffoldError> {
    scaffold_with_sdk(name, dir, &sdk_dir())
}

/// Creates the crate `dir/name` depending on the SDK at `sdk` (by a relative path when the
/// two share a root, so the pair can move together); returns its directory.
pub fn scaffold_with_sdk(name: &str, dir: &Path, sdk: &Path) -> Result<PathBuf, ScaffoldError> {
    check_name(name)?;
    let sdk = sdk
        .canonicalize()
        .ok()
        .filter(|p| p.join("Cargo.toml").is_file())
        .ok_or_else(|| ScaffoldError::SdkNotFound(sdk.to_owned()))?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ScaffoldError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let root = dir.canonicalize().map_err(io(dir))?.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let sdk_path = relative(&root, &sdk);
    let sdk_path = sdk_path.to_string_lossy().replace('\\', "/");
    let files = [
        ("Cargo.toml", CARGO_TOML.replace("__SDK__", &sdk_path)),
        ("src/lib.rs", LIB_RS.to_owned()),
        ("README.md", README.to_owned()),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (file, text) in files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text.replace("__NAME__", name)).map_err(io(&path))?;
    }
    // The versions the SDK and examples are tested with (cargo drops what this crate does not
    // use). Optional: without it cargo resolves afresh.
    let lock = sdk.join("../Cargo.lock");
    if lock.is_file() {
        let path = root.join("Cargo.lock");
        std::fs::copy(&lock, &path).map_err(io(&path))?;
    }
    Ok(root)
}

/// A cargo package name that is also a fine file name: `[a-z][a-z0-9-]*`, at most 64 bytes.
fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let invalid = |reason| ScaffoldError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("use 1 to 64 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid("start with a lowercase letter"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid("use only a-z, 0-9 and '-'"));
    }
    Ok(())
}

/// `to` relative to `from` (both absolute); `to` itself when they share nothing but the root.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    if common <= 1 {
        return to.to_owned();
    }
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to_parts[common..] {
        path.push(part);
    }
    path
}

const CARGO_TOML: &str = r#"[package]
name = "__NAME__"
version = "0.1.0"
edition = "2024"
publish = false
description = "An edgegw rule plugin."

# A component for the gateway: `cargo build --release --target wasm32-wasip2` writes
# target/wasm32-wasip2/release/<name with _ for ->.wasm
[lib]
crate-type = ["cdylib"]

[dependencies]
edgegw-plugin-sdk = { path = "__SDK__" }
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"

# Its own workspace, also when created inside another project's tree.
[workspace]
"#;

const LIB_RS: &str = r##"//! __NAME__: an edgegw rule plugin.
//!
//! Adds `"label": <config.label>` to each JSON object payload and forwards it; other payloads
//! are an error (the message goes to the pipeline's dead-letter topic). Change at will: the
//! gateway calls `init` once per pipeline stage with the stage's `config:` (as JSON), then
//! `on_message` for every message, reusing the same instance.

use edgegw_plugin_sdk::serde_json::{Value, json};
use edgegw_plugin_sdk::{Error, Message, Output};
use std::cell::RefCell;

thread_local! {
    static LABEL: RefCell<String> = RefCell::new(String::new());
}

/// Config: `{"label": "..."}`; without config the label is the plugin's name.
#[edgegw_plugin_sdk::init]
fn init(config: Value) -> Result<(), String> {
    let label = match config.get("label") {
        Some(Value::String(label)) => label.clone(),
        Some(other) => return Err(format!("label must be a string, got {other}")),
        None => "__NAME__".to_owned(),
    };
    LABEL.with(|l| *l.borrow_mut() = label);
    Ok(())
}

/// One message in, the messages to emit out (an empty Vec drops the message).
#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    let mut value: Value = msg.json()?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| Error::new("payload is not a JSON object"))?;
    let label = LABEL.with(|l| l.borrow().clone());
    object.insert("label".to_owned(), json!(label));
    Ok(vec![Output::json(&value)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_json_objects() {
        init(json!({"label": "kitchen"})).unwrap();
        let out = on_message(Message::new("sensors/a/temp", r#"{"temp": 21.5}"#)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, None);
        assert_eq!(out[0].json_value().unwrap(), json!({"temp": 21.5, "label": "kitchen"}));
    }

    #[test]
    fn other_payloads_are_errors_naming_the_topic() {
        init(Value::Null).unwrap();
        let e = on_message(Message::new("sensors/a/temp", "21.5")).unwrap_err();
        assert_eq!(e.topic(), Some("sensors/a/temp"));
    }
}
"##;

const README: &str = r##"# __NAME__

An edgegw rule plugin (see `src/lib.rs`).

- Test the logic: `cargo test`
- Build the component: `rustup target add wasm32-wasip2` once, then
  `cargo build --release --target wasm32-wasip2`; it is
  `target/wasm32-wasip2/release/<name with _ for ->.wasm`.
- Try it: `edgegw plugin test target/wasm32-wasip2/release/<name>.wasm --config '{"label":"x"}' --topic sensors/a/temp --payload '{"temp":21.5}'`
- Use it: list it under `plugins:` in the gateway's YAML and name it in a pipeline's `rules:`.
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(Path::new("/a/b/c/new"), Path::new("/a/b/plugins/sdk")),
            Path::new("../../plugins/sdk")
        );
        assert_eq!(
            relative(Path::new("/x/new"), Path::new("/a/sdk")),
            Path::new("/a/sdk")
        );
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "Rule", "1rule", "my_rule", "a/b", "ünï"] {
            assert!(
                matches!(check_name(bad), Err(ScaffoldError::InvalidName { .. })),
                "{bad}"
            );
        }
        assert!(check_name("my-rule2").is_ok());
    }
}
