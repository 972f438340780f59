//! `sluice devices …` against a real PostgreSQL, as an operator would run it.

mod support;

use sluice_ingest::managed::ManagedPostgres;
use std::process::{Command, Output};
use support::stored_secret_hash;

fn sluice(args: &[&str], database_url: Option<&str>, data_dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("run sluice")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_saying(out: &Output, text: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(text), "expected {text:?} in: {stderr}");
}

#[tokio::test]
async fn devices_lifecycle_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(&tmp.path().join("pg"))
        .await
        .unwrap();
    let url = pg.database_url();
    let run = |args: &[&str]| sluice(args, Some(&url), tmp.path());
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let secret = ok(&run(&[
        "devices",
        "create",
        "dev-1",
        "--metadata",
        r#"{"site":"north"}"#,
    ]))
    .trim()
    .to_owned();
    assert_eq!(secret.len(), 32);
    let hash = stored_secret_hash(&db, "dev-1").await;
    assert!(
        sluice_ingest::devices::verify_secret(&secret, &hash),
        "only the hash is stored, and it matches"
    );
    assert!(!hash.contains(&secret));

    fails_saying(&run(&["devices", "create", "dev-1"]), "already exists");
    fails_saying(&run(&["devices", "create", "bad/id"]), "invalid device id");
    fails_saying(
        &run(&["devices", "create", "dev-2", "--metadata", "[1]"]),
        "JSON object",
    );
    fails_saying(
        &run(&["devices", "create", "dev-2", "--metadata", "{nope"]),
        "not JSON",
    );

    let listing = ok(&run(&["devices", "list"]));
    let line = listing
        .lines()
        .find(|l| l.starts_with("dev-1"))
        .expect(&listing);
    assert!(
        line.contains("true") && line.contains(r#"{"site":"north"}"#),
        "{line}"
    );

    ok(&run(&["devices", "disable", "dev-1"]));
    let listing = ok(&run(&["devices", "list"]));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("dev-1") && l.split_whitespace().nth(1) == Some("false")),
        "{listing}"
    );

    let rotated = ok(&run(&["devices", "rotate-secret", "dev-1"]))
        .trim()
        .to_owned();
    assert_ne!(rotated, secret);
    let hash = stored_secret_hash(&db, "dev-1").await;
    assert!(sluice_ingest::devices::verify_secret(&rotated, &hash));
    assert!(
        !sluice_ingest::devices::verify_secret(&secret, &hash),
        "the old secret stops working"
    );

    ok(&run(&["devices", "delete", "dev-1"]));
    fails_saying(&run(&["devices", "delete", "dev-1"]), "does not exist");
    fails_saying(&run(&["devices", "disable", "ghost"]), "does not exist");
    assert!(!ok(&run(&["devices", "list"])).contains("dev-1"));
    db.close().await;
}

/// Without a database URL the CLI uses the managed server under --data-dir,
/// starting it for the command and stopping it again.
#[test]
fn cli_uses_the_managed_database_like_serve() {
    let tmp = tempfile::Builder::new()
        .prefix("sluice-cli-")
        .tempdir()
        .unwrap();
    let secret = ok(&sluice(&["devices", "create", "edge-1"], None, tmp.path()))
        .trim()
        .to_owned();
    assert_eq!(secret.len(), 32);
    let listing = ok(&sluice(&["devices", "list"], None, tmp.path()));
    assert!(
        listing.contains("edge-1"),
        "the second command found the first one's data: {listing}"
    );
    assert!(
        !tmp.path().join("pg/postmaster.pid").exists(),
        "the server started for the command is stopped after it"
    );
}
