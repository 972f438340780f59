//! Every SDK's three examples (threshold, convert, average), built with the
//! language's real toolchain by the SDK's own `build-examples.sh` and run
//! through the real engine with `sluice rules test`: each must print exactly
//! the outputs in `rules/examples/NAME/expected.jsonl`.
//!
//! A missing toolchain fails the test with what to install; `.ci/run`
//! installs all of them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const EXAMPLES: [&str; 3] = ["threshold", "convert", "average"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn build(sdk: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let script = repo().join("rules/sdk").join(sdk).join("build-examples.sh");
    let result = Command::new("bash")
        .arg(&script)
        .arg(out.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        result.status.success(),
        "building the {sdk} examples failed (is its toolchain installed? see rules/README.md):\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    out
}

fn run_example(module: &Path, example: &str) -> Vec<Value> {
    let fixtures = repo().join("rules/examples").join(example);
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["rules", "test"])
        .arg(module)
        .arg("--input")
        .arg(fixtures.join("input.jsonl"))
        .args(["--topic", "devices/+/telemetry"]);
    if let Ok(config) = std::fs::read_to_string(fixtures.join("config.json")) {
        command.args(["--config", config.trim()]);
    }
    let out = command.output().unwrap();
    // Each fixture fails one message on purpose, so the status is 1.
    assert_eq!(out.status.code(), Some(1), "{example}: {out:?}");
    lines(&String::from_utf8(out.stdout).unwrap())
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Equal, with numbers within 1e-9 relative and payloads compared as JSON
/// (languages print the same number differently).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::String(x), Value::String(y)) => {
            x == y
                || matches!(
                    (serde_json::from_str::<Value>(x), serde_json::from_str::<Value>(y)),
                    (Ok(px), Ok(py)) if (px.is_object() || px.is_array()) && same(&px, &py)
                )
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

fn check_sdk(sdk: &str) {
    let built = build(sdk);
    for example in EXAMPLES {
        let module = built.path().join(format!("{example}.wasm"));
        assert!(module.is_file(), "{sdk} built no {example}.wasm");
        let got = run_example(&module, example);
        let want = lines(
            &std::fs::read_to_string(
                repo()
                    .join("rules/examples")
                    .join(example)
                    .join("expected.jsonl"),
            )
            .unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{sdk}/{example}: {got:#?}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                same(g, w),
                "{sdk}/{example} line {}:\n got  {g}\n want {w}",
                i + 1
            );
        }
    }
}

#[test]
fn c_examples() {
    check_sdk("c");
}

#[test]
fn assemblyscript_examples() {
    check_sdk("assemblyscript");
}

#[test]
fn rust_examples() {
    check_sdk("rust");
}

#[test]
fn zig_examples() {
    check_sdk("zig");
}

#[test]
fn the_comparison_is_strict_where_it_matters() {
    let a: Value = serde_json::json!({"kind": "point", "value": 1.0});
    assert!(same(
        &a,
        &serde_json::json!({"kind": "point", "value": 1.0000000001})
    ));
    assert!(!same(
        &a,
        &serde_json::json!({"kind": "point", "value": 1.001})
    ));
    assert!(!same(
        &a,
        &serde_json::json!({"kind": "event", "value": 1.0})
    ));
    assert!(same(
        &serde_json::json!({"payload": "{\"v\":30}"}),
        &serde_json::json!({"payload": "{\"v\":30.0}"})
    ));
    assert!(!same(
        &serde_json::json!({"payload": "{\"v\":30}"}),
        &serde_json::json!({"payload": "{\"v\":31}"})
    ));
}
