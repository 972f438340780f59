//! Command-line interface of `sluice-sim`.
//!
//! Parsing and validation live here so that the rest of the simulator only
//! ever sees a consistent [`Config`]: every later benchmark scripts this tool,
//! so bad flag combinations must fail loudly up front instead of producing a
//! run that silently measures the wrong thing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, CommandFactory, Parser};
use rumqttc::QoS;

use crate::credentials::{self, DeviceCredentials};
use crate::telemetry::{Profile, TelemetryGenerator};
use crate::tls::{ClientCertPaths, TlsSetup};

/// Upper bound for `--metrics`: keeps one payload well below the MQTT packet
/// size limit the devices are configured with (see [`MAX_PACKET_BYTES`]).
pub const MAX_METRICS: usize = 1000;

/// Largest MQTT packet a simulated device sends or accepts. rumqttc defaults
/// to 10 KiB, which a payload with many `--metrics` would exceed.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Devices when neither `--devices` nor `--credentials` says.
const DEFAULT_DEVICES: u32 = 10;
/// MQTT ports when `--port` is not given.
const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
/// Sluice's gRPC port, for the default `--grpc`.
const GRPC_PORT: u16 = 50051;

const AFTER_HELP: &str = "\
Credentials file (--credentials): one device per line, `id,secret` (the id is \
both client id and user name, as Sluice wants), or `client_id,username,password`; \
blank lines and lines starting with # are skipped. Device i uses entry i. \
`sluice devices create ID` prints the secret alone, so a fleet's file is:
  for i in $(seq 0 99); do echo \"sim-$i,$(sluice devices create sim-$i)\"; done > fleet.csv

Environment: SIM_PASSWORD (--password), SIM_API_TOKEN (--api-token). The \
simulator never reads SLUICE_* variables: the server takes every one of those as \
configuration and refuses unknown ones.

Exit status: 0 on success; 1 if QoS 1 acknowledgements are missing at the end \
or on any other runtime error; 2 on invalid arguments; 3 if no device could \
connect at all; 4 if --verify found QoS 1 messages missing that the broker had \
acknowledged (lost by the server; takes precedence over 1). Missing QoS 0 \
messages and duplicates are reported but do not fail the run.";

/// A fleet of simulated MQTT devices publishing realistic telemetry.
///
/// Every device publishes a JSON object to `devices/{id}/telemetry` with a
/// per-device `seq` (0, 1, 2, …, so consumers can detect loss and
/// duplicates), `ts` (epoch milliseconds; 1 ms after the device's previous
/// message when the clock has not moved, so no two share a time) and
/// `--metrics` numeric fields.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-sim",
    version,
    group(ArgGroup::new("stop").args(["duration", "count"]).required(true).multiple(true)),
    group(ArgGroup::new("readback").args(["verify", "latency"]).multiple(true)),
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Broker host name or address (also the TLS server name).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Broker MQTT port [default: 1883, or 8883 with --tls].
    #[arg(long)]
    pub port: Option<u16>,

    /// Number of simulated devices, each with its own MQTT connection
    /// [default: 10, or every entry of --credentials].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: Option<u32>,

    /// Prefix of client and device ids: device `i` is `{prefix}{i}`, i from 0.
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,

    /// MQTT user name, the same for every device.
    #[arg(long)]
    pub username: Option<String>,

    /// MQTT password, the same for every device (requires --username).
    #[arg(
        long,
        env = "SIM_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    pub password: Option<String>,

    /// Per-device identities: a file of `id,secret` (or
    /// `client_id,username,password`) lines; device i uses entry i. See below.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["username", "password", "id_prefix"]
    )]
    pub credentials: Option<PathBuf>,

    /// Connect with MQTT over TLS.
    #[arg(long)]
    pub tls: bool,

    /// PEM file of the certificates to trust (with --tls); without it, the
    /// system's trust roots.
    #[arg(long, value_name = "PEM", requires = "tls")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate chain (PEM) for mutual TLS; `{id}` is replaced by
    /// each device's id (Sluice wants the device id as the subject CN).
    #[arg(long, value_name = "PEM", requires_all = ["tls", "key"])]
    pub cert: Option<String>,

    /// Private key (PEM) of --cert; `{id}` is replaced as there.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<String>,

    /// Spread the device connections evenly over this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub ramp_ms: u64,

    /// Messages per second per device; 0 publishes as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,

    /// MQTT QoS of the telemetry messages: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,

    /// What the devices are; their payloads follow the profile.
    #[arg(long, value_enum, default_value_t = Profile::EnvSensor)]
    pub profile: Profile,

    /// Numeric fields per message besides `seq` (temperature, humidity,
    /// pressure, battery, then m5, m6, …) of the env-sensor and misbehaving
    /// profiles; the others have fixed fields.
    #[arg(long, default_value_t = 4)]
    pub metrics: usize,

    /// Stop publishing after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,

    /// Stop after this many messages per device.
    #[arg(long, value_name = "M")]
    pub count: Option<u64>,

    /// How long to wait for outstanding QoS 1 acknowledgements at the end.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub drain_timeout_secs: f64,

    /// A device not connected this many seconds after its start gives up;
    /// the run fails if no device connects at all.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub connect_timeout_secs: f64,

    /// Maximum unacknowledged QoS 1 messages per device (rumqttc inflight).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,

    /// Capacity of each device's bounded request channel to its event loop:
    /// the publisher waits when it is full, so memory stays bounded at rate 0.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub channel_capacity: u32,

    /// Seed the per-device random walks (device i uses seed + i) for
    /// reproducible payloads; random when omitted.
    #[arg(long)]
    pub seed: Option<u64>,

    /// After the run, read this run's `seq` points back through the gRPC API
    /// and report, per device, the messages missing, duplicated or
    /// unexpected (exit status 4 on QoS 1 loss).
    #[arg(long)]
    pub verify: bool,

    /// Measure publish → stored latency: follow this run's `seq` points on
    /// the gRPC API's Subscribe stream and time each against the moment its
    /// device published it.
    ///
    /// The time runs from the device's publish call to the simulator
    /// receiving the committed point from the live feed. Each device
    /// remembers when it published each recent `seq` (a bounded number per
    /// device), so the latency is exact and not read off `ts`, which is in
    /// whole milliseconds and, above 1000 msg/s per device, runs ahead of
    /// the clock (1 ms after the previous message): measured against `ts`
    /// the latency would be understated. A point that arrives after its
    /// publish time was forgotten is not sampled.
    #[arg(long)]
    pub latency: bool,

    /// gRPC API of the server, for --verify and --latency
    /// [default: http://{host}:50051]; `https://` needs --grpc-ca-file or --ca-file.
    #[arg(long, value_name = "URL", requires = "readback")]
    pub grpc: Option<String>,

    /// API token for --verify and --latency (a `read` token from `sluice
    /// tokens create`); not needed against a server with --allow-anonymous.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SIM_API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// PEM file of the certificates to trust for an `https://` --grpc URL
    /// [default: --ca-file].
    #[arg(long, value_name = "PEM", requires = "readback")]
    pub grpc_ca_file: Option<PathBuf>,

    /// How long --verify and --latency wait, after the devices finished, for
    /// the points to be stored.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub verify_timeout_secs: f64,

    /// Print progress to stderr every second even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,

    /// Print the final summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Who the devices are and how they log in.
#[derive(Debug, Clone)]
pub enum Identities {
    /// Device `i` is `{prefix}{i}`; all share one optional login.
    Prefix {
        prefix: String,
        login: Option<(String, String)>,
    },
    /// Device `i` is entry `i` of a credentials file.
    File(Arc<Vec<DeviceCredentials>>),
}

/// Where the post-run checks (--verify, --latency) read from.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub url: String,
    pub token: Option<String>,
    /// Trust roots (PEM) for an `https://` URL.
    pub ca_pem: Option<Vec<u8>>,
}

/// Validated run configuration derived from [`Args`].
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub devices: u32,
    pub identities: Identities,
    /// MQTT over TLS when set.
    pub tls: Option<Arc<TlsSetup>>,
    pub ramp: Duration,
    /// Messages per second per device; 0 means unpaced.
    pub rate: f64,
    pub qos: QoS,
    pub profile: Profile,
    pub metrics: usize,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub inflight: u16,
    pub channel_capacity: usize,
    pub seed: Option<u64>,
    pub verify: bool,
    pub latency: bool,
    /// Set when `verify` or `latency` is.
    pub api: Option<ApiConfig>,
    pub verify_timeout: Duration,
    pub progress: bool,
    pub json: bool,
}

impl Config {
    /// Client and device id of device `index`.
    pub fn device_id(&self, index: u32) -> String {
        match &self.identities {
            Identities::Prefix { prefix, .. } => format!("{prefix}{index}"),
            Identities::File(entries) => entries[index as usize].client_id.clone(),
        }
    }

    /// User name and password of device `index`, if it logs in with one.
    pub fn login(&self, index: u32) -> Option<(String, String)> {
        match &self.identities {
            Identities::Prefix { login, .. } => login.clone(),
            Identities::File(entries) => {
                let e = &entries[index as usize];
                Some((e.username.clone(), e.password.clone()))
            }
        }
    }

    /// Points each telemetry message stores: its numeric fields and `seq`.
    pub fn points_per_message(&self) -> u64 {
        TelemetryGenerator::for_profile(self.profile, self.metrics, Some(0)).numeric_fields() as u64
            + 1
    }

    /// QoS as the number printed in the summary.
    pub fn qos_level(&self) -> u8 {
        match self.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        }
    }
}

/// Parses a command line (program name first) into a [`Config`]. Invalid
/// arguments, and `--help`/`--version`, come back as a clap error whose
/// `exit()` prints it with the right status (2 for usage errors).
pub fn parse_args<I, T>(args: I) -> Result<Config, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = Args::try_parse_from(args)?;
    args.into_config().map_err(|e| {
        Args::command().error(clap::error::ErrorKind::ValueValidation, format!("{e:#}"))
    })
}

/// Parses a number of seconds given on the command line into a [`Duration`].
fn secs(flag: &str, value: f64, allow_zero: bool) -> Result<Duration> {
    if !value.is_finite() || value < 0.0 || (!allow_zero && value == 0.0) {
        let bound = if allow_zero { ">= 0" } else { "> 0" };
        bail!("--{flag} must be a finite number of seconds {bound}, got {value}");
    }
    Duration::try_from_secs_f64(value).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// `host` as it goes into a URL: IPv6 literals in brackets.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

impl Args {
    /// Checks the value ranges clap cannot express, reads the files the
    /// flags name (credentials, certificates) and builds the [`Config`].
    pub fn into_config(self) -> Result<Config> {
        if !self.rate.is_finite() || self.rate < 0.0 {
            bail!("--rate must be a finite number >= 0, got {}", self.rate);
        }
        if self.metrics > MAX_METRICS {
            bail!(
                "--metrics must be at most {MAX_METRICS}, got {}",
                self.metrics
            );
        }
        if self.count == Some(0) {
            bail!("--count must be at least 1");
        }
        let duration = self
            .duration
            .map(|d| secs("duration", d, false))
            .transpose()?;

        let (identities, devices) = match &self.credentials {
            Some(path) => {
                let entries = credentials::load(path)?;
                let available = u32::try_from(entries.len()).unwrap_or(u32::MAX);
                let devices = self.devices.unwrap_or(available);
                if devices > available {
                    bail!(
                        "--devices {devices} but --credentials {} has only {available} entries",
                        path.display()
                    );
                }
                (Identities::File(Arc::new(entries)), devices)
            }
            None => (
                Identities::Prefix {
                    prefix: self.id_prefix,
                    login: self
                        .username
                        .map(|user| (user, self.password.unwrap_or_default())),
                },
                self.devices.unwrap_or(DEFAULT_DEVICES),
            ),
        };

        let readback = self.verify || self.latency;
        let api = readback
            .then(|| -> Result<ApiConfig> {
                let url = self
                    .grpc
                    .clone()
                    .unwrap_or_else(|| format!("http://{}:{GRPC_PORT}", url_host(&self.host)));
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("--grpc must start with http:// or https://, got {url}");
                }
                let ca_path = self.grpc_ca_file.as_ref().or(self.ca_file.as_ref());
                let ca_pem = match ca_path {
                    Some(p) if url.starts_with("https://") => Some(
                        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                    ),
                    None if url.starts_with("https://") => {
                        bail!("an https:// --grpc URL needs --grpc-ca-file (or --ca-file)")
                    }
                    _ => None,
                };
                Ok(ApiConfig {
                    url,
                    token: self.api_token.clone().filter(|t| !t.is_empty()),
                    ca_pem,
                })
            })
            .transpose()?;

        let mut config = Config {
            host: self.host,
            port: self
                .port
                .unwrap_or(if self.tls { MQTTS_PORT } else { MQTT_PORT }),
            devices,
            identities,
            tls: None,
            ramp: Duration::from_millis(self.ramp_ms),
            rate: self.rate,
            qos: if self.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            profile: self.profile,
            metrics: self.metrics,
            duration,
            count: self.count,
            drain_timeout: secs("drain-timeout-secs", self.drain_timeout_secs, true)?,
            connect_timeout: secs("connect-timeout-secs", self.connect_timeout_secs, false)?,
            inflight: self.inflight,
            channel_capacity: self.channel_capacity as usize,
            seed: self.seed,
            verify: self.verify,
            latency: self.latency,
            api,
            verify_timeout: secs("verify-timeout-secs", self.verify_timeout_secs, true)?,
            progress: self.progress,
            json: self.json,
        };
        if self.tls {
            let client_cert = match (self.cert, self.key) {
                (Some(cert), Some(key)) => Some(ClientCertPaths { cert, key }),
                _ => None,
            };
            let setup = TlsSetup::load(self.ca_file.as_deref(), client_cert, &config.device_id(0))?;
            config.tls = Some(Arc::new(setup));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec!["sluice-sim"];
        argv.extend_from_slice(args);
        parse_args(argv)
    }

    fn credentials_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&["--count", "5"]).unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 1883);
        assert_eq!(c.devices, 10);
        assert_eq!(c.device_id(3), "sim-3");
        assert_eq!(c.rate, 1.0);
        assert_eq!(c.qos, QoS::AtLeastOnce);
        assert_eq!(c.metrics, 4);
        assert_eq!(c.inflight, 100);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.ramp, Duration::ZERO);
        assert_eq!(c.duration, None);
        assert_eq!(c.count, Some(5));
        assert!(c.login(0).is_none());
        assert!(c.tls.is_none());
        assert!(c.api.is_none());
        assert!(!c.verify && !c.latency);
        assert_eq!(c.verify_timeout, Duration::from_secs(30));
        assert!(!c.progress);
    }

    #[test]
    fn a_stop_condition_is_required_and_both_are_allowed() {
        assert!(parse(&[]).is_err());
        let c = parse(&["--duration", "1.5", "--count", "7"]).unwrap();
        assert_eq!(c.duration, Some(Duration::from_millis(1500)));
        assert_eq!(c.count, Some(7));
    }

    #[test]
    fn rejects_out_of_range_values() {
        for bad in [
            &["--count", "1", "--qos", "2"][..],
            &["--count", "1", "--rate", "-1"],
            &["--count", "1", "--rate", "NaN"],
            &["--count", "1", "--devices", "0"],
            &["--count", "1", "--inflight", "0"],
            &["--count", "0"],
            &["--duration", "0"],
            &["--duration", "inf"],
            &["--count", "1", "--metrics", "100000"],
            &["--count", "1", "--password", "secret"],
            &["--count", "1", "--verify", "--verify-timeout-secs", "-1"],
            &["--count", "1", "--verify", "--grpc", "localhost:50051"],
            &[
                "--count",
                "1",
                "--verify",
                "--grpc",
                "https://localhost:50051",
            ],
            &["--count", "1", "--grpc", "http://localhost:50051"],
            &["--count", "1", "--ca-file", "ca.pem"],
            &["--count", "1", "--tls", "--cert", "c.pem"],
            &["--count", "1", "--tls", "--ca-file", "/nonexistent/ca.pem"],
        ] {
            let err = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }

    #[test]
    fn qos_zero_and_a_shared_login() {
        let c = parse(&["--count", "1", "--qos", "0", "--username", "u"]).unwrap();
        assert_eq!(c.qos, QoS::AtMostOnce);
        assert_eq!(c.qos_level(), 0);
        assert_eq!(c.login(7), Some(("u".to_owned(), String::new())));
        let c = parse(&["--count", "1", "--username", "u", "--password", "p"]).unwrap();
        assert_eq!(c.login(0), Some(("u".to_owned(), "p".to_owned())));
    }

    #[test]
    fn no_environment_variable_of_the_simulator_is_a_servers() {
        // The server takes every SLUICE_* variable as configuration and
        // refuses unknown ones: exporting one for the simulator would break it.
        for arg in Args::command().get_arguments() {
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                assert!(!env.starts_with("SLUICE_"), "{env}");
                assert!(env.starts_with("SIM_"), "{env}");
            }
        }
    }

    #[test]
    fn a_credentials_file_names_every_device() {
        let file = credentials_file("# fleet\nd-a,s1\nd-b,s2\nd-c,u3,s3\n");
        let path = file.path().to_str().unwrap();
        let c = parse(&["--count", "1", "--credentials", path]).unwrap();
        assert_eq!(c.devices, 3, "every entry by default");
        assert_eq!(c.device_id(0), "d-a");
        assert_eq!(c.login(1), Some(("d-b".to_owned(), "s2".to_owned())));
        assert_eq!(c.device_id(2), "d-c");
        assert_eq!(c.login(2), Some(("u3".to_owned(), "s3".to_owned())));
        let c = parse(&["--count", "1", "--credentials", path, "--devices", "2"]).unwrap();
        assert_eq!(c.devices, 2);

        let too_many = parse(&["--count", "1", "--credentials", path, "--devices", "4"]);
        let err = too_many.unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("only 3 entries"), "{err}");
        for conflicting in [
            &["--username", "u"][..],
            &["--id-prefix", "x-"],
            &["--password", "p"],
        ] {
            let mut args = vec!["--count", "1", "--credentials", path];
            args.extend_from_slice(conflicting);
            assert_eq!(parse(&args).unwrap_err().exit_code(), 2, "{conflicting:?}");
        }
        let missing = parse(&["--count", "1", "--credentials", "/nonexistent/fleet.csv"]);
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/fleet.csv")
        );
    }

    #[test]
    fn readback_gets_a_default_api_url_from_the_host() {
        let c = parse(&["--count", "1", "--verify", "--host", "broker.local"]).unwrap();
        let api = c.api.unwrap();
        assert_eq!(api.url, "http://broker.local:50051");
        assert!(api.token.is_none());
        let c = parse(&[
            "--count",
            "1",
            "--latency",
            "--host",
            "::1",
            "--api-token",
            "t",
        ])
        .unwrap();
        let api = c.api.unwrap();
        assert_eq!(api.url, "http://[::1]:50051");
        assert_eq!(api.token.as_deref(), Some("t"));
        let c = parse(&["--count", "1", "--verify", "--grpc", "http://h:1"]).unwrap();
        assert_eq!(c.api.unwrap().url, "http://h:1");
    }

    #[test]
    fn tls_changes_the_default_port() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let ca_path = ca_path.to_str().unwrap();
        let c = parse(&["--count", "1", "--tls", "--ca-file", ca_path]).unwrap();
        assert_eq!(c.port, 8883);
        assert!(c.tls.is_some());
        let c = parse(&["--count", "1", "--tls", "--ca-file", ca_path, "--port", "1"]).unwrap();
        assert_eq!(c.port, 1);
    }
}
