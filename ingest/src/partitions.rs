//! Time partitions of `points`, `events` and the rollups: created before any
//! row needs them, dropped whole for retention.
//!
//! All four are range-partitioned on time (`bucket` for rollups) with no
//! default partition (`migrations/0004_partitions.sql`, `0006`). The writer is the only inserter, and
//! before each batch it makes sure every row's time falls in a partition,
//! creating the missing ones, so an insert never fails for a missing
//! partition, for late data with old timestamps or future data alike (how
//! far from now data may be is the processor's check, see
//! `PartitionConfig::max_future_hours`). Partitions are `interval_hours`
//! wide (rollups have their own widths), aligned to the Unix epoch (so days start at 00:00 UTC), and named
//! `TABLE_pYYYYMMDD_HHMM` after their start. If the interval changes, new
//! partitions are clipped to their existing neighbours, never overlapping.
//!
//! Retention drops partitions whose whole range is older than the table's
//! retention: `DROP TABLE`, never `DELETE`.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Acquire, PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap};
use tracing::{debug, info};

/// The partitioned tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Points,
    Events,
    Rollup1m,
    Rollup1h,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Points,
        Table::Events,
        Table::Rollup1m,
        Table::Rollup1h,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Points => "points",
            Table::Events => "events",
            Table::Rollup1m => "rollup_1m",
            Table::Rollup1h => "rollup_1h",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionConfig {
    /// Width of one partition of points and events (24: one per UTC day).
    pub interval_hours: u32,
    /// Width of one partition of the 1-minute rollups (168: a week).
    pub rollup_1m_interval_hours: u32,
    /// Width of one partition of the 1-hour rollups (720: 30 days).
    pub rollup_1h_interval_hours: u32,
    /// Partitions created ahead of now, so the first rows of a new period
    /// never wait for DDL.
    pub create_ahead: u32,
    /// Raw points older than this many days are dropped, a partition at a
    /// time (0: kept for ever).
    pub points_retention_days: u32,
    /// The same for events.
    pub events_retention_days: u32,
    /// The same for the 1-minute rollups.
    pub rollup_1m_retention_days: u32,
    /// The same for the 1-hour rollups.
    pub rollup_1h_retention_days: u32,
    /// Rows timed further than this in the future go to the dead letters
    /// (a clock gone wrong would otherwise create partitions for years).
    pub max_future_hours: u32,
    /// A points partition whose range ended this many hours ago is
    /// compacted: its rows sorted by series and its btree replaced by a BRIN
    /// index (see `compaction.rs`). 0: never.
    pub compact_after_hours: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            interval_hours: 24,
            rollup_1m_interval_hours: 168,
            rollup_1h_interval_hours: 720,
            create_ahead: 2,
            points_retention_days: 0,
            events_retention_days: 0,
            rollup_1m_retention_days: 0,
            rollup_1h_retention_days: 0,
            max_future_hours: 24,
            compact_after_hours: 2,
        }
    }
}

impl PartitionConfig {
    fn retention(&self, table: Table) -> Option<Duration> {
        let days = match table {
            Table::Points => self.points_retention_days,
            Table::Events => self.events_retention_days,
            Table::Rollup1m => self.rollup_1m_retention_days,
            Table::Rollup1h => self.rollup_1h_retention_days,
        };
        (days > 0).then(|| Duration::days(i64::from(days)))
    }

    /// The oldest time a row of `table` may have now: older rows would land
    /// in a partition retention drops (`None`: no bound).
    pub fn oldest_allowed(&self, table: Table, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.retention(table).map(|r| now - r)
    }

    fn interval_micros(&self, table: Table) -> i64 {
        let hours = match table {
            Table::Points | Table::Events => self.interval_hours,
            Table::Rollup1m => self.rollup_1m_interval_hours,
            Table::Rollup1h => self.rollup_1h_interval_hours,
        };
        i64::from(hours.max(1)) * 3_600_000_000
    }
}

/// The known partitions of each table, as `[lower, upper)` in microseconds.
pub struct Partitions {
    config: PartitionConfig,
    ranges: HashMap<Table, BTreeMap<i64, i64>>,
    loaded: bool,
}

impl Partitions {
    pub fn new(config: PartitionConfig) -> Self {
        Self {
            config,
            ranges: HashMap::new(),
            loaded: false,
        }
    }

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// Makes sure every time in `times` has a partition of `table`.
    pub async fn ensure(
        &mut self,
        conn: &mut PgConnection,
        table: Table,
        times: impl Iterator<Item = DateTime<Utc>>,
    ) -> Result<(), sqlx::Error> {
        self.load(conn).await?;
        let mut missing: Vec<i64> = times
            .map(|t| t.timestamp_micros())
            .filter(|&t| !self.covered(table, t))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        for t in missing {
            // An earlier creation in this loop may have covered it.
            if !self.covered(table, t) {
                self.create(conn, table, t).await?;
            }
        }
        Ok(())
    }

    fn covered(&self, table: Table, t: i64) -> bool {
        self.ranges
            .get(&table)
            .and_then(|r| r.range(..=t).next_back())
            .is_some_and(|(_, &upper)| t < upper)
    }

    /// Creates the interval-aligned partition holding `t`, clipped so it
    /// does not overlap partitions made with another interval.
    async fn create(
        &mut self,
        conn: &mut PgConnection,
        table: Table,
        t: i64,
    ) -> Result<(), sqlx::Error> {
        let width = self.config.interval_micros(table);
        let mut lower = t.div_euclid(width) * width;
        let mut upper = lower + width;
        let ranges = self.ranges.entry(table).or_default();
        if let Some((_, &prev_upper)) = ranges.range(..=t).next_back() {
            lower = lower.max(prev_upper);
        }
        if let Some((&next_lower, _)) = ranges.range(t + 1..).next() {
            upper = upper.min(next_lower);
        }
        let (from, to) = (micros_to_time(lower), micros_to_time(upper));
        let name = format!("{}_p{}", table.name(), from.format("%Y%m%d_%H%M"));
        // DDL takes no bind parameters; the name and bounds are computed
        // here from integers, never taken from input. A points partition
        // gets its own btree in the same transaction (there is none on the
        // parent, so compaction can replace it; see compaction.rs).
        let mut tx = conn.begin().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(format!("\"{name}\""))
            .fetch_one(&mut *tx)
            .await?;
        if exists.is_none() {
            let ddl = format!(
                "CREATE TABLE \"{name}\" PARTITION OF {} FOR VALUES FROM ('{}') TO ('{}')",
                table.name(),
                from.to_rfc3339(),
                to.to_rfc3339()
            );
            sqlx::query(sqlx::AssertSqlSafe(ddl))
                .execute(&mut *tx)
                .await?;
            if table == Table::Points {
                let ddl =
                    format!("CREATE INDEX \"{name}_series_time\" ON \"{name}\" (series_id, time)");
                sqlx::query(sqlx::AssertSqlSafe(ddl))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        debug!(partition = %name, %from, %to, "partition created");
        metrics::counter!("sluice_partitions_created_total", "table" => table.name()).increment(1);
        ranges.insert(lower, upper);
        Ok(())
    }

    /// Reads the existing partitions once.
    async fn load(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.loaded {
            return Ok(());
        }
        for table in Table::ALL {
            let ranges = existing(conn, table).await?;
            self.ranges.insert(
                table,
                ranges
                    .into_iter()
                    .map(|(_, lower, upper)| (lower.timestamp_micros(), upper.timestamp_micros()))
                    .collect(),
            );
        }
        self.loaded = true;
        Ok(())
    }

    /// Creates the partitions ahead of `now` and drops those retention no
    /// longer keeps. Returns the dropped partitions' names.
    pub async fn maintain(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let mut dropped = Vec::new();
        for table in Table::ALL {
            let width = self.config.interval_micros(table);
            let ahead: Vec<DateTime<Utc>> = (0..=i64::from(self.config.create_ahead))
                .map(|i| micros_to_time(now.timestamp_micros() + i * width))
                .collect();
            self.ensure(&mut conn, table, ahead.iter().copied()).await?;
            let Some(oldest) = self.config.oldest_allowed(table, now) else {
                continue;
            };
            for (name, lower, upper) in existing(&mut conn, table).await? {
                if upper <= oldest {
                    // The name comes from the catalog: quote it as an identifier.
                    let ddl = format!("DROP TABLE IF EXISTS \"{}\"", name.replace('"', "\"\""));
                    sqlx::query(sqlx::AssertSqlSafe(ddl))
                        .execute(&mut *conn)
                        .await?;
                    info!(partition = %name, %lower, %upper, "partition dropped by retention");
                    metrics::counter!("sluice_partitions_dropped_total", "table" => table.name())
                        .increment(1);
                    if let Some(r) = self.ranges.get_mut(&table) {
                        r.remove(&lower.timestamp_micros());
                    }
                    dropped.push(name);
                }
            }
        }
        Ok(dropped)
    }
}

fn micros_to_time(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The partitions of `table` as (name, lower, upper), from the catalog.
pub async fn existing(
    conn: &mut PgConnection,
    table: Table,
) -> Result<Vec<(String, DateTime<Utc>, DateTime<Utc>)>, sqlx::Error> {
    // The bound expression prints both ends as timestamptz literals in the
    // session's time zone; casting them back in the same session is exact.
    sqlx::query_as(
        "SELECT c.relname::text, \
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz, \
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass \
         ORDER BY 2",
    )
    .bind(table.name())
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_bound() {
        let config = PartitionConfig {
            points_retention_days: 30,
            ..Default::default()
        };
        let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
        assert_eq!(
            config.oldest_allowed(Table::Points, now),
            Some(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap())
        );
        assert_eq!(config.oldest_allowed(Table::Events, now), None);
    }

    #[test]
    fn coverage_uses_half_open_ranges() {
        let mut p = Partitions::new(PartitionConfig::default());
        p.ranges
            .insert(Table::Points, BTreeMap::from([(0, 10), (20, 30)]));
        assert!(p.covered(Table::Points, 0));
        assert!(p.covered(Table::Points, 9));
        assert!(!p.covered(Table::Points, 10));
        assert!(!p.covered(Table::Points, 15));
        assert!(p.covered(Table::Points, 29));
        assert!(!p.covered(Table::Points, -1));
        assert!(!p.covered(Table::Events, 5));
    }
}
