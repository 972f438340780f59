//! `sluice.v1.Telemetry` beyond paging through one device: latest values.
//! A real `sluice serve`, MQTT publishers and a gRPC client.

mod support;

use sluice_proto::v1::{LatestPointsRequest, Point};
use std::time::Duration;
use support::{Sluice, publish};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// (device, metric, seconds after `base`, value) of each point.
fn brief(points: &[Point], base: i64) -> Vec<(String, String, i64, f64)> {
    points
        .iter()
        .map(|p| {
            let t = p.time.as_ref().expect("time");
            (
                p.device_id.clone(),
                p.metric.clone(),
                (t.seconds * 1000 + i64::from(t.nanos / 1_000_000) - base) / 1000,
                p.value,
            )
        })
        .collect()
}

/// Publishes `(device, seconds after base, JSON fields)` as telemetry stamped
/// `base + seconds`, in order from one client, and waits until the devices
/// pump-1, pump-2 and fan-1 hold `points` points in all.
async fn publish_at(
    sluice: &Sluice,
    client_id: &str,
    base: i64,
    messages: &[(&str, i64, &str)],
    points: usize,
) {
    let client = sluice.mqtt(client_id).await;
    for (device, seconds, fields) in messages {
        let body = format!(r#"{{{fields}, "ts": {}}}"#, base + seconds * 1000);
        publish(&client, &format!("devices/{device}/telemetry"), body).await;
    }
    sluice
        .eventually("every point stored", WAIT, || async {
            let n = sluice.all_points("pump-1").await.len()
                + sluice.all_points("pump-2").await.len()
                + sluice.all_points("fan-1").await.len();
            (n == points).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_points_are_the_newest_by_time_per_series() {
    let sluice = Sluice::start(|_| {}).await;
    // pump-1's `t`: 1 at +1000 ms, 3 at +3000, then a late 2 at +2000 that
    // must not replace the newer value. Times are a minute ago plus these
    // offsets (well inside retention).
    let base = chrono::Utc::now().timestamp_millis() / 1000 * 1000 - 60_000;
    let messages = [
        ("pump-1", 1, r#""t": 1, "p": 10"#),
        ("pump-1", 3, r#""t": 3"#),
        ("pump-2", 1, r#""t": 7, "p": 70"#),
        ("fan-1", 2, r#""t": 5, "rpm": 900"#),
        ("pump-1", 2, r#""t": 2"#),
    ];
    publish_at(&sluice, "publisher", base, &messages, 8).await;
    let mut t = sluice.telemetry().await;
    let latest = |r: LatestPointsRequest| {
        let mut t = t.clone();
        async move { t.latest_points(r).await.map(|r| r.into_inner()) }
    };

    let r = latest(LatestPointsRequest {
        device_ids: vec!["pump-1".into(), "fan-1".into()],
        metrics: vec!["t".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        brief(&r.points, base),
        [
            ("fan-1".into(), "t".into(), 2, 5.0),
            ("pump-1".into(), "t".into(), 3, 3.0)
        ]
    );
    assert!(r.next_page_token.is_empty());

    let r = latest(LatestPointsRequest {
        device_id_prefix: "pump-".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        brief(&r.points, base),
        [
            ("pump-1".into(), "p".into(), 1, 10.0),
            ("pump-1".into(), "t".into(), 3, 3.0),
            ("pump-2".into(), "p".into(), 1, 70.0),
            ("pump-2".into(), "t".into(), 1, 7.0),
        ]
    );

    // Every device, a point per page, walked with the page tokens.
    let mut walked = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = latest(LatestPointsRequest {
            limit: 1,
            page_token,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(r.points.len() <= 1);
        walked.extend(brief(&r.points, base));
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!(walked.len(), 6, "{walked:?}");
    assert!(
        walked
            .windows(2)
            .all(|w| (&w[0].0, &w[0].1) < (&w[1].0, &w[1].1))
    );

    // Bad requests name their field.
    let e = t
        .latest_points(LatestPointsRequest {
            device_ids: vec!["pump-1".into()],
            device_id_prefix: "pump".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("device_id_prefix"), "{}", e.message());
    let e = t
        .latest_points(LatestPointsRequest {
            metrics: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("metrics"), "{}", e.message());
    sluice.stop();
}

/// Every page of a `QueryPoints` request, walked with its page tokens.
async fn all_pages(sluice: &Sluice, request: sluice_proto::v1::QueryPointsRequest) -> Vec<Point> {
    let mut t = sluice.telemetry().await;
    let mut points = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = t
            .query_points(sluice_proto::v1::QueryPointsRequest {
                page_token,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.points.len() <= request.limit.max(1) as usize || request.limit == 0);
        points.extend(r.points);
        if r.next_page_token.is_empty() {
            return points;
        }
        page_token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_points_across_devices_and_metrics_in_either_order() {
    use sluice_proto::v1::{Order, QueryPointsRequest};
    let sluice = Sluice::start(|_| {}).await;
    let base = chrono::Utc::now().timestamp_millis() / 1000 * 1000 - 60_000;
    let messages = [
        ("pump-1", 1, r#""t": 11, "p": 1"#),
        ("pump-2", 1, r#""t": 21"#),
        ("pump-1", 2, r#""t": 12, "p": 2"#),
        ("fan-1", 2, r#""t": 31"#),
        ("pump-2", 2, r#""t": 22"#),
        ("pump-1", 3, r#""t": 13, "p": 3"#),
        ("pump-2", 3, r#""t": 23"#),
    ];
    publish_at(&sluice, "publisher", base, &messages, 10).await;

    // Two devices, one metric, oldest first; then newest first.
    let two = QueryPointsRequest {
        device_id: "pump-1".into(),
        device_ids: vec!["fan-1".into()],
        metrics: vec!["t".into()],
        limit: 1,
        ..Default::default()
    };
    let ascending = brief(&all_pages(&sluice, two.clone()).await, base);
    let values: Vec<f64> = ascending.iter().map(|p| p.3).collect();
    assert_eq!(values.len(), 4, "{ascending:?}");
    assert_eq!((values[0], values[3]), (11.0, 13.0));
    assert!(
        ascending.windows(2).all(|w| w[0].2 <= w[1].2),
        "{ascending:?}"
    );
    let mut descending = brief(
        &all_pages(
            &sluice,
            QueryPointsRequest {
                order: Order::Descending as i32,
                ..two
            },
        )
        .await,
        base,
    );
    descending.reverse();
    assert_eq!(descending, ascending);

    // A prefix, every metric, two per page: every pump point, in time order.
    let pumps = brief(
        &all_pages(
            &sluice,
            QueryPointsRequest {
                device_id_prefix: "pump-".into(),
                limit: 2,
                ..Default::default()
            },
        )
        .await,
        base,
    );
    assert_eq!(pumps.len(), 9, "{pumps:?}");
    assert!(pumps.iter().all(|p| p.0.starts_with("pump-")));
    assert!(pumps.windows(2).all(|w| w[0].2 <= w[1].2), "{pumps:?}");

    // Bad requests name their field.
    let mut t = sluice.telemetry().await;
    for (request, field) in [
        (
            QueryPointsRequest {
                device_id: "pump-1".into(),
                device_id_prefix: "pump".into(),
                ..Default::default()
            },
            "device_id_prefix",
        ),
        (
            QueryPointsRequest {
                device_id: "pump-1".into(),
                order: 7,
                ..Default::default()
            },
            "order",
        ),
        (
            QueryPointsRequest {
                device_ids: vec![String::new()],
                ..Default::default()
            },
            "device_ids",
        ),
    ] {
        let e = t.query_points(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    sluice.stop();
}
