//! Per-message cost of one rule stage (the identity fixture, a 100-byte payload, one stage
//! reused for every call, as a pipeline does), and the time to load plugins with and without
//! the compiled-code cache.
//!
//! `cargo run --release -p edgegw-rules --example per_call [-- CALLS]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let calls = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let plugins = edgegw_rules::testing::build_plugins();
    let cache = std::env::temp_dir().join(format!("edgegw-rules-bench-{}", std::process::id()));
    for name in ["fixture-identity", "celsius-to-fahrenheit"] {
        match edgegw_rules::bench::load_times(&plugins.path(name), &cache) {
            Ok(t) => println!(
                "{name}: load {:.1} ms compiling, {:.1} ms from the cache",
                t.compile.as_secs_f64() * 1e3,
                t.cached.as_secs_f64() * 1e3
            ),
            Err(e) => {
                eprintln!("load failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let wasm = plugins.path("fixture-identity");
    for batch in [1, edgegw_rules::MAX_BATCH] {
        match edgegw_rules::bench::per_call(&wasm, 100, calls, batch) {
            Ok(result) => println!(
                "identity stage, 100-byte payload, {batch} per call: {} messages in {:.3} s, \
                 {:.3} µs per message",
                result.calls,
                result.total.as_secs_f64(),
                result.mean().as_secs_f64() * 1e6
            ),
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
