//! `AggregatePoints` against a real `sluice serve`: every aggregate, for
//! buckets answered from the hourly rollup, the per-minute rollup and raw
//! points, checked against the same aggregates computed here from the
//! points as published; calendar buckets, fill modes, paging and errors.

mod support;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use sluice_proto::v1::{Aggregate, AggregatePointsRequest, AggregateSeries, Calendar, Fill};
use std::time::Duration;
use support::{Sluice, publish};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// The published points of `agg-1`: one every 47 s, with a gap of 30.
fn points(base: DateTime<Utc>) -> Vec<(DateTime<Utc>, f64)> {
    (0..400)
        .filter(|k| !(200..230).contains(k))
        .map(|k| {
            let time = base + chrono::Duration::seconds(47 * k);
            (time, ((k * 37) % 101) as f64 - 50.0 + 0.25)
        })
        .collect()
}

const ALL: [Aggregate; 7] = [
    Aggregate::Avg,
    Aggregate::Min,
    Aggregate::Max,
    Aggregate::Sum,
    Aggregate::Count,
    Aggregate::First,
    Aggregate::Last,
];

/// (bucket start, [AVG MIN MAX SUM COUNT FIRST LAST]) of the non-empty
/// buckets of width `width_s` seconds, aligned to the epoch, clipped to
/// [start, end), computed from the points directly.
fn expected(
    points: &[(DateTime<Utc>, f64)],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    width_s: i64,
) -> Vec<(DateTime<Utc>, Vec<f64>)> {
    type Members = Vec<(DateTime<Utc>, f64)>;
    let mut out: Vec<(DateTime<Utc>, Members)> = Vec::new();
    for &(t, v) in points.iter().filter(|(t, _)| *t >= start && *t < end) {
        let aligned = Utc
            .timestamp_opt(t.timestamp().div_euclid(width_s) * width_s, 0)
            .unwrap()
            .max(start);
        match out.last_mut() {
            Some((b, members)) if *b == aligned => members.push((t, v)),
            _ => out.push((aligned, vec![(t, v)])),
        }
    }
    out.into_iter()
        .map(|(b, m)| {
            let values: Vec<f64> = m.iter().map(|x| x.1).collect();
            let sum: f64 = values.iter().sum();
            let n = values.len() as f64;
            let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            // Points have distinct times, so first and last are plain.
            let first = m.first().unwrap().1;
            let last = m.last().unwrap().1;
            (b, vec![sum / n, min, max, sum, n, first, last])
        })
        .collect()
}

fn from_ts(t: &prost_types::Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.seconds, t.nanos as u32).unwrap()
}
fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}
fn seconds(s: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s,
        nanos: 0,
    }
}

fn request(start: DateTime<Utc>, end: DateTime<Utc>) -> AggregatePointsRequest {
    AggregatePointsRequest {
        device_ids: vec!["agg-1".into()],
        metrics: vec!["v".into()],
        start: Some(ts(start)),
        end: Some(ts(end)),
        aggregates: ALL.iter().map(|a| *a as i32).collect(),
        ..Default::default()
    }
}

fn assert_close(got: &AggregateSeries, want: &[(DateTime<Utc>, Vec<f64>)], what: &str) {
    let got: Vec<(DateTime<Utc>, &Vec<f64>)> = got
        .buckets
        .iter()
        .map(|b| (from_ts(b.start.as_ref().unwrap()), &b.values))
        .collect();
    assert_eq!(got.len(), want.len(), "{what}: bucket count");
    for ((gt, gv), (wt, wv)) in got.iter().zip(want) {
        assert_eq!(gt, wt, "{what}: bucket start");
        for (i, (g, w)) in gv.iter().zip(wv).enumerate() {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{what}: bucket {gt}, {:?}: got {g}, want {w}",
                ALL[i]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_match_the_raw_points_from_every_source() {
    let sluice = Sluice::start(|_| {}).await;
    // Six hours ago, on an odd second, so no bucket lines up by chance.
    let base = Utc::now().with_nanosecond(0).unwrap() - chrono::Duration::hours(6);
    let base =
        base - chrono::Duration::seconds(i64::from(base.second())) + chrono::Duration::seconds(7);
    let data = points(base);
    let client = sluice.mqtt("aggregator").await;
    for (t, v) in &data {
        let body = format!(r#"{{"v": {v}, "ts": {}}}"#, t.timestamp_millis());
        publish(&client, "devices/agg-1/telemetry", body).await;
    }
    publish(
        &client,
        "devices/agg-2/telemetry",
        format!(r#"{{"v": 1, "ts": {}}}"#, base.timestamp_millis()),
    )
    .await;
    sluice
        .eventually("every point stored", WAIT, || async {
            (sluice.all_points("agg-1").await.len() == data.len()
                && sluice.all_points("agg-2").await.len() == 1)
                .then_some(())
        })
        .await;
    let mut api = sluice.telemetry().await;

    // Hourly buckets (1-hour rollup in the middle, 1-minute and raw at the
    // edges), 15-minute buckets (1-minute rollup), 7-second buckets (raw).
    let (start, end) = (
        base + chrono::Duration::seconds(13 * 60 + 27),
        base + chrono::Duration::seconds(5 * 3600 + 2 * 60 + 11),
    );
    for (width, start, end) in [
        (3600, start, end),
        (900, start, end),
        (
            7,
            base + chrono::Duration::minutes(10),
            base + chrono::Duration::minutes(40),
        ),
    ] {
        let r = api
            .aggregate_points(AggregatePointsRequest {
                bucket: Some(seconds(width)),
                ..request(start, end)
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.series.len(), 1);
        assert_close(
            &r.series[0],
            &expected(&data, start, end, width),
            &format!("{width} s"),
        );
        assert!(r.next_page_token.is_empty());
    }

    // Calendar days in India (UTC+5:30): local midnight is at :30 past a
    // UTC hour, so these come from the 1-minute rollup and raw points.
    let whole = (base - chrono::Duration::days(1), Utc::now());
    let r = api
        .aggregate_points(AggregatePointsRequest {
            calendar: Calendar::Day as i32,
            time_zone: "Asia/Kolkata".into(),
            aggregates: vec![Aggregate::Count as i32],
            ..request(whole.0, whole.1)
        })
        .await
        .unwrap()
        .into_inner();
    let buckets = &r.series[0].buckets;
    let total: f64 = buckets.iter().map(|b| b.values[0]).sum();
    assert_eq!(total, data.len() as f64);
    for b in buckets.iter().skip(1) {
        let t = from_ts(b.start.as_ref().unwrap());
        assert_eq!(
            (t.hour(), t.minute()),
            (18, 30),
            "local midnight in Kolkata"
        );
    }

    // Fill: 5-minute buckets over the gap (points 200..230 were never sent).
    let (gap_start, gap_end) = (
        base + chrono::Duration::seconds(47 * 190),
        base + chrono::Duration::seconds(47 * 240),
    );
    let filled = |fill: Fill| {
        let mut api = api.clone();
        async move {
            api.aggregate_points(AggregatePointsRequest {
                bucket: Some(seconds(300)),
                aggregates: vec![Aggregate::Avg as i32, Aggregate::Count as i32],
                fill: fill as i32,
                ..request(gap_start, gap_end)
            })
            .await
            .unwrap()
            .into_inner()
            .series
            .remove(0)
            .buckets
        }
    };
    let none = filled(Fill::None).await;
    let null = filled(Fill::Null).await;
    let linear = filled(Fill::Linear).await;
    let previous = filled(Fill::Previous).await;
    assert!(null.len() > none.len(), "the gap spans empty buckets");
    assert!(none.iter().all(|b| !b.filled && b.values.len() == 2));
    let empty: Vec<_> = null.iter().filter(|b| b.filled).collect();
    assert_eq!(empty.len(), null.len() - none.len());
    assert!(empty.iter().all(|b| b.values.is_empty()));
    for (i, b) in linear.iter().enumerate().filter(|(_, b)| b.filled) {
        let before = linear[..i].iter().rev().find(|b| !b.filled);
        let after = linear[i..].iter().find(|b| !b.filled);
        let (Some(lo), Some(hi)) = (before, after) else {
            assert!(
                b.values.is_empty(),
                "nothing to interpolate from on one side"
            );
            continue;
        };
        assert_eq!(b.values[1], 0.0, "COUNT of a filled bucket");
        let (a, z) = (
            lo.values[0].min(hi.values[0]),
            lo.values[0].max(hi.values[0]),
        );
        assert!(
            b.values[0] >= a && b.values[0] <= z,
            "interpolated between its neighbours"
        );
    }
    assert!(linear.iter().any(|b| b.filled && !b.values.is_empty()));
    for (i, b) in previous.iter().enumerate().filter(|(_, b)| b.filled) {
        let before = previous[..i].iter().rev().find(|b| !b.filled).unwrap();
        assert_eq!(b.values[0], before.values[0]);
    }

    // A prefix selects both devices; one series per page.
    let mut page_token = String::new();
    let mut seen = Vec::new();
    loop {
        let r = api
            .aggregate_points(AggregatePointsRequest {
                device_ids: vec![],
                device_id_prefix: "agg-".into(),
                bucket: Some(seconds(86_400)),
                limit: 1,
                page_token,
                ..request(whole.0, whole.1)
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(r.series.into_iter().map(|s| s.device_id));
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!(seen, ["agg-1", "agg-2"]);

    // The hourly buckets in the middle come from the rollup: with the raw
    // points of those hours gone, their aggregates do not change.
    let first_hour = Utc
        .timestamp_opt((start.timestamp() / 3600 + 1) * 3600, 0)
        .unwrap();
    let (h0, h1) = (first_hour, first_hour + chrono::Duration::hours(3));
    sqlx::query("DELETE FROM points WHERE time >= $1 AND time < $2")
        .bind(h0)
        .bind(h1)
        .execute(&sluice.db)
        .await
        .unwrap();
    let r = api
        .aggregate_points(AggregatePointsRequest {
            bucket: Some(seconds(3600)),
            ..request(start, end)
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(
        &r.series[0],
        &expected(&data, start, end, 3600),
        "hourly, raw points deleted",
    );

    // Bad requests name their field; too many buckets is RESOURCE_EXHAUSTED.
    for (bad, field) in [
        (
            AggregatePointsRequest {
                aggregates: vec![],
                bucket: Some(seconds(60)),
                ..request(start, end)
            },
            "aggregates",
        ),
        (
            AggregatePointsRequest {
                ..request(start, end)
            },
            "bucket",
        ),
        (
            AggregatePointsRequest {
                bucket: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                ..request(start, end)
            },
            "bucket",
        ),
        (
            AggregatePointsRequest {
                bucket: Some(seconds(60)),
                calendar: Calendar::Day as i32,
                ..request(start, end)
            },
            "calendar",
        ),
        (
            AggregatePointsRequest {
                calendar: Calendar::Day as i32,
                time_zone: "Mars/Olympus".into(),
                ..request(start, end)
            },
            "time_zone",
        ),
        (
            AggregatePointsRequest {
                bucket: Some(seconds(60)),
                start: None,
                ..request(start, end)
            },
            "start",
        ),
    ] {
        let e = api.aggregate_points(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = api
        .aggregate_points(AggregatePointsRequest {
            bucket: Some(seconds(1)),
            ..request(base - chrono::Duration::days(30), end)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("wider buckets"), "{}", e.message());
    sluice.stop();
}
