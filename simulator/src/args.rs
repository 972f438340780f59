//! Command-line interface of `sluice-sim`.
//!
//! Parsing and validation live here so that the rest of the simulator only
//! ever sees a consistent [`Config`]: every later benchmark scripts this tool,
//! so bad flag combinations must fail loudly up front instead of producing a
//! run that silently measures the wrong thing.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{ArgGroup, Parser};
use rumqttc::QoS;

use crate::telemetry::{Profile, TelemetryGenerator};

/// Upper bound for `--metrics`: keeps one payload well below the MQTT packet
/// size limit the devices are configured with (see [`MAX_PACKET_BYTES`]).
pub const MAX_METRICS: usize = 1000;

/// Largest MQTT packet a simulated device sends or accepts. rumqttc defaults
/// to 10 KiB, which a payload with many `--metrics` would exceed.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

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
    after_help = "Exit status: 0 on success; 1 if QoS 1 acknowledgements are missing at the end \
                  or on any other runtime error; 2 on invalid arguments; 3 if no device could \
                  connect at all."
)]
pub struct Args {
    /// Broker host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,

    /// Number of simulated devices, each with its own MQTT connection.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,

    /// Prefix of client and device ids: device `i` is `{prefix}{i}`, i from 0.
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,

    /// MQTT user name, the same for every device.
    #[arg(long)]
    pub username: Option<String>,

    /// MQTT password, the same for every device (requires --username).
    #[arg(
        long,
        env = "SLUICE_SIM_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    pub password: Option<String>,

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

    /// Print progress to stderr every second even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,

    /// Print the final summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Validated run configuration derived from [`Args`].
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub devices: u32,
    pub id_prefix: String,
    pub credentials: Option<(String, String)>,
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
    pub progress: bool,
    pub json: bool,
}

impl Config {
    /// Client and device id of device `index`.
    pub fn device_id(&self, index: u32) -> String {
        format!("{}{}", self.id_prefix, index)
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

/// Parses a number of seconds given on the command line into a [`Duration`].
fn secs(flag: &str, value: f64, allow_zero: bool) -> Result<Duration> {
    if !value.is_finite() || value < 0.0 || (!allow_zero && value == 0.0) {
        let bound = if allow_zero { ">= 0" } else { "> 0" };
        bail!("--{flag} must be a finite number of seconds {bound}, got {value}");
    }
    Duration::try_from_secs_f64(value).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

impl Args {
    /// Checks the value ranges clap cannot express and builds the [`Config`].
    /// `stderr_is_terminal` decides whether progress is shown by default.
    pub fn into_config(self, stderr_is_terminal: bool) -> Result<Config> {
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
        let credentials = self
            .username
            .map(|user| (user, self.password.unwrap_or_default()));
        Ok(Config {
            host: self.host,
            port: self.port,
            devices: self.devices,
            id_prefix: self.id_prefix,
            credentials,
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
            progress: self.progress || stderr_is_terminal,
            json: self.json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Config> {
        let mut argv = vec!["sluice-sim"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)?.into_config(false)
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
        assert!(c.credentials.is_none());
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
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn qos_zero_and_credentials() {
        let c = parse(&["--count", "1", "--qos", "0", "--username", "u"]).unwrap();
        assert_eq!(c.qos, QoS::AtMostOnce);
        assert_eq!(c.qos_level(), 0);
        assert_eq!(c.credentials, Some(("u".to_owned(), String::new())));
    }
}
