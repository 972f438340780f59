//! The WASM engine on real modules (WAT compiled with the `wat` crate):
//! loading checks, outputs, limits and failure handling.

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use sluice_rules::{
    Limits, Message, Output, Processor, ProcessorConfig, RuleContext, RuleEngine, RuleLoader,
};
mod common;

use common::ALLOC;
use std::path::Path;
use std::sync::Arc;

fn compile_err(wat_text: &str) -> String {
    let engine = RuleEngine::new().unwrap();
    match engine.compile(&wat::parse_str(wat_text).unwrap()) {
        Ok(_) => panic!("module should have been refused"),
        Err(e) => e,
    }
}

#[test]
fn modules_outside_the_abi_are_refused_with_a_reason() {
    let wasi = format!(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))) {ALLOC}
           (func (export "sluice_on_batch") (param i32 i32) (result i32) i32.const 0))"#
    );
    assert!(
        compile_err(&wasi).contains("no WASI"),
        "{}",
        compile_err(&wasi)
    );

    let unknown = format!(
        r#"(module (import "sluice" "open_socket" (func)) {ALLOC}
           (func (export "sluice_on_batch") (param i32 i32) (result i32) i32.const 0))"#
    );
    assert!(compile_err(&unknown).contains("open_socket"));

    let missing = format!("(module {ALLOC})");
    assert!(compile_err(&missing).contains("sluice_on_batch"));

    let wrong_sig = format!(
        r#"(module {ALLOC} (func (export "sluice_on_batch") (param i32) (result i32) i32.const 0))"#
    );
    assert!(compile_err(&wrong_sig).contains("wrong signature"));

    assert!(compile_err("(module)").contains("memory"));
}

fn message(topic: &str, payload: &'static [u8], device: Option<&str>) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        device_id: device.map(Arc::from),
        received_at: Utc.timestamp_millis_opt(1_767_225_600_000).unwrap(),
        qos: 0,
        retain: false,
        hops: 0,
    }
}

/// A processor over a rules directory holding `NAME.toml` + `NAME.wasm` from WAT.
fn processor_with(rules: &[(&str, &str, &str)], builtin: bool) -> (Processor, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, manifest, wat_text) in rules {
        std::fs::write(dir.path().join(format!("{name}.toml")), manifest).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.wasm")),
            wat::parse_str(wat_text).unwrap(),
        )
        .unwrap();
    }
    let mut loader = RuleLoader::new(RuleEngine::new().unwrap(), Limits::default(), builtin);
    let (set, errors) = loader.load(Some(dir.path()), &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let processor = Processor::new(
        Arc::new(ArcSwap::from_pointee(set)),
        ProcessorConfig::default(),
        RuleContext::default(),
    );
    (processor, dir)
}

/// Emits a point "len" = payload length, an event, and a publish, per message.
fn echo_guest() -> String {
    format!(
        r#"(module
  (import "sluice" "emit_point" (func $point (param i32 i32 i32 f64 i64) (result i32)))
  (import "sluice" "emit_event" (func $event (param i32 i32 i32 i64) (result i32)))
  (import "sluice" "publish" (func $publish (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "sluice" "log" (func $log (param i32 i32 i32) (result i32)))
  {ALLOC}
  (data (i32.const 16) "len")
  (data (i32.const 32) "{{\"seen\":true}}")
  (data (i32.const 64) "out/echo")
  (data (i32.const 80) "hello from the guest")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $d i32)
    (drop (call $log (i32.const 2) (i32.const 80) (i32.const 20)))
    (block $done (loop $next
      (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
      (local.set $d (i32.add (local.get $ptr) (i32.mul (local.get $i) (i32.const 40))))
      (drop (call $point (local.get $i) (i32.const 16) (i32.const 3)
        (f64.convert_i32_u (i32.load offset=12 (local.get $d))) (i64.const 1767225601000)))
      (drop (call $event (local.get $i) (i32.const 32) (i32.const 13) (i64.const -9223372036854775808)))
      (drop (call $publish (local.get $i) (i32.const 64) (i32.const 8)
        (i32.load offset=8 (local.get $d)) (i32.load offset=12 (local.get $d)) (i32.const 1) (i32.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    i32.const 0))"#
    )
}

#[test]
fn a_guest_emits_points_events_and_publishes_per_message() {
    let (mut p, _dir) = processor_with(
        &[("echo", "topic = \"devices/+/raw\"\n", &echo_guest())],
        false,
    );
    let msgs = [
        message("devices/d1/raw", b"abcd", Some("d1")),
        message("devices/d2/raw", b"xy", Some("d2")),
    ];
    let mut out = Vec::new();
    p.process(&msgs, &mut out);
    let points: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Point {
                device_id,
                metric,
                value,
                time,
            } => Some((
                device_id.to_string(),
                metric.clone(),
                *value,
                time.timestamp_millis(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        points,
        vec![
            ("d1".into(), "len".into(), 4.0, 1_767_225_601_000),
            ("d2".into(), "len".into(), 2.0, 1_767_225_601_000)
        ]
    );
    let events: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Output::Event { .. }))
        .collect();
    assert_eq!(events.len(), 2);
    if let Output::Event {
        payload,
        rule,
        time,
        ..
    } = events[0]
    {
        assert_eq!(payload, br#"{"seen":true}"#);
        assert_eq!(rule.as_deref(), Some("echo"));
        assert_eq!(
            time.timestamp_millis(),
            1_767_225_600_000,
            "i64::MIN means the message's time"
        );
    }
    let publishes: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Publish {
                topic,
                payload,
                hops,
                ..
            } => Some((topic.clone(), payload.clone(), *hops)),
            _ => None,
        })
        .collect();
    assert_eq!(
        publishes,
        vec![
            ("out/echo".into(), b"abcd".to_vec(), 1),
            ("out/echo".into(), b"xy".to_vec(), 1)
        ]
    );
}

#[test]
fn publishes_past_the_hop_limit_are_refused_into_dead_letters() {
    let (mut p, _dir) = processor_with(&[("echo", "topic = \"#\"\n", &echo_guest())], false);
    let mut looping = message("out/echo", b"x", None);
    looping.hops = ProcessorConfig::default().max_hops;
    let mut out = Vec::new();
    p.process(&[looping], &mut out);
    assert!(!out.iter().any(|o| matches!(o, Output::Publish { .. })));
    let reasons: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::DeadLetter { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("hop limit"), "{reasons:?}");
    // No device: the point was refused by the host (NO_DEVICE), not stored.
    assert!(!out.iter().any(|o| matches!(o, Output::Point { .. })));
}

#[test]
fn fail_and_drop_verdicts_are_per_message() {
    let guest = format!(
        r#"(module
  (import "sluice" "emit_event" (func $event (param i32 i32 i32 i64) (result i32)))
  (import "sluice" "fail" (func $fail (param i32 i32 i32) (result i32)))
  (import "sluice" "drop_message" (func $drop (param i32) (result i32)))
  {ALLOC}
  (data (i32.const 16) "{{}}")
  (data (i32.const 32) "bad reading")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    ;; message 0: event; message 1: event then fail; message 2: event then drop
    (drop (call $event (i32.const 0) (i32.const 16) (i32.const 2) (i64.const -9223372036854775808)))
    (drop (call $event (i32.const 1) (i32.const 16) (i32.const 2) (i64.const -9223372036854775808)))
    (drop (call $fail (i32.const 1) (i32.const 32) (i32.const 11)))
    (drop (call $event (i32.const 2) (i32.const 16) (i32.const 2) (i64.const -9223372036854775808)))
    (drop (call $drop (i32.const 2)))
    i32.const 0))"#
    );
    let (mut p, _dir) = processor_with(&[("v", "topic = \"t\"\n", &guest)], false);
    let msgs = [
        message("t", b"0", None),
        message("t", b"1", None),
        message("t", b"2", None),
    ];
    let mut out = Vec::new();
    p.process(&msgs, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(&out[0], Output::Event { .. }));
    match &out[1] {
        Output::DeadLetter {
            reason, payload, ..
        } => {
            assert!(reason.contains("bad reading"));
            assert_eq!(&payload[..], b"1");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn output_limit_is_enforced_per_message() {
    let guest = format!(
        r#"(module
  (import "sluice" "emit_event" (func $event (param i32 i32 i32 i64) (result i32)))
  {ALLOC}
  (data (i32.const 16) "{{}}")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $n i32)
    (loop $more
      (drop (call $event (i32.const 0) (i32.const 16) (i32.const 2) (i64.const -9223372036854775808)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br_if $more (i32.lt_s (local.get $n) (i32.const 100))))
    i32.const 0))"#
    );
    let (mut p, _dir) = processor_with(
        &[(
            "many",
            "topic = \"t\"\n[limits]\nmax_outputs_per_message = 5\n",
            &guest,
        )],
        false,
    );
    let mut out = Vec::new();
    p.process(&[message("t", b"", None)], &mut out);
    // Past the limit the message fails as a whole, naming the limit.
    assert_eq!(out.len(), 1, "{out:?}");
    match &out[0] {
        Output::DeadLetter { reason, .. } => {
            assert!(reason.contains("output limit exceeded"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unmatched_messages_become_events_and_the_builtin_decoder_makes_points() {
    let (mut p, _dir) = processor_with(&[], true);
    let msgs = [
        message("devices/d1/telemetry", br#"{"t": 1.5}"#, Some("d1")),
        message("misc", b"raw", None),
    ];
    let mut out = Vec::new();
    p.process(&msgs, &mut out);
    assert!(matches!(&out[0], Output::Event { rule: None, payload, .. } if payload == b"raw"));
    assert!(
        matches!(&out[1], Output::Point { metric, value, .. } if metric == "t" && *value == 1.5)
    );
}

#[test]
fn a_broken_redeploy_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        r#"(module {ALLOC} (func (export "sluice_on_batch") (param i32 i32) (result i32) i32.const 0))"#
    );
    std::fs::write(dir.path().join("r.toml"), "topic = \"t\"\n").unwrap();
    std::fs::write(dir.path().join("r.wasm"), wat::parse_str(&good).unwrap()).unwrap();
    let mut loader = RuleLoader::new(RuleEngine::new().unwrap(), Limits::default(), false);
    let (set, errors) = loader.load(Some(dir.path()), &[]);
    assert!(errors.is_empty());
    assert_eq!(set.names(), vec!["r"]);

    std::fs::write(dir.path().join("r.wasm"), b"not wasm at all").unwrap();
    let (set, errors) = loader.load(Some(Path::new(dir.path())), &[]);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].reason.contains("not a valid WebAssembly module"),
        "{}",
        errors[0].reason
    );
    assert_eq!(set.names(), vec!["r"], "the previous version keeps running");
}

#[test]
fn parallel_workers_keep_each_devices_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("echo.toml"), "topic = \"devices/+/raw\"\n").unwrap();
    std::fs::write(
        dir.path().join("echo.wasm"),
        wat::parse_str(echo_guest()).unwrap(),
    )
    .unwrap();
    let mut loader = RuleLoader::new(RuleEngine::new().unwrap(), Limits::default(), false);
    let (set, errors) = loader.load(Some(dir.path()), &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let mut p = sluice_rules::ParallelProcessor::new(
        Arc::new(ArcSwap::from_pointee(set)),
        ProcessorConfig {
            // Small calls, so each device's messages span several of them.
            batch_size: 7,
            ..Default::default()
        },
        RuleContext::default(),
        3,
    )
    .unwrap();
    // Device d's n-th message has a payload of n bytes; the guest emits
    // the payload length, so each device's points must count up.
    static PAYLOAD: [u8; 64] = [b'x'; 64];
    let devices = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"];
    let mut msgs = Vec::new();
    for n in 1..=40 {
        for d in devices {
            msgs.push(message(&format!("devices/{d}/raw"), &PAYLOAD[..n], Some(d)));
        }
    }
    let mut out = Vec::new();
    for chunk in msgs.chunks(100) {
        p.process(chunk, &mut out);
    }
    for d in devices {
        let seen: Vec<f64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Point {
                    device_id, value, ..
                } if &**device_id == d => Some(*value),
                _ => None,
            })
            .collect();
        let expected: Vec<f64> = (1..=40).map(f64::from).collect();
        assert_eq!(seen, expected, "device {d}");
    }
}
