//! API tokens on a real `sluice serve`: what each kind of token may call,
//! and that missing, wrong, expired and revoked ones are refused with the
//! right gRPC status. Tokens come from the real `sluice tokens` command.

mod support;

use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::telemetry_client::TelemetryClient;
use sluice_proto::v1::{ListDevicesRequest, QueryPointsRequest};
use std::process::Command;
use std::time::Duration;
use support::{Options, Sluice};
use tonic::Code;
use tonic::transport::Channel;

/// Runs `sluice tokens ARGS` against the test's database; its stdout.
fn tokens_cli(sluice: &Sluice, args: &[&str]) -> String {
    sluice.cli(&[&["tokens"], args].concat())
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn query(channel: &Channel, token: Option<&str>) -> Result<(), tonic::Status> {
    let request = QueryPointsRequest {
        device_id: "dev-1".into(),
        ..Default::default()
    };
    TelemetryClient::new(channel.clone())
        .query_points(with_token(request, token))
        .await
        .map(drop)
}

async fn list_devices(channel: &Channel, token: Option<&str>) -> Result<(), tonic::Status> {
    AdminClient::new(channel.clone())
        .list_devices(with_token(ListDevicesRequest::default(), token))
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_call_what() {
    let sluice = Sluice::start_with(Options::api_tokens(), |_| {}).await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", sluice.grpc_port))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let read = tokens_cli(&sluice, &["create", "dashboards", "--scope", "read"]);
    let read = read.trim();
    let admin = tokens_cli(&sluice, &["create", "ops", "--scope", "admin"]);
    let admin = admin.trim();
    assert!(read.starts_with("slc_") && admin.starts_with("slc_"));

    // No token, a made-up one, a malformed header.
    let e = query(&channel, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Bearer"), "{}", e.message());
    let e = query(&channel, Some("slc_not-a-real-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        list_devices(&channel, None).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // A read token reads, and may not administer.
    query(&channel, Some(read)).await.unwrap();
    let e = list_devices(&channel, Some(read)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{}", e.message());

    // An admin token does both.
    query(&channel, Some(admin)).await.unwrap();
    list_devices(&channel, Some(admin)).await.unwrap();

    // Health needs no token, so load balancers and grpcurl work.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    // An expired token is refused.
    let (_, expired) = sluice_ingest::tokens::create(
        &sluice.db,
        "old",
        sluice_ingest::tokens::Scope::Admin,
        Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
    )
    .await
    .unwrap();
    let e = query(&channel, Some(&expired)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());

    // Revoked: refused once the server's cache of the verdict runs out.
    tokens_cli(&sluice, &["revoke", "dashboards"]);
    let e = sluice
        .eventually(
            "the revoked token refused",
            Duration::from_secs(15),
            || async { query(&channel, Some(read)).await.err() },
        )
        .await;
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());

    // The CLI's Admin calls carry --token.
    let server = format!("http://127.0.0.1:{}", sluice.grpc_port);
    let rules_list = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["rules", "list", "--server", &server]);
        if let Some(token) = token {
            cmd.args(["--token", token]);
        }
        cmd.output().expect("run sluice rules list")
    };
    let denied = rules_list(None);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let allowed = rules_list(Some(admin));
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("telemetry"));

    let listed = tokens_cli(&sluice, &["list"]);
    assert!(
        listed.contains("dashboards") && listed.contains("ops"),
        "{listed}"
    );
    assert!(!listed.contains(admin), "list must never show a token");
    let log = sluice.stop();
    assert!(
        !log.contains(admin) && !log.contains(read),
        "tokens leaked into the log"
    );
}

/// With `api.tls` set, the API speaks only TLS, and tokens work over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
    let options = Options {
        env: vec![
            (
                "SLUICE_API__TLS__CERT_FILE".into(),
                cert_file.display().to_string(),
            ),
            (
                "SLUICE_API__TLS__KEY_FILE".into(),
                key_file.display().to_string(),
            ),
        ],
        grpc_tls_ca_pem: Some(cert.cert.pem()),
        ..Options::api_tokens()
    };
    // The harness waits for the health check over TLS.
    let sluice = Sluice::start_with(options, |_| {}).await;
    let read = tokens_cli(&sluice, &["create", "tls-reader", "--scope", "read"]);
    let channel = sluice.grpc_channel().await.unwrap();
    assert_eq!(
        query(&channel, None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    query(&channel, Some(read.trim())).await.unwrap();

    // Plain HTTP/2 gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", sluice.grpc_port))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        // The TLS listener answers with a TLS alert, which h2 reports as
        // a protocol error: any error will do, an answer would not.
        assert!(query(&plain, Some(read.trim())).await.is_err());
    }
    sluice.stop();
}
