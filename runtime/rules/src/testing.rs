//! Test support: builds the plugin workspace (`plugins/`: SDK, examples, test fixtures) to
//! WebAssembly components, once per process, for unit tests here, the end-to-end tests and the
//! benchmark.
//!
//! The build is `cargo build --release --target wasm32-wasip2 --manifest-path
//! plugins/Cargo.toml --target-dir target/wasm --locked` from the repository root. Its own
//! target directory means that a build started from inside a running `cargo test` never waits
//! for the outer build's lock, and that it is incremental across runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The components of the plugin workspace, built.
#[derive(Debug)]
pub struct BuiltPlugins {
    dir: PathBuf,
}

impl BuiltPlugins {
    /// The component of crate `name` (e.g. `celsius-to-fahrenheit`, `fixture-identity`).
    /// Panics, listing what there is, when the build produced no such component.
    pub fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(
            path.is_file(),
            "no plugin {name:?} at {}; built: {:?}",
            path.display(),
            self.names()
        );
        path
    }

    /// The directory holding the `.wasm` files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every component built (file stems, `_` for `-`).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "wasm")
                    .then(|| path.file_stem()?.to_str().map(str::to_owned))?
            })
            .collect();
        names.sort();
        names
    }
}

/// The repository's root (this crate is `runtime/rules`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the plugin workspace once per process and returns where the components are.
/// Panics with cargo's output when the build fails: this is for tests and benchmarks.
pub fn build_plugins() -> &'static BuiltPlugins {
    static BUILT: OnceLock<Result<BuiltPlugins, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(built) => built,
        Err(error) => panic!("{error}"),
    }
}

/// The target directory of everything built for and from `plugins/`.
pub fn target_dir() -> PathBuf {
    repo_root().join("target/wasm")
}

/// `cargo` (the one running these tests, so the same toolchain) started in the repository's
/// root, with [`target_dir`] as its target directory.
pub fn cargo(args: &[&str]) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(repo_root())
        .args(args)
        .arg("--target-dir")
        .arg(target_dir());
    // As the gateway's build.rs does for the same build: flags and wrappers meant for the
    // host build stay out of the wasm32 one.
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
    command
}

/// Runs `command`; its stderr in the error when it fails.
pub fn run(mut command: Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn build() -> Result<BuiltPlugins, String> {
    let manifest = repo_root().join("plugins/Cargo.toml");
    let mut command = cargo(&[
        "build",
        "--release",
        "--locked",
        "--target",
        "wasm32-wasip2",
    ]);
    command.arg("--manifest-path").arg(manifest);
    run(command)?;
    Ok(BuiltPlugins {
        dir: target_dir().join("wasm32-wasip2/release"),
    })
}
