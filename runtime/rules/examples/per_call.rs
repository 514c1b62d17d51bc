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
    match edgegw_rules::bench::per_call(&plugins.path("fixture-identity"), 100, calls) {
        Ok(result) => {
            println!(
                "identity stage, 100-byte payload: {} calls in {:.3} s, {:.3} µs per call",
                result.calls,
                result.total.as_secs_f64(),
                result.mean().as_secs_f64() * 1e6
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
