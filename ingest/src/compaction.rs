//! Compaction of closed points partitions: rows sorted by series, the btree
//! replaced by a BRIN index.
//!
//! While a partition takes live data its rows arrive interleaved across
//! series, and finding one series' rows needs the btree on
//! `(series_id, time)`: 42 bytes per point beside a 52-byte row
//! (BENCHMARKS.md, "Bytes per point at 10 million points"). Once the
//! partition's time range is `compact_after_hours` in the past it rarely
//! changes, so Sluice rewrites
//! it in `(series_id, time)` order (`CLUSTER`) and swaps the btree for a
//! BRIN index on the same columns. With sorted rows a BRIN range covers one
//! or two series, so lookups stay selective, and the index costs a few
//! hundred kilobytes instead of 45% of the partition.
//!
//! Late rows still land in a compacted partition (appended unsorted; BRIN
//! summarizes them, `autosummarize`), so the never-fail-an-insert invariant
//! holds. `CLUSTER` holds an exclusive lock on that one partition while it
//! runs: queries of it and late inserts into it wait; other partitions are
//! untouched. It runs from the maintenance task, one partition at a time.

use chrono::{DateTime, Duration, Utc};
use sqlx::{Acquire, PgPool};
use std::time::Instant;
use tracing::info;

use crate::partitions::{Table, existing};

/// Points partitions whose range ended before `closed_before` and that still
/// have no BRIN index, newest first.
pub async fn candidates(
    pool: &PgPool,
    closed_before: DateTime<Utc>,
) -> Result<Vec<String>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let compacted: Vec<String> = sqlx::query_scalar(
        "SELECT t.relname::text FROM pg_index x \
         JOIN pg_class i ON i.oid = x.indexrelid \
         JOIN pg_am am ON am.oid = i.relam \
         JOIN pg_class t ON t.oid = x.indrelid \
         JOIN pg_inherits h ON h.inhrelid = t.oid \
         WHERE h.inhparent = 'points'::regclass AND am.amname = 'brin'",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out: Vec<String> = existing(&mut conn, Table::Points)
        .await?
        .into_iter()
        .filter(|(name, _, upper)| *upper <= closed_before && !compacted.contains(name))
        .map(|(name, _, _)| name)
        .collect();
    out.reverse();
    Ok(out)
}

/// Compacts one partition (named as in the catalog) in one transaction.
pub async fn compact(pool: &PgPool, partition: &str) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let quoted = partition.replace('"', "\"\"");
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Names come from the catalog and are quoted as identifiers; DDL takes
    // no bind parameters. Locked first, then checked, so two upkeep runs
    // (the server's and `sluice storage maintain`) never both compact it.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE \"{quoted}\" IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *tx)
    .await?;
    let done: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
         JOIN pg_am am ON am.oid = i.relam \
         WHERE x.indrelid = $1::regclass AND am.amname = 'brin')",
    )
    .bind(format!("\"{quoted}\""))
    .fetch_one(&mut *tx)
    .await?;
    if done {
        return Ok(());
    }
    let statements = [
        format!(
            "CREATE INDEX IF NOT EXISTS \"{quoted}_series_time\" ON \"{quoted}\" (series_id, time)"
        ),
        format!("CLUSTER \"{quoted}\" USING \"{quoted}_series_time\""),
        format!(
            "CREATE INDEX \"{quoted}_brin\" ON \"{quoted}\" USING brin (series_id, time) \
             WITH (pages_per_range = 16, autosummarize = on)"
        ),
        format!("DROP INDEX \"{quoted}_series_time\""),
    ];
    for ddl in statements {
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{quoted}\"")))
        .execute(&mut *conn)
        .await?;
    metrics::counter!("sluice_partitions_compacted_total").increment(1);
    info!(
        partition,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "points partition compacted"
    );
    Ok(())
}

/// Compacts every partition closed at least `after_hours` before `now`;
/// returns their names.
pub async fn compact_closed(
    pool: &PgPool,
    now: DateTime<Utc>,
    after_hours: u32,
) -> Result<Vec<String>, sqlx::Error> {
    let mut done = Vec::new();
    for name in candidates(pool, now - Duration::hours(i64::from(after_hours))).await? {
        compact(pool, &name).await?;
        done.push(name);
    }
    Ok(done)
}

/// Below this correlation between `series_latest`'s physical row order and
/// its `(device_id, metric)` order, [`reorder_latest`] rewrites the table.
const LATEST_MIN_CORRELATION: f32 = 0.9;

/// Keeps `series_latest` stored in `(device_id, metric)` order, the order
/// LatestPoints reads it in.
///
/// Read in index order from a table stored in series-creation order, a
/// 10,000-series LatestPoints page visits a scattered page per row: 6.5 ms
/// of PostgreSQL time instead of 3.4 ms once the table is in order (and the
/// whole call 22 ms instead of 16; BENCHMARKS.md, "Query API"). The order
/// lasts: the writer's updates are heap-only within their page (the table's
/// fillfactor leaves room), so only new series land out of place. When
/// they have pulled the planner's correlation statistic below 0.9, this
/// rewrites the table (`CLUSTER`). That holds an exclusive lock on it while
/// it runs, which holds up writer transactions for as long: about 20 ms per
/// 10,000 series. `analyze` first refreshes the statistic (for one-off runs;
/// the maintenance task relies on autovacuum's). Returns whether it
/// rewrote the table.
pub async fn reorder_latest(pool: &PgPool, analyze: bool) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    if analyze {
        sqlx::query("ANALYZE series_latest")
            .execute(&mut *conn)
            .await?;
    }
    let correlation: Option<f32> = sqlx::query_scalar(
        "SELECT correlation FROM pg_stats \
         WHERE schemaname = current_schema() AND tablename = 'series_latest' \
           AND attname = 'device_id'",
    )
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    let Some(correlation) = correlation.filter(|&c| c < LATEST_MIN_CORRELATION) else {
        return Ok(false); // in order, or not analyzed yet (small or new)
    };
    let started = Instant::now();
    sqlx::query("CLUSTER series_latest USING series_latest_by_name")
        .execute(&mut *conn)
        .await?;
    // Fresh statistics, or the next round would rewrite it again.
    sqlx::query("ANALYZE series_latest")
        .execute(&mut *conn)
        .await?;
    metrics::counter!("sluice_latest_reordered_total").increment(1);
    info!(
        correlation,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "series_latest rewritten in (device_id, metric) order"
    );
    Ok(true)
}
