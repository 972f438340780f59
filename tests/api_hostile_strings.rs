//! SQL metacharacters, LIKE wildcards, NUL bytes and other hostile text in
//! every string parameter of the Telemetry API: each call either answers
//! with nothing (no such device or metric), or is refused with
//! `INVALID_ARGUMENT` and a message, never an internal error; nothing
//! matches by accident (a `%` prefix is not a wildcard), and the stored data
//! is untouched afterwards.

mod support;

use prost_types::Timestamp;
use sluice_proto::v1::{
    AggregatePointsRequest, LatestPointsRequest, ListDevicesWithDataRequest,
    ListMetricsWithDataRequest, QueryEventsRequest, QueryPointsRequest,
};
use std::time::{Duration, SystemTime};
use support::{Sluice, publish};
use tonic::Code;

/// Text an attacker or a confused client might put in any string field.
const HOSTILE: &[&str] = &[
    "'",
    "' OR '1'='1",
    "'; DROP TABLE points; --",
    "d1' --",
    "%",
    "_1",
    "d%",
    "\\",
    "\"",
    "$1",
    "\0",
    "d1\0",
    "é😀\u{202e}",
    "{\"a\": }",
];

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// What one call gave: how many rows (series, devices, …) or the error.
type Outcome = Result<usize, tonic::Status>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_match_nothing_and_fail_cleanly() {
    let sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("d1").await;
    publish(&client, "devices/d1/telemetry", r#"{"temperature": 21.5}"#).await;
    sluice
        .eventually("d1's point stored", Duration::from_secs(30), || async {
            (!sluice.all_points("d1").await.is_empty()).then_some(())
        })
        .await;
    let mut api = sluice.telemetry().await;
    let now = SystemTime::now();
    let (start, end) = (
        Some(timestamp(now - Duration::from_secs(86_400))),
        Some(timestamp(now + Duration::from_secs(86_400))),
    );

    let mut failures = Vec::new();
    for &s in HOSTILE {
        let text = s.to_owned();
        let calls: Vec<(&str, Outcome)> = vec![
            (
                "QueryPoints.device_id",
                api.query_points(QueryPointsRequest {
                    device_id: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "QueryPoints.device_id_prefix",
                api.query_points(QueryPointsRequest {
                    device_id_prefix: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "QueryPoints.metric",
                api.query_points(QueryPointsRequest {
                    device_id: "d1".into(),
                    metric: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "QueryPoints.page_token",
                api.query_points(QueryPointsRequest {
                    device_id: "d1".into(),
                    page_token: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "LatestPoints.device_ids",
                api.latest_points(LatestPointsRequest {
                    device_ids: vec![text.clone()],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "LatestPoints.device_id_prefix",
                api.latest_points(LatestPointsRequest {
                    device_id_prefix: text.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "LatestPoints.metrics",
                api.latest_points(LatestPointsRequest {
                    device_ids: vec!["d1".into()],
                    metrics: vec![text.clone()],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().points.len()),
            ),
            (
                "AggregatePoints.time_zone",
                api.aggregate_points(AggregatePointsRequest {
                    device_ids: vec!["d1".into()],
                    start,
                    end,
                    calendar: 1,
                    time_zone: text.clone(),
                    aggregates: vec![1],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().series.len()),
            ),
            (
                "AggregatePoints.device_id_prefix",
                api.aggregate_points(AggregatePointsRequest {
                    device_id_prefix: text.clone(),
                    start,
                    end,
                    bucket: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    aggregates: vec![1],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().series.len()),
            ),
            (
                "QueryEvents.topic_filter",
                api.query_events(QueryEventsRequest {
                    topic_filter: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().events.len()),
            ),
            (
                "QueryEvents.json_contains",
                api.query_events(QueryEventsRequest {
                    json_contains: text.clone(),
                    start,
                    end,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().events.len()),
            ),
            (
                "ListDevices.device_id_prefix",
                api.list_devices(ListDevicesWithDataRequest {
                    start,
                    end,
                    device_id_prefix: text.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().device_ids.len()),
            ),
            (
                "ListMetrics.device_ids",
                api.list_metrics(ListMetricsWithDataRequest {
                    start,
                    end,
                    device_ids: vec![text.clone()],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().series.len()),
            ),
        ];
        for (field, outcome) in calls {
            match outcome {
                Ok(0) => {}
                Ok(n) => failures.push(format!("{field} = {s:?}: matched {n} rows")),
                Err(e) if e.code() == Code::InvalidArgument && !e.message().is_empty() => {}
                Err(e) => {
                    failures.push(format!("{field} = {s:?}: {:?}: {}", e.code(), e.message()))
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The data is intact, and the server never panicked.
    assert_eq!(sluice.all_points("d1").await.len(), 1);
    let log = sluice.stop();
    assert!(!log.contains("panicked"), "{log}");
}
