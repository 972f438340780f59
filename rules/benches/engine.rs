//! Rules engine benchmarks (criterion), through the crate's public API only.
//!
//! Run: `cargo bench -p sluice-rules --bench engine`. Each batch benchmark
//! reports its time per batch and, through `Throughput::Elements`, per
//! message. Goals:
//!
//! - `passthrough_256`: a WASM pass-through rule at ≤ 1 µs per message,
//!   beside `builtin_decoder_256` (the same messages, built-in JSON decoder);
//! - `fresh_instance`: a new instance of a compiled module in ≤ 20 µs;
//! - `routing_100_rules` within 2× `routing_1_rule`; `match_only/*` times the
//!   routing alone, and `instance_run/*` the cost of one guest call, which
//!   is what 100 rules pay more of (the batch splits into ~100 calls);
//! - `stateful_256`: a per-device counter through `state_get`/`state_set`.
//!
//! Kept cheap (small samples, short measurement) so the whole run takes a
//! few minutes on a 2-core machine.

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_rules::router::FilterIndex;
use sluice_rules::wasm::RuleInstance;
use sluice_rules::{
    Limits, Message, Output, Processor, ProcessorConfig, RuleContext, RuleEngine, RuleLoader,
    StateStore, TopicFilter,
};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::ALLOC;

const BATCH: usize = 256;
const PAYLOAD: &[u8] = br#"{"t":21.5,"h":40}"#;

/// One point per message: metric "v" = payload length, at the message's time.
fn passthrough_guest() -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "sluice" "emit_point" (func $point (param i32 i32 i32 f64 i64) (result i32)))
  {ALLOC}
  (data (i32.const 16) "v")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $d i32)
    (block $done (loop $next
      (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
      (local.set $d (i32.add (local.get $ptr) (i32.mul (local.get $i) (i32.const 40))))
      (drop (call $point (local.get $i) (i32.const 16) (i32.const 1)
        (f64.convert_i32_u (i32.load offset=12 (local.get $d))) (i64.const -9223372036854775808)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    i32.const 0))"#
    ))
    .expect("valid WAT")
}

/// Per message: reads the device's 8-byte counter "count" (absent: 0),
/// increments it, writes it back and emits it as point "count".
fn counter_guest() -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "sluice" "emit_point" (func $point (param i32 i32 i32 f64 i64) (result i32)))
  (import "sluice" "state_get" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "sluice" "state_set" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  {ALLOC}
  (data (i32.const 16) "count")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $c i64)
    (block $done (loop $next
      (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
      (local.set $c
        (if (result i64)
          (i32.eq (call $get (local.get $i) (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 8)) (i32.const 8))
          (then (i64.load (i32.const 32)))
          (else (i64.const 0))))
      (local.set $c (i64.add (local.get $c) (i64.const 1)))
      (i64.store (i32.const 32) (local.get $c))
      (if (call $set (local.get $i) (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 8))
        (then (return (i32.const 1))))
      (drop (call $point (local.get $i) (i32.const 16) (i32.const 5)
        (f64.convert_i64_s (local.get $c)) (i64.const -9223372036854775808)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    i32.const 0))"#
    ))
    .expect("valid WAT")
}

fn message(topic: String, device: &str) -> Message {
    Message {
        topic,
        payload: Bytes::from_static(PAYLOAD),
        device_id: Some(Arc::from(device)),
        received_at: Utc.timestamp_millis_opt(1_767_225_600_000).unwrap(),
        qos: 0,
        retain: false,
        hops: 0,
    }
}

/// `devices/dN/telemetry`, N = 0..256.
fn telemetry_batch() -> Vec<Message> {
    (0..BATCH)
        .map(|i| message(format!("devices/d{i}/telemetry"), &format!("d{i}")))
        .collect()
}

/// `devices/dN/s{N % 100}`, N = 0..256: spread over 100 topics.
fn spread_batch() -> Vec<Message> {
    (0..BATCH)
        .map(|i| message(format!("devices/d{i}/s{}", i % 100), &format!("d{i}")))
        .collect()
}

/// A processor over a temporary rules directory of `NAME.toml` + `NAME.wasm`.
fn processor(
    engine: &Arc<RuleEngine>,
    rules: &[(String, String, &[u8])],
    builtin: bool,
) -> (Processor, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, topic, wasm) in rules {
        std::fs::write(
            dir.path().join(format!("{name}.toml")),
            format!("topic = \"{topic}\"\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{name}.wasm")), wasm).unwrap();
    }
    let mut loader = RuleLoader::new(engine.clone(), Limits::default(), builtin);
    let (set, errors) = loader.load(Some(dir.path()), &[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(set.rules.len(), rules.len() + usize::from(builtin));
    let processor = Processor::new(
        Arc::new(ArcSwap::from_pointee(set)),
        ProcessorConfig::default(),
        RuleContext::default(),
    );
    (processor, dir)
}

/// Runs the batch once (creating instances) and checks what came out.
fn warm(processor: &mut Processor, batch: &[Message], points: usize, states: usize) {
    let mut out = Vec::new();
    processor.process(batch, &mut out);
    let got_points = out
        .iter()
        .filter(|o| matches!(o, Output::Point { .. }))
        .count();
    let got_states = out.iter().filter(|o| matches!(o, Output::State(_))).count();
    assert_eq!(
        (got_points, got_states, out.len()),
        (points, states, points + states),
        "unexpected outputs: {:?}",
        out.first()
    );
}

fn bench_process(c: &mut Criterion, group: &str, name: &str, mut p: Processor, batch: &[Message]) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(batch.len() as u64));
    let mut out = Vec::with_capacity(4 * batch.len());
    g.bench_function(name, |b| {
        b.iter(|| {
            out.clear();
            p.process(black_box(batch), &mut out);
        })
    });
    g.finish();
}

fn engine_benches(c: &mut Criterion) {
    let engine = RuleEngine::new().expect("engine");
    let pass = passthrough_guest();
    let telemetry = telemetry_batch();
    let spread = spread_batch();

    // a. WASM pass-through vs the built-in decoder, 256 messages.
    let (mut p, _dir_a) = processor(
        &engine,
        &[("pass".into(), "devices/+/telemetry".into(), &pass[..])],
        false,
    );
    warm(&mut p, &telemetry, BATCH, 0);
    bench_process(c, "batch", "passthrough_256", p, &telemetry);

    let (mut p, _dir_b) = processor(&engine, &[], true);
    warm(&mut p, &telemetry, 2 * BATCH, 0);
    bench_process(c, "batch", "builtin_decoder_256", p, &telemetry);

    // d. Per-device counter through state_get / state_set.
    let counter = counter_guest();
    let (mut p, _dir_d) = processor(
        &engine,
        &[("count".into(), "devices/+/telemetry".into(), &counter[..])],
        false,
    );
    warm(&mut p, &telemetry, BATCH, BATCH);
    bench_process(c, "batch", "stateful_256", p, &telemetry);

    // c. Routing: 100 rules with disjoint filters vs one rule for everything.
    let hundred: Vec<(String, String, &[u8])> = (0..100)
        .map(|i| (format!("r{i:03}"), format!("devices/+/s{i}"), &pass[..]))
        .collect();
    let (mut p, _dir_c100) = processor(&engine, &hundred, false);
    warm(&mut p, &spread, BATCH, 0);
    bench_process(c, "routing", "routing_100_rules", p, &spread);

    let (mut p, _dir_c1) = processor(
        &engine,
        &[("all".into(), "devices/+/+".into(), &pass[..])],
        false,
    );
    warm(&mut p, &spread, BATCH, 0);
    bench_process(c, "routing", "routing_1_rule", p, &spread);

    // Routing alone: the filter index vs testing every filter.
    let filters: Vec<TopicFilter> = (0..100)
        .map(|i| TopicFilter::new(&format!("devices/+/s{i}")).unwrap())
        .collect();
    let index = FilterIndex::new(&filters);
    let one = [TopicFilter::new("devices/+/+").unwrap()];
    let index_1 = FilterIndex::new(&one);
    {
        let mut g = c.benchmark_group("match_only");
        g.throughput(Throughput::Elements(spread.len() as u64));
        let mut hits = Vec::new();
        g.bench_function("index_1_filter_256", |b| {
            b.iter(|| {
                hits.clear();
                for m in black_box(&spread) {
                    index_1.matches(&m.topic, &mut hits);
                }
                assert_eq!(hits.len(), BATCH);
            })
        });
        g.bench_function("index_100_filters_256", |b| {
            b.iter(|| {
                hits.clear();
                for m in black_box(&spread) {
                    index.matches(&m.topic, &mut hits);
                }
                assert_eq!(hits.len(), BATCH);
            })
        });
        g.bench_function("linear_100_filters_256", |b| {
            b.iter(|| {
                hits.clear();
                for m in black_box(&spread) {
                    hits.extend((0..filters.len()).filter(|&i| filters[i].matches(&m.topic)));
                }
                assert_eq!(hits.len(), BATCH);
            })
        });
        g.finish();
    }

    // b + the cost of one guest call, straight on a RuleInstance.
    let module = engine.compile(&pass).expect("compiles");
    let limits = Limits::default();
    let name: Arc<str> = "pass".into();
    let state = StateStore::new();
    {
        let mut g = c.benchmark_group("instance");
        g.throughput(Throughput::Elements(1));
        g.bench_function("fresh_instance", |b| {
            b.iter(|| {
                let instance =
                    RuleInstance::new(&module, name.clone(), &limits, b"{}", state.clone())
                        .expect("instantiates");
                black_box(instance)
            })
        });
        // The creation alone: each instance is dropped outside the timing
        // (one at a time, so the pool never runs out of slots).
        g.bench_function("fresh_instance_create_only", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let instance =
                        RuleInstance::new(&module, name.clone(), &limits, b"{}", state.clone())
                            .expect("instantiates");
                    total += started.elapsed();
                    drop(black_box(instance));
                }
                total
            })
        });
        g.finish();
    }
    let mut instance =
        RuleInstance::new(&module, name.clone(), &limits, b"{}", state).expect("instantiates");
    {
        let mut g = c.benchmark_group("instance_run");
        for n in [1, 3, BATCH] {
            let msgs: Vec<&Message> = telemetry.iter().take(n).collect();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{n}"), |b| {
                b.iter(|| {
                    let r = instance.run(black_box(&msgs)).expect("runs");
                    assert_eq!(r.slots.len(), n);
                    r
                })
            });
        }
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = engine_benches
}
criterion_main!(benches);
