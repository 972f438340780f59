//! SQL metacharacters, LIKE wildcards, NUL bytes and other hostile text in
//! every string parameter of the gRPC API (the Telemetry calls, unary and
//! streaming, live subscriptions, and the Admin API): each call either
//! answers with exactly what the text means literally (usually nothing: no
//! such device or metric), or is refused with `INVALID_ARGUMENT` (or
//! `NOT_FOUND` for a named thing) and a message, never an internal error;
//! nothing matches by accident (a `%` prefix is not a wildcard); what the
//! Admin API accepts it keeps byte for byte; and the stored data is
//! untouched afterwards.

mod guests;
mod support;

use prost_types::Timestamp;
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::{
    AggregatePointsRequest, CreateDeviceRequest, DeleteDeviceRequest, DeleteRuleRequest,
    DeployRuleRequest, DisableRuleRequest, EnableRuleRequest, GetDeviceRequest, GetRuleRequest,
    LatestPointsRequest, ListDevicesRequest, ListDevicesWithDataRequest,
    ListMetricsWithDataRequest, ListRulesRequest, QueryEventsRequest, QueryPointsRequest,
    RotateDeviceSecretRequest, SubscribeRequest, SubscribeResponse, UpdateDeviceRequest,
};
use std::time::{Duration, SystemTime};
use support::{Sluice, publish};
use tonic::transport::Channel;
use tonic::{Code, Status};

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

/// Safety net for anything the server should answer; generous, as the
/// machine may be busy.
const WAIT: Duration = Duration::from_secs(30);

/// Records a failure unless `outcome` is `want` rows or one of the
/// `refusals`, with a message (the caller's field and the text in it are
/// named in the failure).
fn judge(
    failures: &mut Vec<String>,
    field: &str,
    s: &str,
    outcome: Outcome,
    want: usize,
    refusals: &[Code],
) {
    match outcome {
        Ok(n) if n == want => {}
        Ok(n) => failures.push(format!("{field} = {s:?}: {n} rows, expected {want}")),
        Err(e) if refusals.contains(&e.code()) && !e.message().is_empty() => {}
        Err(e) => failures.push(format!("{field} = {s:?}: {:?}: {}", e.code(), e.message())),
    }
}

/// Reads a server stream to its end: the items `count` finds in it, or the
/// error it ended with (when the call starts, or later).
async fn drain<T>(
    call: Result<tonic::Response<tonic::Streaming<T>>, Status>,
    count: fn(&T) -> usize,
) -> Outcome {
    let mut stream = call?.into_inner();
    let mut n = 0;
    loop {
        match tokio::time::timeout(WAIT, stream.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("the stream did not end")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(n),
            Ok(Ok(Some(item))) => n += count(&item),
        }
    }
}

/// What a live subscription filters on: `device_ids`, `metrics` or
/// `topic_filter` set to one hostile string.
#[derive(Clone, Copy, Debug)]
enum Follows {
    Device,
    Metric,
    Topic,
}

impl Follows {
    fn request(self, s: &str) -> SubscribeRequest {
        match self {
            Follows::Device => SubscribeRequest {
                device_ids: vec![s.into()],
                ..Default::default()
            },
            Follows::Metric => SubscribeRequest {
                metrics: vec![s.into()],
                points: true,
                ..Default::default()
            },
            Follows::Topic => SubscribeRequest {
                topic_filter: s.into(),
                events: true,
                ..Default::default()
            },
        }
    }

    /// Publishes, on `client`, the one message this subscription should
    /// get: a point of the device named `s`, a point of the metric named
    /// `s`, or an event on the topic `s`. None when no MQTT publish can
    /// carry `s` there (a topic level holds no `/`, `+`, `#` or NUL; a
    /// topic starting with `$` is out of the anonymous policy's `#`).
    async fn publish_match(self, client: &rumqttc::AsyncClient, s: &str) -> Option<()> {
        let forbidden = |c: char| matches!(c, '+' | '#' | '\0');
        match self {
            Follows::Device if !s.contains(forbidden) && !s.contains('/') => {
                publish(
                    client,
                    &format!("devices/{s}/telemetry"),
                    r#"{"sentinel": 1}"#,
                )
                .await
            }
            Follows::Metric => {
                let body = serde_json::json!({ s: 2 }).to_string();
                publish(client, "devices/d1/telemetry", body).await
            }
            Follows::Topic if !s.contains(forbidden) && !s.starts_with('$') => {
                publish(client, s, "sentinel").await
            }
            _ => return None,
        }
        Some(())
    }

    /// Which items of a response this subscription may get; the first
    /// item that does not belong is returned.
    fn stray(self, s: &str, r: &SubscribeResponse) -> Option<String> {
        let points = r.points.iter().filter(|p| match self {
            Follows::Device => p.device_id != s,
            Follows::Metric => p.metric != s,
            Follows::Topic => true,
        });
        let events = r.events.iter().filter(|e| match self {
            Follows::Device => e.device_id != s,
            Follows::Metric => true,
            Follows::Topic => e.topic != s,
        });
        points
            .map(|p| format!("point {}/{}", p.device_id, p.metric))
            .chain(events.map(|e| format!("event {:?} on {:?}", e.device_id, e.topic)))
            .next()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_in_streams_and_subscriptions_match_nothing_else() {
    let sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("d1").await;
    publish(&client, "devices/d1/telemetry", r#"{"temperature": 21.5}"#).await;
    publish(&client, "devices/d1/status", r#"{"level": "ok"}"#).await;
    sluice
        .eventually("d1's point and event stored", WAIT, || async {
            (sluice.all_points("d1").await.len() == 1
                && sluice.all_events("devices/d1/#").await.len() == 1)
                .then_some(())
        })
        .await;
    let mut api = sluice.telemetry().await;
    let points = |b: &sluice_proto::v1::PointBatch| b.points.len();
    let events = |b: &sluice_proto::v1::EventBatch| b.events.len();
    let (bad, page) = (&[Code::InvalidArgument][..], "a stream takes no page token");

    let mut failures = Vec::new();
    for &s in HOSTILE {
        let text = s.to_owned();
        let select = |f: fn(&mut QueryPointsRequest, String)| {
            let mut r = QueryPointsRequest::default();
            f(&mut r, text.clone());
            r
        };
        let calls: Vec<(&str, Outcome, &[Code])> = vec![
            (
                "StreamPoints.device_id",
                drain(
                    api.stream_points(select(|r, t| r.device_id = t)).await,
                    points,
                )
                .await,
                bad,
            ),
            (
                "StreamPoints.device_ids",
                drain(
                    api.stream_points(select(|r, t| r.device_ids = vec![t]))
                        .await,
                    points,
                )
                .await,
                bad,
            ),
            (
                "StreamPoints.device_id_prefix",
                drain(
                    api.stream_points(select(|r, t| r.device_id_prefix = t))
                        .await,
                    points,
                )
                .await,
                bad,
            ),
            (
                "StreamPoints.metric",
                drain(
                    api.stream_points(select(|r, t| {
                        r.device_id = "d1".into();
                        r.metric = t;
                    }))
                    .await,
                    points,
                )
                .await,
                bad,
            ),
            (
                "StreamPoints.metrics",
                drain(
                    api.stream_points(select(|r, t| {
                        r.device_id = "d1".into();
                        r.metrics = vec![t];
                    }))
                    .await,
                    points,
                )
                .await,
                bad,
            ),
            (
                "StreamEvents.device_id",
                drain(
                    api.stream_events(QueryEventsRequest {
                        device_id: text.clone(),
                        ..Default::default()
                    })
                    .await,
                    events,
                )
                .await,
                bad,
            ),
            (
                "StreamEvents.device_ids",
                drain(
                    api.stream_events(QueryEventsRequest {
                        device_ids: vec![text.clone()],
                        ..Default::default()
                    })
                    .await,
                    events,
                )
                .await,
                bad,
            ),
            (
                "StreamEvents.topic_filter",
                drain(
                    api.stream_events(QueryEventsRequest {
                        topic_filter: text.clone(),
                        ..Default::default()
                    })
                    .await,
                    events,
                )
                .await,
                bad,
            ),
            (
                "StreamEvents.json_contains",
                drain(
                    api.stream_events(QueryEventsRequest {
                        json_contains: text.clone(),
                        ..Default::default()
                    })
                    .await,
                    events,
                )
                .await,
                bad,
            ),
        ];
        for (field, outcome, refusals) in calls {
            judge(&mut failures, field, s, outcome, 0, refusals);
        }
        // A page token in a stream is refused whatever it holds.
        for (field, outcome) in [
            (
                "StreamPoints.page_token",
                drain(
                    api.stream_points(select(|r, t| {
                        r.device_id = "d1".into();
                        r.page_token = t;
                    }))
                    .await,
                    points,
                )
                .await,
            ),
            (
                "StreamEvents.page_token",
                drain(
                    api.stream_events(QueryEventsRequest {
                        page_token: text.clone(),
                        ..Default::default()
                    })
                    .await,
                    events,
                )
                .await,
            ),
        ] {
            match outcome {
                Err(e) if e.code() == Code::InvalidArgument => {}
                other => failures.push(format!("{field} = {s:?}: {other:?}, expected: {page}")),
            }
        }
    }

    // Live subscriptions: each hostile filter is refused at once, or its
    // stream gets only what the text names literally. A control
    // subscription shows when d1's next point and event are in the live
    // feed; every subscription reads the one feed in order, so a message
    // published after that (the one each subscription should match) comes
    // after d1's, and by the time it arrives d1's would have been seen.
    let mut control = api
        .subscribe(SubscribeRequest {
            device_ids: vec!["d1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut live = Vec::new();
    for &s in HOSTILE {
        for follows in [Follows::Device, Follows::Metric, Follows::Topic] {
            match api.subscribe(follows.request(s)).await {
                Ok(stream) => live.push((s, follows, stream.into_inner())),
                Err(e) => judge(
                    &mut failures,
                    &format!("Subscribe by {follows:?}"),
                    s,
                    Err(e),
                    0,
                    bad,
                ),
            }
        }
    }
    publish(&client, "devices/d1/telemetry", r#"{"temperature": 22.5}"#).await;
    publish(&client, "devices/d1/status", r#"{"level": "alarm"}"#).await;
    let (mut got_point, mut got_event) = (false, false);
    while !(got_point && got_event) {
        let r = tokio::time::timeout(WAIT, control.message())
            .await
            .expect("the control subscription got d1's data")
            .unwrap()
            .expect("the control subscription is open");
        got_point |= r.points.iter().any(|p| p.value == 22.5);
        got_event |= !r.events.is_empty();
    }
    let mut expected = Vec::with_capacity(live.len());
    for (s, follows, _) in &live {
        expected.push(follows.publish_match(&client, s).await.is_some());
    }
    let mut matched = 0;
    for ((s, follows, stream), expect_one) in live.iter_mut().zip(expected) {
        let field = format!("Subscribe by {follows:?}");
        // Without a message of its own to wait for, a short look is all
        // there is: anything stray in it is a failure, nothing is fine.
        let wait = if expect_one {
            WAIT
        } else {
            Duration::from_millis(500)
        };
        loop {
            match tokio::time::timeout(wait, stream.message()).await {
                Err(_) if expect_one => {
                    failures.push(format!("{field} = {s:?}: its own message never came"));
                    break;
                }
                Err(_) => break,
                Ok(Ok(Some(r))) => {
                    if let Some(stray) = follows.stray(s, &r) {
                        failures.push(format!("{field} = {s:?}: got {stray}"));
                        break;
                    }
                    if expect_one && (!r.points.is_empty() || !r.events.is_empty()) {
                        matched += 1;
                        break;
                    }
                }
                Ok(other) => {
                    failures.push(format!("{field} = {s:?}: the stream ended: {other:?}"));
                    break;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{} hostile subscriptions open, {matched} got exactly their own message",
        live.len()
    );
    drop(live);

    // The data is intact, and the server never panicked.
    let d1 = sluice.all_points("d1").await;
    assert!(
        d1.iter()
            .any(|p| p.metric == "temperature" && p.value == 21.5),
        "{d1:?}"
    );
    assert_eq!(sluice.all_events("devices/d1/#").await.len(), 2);
    let log = sluice.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A device as the Admin API lists it, for comparing before and after.
fn device_row(d: &sluice_proto::v1::Device) -> (String, bool, String) {
    (d.id.clone(), d.enabled, d.metadata_json.clone())
}

async fn all_devices(admin: &mut AdminClient<Channel>) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_devices(ListDevicesRequest {
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.devices.iter().map(device_row));
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

/// Every rule as (name, topic filter, version, enabled).
async fn all_rules(admin: &mut AdminClient<Channel>) -> Vec<(String, String, i32, bool)> {
    let rules = admin
        .list_rules(ListRulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(rules.next_page_token.is_empty());
    rules
        .rules
        .into_iter()
        .map(|r| (r.name, r.topic_filter, r.version, r.enabled))
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// The ids the Admin API lists under `prefix`, all pages.
async fn ids_with_prefix(
    admin: &mut AdminClient<Channel>,
    prefix: &str,
) -> Result<Vec<String>, Status> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_devices(ListDevicesRequest {
                id_prefix: prefix.into(),
                page_token,
                limit: 2,
            })
            .await?
            .into_inner();
        out.extend(page.devices.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_in_the_admin_api_are_refused_or_kept_exactly() {
    let sluice = Sluice::start(|_| {}).await;
    let mut admin = AdminClient::new(sluice.grpc_channel().await.unwrap());
    // What the hostile calls must leave alone: a device and a deployed rule.
    admin
        .create_device(CreateDeviceRequest {
            id: "d1".into(),
            metadata_json: r#"{"site":"north"}"#.into(),
        })
        .await
        .unwrap();
    let module = wat::parse_str(guests::constant_event("{}")).unwrap();
    let deploy = |name: &str, topic: &str, config: &str| DeployRuleRequest {
        name: name.into(),
        topic_filter: topic.into(),
        module: module.clone(),
        config_json: config.into(),
        ..Default::default()
    };
    admin
        .deploy_rule(deploy("r1", "devices/+/status", ""))
        .await
        .unwrap();
    let devices_before = all_devices(&mut admin).await;
    let rules_before = all_rules(&mut admin).await;
    let rule_names: Vec<String> = rules_before.iter().map(|r| r.0.clone()).collect();

    // Calls about things that do not exist, lists, and fields that must
    // hold JSON objects.
    let named = &[Code::NotFound, Code::InvalidArgument][..];
    let bad = &[Code::InvalidArgument][..];
    let mut failures = Vec::new();
    for &s in HOSTILE {
        let text = s.to_owned();
        let rules_under = rule_names.iter().filter(|n| n.starts_with(s)).count();
        let devices_under = devices_before.iter().filter(|d| d.0.starts_with(s)).count();
        let calls: Vec<(&str, Outcome, usize, &[Code])> = vec![
            (
                "GetDevice.id",
                admin
                    .get_device(GetDeviceRequest { id: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "UpdateDevice.id",
                admin
                    .update_device(UpdateDeviceRequest {
                        id: text.clone(),
                        enabled: Some(false),
                        metadata_json: None,
                    })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "UpdateDevice.metadata_json",
                admin
                    .update_device(UpdateDeviceRequest {
                        id: "d1".into(),
                        enabled: None,
                        metadata_json: Some(text.clone()),
                    })
                    .await
                    .map(|_| 1),
                0,
                bad,
            ),
            (
                "RotateDeviceSecret.id",
                admin
                    .rotate_device_secret(RotateDeviceSecretRequest { id: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "DeleteDevice.id",
                admin
                    .delete_device(DeleteDeviceRequest { id: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "CreateDevice.metadata_json",
                admin
                    .create_device(CreateDeviceRequest {
                        id: "meta-probe".into(),
                        metadata_json: text.clone(),
                    })
                    .await
                    .map(|_| 1),
                0,
                bad,
            ),
            (
                "ListDevices.id_prefix",
                ids_with_prefix(&mut admin, s).await.map(|ids| ids.len()),
                devices_under,
                bad,
            ),
            (
                "ListDevices.page_token",
                admin
                    .list_devices(ListDevicesRequest {
                        page_token: text.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().devices.len() + 1),
                0,
                bad,
            ),
            (
                "GetRule.name",
                admin
                    .get_rule(GetRuleRequest { name: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "EnableRule.name",
                admin
                    .enable_rule(EnableRuleRequest { name: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "DisableRule.name",
                admin
                    .disable_rule(DisableRuleRequest { name: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "DeleteRule.name",
                admin
                    .delete_rule(DeleteRuleRequest { name: text.clone() })
                    .await
                    .map(|_| 1),
                0,
                named,
            ),
            (
                "ListRules.name_prefix",
                admin
                    .list_rules(ListRulesRequest {
                        name_prefix: text.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().rules.len()),
                rules_under,
                bad,
            ),
            (
                "ListRules.page_token",
                admin
                    .list_rules(ListRulesRequest {
                        page_token: text.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().rules.len() + 1),
                0,
                bad,
            ),
            // Rule names are 1-128 of A-Z a-z 0-9 _ . - from a letter or
            // digit: every hostile string is outside that.
            (
                "DeployRule.name",
                admin
                    .deploy_rule(deploy(s, "devices/+/status", ""))
                    .await
                    .map(|_| 1),
                0,
                bad,
            ),
            (
                "DeployRule.config_json",
                admin
                    .deploy_rule(deploy("config-probe", "devices/+/status", s))
                    .await
                    .map(|_| 1),
                0,
                bad,
            ),
        ];
        for (field, outcome, want, refusals) in calls {
            judge(&mut failures, field, s, outcome, want, refusals);
        }

        // Hostile text inside well-formed JSON is data: kept byte for
        // byte, or refused when PostgreSQL's jsonb cannot hold it (NUL).
        let json = serde_json::json!({ "note": s }).to_string();
        let kept = |field: &str, failures: &mut Vec<String>, got: Result<String, Status>| match got
        {
            Ok(stored) => {
                let v: serde_json::Value = serde_json::from_str(&stored).unwrap();
                if v["note"] != s {
                    failures.push(format!("{field} with {s:?} came back as {stored}"));
                }
            }
            Err(e) => judge(failures, field, s, Err(e), 0, bad),
        };
        let created = admin
            .create_device(CreateDeviceRequest {
                id: "json-probe".into(),
                metadata_json: json.clone(),
            })
            .await
            .map(|r| r.into_inner().device.unwrap().metadata_json);
        let was_created = created.is_ok();
        kept("CreateDevice.metadata_json (JSON)", &mut failures, created);
        if was_created {
            let got = admin
                .get_device(GetDeviceRequest {
                    id: "json-probe".into(),
                })
                .await
                .map(|r| r.into_inner().metadata_json);
            kept("GetDevice.metadata_json (JSON)", &mut failures, got);
            admin
                .delete_device(DeleteDeviceRequest {
                    id: "json-probe".into(),
                })
                .await
                .unwrap();
        }
        let updated = admin
            .update_device(UpdateDeviceRequest {
                id: "d1".into(),
                enabled: None,
                metadata_json: Some(json.clone()),
            })
            .await
            .map(|r| r.into_inner().metadata_json);
        kept("UpdateDevice.metadata_json (JSON)", &mut failures, updated);
        let deployed = admin
            .deploy_rule(deploy("json-probe", "devices/+/status", &json))
            .await
            .map(|r| r.into_inner().config_json);
        let was_deployed = deployed.is_ok();
        kept("DeployRule.config_json (JSON)", &mut failures, deployed);
        if was_deployed {
            admin
                .delete_rule(DeleteRuleRequest {
                    name: "json-probe".into(),
                })
                .await
                .unwrap();
        }

        // A topic filter is refused, or kept exactly.
        match admin
            .deploy_rule(deploy("filter-probe", s, ""))
            .await
            .map(|r| r.into_inner())
        {
            Ok(rule) => {
                let got = admin
                    .get_rule(GetRuleRequest {
                        name: "filter-probe".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if rule.topic_filter != s || got.topic_filter != s {
                    failures.push(format!(
                        "DeployRule.topic_filter = {s:?} came back as {:?} / {:?}",
                        rule.topic_filter, got.topic_filter
                    ));
                }
                admin
                    .delete_rule(DeleteRuleRequest {
                        name: "filter-probe".into(),
                    })
                    .await
                    .unwrap();
            }
            Err(e) => judge(&mut failures, "DeployRule.topic_filter", s, Err(e), 0, bad),
        }
    }
    // d1's metadata, changed above, goes back for the comparison below.
    admin
        .update_device(UpdateDeviceRequest {
            id: "d1".into(),
            enabled: None,
            metadata_json: Some(r#"{"site":"north"}"#.into()),
        })
        .await
        .unwrap();

    // Devices named with hostile ids: refused, or kept and usable by that
    // exact name. PostgreSQL text cannot hold NUL, so those must be refused.
    let mut accepted: Vec<&str> = Vec::new();
    for &s in HOSTILE {
        match admin
            .create_device(CreateDeviceRequest {
                id: s.into(),
                metadata_json: String::new(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let got = admin
                    .get_device(GetDeviceRequest { id: s.into() })
                    .await
                    .map(|d| d.into_inner().id);
                if s.contains('\0') || r.device.unwrap().id != s || got.as_deref().ok() != Some(s) {
                    failures.push(format!("CreateDevice.id = {s:?} read back as {got:?}"));
                }
                let rotated = admin
                    .rotate_device_secret(RotateDeviceSecretRequest { id: s.into() })
                    .await
                    .map(|r| r.into_inner().secret);
                let hash = support::stored_secret_hash(&sluice.db, s).await;
                match rotated {
                    Ok(secret) if sluice_ingest::devices::verify_secret(&secret, &hash) => {}
                    other => failures.push(format!("RotateDeviceSecret.id = {s:?}: {other:?}")),
                }
                let disabled = admin
                    .update_device(UpdateDeviceRequest {
                        id: s.into(),
                        enabled: Some(false),
                        metadata_json: None,
                    })
                    .await
                    .map(|d| d.into_inner().enabled);
                if !matches!(disabled, Ok(false)) {
                    failures.push(format!("UpdateDevice.id = {s:?}: {disabled:?}"));
                }
                accepted.push(s);
            }
            Err(e) => judge(&mut failures, "CreateDevice.id", s, Err(e), 0, bad),
        }
    }
    eprintln!("device ids kept: {accepted:?}");
    // Listing by each hostile prefix gives exactly the ids that start with
    // it, literally, among all there are now.
    let mut all_ids: Vec<String> = devices_before.iter().map(|d| d.0.clone()).collect();
    all_ids.extend(accepted.iter().map(|s| s.to_string()));
    all_ids.sort();
    for &s in HOSTILE {
        let want: Vec<String> = all_ids
            .iter()
            .filter(|id| id.starts_with(s))
            .cloned()
            .collect();
        // Sorted here: the database orders by its collation, not by bytes.
        match ids_with_prefix(&mut admin, s).await.map(sorted) {
            Ok(ids) if ids == want => {}
            Ok(ids) => failures.push(format!(
                "ListDevices.id_prefix = {s:?}: {ids:?}, expected {want:?}"
            )),
            Err(e) => judge(&mut failures, "ListDevices.id_prefix", s, Err(e), 0, bad),
        }
    }
    let listed = sorted(
        all_devices(&mut admin)
            .await
            .into_iter()
            .map(|d| d.0)
            .collect(),
    );
    if listed != all_ids {
        failures.push(format!("ListDevices: {listed:?}, expected {all_ids:?}"));
    }
    for &s in &accepted {
        if let Err(e) = admin
            .delete_device(DeleteDeviceRequest { id: s.into() })
            .await
        {
            failures.push(format!("DeleteDevice.id = {s:?}: {e:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Everything else is as it was, and the server never panicked.
    assert_eq!(all_devices(&mut admin).await, devices_before);
    assert_eq!(all_rules(&mut admin).await, rules_before);
    let log = sluice.stop();
    assert!(!log.contains("panicked"), "{log}");
}
