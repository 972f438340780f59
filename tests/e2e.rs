//! End to end, on the real parts: a `sluice` process with its embedded
//! broker, a throw-away PostgreSQL, MQTT clients publishing, and a gRPC
//! client reading back.

mod guests;
mod support;

use chrono::{TimeZone, Utc};
use sluice_proto::v1::{QueryEventsRequest, QueryPointsRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use support::{Sluice, publish, replace_file, write_wat};

const WAIT: Duration = Duration::from_secs(30);

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_points_are_stored_exactly_once() {
    let sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("publisher-1").await;

    // The README's example, to the millisecond.
    publish(
        &client,
        "devices/dev-1/telemetry",
        r#"{"temperature": 21.5, "humidity": 40, "ts": 1767225600000}"#,
    )
    .await;
    let points = sluice
        .eventually("the two example points", WAIT, || async {
            let p = sluice.all_points("dev-1").await;
            (p.len() >= 2).then_some(p)
        })
        .await;
    assert_eq!(points.len(), 2, "{points:?}");
    let by_metric: BTreeMap<_, _> = points.iter().map(|p| (p.metric.as_str(), p)).collect();
    assert_eq!(by_metric["temperature"].value, 21.5);
    assert_eq!(by_metric["humidity"].value, 40.0);
    for p in &points {
        assert_eq!(p.device_id, "dev-1");
        assert_eq!(
            p.time,
            Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0
            })
        );
    }

    // Many devices, many messages: each value exactly once, with its time.
    let (devices, per_device) = (5, 60);
    for seq in 0..per_device {
        for d in 0..devices {
            let body = serde_json::json!({
                "seq": seq,
                "gps": {"lat": 50.0 + d as f64, "fix": seq % 2 == 0},
                "ts": 1_767_225_600_000i64 + seq * 1000,
            });
            publish(
                &client,
                &format!("devices/fleet-{d}/telemetry"),
                body.to_string(),
            )
            .await;
        }
    }
    for d in 0..devices {
        let device = format!("fleet-{d}");
        let points = sluice
            .eventually(&format!("points of {device}"), WAIT, || async {
                let p = sluice.all_points(&device).await;
                (p.len() >= 3 * per_device as usize).then_some(p)
            })
            .await;
        assert_eq!(points.len(), 3 * per_device as usize, "no duplicates");
        let seqs: BTreeSet<i64> = points
            .iter()
            .filter(|p| p.metric == "seq")
            .map(|p| p.value as i64)
            .collect();
        assert_eq!(seqs, (0..per_device).collect::<BTreeSet<_>>());
        for p in &points {
            let seq = match p.metric.as_str() {
                "seq" => p.value as i64,
                "gps.lat" => {
                    assert_eq!(p.value, 50.0 + d as f64);
                    continue;
                }
                "gps.fix" => {
                    assert!(p.value == 0.0 || p.value == 1.0);
                    continue;
                }
                other => panic!("unexpected metric {other}"),
            };
            assert_eq!(p.time.as_ref().unwrap().seconds, 1_767_225_600 + seq);
        }
    }

    // Paging walks the same rows as one big page, in time order.
    let paged = sluice.points_paged("fleet-0", 7).await;
    assert_eq!(paged, sluice.all_points("fleet-0").await);
    assert!(
        paged
            .windows(2)
            .all(|w| w[0].time.as_ref().unwrap().seconds <= w[1].time.as_ref().unwrap().seconds)
    );

    // A metric filter and a time range narrow the result.
    let r = sluice
        .telemetry()
        .await
        .query_points(QueryPointsRequest {
            device_id: "fleet-0".into(),
            metric: "seq".into(),
            start: Some(ts(1_767_225_610)),
            end: Some(ts(1_767_225_620)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<i64> = r.points.iter().map(|p| p.value as i64).collect();
    assert_eq!(seqs, (10..20).collect::<Vec<_>>());

    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_messages_received_total"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_points_written_total"), "{metrics}");
    let log = sluice.stop();
    assert!(log.contains("every batch flushed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_go_to_dead_letters_and_unmatched_messages_to_events() {
    let sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("publisher-2").await;
    publish(&client, "devices/dev-9/telemetry", "this is not json").await;
    publish(&client, "devices/dev-9/telemetry", "[1, 2, 3]").await;
    publish(&client, "devices/dev-9/status", "rebooting").await;
    publish(&client, "devices/dev-9/telemetry", r#"{"ok": 1}"#).await;

    let letters = sluice
        .eventually("two dead letters", WAIT, || async {
            let d = sluice.dead_letters().await;
            (d.len() >= 2).then_some(d)
        })
        .await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters[0].reason.contains("not valid JSON"),
        "{:?}",
        letters[0]
    );
    assert_eq!(letters[0].payload, b"this is not json");
    assert_eq!(letters[0].device_id.as_deref(), Some("dev-9"));
    assert_eq!(letters[0].rule.as_deref(), Some("telemetry"));
    assert!(
        letters[1].reason.contains("not an object"),
        "{:?}",
        letters[1]
    );

    let events = sluice
        .eventually("the unmatched message as an event", WAIT, || async {
            let e = sluice.all_events("devices/+/status").await;
            (!e.is_empty()).then_some(e)
        })
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload, b"rebooting");
    assert_eq!(events[0].device_id, "dev-9");
    assert_eq!(events[0].rule, "", "stored as received, by no rule");

    // The good message after the bad ones was stored.
    sluice
        .eventually("the good point", WAIT, || async {
            (sluice.all_points("dev-9").await.len() == 1).then_some(())
        })
        .await;
    sluice.stop();
}

/// Builds the C SDK's examples (threshold, convert, average) into `out`.
fn build_c_examples(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/sdk/c/build-examples.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "building the C examples failed ({status}); needs clang and lld"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_example_rule_dropped_in_raises_threshold_alerts() {
    let sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("publisher-3").await;

    // Dropped into the running server's rules directory: no restart.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/examples/threshold");
    let build = tempfile::tempdir().unwrap();
    build_c_examples(build.path());
    let staging = sluice.rules_dir.join("threshold.wasm.build");
    std::fs::copy(build.path().join("threshold.wasm"), &staging).unwrap();
    std::fs::rename(&staging, sluice.rules_dir.join("threshold.wasm")).unwrap();
    std::fs::copy(
        example.join("threshold.toml"),
        sluice.rules_dir.join("threshold.toml"),
    )
    .unwrap();

    // Until the reload lands, hot messages are not seen by the rule; keep
    // publishing until one is.
    let events = sluice
        .eventually("an alert event", WAIT, || async {
            publish(
                &client,
                "devices/boiler-7/telemetry",
                r#"{"temperature": 35.25}"#,
            )
            .await;
            let e = sluice.all_events("devices/+/telemetry").await;
            (!e.is_empty()).then_some(e)
        })
        .await;
    let event: serde_json::Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event["metric"], "temperature");
    assert_eq!(event["value"], 35.25);
    assert_eq!(event["threshold"], 30.0);
    assert_eq!(events[0].rule, "threshold");
    assert_eq!(events[0].device_id, "boiler-7");

    // A cool reading raises nothing, and the built-in decoder still stores points.
    publish(
        &client,
        "devices/boiler-8/telemetry",
        r#"{"temperature": 20}"#,
    )
    .await;
    sluice
        .eventually("the cool point", WAIT, || async {
            (!sluice.all_points("boiler-8").await.is_empty()).then_some(())
        })
        .await;
    assert!(sluice.all_events("devices/boiler-8/#").await.is_empty());
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_fail_their_messages_not_the_process() {
    let sluice = Sluice::start(|dir| {
        write_wat(&dir.join("chaos.wasm"), &guests::chaos());
        std::fs::write(
            dir.join("chaos.toml"),
            "topic = \"chaos/#\"\n[limits]\nmemory_mb = 8\n",
        )
        .unwrap();
    })
    .await;
    let client = sluice.mqtt("publisher-4").await;

    let cases = [
        ("loop", "time limit exceeded"),
        ("oom", "memory limit exceeded"),
        ("trap", "trap"),
    ];
    for (i, (payload, reason)) in cases.iter().enumerate() {
        publish(&client, "chaos/x", *payload).await;
        let letters = sluice
            .eventually(&format!("the dead letter for {payload}"), WAIT, || async {
                let d = sluice.dead_letters().await;
                (d.len() > i).then_some(d)
            })
            .await;
        let letter = &letters[i];
        assert_eq!(letter.payload, payload.as_bytes());
        assert_eq!(letter.rule.as_deref(), Some("chaos"));
        assert!(
            letter.reason.contains(reason),
            "{payload}: {}",
            letter.reason
        );

        // The next good message on the same rule is processed.
        publish(&client, "chaos/x", format!("good-{i}")).await;
        sluice
            .eventually(&format!("good message after {payload}"), WAIT, || async {
                (sluice.all_events("chaos/#").await.len() > i).then_some(())
            })
            .await;
    }
    assert_eq!(sluice.dead_letters().await.len(), 3);

    // A batch holding one trapping message among good ones fails only that one.
    for p in ["good-a", "good-b", "trap", "good-c"] {
        publish(&client, "chaos/y", p).await;
    }
    sluice
        .eventually(
            "three more events and one more dead letter",
            WAIT,
            || async {
                let events = sluice.all_events("chaos/y").await.len();
                let letters = sluice.dead_letters().await.len();
                (events == 3 && letters == 4).then_some(())
            },
        )
        .await;
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_swaps_a_module_without_losing_a_message() {
    let sluice = Sluice::start(|dir| {
        write_wat(
            &dir.join("versioned.wasm"),
            &guests::constant_event(r#"{"v":1}"#),
        );
        std::fs::write(dir.join("versioned.toml"), "topic = \"reload/#\"\n").unwrap();
    })
    .await;
    let client = sluice.mqtt("publisher-5").await;
    let v2 = wat::parse_str(guests::constant_event(r#"{"v":2}"#)).unwrap();

    let total = 600;
    for n in 0..total {
        publish(&client, "reload/x", format!("{n}")).await;
        if n == total / 3 {
            replace_file(&sluice.rules_dir.join("versioned.wasm"), &v2);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let events = sluice
        .eventually("one event per message", WAIT, || async {
            let e = sluice.all_events("reload/#").await;
            (e.len() >= total).then_some(e)
        })
        .await;
    assert_eq!(
        events.len(),
        total,
        "every message handled by exactly one version"
    );
    let versions: Vec<i64> = events
        .iter()
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap()["v"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let v1 = versions.iter().filter(|v| **v == 1).count();
    assert!(
        v1 > 0 && v1 < total,
        "both versions ran: {v1} of {total} by v1"
    );
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "once swapped, never back: {versions:?}"
    );
    assert!(sluice.dead_letters().await.is_empty());
    sluice.stop();
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (tonic::Code, String) {
    let status = r.expect_err("expected an error");
    (status.code(), status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_requests_get_invalid_argument() {
    let sluice = Sluice::start(|_| {}).await;
    let mut t = sluice.telemetry().await;

    // Each bad points request, and the field its error must name.
    let bad_points = [
        (QueryPointsRequest::default(), "device_id"),
        (
            QueryPointsRequest {
                device_id: "d".into(),
                start: Some(ts(20)),
                end: Some(ts(10)),
                ..Default::default()
            },
            "end",
        ),
        (
            QueryPointsRequest {
                device_id: "d".into(),
                page_token: "bogus".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            QueryPointsRequest {
                device_id: "d".into(),
                limit: 1_000_000,
                ..Default::default()
            },
            "limit",
        ),
        (
            QueryPointsRequest {
                device_id: "d".into(),
                start: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            "start",
        ),
    ];
    for (request, field) in bad_points {
        let (c, m) = code(t.query_points(request.clone()).await);
        assert_eq!(c, tonic::Code::InvalidArgument, "{request:?}");
        assert!(m.contains(field), "{request:?}: {m}");
    }

    let (c, m) = code(
        t.query_events(QueryEventsRequest {
            topic_filter: "a/#/b".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(m.contains("topic_filter"), "{m}");

    // Valid requests over empty data still answer.
    let r = t
        .query_events(QueryEventsRequest {
            start: Some(ts(0)),
            end: Some(ts(Utc
                .with_ymd_and_hms(2100, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.events.is_empty() && r.next_page_token.is_empty());
    sluice.stop();
}

/// What `grpcurl list` does, over both reflection versions, plus a health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let sluice = Sluice::start(|_| {}).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", sluice.grpc_port))
            .unwrap()
            .connect()
            .await
            .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"sluice.v1.Telemetry".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "sluice.v1.Telemetry".into(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("{response:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    sluice.stop();
}

/// The README's quick start, outside in: the stock `mosquitto_pub` client
/// publishes, a gRPC client reads the two points back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_quick_start() {
    if std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_err()
    {
        // CI installs mosquitto-clients (.ci/run), so this only skips on a bare developer machine.
        eprintln!("SKIPPED: mosquitto_pub is not installed (apt-get install -y mosquitto-clients)");
        return;
    }
    // As in the README: authentication on, the device created with the CLI.
    let sluice = Sluice::start_with(support::Options::authenticated(), |_| {}).await;
    let created = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["devices", "create", "dev-1"])
        .env("DATABASE_URL", sluice.pg.database_url())
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let secret = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &sluice.mqtt_port.to_string(),
            "-q",
            "1",
        ])
        .args(["-i", "dev-1", "-u", "dev-1", "-P", &secret])
        .args(["-t", "devices/dev-1/telemetry"])
        .args([
            "-m",
            r#"{"temperature": 21.5, "humidity": 40, "ts": 1767225600000}"#,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let points = sluice
        .eventually("the quick-start points", WAIT, || async {
            let p = sluice.all_points("dev-1").await;
            (p.len() == 2).then_some(p)
        })
        .await;
    let values: BTreeMap<_, _> = points.iter().map(|p| (p.metric.clone(), p.value)).collect();
    assert_eq!(
        values,
        BTreeMap::from([
            ("humidity".to_string(), 40.0),
            ("temperature".to_string(), 21.5)
        ])
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_are_bound_to_their_query_and_survive_a_restart() {
    let mut sluice = Sluice::start(|_| {}).await;
    let client = sluice.mqtt("publisher-pages").await;
    for device in ["dev-a", "dev-b"] {
        publish(
            &client,
            &format!("devices/{device}/telemetry"),
            r#"{"x": 1, "y": 2, "z": 3, "ts": 1767225600000}"#,
        )
        .await;
    }
    sluice
        .eventually("both devices' points", WAIT, || async {
            let n = sluice.all_points("dev-a").await.len() + sluice.all_points("dev-b").await.len();
            (n == 6).then_some(())
        })
        .await;
    let page = |device: &str, token: &str| QueryPointsRequest {
        device_id: device.into(),
        limit: 1,
        page_token: token.into(),
        ..Default::default()
    };
    let mut t = sluice.telemetry().await;
    let first = t
        .query_points(page("dev-a", ""))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let second = t
        .query_points(page("dev-a", &token))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.points, second.points);

    // The token of dev-a's query is refused for dev-b's, and when edited.
    let e = t.query_points(page("dev-b", &token)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("page_token"), "{}", e.message());
    let mut edited = token.clone().into_bytes();
    edited[2] = if edited[2] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    let e = t.query_points(page("dev-a", &edited)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The key is the database's, so the token outlives the process.
    sluice.terminate();
    sluice.restart().await;
    let mut t = sluice.telemetry().await;
    let again = t
        .query_points(page("dev-a", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.points, second.points);
    sluice.stop();
}
