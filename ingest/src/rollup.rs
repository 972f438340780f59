//! 1-minute and 1-hour aggregates per series, maintained as points are written.
//!
//! Each batch's points are aggregated here per (series, bucket) and merged
//! into `rollup_1m` / `rollup_1h` with one `INSERT … ON CONFLICT DO UPDATE`
//! per table, in the batch's own transaction. Every field merges
//! associatively (count and sum add, min/max take the extreme, first/last
//! keep the earlier/later sample), so the stored rollup equals the
//! aggregate of every stored point however late or out of order they came,
//! and a rolled-back batch leaves no trace.
//!
//! Ordering follows PostgreSQL's, so that a recomputation in SQL gives the
//! same answer: NaN sorts above every number (and equals NaN), and samples
//! with equal times are ordered by value. Sums are float additions in
//! another order than a recomputation's, so they agree exactly when the sums
//! are exactly representable and otherwise to rounding.

use chrono::{DateTime, Utc};
use foldhash::HashMap;
use sqlx::PgConnection;
use std::cmp::Ordering;

/// The rollup tables, by bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    pub fn table(self) -> &'static str {
        match self {
            Resolution::Minute => "rollup_1m",
            Resolution::Hour => "rollup_1h",
        }
    }

    pub fn width_micros(self) -> i64 {
        match self {
            Resolution::Minute => 60_000_000,
            Resolution::Hour => 3_600_000_000,
        }
    }

    /// The start of the bucket holding `t` (buckets are aligned to the Unix epoch).
    pub fn bucket(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let w = self.width_micros();
        DateTime::from_timestamp_micros(t.timestamp_micros().div_euclid(w) * w).unwrap_or(t)
    }
}

/// PostgreSQL's float8 order: NaN equals NaN and sorts above everything.
fn pg_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// The aggregate of some samples of one series in one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first_time: DateTime<Utc>,
    pub first: f64,
    pub last_time: DateTime<Utc>,
    pub last: f64,
}

impl Aggregate {
    pub fn of(time: DateTime<Utc>, value: f64) -> Self {
        Self {
            count: 1,
            sum: value,
            min: value,
            max: value,
            first_time: time,
            first: value,
            last_time: time,
            last: value,
        }
    }

    /// Folds `other` in. The same rules as the SQL merge in [`upsert`].
    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.sum += other.sum;
        if pg_cmp(other.min, self.min).is_lt() {
            self.min = other.min;
        }
        if pg_cmp(other.max, self.max).is_gt() {
            self.max = other.max;
        }
        let earlier = other
            .first_time
            .cmp(&self.first_time)
            .then(pg_cmp(other.first, self.first));
        if earlier.is_lt() {
            self.first_time = other.first_time;
            self.first = other.first;
        }
        let later = other
            .last_time
            .cmp(&self.last_time)
            .then(pg_cmp(other.last, self.last));
        if later.is_gt() {
            self.last_time = other.last_time;
            self.last = other.last;
        }
    }
}

/// Aggregates `(series, time, value)` samples per (series, bucket).
pub fn aggregate(
    resolution: Resolution,
    samples: impl Iterator<Item = (i32, DateTime<Utc>, f64)>,
) -> HashMap<(i32, DateTime<Utc>), Aggregate> {
    // Keyed by the bucket's start in microseconds: this runs for every
    // stored point, and integer division is far cheaper than building a
    // DateTime per point. Each bucket becomes a DateTime once, at the end.
    let width = resolution.width_micros();
    let mut by_micros: HashMap<(i32, i64), Aggregate> = HashMap::default();
    for (series, time, value) in samples {
        let sample = Aggregate::of(time, value);
        let bucket = time.timestamp_micros().div_euclid(width) * width;
        by_micros
            .entry((series, bucket))
            .and_modify(|a| a.merge(&sample))
            .or_insert(sample);
    }
    by_micros
        .into_iter()
        .map(|((series, bucket), a)| {
            let start = DateTime::from_timestamp_micros(bucket).unwrap_or(a.first_time);
            ((series, start), a)
        })
        .collect()
}

/// Merges the aggregates into the resolution's table. Each key must appear
/// once (PostgreSQL refuses to update a row twice in one statement), which
/// [`aggregate`]'s map guarantees.
pub async fn upsert(
    conn: &mut PgConnection,
    resolution: Resolution,
    aggregates: &HashMap<(i32, DateTime<Utc>), Aggregate>,
) -> Result<(), sqlx::Error> {
    if aggregates.is_empty() {
        return Ok(());
    }
    let n = aggregates.len();
    let mut series = Vec::with_capacity(n);
    let mut bucket = Vec::with_capacity(n);
    let mut count = Vec::with_capacity(n);
    let mut sum = Vec::with_capacity(n);
    let mut min = Vec::with_capacity(n);
    let mut max = Vec::with_capacity(n);
    let mut first_time = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut last_time = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    for (&(s, b), a) in aggregates {
        series.push(s);
        bucket.push(b);
        count.push(a.count);
        sum.push(a.sum);
        min.push(a.min);
        max.push(a.max);
        first_time.push(a.first_time);
        first.push(a.first);
        last_time.push(a.last_time);
        last.push(a.last);
    }
    // The table name is one of two constants; every value is bound.
    let sql = format!(
        "INSERT INTO {} AS r \
           (series_id, bucket, count, sum, min, max, first_time, first, last_time, last) \
         SELECT * FROM unnest($1::int4[], $2::timestamptz[], $3::int8[], $4::float8[], \
           $5::float8[], $6::float8[], $7::timestamptz[], $8::float8[], $9::timestamptz[], \
           $10::float8[]) \
         ON CONFLICT (series_id, bucket) DO UPDATE SET \
           count = r.count + EXCLUDED.count, \
           sum = r.sum + EXCLUDED.sum, \
           min = least(r.min, EXCLUDED.min), \
           max = greatest(r.max, EXCLUDED.max), \
           first_time = CASE WHEN (EXCLUDED.first_time, EXCLUDED.first) < (r.first_time, r.first) \
                        THEN EXCLUDED.first_time ELSE r.first_time END, \
           first = CASE WHEN (EXCLUDED.first_time, EXCLUDED.first) < (r.first_time, r.first) \
                   THEN EXCLUDED.first ELSE r.first END, \
           last_time = CASE WHEN (EXCLUDED.last_time, EXCLUDED.last) > (r.last_time, r.last) \
                       THEN EXCLUDED.last_time ELSE r.last_time END, \
           last = CASE WHEN (EXCLUDED.last_time, EXCLUDED.last) > (r.last_time, r.last) \
                  THEN EXCLUDED.last ELSE r.last END",
        resolution.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(series)
        .bind(bucket)
        .bind(count)
        .bind(sum)
        .bind(min)
        .bind(max)
        .bind(first_time)
        .bind(first)
        .bind(last_time)
        .bind(last)
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    #[test]
    fn buckets_are_epoch_aligned_also_before_1970() {
        assert_eq!(Resolution::Minute.bucket(t(125)), t(120));
        assert_eq!(Resolution::Hour.bucket(t(3599)), t(0));
        assert_eq!(Resolution::Minute.bucket(t(-1)), t(-60));
    }

    #[test]
    fn merging_in_any_order_gives_the_same_aggregate() {
        let samples = [
            (t(5), 2.0),
            (t(1), 7.0),
            (t(9), -1.0),
            (t(1), 3.0),
            (t(9), 4.0),
        ];
        let fold = |order: &[usize]| {
            let mut a = Aggregate::of(samples[order[0]].0, samples[order[0]].1);
            for &i in &order[1..] {
                a.merge(&Aggregate::of(samples[i].0, samples[i].1));
            }
            a
        };
        let forward = fold(&[0, 1, 2, 3, 4]);
        assert_eq!(forward, fold(&[4, 3, 2, 1, 0]));
        assert_eq!(forward, fold(&[2, 0, 4, 1, 3]));
        assert_eq!(forward.count, 5);
        assert_eq!(forward.sum, 15.0);
        assert_eq!((forward.min, forward.max), (-1.0, 7.0));
        // Equal times: ordered by value.
        assert_eq!((forward.first_time, forward.first), (t(1), 3.0));
        assert_eq!((forward.last_time, forward.last), (t(9), 4.0));
    }

    #[test]
    fn nan_orders_like_postgres() {
        let mut a = Aggregate::of(t(0), 1.0);
        a.merge(&Aggregate::of(t(0), f64::NAN));
        assert_eq!(a.min, 1.0);
        assert!(a.max.is_nan());
        assert!(a.last.is_nan(), "NaN sorts last at equal times");
        assert_eq!(a.first, 1.0);
    }

    #[test]
    fn aggregates_group_by_series_and_bucket() {
        let got = aggregate(
            Resolution::Minute,
            [
                (1, t(0), 1.0),
                (1, t(59), 2.0),
                (1, t(60), 3.0),
                (2, t(0), 4.0),
            ]
            .into_iter(),
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got[&(1, t(0))].count, 2);
        assert_eq!(got[&(1, t(60))].sum, 3.0);
        assert_eq!(got[&(2, t(0))].first, 4.0);
    }
}
