//! `edgegw`: the gateway binary. Parses the command line, loads the config, sets up
//! tracing, starts the parts and waits for a signal. Everything else lives in libraries.

mod auth;
mod control;
mod pipelines;
mod run;
mod simulated;
mod systemd;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc, so that memory given back goes back to the system:
/// an idle connection that hibernates (`broker.limits.hibernate_after`) frees about 7 KiB,
/// which glibc's heaps kept (resident memory did not drop at all with 10,000 hibernating
/// connections: their freed blocks lay between the sessions still in use), and a burst of
/// messages leaves less behind. Its background thread returns unused pages while the
/// gateway idles (`main`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration the user must fix (sysexits EX_USAGE... EX_CONFIG is 78,
/// but 64 is what service managers and our docs promise).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "edgegw",
    version,
    about = "Edge gateway runtime: an MQTT 3.1.1/5.0 broker for local clients and sensor nodes.",
    long_about = "Edge gateway runtime: an MQTT 3.1.1/5.0 broker for local clients and sensor nodes.\n\n\
                  Start it with `edgegw run` (embedded default config: broker on 127.0.0.1:1883, \
                  metrics on http://127.0.0.1:9100/metrics, state in ./edgegw-data) or \
                  `edgegw run -c gateway.yaml`. Check a config with `edgegw check -c gateway.yaml`. \
                  Manage broker users with `edgegw passwd FILE USER`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    ///
    /// Without -c the embedded default is used: broker on 127.0.0.1:1883 (MQTT 3.1.1 and 5.0),
    /// metrics and health on http://127.0.0.1:9100, state under ./edgegw-data.
    /// The log says what listens where. Exit codes: 0 after a clean shutdown, 64 for a bad
    /// config, 1 for any other failure (e.g. a port already in use).
    Run {
        /// Config file (YAML); see configs/gateway.yaml for every key.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit.
    ///
    /// Prints `ok` and a summary, or every problem found as FILE:LINE:COLUMN: what is wrong
    /// and how to fix it (unknown keys come with the nearest valid key). Exit code 0 when
    /// valid, 64 when not.
    Check {
        /// Config file (YAML) to check.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Add a broker user to a password file, or change its password.
    ///
    /// Stores an argon2id hash (PHC string) as a `USER:$argon2id$...` line; other lines are
    /// kept. FILE is created with mode 0600 if missing and replaced atomically. The password
    /// is read from standard input when it is not a terminal (the first line, e.g.
    /// `printf '%s\n' "$PW" | edgegw passwd users.txt alice`), otherwise prompted for twice
    /// without echo. Point broker.auth.password_file at FILE; the gateway reads it at start.
    /// Exit code 0 on success, 1 on failure (nothing is changed then).
    Passwd {
        /// Password file to create or update.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// User name, as clients send it in CONNECT (no `:`).
        #[arg(value_name = "USER")]
        user: String,
    },
    /// Ask the running gateway to reload its config, and say how it went.
    ///
    /// The same reload as SIGHUP (pipelines and plugins, uplinks, broker users and ACLs, the
    /// log level; what needs a restart is named), through the gateway's control socket
    /// `<gateway.data_dir>/control.sock`, so the outcome comes back here: exit code 0 and a
    /// summary when it was applied, 64 and every problem (FILE:LINE:COLUMN) when the config
    /// was refused and everything keeps running as it was, 1 when no gateway answers.
    Reload {
        /// The config file the gateway runs on (its gateway.data_dir locates the socket).
        /// Default: the embedded default config's data directory.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The control socket, instead of finding it through the config.
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        socket: Option<PathBuf>,
    },
    /// Rule plugins: try one on a message, or start a new one.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the JSON Schema of the config file (also shipped as
    /// configs/gateway.schema.json), for editors that validate and complete YAML.
    Schema,
    /// Print the embedded default config (the demo `edgegw run` runs without -c).
    DefaultConfig,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run one message through a plugin and print each output as `TOPIC PAYLOAD`, one per
    /// line, or the error. Exit code 0 when the plugin accepted the message, 1 when not.
    Test {
        /// The plugin: a WebAssembly component (`.wasm`) of the edgegw:rule world.
        #[arg(value_name = "PLUGIN.wasm")]
        plugin: PathBuf,
        /// The stage's config as JSON (what `config:` in a pipeline stage becomes).
        #[arg(long, value_name = "JSON", default_value = "null")]
        config: String,
        /// Topic of the test message.
        #[arg(long)]
        topic: String,
        /// Payload of the test message (text).
        #[arg(long)]
        payload: String,
    },
    /// Create a plugin crate NAME (in the current directory, or --dir) from the SDK: it
    /// builds with `cargo build --release --target wasm32-wasip2` and passes `cargo test`.
    New {
        /// Crate name: lowercase letters, digits and `-`.
        #[arg(value_name = "NAME")]
        name: String,
        /// Where to create it.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// The SDK to depend on (plugins/sdk of an edgegw checkout); default: the checkout
        /// this binary was built from.
        #[arg(long, value_name = "DIR")]
        sdk: Option<PathBuf>,
    },
}

/// Loads the password file of a valid config; prints its problems when it is bad.
/// `edgegw reload`.
fn reload(config: Option<PathBuf>, socket: Option<PathBuf>) -> ExitCode {
    let socket = match socket {
        Some(socket) => socket,
        None => {
            // Only the data directory is needed; a config with errors elsewhere still names
            // it, but its errors are the answer anyway.
            let loaded = match &config {
                None => edgegw_config::Config::embedded_default(),
                Some(path) => edgegw_config::Config::load(path),
            };
            match loaded {
                Ok(loaded) => control::socket_path(&loaded.gateway.data_dir),
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!(
                        "edgegw: not reloaded; fix the config (the running gateway would refuse it too)"
                    );
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            }
        }
    };
    // Compiling new plugins can take a while on a Pi.
    match control::request_reload(&socket, std::time::Duration::from_secs(300)) {
        Ok(Ok(summary)) => {
            println!("ok: {summary}");
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("edgegw: {error}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(error) => {
            eprintln!("edgegw: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the config asks for that this build cannot do, printed; `false` then.
fn supported_by_this_build(config: &edgegw_config::Config) -> bool {
    if !config.nodes.ble.is_empty() && !edgegw_nodes::BLE_SUPPORTED {
        eprintln!(
            "nodes.ble lists {} node(s), but this edgegw was built without BLE support: build it with `cargo build --release -p edgegw --features ble` (needs libdbus-1-dev), or remove nodes.ble",
            config.nodes.ble.len()
        );
        return false;
    }
    true
}

fn load_auth(config: &edgegw_config::Config) -> Option<edgegw_broker::AuthSettings> {
    match auth::broker_auth(config) {
        Ok(settings) => Some(settings),
        Err(error) => {
            eprintln!("{error}");
            let count = auth::problem_count(&error);
            let file = config
                .broker
                .auth
                .password_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            eprintln!(
                "{count} problem{} found in {file} (broker.auth.password_file)",
                if count == 1 { "" } else { "s" },
            );
            None
        }
    }
}

/// How long jemalloc keeps freed pages before giving them back (its default is 10 s):
/// after a burst (10,000 connections opening at once, then hibernating) resident memory
/// took about 20 s to settle with the default, 2 s with this. The purging is done by the
/// background thread, off the workers.
const DIRTY_DECAY_MS: isize = 1000;

/// Sets jemalloc's decay time for freed pages, for the arenas that exist and those to come,
/// unless the operator chose one (`_RJEM_MALLOC_CONF=dirty_decay_ms:…`).
fn return_freed_memory_within(ms: isize) {
    use tikv_jemalloc_ctl::{Access, AsName};
    if std::env::var("_RJEM_MALLOC_CONF").is_ok_and(|conf| conf.contains("dirty_decay_ms")) {
        return;
    }
    let _ = b"arenas.dirty_decay_ms\0".name().write(ms);
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    for arena in 0..arenas {
        // Arenas not created yet refuse it; they start with the value above.
        let _ = format!("arena.{arena}.dirty_decay_ms\0").name().write(ms);
    }
}

fn main() -> ExitCode {
    // Without it jemalloc returns freed pages only while the thread that freed them keeps
    // allocating: an idle worker would keep them.
    // One such thread is enough for a gateway.
    let _ = tikv_jemalloc_ctl::max_background_threads::write(1);
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    return_freed_memory_within(DIRTY_DECAY_MS);
    let cli = Cli::parse();
    match cli.command {
        Command::Plugin(PluginCommand::Test {
            plugin,
            config,
            topic,
            payload,
        }) => match pipelines::plugin_test(&plugin, &config, &topic, &payload) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("edgegw: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => {
            let created = match &sdk {
                Some(sdk) => edgegw_rules::scaffold_with_sdk(&name, &dir, sdk),
                None => edgegw_rules::scaffold(&name, &dir),
            };
            match created {
                Ok(root) => {
                    let wasm = name.replace('-', "_");
                    println!("created {}", root.display());
                    println!("next:");
                    println!("  cd {} && cargo test", root.display());
                    println!("  cargo build --release --target wasm32-wasip2");
                    println!(
                        "  edgegw plugin test target/wasm32-wasip2/release/{wasm}.wasm --topic sensors/a/temp --payload '{{\"temp\": 21.5}}'"
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("edgegw: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Schema => {
            print!("{}", edgegw_config::json_schema());
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => {
            print!("{}", edgegw_config::EMBEDDED_DEFAULT);
            ExitCode::SUCCESS
        }
        Command::Passwd { file, user } => match auth::passwd(&file, &user) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("edgegw: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { config, socket } => reload(config, socket),
        Command::Check { config } => match edgegw_config::Config::load(&config) {
            Ok(loaded) => {
                if !supported_by_this_build(&loaded) || load_auth(&loaded).is_none() {
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
                println!("ok: {}", loaded.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "{} problem{} found in {}",
                    errors.0.len(),
                    if errors.0.len() == 1 { "" } else { "s" },
                    config.display()
                );
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config } => {
            let loaded = match &config {
                None => match edgegw_config::Config::embedded_default() {
                    Ok(loaded) => loaded,
                    Err(errors) => {
                        eprintln!("{errors}");
                        return ExitCode::FAILURE;
                    }
                },
                Some(path) => match edgegw_config::Config::load(path) {
                    Ok(loaded) => loaded,
                    Err(errors) => {
                        eprintln!("{errors}");
                        eprintln!("edgegw: not started; fix the config and try again");
                        return ExitCode::from(EXIT_BAD_CONFIG);
                    }
                },
            };
            if !supported_by_this_build(&loaded) {
                eprintln!("edgegw: not started; fix the config and try again");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            let Some(auth) = load_auth(&loaded) else {
                eprintln!("edgegw: not started; fix the password file and try again");
                return ExitCode::from(EXIT_BAD_CONFIG);
            };
            let log = run::init_tracing(&loaded.log);
            match run::run(loaded, auth, config, log) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("edgegw: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
