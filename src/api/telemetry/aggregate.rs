//! `AggregatePoints`: bucket boundaries (fixed or calendar), the query,
//! and the fill of empty buckets.

use super::TelemetryService;
use super::points::series_of;
use super::request::{
    check_scan, checked_page_size, closed_time_range, db_error, range_query, selection,
    selection_fingerprint, to_timestamp,
};
use crate::api::cancel::QueryConnection;
use crate::api::page_token::Kind;
use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use sluice_ingest::query::{self, AggregateQuery, BucketAggregate, RollupCoverage, Sources};
use sluice_proto::v1::{
    Aggregate, AggregatePointsRequest, AggregatePointsResponse, AggregateSeries, Bucket, Calendar,
    Fill,
};
use std::collections::HashMap;
use tonic::Status;

/// Buckets one response may hold, over all its series (fill included).
pub const MAX_BUCKETS: usize = 100_000;
/// Series per page when the request says 0.
const DEFAULT_SERIES_PER_PAGE: u32 = 100;
const MAX_SERIES_PER_PAGE: u32 = 10_000;

/// How the range is cut.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Buckets {
    /// Fixed width in microseconds, aligned to the Unix epoch.
    Fixed(i64),
    Calendar(Calendar, Tz),
}

fn buckets_of(r: &AggregatePointsRequest) -> Result<Buckets, Status> {
    let calendar = Calendar::try_from(r.calendar)
        .map_err(|_| Status::invalid_argument(format!("calendar {} is unknown", r.calendar)))?;
    match (&r.bucket, calendar) {
        (Some(_), c) if c != Calendar::Unspecified => Err(Status::invalid_argument(
            "bucket and calendar: set one of them, not both",
        )),
        (None, Calendar::Unspecified) => Err(Status::invalid_argument(
            "bucket (a fixed width) or calendar (day, week or month) is required",
        )),
        (Some(d), _) => {
            if !r.time_zone.is_empty() {
                return Err(Status::invalid_argument(
                    "time_zone applies to calendar buckets only; fixed buckets are aligned to the Unix epoch",
                ));
            }
            let micros = i128::from(d.seconds) * 1_000_000 + i128::from(d.nanos / 1_000);
            if d.nanos < 0 || d.nanos % 1_000 != 0 || micros < 1_000_000 {
                return Err(Status::invalid_argument(
                    "bucket must be at least 1 second, in whole microseconds",
                ));
            }
            let micros = i64::try_from(micros)
                .map_err(|_| Status::invalid_argument("bucket is too long"))?;
            Ok(Buckets::Fixed(micros))
        }
        (None, c) => {
            let tz = if r.time_zone.is_empty() {
                Tz::UTC
            } else {
                r.time_zone.parse::<Tz>().map_err(|_| {
                    Status::invalid_argument(format!(
                        "time_zone {:?} is not an IANA time zone name (like \"Europe/Berlin\")",
                        r.time_zone
                    ))
                })?
            };
            Ok(Buckets::Calendar(c, tz))
        }
    }
}

fn too_many_buckets() -> Status {
    Status::resource_exhausted(format!(
        "the range holds more than {MAX_BUCKETS} buckets per series; \
         narrow the range or use wider buckets"
    ))
}

/// The first instant of a local date in `tz`: its midnight, or, where a
/// daylight-saving change skips midnight, the first time that exists.
fn local_start(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    (0..=24 * 4)
        .find_map(|quarter| {
            tz.from_local_datetime(&(midnight + TimeDelta::minutes(15 * quarter)))
                .earliest()
        })
        .expect("a day has some valid local time")
        .with_timezone(&Utc)
}

/// Bucket boundaries: the range's start, every bucket start inside it, and
/// its end. Bucket `i` (1-based) is [b[i-1], b[i]).
fn boundaries(
    buckets: Buckets,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, Status> {
    let mut b = vec![start];
    match buckets {
        Buckets::Fixed(width) => {
            let (s, e) = (start.timestamp_micros(), end.timestamp_micros());
            if (e - s) / width >= MAX_BUCKETS as i64 {
                return Err(too_many_buckets());
            }
            let mut t = s.div_euclid(width) * width + width;
            while t < e {
                b.push(DateTime::from_timestamp_micros(t).expect("inside the range"));
                t += width;
            }
        }
        Buckets::Calendar(unit, tz) => {
            let first_day = start.with_timezone(&tz).date_naive();
            let mut period = match unit {
                Calendar::Week => {
                    first_day - Days::new(u64::from(first_day.weekday().num_days_from_monday()))
                }
                Calendar::Month => first_day.with_day(1).expect("day 1 exists"),
                _ => first_day,
            };
            loop {
                period = match unit {
                    Calendar::Week => period + Days::new(7),
                    Calendar::Month => period + Months::new(1),
                    _ => period + Days::new(1),
                };
                let t = local_start(tz, period);
                if t >= end {
                    break;
                }
                if b.len() > MAX_BUCKETS {
                    return Err(too_many_buckets());
                }
                b.push(t);
            }
        }
    }
    b.push(end);
    Ok(b)
}

/// One requested aggregate's value from a bucket's partial aggregates.
fn value(a: Aggregate, x: &BucketAggregate) -> f64 {
    match a {
        Aggregate::Avg => x.sum / x.count as f64,
        Aggregate::Min => x.min,
        Aggregate::Max => x.max,
        Aggregate::Sum => x.sum,
        Aggregate::Count => x.count as f64,
        Aggregate::First => x.first,
        Aggregate::Last => x.last,
        Aggregate::Unspecified => unreachable!("refused when the request is checked"),
    }
}

/// One series' buckets, empty ones filled as asked. `rows` are the
/// series' non-empty buckets in order.
fn series_buckets(
    rows: &[BucketAggregate],
    boundaries: &[DateTime<Utc>],
    aggregates: &[Aggregate],
    fill: Fill,
) -> Vec<Bucket> {
    let start = |i: i32| boundaries[(i - 1) as usize];
    let values = |x: &BucketAggregate| aggregates.iter().map(|a| value(*a, x)).collect();
    let bucket = |i: i32, values: Vec<f64>, filled: bool| Bucket {
        start: Some(to_timestamp(start(i))),
        values,
        filled,
    };
    if fill == Fill::None {
        return rows
            .iter()
            .map(|x| bucket(x.bucket, values(x), false))
            .collect();
    }
    let n = (boundaries.len() - 1) as i32;
    let mut out = Vec::with_capacity(n as usize);
    let mut next = 0; // index into rows of the next bucket with data
    for i in 1..=n {
        if let Some(x) = rows.get(next).filter(|x| x.bucket == i) {
            out.push(bucket(i, values(x), false));
            next += 1;
            continue;
        }
        let before = next.checked_sub(1).map(|j| &rows[j]);
        let after = rows.get(next);
        let filled = match (fill, before, after) {
            (Fill::Previous, Some(b), _) => aggregates
                .iter()
                .map(|a| {
                    if *a == Aggregate::Count {
                        0.0
                    } else {
                        value(*a, b)
                    }
                })
                .collect(),
            (Fill::Linear, Some(b), Some(a)) => {
                let (t0, t1, t) = (
                    start(b.bucket).timestamp_micros() as f64,
                    start(a.bucket).timestamp_micros() as f64,
                    start(i).timestamp_micros() as f64,
                );
                let w = (t - t0) / (t1 - t0);
                aggregates
                    .iter()
                    .map(|g| match g {
                        Aggregate::Count => 0.0,
                        g => value(*g, b) + (value(*g, a) - value(*g, b)) * w,
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        out.push(bucket(i, filled, true));
    }
    out
}

impl TelemetryService {
    pub(super) async fn aggregate(
        &self,
        r: AggregatePointsRequest,
    ) -> Result<AggregatePointsResponse, Status> {
        let (start, end) = closed_time_range(r.start.as_ref(), r.end.as_ref())?;
        let buckets = buckets_of(&r)?;
        if r.aggregates.is_empty() {
            return Err(Status::invalid_argument(
                "aggregates: name at least one (AVG, MIN, MAX, SUM, COUNT, FIRST, LAST)",
            ));
        }
        let aggregates = r
            .aggregates
            .iter()
            .map(|a| match Aggregate::try_from(*a) {
                Ok(Aggregate::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
                    "aggregates holds {a}, which is not an aggregate"
                ))),
                Ok(a) => Ok(a),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fill = Fill::try_from(r.fill)
            .map_err(|_| Status::invalid_argument(format!("fill {} is unknown", r.fill)))?;
        let per_page = checked_page_size(r.limit, DEFAULT_SERIES_PER_PAGE, MAX_SERIES_PER_PAGE)?;
        let selection = selection(
            r.device_ids.clone(),
            r.device_id_prefix.clone(),
            r.metrics.clone(),
            true,
        )?;
        let boundaries = boundaries(buckets, start, end)?;
        let n_buckets = boundaries.len() - 1;
        // A page holds at most MAX_BUCKETS buckets in all.
        let per_page = per_page.min((MAX_BUCKETS / n_buckets).max(1) as u32) as usize;

        let mut spec = selection_fingerprint(&selection);
        spec.extend(format!("{buckets:?}/{aggregates:?}/{fill:?}").as_bytes());
        let fingerprint = range_query(&[&spec], start, end);
        let after =
            self.pages
                .decode_after_series(Kind::Aggregates, &fingerprint, &r.page_token)?;

        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let all = series_of(&mut conn, &selection).await?;
        // Series are listed in the database's collation order, so the page
        // resumes after the token's series found by name, not by comparison.
        let first = match &after {
            None => 0,
            Some((device, metric)) => {
                all.iter()
                    .position(|s| (&s.device_id, &s.metric) == (device, metric))
                    .ok_or_else(|| {
                        Status::invalid_argument("page_token: its series is no longer selected")
                    })?
                    + 1
            }
        };
        let page = &all[first..all.len().min(first + per_page)];
        let ids: Vec<i32> = page.iter().map(|s| s.id).collect();

        let coverage = RollupCoverage::of(&self.writer, Utc::now());
        let sources = Sources::plan(&boundaries, coverage);
        let raw_rows = {
            let mut rows = 0.0;
            for (a, z) in sources.raw.iter().filter(|(a, z)| a < z) {
                rows += conn
                    .run(|c| query::estimate_point_rows(c, &ids, *a, *z))
                    .await
                    .map_err(db_error)?;
            }
            rows
        };
        let span_len = |(a, z): (DateTime<Utc>, DateTime<Utc>), unit: i64| {
            ((z - a).num_microseconds().unwrap_or(i64::MAX) / unit) as f64
        };
        let rollup_rows = ids.len() as f64
            * (sources
                .minute
                .iter()
                .map(|m| span_len(*m, 60_000_000))
                .sum::<f64>()
                + span_len(sources.hour, 3_600_000_000));
        check_scan(
            raw_rows + rollup_rows,
            self.limits.max_scan_rows,
            "narrow the range, select fewer series, or use buckets of whole minutes or hours \
             (those are answered from the rollups)",
        )?;
        let q = AggregateQuery {
            series_ids: &ids,
            boundaries: &boundaries,
            sources: &sources,
        };
        let rows = conn
            .run(|c| query::aggregate_points(c, &q))
            .await
            .map_err(db_error)?;

        let mut by_series: HashMap<i32, Vec<BucketAggregate>> = HashMap::new();
        for row in rows {
            by_series.entry(row.series_id).or_default().push(row);
        }
        let series = page
            .iter()
            .filter_map(|s| {
                let rows = by_series.get(&s.id)?;
                Some(AggregateSeries {
                    device_id: s.device_id.clone(),
                    metric: s.metric.clone(),
                    buckets: series_buckets(rows, &boundaries, &aggregates, fill),
                })
            })
            .collect();
        let next_page_token = if first + page.len() < all.len() {
            let last = page.last().expect("a page holds at least one series");
            self.pages.encode_after_series(
                Kind::Aggregates,
                &fingerprint,
                &last.device_id,
                &last.metric,
            )
        } else {
            String::new()
        };
        Ok(AggregatePointsResponse {
            series,
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, 0, 0).unwrap()
    }

    #[test]
    fn fixed_buckets_are_aligned_to_the_epoch_and_clipped() {
        let b = boundaries(
            Buckets::Fixed(3_600_000_000),
            utc(2026, 1, 1, 0) + TimeDelta::minutes(30),
            utc(2026, 1, 1, 3),
        )
        .unwrap();
        assert_eq!(
            b,
            vec![
                utc(2026, 1, 1, 0) + TimeDelta::minutes(30),
                utc(2026, 1, 1, 1),
                utc(2026, 1, 1, 2),
                utc(2026, 1, 1, 3)
            ]
        );
        assert!(
            boundaries(
                Buckets::Fixed(1_000_000),
                utc(2026, 1, 1, 0),
                utc(2026, 1, 3, 0)
            )
            .is_err()
        );
    }

    #[test]
    fn calendar_days_follow_daylight_saving() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // DST starts on 2026-03-29: that local day is 23 hours long.
        let b = boundaries(
            Buckets::Calendar(Calendar::Day, berlin),
            utc(2026, 3, 28, 0),
            utc(2026, 3, 31, 0),
        )
        .unwrap();
        assert_eq!(
            b,
            vec![
                utc(2026, 3, 28, 0),
                utc(2026, 3, 28, 23),
                utc(2026, 3, 29, 22),
                utc(2026, 3, 30, 22),
                utc(2026, 3, 31, 0)
            ]
        );
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        // 2026-11-25 is a Wednesday.
        let b = boundaries(
            Buckets::Calendar(Calendar::Week, Tz::UTC),
            utc(2026, 11, 25, 0),
            utc(2026, 12, 10, 0),
        )
        .unwrap();
        assert_eq!(
            b,
            vec![
                utc(2026, 11, 25, 0),
                utc(2026, 11, 30, 0),
                utc(2026, 12, 7, 0),
                utc(2026, 12, 10, 0)
            ]
        );
        let b = boundaries(
            Buckets::Calendar(Calendar::Month, Tz::UTC),
            utc(2026, 1, 15, 0),
            utc(2026, 3, 2, 0),
        )
        .unwrap();
        assert_eq!(
            b,
            vec![
                utc(2026, 1, 15, 0),
                utc(2026, 2, 1, 0),
                utc(2026, 3, 1, 0),
                utc(2026, 3, 2, 0)
            ]
        );
    }

    fn agg(bucket: i32, v: f64) -> BucketAggregate {
        BucketAggregate {
            series_id: 1,
            bucket,
            count: 2,
            sum: 2.0 * v,
            min: v,
            max: v,
            first: v,
            last: v,
        }
    }

    #[test]
    fn empty_buckets_are_filled_as_asked() {
        let b: Vec<_> = (0..5).map(|h| utc(2026, 1, 1, h)).collect();
        let rows = [agg(1, 10.0), agg(4, 40.0)];
        let a = [Aggregate::Avg, Aggregate::Count];
        let vals = |fill| {
            series_buckets(&rows, &b, &a, fill)
                .into_iter()
                .map(|b| (b.values, b.filled))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            vals(Fill::None),
            vec![(vec![10.0, 2.0], false), (vec![40.0, 2.0], false)]
        );
        assert_eq!(vals(Fill::Null)[1], (vec![], true));
        assert_eq!(vals(Fill::Previous)[2], (vec![10.0, 0.0], true));
        assert_eq!(
            vals(Fill::Linear)[1..3],
            [(vec![20.0, 0.0], true), (vec![30.0, 0.0], true)]
        );
        // Nothing to interpolate from after the last bucket with data.
        let rows = [agg(2, 10.0)];
        let lin = series_buckets(&rows, &b, &a, Fill::Linear);
        assert!(lin[0].values.is_empty() && lin[3].values.is_empty());
    }
}
