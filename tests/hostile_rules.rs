//! Hostile rules beside a good one, end to end: a real `sluice serve` runs
//! the C SDK's `convert` example (built from its source by the SDK's own
//! script) on device telemetry while devices publish; then three hostile
//! rules on overlapping topics are deployed through the Admin API in the
//! middle of the load: one loops forever, one grows its memory until the
//! limit, one traps on every message.
//!
//! What must hold (no speed is measured here; BENCHMARKS.md "Hostile
//! guests" measures the throughput the good rules keep):
//! - every message is stored by the good rule exactly once and correctly;
//! - every message a hostile rule got ends in exactly one dead letter, with
//!   the failure's reason or the suspension's, and each hostile rule is
//!   suspended by the documented policy;
//! - `/metrics` counts the same outcomes per rule;
//! - the process neither crashes nor keeps the guests' memory: its peak
//!   resident size stays within a bound made of the guests' memory limits.

mod guests;
mod support;

use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::rule::Status;
use sluice_proto::v1::{DeployRuleRequest, GetRuleRequest, RuleLimits};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::{Options, Sluice, metric_sum};

const WAIT: Duration = Duration::from_secs(120);
const DEVICES: usize = 4;
/// Messages per device before the hostile deploys, and again after they
/// returned; in between, devices publish for as long as the deploys take.
const PHASE: usize = 400;
/// The memory bomb's limit; `rules.workers` instances may hold it at once.
const BOMB_MEMORY_MB: u64 = 32;
const WORKERS: u64 = 2;
const GOOD: &str = "convert";
const GENEROUS_TIMEOUT_MS: u64 = 10_000;

/// A hostile rule: its name, topic filter (each overlaps the good rule's
/// `devices/+/telemetry`), module, and what its own failures say.
struct Hostile {
    name: &'static str,
    topic: &'static str,
    wat: String,
    reason: &'static str,
    failure_kind: &'static str,
    /// Its call time limit: the hang's is short so it costs little; the
    /// others' long, so that only their own failure can end their calls,
    /// however busy the machine.
    timeout_ms: u64,
}

fn hostile_rules() -> Vec<Hostile> {
    vec![
        Hostile {
            name: "hang",
            topic: "devices/#",
            wat: guests::infinite_loop(),
            reason: "time limit exceeded",
            failure_kind: "timeout",
            timeout_ms: 100,
        },
        Hostile {
            name: "bomb",
            topic: "devices/+/telemetry",
            wat: guests::memory_bomb(),
            reason: "memory limit exceeded",
            failure_kind: "resource_limit",
            timeout_ms: GENEROUS_TIMEOUT_MS,
        },
        Hostile {
            name: "trap",
            topic: "+/+/telemetry",
            wat: guests::trap_always(),
            reason: "trap: ",
            failure_kind: "trap",
            timeout_ms: GENEROUS_TIMEOUT_MS,
        },
    ]
}

/// Builds the C SDK's examples with its script (clang and lld; `.ci/run`
/// installs them) and installs `convert` with its manifest.
fn install_good_rule(rules_dir: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let build = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(repo.join("rules/sdk/c/build-examples.sh"))
        .arg(build.path())
        .output()
        .expect("run build-examples.sh");
    assert!(
        out.status.success(),
        "building the C examples failed (needs clang and lld):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(
        build.path().join("convert.wasm"),
        rules_dir.join("convert.wasm"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("rules/examples/convert/convert.toml"),
        rules_dir.join("convert.toml"),
    )
    .unwrap();
}

fn payload(seq: usize) -> String {
    // temp_f = seq, so the stored temp_c says which message it came from.
    format!(r#"{{"seq":{seq},"temp_f":{seq}}}"#)
}

fn device(d: usize) -> String {
    format!("hostile-dev-{d}")
}

/// Publishes from `from[d]` on for every device `d`, each on its own
/// connection: `count` messages, and then more until `until` turns true
/// (if given). Returns each device's next seq once all are handed over.
async fn publish_phase(
    clients: &[rumqttc::AsyncClient],
    from: &[usize],
    count: usize,
    until: Option<tokio::sync::watch::Receiver<bool>>,
) -> Vec<usize> {
    let mut tasks = Vec::new();
    for (d, client) in clients.iter().enumerate() {
        let client = client.clone();
        let mut seq = from[d];
        let end = seq + count;
        let until = until.clone();
        tasks.push(tokio::spawn(async move {
            while seq < end || until.as_ref().is_some_and(|u| !*u.borrow()) {
                support::publish(
                    &client,
                    &format!("devices/{}/telemetry", device(d)),
                    payload(seq),
                )
                .await;
                seq += 1;
                // Lets the deploys' task run between publishes.
                tokio::task::yield_now().await;
            }
            seq
        }));
    }
    let mut next = Vec::new();
    for t in tasks {
        next.push(t.await.unwrap());
    }
    next
}

async fn count(sluice: &Sluice, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&sluice.db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rules_fail_alone_while_the_good_rule_stores_everything() {
    let mut sluice = Sluice::start_with(
        Options {
            env: vec![
                // The good rule alone makes points of the telemetry.
                ("SLUICE_RULES__BUILTIN_TELEMETRY".into(), "false".into()),
                ("SLUICE_RULES__WORKERS".into(), WORKERS.to_string()),
                // The good rule's time limit (the harness's 100 ms could
                // end a call whose thread the busy machine descheduled).
                (
                    "SLUICE_RULES__LIMITS__TIMEOUT_MS".into(),
                    GENEROUS_TIMEOUT_MS.to_string(),
                ),
            ],
            ..Default::default()
        },
        install_good_rule,
    )
    .await;
    let mut clients = Vec::new();
    for d in 0..DEVICES {
        clients.push(sluice.mqtt(&format!("hostile-pub-{d}")).await);
    }
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{}", sluice.grpc_port))
        .await
        .unwrap();

    // Phase 1: the good rule alone, until it has stored some of it.
    let after_one = publish_phase(&clients, &[0; DEVICES], PHASE, None).await;
    sluice
        .eventually("the good rule storing points", WAIT, || async {
            (count(&sluice, "SELECT count(*) FROM points").await > 0).then_some(())
        })
        .await;
    let baseline_rss = sluice.memory_kib("VmRSS");

    // Phase 2: the hostile rules are deployed while devices keep publishing.
    let hostiles = hostile_rules();
    let (deployed_tx, deployed) = tokio::sync::watch::channel(false);
    let deploys = async {
        for h in &hostiles {
            admin
                .deploy_rule(DeployRuleRequest {
                    name: h.name.into(),
                    topic_filter: h.topic.into(),
                    module: wat::parse_str(&h.wat).unwrap(),
                    limits: Some(RuleLimits {
                        memory_mb: Some(BOMB_MEMORY_MB),
                        timeout_ms: Some(h.timeout_ms),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("deploy {}: {e}", h.name));
        }
        deployed_tx.send(true).unwrap();
    };
    let (after_two, ()) = tokio::join!(
        publish_phase(&clients, &after_one, 0, Some(deployed)),
        deploys
    );

    // Phase 3: every hostile rule is in the active set by now.
    let totals = publish_phase(&clients, &after_two, PHASE, None).await;
    println!(
        "messages per device: before the deploys {after_one:?}, by their end {after_two:?}, in all {totals:?}"
    );
    let all: usize = totals.iter().sum();

    // Everything is stored: the good rule's two points per message, and
    // as many dead letters as the counters say the hostile rules made.
    let good_points = (all * 2) as i64;
    sluice
        .eventually("every message's outcome stored", WAIT, || async {
            let points = count(&sluice, "SELECT count(*) FROM points").await;
            let letters = count(&sluice, "SELECT count(*) FROM dead_letters").await;
            let metrics = sluice.metrics().await;
            let counted: f64 = hostiles
                .iter()
                .map(|h| {
                    metric_sum(
                        &metrics,
                        "sluice_rule_messages_total",
                        &[("rule", h.name), ("outcome", "dead_letter")],
                    )
                })
                .sum();
            (points >= good_points && letters as f64 >= counted && counted > 0.0).then_some(())
        })
        .await;

    check_good_rule(&sluice, &totals).await;
    let metrics = sluice.metrics().await;
    let letters = sluice.dead_letters().await;
    for h in &hostiles {
        check_hostile_rule(h, &letters, &metrics, &after_two, &totals);
        let rule = admin
            .get_rule(GetRuleRequest {
                name: h.name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            rule.status,
            Status::Suspended as i32,
            "{}: {rule:?}",
            h.name
        );
    }
    assert!(
        letters
            .iter()
            .all(|l| hostiles.iter().any(|h| l.rule.as_deref() == Some(h.name))),
        "only the hostile rules made dead letters"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_rule_messages_total",
            &[("rule", GOOD), ("outcome", "stored")]
        ),
        all as f64
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "sluice_rule_messages_total",
            &[("rule", GOOD), ("outcome", "dead_letter")]
        ),
        0.0
    );

    // Memory: a failed instance is thrown away, and its memory with it. The
    // peak may hold one bomb instance per worker at its limit (twice, for
    // the pool's slot and the one being torn down) plus 64 MiB for the
    // load, the compiles of three modules and the allocator. Keeping each
    // failed instance's memory would exceed it within the ~11 calls per
    // worker before suspension.
    let peak = sluice.memory_kib("VmHWM");
    let allowance = 2 * WORKERS * BOMB_MEMORY_MB * 1024 + 64 * 1024;
    println!(
        "RSS before the hostile deploys {baseline_rss} KiB, peak {peak} KiB, \
         growth {} KiB, bound {allowance} KiB",
        peak.saturating_sub(baseline_rss)
    );
    assert!(
        peak <= baseline_rss + allowance,
        "peak RSS {peak} KiB over the baseline {baseline_rss} KiB + {allowance} KiB"
    );
    // Never crashed, and stops cleanly (exit 0) with the rules suspended.
    sluice.pid();
    sluice.stop();
}

/// Every message of every device is stored exactly once by the good rule:
/// its `seq` point, and `temp_c` converted from `temp_f`.
async fn check_good_rule(sluice: &Sluice, totals: &[usize]) {
    let rows: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT device_id, metric, value FROM points_named ORDER BY device_id, metric, value",
    )
    .fetch_all(&sluice.db)
    .await
    .unwrap();
    let mut by_series: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for (device, metric, value) in rows {
        by_series.entry((device, metric)).or_default().push(value);
    }
    let mut expected = BTreeMap::new();
    for (d, &total) in totals.iter().enumerate() {
        let seqs: Vec<f64> = (0..total).map(|s| s as f64).collect();
        let celsius = seqs.iter().map(|f| (f - 32.0) * 5.0 / 9.0).collect();
        expected.insert((device(d), "seq".to_owned()), seqs);
        expected.insert((device(d), "temp_c".to_owned()), celsius);
    }
    assert_eq!(
        by_series.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the series stored"
    );
    for (series, want) in &expected {
        let got = &by_series[series];
        assert_eq!(got.len(), want.len(), "{series:?}: points stored");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{series:?}: {g} vs {w}"
            );
        }
    }
}

/// The hostile rule's dead letters: per device, exactly one for each
/// message from the first it got to the last (rule versions change between
/// batches, and a device's messages are processed in order), covering
/// every message published after its deploy returned; each with the
/// failure's reason or the suspension's, and counted in `/metrics`.
fn check_hostile_rule(
    h: &Hostile,
    letters: &[support::DeadLetter],
    metrics: &str,
    deployed_by: &[usize],
    totals: &[usize],
) {
    let mine: Vec<&support::DeadLetter> = letters
        .iter()
        .filter(|l| l.rule.as_deref() == Some(h.name))
        .collect();
    let (mut failed, mut suspended) = (0usize, 0usize);
    let mut seqs: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for l in &mine {
        if l.reason.starts_with("rule suspended after") {
            suspended += 1;
        } else {
            failed += 1;
        }
        assert!(
            l.reason.contains(h.reason),
            "{}: a dead letter says {:?}",
            h.name,
            l.reason
        );
        let body: serde_json::Value = serde_json::from_slice(&l.payload).unwrap();
        let seq = body["seq"].as_u64().unwrap() as usize;
        let device = l.device_id.clone().expect("a device id");
        assert_eq!(l.topic, format!("devices/{device}/telemetry"));
        seqs.entry(device).or_default().push(seq);
    }
    assert_eq!(seqs.len(), DEVICES, "{}: every device reached it", h.name);
    let mut firsts = Vec::new();
    for (device, mut got) in seqs {
        let d: usize = device.rsplit('-').next().unwrap().parse().unwrap();
        let (deployed_by, total) = (deployed_by[d], totals[d]);
        got.sort_unstable();
        let first = got[0];
        firsts.push(first);
        assert!(
            first <= deployed_by,
            "{}: {device}'s messages after the deploy all reached it (first: {first})",
            h.name
        );
        assert_eq!(
            got,
            (first..total).collect::<Vec<_>>(),
            "{}: {device}: one dead letter per message from {first} on",
            h.name
        );
    }
    // Suspended by the policy: after 2 timeouts, or 10 failures in a row.
    assert!(suspended > 0, "{}: never suspended", h.name);
    let failures = metric_sum(
        metrics,
        "sluice_rule_failures_total",
        &[("rule", h.name), ("kind", h.failure_kind)],
    );
    assert!(failures >= 1.0, "{}: failures counted: {failures}", h.name);
    println!(
        "{}: {} dead letters, {failed} from failed calls ({failures} failed calls of kind {}), \
         {suspended} while suspended; the first message it got per device: {firsts:?}",
        h.name,
        mine.len(),
        h.failure_kind
    );
    let counted = |outcome| {
        metric_sum(
            metrics,
            "sluice_rule_messages_total",
            &[("rule", h.name), ("outcome", outcome)],
        )
    };
    assert_eq!(counted("dead_letter"), mine.len() as f64, "{}", h.name);
    assert_eq!(counted("stored"), 0.0, "{}", h.name);
    assert_eq!(counted("dropped"), 0.0, "{}", h.name);
    assert_eq!(
        metric_sum(metrics, "sluice_rule_suspended", &[("rule", h.name)]),
        1.0,
        "{}",
        h.name
    );
}
