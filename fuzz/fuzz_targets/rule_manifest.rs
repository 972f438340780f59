//! A rule's manifest (`NAME.toml`), through the steps the rule loader takes
//! with it before reading any module: parse, the topic filter, and
//! `[config]` as the JSON the guest gets.
//! (The loader itself reads the module path the manifest names; a fuzzer
//! must not make it read arbitrary files of the machine it runs on.)
//!
//! Input: the manifest's text.
//!
//! Invariants, besides never panicking:
//! - a filter the loader accepts and that has no wildcard matches the topic
//!   of the same text;
//! - `[config]` becomes a JSON object that parses back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_rules::TopicFilter;
use sluice_rules::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    // The loader reads manifests as UTF-8 text and refuses anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::parse(text) else {
        return;
    };

    if let Ok(filter) = TopicFilter::new(&manifest.topic)
        && !manifest.topic.contains(['+', '#'])
    {
        assert!(filter.matches(&manifest.topic), "{:?}", manifest.topic);
    }

    // As `RuleLoader::load_rule` makes it.
    if let Ok(json) = serde_json::to_vec(&manifest.config.clone().unwrap_or_default()) {
        let back: serde_json::Value = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("config JSON does not parse back: {e}"));
        assert!(back.is_object(), "{back}");
    }
});
