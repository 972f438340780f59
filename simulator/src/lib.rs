//! `sluice-sim` as a library: a fleet of simulated MQTT devices, Sluice's
//! load generator, and the checks of what Sluice stored from it.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let config = sluice_simulator::parse_args(["sluice-sim", "--count", "10", "--verify"])?;
//! let report = sluice_simulator::run(config).await?;
//! assert_eq!(report.verify.unwrap().missing, 0);
//! # Ok(())
//! # }
//! ```
//!
//! The binary (`main.rs`) only parses, runs and prints; everything a test
//! needs is here.

mod api;
pub mod args;
pub mod credentials;
mod device;
mod misbehaviour;
mod pacing;
mod patience;
pub mod report;
mod run;
mod sent_log;
pub mod stats;
pub mod stored_latency;
mod storm;
pub mod telemetry;
pub mod tls;
pub mod verify;

pub use args::{Config, parse_args};
pub use report::Report;
pub use run::{NoDeviceConnected, run, run_until};
pub use stats::{Latency, Summary};
pub use stored_latency::StoredLatency;
pub use telemetry::Profile;
pub use verify::{DeviceCheck, Verification};
