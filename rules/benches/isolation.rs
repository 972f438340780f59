//! Isolation between rules: how much a hostile guest (an infinite loop, a
//! memory bomb, a trap on every message) takes from the throughput of the
//! good rules beside it, through the real engine with parallel workers,
//! default limits and the default suspension policy.
//!
//! Each scenario runs batches of 1,024 messages for a fixed time: 90% go to
//! two good pass-through rules, 10% to a third rule, hostile or (in the
//! baseline) a well-behaved pass-through. It reports good messages per
//! second and the ratio to the baseline; the scenarios alternate over
//! several rounds and the medians are compared. Run: `cargo bench -p sluice-rules --bench isolation`.

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::Utc;
use sluice_rules::{
    Limits, Message, ParallelProcessor, ProcessorConfig, RuleContext, RuleEngine, RuleLoader,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::ALLOC;

const IMPORTS: &str = r#"
  (import "sluice" "emit_point" (func $emit_point (param i32 i32 i32 f64 i64) (result i32)))
"#;

/// `body` runs once per message with `$i` its index.
fn guest(body: &str) -> String {
    format!(
        r#"(module {IMPORTS} {ALLOC}
  (data (i32.const 16) "v")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        {body}
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    i32.const 0))"#
    )
}

fn passthrough() -> String {
    guest(
        "(drop (call $emit_point (local.get $i) (i32.const 16) (i32.const 1) (f64.const 1) (i64.const -9223372036854775808)))",
    )
}

fn hostile(kind: &str) -> String {
    match kind {
        "infinite_loop" => guest("(loop $forever (br $forever))"),
        "memory_bomb" => guest(
            "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable",
        ),
        "trap_storm" => guest("unreachable"),
        other => panic!("unknown scenario {other}"),
    }
}

fn messages(batch: usize) -> Vec<Message> {
    (0..batch)
        .map(|i| {
            let topic = match i % 10 {
                0 => format!("devices/d{}/bad", i % 97),
                n if n % 2 == 0 => format!("devices/d{}/good1", i % 97),
                _ => format!("devices/d{}/good2", i % 97),
            };
            Message {
                topic,
                payload: Bytes::from_static(br#"{"t":21.5}"#),
                device_id: Some(format!("d{}", i % 97).into()),
                received_at: Utc::now(),
                qos: 1,
                retain: false,
                hops: 0,
            }
        })
        .collect()
}

struct Outcome {
    /// Good messages per second.
    rate: f64,
    /// Failed calls of the hostile rule before it was suspended.
    failures: u64,
    suspended: bool,
}

/// Runs for `duration` with `hostile` (if any) deployed beside the good rules.
fn run(hostile_kind: Option<&str>, duration: Duration, workers: usize) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    // The baseline's third rule is well-behaved, so both sides do the same
    // work for the good 90%; only the third rule's behaviour differs.
    let third = hostile_kind.map_or_else(passthrough, hostile);
    let rules = [
        ("good1", passthrough()),
        ("good2", passthrough()),
        ("bad", third),
    ];
    for (name, wat_text) in &rules {
        std::fs::write(
            dir.path().join(format!("{name}.toml")),
            format!("topic = \"devices/+/{name}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.wasm")),
            wat::parse_str(wat_text).unwrap(),
        )
        .unwrap();
    }
    let mut loader = RuleLoader::new(RuleEngine::new().unwrap(), Limits::default(), false);
    let (set, errors) = loader.load(Some(dir.path()), &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let context = RuleContext::default();
    let mut processor = ParallelProcessor::new(
        Arc::new(ArcSwap::from_pointee(set)),
        ProcessorConfig::default(),
        context.clone(),
        workers,
    )
    .unwrap();
    let batch = messages(1024);
    let good_per_batch = batch.iter().filter(|m| !m.topic.ends_with("bad")).count();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut good = 0usize;
    while started.elapsed() < duration {
        processor.process(&batch, &mut out);
        out.clear();
        good += good_per_batch;
    }
    let rate = good as f64 / started.elapsed().as_secs_f64();
    let bad = context.monitor.get("bad");
    Outcome {
        rate,
        failures: bad
            .as_ref()
            .map_or(0, |s| s.snapshot().failures.values().sum()),
        suspended: bad.is_some_and(|s| s.status() != sluice_rules::RuleStatus::Active),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; other arguments are ignored.
    let seconds: u64 = std::env::var("ISOLATION_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rounds: usize = std::env::var("ISOLATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let duration = Duration::from_secs(seconds);
    println!(
        "isolation: {rounds} rounds of {seconds} s per scenario, alternating; {workers} workers; \
         batches of 1024 (90% to two good rules, 10% to the hostile one)"
    );
    let scenarios = [
        None,
        Some("infinite_loop"),
        Some("memory_bomb"),
        Some("trap_storm"),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut notes = vec![String::new(); scenarios.len()];
    for _ in 0..rounds {
        for (i, kind) in scenarios.iter().enumerate() {
            let o = run(*kind, duration, workers);
            rates[i].push(o.rate);
            if kind.is_some() {
                notes[i] = format!(
                    "{} failed calls, then {}",
                    o.failures,
                    if o.suspended {
                        "suspended"
                    } else {
                        "NOT suspended"
                    }
                );
            }
        }
    }
    let baseline = median(rates[0].clone());
    println!("| scenario | good messages/s (median) | vs. baseline | hostile rule |");
    println!("|---|---|---|---|");
    for (i, kind) in scenarios.iter().enumerate() {
        let rate = median(rates[i].clone());
        println!(
            "| {} | {rate:.0} | {:.1}% | {} |",
            kind.unwrap_or("baseline (third rule well-behaved)"),
            100.0 * rate / baseline,
            notes[i]
        );
    }
}
