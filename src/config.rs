//! The effective configuration: defaults, then the TOML file, then `SLUICE_…`
//! environment variables, then command-line flags, each overriding the last.
//!
//! Environment variables name a key by its path in upper case, sections
//! joined with a double underscore: `SLUICE_GRPC_LISTEN`,
//! `SLUICE_INGEST__BATCH_ROWS`. `DATABASE_URL` is honoured as well, as
//! every PostgreSQL tool does.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sluice_broker::BrokerConfig;
use sluice_ingest::WriterConfig;
use sluice_rules::{Limits, PoolConfig, SuspendPolicy};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the managed PostgreSQL keeps its data (when no database URL is set).
    pub data_dir: PathBuf,
    /// An existing PostgreSQL to use instead of the managed one.
    pub database_url: Option<String>,
    /// gRPC query API.
    pub grpc_listen: SocketAddr,
    /// Prometheus metrics at `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Connections in the database pool (writer and queries).
    pub database_max_connections: u32,
    /// At shutdown, how long to wait for the database to store what the
    /// spool still holds; what is left is stored at the next start.
    pub shutdown_drain_ms: u64,
    pub broker: BrokerConfig,
    pub rules: RulesConfig,
    pub ingest: WriterConfig,
    pub api: ApiConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./.sluice"),
            database_url: None,
            grpc_listen: "0.0.0.0:50051".parse().expect("valid address"),
            metrics_listen: "127.0.0.1:9464".parse().expect("valid address"),
            database_max_connections: 8,
            shutdown_drain_ms: 30_000,
            broker: BrokerConfig::default(),
            rules: RulesConfig::default(),
            ingest: WriterConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

/// The gRPC API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Serve calls without an API token (development only; `--allow-anonymous`
    /// turns this on together with anonymous MQTT).
    pub allow_anonymous: bool,
    /// Refuse (RESOURCE_EXHAUSTED) a query that would read more rows than
    /// this, as PostgreSQL's planner estimates it.
    pub max_scan_rows: u64,
    /// Live `Subscribe` streams open at once; more are refused.
    pub max_subscribers: usize,
    /// Serve gRPC over TLS with this certificate and key (and, with
    /// `client_ca_file`, accept client certificates signed by that CA).
    pub tls: Option<sluice_broker::transport::TlsConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        // 10M rows is about ten seconds of StreamPoints (BENCHMARKS.md):
        // past that, aggregates are the better tool.
        Self {
            allow_anonymous: false,
            max_scan_rows: 10_000_000,
            max_subscribers: 1_000,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Directory of rule manifests (`NAME.toml`) and modules; watched for changes.
    pub dir: PathBuf,
    /// Run the built-in JSON telemetry decoder on `devices/+/telemetry`.
    pub builtin_telemetry: bool,
    /// Store messages no rule matches as events (false: drop them, counted).
    pub store_unmatched: bool,
    /// Messages per call into a WASM rule.
    pub batch_size: usize,
    /// Messages the pipeline takes from the spool at once (what is there, up
    /// to this). Larger reads give each rule more messages per call when
    /// many rules share the traffic.
    pub read_batch: usize,
    /// How many times rule publishes may chain before one is refused.
    pub max_hops: u8,
    /// Default limits of every WASM rule; a manifest's `[limits]` overrides them.
    pub limits: Limits,
    /// Threads that run rules; a device's messages always go to the same one.
    pub workers: usize,
    /// Guest failures of any kind in a row after which a rule is suspended (0: never).
    pub suspend_after_failures: u32,
    /// Guest timeouts in a row after which a rule is suspended (0: never).
    pub suspend_after_timeouts: u32,
    /// The engine's instance pool: its size bounds instances and rule limits.
    pub pool: PoolConfig,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./rules.d"),
            builtin_telemetry: true,
            store_unmatched: true,
            batch_size: 256,
            read_batch: 4096,
            max_hops: 8,
            limits: Limits::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            suspend_after_failures: SuspendPolicy::default().after_failures,
            suspend_after_timeouts: SuspendPolicy::default().after_timeouts,
            pool: PoolConfig::default(),
        }
    }
}

/// Values given on the command line; only those present override.
#[derive(Debug, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerFlags>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<RulesFlags>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiFlags>,
}

#[derive(Debug, Default, Serialize)]
pub struct ApiFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct BrokerFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtts_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct RulesFlags {
    pub dir: PathBuf,
}

/// The default config file, used when present and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "sluice.toml";

impl Config {
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                anyhow::ensure!(
                    path.is_file(),
                    "config file {} does not exist",
                    path.display()
                );
                figment = figment.merge(Toml::file(path));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment = figment.merge(Toml::file(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        figment = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database_url".into()),
            )
            .merge(Env::prefixed("SLUICE_").split("__"))
            .merge(Serialized::defaults(flags));
        Ok(figment.extract()?)
    }

    /// The configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        shown.database_url = shown.database_url.as_deref().map(mask_url_password);
        Ok(toml::to_string_pretty(&shown)?)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:****@host/db`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "****".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url_password("postgres://u:p@h:5/d"),
            "postgres://u:****@h:5/d"
        );
        assert_eq!(mask_url_password("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type is fixed by figment
    fn layers_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "grpc_listen = \"127.0.0.1:1\"\n[ingest]\nbatch_rows = 7\n[broker]\nmax_connections = 3\n")?;
            jail.set_env("SLUICE_INGEST__BATCH_ROWS", "9");
            jail.set_env("DATABASE_URL", "postgres://x:y@h/d");
            let flags = FlagOverrides {
                grpc_listen: Some("127.0.0.1:2".parse().unwrap()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("s.toml")), &flags).expect("loads");
            assert_eq!(c.grpc_listen.port(), 2);
            assert_eq!(c.ingest.batch_rows, 9);
            assert_eq!(c.broker.max_connections, 3);
            assert_eq!(c.database_url.as_deref(), Some("postgres://x:y@h/d"));
            assert!(c.to_masked_toml().unwrap().contains("x:****@h"));
            Ok(())
        });
    }
}
