//! Per-device rule state on a running server: kept per (rule, device),
//! bounded, and persisted with the batches, so it survives a restart.

mod guests;
mod support;

use std::time::Duration;
use support::{Sluice, publish, write_wat};

const WAIT: Duration = Duration::from_secs(30);

async fn counts(sluice: &Sluice, device: &str) -> Vec<f64> {
    let mut v: Vec<f64> = sluice
        .all_points(device)
        .await
        .into_iter()
        .filter(|p| p.metric == "count")
        .map(|p| p.value)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_per_device_bounded_and_survives_a_restart() {
    let mut sluice = Sluice::start(|dir| {
        write_wat(&dir.join("counter.wasm"), &guests::counter());
        std::fs::write(
            dir.join("counter.toml"),
            "topic = \"devices/+/counted\"\n[limits]\nstate_bytes = 512\n",
        )
        .unwrap();
    })
    .await;
    let client = sluice.mqtt("publisher-state").await;
    for _ in 0..3 {
        publish(&client, "devices/a/counted", "x").await;
    }
    publish(&client, "devices/b/counted", "x").await;
    sluice
        .eventually("counts 1..3 for a and 1 for b", WAIT, || async {
            let (a, b) = (counts(&sluice, "a").await, counts(&sluice, "b").await);
            (a == [1.0, 2.0, 3.0] && b == [1.0]).then_some(())
        })
        .await;

    // The state persisted with the batches is read back at start.
    sluice.terminate();
    sluice.restart().await;
    let client = sluice.mqtt("publisher-state-2").await;
    publish(&client, "devices/a/counted", "x").await;
    sluice
        .eventually("count 4 for a after the restart", WAIT, || async {
            (counts(&sluice, "a").await == [1.0, 2.0, 3.0, 4.0]).then_some(())
        })
        .await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT rule, device_id, key FROM rule_state ORDER BY device_id")
            .fetch_all(&sluice.db)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("counter".into(), "a".into(), "n".into()),
            ("counter".into(), "b".into(), "n".into())
        ]
    );

    // 1 KiB under `big` is past this rule's 512-byte state limit: the message
    // goes to the dead letters naming the limit, and its state changes are
    // not kept (the count of b does not move).
    publish(&client, "devices/b/counted", "big").await;
    let letters = sluice
        .eventually("the state-limit dead letter", WAIT, || async {
            let d = sluice.dead_letters().await;
            (!d.is_empty()).then_some(d)
        })
        .await;
    assert!(
        letters[0].reason.contains("state limit exceeded"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].rule.as_deref(), Some("counter"));
    publish(&client, "devices/b/counted", "x").await;
    sluice
        .eventually("b counts on from its state", WAIT, || async {
            (counts(&sluice, "b").await == [1.0, 2.0]).then_some(())
        })
        .await;
    sluice.stop();
}
