//! `sluice`: the binary that wires the broker, the rules, storage and the
//! gRPC API together. See ARCHITECTURE.md for the data path.

mod api;
mod config;
mod database;
mod devices_cmd;
mod pipeline;
mod serve;

use clap::{Args, Parser, Subcommand};
use config::{BrokerFlags, Config, FlagOverrides, RulesFlags};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "IoT telemetry ingestion: MQTT in, WebAssembly rules, PostgreSQL out, gRPC query"
)]
struct Cli {
    /// Configuration file (TOML). Default: ./sluice.toml when it exists.
    #[arg(long, global = true, env = "SLUICE_CONFIG")]
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
            broker: self
                .mqtt_listen
                .map(|mqtt_listen| BrokerFlags { mqtt_listen }),
            rules: self.rules_dir.map(|dir| RulesFlags { dir }),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref(), &cli.flags.overrides())?;
    match cli.command {
        Command::Config(ConfigCommand::Print) => {
            print!("{}", config.to_masked_toml()?);
            Ok(())
        }
        Command::Serve => runtime()?.block_on(serve::serve(config)),
        Command::Devices(command) => runtime()?.block_on(devices_cmd::run(&config, command)),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        .build()
}
