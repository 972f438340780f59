//! One shard's batch and how it reaches the database.
//!
//! The fast path writes the whole batch in one transaction: points by
//! binary COPY plus their rollups, events and dead letters by binary COPY,
//! rule state by upsert, and the shard's spool mark. If the database
//! refuses a *row* (a data or constraint error, e.g. a rollup sum out of
//! range or a check constraint an operator added), the batch is written
//! again in a transaction where each table's rows are tried under a
//! savepoint and split in halves until the refused rows stand alone; those
//! go to the dead letters with the database's reason, and the rest of the
//! batch commits. Any other error (connection lost, server shutting down,
//! disk full) fails the whole attempt, and the caller retries it.

use super::series::SeriesCache;
use crate::partitions::{PartitionConfig, Partitions, Table};
use crate::pgcopy::{BinaryCopyWriter, sanitize_text};
use crate::record::{DeadLetterRecord, EventRecord, PointRecord, Record, StateRecord};
use crate::rollup::{self, Resolution};
use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgConnection, PgPool};
use std::collections::HashMap;
use tokio::sync::Mutex;
use tracing::warn;

#[derive(Default)]
pub(super) struct Batch {
    pub points: Vec<PointRecord>,
    pub events: Vec<EventRecord>,
    pub dead_letters: Vec<DeadLetterRecord>,
    pub state: Vec<StateRecord>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.points.len() + self.events.len() + self.dead_letters.len() + self.state.len()
    }

    pub fn extend(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::Point(p) => self.points.push(p),
                Record::Event(e) => self.events.push(e),
                Record::DeadLetter(d) => self.dead_letters.push(d),
                Record::State(s) => self.state.push(s),
            }
        }
    }

    pub fn clear(&mut self) {
        self.points.clear();
        self.events.clear();
        self.dead_letters.clear();
        self.state.clear();
    }
}

/// What the batch's transaction records as the shard's progress.
#[derive(Clone, Copy)]
pub(super) struct Progress<'a> {
    pub spool_id: &'a str,
    pub shard: usize,
    pub shards: usize,
    pub mark: u64,
}

/// What a committed batch did; rows refused by the database went to the dead letters.
#[derive(Default)]
pub(super) struct Written {
    pub refused_points: usize,
    pub refused_events: usize,
}

pub(super) struct Context<'a> {
    pub pool: &'a PgPool,
    pub series: &'a mut SeriesCache,
    pub partitions: &'a Mutex<Partitions>,
    pub config: &'a PartitionConfig,
    pub rollups: bool,
}

pub(super) async fn write(
    cx: Context<'_>,
    batch: &Batch,
    progress: Option<Progress<'_>>,
) -> Result<Written, sqlx::Error> {
    let mut conn = cx.pool.acquire().await?;
    cx.series.resolve(&mut conn, &batch.points).await?;
    let rollups_from = rollups_from(cx.config, cx.rollups);
    {
        // Outside the data transaction: DDL there would hold its locks until commit.
        let mut partitions = cx.partitions.lock().await;
        let point_times = || batch.points.iter().map(|p| p.time);
        partitions
            .ensure(&mut conn, Table::Points, point_times())
            .await?;
        partitions
            .ensure(
                &mut conn,
                Table::Events,
                batch.events.iter().map(|e| e.time),
            )
            .await?;
        for (table, resolution) in ROLLUPS {
            let buckets = point_times()
                .filter(|&t| rollups_from[resolution as usize].is_none_or(|from| t >= from))
                .map(|t| resolution.bucket(t));
            partitions.ensure(&mut conn, table, buckets).await?;
        }
    }
    let series = &*cx.series;
    let fast = async {
        let mut tx = conn.begin().await?;
        write_points(&mut tx, series, &batch.points, &rollups_from).await?;
        write_events(&mut tx, &batch.events).await?;
        write_dead_letters(&mut tx, &batch.dead_letters).await?;
        finish(&mut tx, batch, progress).await?;
        tx.commit().await
    };
    match fast.await {
        Ok(()) => return Ok(Written::default()),
        Err(e) if is_row_error(&e) => {
            warn!(error = %e, rows = batch.rows(),
                "the database refused a row; finding it by halves, the rest of the batch is written");
        }
        Err(e) => return Err(e),
    }

    // Slow path: isolate the refused rows under savepoints.
    let mut tx = conn.begin().await?;
    let mut refused: Vec<DeadLetterRecord> = Vec::new();
    let mut written = Written::default();
    let points = PointRows {
        series,
        rollups_from: &rollups_from,
    };
    for (i, reason) in isolate(&mut tx, &batch.points, &points).await? {
        refused.push(point_dead_letter(&batch.points[i], &reason));
        written.refused_points += 1;
        metrics::counter!("sluice_rows_refused_total", "table" => "points").increment(1);
    }
    for (i, reason) in isolate(&mut tx, &batch.events, &EventRows).await? {
        let e = &batch.events[i];
        refused.push(DeadLetterRecord {
            device_id: e.device_id.clone(),
            topic: e.topic.clone(),
            received_at: e.time,
            rule: e.rule.clone(),
            reason: format!("event refused by the database: {reason}"),
            payload: e.payload.clone(),
        });
        written.refused_events += 1;
        metrics::counter!("sluice_rows_refused_total", "table" => "events").increment(1);
    }
    for (i, reason) in isolate(&mut tx, &batch.dead_letters, &DeadLetterRows).await? {
        // Nowhere left to keep it: counted and logged with everything it held.
        let d = &batch.dead_letters[i];
        metrics::counter!("sluice_rows_lost_total", "table" => "dead_letters").increment(1);
        tracing::error!(error = %reason, device = ?d.device_id, topic = %d.topic,
            reason = %d.reason, payload = ?String::from_utf8_lossy(&d.payload),
            "the database refused a dead letter; it is logged here and not stored");
    }
    for (i, reason) in isolate(&mut tx, &refused, &DeadLetterRows).await? {
        let d = &refused[i];
        metrics::counter!("sluice_rows_lost_total", "table" => "dead_letters").increment(1);
        tracing::error!(error = %reason, device = ?d.device_id, reason = %d.reason,
            payload = ?String::from_utf8_lossy(&d.payload),
            "the database refused the dead letter of a refused row; it is logged here and not stored");
    }
    finish(&mut tx, batch, progress).await?;
    tx.commit().await?;
    Ok(written)
}

const ROLLUPS: [(Table, Resolution); 2] = [
    (Table::Rollup1m, Resolution::Minute),
    (Table::Rollup1h, Resolution::Hour),
];

/// Per resolution, the oldest bucket time retention keeps (older points are
/// stored raw but not rolled up into a partition that would be dropped);
/// with rollups off, a time no point has.
fn rollups_from(config: &PartitionConfig, enabled: bool) -> [Option<DateTime<Utc>>; 2] {
    if !enabled {
        return [Some(DateTime::<Utc>::MAX_UTC); 2];
    }
    let now = Utc::now();
    ROLLUPS.map(|(table, resolution)| {
        config
            .oldest_allowed(table, now)
            .map(|t| resolution.bucket(t))
    })
}

/// State changes and the progress mark: the end of every batch's transaction.
async fn finish(
    tx: &mut PgConnection,
    batch: &Batch,
    progress: Option<Progress<'_>>,
) -> Result<(), sqlx::Error> {
    if !batch.state.is_empty() {
        write_state(tx, &batch.state).await?;
    }
    // Every message up to the mark has this shard's rows in this
    // transaction or an earlier one: recording the mark with them makes a
    // replay skip exactly what is stored.
    if let Some(p) = progress {
        super::progress::record(tx, p.spool_id, p.shard, p.shards, p.mark).await?;
    }
    Ok(())
}

/// Errors that belong to a row rather than to the connection or server.
pub(super) fn is_row_error(e: &sqlx::Error) -> bool {
    matches!(error_kind(e), "data")
}

/// The `kind` label of `sluice_write_errors_total`.
pub(super) fn error_kind(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            match code.as_deref().map(|c| c.get(..2).unwrap_or(c)) {
                // Data exceptions, constraint violations, raised by a
                // trigger, a value too large.
                Some("22" | "23" | "P0" | "54") => "data",
                Some("53") => "resources",
                Some("57") => "shutdown",
                Some("08") => "connection",
                Some("40") => "conflict",
                Some("42") => "schema",
                _ => "database",
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => "connection",
        _ => "other",
    }
}

/// Writes some rows of one table (what [`isolate`] splits).
trait WriteRows<T> {
    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [T],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;
}

struct PointRows<'a> {
    series: &'a SeriesCache,
    rollups_from: &'a [Option<DateTime<Utc>>; 2],
}

impl WriteRows<PointRecord> for PointRows<'_> {
    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [PointRecord],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
        write_points(conn, self.series, rows, self.rollups_from)
    }
}

struct EventRows;

impl WriteRows<EventRecord> for EventRows {
    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [EventRecord],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
        write_events(conn, rows)
    }
}

struct DeadLetterRows;

impl WriteRows<DeadLetterRecord> for DeadLetterRows {
    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [DeadLetterRecord],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
        write_dead_letters(conn, rows)
    }
}

/// Writes `rows` under savepoints, halving every part the database refuses
/// for a row error; returns the indices it refused alone, with the reason.
async fn isolate<T: Sync>(
    tx: &mut PgConnection,
    rows: &[T],
    write: &impl WriteRows<T>,
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut parts = vec![(0, rows.len())];
    while let Some((start, end)) = parts.pop() {
        if start == end {
            continue;
        }
        sqlx::query("SAVEPOINT sluice_isolate")
            .execute(&mut *tx)
            .await?;
        match write.write(tx, &rows[start..end]).await {
            Ok(()) => {}
            Err(e) if is_row_error(&e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT sluice_isolate")
                    .execute(&mut *tx)
                    .await?;
                if end - start == 1 {
                    refused.push((start, e.to_string()));
                } else {
                    let mid = start + (end - start) / 2;
                    parts.push((mid, end));
                    parts.push((start, mid));
                }
            }
            Err(e) => return Err(e),
        }
        sqlx::query("RELEASE SAVEPOINT sluice_isolate")
            .execute(&mut *tx)
            .await?;
    }
    Ok(refused)
}

fn point_dead_letter(p: &PointRecord, reason: &str) -> DeadLetterRecord {
    let payload = serde_json::json!({
        "metric": p.metric,
        "time": p.time.to_rfc3339(),
        "value": p.value,
    });
    DeadLetterRecord {
        device_id: Some(p.device_id.clone()),
        // A point no longer knows its message's topic.
        topic: String::new(),
        received_at: p.time,
        rule: None,
        reason: format!("point refused by the database: {reason}"),
        payload: payload.to_string().into_bytes(),
    }
}

async fn write_points(
    conn: &mut PgConnection,
    series: &SeriesCache,
    points: &[PointRecord],
    rollups_from: &[Option<DateTime<Utc>>; 2],
) -> Result<(), sqlx::Error> {
    if points.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(points.len());
    for p in points {
        let id = series.get(&p.device_id, &p.metric).ok_or_else(|| {
            sqlx::Error::Protocol(format!(
                "series ({}, {}) was not resolved",
                p.device_id, p.metric
            ))
        })?;
        ids.push(id);
    }
    // Rows go in sorted by (series, time), stable so equal times keep their
    // arrival order. In arrival order every row lands on another series'
    // btree leaf; sorted, consecutive rows extend the same leaf, which
    // PostgreSQL then also splits where the series grows instead of in half.
    // Measured: 1.4-1.8x the rows/s of binary COPY in arrival order
    // (BENCHMARKS.md, "Storage").
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (ids[i], points[i].time));
    let mut w = BinaryCopyWriter::new();
    for i in order {
        w.begin_row(3);
        w.int4(ids[i]);
        w.timestamptz(points[i].time);
        w.float8(points[i].value);
    }
    copy_in(
        conn,
        "COPY points (series_id, time, value) FROM STDIN (FORMAT binary)",
        w,
    )
    .await?;
    for (_, resolution) in ROLLUPS {
        let from = rollups_from[resolution as usize];
        let samples = ids
            .iter()
            .zip(points)
            .filter(|(_, p)| from.is_none_or(|from| p.time >= from))
            .map(|(&id, p)| (id, p.time, p.value));
        rollup::upsert(conn, resolution, &rollup::aggregate(resolution, samples)).await?;
    }
    upsert_latest(conn, &ids, points).await
}

/// Moves each series' latest point forward to the batch's last one, if that
/// is not older. Of equal times the later-arriving point wins, here as in a
/// replay of the same messages, so the result does not depend on batching.
async fn upsert_latest(
    conn: &mut PgConnection,
    ids: &[i32],
    points: &[PointRecord],
) -> Result<(), sqlx::Error> {
    let mut latest: foldhash::HashMap<i32, usize> = foldhash::HashMap::default();
    for (i, &id) in ids.iter().enumerate() {
        latest
            .entry(id)
            .and_modify(|j| {
                if points[i].time >= points[*j].time {
                    *j = i;
                }
            })
            .or_insert(i);
    }
    let n = latest.len();
    let (mut series, mut device, mut metric) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut time, mut value) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (id, i) in latest {
        series.push(id);
        device.push(&*points[i].device_id);
        metric.push(points[i].metric.as_str());
        time.push(points[i].time);
        value.push(points[i].value);
    }
    // The names are copied in for LatestPoints' ordered scan (migration
    // 0011); a series' names never change, so an update leaves them alone.
    sqlx::query(
        "INSERT INTO series_latest AS l (series_id, device_id, metric, time, value) \
         SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::timestamptz[], $5::float8[]) \
         ON CONFLICT (series_id) DO UPDATE SET time = EXCLUDED.time, value = EXCLUDED.value \
         WHERE EXCLUDED.time >= l.time",
    )
    .bind(series)
    .bind(device)
    .bind(metric)
    .bind(time)
    .bind(value)
    .execute(conn)
    .await?;
    Ok(())
}

async fn write_events(conn: &mut PgConnection, events: &[EventRecord]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut w = BinaryCopyWriter::new();
    for e in events {
        w.begin_row(5);
        w.timestamptz(e.time);
        w.opt_text(e.device_id.as_deref().map(sanitize_text).as_deref());
        w.text(&sanitize_text(&e.topic));
        w.opt_text(e.rule.as_deref().map(sanitize_text).as_deref());
        w.bytes(&e.payload);
    }
    copy_in(
        conn,
        "COPY events (time, device_id, topic, rule, payload) FROM STDIN (FORMAT binary)",
        w,
    )
    .await?;
    Ok(())
}

async fn write_dead_letters(
    conn: &mut PgConnection,
    dead_letters: &[DeadLetterRecord],
) -> Result<(), sqlx::Error> {
    if dead_letters.is_empty() {
        return Ok(());
    }
    let mut w = BinaryCopyWriter::new();
    for d in dead_letters {
        w.begin_row(6);
        w.timestamptz(d.received_at);
        w.opt_text(d.device_id.as_deref().map(sanitize_text).as_deref());
        w.text(&sanitize_text(&d.topic));
        w.opt_text(d.rule.as_deref().map(sanitize_text).as_deref());
        w.text(&sanitize_text(&d.reason));
        w.bytes(&d.payload);
    }
    copy_in(
        conn,
        "COPY dead_letters (received_at, device_id, topic, rule, reason, payload) \
         FROM STDIN (FORMAT binary)",
        w,
    )
    .await?;
    Ok(())
}

/// Applies state changes: the last change of each key wins, sets as one
/// upsert and deletes as one delete, whatever the batch size.
async fn write_state(conn: &mut PgConnection, changes: &[StateRecord]) -> Result<(), sqlx::Error> {
    let mut last = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        last.insert((&*c.rule, &*c.device_id, c.key.as_str()), i);
    }
    let (mut set, mut delete) = (StateColumns::default(), StateColumns::default());
    for ((rule, device, key), i) in last {
        let target = if changes[i].value.is_some() {
            &mut set
        } else {
            &mut delete
        };
        target.rules.push(sanitize_text(rule).into_owned());
        target.devices.push(sanitize_text(device).into_owned());
        target.keys.push(sanitize_text(key).into_owned());
        if let Some(v) = &changes[i].value {
            target.values.push(v.clone());
        }
    }
    if !set.rules.is_empty() {
        sqlx::query(
            "INSERT INTO rule_state (rule, device_id, key, value) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) \
             ON CONFLICT (rule, device_id, key) \
             DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        )
        .bind(&set.rules)
        .bind(&set.devices)
        .bind(&set.keys)
        .bind(&set.values)
        .execute(&mut *conn)
        .await?;
    }
    if !delete.rules.is_empty() {
        sqlx::query(
            "DELETE FROM rule_state WHERE (rule, device_id, key) IN \
             (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
        )
        .bind(&delete.rules)
        .bind(&delete.devices)
        .bind(&delete.keys)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Default)]
struct StateColumns {
    rules: Vec<String>,
    devices: Vec<String>,
    keys: Vec<String>,
    values: Vec<Vec<u8>>,
}

async fn copy_in(
    conn: &mut PgConnection,
    statement: &str,
    rows: BinaryCopyWriter,
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await
}
