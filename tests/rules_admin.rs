//! Managing rules through `sluice.v1.Admin` and `sluice rules …` against a
//! running server: deploy (checked, stored, swapped in), list, get with
//! status and counters, enable, disable, delete, suspension, restarts.

mod guests;
mod support;

use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::rule::{Source, Status};
use sluice_proto::v1::{
    DeleteRuleRequest, DeployRuleRequest, DisableRuleRequest, EnableRuleRequest, GetRuleRequest,
    ListRulesRequest, Rule,
};
use std::time::Duration;
use support::{Sluice, publish, write_wat};
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

fn deploy(name: &str, topic: &str, wat_text: &str) -> DeployRuleRequest {
    DeployRuleRequest {
        name: name.into(),
        topic_filter: topic.into(),
        module: wat::parse_str(wat_text).unwrap(),
        ..Default::default()
    }
}

async fn admin(sluice: &Sluice) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://127.0.0.1:{}", sluice.grpc_port))
        .await
        .unwrap()
}

async fn get(admin: &mut AdminClient<Channel>, name: &str) -> Result<Rule, tonic::Status> {
    admin
        .get_rule(GetRuleRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

fn refused(r: Result<tonic::Response<Rule>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("expected a refusal");
    (s.code(), s.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_deployed_managed_and_kept_over_grpc() {
    let mut sluice = Sluice::start(|dir| {
        write_wat(&dir.join("fromdir.wasm"), &guests::constant_event("{}"));
        std::fs::write(dir.join("fromdir.toml"), "topic = \"dir/#\"\n").unwrap();
    })
    .await;
    let mut admin = admin(&sluice).await;

    // A bad deploy is refused with the field and the reason, and changes nothing.
    let cases = [
        (
            DeployRuleRequest {
                module: b"not wasm".to_vec(),
                ..deploy("bad", "x/#", &guests::counter())
            },
            "not a valid WebAssembly module",
        ),
        (
            deploy(
                "wasi",
                "x/#",
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))"#,
            ),
            "no WASI",
        ),
        (deploy("bad name", "x/#", &guests::counter()), "name:"),
        (deploy("bad", "x/#/y", &guests::counter()), "topic_filter:"),
        (
            DeployRuleRequest {
                config_json: "[1]".into(),
                ..deploy("bad", "x/#", &guests::counter())
            },
            "config_json must be a JSON object",
        ),
    ];
    for (request, expected) in cases {
        let (code, message) = refused(admin.deploy_rule(request).await);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.contains(expected), "{expected}: {message}");
    }
    let (code, message) = refused(
        admin
            .deploy_rule(deploy("fromdir", "x/#", &guests::counter()))
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{message}");

    // Deploy, use, and read the counters back.
    let rule = admin
        .deploy_rule(deploy("counter", "devices/+/counted", &guests::counter()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rule.source(), rule.status(), rule.version),
        (Source::Api, Status::Active, 1)
    );
    assert_eq!(rule.module_sha256.len(), 64);
    let client = sluice.mqtt("rules-admin").await;
    for _ in 0..3 {
        publish(&client, "devices/pump/counted", "x").await;
    }
    let rule = sluice
        .eventually("counters for three messages", WAIT, || async {
            let r = get(&mut admin.clone(), "counter").await.unwrap();
            (r.counters.as_ref().unwrap().messages_in == 3).then_some(r)
        })
        .await;
    let c = rule.counters.unwrap();
    assert_eq!((c.points, c.dead_letters), (3, 0));
    // Writes to one key within a batch are committed as one.
    assert!((1..=3).contains(&c.state_writes), "{c:?}");
    assert!(c.batch_p50.is_some() && c.batch_p99.is_some());

    // Every rule is listed, one page at a time.
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_rules(ListRulesRequest {
                limit: 1,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.rules.iter().map(|r| (r.name.clone(), r.source())));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        names,
        [
            ("counter".to_owned(), Source::Api),
            ("fromdir".to_owned(), Source::Directory),
            ("telemetry".to_owned(), Source::Builtin)
        ]
    );

    // A new version replaces the old between batches.
    let v2 = admin
        .deploy_rule(deploy(
            "counter",
            "devices/+/counted",
            &guests::constant_event(r#"{"v":2}"#),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);
    publish(&client, "devices/pump/counted", "x").await;
    sluice
        .eventually("an event from version 2", WAIT, || async {
            let events = sluice.all_events("devices/+/counted").await;
            events
                .iter()
                .any(|e| e.payload == br#"{"v":2}"# && e.rule == "counter")
                .then_some(())
        })
        .await;

    // Disabled: its messages are no longer its own (unmatched, stored as received).
    let disabled = admin
        .disable_rule(DisableRuleRequest {
            name: "counter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.status(), Status::Disabled);
    let (code, _) = refused(
        admin
            .disable_rule(DisableRuleRequest {
                name: "fromdir".into(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition);

    // Deployed rules survive a restart, disabled or not.
    sluice.terminate();
    sluice.restart().await;
    let mut admin = self::admin(&sluice).await;
    let after = get(&mut admin, "counter").await.unwrap();
    assert_eq!((after.version, after.status()), (2, Status::Disabled));
    let enabled = admin
        .enable_rule(EnableRuleRequest {
            name: "counter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.status(), Status::Active);

    // Deleted: gone from the API and from the database, with its state.
    admin
        .delete_rule(DeleteRuleRequest {
            name: "counter".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        get(&mut admin, "counter").await.unwrap_err().code(),
        Code::NotFound
    );
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rules), (SELECT count(*) FROM rule_state WHERE rule = 'counter')",
    )
    .fetch_one(&sluice.db)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rule_is_suspended_until_enabled_and_says_why() {
    let sluice = Sluice::start(|_| {}).await;
    let mut admin = admin(&sluice).await;
    admin
        .deploy_rule(deploy("chaos", "chaos/#", &guests::chaos()))
        .await
        .unwrap();
    let client = sluice.mqtt("rules-chaos").await;
    // Ten traps in a row (the default threshold) suspend it.
    for _ in 0..12 {
        publish(&client, "chaos/x", "trap").await;
    }
    let rule = sluice
        .eventually("the suspension", WAIT, || async {
            let r = get(&mut admin.clone(), "chaos").await.unwrap();
            (r.status() == Status::Suspended).then_some(r)
        })
        .await;
    assert!(
        rule.status_reason.contains("10 failed calls in a row")
            && rule.status_reason.contains("unreachable"),
        "{}",
        rule.status_reason
    );
    assert!(rule.counters.unwrap().failures["trap"] >= 10);
    // While suspended, its messages go to the dead letters with the reason.
    publish(&client, "chaos/x", "fine").await;
    sluice
        .eventually("a dead letter naming the suspension", WAIT, || async {
            let d = sluice.dead_letters().await;
            d.iter()
                .any(|l| l.payload == b"fine" && l.reason.contains("suspended"))
                .then_some(())
        })
        .await;
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains(r#"sluice_rule_suspended{rule="chaos"} 1"#),
        "{metrics}"
    );

    // Enabled again, it runs: a good message becomes its event.
    let enabled = admin
        .enable_rule(EnableRuleRequest {
            name: "chaos".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.status(), Status::Active);
    publish(&client, "chaos/x", "good").await;
    sluice
        .eventually("the event after enabling", WAIT, || async {
            (!sluice.all_events("chaos/#").await.is_empty()).then_some(())
        })
        .await;

    // Per-rule Prometheus series: messages in, outputs by kind, failures by
    // kind, batch-time percentiles, status.
    let metrics = sluice.metrics().await;
    for series in [
        r#"sluice_rule_messages_in_total{rule="chaos"}"#,
        r#"sluice_rule_outputs_total{rule="chaos",kind="event"} 1"#,
        r#"sluice_rule_failures_total{rule="chaos",kind="trap"}"#,
        r#"sluice_rule_batch_seconds{rule="chaos",quantile="0.5"}"#,
        r#"sluice_rule_batch_seconds{rule="chaos",quantile="0.99"}"#,
        r#"sluice_rule_suspended{rule="chaos"} 0"#,
    ] {
        assert!(metrics.contains(series), "{series} missing in:\n{metrics}");
    }
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_deploys_a_manifest_and_lists_rules() {
    let sluice = Sluice::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    write_wat(&dir.path().join("tally.wasm"), &guests::counter());
    std::fs::write(
        dir.path().join("tally.toml"),
        "topic = \"devices/+/tally\"\n[config]\nx = 1\n[limits]\nstate_bytes = 4096\n",
    )
    .unwrap();
    let server = format!("http://127.0.0.1:{}", sluice.grpc_port);
    let sluice_cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("rules")
            .args(args)
            .args(["--server", &server])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let deployed = sluice_cli(&["deploy", dir.path().join("tally.toml").to_str().unwrap()]);
    assert!(deployed.contains("deployed tally version 1"), "{deployed}");
    assert!(deployed.contains("4096 state bytes/device"), "{deployed}");
    let listed = sluice_cli(&["list"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with("tally "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("api") && line.contains("active") && line.ends_with("devices/+/tally"));
    let mut admin = admin(&sluice).await;
    assert_eq!(
        get(&mut admin, "tally").await.unwrap().config_json,
        r#"{"x":1}"#
    );
    sluice.stop();
}
