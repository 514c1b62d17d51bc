//! On-disk cache of compiled plugins, so a gateway (a Raspberry Pi, say) starts without
//! compiling every plugin again.
//!
//! An entry is `<plugin name>.<key>.cwasm` where the key is a BLAKE2b-256 of the wasm bytes and
//! of the engine's compatibility hash (wasmtime version, target, compiler settings): a new
//! plugin file or a new gateway build misses the cache by itself. The file is the 32-byte
//! BLAKE2b-256 of the artifact followed by the artifact (`Component::serialize`), written to a
//! temporary file and renamed, so a torn write (power loss) is never loaded: it fails the
//! checksum and is compiled again. Older entries of the same plugin name are removed when a
//! new one is written.
//!
//! Trust: loading an entry maps native code into the process. The cache directory must be as
//! protected as the gateway binary (it lives in the gateway's data directory).

use blake2::{Blake2b256, Digest as _};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime::component::Component;

const FORMAT: &[u8] = b"edgegw-rules cache 1\0";

/// The entry's path for `wasm` compiled by `engine`.
pub(crate) fn entry_path(
    dir: &Path,
    name: &str,
    engine: &wasmtime::Engine,
    wasm: &[u8],
) -> PathBuf {
    let mut hasher = Blake2b256::new();
    hasher.update(FORMAT);
    engine
        .precompile_compatibility_hash()
        .hash(&mut DigestHasher(&mut hasher));
    hasher.update((wasm.len() as u64).to_le_bytes());
    hasher.update(wasm);
    let key = hex(hasher.finalize().as_slice());
    dir.join(format!("{}.{key}.cwasm", file_name(name)))
}

/// The compiled component in `path`, if there is a good entry. A missing entry is `Ok(None)`;
/// a damaged or incompatible one is an error (the caller compiles and overwrites it).
pub(crate) fn load(engine: &wasmtime::Engine, path: &Path) -> Result<Option<Component>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let Some((sum, artifact)) = bytes.split_first_chunk::<32>() else {
        return Err(format!("{} is truncated", path.display()));
    };
    if Blake2b256::digest(artifact).as_slice() != sum {
        return Err(format!("{} fails its checksum", path.display()));
    }
    // SAFETY: `deserialize` trusts its input to be an artifact wasmtime produced, since it maps
    // the native code in it. These bytes are exactly what `store` wrote (`Component::serialize`
    // of a component this process validated and compiled): the checksum above rules out torn
    // or damaged files, and the directory is the gateway's own (see the module docs). wasmtime
    // also refuses artifacts from another version or configuration.
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize(engine, artifact) }
        .map_err(|e| format!("{} is not usable: {e}", path.display()))?;
    Ok(Some(component))
}

/// Writes the entry (temporary file, then rename) and removes older entries of `name`.
pub(crate) fn store(path: &Path, name: &str, component: &Component) -> Result<(), String> {
    let artifact = component
        .serialize()
        .map_err(|e| format!("cannot serialize: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut bytes = Vec::with_capacity(32 + artifact.len());
    bytes.extend_from_slice(Blake2b256::digest(&artifact).as_slice());
    bytes.extend_from_slice(&artifact);
    // Unique per process and per call: concurrent loads of one plugin never share a file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })?;
    remove_stale(dir, name, path);
    Ok(())
}

/// Removes the other entries of plugin `name` (best effort).
fn remove_stale(dir: &Path, name: &str, keep: &Path) {
    let prefix = format!("{}.", file_name(name));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if path != keep && file.starts_with(&prefix) && file.ends_with(".cwasm") {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The plugin name as a file name part: no dots (the separator), nothing but `[A-Za-z0-9_-]`.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Feeds a `Hash` value into the digest.
struct DigestHasher<'a>(&'a mut Blake2b256);

impl Hasher for DigestHasher<'_> {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}
