//! Rules: the transform stage between the broker and storage.
//!
//! A rule is a name, an MQTT topic filter and an action: the built-in JSON
//! telemetry decoder ([`decoder`]) or a sandboxed WebAssembly function
//! ([`wasm`], ABI in `rules/ABI.md`). The [`Processor`] runs every matching
//! rule on every message and yields [`Output`]s; the [`RulesWatcher`] swaps in
//! a new [`RuleSet`] when the rules directory changes.

pub mod decoder;
pub mod manifest;
pub mod message;
pub mod output;
pub mod processor;
pub mod ruleset;
pub mod topic;
pub mod wasm;
pub mod watcher;

pub use manifest::Limits;
pub use message::Message;
pub use output::Output;
pub use processor::{Processor, ProcessorConfig};
pub use ruleset::{RuleLoader, RuleSet};
pub use topic::{TopicFilter, device_id_from_topic};
pub use wasm::RuleEngine;
pub use watcher::RulesWatcher;
