//! Bucketed aggregates, answered from the rollups wherever they are exact.
//!
//! The caller gives the bucket boundaries as instants (fixed widths and
//! calendar buckets alike), and PostgreSQL assigns rows to buckets with
//! `width_bucket` over that array. A rollup row of width R lies wholly in
//! one bucket when every boundary inside the range is a multiple of R, so
//! the range is split into at most five segments: raw points up to the
//! first whole minute, 1-minute rollups up to the first whole hour, 1-hour
//! rollups for the middle, and the same mirrored at the end. The partial
//! aggregates of all segments are merged per bucket; since the rollups
//! hold count, sum, min, max and first/last with their times, the merge
//! gives what the raw points would have given (sums up to floating-point
//! rounding order).

use crate::partitions::Table;
use crate::rollup::Resolution;
use crate::writer::WriterConfig;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// From which time each rollup holds every stored point (None: it cannot
/// be used at all): rollups may be turned off, and their retention can be
/// shorter than the points'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RollupCoverage {
    pub minute: Option<DateTime<Utc>>,
    pub hour: Option<DateTime<Utc>>,
}

impl RollupCoverage {
    /// What the writer with this configuration maintains, as of `now`.
    pub fn of(config: &WriterConfig, now: DateTime<Utc>) -> Self {
        if !config.rollups {
            return Self::NONE;
        }
        // The writer rolls up points from the bucket of the oldest time
        // retention keeps; that moves forward with `now`, so everything
        // from today's bound on was rolled up when it was written.
        let from = |table, resolution: Resolution| {
            Some(
                config
                    .partitions
                    .oldest_allowed(table, now)
                    .map_or(DateTime::<Utc>::MIN_UTC, |t| resolution.bucket(t)),
            )
        };
        Self {
            minute: from(Table::Rollup1m, Resolution::Minute),
            hour: from(Table::Rollup1h, Resolution::Hour),
        }
    }

    pub const NONE: Self = Self {
        minute: None,
        hour: None,
    };
}

type Range = (DateTime<Utc>, DateTime<Utc>);

/// Which table answers which part of the range. Unused slots are empty
/// ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct Sources {
    pub raw: [Range; 3],
    pub minute: [Range; 2],
    pub hour: Range,
}

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 3_600_000_000;

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}
fn at(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).expect("within the range of the inputs")
}

impl Sources {
    /// Plans the segments for buckets with these boundaries (the first is
    /// the range's start, the last its end).
    pub fn plan(boundaries: &[DateTime<Utc>], coverage: RollupCoverage) -> Self {
        let (start, end) = (
            boundaries[0],
            *boundaries.last().expect("two boundaries at least"),
        );
        let inner = &boundaries[1..boundaries.len() - 1];
        let aligned = |width: i64| inner.iter().all(|b| micros(*b).rem_euclid(width) == 0);
        let usable = |from: Option<DateTime<Utc>>, width| from.filter(|_| aligned(width));
        let empty = (start, start);
        let mut sources = Sources {
            raw: [(start, end), empty, empty],
            minute: [empty; 2],
            hour: empty,
        };
        let minute_from = usable(coverage.minute, MINUTE);
        let (head, tail) =
            match usable(coverage.hour, HOUR).and_then(|from| whole(start, end, HOUR, from)) {
                Some(hour) => {
                    sources.hour = hour;
                    ((start, hour.0), (hour.1, end))
                }
                None => ((start, end), (end, end)),
            };
        // Each side of the hour segment: whole minutes, and raw points at the edges.
        let mut raw = Vec::with_capacity(2);
        for (i, (s, e)) in [head, tail].into_iter().enumerate() {
            if s >= e {
                continue;
            }
            match minute_from.and_then(|from| whole(s, e, MINUTE, from)) {
                Some((a, z)) => {
                    sources.minute[i] = (a, z);
                    raw.extend([(s, a), (z, e)].into_iter().filter(|(x, y)| x < y));
                }
                None => raw.push((s, e)),
            }
        }
        // At most three raw pieces: the range's two edges, and the start of
        // the tail when the 1-minute rollup's retention begins inside it.
        debug_assert!(raw.len() <= 3, "{raw:?}");
        sources.raw = [0, 1, 2].map(|i| raw.get(i).copied().unwrap_or(empty));
        sources
    }
}

/// The whole `width`-aligned stretch of [s, e) from `from` on, if any.
fn whole(s: DateTime<Utc>, e: DateTime<Utc>, width: i64, from: DateTime<Utc>) -> Option<Range> {
    let a = micros(s).div_euclid(width) * width;
    let a = if a < micros(s) { a + width } else { a };
    let from = micros(from);
    let a = a.max(
        from.div_euclid(width) * width
            + if from.rem_euclid(width) == 0 {
                0
            } else {
                width
            },
    );
    let z = micros(e).div_euclid(width) * width;
    (a < z).then(|| (at(a), at(z)))
}

pub struct AggregateQuery<'a> {
    pub series_ids: &'a [i32],
    /// Bucket `i` (1-based) is [boundaries[i-1], boundaries[i]).
    pub boundaries: &'a [DateTime<Utc>],
    pub sources: &'a Sources,
}

/// The aggregate of one series in one bucket; buckets without points are
/// absent.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct BucketAggregate {
    pub series_id: i32,
    /// 1-based, as `width_bucket` numbers them.
    pub bucket: i32,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
}

/// Aggregates ordered by series id and bucket.
pub async fn aggregate_points(
    conn: &mut PgConnection,
    q: &AggregateQuery<'_>,
) -> Result<Vec<BucketAggregate>, sqlx::Error> {
    // First and last break ties in time by value, as the rollups do, so
    // the answer never depends on which source a row came from.
    const SQL: &str = "SELECT series_id, bucket, sum(n)::bigint AS count, sum(total) AS sum, \
            min(lo) AS min, max(hi) AS max, \
            (array_agg(f ORDER BY ft, f))[1] AS first, \
            (array_agg(l ORDER BY lt DESC, l DESC))[1] AS last \
         FROM ( \
           SELECT series_id, width_bucket(time, $2::timestamptz[]) AS bucket, 1::bigint AS n, \
                  value AS total, value AS lo, value AS hi, time AS ft, value AS f, time AS lt, value AS l \
           FROM points WHERE series_id = ANY($1) \
             AND (time >= $3 AND time < $4 OR time >= $5 AND time < $6 OR time >= $13 AND time < $14) \
           UNION ALL \
           SELECT series_id, width_bucket(bucket, $2::timestamptz[]), count, sum, min, max, \
                  first_time, first, last_time, last \
           FROM rollup_1m WHERE series_id = ANY($1) \
             AND (bucket >= $7 AND bucket < $8 OR bucket >= $9 AND bucket < $10) \
           UNION ALL \
           SELECT series_id, width_bucket(bucket, $2::timestamptz[]), count, sum, min, max, \
                  first_time, first, last_time, last \
           FROM rollup_1h WHERE series_id = ANY($1) AND bucket >= $11 AND bucket < $12 \
         ) x \
         GROUP BY series_id, bucket \
         ORDER BY series_id, bucket";
    let s = q.sources;
    sqlx::query_as(SQL)
        .bind(q.series_ids)
        .bind(q.boundaries)
        .bind(s.raw[0].0)
        .bind(s.raw[0].1)
        .bind(s.raw[1].0)
        .bind(s.raw[1].1)
        .bind(s.minute[0].0)
        .bind(s.minute[0].1)
        .bind(s.minute[1].0)
        .bind(s.minute[1].1)
        .bind(s.hour.0)
        .bind(s.hour.1)
        .bind(s.raw[2].0)
        .bind(s.raw[2].1)
        .persistent(false)
        .fetch_all(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, m, s).unwrap()
    }
    const ALL: RollupCoverage = RollupCoverage {
        minute: Some(DateTime::<Utc>::MIN_UTC),
        hour: Some(DateTime::<Utc>::MIN_UTC),
    };

    #[test]
    fn hour_buckets_use_the_hourly_rollup_in_the_middle() {
        let b = [
            t(0, 10, 30),
            t(1, 0, 0),
            t(2, 0, 0),
            t(3, 0, 0),
            t(3, 20, 15),
        ];
        let s = Sources::plan(&b, ALL);
        assert_eq!(s.hour, (t(1, 0, 0), t(3, 0, 0)));
        assert_eq!(
            s.minute,
            [(t(0, 11, 0), t(1, 0, 0)), (t(3, 0, 0), t(3, 20, 0))]
        );
        assert_eq!(
            s.raw[..2],
            [(t(0, 10, 30), t(0, 11, 0)), (t(3, 20, 0), t(3, 20, 15))]
        );
        assert_eq!(s.raw[2].0, s.raw[2].1);
    }

    #[test]
    fn buckets_off_the_hour_use_minutes_and_odd_ones_raw_points() {
        let quarter = [t(0, 0, 0), t(0, 15, 0), t(0, 30, 0)];
        let s = Sources::plan(&quarter, ALL);
        assert_eq!(s.hour.0, s.hour.1);
        assert_eq!(s.minute[0], (t(0, 0, 0), t(0, 30, 0)));
        assert!(s.raw.iter().all(|(a, b)| a == b));

        let odd = [t(0, 0, 0), t(0, 0, 45), t(0, 1, 30)];
        let s = Sources::plan(&odd, ALL);
        assert_eq!(s.raw[0], (t(0, 0, 0), t(0, 1, 30)));
        assert!(s.minute.iter().all(|(a, b)| a == b));
    }

    #[test]
    fn rollups_are_not_used_before_they_are_complete() {
        let b = [t(0, 0, 0), t(1, 0, 0), t(2, 0, 0), t(3, 0, 0)];
        let s = Sources::plan(&b, RollupCoverage::NONE);
        assert_eq!(s.raw[0], (t(0, 0, 0), t(3, 0, 0)));
        let partial = RollupCoverage {
            minute: Some(t(0, 30, 0)),
            hour: Some(t(1, 30, 0)),
        };
        let s = Sources::plan(&b, partial);
        assert_eq!(s.hour, (t(2, 0, 0), t(3, 0, 0)));
        assert_eq!(s.minute[0], (t(0, 30, 0), t(2, 0, 0)));
        assert_eq!(s.raw[0], (t(0, 0, 0), t(0, 30, 0)));
    }
}
