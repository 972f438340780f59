//! How far into the spool the stored data goes, per writer shard.
//!
//! Each shard records, in the same transaction as its rows, the highest
//! spool mark its committed rows cover (`ingest_progress`). After a crash
//! the shards may stand at different marks: messages up to the lowest are
//! stored everywhere and skipped whole; messages between the lowest and the
//! highest (the *replay window*) are stored in some shards only, so their
//! records are filtered one by one: a record is dropped if the shard it
//! was routed to (by the mapping of the run that wrote the marks) already
//! holds that message. For the filter to know which message a record came
//! from, the pipeline hands the window over one message at a time.
//!
//! The stored rows always come from one shard count: at start, when the
//! window is empty, they are rewritten for the configured count; when it is
//! not, this run keeps the old count (and mapping) until the next start.

use sqlx::{Acquire, PgConnection, PgPool};
use tracing::warn;

use crate::record::Record;

/// The shard of a device: a stable hash (CRC-32 of the id), so the mapping
/// is the same in every run with the same shard count.
pub fn shard_of(device: Option<&str>, shards: usize) -> usize {
    match device {
        Some(d) if shards > 1 => crc32fast::hash(d.as_bytes()) as usize % shards,
        _ => 0,
    }
}

pub(super) fn record_device(r: &Record) -> Option<&str> {
    match r {
        Record::Point(p) => Some(&p.device_id),
        Record::Event(e) => e.device_id.as_deref(),
        Record::DeadLetter(d) => d.device_id.as_deref(),
        Record::State(s) => Some(&s.device_id),
    }
}

/// What the database holds of one spool, per shard of the run that wrote it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredProgress {
    /// The stored mark of each shard (empty: nothing stored yet).
    pub marks: Vec<u64>,
}

impl StoredProgress {
    /// Every message up to here is stored in every shard.
    pub fn stored_everywhere(&self) -> u64 {
        self.marks.iter().copied().min().unwrap_or(0)
    }

    /// Messages above this are stored nowhere.
    pub fn window_end(&self) -> u64 {
        self.marks.iter().copied().max().unwrap_or(0)
    }

    /// True if the record, from the message with spool sequence `seq`, is
    /// already stored.
    pub fn holds(&self, seq: u64, record: &Record) -> bool {
        if self.marks.is_empty() || seq > self.window_end() {
            return false;
        }
        seq <= self.marks[shard_of(record_device(record), self.marks.len())]
    }
}

/// Reads the stored progress of `spool_id` and settles the shard count of
/// this run: `wanted` when no replay window is open, else the stored count.
pub(super) async fn load(
    pool: &PgPool,
    spool_id: &str,
    wanted: usize,
) -> Result<(StoredProgress, usize), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let rows: Vec<(i32, i64, i32)> = sqlx::query_as(
        "SELECT shard, stored_seq, shards FROM ingest_progress WHERE spool_id = $1 \
         ORDER BY shard FOR UPDATE",
    )
    .bind(spool_id)
    .fetch_all(&mut *tx)
    .await?;
    let stored_shards = rows.first().map_or(0, |r| r.2.max(1) as usize);
    let complete = rows.len() == stored_shards
        && rows
            .iter()
            .enumerate()
            .all(|(i, r)| r.0 as usize == i && r.2 as usize == stored_shards);
    let marks: Vec<u64> = rows.iter().map(|r| r.1.max(0) as u64).collect();
    if !rows.is_empty() && !complete {
        // Only a hand edit can get here; the lowest mark is the safe one.
        warn!(
            spool_id,
            "ingest_progress rows are inconsistent; replaying from the lowest"
        );
    }
    let stored = StoredProgress {
        marks: if complete {
            marks.clone()
        } else {
            marks.iter().min().map(|&m| vec![m]).unwrap_or_default()
        },
    };
    let shards = if stored.stored_everywhere() == stored.window_end() || stored.marks.is_empty() {
        // No window: start afresh with the configured count.
        let mark = stored.window_end();
        sqlx::query("DELETE FROM ingest_progress WHERE spool_id = $1")
            .bind(spool_id)
            .execute(&mut *tx)
            .await?;
        for shard in 0..wanted {
            record(&mut tx, spool_id, shard, wanted, mark).await?;
        }
        wanted
    } else {
        if stored.marks.len() != wanted {
            warn!(
                spool_id,
                configured = wanted,
                running = stored.marks.len(),
                "a replay window is open: this run keeps the writer count that wrote it"
            );
        }
        stored.marks.len()
    };
    tx.commit().await?;
    Ok((stored, shards))
}

/// The mark `shard` has recorded for `spool_id`, if any.
pub(super) async fn recorded(
    pool: &PgPool,
    spool_id: &str,
    shard: usize,
) -> Result<Option<u64>, sqlx::Error> {
    let mark: Option<i64> = sqlx::query_scalar(
        "SELECT stored_seq FROM ingest_progress WHERE spool_id = $1 AND shard = $2",
    )
    .bind(spool_id)
    .bind(shard as i32)
    .fetch_optional(pool)
    .await?;
    Ok(mark.map(|m| m.max(0) as u64))
}

/// Records that `shard`'s rows cover the spool up to `mark`.
pub(super) async fn record(
    conn: &mut PgConnection,
    spool_id: &str,
    shard: usize,
    shards: usize,
    mark: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ingest_progress (spool_id, shard, shards, stored_seq) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (spool_id, shard) DO UPDATE \
         SET stored_seq = greatest(ingest_progress.stored_seq, EXCLUDED.stored_seq), \
             shards = EXCLUDED.shards, updated_at = now()",
    )
    .bind(spool_id)
    .bind(shard as i32)
    .bind(shards as i32)
    .bind(i64::try_from(mark).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::PointRecord;
    use std::sync::Arc;

    fn point(device: &str) -> Record {
        Record::Point(PointRecord {
            device_id: Arc::from(device),
            metric: "m".into(),
            time: chrono::Utc::now(),
            value: 0.0,
        })
    }

    #[test]
    fn the_shard_mapping_is_stable_and_spreads_devices() {
        assert_eq!(shard_of(Some("dev-1"), 1), 0);
        assert_eq!(shard_of(None, 4), 0);
        let first = shard_of(Some("dev-1"), 4);
        assert_eq!(first, shard_of(Some("dev-1"), 4));
        let used: std::collections::HashSet<usize> = (0..100)
            .map(|i| shard_of(Some(&format!("d{i}")), 4))
            .collect();
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn the_window_filter_uses_each_records_shard() {
        let stored = StoredProgress {
            marks: vec![10, 20],
        };
        assert_eq!(stored.stored_everywhere(), 10);
        assert_eq!(stored.window_end(), 20);
        let (a, b) =
            (0..100)
                .map(|i| format!("d{i}"))
                .fold((None, None), |(a, b), d| match shard_of(Some(&d), 2) {
                    0 if a.is_none() => (Some(d), b),
                    1 if b.is_none() => (a, Some(d)),
                    _ => (a, b),
                });
        let (on_0, on_1) = (point(&a.unwrap()), point(&b.unwrap()));
        assert!(stored.holds(10, &on_0) && stored.holds(10, &on_1));
        assert!(!stored.holds(15, &on_0), "shard 0 stopped at 10");
        assert!(stored.holds(15, &on_1), "shard 1 holds up to 20");
        assert!(!stored.holds(21, &on_1));
        assert!(!StoredProgress::default().holds(1, &on_0));
    }
}
