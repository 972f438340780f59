//! `sluice-sim` outside in: the load generator, used as a library, against
//! a real `sluice serve` with its own PostgreSQL, over real MQTT (plain,
//! authenticated, TLS) and the real gRPC API. Every check is on counts
//! (what was sent against what was stored), never on speed.

mod support;

use rcgen::ExtendedKeyUsagePurpose;
use sluice_proto::v1::QueryPointsRequest;
use sluice_simulator::{Report, Verification, parse_args, run};
use std::path::Path;
use std::time::Duration;
use support::pki::Pki;
use support::{Options, Sluice};

/// Generous: a loaded CI machine with two cores runs these in parallel.
const STORED_WITHIN: Duration = Duration::from_secs(60);

/// The simulator's command line against this server's plain MQTT and
/// gRPC ports, with generous timeouts, then `extra` (whose flags replace
/// those defaults).
fn sim_args(sluice: &Sluice, extra: &[&str]) -> Vec<String> {
    let defaults = [
        ("--host", "127.0.0.1".to_owned()),
        ("--port", sluice.mqtt_port.to_string()),
        ("--verify-timeout-secs", "60".to_owned()),
        ("--connect-timeout-secs", "30".to_owned()),
        ("--drain-timeout-secs", "30".to_owned()),
    ];
    let mut args = vec!["sluice-sim".to_owned()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), value]);
        }
    }
    if extra.iter().any(|a| ["--verify", "--latency"].contains(a)) && !extra.contains(&"--grpc") {
        args.extend([
            "--grpc".to_owned(),
            format!("http://127.0.0.1:{}", sluice.grpc_port),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn simulate(args: Vec<String>) -> Report {
    let config = parse_args(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    run(config)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"))
}

/// The run sent something, every QoS 1 message was acknowledged, and
/// `--verify` read back each of them exactly once.
fn assert_stored_exactly(report: &Report) -> &Verification {
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.summary.sent > 0, "{report}");
    assert_eq!(report.summary.missing_acks(), 0, "{report}");
    let v = report.verify.as_ref().expect("--verify ran");
    assert_eq!(v.expected, report.summary.sent, "{report}");
    assert_eq!(
        (v.missing, v.duplicates, v.unexpected, v.lost),
        (0, 0, 0, 0),
        "{report}"
    );
    assert!(v.complete);
    assert_eq!(report.exit_status(), 0, "{report}");
    v
}

/// Every point stored for `device`, all metrics.
async fn stored_points(sluice: &Sluice, device: &str) -> usize {
    let mut client = sluice.telemetry().await;
    let mut stream = client
        .stream_points(QueryPointsRequest {
            device_id: device.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(batch) = futures_util::StreamExt::next(&mut stream).await {
        n += batch.unwrap().points.len();
    }
    n
}

/// The value of one Prometheus sample line (`name{labels} value`), 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Registers devices with `sluice devices create` and writes the
/// credentials file the way `--help` shows: `id,secret` per line.
fn credentials_file(sluice: &Sluice, ids: &[&str], path: &Path) {
    let mut text = String::from("# sluice devices create, one line per device\n");
    for id in ids {
        let secret = sluice.cli(&["devices", "create", id]);
        text.push_str(&format!("{id},{}\n", secret.trim()));
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_profile_is_stored_exactly() {
    let sluice = Sluice::start(|_| {}).await;
    for (profile, prefix, points_per_message) in [
        ("env-sensor", "env-", 5),    // 4 metrics and seq
        ("asset-tracker", "trk-", 6), // lat, lon, speed, heading, battery and seq
        ("meter", "mtr-", 13),        // 12 metrics and seq
    ] {
        let args = sim_args(
            &sluice,
            &[
                "--profile",
                profile,
                "--id-prefix",
                prefix,
                "--devices",
                "3",
                "--duration",
                "2",
                "--rate",
                "20",
                "--seed",
                "7",
                "--verify",
            ],
        );
        let config = parse_args(&args).unwrap();
        assert_eq!(config.points_per_message(), points_per_message, "{profile}");
        let report = simulate(args).await;
        let v = assert_stored_exactly(&report);
        assert_eq!(v.devices.len(), 3);
        assert_eq!(
            report.summary.points,
            report.summary.sent * points_per_message
        );
        for d in &v.devices {
            assert!(d.expected > 0, "{profile}: {d:?}");
            let want = (d.expected * points_per_message) as usize;
            sluice
                .eventually(
                    &format!("{profile}: {want} points of {}", d.id),
                    STORED_WITHIN,
                    || async {
                        let n = stored_points(&sluice, &d.id).await;
                        assert!(n <= want, "{}: {n} points, more than {want}", d.id);
                        (n == want).then_some(())
                    },
                )
                .await;
        }
    }
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_devices_lose_no_telemetry() {
    let sluice = Sluice::start(|_| {}).await;
    // 50 messages each: bad JSON before seq 3, 13, …, 43 (5), a wrong
    // topic before 7, …, 47 (5), an oversized payload before 45 and a
    // reconnect storm before 11.
    let report = simulate(sim_args(
        &sluice,
        &[
            "--profile",
            "misbehaving",
            "--id-prefix",
            "bad-",
            "--devices",
            "3",
            "--count",
            "50",
            "--rate",
            "20",
            "--verify",
        ],
    ))
    .await;
    let v = assert_stored_exactly(&report);
    assert_eq!(v.expected, 150);
    assert_eq!(report.summary.misbehaved, 3 * 11, "{report}");
    assert_eq!(report.summary.storm_connects, 3 * 5, "{report}");

    // The bad JSON went to the dead letters, each one.
    let truncated = br#"{"seq": 1, "temper"#;
    sluice
        .eventually("15 dead letters of bad JSON", STORED_WITHIN, || async {
            let letters = sluice.dead_letters().await;
            let bad: Vec<_> = letters.iter().filter(|d| d.payload == truncated).collect();
            for d in &bad {
                assert!(
                    d.device_id
                        .as_deref()
                        .is_some_and(|id| id.starts_with("bad-"))
                );
            }
            (bad.len() == 15).then_some(())
        })
        .await;

    // The server closed each oversized publisher's connection, and each
    // device's main connection was taken over by its storm (the storm's
    // own connections mostly are too, but whether the server records a
    // takeover or a lost connection for them depends on which it notices
    // first).
    let text = sluice.metrics().await;
    let oversized = metric(
        &text,
        r#"sluice_connections_closed_total{reason="oversized"}"#,
    );
    assert_eq!(oversized, 3.0, "{text}");
    let taken_over = metric(&text, r#"sluice_disconnects_total{reason="taken_over"}"#);
    assert!(taken_over >= 3.0, "{taken_over} takeovers\n{text}");

    // And it is still up and serving: a clean, well-behaved run after it.
    let after = simulate(sim_args(
        &sluice,
        &[
            "--id-prefix",
            "good-",
            "--devices",
            "2",
            "--count",
            "10",
            "--rate",
            "20",
            "--verify",
        ],
    ))
    .await;
    assert_stored_exactly(&after);
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_fleet_from_a_credentials_file() {
    // MQTT needs device credentials and the API a token.
    let sluice = Sluice::start_with(Options::api_tokens(), |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.csv");
    credentials_file(&sluice, &["meter-a", "meter-b", "meter-c"], &file);
    let token = sluice.cli(&["tokens", "create", "sim", "--scope", "read"]);
    let token = token.trim();

    let report = simulate(sim_args(
        &sluice,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--api-token",
            token,
            "--duration",
            "2",
            "--rate",
            "20",
            "--verify",
        ],
    ))
    .await;
    let v = assert_stored_exactly(&report);
    let ids: Vec<&str> = v.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        ["meter-a", "meter-b", "meter-c"],
        "every entry, in order"
    );
    assert_eq!(report.summary.errors, 0, "{report}");

    // Misbehaving devices with credentials: the device ACL refuses their
    // wrong-topic publishes by closing the connection, which must not cost
    // any telemetry either.
    let misbehaving = dir.path().join("misbehaving.csv");
    credentials_file(&sluice, &["bad-a", "bad-b"], &misbehaving);
    let report = simulate(sim_args(
        &sluice,
        &[
            "--credentials",
            misbehaving.to_str().unwrap(),
            "--api-token",
            token,
            "--profile",
            "misbehaving",
            "--count",
            "50",
            "--rate",
            "20",
            "--verify",
        ],
    ))
    .await;
    assert_eq!(assert_stored_exactly(&report).expected, 100);
    assert_eq!(report.summary.storm_connects, 2 * 5, "{report}");
    let text = sluice.metrics().await;
    let denied = metric(
        &text,
        r#"sluice_connections_closed_total{reason="publish_denied"}"#,
    );
    assert_eq!(denied, 2.0 * 5.0, "{text}");

    // Without the token the API refuses, before any device starts.
    let no_token = parse_args(sim_args(
        &sluice,
        &[
            "--credentials",
            file.to_str().unwrap(),
            "--count",
            "1",
            "--verify",
        ],
    ))
    .unwrap();
    let err = format!("{:#}", run(no_token).await.unwrap_err());
    assert!(err.contains("--api-token"), "{err}");

    // A wrong secret: no device gets in.
    let wrong = dir.path().join("wrong.csv");
    std::fs::write(&wrong, "meter-a,not-the-secret\n").unwrap();
    let refused = parse_args(sim_args(
        &sluice,
        &[
            "--credentials",
            wrong.to_str().unwrap(),
            "--count",
            "1",
            "--connect-timeout-secs",
            "3",
        ],
    ))
    .unwrap();
    let err = run(refused).await.unwrap_err();
    assert!(
        err.downcast_ref::<sluice_simulator::NoDeviceConnected>()
            .is_some(),
        "{err:#}"
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_fleets_with_passwords_and_with_client_certificates() {
    let pki = Pki::new();
    let sluice = Sluice::start_with(pki.authenticated_server(), |_| {}).await;
    let mqtts_port = sluice.mqtts_port.to_string();
    let ca = pki.path("ca.pem");
    let tls = [
        "--tls",
        "--host",
        "localhost",
        "--port",
        &mqtts_port,
        "--ca-file",
        &ca,
    ];

    // Passwords over TLS, from a credentials file.
    let file = pki.dir.path().join("fleet.csv");
    credentials_file(&sluice, &["tls-pw-0", "tls-pw-1"], &file);
    let mut extra = tls.to_vec();
    extra.extend([
        "--credentials",
        file.to_str().unwrap(),
        "--duration",
        "2",
        "--rate",
        "20",
    ]);
    extra.push("--verify");
    let report = simulate(sim_args(&sluice, &extra)).await;
    assert_eq!(assert_stored_exactly(&report).devices.len(), 2);

    // Mutual TLS: each device its own certificate, CN = its id, no password.
    for id in ["tls-cert-0", "tls-cert-1"] {
        sluice.create_device(id).await;
        pki.issue_files(id, id, ExtendedKeyUsagePurpose::ClientAuth);
    }
    let (cert, key) = (pki.path("{id}.pem"), pki.path("{id}.key"));
    let mut extra = tls.to_vec();
    extra.extend(["--cert", &cert, "--key", &key, "--id-prefix", "tls-cert-"]);
    extra.extend([
        "--devices",
        "2",
        "--duration",
        "2",
        "--rate",
        "20",
        "--verify",
    ]);
    let report = simulate(sim_args(&sluice, &extra)).await;
    assert_eq!(assert_stored_exactly(&report).devices.len(), 2);
    assert_eq!(report.summary.errors, 0, "{report}");
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_latency_samples_every_message() {
    let sluice = Sluice::start(|_| {}).await;
    let report = simulate(sim_args(
        &sluice,
        &[
            "--id-prefix",
            "lat-",
            "--devices",
            "3",
            "--count",
            "40",
            "--rate",
            "20",
            "--latency",
            "--verify",
        ],
    ))
    .await;
    assert_stored_exactly(&report);
    assert_eq!(report.summary.sent, 120);
    let stored = report.stored_latency.as_ref().expect("--latency ran");
    assert_eq!(stored.error, None);
    assert_eq!(stored.count, report.summary.sent, "{report}");
    assert_eq!((stored.unmatched, stored.repeated, stored.gap), (0, 0, 0));
    let l = stored.latency.expect("percentiles");
    assert_eq!(l.samples, stored.count);
    assert!(l.p50_ms > 0.0, "{l:?}");
    assert!(
        l.p50_ms <= l.p90_ms && l.p90_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
        "{l:?}"
    );
    let json = report.to_json();
    assert_eq!(json["stored_latency_ms"]["count"], 120);
    for key in ["p50", "p90", "p99", "max"] {
        assert!(json["stored_latency_ms"][key].as_f64().is_some(), "{json}");
    }
    sluice.stop();
}
