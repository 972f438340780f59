//! Time partitions on a real PostgreSQL: the writer creates them for any
//! row's time (late, old, future), rows land in them, and retention drops
//! whole partitions.

use chrono::{DateTime, Duration, TimeZone, Utc};
use sluice_ingest::managed::ManagedPostgres;
use sluice_ingest::partitions::{PartitionConfig, Partitions, Table, existing};
use sluice_ingest::{EventRecord, PointRecord, Record, WriterConfig, spawn_writer};
use std::sync::Arc;

fn point(device: &str, time: DateTime<Utc>, value: f64) -> Record {
    Record::Point(PointRecord {
        device_id: Arc::from(device),
        metric: "t".into(),
        time,
        value,
    })
}

fn event(time: DateTime<Utc>) -> Record {
    Record::Event(EventRecord {
        device_id: Some(Arc::from("d")),
        topic: "devices/d/e".into(),
        time,
        rule: None,
        payload: b"{}".to_vec(),
    })
}

async fn partition_names(pool: &sqlx::PgPool, table: Table) -> Vec<String> {
    let mut conn = pool.acquire().await.unwrap();
    existing(&mut conn, table)
        .await
        .unwrap()
        .into_iter()
        .map(|(name, _, _)| name)
        .collect()
}

#[tokio::test]
async fn partitions_are_made_for_any_time_and_dropped_by_retention() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let pool = sluice_ingest::connect(&pg.database_url(), 4).await.unwrap();

    // Late data (years old), old data, now, and an hour ahead: all stored.
    let now = Utc::now();
    let times = [
        Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap(),
        now - Duration::days(45),
        now,
        now + Duration::hours(1),
    ];
    let (sink, writer) = spawn_writer(pool.clone(), WriterConfig::default(), None);
    let mut records: Vec<Record> = times.iter().map(|&t| point("dev", t, 1.0)).collect();
    records.extend(times.iter().map(|&t| event(t)));
    tokio::task::spawn_blocking(move || sink.blocking_send(records).unwrap())
        .await
        .unwrap();
    writer.await.unwrap();

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 4);
    let in_1999: i64 = sqlx::query_scalar("SELECT count(*) FROM points_p19991231_0000")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(in_1999, 1, "the 1999 row is in its day's partition");
    for table in [Table::Points, Table::Events] {
        let names = partition_names(&pool, table).await;
        assert!(names.len() >= 3, "{table:?}: {names:?}");
        assert!(
            names.contains(&format!("{}_p19991231_0000", table.name())),
            "{names:?}"
        );
    }

    // Retention of 30 days for points: partitions entirely older go, the
    // rest (and all events, with no retention) stay; ahead-of-time
    // partitions exist for the next days.
    let mut partitions = Partitions::new(PartitionConfig {
        points_retention_days: 30,
        ..Default::default()
    });
    let dropped = partitions.maintain(&pool, now).await.unwrap();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped.iter().all(|n| n.starts_with("points_p")),
        "{dropped:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 2, "the rows of dropped partitions are gone with them");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 4);
    let day = |t: DateTime<Utc>| format!("points_p{}", t.format("%Y%m%d_0000"));
    let names = partition_names(&pool, Table::Points).await;
    for ahead in 1..=2 {
        assert!(
            names.contains(&day(now + Duration::days(ahead))),
            "{ahead} days ahead: {names:?}"
        );
    }
    assert!(!names.contains(&day(now - Duration::days(45))), "{names:?}");

    // A second maintenance changes nothing.
    assert!(partitions.maintain(&pool, now).await.unwrap().is_empty());
    pool.close().await;
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn a_new_interval_never_overlaps_existing_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let pool = sluice_ingest::connect(&pg.database_url(), 4).await.unwrap();
    let day = Utc.with_ymd_and_hms(2026, 1, 10, 0, 0, 0).unwrap();

    // Daily partitions first, then hourly: the hourly ones fill the gaps
    // and clip to the daily ones.
    let mut daily = Partitions::new(PartitionConfig::default());
    let mut conn = pool.acquire().await.unwrap();
    daily
        .ensure(
            &mut conn,
            Table::Points,
            [day + Duration::hours(5)].into_iter(),
        )
        .await
        .unwrap();
    let mut hourly = Partitions::new(PartitionConfig {
        interval_hours: 1,
        ..Default::default()
    });
    let times = [
        day + Duration::hours(7),
        day + Duration::days(1) + Duration::minutes(30),
        day - Duration::minutes(1),
    ];
    hourly
        .ensure(&mut conn, Table::Points, times.into_iter())
        .await
        .unwrap();
    drop(conn);
    let names = partition_names(&pool, Table::Points).await;
    assert_eq!(
        names,
        [
            "points_p20260109_2300",
            "points_p20260110_0000",
            "points_p20260111_0000"
        ],
        "the 07:00 row fits the daily partition; the others get hourly ones"
    );
    pool.close().await;
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn the_partitioning_migration_keeps_existing_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let options: sqlx::postgres::PgConnectOptions = pg.database_url().parse().unwrap();
    let pool = sqlx::PgPool::connect_with(options).await.unwrap();

    // The schema as it was before partitioning, with data in it.
    let mut before = sqlx::migrate::Migrator::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations"),
    )
    .await
    .unwrap();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 4)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pool).await.unwrap();
    sqlx::query("INSERT INTO series (device_id, metric) VALUES ('d', 't')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO points (series_id, time, value) VALUES \
         (1, '2026-01-01T10:00:00Z', 1), (1, '2026-01-02T10:00:00Z', 2), (1, '2026-01-02T11:00:00Z', 3)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO events (time, device_id, topic, payload) VALUES \
         ('2026-01-01T10:00:00Z', 'd', 'x', '\\x7b7d'), ('2026-01-03T10:00:00Z', 'd', 'x', '\\x7b7d')",
    )
    .execute(&pool)
    .await
    .unwrap();

    sluice_ingest::MIGRATOR.run(&pool).await.unwrap();

    let points: Vec<(f64,)> = sqlx::query_as("SELECT value FROM points_named ORDER BY time")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(points, [(1.0,), (2.0,), (3.0,)]);
    assert_eq!(
        partition_names(&pool, Table::Points).await,
        ["points_p20260101_0000", "points_p20260102_0000"]
    );
    assert_eq!(
        partition_names(&pool, Table::Events).await,
        ["events_p20260101_0000", "events_p20260103_0000"]
    );
    // Event ids go on from where they were.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (time, device_id, topic, payload) \
         VALUES ('2026-01-03T11:00:00Z', 'd', 'x', '\\x7b7d') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(id, 3);
    pool.close().await;
    pg.stop().await.unwrap();
}
