//! The built-in JSON telemetry decoder, alone and as the rules processor
//! runs it (topic routing, device id, time bounds, outputs).
//!
//! Input: the topic up to the first newline, then the payload (so seeds are
//! readable: `devices/d1/telemetry\n{"t": 21.5}`).
//!
//! Invariants, besides never panicking (see the decoder's contract in
//! `rules/src/decoder.rs`):
//! - a decoded message has at least one value, every value finite, every
//!   name within `MAX_METRIC_NAME_BYTES`, and the arrival time when it has
//!   no `ts`;
//! - every message ends in exactly one outcome: points, one dead letter,
//!   or (no rule matched) one event as received;
//! - the processor stores exactly what the decoder decoded.

#![no_main]

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use sluice_rules::decoder::{MAX_METRIC_NAME_BYTES, decode_telemetry};
use sluice_rules::ruleset::{BUILTIN_TELEMETRY_FILTER, BUILTIN_TELEMETRY_RULE, Rule, RuleAction};
use sluice_rules::{
    Message, Output, Processor, ProcessorConfig, RuleContext, RuleSet, RuleSource, TopicFilter,
    device_id_from_topic,
};
use std::cell::RefCell;
use std::sync::Arc;

/// A fixed arrival time: the decoder's output must not depend on the clock
/// (the processor's time bounds use the clock, and only refuse).
fn received_at() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_767_225_600_000).unwrap()
}

/// The processor as the server builds it with the built-in rule.
fn processor() -> Processor {
    let rule = Rule {
        name: BUILTIN_TELEMETRY_RULE.into(),
        filter: TopicFilter::new(BUILTIN_TELEMETRY_FILTER).unwrap(),
        action: RuleAction::JsonTelemetry,
        source: RuleSource::Builtin,
    };
    let rules = Arc::new(ArcSwap::from_pointee(RuleSet::new(vec![rule])));
    Processor::new(rules, ProcessorConfig::default(), RuleContext::default())
}

thread_local! {
    static PROCESSOR: RefCell<Processor> = RefCell::new(processor());
}

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&data[..0], data),
    };
    // Topics reach the rules as UTF-8 (the edge refuses anything else).
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };

    let decoded = decode_telemetry(payload, received_at());
    if let Ok(t) = &decoded {
        assert!(!t.values.is_empty());
        for (name, value) in &t.values {
            assert!(value.is_finite(), "{name} = {value}");
            assert!(name.len() <= MAX_METRIC_NAME_BYTES, "{name}");
        }
        if !has_top_level_ts(payload) {
            assert_eq!(t.time, received_at());
        }
    }

    let message = Message {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        device_id: device_id_from_topic(topic).map(Arc::from),
        received_at: received_at(),
        qos: 1,
        retain: false,
        hops: 0,
    };
    let mut out = Vec::new();
    PROCESSOR.with_borrow_mut(|p| p.process(std::slice::from_ref(&message), &mut out));

    let matched = TopicFilter::new(BUILTIN_TELEMETRY_FILTER)
        .unwrap()
        .matches(topic);
    match out.as_slice() {
        [Output::Event { rule: None, .. }] => assert!(!matched, "a matched message stored raw"),
        [Output::DeadLetter { .. }] => assert!(matched),
        points => {
            assert!(matched && !points.is_empty(), "{out:?}");
            let values = &decoded.as_ref().expect("stored but not decodable").values;
            assert_eq!(points.len(), values.len());
            for (output, (name, value)) in points.iter().zip(values) {
                let Output::Point {
                    device_id,
                    metric,
                    value: stored,
                    ..
                } = output
                else {
                    panic!("not a point: {output:?}");
                };
                assert_eq!(Some(&**device_id), device_id_from_topic(topic));
                assert_eq!((metric, stored.to_bits()), (name, value.to_bits()));
            }
        }
    }
});

/// Whether the payload is an object with a `ts` member.
fn has_top_level_ts(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.contains_key("ts")))
        .unwrap_or(false)
}
