//! Rules: the transform stage between the broker and storage.
//!
//! A rule is a name, an MQTT topic filter and an action: the built-in JSON
//! telemetry decoder ([`decoder`]) or a sandboxed WebAssembly function
//! ([`wasm`], ABI in `rules/ABI.md`). The [`Processor`] runs every matching
//! rule on every message and yields [`Output`]s; the [`RulesWatcher`] swaps in
//! a new [`RuleSet`] when the rules directory changes.

pub mod catalog;
pub mod decoder;
pub mod manifest;
pub mod message;
pub mod output;
pub mod parallel;
pub mod processor;
pub mod router;
pub mod ruleset;
pub mod state;
pub mod status;
pub mod topic;
pub mod wasm;
pub mod watcher;

pub use catalog::{CatalogError, RuleCatalog, RuleInfo};
pub use manifest::{LimitOverrides, Limits};
pub use message::Message;
pub use output::Output;
pub use parallel::ParallelProcessor;
pub use processor::{Processor, ProcessorConfig, RuleContext};
pub use ruleset::{DeployedRule, LoadError, RuleLoader, RuleSet, RuleSource};
pub use state::{StateChange, StateStore};
pub use status::{RuleMonitor, RuleStatsSnapshot, RuleStatus, SuspendPolicy};
pub use topic::{TopicFilter, device_id_from_topic};
pub use wasm::host::TimeBounds;
pub use wasm::{PoolConfig, RuleEngine};
pub use watcher::RulesWatcher;
