//! Builds the example rule plugins (`plugins/examples`) for `wasm32-wasip2` so the binary
//! carries them as built-in plugins (`path: builtin:NAME` in the config; the embedded demo
//! config uses one). The build is the same command the tests use
//! (`cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//! --target-dir target/wasm`), so it is done once for both and incremental afterwards.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The example plugins built in, by crate name (the config's `builtin:NAME`). Keep in step
/// with `edgegw_config::BUILTIN_PLUGINS` (a test checks).
const BUILTIN: &[&str] = &[
    "celsius-to-fahrenheit",
    "threshold-alert",
    "deadband",
    "enrich",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir.join("../..");
    let plugins = root.join("plugins");
    for watched in [
        "Cargo.toml",
        "Cargo.lock",
        "sdk",
        "sdk-macros",
        "wit",
        "examples",
    ] {
        println!(
            "cargo::rerun-if-changed={}",
            plugins.join(watched).display()
        );
    }
    let target_dir = root.join("target/wasm");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // What cargo set for this build script is not for the plugin build: flags for the
    // gateway's target, clippy's wrapper, another target directory. The same variables are
    // removed in edgegw_rules::testing::cargo, so the two builds share target/wasm.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the built-in plugins: {e}"));
    if !output.status.success() {
        panic!(
            "building the built-in rule plugins (plugins/examples) for wasm32-wasip2 failed; \
             `rustup target add wasm32-wasip2` if the target is missing (rust-toolchain.toml \
             lists it):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join("wasm32-wasip2/release");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let mut table = String::from(
        "/// Built-in plugins: (name, component).\npub const BUILTIN: &[(&str, &[u8])] = &[\n",
    );
    for name in BUILTIN {
        let file = format!("{}.wasm", name.replace('-', "_"));
        copy(&built.join(&file), &out.join(&file));
        table.push_str(&format!(
            "    ({name:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{file}\"))),\n"
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("builtin_plugins.rs"), table).expect("write builtin_plugins.rs");
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| {
        panic!(
            "cannot copy the built plugin {} to {}: {e}",
            from.display(),
            to.display()
        )
    });
}
