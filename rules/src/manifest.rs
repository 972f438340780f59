//! A rule's manifest: `NAME.toml` in the rules directory.
//!
//! ```toml
//! topic = "devices/+/telemetry"      # MQTT topic filter (required)
//! module = "threshold.wasm"          # default: NAME.wasm beside the manifest
//! # decoder = "json-telemetry"       # instead of a module: the built-in decoder
//! enabled = true
//! [config]                           # handed to the guest's sluice_init as JSON
//! threshold = 30.0
//! [limits]                           # each defaults to the server's [rules] setting
//! timeout_ms = 100
//! memory_mb = 16
//! max_outputs_per_message = 64
//! table_elements = 10000
//! state_bytes = 65536
//! ```

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Defaults to the manifest's file stem.
    pub name: Option<String>,
    pub topic: String,
    pub module: Option<PathBuf>,
    pub decoder: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub config: Option<toml::Table>,
    #[serde(default)]
    pub limits: LimitOverrides,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_outputs_per_message: Option<u32>,
    pub table_elements: Option<u32>,
    pub state_bytes: Option<u32>,
}

/// The limits a WASM rule runs under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall time of one call into the guest (a batch), enforced by epoch interruption.
    pub timeout_ms: u64,
    /// Linear memory the guest may grow to.
    pub memory_mb: u64,
    /// Outputs (points, events, publishes) one message may produce.
    pub max_outputs_per_message: u32,
    /// Elements the guest's tables may grow to.
    pub table_elements: u32,
    /// State (keys plus values) one device may hold in this rule.
    pub state_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 200,
            memory_mb: 64,
            max_outputs_per_message: 1024,
            table_elements: 10_000,
            state_bytes: 64 * 1024,
        }
    }
}

impl Limits {
    pub fn with_overrides(&self, o: &LimitOverrides) -> Self {
        Self {
            timeout_ms: o.timeout_ms.unwrap_or(self.timeout_ms),
            memory_mb: o.memory_mb.unwrap_or(self.memory_mb),
            max_outputs_per_message: o
                .max_outputs_per_message
                .unwrap_or(self.max_outputs_per_message),
            table_elements: o.table_elements.unwrap_or(self.table_elements),
            state_bytes: o.state_bytes.unwrap_or(self.state_bytes),
        }
    }
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(
            "topic = \"devices/+/telemetry\"\nmodule = \"x.wasm\"\n[config]\nthreshold = 30.0\n[limits]\ntimeout_ms = 5\n",
        )
        .unwrap();
        assert_eq!(m.topic, "devices/+/telemetry");
        assert!(m.enabled);
        assert_eq!(m.limits.timeout_ms, Some(5));
        assert_eq!(Limits::default().with_overrides(&m.limits).timeout_ms, 5);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Manifest::parse("topic = \"a\"\ntopik = \"b\"\n").is_err());
    }
}
