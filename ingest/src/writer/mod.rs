//! The batching writer: the only code that inserts telemetry.
//!
//! Records are routed by device to one of `writers` shards, each a task with
//! its own bounded channel and database connection, so several COPY streams
//! run in parallel while every device's rows (and so every series' rows)
//! stay in one shard, in the order the pipeline produced them. A shard
//! buffers records until `batch_rows` rows are waiting or `flush_interval`
//! has passed since the oldest one arrived, then writes them in one
//! transaction (see `batch.rs`). A failed write is retried with backoff
//! while the batch stays in memory; meanwhile the channel fills and the
//! pipeline upstream blocks, so a database outage slows ingestion (the
//! spool takes the messages, then the device edge delays acks) instead of
//! losing data.
//!
//! Each send may carry a *mark*: the spool sequence number of the last
//! message whose records it holds. Every shard gets every mark. A shard
//! records its mark in `ingest_progress` with its rows (`progress.rs`), and
//! once every shard has committed everything up to a mark, the writer
//! reports it through `on_stored` and the spool may forget those messages.
//!
//! Partition upkeep (creating ahead, retention, compaction) runs in a
//! separate maintenance task, so a long compaction never holds up a write.

mod batch;
mod progress;
mod series;

pub use progress::{StoredProgress, shard_of};
pub use series::create_series;

use crate::live::LiveFeed;
use crate::partitions::{PartitionConfig, Partitions};
use crate::record::Record;
use metrics::{counter, histogram};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Flush a shard once this many rows are waiting in it...
    pub batch_rows: usize,
    /// ...unless more input is already queued behind them (a backlog, e.g.
    /// after a database outage): then the batch grows up to this many rows,
    /// as fewer, larger transactions store more per second.
    pub backlog_batch_rows: usize,
    /// Flush at the latest this long after the oldest waiting row arrived.
    /// It bounds how stale stored data and Subscribe streams are at low and
    /// moderate rates; under load batches fill first, so a short interval
    /// costs no throughput (BENCHMARKS.md: 5, 20 and 100 ms store alike at
    /// saturation, and 10 ms keeps Subscribe's p99 under 50 ms at 10,000
    /// points/s where 100 ms gave 508 ms).
    pub flush_interval_ms: u64,
    /// Capacity of each shard's channel, in pipeline batches.
    pub queue_batches: usize,
    /// Writer shards: database connections writing in parallel, each
    /// owning a fixed share of the devices.
    pub writers: usize,
    /// Maintain the 1-minute and 1-hour rollups with every batch.
    pub rollups: bool,
    /// Time partitions of points, events and rollups, their retention and
    /// compaction.
    pub partitions: PartitionConfig,
    /// Committed batches the live feed keeps for slow API subscribers;
    /// one further behind and a subscriber is told what it missed.
    pub live_feed_batches: usize,
    /// Benchmarking only: a null sink. Shards count what they receive
    /// (`sluice_records_discarded_total{kind}`) and throw it away instead
    /// of writing it, and report each mark at once, so the spool is freed
    /// as usual. It measures the broker and the rules without PostgreSQL's
    /// limit, the way a bare broker is measured (BENCHMARKS.md, "Broker
    /// fan-in"); nothing reaches the database or the live feed.
    pub discard: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        // 10k rows per transaction is where COPY reaches its plateau on this
        // hardware (163-182k rows/s vs ~90k at 1k rows, see
        // shared/notes/ceilings.md); 100 ms keeps a quiet device's data
        // queryable well within a second. Two shards: BENCHMARKS.md,
        // "Writer shards".
        Self {
            batch_rows: 10_000,
            backlog_batch_rows: 50_000,
            flush_interval_ms: 10,
            queue_batches: 128,
            writers: 2,
            rollups: true,
            partitions: PartitionConfig::default(),
            live_feed_batches: 32,
            discard: false,
        }
    }
}

/// The writer's input. Cloning is cheap; the writer stops once every clone
/// is dropped, after flushing what it holds.
#[derive(Clone)]
pub struct Sink {
    shards: Arc<[mpsc::Sender<Input>]>,
    /// What was already stored before this run (the replay filter).
    stored: Arc<StoredProgress>,
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
    fn split(&self, records: Vec<Record>) -> Vec<Vec<Record>> {
        let n = self.shards.len();
        if n == 1 {
            return vec![records];
        }
        // Devices spread about evenly over the shards; a little slack spares
        // most parts a regrowth (which would copy tens of thousands of records).
        let expected = records.len() / n + records.len() / (4 * n) + 16;
        let mut parts: Vec<Vec<Record>> = (0..n).map(|_| Vec::with_capacity(expected)).collect();
        for r in records {
            parts[shard_of(progress::record_device(&r), n)].push(r);
        }
        parts
    }

    /// For callers on plain threads (the rules pipeline); blocks while a queue is full.
    pub fn blocking_send(&self, records: Vec<Record>) -> Result<(), WriterStopped> {
        for (shard, records) in self.split(records).into_iter().enumerate() {
            if !records.is_empty() {
                self.shards[shard]
                    .blocking_send(Input {
                        records,
                        mark: None,
                    })
                    .map_err(|_| WriterStopped)?;
            }
        }
        Ok(())
    }

    /// Sends records (possibly none) with a mark to report once they and
    /// everything sent before them are committed.
    ///
    /// Contract: a mark at or below [`StoredProgress::window_end`] must come
    /// with the records of that one message only; records already stored
    /// before this run are then dropped here.
    pub fn blocking_send_marked(
        &self,
        mut records: Vec<Record>,
        mark: u64,
    ) -> Result<(), WriterStopped> {
        if mark <= self.stored.window_end() {
            let before = records.len();
            records.retain(|r| !self.stored.holds(mark, r));
            if records.len() < before {
                counter!("sluice_replay_records_skipped_total")
                    .increment((before - records.len()) as u64);
            }
        }
        for (shard, records) in self.split(records).into_iter().enumerate() {
            self.shards[shard]
                .blocking_send(Input {
                    records,
                    mark: Some(mark),
                })
                .map_err(|_| WriterStopped)?;
        }
        Ok(())
    }
}

/// A running writer.
pub struct Writer {
    pub sink: Sink,
    /// Ends once every shard has flushed after the last `Sink` was dropped.
    pub handle: JoinHandle<()>,
    /// What the database held of the spool at start: the pipeline skips
    /// messages up to [`StoredProgress::stored_everywhere`] and hands the
    /// window above it over one message at a time.
    pub stored: StoredProgress,
    /// What each committed batch stored, for live subscribers.
    pub live: LiveFeed,
}

/// Starts a writer that records its progress through the spool `spool_id`
/// with its rows (see `progress.rs`).
pub async fn start_writer(
    pool: PgPool,
    config: WriterConfig,
    on_stored: Option<OnStored>,
    spool_id: &str,
) -> Result<Writer, sqlx::Error> {
    let (stored, shards) = progress::load(&pool, spool_id, config.writers.max(1)).await?;
    let live = LiveFeed::new(config.live_feed_batches);
    let (sink, handle) = spawn(
        pool,
        config,
        shards,
        on_stored,
        Some(spool_id),
        stored.clone(),
        live.clone(),
    );
    Ok(Writer {
        sink,
        handle,
        stored,
        live,
    })
}

/// Starts a writer that keeps no spool progress (tests, tools).
pub fn spawn_writer(
    pool: PgPool,
    config: WriterConfig,
    on_stored: Option<OnStored>,
) -> (Sink, JoinHandle<()>) {
    let shards = config.writers.max(1);
    let live = LiveFeed::new(config.live_feed_batches);
    spawn(
        pool,
        config,
        shards,
        on_stored,
        None,
        StoredProgress::default(),
        live,
    )
}

fn spawn(
    pool: PgPool,
    config: WriterConfig,
    shards: usize,
    on_stored: Option<OnStored>,
    spool_id: Option<&str>,
    stored: StoredProgress,
    live: LiveFeed,
) -> (Sink, JoinHandle<()>) {
    let partitions = Arc::new(Mutex::new(Partitions::new(config.partitions.clone())));
    let reports = Arc::new(Reports {
        marks: std::sync::Mutex::new((vec![None; shards], 0)),
        on_stored,
    });
    let spool_id: Option<Arc<str>> = spool_id.map(Arc::from);
    let mut senders = Vec::with_capacity(shards);
    let mut tasks = Vec::with_capacity(shards);
    for index in 0..shards {
        let (tx, rx) = mpsc::channel(config.queue_batches.max(1));
        senders.push(tx);
        let shard = Shard {
            index,
            shards,
            pool: pool.clone(),
            config: config.clone(),
            partitions: partitions.clone(),
            spool_id: spool_id.clone(),
            reports: reports.clone(),
            live: live.clone(),
        };
        tasks.push(tokio::spawn(shard.run(rx)));
    }
    let upkeep = tokio::spawn(maintain(pool, partitions, config.partitions));
    let handle = tokio::spawn(async move {
        for t in tasks {
            if let Err(e) = t.await {
                error!(error = %e, "a writer shard failed");
            }
        }
        upkeep.abort();
    });
    (
        Sink {
            shards: senders.into(),
            stored: Arc::new(stored),
        },
        handle,
    )
}

/// The marks each shard has committed; reports their minimum.
struct Reports {
    /// Per shard, and the last minimum reported.
    marks: std::sync::Mutex<(Vec<Option<u64>>, u64)>,
    on_stored: Option<OnStored>,
}

impl Reports {
    fn stored(&self, shard: usize, mark: u64) {
        let Some(f) = self.on_stored.as_ref() else {
            return;
        };
        let mut guard = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (marks, last) = &mut *guard;
        marks[shard] = Some(marks[shard].map_or(mark, |m| m.max(mark)));
        if let Some(min) = marks.iter().copied().min().flatten()
            && min > *last
        {
            *last = min;
            f(min);
        }
    }
}

/// How often partitions are created ahead, retention applied, a closed
/// partition compacted and series_latest's order checked.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// How long a shard's recorded progress may lag a mark it reported without
/// rows (it had nothing to write): bounds the replay window after a crash.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

async fn maintain(pool: PgPool, partitions: Arc<Mutex<Partitions>>, config: PartitionConfig) {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now();
        if let Err(e) = partitions.lock().await.maintain(&pool, now).await {
            // The writer creates what it needs anyway; retry next time.
            warn!(error = %e, "partition maintenance failed");
        }
        if let Err(e) = crate::compaction::reorder_latest(&pool, false).await {
            warn!(error = %e, "cannot reorder series_latest; retried next time");
        }
        if config.compact_after_hours == 0 {
            continue;
        }
        // One partition per tick keeps each round's work bounded.
        let closed = now - chrono::Duration::hours(i64::from(config.compact_after_hours));
        match crate::compaction::candidates(&pool, closed).await {
            Ok(names) => {
                if let Some(name) = names.first()
                    && let Err(e) = crate::compaction::compact(&pool, name).await
                {
                    warn!(partition = %name, error = %e, "compaction failed; retried next time");
                }
            }
            Err(e) => warn!(error = %e, "cannot list partitions to compact"),
        }
    }
}

struct Shard {
    index: usize,
    shards: usize,
    pool: PgPool,
    config: WriterConfig,
    partitions: Arc<Mutex<Partitions>>,
    spool_id: Option<Arc<str>>,
    reports: Arc<Reports>,
    live: LiveFeed,
}

/// A shard's position: the last mark received, and the last recorded with
/// its rows in the database.
#[derive(Default)]
struct Marks {
    received: Option<u64>,
    recorded: Option<u64>,
}

impl Marks {
    fn unrecorded(&self) -> bool {
        self.received > self.recorded
    }
}

impl Shard {
    async fn run(self, mut rx: mpsc::Receiver<Input>) {
        let flush_interval = Duration::from_millis(self.config.flush_interval_ms);
        let mut series = series::SeriesCache::default();
        let mut batch = batch::Batch::default();
        let mut marks = Marks::default();
        let mut oldest: Option<tokio::time::Instant> = None;
        let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
        progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = oldest.map(|t| t + flush_interval);
            tokio::select! {
                received = rx.recv() => match received {
                    Some(input) if self.config.discard => self.discard(input),
                    Some(input) => {
                        if input.mark.is_some() {
                            marks.received = input.mark;
                        }
                        if !input.records.is_empty() {
                            oldest.get_or_insert_with(tokio::time::Instant::now);
                            batch.extend(input.records);
                        }
                        let limit = if rx.is_empty() {
                            self.config.batch_rows
                        } else {
                            self.config.backlog_batch_rows.max(self.config.batch_rows)
                        };
                        if batch.rows() >= limit {
                            self.flush(&mut series, &mut batch, &mut marks).await;
                            oldest = None;
                        }
                        // Nothing waiting: whatever the mark covers is committed.
                        if batch.rows() == 0 && let Some(m) = marks.received {
                            self.reports.stored(self.index, m);
                        }
                    }
                    None => {
                        // Also records a mark that came without rows, so every shard
                        // ends at the same mark and the next start opens no window.
                        self.flush(&mut series, &mut batch, &mut marks).await;
                        if let Some(m) = marks.received {
                            self.reports.stored(self.index, m);
                        }
                        debug!(shard = self.index, "writer input closed; final batch flushed");
                        return;
                    }
                },
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    self.flush(&mut series, &mut batch, &mut marks).await;
                    oldest = None;
                    if let Some(m) = marks.received {
                        self.reports.stored(self.index, m);
                    }
                }
                _ = progress_tick.tick(), if self.spool_id.is_some() && batch.rows() == 0 && marks.unrecorded() => {
                    self.flush(&mut series, &mut batch, &mut marks).await;
                }
            }
        }
    }

    /// Writes the batch (or, if it is empty, only the progress mark),
    /// retrying until it succeeds: the batch is the only copy of this data
    /// outside the spool.
    async fn flush(
        &self,
        series: &mut series::SeriesCache,
        batch: &mut batch::Batch,
        marks: &mut Marks,
    ) {
        let progress = self
            .spool_id
            .as_deref()
            .zip(marks.received)
            .map(|(spool_id, mark)| batch::Progress {
                spool_id,
                shard: self.index,
                shards: self.shards,
                mark,
            });
        if batch.rows() == 0 && !(progress.is_some() && marks.unrecorded()) {
            return;
        }
        // This run hands a shard only marks above what it had stored at
        // start, so a mark not yet recorded here is not in the database
        // before this flush: finding it there later means this flush did it.
        let fresh = marks.unrecorded();
        let mut backoff = Duration::from_millis(100);
        let mut failed = false;
        loop {
            if failed
                && fresh
                && batch.rows() > 0
                && let Some(p) = progress
            {
                match self.committed_in_doubt(p).await {
                    Ok(true) => {
                        self.count_written(batch, &batch::Written::default());
                        if self.live.has_subscribers() {
                            self.live
                                .skip((batch.points.len() + batch.events.len()) as u64);
                        }
                        batch.clear();
                        marks.recorded = Some(p.mark);
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let kind = batch::error_kind(&e);
                        counter!("sluice_write_errors_total", "kind" => kind).increment(1);
                        error!(shard = self.index, error = %e, kind, rows = batch.rows(),
                            retry_in_ms = backoff.as_millis() as u64,
                            "cannot tell whether the failed batch was committed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            let started = Instant::now();
            let cx = batch::Context {
                pool: &self.pool,
                series,
                partitions: &self.partitions,
                config: &self.config.partitions,
                rollups: self.config.rollups,
            };
            match batch::write(cx, batch, progress).await {
                Ok(written) => {
                    histogram!("sluice_batch_flush_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.count_written(batch, &written);
                    debug!(
                        shard = self.index,
                        points = batch.points.len(),
                        events = batch.events.len(),
                        dead_letters = batch.dead_letters.len(),
                        refused = written.refused_points + written.refused_events,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "batch flushed"
                    );
                    self.publish_live(batch, &written);
                    batch.clear();
                    marks.recorded = progress.map(|p| p.mark).or(marks.recorded);
                    return;
                }
                Err(e) => {
                    let kind = batch::error_kind(&e);
                    counter!("sluice_write_errors_total", "kind" => kind).increment(1);
                    error!(shard = self.index, error = %e, kind, rows = batch.rows(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "writing a batch failed; keeping it and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    failed = true;
                }
            }
        }
    }

    /// After a failed attempt: whether it committed all the same. A
    /// connection lost during COMMIT (the server killed, e.g. `pg_ctl stop
    /// -m immediate`, or the network cut) leaves the outcome unknown: the
    /// commit may be durable without its answer having arrived. The shard's
    /// mark is in the same transaction as its rows, so the mark in the
    /// database tells; writing the batch again would store it twice.
    async fn committed_in_doubt(&self, p: batch::Progress<'_>) -> Result<bool, sqlx::Error> {
        let stored = progress::recorded(&self.pool, p.spool_id, self.index).await?;
        let committed = stored.is_some_and(|m| m >= p.mark);
        if committed {
            counter!("sluice_batches_committed_in_doubt_total").increment(1);
            warn!(
                shard = self.index,
                mark = p.mark,
                "the failed batch had committed (its answer was lost); not writing it again"
            );
        }
        Ok(committed)
    }

    fn count_written(&self, batch: &batch::Batch, written: &batch::Written) {
        counter!("sluice_batches_flushed_total").increment(1);
        counter!("sluice_points_written_total")
            .increment((batch.points.len() - written.refused_points) as u64);
        counter!("sluice_events_written_total")
            .increment((batch.events.len() - written.refused_events) as u64);
        counter!("sluice_dead_letters_written_total").increment(
            (batch.dead_letters.len() + written.refused_points + written.refused_events) as u64,
        );
    }
}

impl Shard {
    /// The null sink (`discard`): counts the records by kind, drops them
    /// and reports the mark as if they were committed.
    fn discard(&self, input: Input) {
        let mut counts = [0u64; 4];
        for record in &input.records {
            counts[match record {
                Record::Point(_) => 0,
                Record::Event(_) => 1,
                Record::DeadLetter(_) => 2,
                Record::State(_) => 3,
            }] += 1;
        }
        for (kind, n) in ["point", "event", "dead_letter", "state"]
            .into_iter()
            .zip(counts)
        {
            if n > 0 {
                counter!("sluice_records_discarded_total", "kind" => kind).increment(n);
            }
        }
        if let Some(mark) = input.mark {
            self.reports.stored(self.index, mark);
        }
    }

    /// Hands a committed batch's points and events to live subscribers,
    /// moving them out of the batch (which is cleared next anyway).
    fn publish_live(&self, batch: &mut batch::Batch, written: &batch::Written) {
        if !self.live.has_subscribers() {
            return;
        }
        if written.refused_points + written.refused_events > 0 {
            self.live
                .skip((batch.points.len() + batch.events.len()) as u64);
            return;
        }
        self.live.publish(
            std::mem::take(&mut batch.points),
            std::mem::take(&mut batch.events),
        );
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}
