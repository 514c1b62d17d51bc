//! The host's capabilities: the WIT imports in a WebAssembly build, stand-ins natively.

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[cfg(target_family = "wasm")]
mod imp {
    use super::Level;
    use crate::__private::bindings::edgegw::rule::host;

    pub fn log(level: Level, text: &str) {
        let level = match level {
            Level::Trace => host::Level::Trace,
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        host::log(level, text);
    }

    pub fn now_ms() -> u64 {
        host::now_ms()
    }

    pub fn kv_get(key: &str) -> Option<Vec<u8>> {
        host::kv_get(key)
    }

    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), String> {
        host::kv_set(key, value)
    }

    pub fn kv_delete(key: &str) {
        host::kv_delete(key);
    }
}

#[cfg(not(target_family = "wasm"))]
mod imp {
    use super::Level;
    use crate::kv::{MAX_BYTES, MAX_KEYS};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static FIXED_NOW: Cell<Option<u64>> = const { Cell::new(None) };
        static KV: RefCell<HashMap<String, Vec<u8>>> = RefCell::new(HashMap::new());
    }

    pub fn log(level: Level, text: &str) {
        eprintln!("[plugin {level:?}] {text}");
    }

    pub fn now_ms() -> u64 {
        FIXED_NOW.with(Cell::get).unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
    }

    pub fn set_fixed_now_ms(now: Option<u64>) {
        FIXED_NOW.with(|c| c.set(now));
    }

    pub fn kv_get(key: &str) -> Option<Vec<u8>> {
        KV.with(|kv| kv.borrow().get(key).cloned())
    }

    /// Same bounds as the gateway's store.
    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), String> {
        KV.with(|kv| {
            let mut kv = kv.borrow_mut();
            let used: usize = kv.iter().map(|(k, v)| k.len() + v.len()).sum();
            let old = kv.get(key).map_or(0, |v| key.len() + v.len());
            if !kv.contains_key(key) && kv.len() >= MAX_KEYS {
                return Err(format!("kv store full: {MAX_KEYS} keys"));
            }
            if used - old + key.len() + value.len() > MAX_BYTES {
                return Err(format!("kv store full: {MAX_BYTES} bytes"));
            }
            kv.insert(key.to_owned(), value.to_vec());
            Ok(())
        })
    }

    pub fn kv_delete(key: &str) {
        KV.with(|kv| kv.borrow_mut().remove(key));
    }

    pub fn kv_clear() {
        KV.with(|kv| kv.borrow_mut().clear());
    }
}

pub use imp::*;
