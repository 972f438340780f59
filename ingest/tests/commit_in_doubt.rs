//! A connection lost during COMMIT: the server committed, the writer never
//! heard so. It must not write the batch again.
//!
//! Between the writer and a real PostgreSQL sits a TCP proxy that, once
//! armed, forwards the next `COMMIT` of a transaction with a COPY, lets the server answer it in full
//! (so the commit is certainly done), swallows that answer and closes the
//! client's connection: what `pg_ctl stop -m immediate` or a network cut
//! does at the worst moment, made deterministic.

use sluice_ingest::managed::ManagedPostgres;
use sluice_ingest::{PointRecord, Record, WriterConfig, start_writer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts what the proxy did.
#[derive(Default)]
struct Proxy {
    /// Cut the connection at the next COMMIT.
    armed: AtomicBool,
    /// COMMITs whose answer was swallowed.
    cuts: AtomicUsize,
}

/// Reads one protocol message (type byte, then a length that counts
/// itself); None at end of stream.
async fn message(r: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut msg = head.to_vec();
    msg.resize(1 + len.max(4), 0);
    r.read_exact(&mut msg[5..]).await.ok()?;
    Some(msg)
}

/// Serves clients on `listener`, each relayed to PostgreSQL on `upstream`.
async fn run_proxy(listener: TcpListener, upstream: u16, proxy: Arc<Proxy>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
            continue;
        };
        tokio::spawn(relay(client, server, proxy.clone()));
    }
}

async fn relay(client: TcpStream, server: TcpStream, proxy: Arc<Proxy>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // The startup message has no type byte: its length comes first.
    let mut len = [0u8; 4];
    if client_rx.read_exact(&mut len).await.is_err() {
        return;
    }
    let mut startup = len.to_vec();
    startup.resize(u32::from_be_bytes(len) as usize, 0);
    if client_rx.read_exact(&mut startup[4..]).await.is_err()
        || server_tx.write_all(&startup).await.is_err()
    {
        return;
    }
    let cutting = Arc::new(AtomicBool::new(false));
    let to_server = {
        let (cutting, proxy) = (cutting.clone(), proxy.clone());
        tokio::spawn(async move {
            // A COPY in this transaction: the batch's, not the partitions'
            // DDL, which commits on its own.
            let mut copied = false;
            while let Some(msg) = message(&mut client_rx).await {
                copied |= msg[0] == b'c';
                // A COMMIT ends the transaction, so it resets `copied`.
                if msg[0] == b'Q'
                    && msg[5..].starts_with(b"COMMIT")
                    && std::mem::take(&mut copied)
                    && proxy.armed.swap(false, Ordering::SeqCst)
                {
                    cutting.store(true, Ordering::SeqCst);
                }
                if server_tx.write_all(&msg).await.is_err() {
                    return;
                }
            }
        })
    };
    while let Some(msg) = message(&mut server_rx).await {
        if !cutting.load(Ordering::SeqCst) {
            if client_tx.write_all(&msg).await.is_err() {
                break;
            }
            continue;
        }
        // ReadyForQuery after the COMMIT: the server is done with it.
        if msg[0] == b'Z' {
            proxy.cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    to_server.abort();
    // Dropping both halves of both sockets closes them.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_answer_was_lost_is_not_written_again() {
    const POINTS: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let pg = ManagedPostgres::start_ephemeral(dir.path()).await.unwrap();
    // Direct, for the schema and the checks.
    let direct = sluice_ingest::connect(&pg.database_url(), 2).await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let proxy = Arc::new(Proxy::default());
    let proxy_task = tokio::spawn(run_proxy(listener, pg.port(), proxy.clone()));
    // The same credentials and database, over TCP through the proxy.
    let url = pg.database_url();
    let base = url.split('?').next().unwrap();
    let through_proxy = base.replace(
        &format!("localhost:{}", pg.port()),
        &format!("127.0.0.1:{proxy_port}"),
    );
    let through_proxy = through_proxy.replace(
        &format!("127.0.0.1:{}", pg.port()),
        &format!("127.0.0.1:{proxy_port}"),
    );
    assert!(through_proxy.contains(&proxy_port.to_string()), "{url}");
    let pool = sluice_ingest::connect(&format!("{through_proxy}?sslmode=disable"), 2)
        .await
        .unwrap();

    let stored = Arc::new(AtomicU64::new(0));
    let report = stored.clone();
    let writer = start_writer(
        pool,
        WriterConfig {
            writers: 1,
            ..WriterConfig::default()
        },
        Some(Box::new(move |mark| report.store(mark, Ordering::SeqCst))),
        "in-doubt-spool",
    )
    .await
    .unwrap();
    // The next COMMIT after a COPY is the batch's.
    proxy.armed.store(true, Ordering::SeqCst);
    let now = chrono::Utc::now();
    let records: Vec<Record> = (0..POINTS)
        .map(|i| {
            Record::Point(PointRecord {
                device_id: Arc::from("doubt"),
                metric: "seq".into(),
                time: now + chrono::Duration::milliseconds(i as i64),
                value: i as f64,
            })
        })
        .collect();
    let sink = writer.sink.clone();
    tokio::task::spawn_blocking(move || sink.blocking_send_marked(records, 1).unwrap())
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored.load(Ordering::SeqCst) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch was never reported stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fault happened: a COMMIT went through whose answer never arrived.
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM points p JOIN series s ON s.id = p.series_id \
         WHERE s.device_id = 'doubt'",
    )
    .fetch_one(&direct)
    .await
    .unwrap();
    assert_eq!(rows, POINTS as i64, "the batch was written again");

    drop(writer.sink);
    writer.handle.await.unwrap();
    proxy_task.abort();
    direct.close().await;
    pg.stop().await.unwrap();
}
