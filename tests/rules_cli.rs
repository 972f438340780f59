//! `sluice rules test`: a module run locally through the real engine on a
//! JSON Lines file, no server, no database.

mod guests;

use std::process::Command;

fn rules_test(dir: &std::path::Path, wat: &str, input: &str) -> std::process::Output {
    std::fs::write(dir.join("rule.wasm"), wat::parse_str(wat).unwrap()).unwrap();
    std::fs::write(dir.join("in.jsonl"), input).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["rules", "test"])
        .arg(dir.join("rule.wasm"))
        .arg("--input")
        .arg(dir.join("in.jsonl"))
        .args(["--topic", "devices/+/telemetry"])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn prints_every_output_and_fails_on_guest_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = concat!(
        r#"{"topic": "devices/d1/telemetry", "payload": {"t": 1}}"#,
        "\n",
        r#"{"topic": "devices/d2/telemetry", "payload": "x"}"#,
        "\n",
        r#"{"topic": "other/topic", "payload": "skipped: the filter does not match"}"#,
        "\n"
    );
    let ok = rules_test(dir.path(), &guests::chaos(), input);
    assert!(ok.status.success(), "{ok:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(ok.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, device) in lines.iter().zip(["d1", "d2"]) {
        assert_eq!(line["kind"], "event");
        assert_eq!(line["device_id"], device);
        assert_eq!(line["payload"], r#"{"ok":true}"#);
    }

    // A payload starting with `t` makes the guest trap: that message is
    // reported as failed, with the reason, and the exit status says so.
    let failing = concat!(
        r#"{"topic": "devices/d1/telemetry", "payload": "fine"}"#,
        "\n",
        r#"{"topic": "devices/d1/telemetry", "payload": "trap"}"#,
        "\n"
    );
    let bad = rules_test(dir.path(), &guests::chaos(), failing);
    assert!(!bad.status.success(), "{bad:?}");
    let stdout = String::from_utf8(bad.stdout).unwrap();
    assert!(stdout.contains(r#""kind":"dead_letter""#), "{stdout}");
    assert!(stdout.contains(r#""kind":"event""#), "{stdout}");

    // Bad input is a clear error, not a panic.
    let garbage = rules_test(dir.path(), &guests::chaos(), "{not json}\n");
    assert!(!garbage.status.success());
    assert!(
        String::from_utf8_lossy(&garbage.stderr).contains("input line 1"),
        "{garbage:?}"
    );
}
