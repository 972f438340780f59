//! `sluice`: the binary that wires the broker, the rules, storage and the
//! gRPC API together. See ARCHITECTURE.md for the data path.

mod api;
mod config;
mod database;
mod devices_cmd;
mod pipeline;
mod registry;
mod rules_admin;
mod rules_cmd;
mod rules_new;
mod serve;
mod storage_cmd;
mod tokens_cmd;

use clap::{Args, Parser, Subcommand};
use config::{ApiFlags, BrokerFlags, Config, FlagOverrides, RulesFlags};
use std::net::SocketAddr;
use std::path::PathBuf;

// mimalloc rather than glibc's malloc: the hot path allocates and frees small
// buffers on many threads (edge connections, the pipeline, rule workers, the
// writer). In a profile of the end-to-end benchmark, glibc's malloc and free
// in Sluice's threads took about a tenth of the machine's CPU, a fifth of
// the process's (BENCHMARKS.md, "Storage").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "IoT telemetry ingestion: MQTT in, WebAssembly rules, PostgreSQL out, gRPC query"
)]
struct Cli {
    /// Configuration file (TOML), given before the command
    /// (`sluice --config FILE serve`). Default: ./sluice.toml when it exists.
    /// Not global, so `rules test --config JSON` can mean the rule's config.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Command,
}

/// Flags that override the configuration file and the environment.
#[derive(Args)]
struct Flags {
    /// MQTT 3.1.1 listener [default: 0.0.0.0:1883]
    #[arg(long, global = true)]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS listener, started when broker.tls is configured [default: 0.0.0.0:8883]
    #[arg(long, global = true)]
    mqtts_listen: Option<SocketAddr>,
    /// MQTT over WebSocket listener, path /mqtt [default: 0.0.0.0:8083]
    #[arg(long, global = true)]
    ws_listen: Option<SocketAddr>,
    /// Let MQTT clients in without credentials and gRPC calls without an API
    /// token (development only)
    #[arg(long, global = true)]
    allow_anonymous: bool,
    /// gRPC API listener [default: 0.0.0.0:50051]
    #[arg(long, global = true)]
    grpc_listen: Option<SocketAddr>,
    /// Prometheus /metrics listener [default: 127.0.0.1:9464]
    #[arg(long, global = true)]
    metrics_listen: Option<SocketAddr>,
    /// Rules directory, watched for changes [default: ./rules.d]
    #[arg(long = "rules", global = true)]
    rules_dir: Option<PathBuf>,
    /// PostgreSQL to use; without it Sluice runs its own under --data-dir
    /// (also read from DATABASE_URL)
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Data directory of the managed PostgreSQL [default: ./.sluice]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: broker, rules, storage and API.
    Serve,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the device registry (uses the database exactly as `serve` does).
    #[command(subcommand)]
    Devices(devices_cmd::DevicesCommand),
    /// Work with rule modules (test one locally on sample messages).
    #[command(subcommand)]
    Rules(rules_cmd::RulesCommand),
    /// Storage: what the tables hold and cost; partition upkeep on demand.
    #[command(subcommand)]
    Storage(storage_cmd::StorageCommand),
    /// API tokens of the gRPC API (uses the database exactly as `serve` does).
    #[command(subcommand)]
    Tokens(tokens_cmd::TokensCommand),
    /// Generate a secret for an application client and print it with its
    /// Argon2id hash, for `broker.applications.NAME.secret_hash`.
    SecretHash,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets masked).
    Print,
}

impl Flags {
    fn overrides(self) -> FlagOverrides {
        FlagOverrides {
            data_dir: self.data_dir,
            database_url: self.database_url,
            grpc_listen: self.grpc_listen,
            metrics_listen: self.metrics_listen,
            broker: Some(BrokerFlags {
                mqtt_listen: self.mqtt_listen,
                mqtts_listen: self.mqtts_listen,
                ws_listen: self.ws_listen,
                allow_anonymous: self.allow_anonymous.then_some(true),
            }),
            rules: self.rules_dir.map(|dir| RulesFlags { dir }),
            api: self.allow_anonymous.then_some(ApiFlags {
                allow_anonymous: Some(true),
            }),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,rumqttd=warn`).
///
/// rumqttd opens an ERROR-level span for every message it routes, with the
/// topic as a field; a formatting subscriber renders those fields on every
/// span, which cost the router thread a fifth of its time. Its spans add
/// nothing Sluice's own spans do not, so they are dropped; its events
/// still come through.
fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let no_router_spans = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    });
    // One combined filter, not two stacked `with_filter`s: stacked, the
    // outer filter admits every span the inner one rejects, so each debug
    // span was still created and entered on every poll (a sixth of the API
    // server's CPU time for a large LatestPoints). Combined, the EnvFilter's
    // verdict on a callsite is final and a disabled span costs nothing.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a terminal: in a log file or a journal
                // the escape codes are noise that breaks grep.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(env.and(no_router_spans)),
        )
        .init();
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(cli.config.as_deref(), &cli.flags.overrides())?;
    let success = |done: anyhow::Result<()>| done.map(|()| std::process::ExitCode::SUCCESS);
    match cli.command {
        Command::Config(ConfigCommand::Print) => {
            print!("{}", config.to_masked_toml()?);
            success(Ok(()))
        }
        Command::Serve => {
            let rt = runtime()?;
            let result = rt.block_on(serve::serve(config));
            // A pipeline thread still blocked on a database that went away
            // must not hold the exit (its messages are safe in the spool).
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            success(result)
        }
        Command::Devices(command) => {
            success(runtime()?.block_on(devices_cmd::run(&config, command)))
        }
        Command::Rules(command) => rules_cmd::run(command, &config.rules.limits),
        Command::Storage(command) => {
            success(runtime()?.block_on(storage_cmd::run(&config, command)))
        }
        Command::Tokens(command) => success(runtime()?.block_on(tokens_cmd::run(&config, command))),
        Command::SecretHash => {
            let secret = sluice_ingest::devices::generate_secret();
            let hash = sluice_ingest::devices::hash_secret(&secret)?;
            eprintln!(
                "secret (shown once; give it to the application), then its hash for the config:"
            );
            println!("{secret}");
            println!("{hash}");
            success(Ok(()))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        .build()
}
