//! Storage on a running server: time partitions take late and old data,
//! and times the storage would not keep go to the dead letters with the
//! reason instead of creating partitions nobody keeps.

mod support;

use chrono::{Duration, Utc};
use std::time::Duration as StdDuration;
use support::{Options, Sluice, publish};

const WAIT: StdDuration = StdDuration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_outside_the_kept_range_go_to_dead_letters() {
    let sluice = Sluice::start_with(
        Options {
            config_toml: Some(
                "[ingest.partitions]\npoints_retention_days = 30\nmax_future_hours = 24\n".into(),
            ),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let client = sluice.mqtt("storage-bounds").await;
    let now = Utc::now();
    let at = |t: chrono::DateTime<Utc>| format!(r#"{{"t": 1, "ts": {}}}"#, t.timestamp_millis());
    // Kept: two days old (a partition made for it on the spot) and now.
    publish(
        &client,
        "devices/late/telemetry",
        at(now - Duration::days(2)),
    )
    .await;
    publish(&client, "devices/now/telemetry", at(now)).await;
    // Refused: older than retention, and three days ahead.
    publish(
        &client,
        "devices/old/telemetry",
        at(now - Duration::days(40)),
    )
    .await;
    publish(
        &client,
        "devices/ahead/telemetry",
        at(now + Duration::days(3)),
    )
    .await;

    let letters = sluice
        .eventually("two dead letters", WAIT, || async {
            let d = sluice.dead_letters().await;
            (d.len() >= 2).then_some(d)
        })
        .await;
    let reason_of = |device: &str| {
        letters
            .iter()
            .find(|l| l.device_id.as_deref() == Some(device))
            .map(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {device}: {letters:?}"))
    };
    assert!(
        reason_of("old").contains("older than the points' retention of 30 days"),
        "{}",
        reason_of("old")
    );
    assert!(
        reason_of("ahead").contains("more than 24 h in the future"),
        "{}",
        reason_of("ahead")
    );
    for device in ["late", "now"] {
        sluice
            .eventually(&format!("the point of {device}"), WAIT, || async {
                (sluice.all_points(device).await.len() == 1).then_some(())
            })
            .await;
    }
    let partitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'points'::regclass")
            .fetch_one(&sluice.db)
            .await
            .unwrap();
    // Two days ago, today, and the days created ahead.
    assert!(partitions >= 4, "{partitions}");
    sluice.stop();
}
