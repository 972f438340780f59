//! The batching writer: the only code that inserts telemetry.
//!
//! Records arrive over a bounded channel in the order the pipeline produced
//! them. They are buffered until `batch_rows` rows are waiting or
//! `flush_interval` has passed since the oldest one arrived, then written in
//! one transaction with binary COPY. A failed write is retried with backoff
//! while the batch stays in memory; meanwhile the channel fills and the
//! pipeline upstream blocks, so a database outage slows ingestion instead of
//! losing data.
//!
//! Each send may carry a *mark* (the spool sequence number of the last
//! message whose records it holds). Once everything sent up to a mark is
//! committed, the writer reports the mark through its `on_stored` callback,
//! and the spool may forget those messages.

use crate::partitions::{PartitionConfig, Partitions, Table};
use crate::pgcopy::{BinaryCopyWriter, sanitize_text};
use crate::record::{DeadLetterRecord, EventRecord, PointRecord, Record, StateRecord};
use metrics::{counter, histogram};
use serde::{Deserialize, Serialize};
use sqlx::{Acquire, PgConnection, PgPool};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Flush once this many rows are waiting.
    pub batch_rows: usize,
    /// Flush at the latest this long after the oldest waiting row arrived.
    pub flush_interval_ms: u64,
    /// Capacity of the channel in front of the writer, in pipeline batches.
    pub queue_batches: usize,
    /// Time partitions of points and events, and their retention.
    pub partitions: PartitionConfig,
}

impl Default for WriterConfig {
    fn default() -> Self {
        // 10k rows per transaction is where COPY reaches its plateau on this
        // hardware (163-182k rows/s vs ~90k at 1k rows, see
        // shared/notes/ceilings.md); 100 ms keeps a quiet device's data
        // queryable well within a second.
        Self {
            batch_rows: 10_000,
            flush_interval_ms: 100,
            queue_batches: 256,
            partitions: PartitionConfig::default(),
        }
    }
}

/// The writer's input. Cloning is cheap; the writer stops once every clone is dropped,
/// after flushing what it holds.
#[derive(Clone)]
pub struct Sink {
    tx: mpsc::Sender<Input>,
}

struct Input {
    records: Vec<Record>,
    mark: Option<u64>,
}

/// Called with a mark once every record sent up to it is committed.
pub type OnStored = Box<dyn Fn(u64) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("the writer has stopped")]
pub struct WriterStopped;

impl Sink {
    /// For callers on plain threads (the rules pipeline); blocks while the queue is full.
    pub fn blocking_send(&self, records: Vec<Record>) -> Result<(), WriterStopped> {
        if records.is_empty() {
            return Ok(());
        }
        self.tx
            .blocking_send(Input {
                records,
                mark: None,
            })
            .map_err(|_| WriterStopped)
    }

    /// Sends records (possibly none) with a mark to report once they and
    /// everything sent before them are committed.
    pub fn blocking_send_marked(
        &self,
        records: Vec<Record>,
        mark: u64,
    ) -> Result<(), WriterStopped> {
        self.tx
            .blocking_send(Input {
                records,
                mark: Some(mark),
            })
            .map_err(|_| WriterStopped)
    }
}

/// How often partitions are created ahead and retention is applied.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// `progress`: the spool's identity, to record in `ingest_progress` the
/// highest mark each batch's transaction covers (see `stored_mark`).
pub fn spawn_writer(
    pool: PgPool,
    config: WriterConfig,
    on_stored: Option<OnStored>,
    progress: Option<String>,
) -> (Sink, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.queue_batches.max(1));
    let handle = tokio::spawn(run(pool, config, rx, on_stored, progress));
    (Sink { tx }, handle)
}

/// The highest mark of `spool_id` whose messages' rows are all committed.
pub async fn stored_mark(pool: &PgPool, spool_id: &str) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT stored_seq FROM ingest_progress WHERE spool_id = $1")
            .bind(spool_id)
            .fetch_optional(pool)
            .await?;
    Ok(seq.map_or(0, |s| s.max(0) as u64))
}

async fn run(
    pool: PgPool,
    config: WriterConfig,
    mut rx: mpsc::Receiver<Input>,
    on_stored: Option<OnStored>,
    progress: Option<String>,
) {
    let report = |mark: &mut Option<u64>| {
        if let (Some(m), Some(f)) = (mark.take(), on_stored.as_ref()) {
            f(m);
        }
    };
    let mut mark: Option<u64> = None;
    let flush_interval = Duration::from_millis(config.flush_interval_ms);
    let mut series = SeriesCache::default();
    let mut partitions = Partitions::new(config.partitions.clone());
    let mut batch = Batch::default();
    let mut oldest: Option<tokio::time::Instant> = None;
    // Partitions ahead of time and retention: at start, then every minute.
    let mut maintenance = tokio::time::interval(MAINTENANCE_EVERY);
    maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = oldest.map(|t| t + flush_interval);
        tokio::select! {
            _ = maintenance.tick() => {
                if let Err(e) = partitions.maintain(&pool, chrono::Utc::now()).await {
                    // The writer creates what it needs anyway; retry next time.
                    warn!(error = %e, "partition maintenance failed");
                }
            }
            received = rx.recv() => match received {
                Some(input) => {
                    if input.mark.is_some() {
                        mark = input.mark;
                    }
                    if !input.records.is_empty() {
                        oldest.get_or_insert_with(tokio::time::Instant::now);
                        batch.extend(input.records);
                    }
                    if batch.rows() >= config.batch_rows {
                        flush(&pool, &mut series, &mut partitions, &mut batch, progress.as_deref().zip(mark)).await;
                        oldest = None;
                    }
                    // Nothing waiting: whatever the mark covers is committed.
                    if batch.rows() == 0 {
                        report(&mut mark);
                    }
                }
                None => {
                    flush(&pool, &mut series, &mut partitions, &mut batch, progress.as_deref().zip(mark)).await;
                    report(&mut mark);
                    debug!("writer input closed; final batch flushed");
                    return;
                }
            },
            _ = sleep_until_opt(deadline), if deadline.is_some() => {
                flush(&pool, &mut series, &mut partitions, &mut batch, progress.as_deref().zip(mark)).await;
                oldest = None;
                report(&mut mark);
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// Writes the batch, retrying until it succeeds: the batch is the only copy of this data.
async fn flush(
    pool: &PgPool,
    series: &mut SeriesCache,
    partitions: &mut Partitions,
    batch: &mut Batch,
    progress: Option<(&str, u64)>,
) {
    if batch.rows() == 0 {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match write_batch(pool, series, partitions, batch, progress).await {
            Ok(()) => {
                histogram!("sluice_batch_flush_seconds").record(started.elapsed().as_secs_f64());
                counter!("sluice_batches_flushed_total").increment(1);
                counter!("sluice_points_written_total").increment(batch.points.len() as u64);
                counter!("sluice_events_written_total").increment(batch.events.len() as u64);
                counter!("sluice_dead_letters_written_total")
                    .increment(batch.dead_letters.len() as u64);
                debug!(
                    points = batch.points.len(),
                    events = batch.events.len(),
                    dead_letters = batch.dead_letters.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "batch flushed"
                );
                batch.clear();
                return;
            }
            Err(e) => {
                counter!("sluice_write_errors_total").increment(1);
                error!(error = %e, rows = batch.rows(), retry_in_ms = backoff.as_millis() as u64,
                    "writing a batch failed; keeping it and retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[derive(Default)]
struct Batch {
    points: Vec<PointRecord>,
    events: Vec<EventRecord>,
    dead_letters: Vec<DeadLetterRecord>,
    state: Vec<StateRecord>,
}

impl Batch {
    fn rows(&self) -> usize {
        self.points.len() + self.events.len() + self.dead_letters.len() + self.state.len()
    }

    fn extend(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::Point(p) => self.points.push(p),
                Record::Event(e) => self.events.push(e),
                Record::DeadLetter(d) => self.dead_letters.push(d),
                Record::State(s) => self.state.push(s),
            }
        }
    }

    fn clear(&mut self) {
        self.points.clear();
        self.events.clear();
        self.dead_letters.clear();
        self.state.clear();
    }
}

async fn write_batch(
    pool: &PgPool,
    series: &mut SeriesCache,
    partitions: &mut Partitions,
    batch: &Batch,
    progress: Option<(&str, u64)>,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    series.resolve(&mut conn, &batch.points).await?;
    // Outside the data transaction: DDL there would hold its locks until commit.
    partitions
        .ensure(
            &mut conn,
            Table::Points,
            batch.points.iter().map(|p| p.time),
        )
        .await?;
    partitions
        .ensure(
            &mut conn,
            Table::Events,
            batch.events.iter().map(|e| e.time),
        )
        .await?;

    let mut tx = conn.begin().await?;
    if !batch.points.is_empty() {
        let mut w = BinaryCopyWriter::new();
        for p in &batch.points {
            let id = series.get(&p.device_id, &p.metric).ok_or_else(|| {
                sqlx::Error::Protocol(format!(
                    "series ({}, {}) was not resolved",
                    p.device_id, p.metric
                ))
            })?;
            w.begin_row(3);
            w.int4(id);
            w.timestamptz(p.time);
            w.float8(p.value);
        }
        copy_in(
            &mut tx,
            "COPY points (series_id, time, value) FROM STDIN (FORMAT binary)",
            w,
        )
        .await?;
    }
    if !batch.events.is_empty() {
        let mut w = BinaryCopyWriter::new();
        for e in &batch.events {
            w.begin_row(5);
            w.timestamptz(e.time);
            w.opt_text(e.device_id.as_deref().map(sanitize_text).as_deref());
            w.text(&sanitize_text(&e.topic));
            w.opt_text(e.rule.as_deref().map(sanitize_text).as_deref());
            w.bytes(&e.payload);
        }
        copy_in(
            &mut tx,
            "COPY events (time, device_id, topic, rule, payload) FROM STDIN (FORMAT binary)",
            w,
        )
        .await?;
    }
    if !batch.dead_letters.is_empty() {
        let mut w = BinaryCopyWriter::new();
        for d in &batch.dead_letters {
            w.begin_row(6);
            w.timestamptz(d.received_at);
            w.opt_text(d.device_id.as_deref().map(sanitize_text).as_deref());
            w.text(&sanitize_text(&d.topic));
            w.opt_text(d.rule.as_deref().map(sanitize_text).as_deref());
            w.text(&sanitize_text(&d.reason));
            w.bytes(&d.payload);
        }
        copy_in(
            &mut tx,
            "COPY dead_letters (received_at, device_id, topic, rule, reason, payload) \
             FROM STDIN (FORMAT binary)",
            w,
        )
        .await?;
    }
    if !batch.state.is_empty() {
        write_state(&mut tx, &batch.state).await?;
    }
    // Every message up to the mark has its rows in this transaction or an
    // earlier one: recording the mark with them makes a replay skip exactly
    // what is stored.
    if let Some((spool_id, mark)) = progress {
        sqlx::query(
            "INSERT INTO ingest_progress (spool_id, stored_seq) VALUES ($1, $2) \
             ON CONFLICT (spool_id) DO UPDATE \
             SET stored_seq = greatest(ingest_progress.stored_seq, EXCLUDED.stored_seq), \
                 updated_at = now()",
        )
        .bind(spool_id)
        .bind(i64::try_from(mark).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
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

/// Maps (device, metric) to the series id, creating series on first sight.
///
/// Owned by the single writer task, so a plain map suffices. Bounded: past
/// `MAX_ENTRIES` it is emptied and refills from the database on demand.
#[derive(Default)]
struct SeriesCache {
    ids: HashMap<Arc<str>, HashMap<String, i32>>,
    entries: usize,
}

impl SeriesCache {
    const MAX_ENTRIES: usize = 1_000_000;

    fn get(&self, device: &str, metric: &str) -> Option<i32> {
        self.ids.get(device)?.get(metric).copied()
    }

    async fn resolve(
        &mut self,
        conn: &mut PgConnection,
        points: &[PointRecord],
    ) -> Result<(), sqlx::Error> {
        let mut devices: Vec<String> = Vec::new();
        let mut metrics: Vec<String> = Vec::new();
        let mut seen: std::collections::HashSet<(&str, &str)> = Default::default();
        for p in points {
            if self.get(&p.device_id, &p.metric).is_none() && seen.insert((&p.device_id, &p.metric))
            {
                devices.push(sanitize_text(&p.device_id).into_owned());
                metrics.push(sanitize_text(&p.metric).into_owned());
            }
        }
        if devices.is_empty() {
            return Ok(());
        }
        if self.entries + devices.len() > Self::MAX_ENTRIES {
            warn!(entries = self.entries, "series cache full; starting afresh");
            self.ids.clear();
            self.entries = 0;
        }
        sqlx::query(
            "INSERT INTO series (device_id, metric) \
             SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&devices)
        .bind(&metrics)
        .execute(&mut *conn)
        .await?;
        let rows: Vec<(i32, String, String)> = sqlx::query_as(
            "SELECT s.id, s.device_id, s.metric FROM series s \
             JOIN UNNEST($1::text[], $2::text[]) AS want(device_id, metric) \
             ON s.device_id = want.device_id AND s.metric = want.metric",
        )
        .bind(&devices)
        .bind(&metrics)
        .fetch_all(&mut *conn)
        .await?;
        for (id, device, metric) in rows {
            self.ids
                .entry(Arc::from(device))
                .or_default()
                .insert(metric, id);
            self.entries += 1;
        }
        // Names that contained NUL were stored sanitized; map the originals too.
        for p in points {
            if self.get(&p.device_id, &p.metric).is_none()
                && let Some(id) = self.get(&sanitize_text(&p.device_id), &sanitize_text(&p.metric))
            {
                self.ids
                    .entry(p.device_id.clone())
                    .or_default()
                    .insert(p.metric.clone(), id);
                self.entries += 1;
            }
        }
        Ok(())
    }
}
