//! The writer on a real PostgreSQL: rollups equal a recomputation after
//! out-of-order writes, refused rows go to the dead letters alone,
//! compaction keeps every row, and a replay over writer shards that
//! stopped at different marks stores nothing twice.

use chrono::{DateTime, Duration, TimeZone, Utc};
use sluice_ingest::managed::ManagedPostgres;
use sluice_ingest::{PointRecord, Record, WriterConfig, shard_of, spawn_writer, start_writer};
use sqlx::PgPool;
use std::sync::Arc;

fn point(device: &str, metric: &str, time: DateTime<Utc>, value: f64) -> Record {
    Record::Point(PointRecord {
        device_id: Arc::from(device),
        metric: metric.into(),
        time,
        value,
    })
}

struct Db {
    _dir: tempfile::TempDir,
    pg: ManagedPostgres,
    pool: PgPool,
}

async fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let pool = sluice_ingest::connect(&pg.database_url(), 8).await.unwrap();
    Db {
        _dir: dir,
        pg,
        pool,
    }
}

impl Db {
    async fn stop(self) {
        self.pool.close().await;
        self.pg.stop().await.unwrap();
    }
}

/// Writes each group of records as one send, and waits until all are stored.
async fn write(pool: &PgPool, config: WriterConfig, sends: Vec<Vec<Record>>) {
    let (sink, writer) = spawn_writer(pool.clone(), config, None);
    tokio::task::spawn_blocking(move || {
        for records in sends {
            sink.blocking_send(records).unwrap();
        }
    })
    .await
    .unwrap();
    writer.await.unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

type RollupRow = (
    i32,
    DateTime<Utc>,
    i64,
    f64,
    f64,
    f64,
    DateTime<Utc>,
    f64,
    DateTime<Utc>,
    f64,
);

/// The rollup table as stored, and as recomputed from the raw points.
async fn stored_and_recomputed(
    pool: &PgPool,
    table: &str,
    width: &str,
) -> (Vec<RollupRow>, Vec<RollupRow>) {
    let columns = "series_id, bucket, count, sum, min, max, first_time, first, last_time, last";
    let stored = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {columns} FROM {table} ORDER BY series_id, bucket"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    let recomputed = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT series_id, date_bin('{width}', time, timestamptz '1970-01-01 00:00:00+00') AS b, \
                count(*), sum(value), min(value), max(value), \
                min(time), (array_agg(value ORDER BY time, value))[1], \
                max(time), (array_agg(value ORDER BY time DESC, value DESC))[1] \
         FROM points GROUP BY 1, 2 ORDER BY 1, 2"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    (stored, recomputed)
}

#[tokio::test]
async fn rollups_equal_a_recomputation_after_out_of_order_writes() {
    let db = db().await;
    let base = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap();
    // 3 devices × 2 metrics, samples every 7 s over 3 hours, in a shuffled
    // order, sent in many small batches, some hours late, with equal times
    // (ordered by value), and values that sum exactly (multiples of 0.25).
    let mut samples = Vec::new();
    for d in 0..3 {
        for m in ["t", "h"] {
            for k in 0..(3 * 3600 / 7) {
                let time = base + Duration::seconds(7 * k);
                let value = ((k * 37 + d * 11) % 400) as f64 * 0.25 - 20.0;
                samples.push(point(&format!("dev{d}"), m, time, value));
                if k % 97 == 0 {
                    samples.push(point(&format!("dev{d}"), m, time, value + 1.0));
                }
            }
        }
    }
    // A deterministic shuffle: a stride walk through the samples.
    let n = samples.len();
    let stride = 7919; // prime, not a divisor of n
    assert_ne!(n % stride, 0);
    let shuffled: Vec<Record> = (0..n).map(|i| samples[(i * stride) % n].clone()).collect();
    let sends: Vec<Vec<Record>> = shuffled.chunks(250).map(|c| c.to_vec()).collect();
    let config = WriterConfig {
        batch_rows: 1000,
        ..Default::default()
    };
    write(&db.pool, config, sends).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM points").await as usize,
        n
    );

    for (table, width) in [("rollup_1m", "1 minute"), ("rollup_1h", "1 hour")] {
        let (stored, recomputed) = stored_and_recomputed(&db.pool, table, width).await;
        assert!(!stored.is_empty());
        assert_eq!(stored.len(), recomputed.len(), "{table}: bucket count");
        for (s, r) in stored.iter().zip(&recomputed) {
            assert_eq!(s, r, "{table}");
        }
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM rollup_1h").await,
        6 * 3
    );
    db.stop().await;
}

#[tokio::test]
async fn a_refused_row_goes_to_the_dead_letters_alone() {
    let db = db().await;
    // An operator's constraint the writer knows nothing about.
    sqlx::query("ALTER TABLE points ADD CONSTRAINT no_666 CHECK (value <> 666)")
        .execute(&db.pool)
        .await
        .unwrap();
    let t0 = Utc::now() - Duration::minutes(5);
    let mut records: Vec<Record> = (0..5000)
        .map(|i| point("d1", "v", t0 + Duration::milliseconds(i), i as f64 + 0.5))
        .collect();
    records[1234] = point("d1", "v", t0 + Duration::milliseconds(1234), 666.0);
    records[4321] = point("d2", "v", t0, 666.0);
    // A rollup sum out of float8's range: refused when merged with the
    // first, which a previous batch stored.
    let big = vec![point("d3", "v", t0, 1e308)];
    records.push(point("d3", "v", t0 + Duration::seconds(1), 1e308));
    write(&db.pool, WriterConfig::default(), vec![big]).await;
    write(&db.pool, WriterConfig::default(), vec![records]).await;

    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM points").await,
        1 + 5000 - 2,
        "everything but the three refused rows"
    );
    let dead: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT device_id, reason, convert_from(payload, 'UTF8') FROM dead_letters ORDER BY device_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert_eq!(dead[0].0, "d1");
    assert!(dead[0].1.contains("no_666"), "{dead:?}");
    assert!(dead[0].2.contains("666"), "{dead:?}");
    assert_eq!(dead[1].0, "d2");
    assert_eq!(dead[2].0, "d3");
    assert!(dead[2].1.contains("out of range"), "{dead:?}");
    // The rollups hold exactly the stored points.
    let (stored, recomputed) = stored_and_recomputed(&db.pool, "rollup_1m", "1 minute").await;
    assert_eq!(stored, recomputed);
    db.stop().await;
}

#[tokio::test]
async fn compaction_sorts_a_closed_partition_and_swaps_its_index_for_brin() {
    let db = db().await;
    let day = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
    let records: Vec<Record> = (0..20_000)
        .map(|i| {
            point(
                &format!("dev{}", i % 50),
                "v",
                day + Duration::seconds(i / 50 * 4),
                i as f64,
            )
        })
        .collect();
    // Compaction by hand here, not by the writer's maintenance.
    let config = || {
        let mut c = WriterConfig::default();
        c.partitions.compact_after_hours = 0;
        c
    };
    write(&db.pool, config(), vec![records]).await;
    let size = "SELECT pg_total_relation_size('points_p20260201_0000')";
    let before = count(&db.pool, size).await;

    let done = sluice_ingest::compaction::compact_closed(&db.pool, Utc::now(), 2)
        .await
        .unwrap();
    assert!(
        done.contains(&"points_p20260201_0000".to_string()),
        "{done:?}"
    );
    let after = count(&db.pool, size).await;
    assert!(after < before, "{after} bytes after, {before} before");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'points_p20260201_0000'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(indexes.len(), 1, "{indexes:?}");
    assert!(indexes[0].contains("USING brin"), "{indexes:?}");
    // Rows in (series, time) order now, none lost, and late rows still land.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM points_p20260201_0000").await,
        20_000
    );
    let out_of_order = count(
        &db.pool,
        "SELECT count(*) FROM (SELECT (series_id, time) < lag((series_id, time)) OVER (ORDER BY ctid) AS back \
         FROM points_p20260201_0000) x WHERE back",
    )
    .await;
    assert_eq!(out_of_order, 0);
    write(
        &db.pool,
        config(),
        vec![vec![point("dev0", "v", day + Duration::hours(23), -1.0)]],
    )
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM points_named WHERE device_id = 'dev0' AND time >= '2026-02-01' AND time < '2026-02-02'"
        )
        .await,
        401
    );
    // Nothing left to compact; the open partitions are not touched.
    assert!(
        sluice_ingest::compaction::compact_closed(&db.pool, Utc::now(), 2)
            .await
            .unwrap()
            .is_empty()
    );
    db.stop().await;
}

#[tokio::test]
async fn a_replay_over_shards_at_different_marks_stores_nothing_twice() {
    let db = db().await;
    // Two devices on different shards of two.
    let devices: Vec<String> = (0..50).map(|i| format!("dev{i}")).collect();
    let on = |shard: usize| {
        devices
            .iter()
            .find(|d| shard_of(Some(d), 2) == shard)
            .unwrap()
            .clone()
    };
    let (a, b) = (on(0), on(1));
    // As a crash leaves it: shard 0 committed up to message 10, shard 1 up to 20.
    sqlx::query(
        "INSERT INTO ingest_progress (spool_id, shard, shards, stored_seq) \
         VALUES ('spool', 0, 2, 10), ('spool', 1, 2, 20)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let t0 = Utc::now() - Duration::minutes(1);
    let config = WriterConfig {
        writers: 4, // configured now; the open window keeps the old two
        ..Default::default()
    };
    let writer = start_writer(db.pool.clone(), config, None, "spool")
        .await
        .unwrap();
    assert_eq!(writer.stored.marks, vec![10, 20]);
    assert_eq!(writer.stored.stored_everywhere(), 10);
    let sink = writer.sink;
    // The replay: messages 11..=25, one per send, each with a point of a and of b.
    tokio::task::spawn_blocking(move || {
        for seq in 11..=25u64 {
            let time = t0 + Duration::seconds(seq as i64);
            let records = vec![
                point(&a, "seq", time, seq as f64),
                point(&b, "seq", time, seq as f64),
            ];
            sink.blocking_send_marked(records, seq).unwrap();
        }
    })
    .await
    .unwrap();
    writer.handle.await.unwrap();
    let stored: Vec<(String, i64)> =
        sqlx::query_as("SELECT device_id, count(*) FROM points_named GROUP BY 1 ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let by = |d: &str| stored.iter().find(|r| r.0 == d).map_or(0, |r| r.1);
    assert_eq!(by(&on(0)), 15, "shard 0 stores 11..=25: {stored:?}");
    assert_eq!(by(&on(1)), 5, "shard 1 already held up to 20: {stored:?}");
    // Both shards end at the last mark, so the next start opens no window
    // and takes the configured count.
    let marks: Vec<(i32, i64, i32)> =
        sqlx::query_as("SELECT shard, stored_seq, shards FROM ingest_progress ORDER BY shard")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(marks, vec![(0, 25, 2), (1, 25, 2)]);
    let writer = start_writer(
        db.pool.clone(),
        WriterConfig {
            writers: 4,
            ..Default::default()
        },
        None,
        "spool",
    )
    .await
    .unwrap();
    drop(writer.sink);
    writer.handle.await.unwrap();
    let marks: Vec<(i32, i64, i32)> =
        sqlx::query_as("SELECT shard, stored_seq, shards FROM ingest_progress ORDER BY shard")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(marks, (0..4).map(|s| (s, 25, 4)).collect::<Vec<_>>());
    db.stop().await;
}

#[tokio::test]
async fn series_latest_is_rewritten_in_name_order_once_scattered() {
    let db = db().await;
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("dev-{i:03}")).collect();
    let sends = vec![
        names.iter().map(|d| point(d, "t", t0, 1.0)).collect(),
        names
            .iter()
            .enumerate()
            .map(|(i, d)| point(d, "t", t0 + Duration::seconds(1), i as f64))
            .collect(),
    ];
    write(&db.pool, WriterConfig::default(), sends).await;
    // Rows stored against the order LatestPoints reads them in, as when
    // series arrive in no particular order (the writer's own order is
    // whatever its batches were).
    for sql in [
        "CREATE TEMP TABLE reversed AS SELECT * FROM series_latest ORDER BY device_id DESC",
        "DELETE FROM series_latest",
        "INSERT INTO series_latest SELECT * FROM reversed ORDER BY device_id DESC",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    let in_storage_order = |pool: PgPool| async move {
        sqlx::query_as::<_, (String, String, f64)>(
            "SELECT device_id, metric, value FROM series_latest ORDER BY ctid",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = in_storage_order(db.pool.clone()).await;
    assert_eq!(before.len(), 300);
    assert_eq!(before[0].0, "dev-299", "rows start out in reverse order");
    // The copied names are the series' own.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM series_latest l JOIN series s ON s.id = l.series_id \
             WHERE (s.device_id, s.metric) = (l.device_id, l.metric)"
        )
        .await,
        300
    );

    assert!(
        sluice_ingest::compaction::reorder_latest(&db.pool, true)
            .await
            .unwrap()
    );
    let after = in_storage_order(db.pool.clone()).await;
    let mut expected = before.clone();
    expected.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        after, expected,
        "same rows, now in (device_id, metric) order"
    );
    assert!(
        !sluice_ingest::compaction::reorder_latest(&db.pool, true)
            .await
            .unwrap(),
        "an ordered table is left alone"
    );
    drop(conn);
    db.stop().await;
}

#[tokio::test]
async fn the_null_sink_reports_every_mark_and_stores_nothing() {
    let db = db().await;
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&marks);
    let config = WriterConfig {
        discard: true,
        ..Default::default()
    };
    let on_stored: sluice_ingest::OnStored = Box::new(move |m| seen.lock().unwrap().push(m));
    let (sink, writer) = spawn_writer(db.pool.clone(), config, Some(on_stored));
    let t0 = Utc::now();
    tokio::task::spawn_blocking(move || {
        for seq in 1..=20u64 {
            let time = t0 + Duration::milliseconds(seq as i64);
            let records = (0..10)
                .map(|d| point(&format!("dev{d}"), "seq", time, seq as f64))
                .collect();
            sink.blocking_send_marked(records, seq).unwrap();
        }
    })
    .await
    .unwrap();
    writer.await.unwrap();
    let marks = marks.lock().unwrap().clone();
    assert_eq!(marks.last(), Some(&20), "every mark is reported: {marks:?}");
    assert!(marks.windows(2).all(|w| w[0] < w[1]), "{marks:?}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM points").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM series").await, 0);
    db.stop().await;
}
