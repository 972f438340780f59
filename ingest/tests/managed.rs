//! The managed PostgreSQL server: start, restart on the same directory, parallel clusters, and
//! teardown on drop.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sluice_ingest::managed::ManagedPostgres;
use sqlx::{Connection, PgConnection};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn select_one(url: &str) -> i32 {
    let mut conn = connect(url).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    one
}

fn saved_password(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("pg-password"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn restart_reuses_cluster_and_saved_password() {
    let dir = tempfile::tempdir().unwrap();

    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let url = pg.database_url();
    assert_eq!(select_one(&url).await, 1);
    let mut conn = connect(&url).await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(db, "sluice");
    sqlx::raw_sql("CREATE TABLE marker (v int); INSERT INTO marker VALUES (42)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    pg.stop().await.unwrap();

    let password = saved_password(dir.path());
    assert!(url.contains(&format!(":{password}@")), "{url}");
    let mode = std::fs::metadata(dir.path().join("pg-password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Same directory again: the existing cluster is started anew, not re-initialised.
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    assert_eq!(saved_password(dir.path()), password);
    // Sluice itself connects through the server's Unix socket in the
    // cluster directory; TCP on 127.0.0.1 serves everything else.
    let socket_dir = std::path::absolute(dir.path().join("pg")).unwrap();
    assert!(
        pg.database_url()
            .ends_with(&format!("?host={}", socket_dir.display())),
        "{}",
        pg.database_url()
    );
    assert_eq!(select_one(&pg.database_url()).await, 1);
    let url = format!(
        "postgres://postgres:{password}@127.0.0.1:{}/sluice",
        pg.port()
    );
    let mut conn = connect(&url).await;
    let v: i32 = sqlx::query_scalar("SELECT v FROM marker")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 42);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn two_clusters_run_side_by_side() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(
        ManagedPostgres::start_ephemeral(a_dir.path()),
        ManagedPostgres::start_ephemeral(b_dir.path()),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    assert_eq!(select_one(&a.database_url()).await, 1);
    assert_eq!(select_one(&b.database_url()).await, 1);
    assert_ne!(saved_password(a_dir.path()), saved_password(b_dir.path()));
    a.stop().await.unwrap();
    // Stopping one leaves the other alone.
    assert_eq!(select_one(&b.database_url()).await, 1);
    b.stop().await.unwrap();
}

#[tokio::test]
async fn dropping_without_stop_tears_the_server_down() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let port = pg.port();
    assert_eq!(select_one(&pg.database_url()).await, 1);
    drop(pg);
    assert!(!dir.path().join("pg/postmaster.pid").exists());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections after drop"
    );
}

#[tokio::test]
async fn a_running_server_is_reused_and_left_to_its_starter() {
    let dir = tempfile::tempdir().unwrap();
    let first = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    let second = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    assert_eq!(first.port(), second.port());
    assert_eq!(first.database_url(), second.database_url());
    // The second handle did not start the server, so neither dropping nor stopping it may end it.
    second.stop().await.unwrap();
    assert_eq!(select_one(&first.database_url()).await, 1);
    first.stop().await.unwrap();
    assert!(!dir.path().join("pg/postmaster.pid").exists());
}

#[tokio::test]
async fn a_stale_pid_file_does_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    pg.stop().await.unwrap();
    // What a crashed server (or a reboot) leaves behind: a pid file naming no live process.
    let pid_file = dir.path().join("pg/postmaster.pid");
    std::fs::write(
        &pid_file,
        format!(
            "999999\n{}\n0\n5432\n\n127.0.0.1\n0 0\nready   \n",
            dir.path().join("pg").display()
        ),
    )
    .unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    assert_ne!(pg.port(), 5432);
    assert_eq!(select_one(&pg.database_url()).await, 1);
    pg.stop().await.unwrap();
}
