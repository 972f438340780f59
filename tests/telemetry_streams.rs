//! The Telemetry API's streams and filters against a real `sluice serve`:
//! StreamPoints (order, limits, the scan bound, and a client that leaves
//! stopping its database query), events by devices, topic and JSON
//! content, ListDevices/ListMetrics, and Subscribe with its gap markers.

mod support;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sluice_proto::v1::{
    ListDevicesWithDataRequest, ListMetricsWithDataRequest, Order, Point, QueryEventsRequest,
    QueryPointsRequest, SubscribeRequest,
};
use std::time::Duration;
use support::{Options, Sluice, publish};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn micros(p: &Point) -> i64 {
    let t = p.time.as_ref().unwrap();
    t.seconds * 1_000_000 + i64::from(t.nanos / 1_000)
}

/// Every point a StreamPoints call sends, or its error.
async fn stream_all(sluice: &Sluice, r: QueryPointsRequest) -> Result<Vec<Point>, tonic::Status> {
    let mut api = sluice.telemetry().await;
    let mut stream = api.stream_points(r).await?.into_inner();
    let mut points = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        assert!(batch.points.len() <= 1_000, "bounded messages");
        points.extend(batch.points);
    }
    Ok(points)
}

/// `sluice_api_queries_cancelled_total`, 0 before the first.
async fn cancelled(sluice: &Sluice) -> f64 {
    sluice
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("sluice_api_queries_cancelled_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Queries of the API's stream that are running in PostgreSQL now.
async fn running_streams(sluice: &Sluice) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE state = 'active' AND query LIKE '%ORDER BY series_id, time%' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_one(&sluice.db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_filters_and_lists() {
    let sluice = Sluice::start_with(
        Options {
            env: vec![("SLUICE_API__MAX_SCAN_ROWS".into(), "300000".into())],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    // Whole milliseconds, as telemetry timestamps are.
    let t0 = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
        - chrono::Duration::minutes(30);
    let ms = |n: i64| t0 + chrono::Duration::milliseconds(n);
    let client = sluice.mqtt("streamer").await;
    // The writer makes the partitions from these; the bulk of big-1's
    // points is then loaded straight into the table between them.
    for (device, fields, at) in [
        ("big-1", r#""v": 0"#, 0),
        ("big-1", r#""v": 0"#, 600_000),
        ("s-1", r#""a": 1, "b": 10"#, 1_000),
        ("s-1", r#""a": 2, "b": 20"#, 2_000),
    ] {
        let body = format!(r#"{{{fields}, "ts": {}}}"#, ms(at).timestamp_millis());
        publish(&client, &format!("devices/{device}/telemetry"), body).await;
    }
    for (topic, body) in [
        ("devices/ev-1/status", r#"{"level": "alarm", "code": 7}"#),
        ("devices/ev-1/status", r#"{"level": "ok"}"#),
        ("devices/ev-1/status", "not json at all"),
        ("devices/ev-2/status", r#"{"level": "alarm"}"#),
        ("devices/ev-3/other", r#"{"level": "alarm"}"#),
    ] {
        publish(&client, topic, body).await;
    }
    sluice
        .eventually("the published data stored", WAIT, || async {
            let points =
                sluice.all_points("big-1").await.len() + sluice.all_points("s-1").await.len();
            let events = sluice.all_events("devices/#").await.len();
            (points == 6 && events == 5).then_some(())
        })
        .await;
    sqlx::query(
        "INSERT INTO points (series_id, time, value) \
         SELECT s.id, $1 + i * interval '1 millisecond', i FROM series s, generate_series(1, 400000) i \
         WHERE s.device_id = 'big-1'",
    )
    .bind(t0)
    .execute(&sluice.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE points")
        .execute(&sluice.db)
        .await
        .unwrap();

    let big = QueryPointsRequest {
        device_id: "big-1".into(),
        metric: "v".into(),
        ..Default::default()
    };
    // 400,002 points is over this server's scan bound of 300,000 ...
    let e = stream_all(&sluice, big.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("AggregatePoints"), "{}", e.message());
    // ... a narrower range is not, and arrives whole and in order ...
    let first_200s = stream_all(
        &sluice,
        QueryPointsRequest {
            start: Some(ts(t0)),
            end: Some(ts(t0 + chrono::Duration::seconds(200))),
            ..big.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(first_200s.len(), 200_000);
    assert!(first_200s.windows(2).all(|w| micros(&w[0]) < micros(&w[1])));
    // ... and so is a limited one, newest first.
    let newest = stream_all(
        &sluice,
        QueryPointsRequest {
            order: Order::Descending as i32,
            limit: 3,
            ..big.clone()
        },
    )
    .await
    .unwrap();
    let newest: Vec<i64> = newest
        .iter()
        .map(|p| (micros(p) - t0.timestamp_micros()) / 1000)
        .collect();
    assert_eq!(newest, [600_000, 400_000, 399_999]);
    // Several series: one after the other, each in time order.
    let s1 = stream_all(
        &sluice,
        QueryPointsRequest {
            device_id: "s-1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut s1: Vec<(String, f64)> = s1.into_iter().map(|p| (p.metric, p.value)).collect();
    // One series after the other (in the order they were first stored),
    // each in time order.
    assert!(s1[0].0 == s1[1].0 && s1[2].0 == s1[3].0, "{s1:?}");
    s1.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        s1,
        [
            ("a".into(), 1.0),
            ("a".into(), 2.0),
            ("b".into(), 10.0),
            ("b".into(), 20.0)
        ]
    );
    let e = stream_all(
        &sluice,
        QueryPointsRequest {
            page_token: "x".into(),
            ..big.clone()
        },
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("page_token"), "{}", e.message());

    // A client that stops reading and goes away stops the query.
    let mut api = sluice.telemetry().await;
    let mut stream = api
        .stream_points(QueryPointsRequest {
            limit: 250_000,
            ..big.clone()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        running_streams(&sluice).await,
        1,
        "the query waits on the slow client"
    );
    drop(stream);
    sluice
        .eventually(
            "the abandoned query cancelled",
            Duration::from_secs(10),
            || async { (running_streams(&sluice).await == 0).then_some(()) },
        )
        .await;
    let cancelled_before = cancelled(&sluice).await;
    assert!(cancelled_before >= 1.0);

    // A unary call past its deadline is cut off, and so is its query:
    // aggregating 250,000 raw points into 1-second buckets takes PostgreSQL
    // far longer than the 20 ms this call allows.
    let mut slow = tonic::Request::new(sluice_proto::v1::AggregatePointsRequest {
        device_ids: vec!["big-1".into()],
        metrics: vec!["v".into()],
        start: Some(ts(t0)),
        end: Some(ts(t0 + chrono::Duration::seconds(250))),
        bucket: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        aggregates: vec![sluice_proto::v1::Aggregate::First as i32],
        ..Default::default()
    });
    slow.set_timeout(Duration::from_millis(20));
    let e = api.aggregate_points(slow).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e}"
    );
    sluice
        .eventually(
            "the query of the late call cancelled",
            Duration::from_secs(10),
            || async { (cancelled(&sluice).await > cancelled_before).then_some(()) },
        )
        .await;

    // Events: several devices, a topic filter, JSON containment.
    let events = |r: QueryEventsRequest| {
        let mut api = api.clone();
        async move {
            let mut e: Vec<(String, String)> = api
                .query_events(r)
                .await
                .unwrap()
                .into_inner()
                .events
                .into_iter()
                .map(|e| (e.device_id, String::from_utf8(e.payload).unwrap()))
                .collect();
            e.sort();
            e
        }
    };
    let alarm = r#"{"level": "alarm"}"#.to_owned();
    let two = events(QueryEventsRequest {
        device_ids: vec!["ev-1".into(), "ev-2".into()],
        json_contains: alarm.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        two.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["ev-1", "ev-2"]
    );
    assert_eq!(
        events(QueryEventsRequest {
            topic_filter: "devices/+/status".into(),
            json_contains: alarm.clone(),
            ..Default::default()
        })
        .await,
        two
    );
    assert_eq!(
        events(QueryEventsRequest {
            json_contains: alarm.clone(),
            ..Default::default()
        })
        .await
        .len(),
        3
    );
    assert_eq!(
        events(QueryEventsRequest {
            device_id: "ev-1".into(),
            ..Default::default()
        })
        .await
        .len(),
        3,
        "the non-JSON body is there, it just never matches a JSON filter"
    );
    let mut streamed = Vec::new();
    let mut s = api
        .stream_events(QueryEventsRequest {
            device_ids: vec!["ev-1".into(), "ev-2".into()],
            json_contains: alarm.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(batch) = s.next().await {
        streamed.extend(batch.unwrap().events.into_iter().map(|e| e.device_id));
    }
    assert_eq!(streamed, ["ev-1", "ev-2"]);
    let e = api
        .query_events(QueryEventsRequest {
            json_contains: "{level".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("json_contains"), "{}", e.message());

    // The same through the SQL views offered to Grafana.
    let alarms: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events_json WHERE body @> '{\"level\": \"alarm\"}'",
    )
    .fetch_one(&sluice.db)
    .await
    .unwrap();
    assert_eq!(alarms, 3);
    let not_json: Vec<Option<serde_json::Value>> =
        sqlx::query_scalar("SELECT body FROM events_json WHERE device_id = 'ev-1' ORDER BY id")
            .fetch_all(&sluice.db)
            .await
            .unwrap();
    assert_eq!(not_json.len(), 3);
    assert!(
        not_json[2].is_none(),
        "a body that is not JSON reads as NULL"
    );
    let hourly: Vec<(String, f64, i64)> = sqlx::query_as(
        "SELECT metric, avg, count FROM points_1h WHERE device_id = 's-1' ORDER BY metric",
    )
    .fetch_all(&sluice.db)
    .await
    .unwrap();
    let latest: Vec<(String, f64)> = sqlx::query_as(
        "SELECT metric, value FROM latest_points WHERE device_id = 's-1' ORDER BY metric",
    )
    .fetch_all(&sluice.db)
    .await
    .unwrap();
    assert_eq!(latest, [("a".into(), 2.0), ("b".into(), 20.0)]);
    // Both points of s-1 may fall in one hour or straddle two.
    let count: i64 = hourly.iter().filter(|h| h.0 == "a").map(|h| h.2).sum();
    assert_eq!(count, 2, "{hourly:?}");

    // Which devices and series have points in a range.
    let range = |start: DateTime<Utc>, end: DateTime<Utc>| (Some(ts(start)), Some(ts(end)));
    let (start, end) = range(t0 - chrono::Duration::hours(1), Utc::now());
    let devices = api
        .list_devices(ListDevicesWithDataRequest {
            start,
            end,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(devices.device_ids, ["big-1", "s-1"]);
    let (early, early_end) = range(
        t0 - chrono::Duration::hours(2),
        t0 - chrono::Duration::hours(1),
    );
    let none = api
        .list_devices(ListDevicesWithDataRequest {
            start: early,
            end: early_end,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.device_ids.is_empty());
    let mut series = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = api
            .list_metrics(ListMetricsWithDataRequest {
                start,
                end,
                limit: 1,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        series.extend(
            r.series
                .into_iter()
                .map(|s| format!("{}/{}", s.device_id, s.metric)),
        );
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!(series, ["big-1/v", "s-1/a", "s-1/b"]);
    let e = api
        .list_metrics(ListMetricsWithDataRequest {
            start,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("end"), "{}", e.message());
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_what_is_stored_and_are_told_what_they_missed() {
    // A short flush interval makes many small batches; a ring of two of
    // them makes a reader that stops for a moment fall behind.
    let sluice = Sluice::start_with(
        Options {
            env: vec![
                ("SLUICE_INGEST__FLUSH_INTERVAL_MS".into(), "5".into()),
                ("SLUICE_INGEST__LIVE_FEED_BATCHES".into(), "2".into()),
            ],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let client = sluice.mqtt("live").await;
    let mut api = sluice.telemetry().await;

    // Points of one device only.
    let mut live = api
        .subscribe(SubscribeRequest {
            device_ids: vec!["live-1".into()],
            points: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    publish(&client, "devices/live-2/telemetry", r#"{"t": 2}"#).await;
    publish(&client, "devices/live-1/telemetry", r#"{"t": 1, "h": 40}"#).await;
    let first = tokio::time::timeout(WAIT, live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let got: Vec<(String, String, f64)> = first
        .points
        .into_iter()
        .map(|p| (p.device_id, p.metric, p.value))
        .collect();
    assert_eq!(
        got,
        [
            ("live-1".into(), "h".into(), 40.0),
            ("live-1".into(), "t".into(), 1.0)
        ]
    );
    assert_eq!(first.gap, 0);

    // Every event, read only after 150 large ones were stored: the
    // subscriber falls behind, and what it gets plus what it is told it
    // missed is everything.
    // A client with small HTTP/2 windows (hyper's defaults would buffer
    // megabytes on its side before the server noticed anything).
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", sluice.grpc_port))
            .unwrap()
            .initial_stream_window_size(Some(64 * 1024))
            .initial_connection_window_size(Some(64 * 1024))
            .connect()
            .await
            .unwrap();
    let mut slow = sluice_proto::v1::telemetry_client::TelemetryClient::new(channel);
    let mut all = slow
        .subscribe(SubscribeRequest {
            events: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // 8 kB: under rumqttc's default 10 kB packet limit.
    let body = "x".repeat(8_000);
    for _ in 0..150 {
        publish(&client, "devices/gap-1/status", body.clone()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sluice
        .eventually("every event stored", WAIT, || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE device_id = 'gap-1'")
                    .fetch_one(&sluice.db)
                    .await
                    .unwrap();
            (n == 150).then_some(())
        })
        .await;
    let (mut received, mut missed) = (0u64, 0u64);
    while received + missed < 150 {
        let r = tokio::time::timeout(WAIT, all.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received += r.events.len() as u64;
        missed += r.gap;
    }
    assert_eq!(received + missed, 150);
    assert!(missed > 0, "the subscriber was told it fell behind");
    assert!(received > 0);
    // It still follows the feed afterwards.
    publish(&client, "devices/gap-1/status", "after").await;
    let r = tokio::time::timeout(WAIT, all.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.events[0].payload, b"after");
    assert!(
        sluice
            .metrics()
            .await
            .contains("sluice_api_subscriber_missed_total")
    );

    let e = api
        .subscribe(SubscribeRequest {
            topic_filter: "a/#/b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("topic_filter"), "{}", e.message());
    sluice.stop();
}
