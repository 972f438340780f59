//! Spool disk full (RELIABILITY.md): the spool lives on a tmpfs of 2 MiB
//! that the test mounts, so a real file system answers ENOSPC. Sluice must
//! hold acknowledgements back (backpressure) while everything else keeps
//! working, never corrupt the spool, and take up where it stopped once
//! there is room again: first when the drained segments are deleted (the
//! checkpoint must get saved on the full disk for that), then when the
//! operator removes a file that filled the disk.
//!
//! Mounting needs root or CAP_SYS_ADMIN, which the CI runs with; without
//! it the test fails and says so rather than skipping.

mod support;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::{Options, Sluice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Small enough that a few tens of thousands of messages fill it.
const TMPFS_BYTES: u64 = 2 << 20;
const DEVICE: &str = "full1";
const TOPIC: &str = "devices/full1/telemetry";
/// More than the tmpfs holds while PostgreSQL is away (about 27,000).
const FIRST_LOAD: u64 = 40_000;
const SECOND_LOAD: u64 = 5_000;
const THIRD_LOAD: u64 = 2_000;
/// Generous: a safety net on a shared 2-core machine, not a speed check.
const BOUND: Duration = Duration::from_secs(120);

/// A size-capped tmpfs, unmounted when dropped (also when the test panics).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-spool-full-")
            .tempdir()
            .unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("sluice-spool-test")
            .arg(dir.path())
            .output();
        match output {
            Ok(out) if out.status.success() => Self { dir },
            Ok(out) => panic!(
                "this test needs root or CAP_SYS_ADMIN: it mounts a size-capped tmpfs for the \
                 spool, and `mount -t tmpfs` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!(
                "this test needs root or CAP_SYS_ADMIN and the `mount` command to make a \
                 size-capped tmpfs for the spool: {e}"
            ),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process that has not exited yet): detach it now,
            // the kernel frees it once the last user is gone.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes a file until the file system refuses more; returns its bytes.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5Au8; 4096];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

/// Publishes `{"seq": n}` for every n in `seqs` at QoS 1 over one
/// connection and counts the PUBACKs in `acked`; ends when all are acked
/// or the connection fails.
async fn stream(opts: MqttOptions, seqs: std::ops::Range<u64>, acked: Arc<AtomicU64>) {
    let (client, mut eventloop) = AsyncClient::new(opts, 200);
    let total = seqs.end - seqs.start;
    let publisher = tokio::spawn(async move {
        for seq in seqs {
            let payload = format!(r#"{{"seq": {seq}}}"#);
            if client
                .publish(TOPIC, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut done = 0;
    while done < total {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                done += 1;
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("the publishing connection ended: {e:?}");
                break;
            }
        }
    }
    publisher.abort();
}

fn publisher_options(sluice: &Sluice) -> MqttOptions {
    let mut opts = MqttOptions::new(DEVICE, "127.0.0.1", sluice.mqtt_port);
    // Longer than any stall here: a backpressured connection is not read,
    // so its pings wait with everything else.
    opts.set_keep_alive(Duration::from_secs(120));
    opts.set_inflight(100);
    opts
}

/// The stored seqs: (distinct, rows). On a connection of its own each time,
/// since PostgreSQL is stopped and started; a failed read counts as nothing.
async fn stored(sluice: &Sluice) -> (Vec<u64>, usize) {
    use sqlx::Connection as _;
    let rows: Result<Vec<f64>, sqlx::Error> = async {
        let mut conn = sqlx::PgConnection::connect(&sluice.pg.database_url()).await?;
        let rows = sqlx::query_scalar(
            "SELECT p.value FROM points p JOIN series s ON s.id = p.series_id \
             WHERE s.device_id = $1 AND s.metric = 'seq'",
        )
        .bind(DEVICE)
        .fetch_all(&mut conn)
        .await?;
        let _ = conn.close().await;
        Ok(rows)
    }
    .await;
    let rows = rows.unwrap_or_else(|e| {
        eprintln!("reading the stored seqs failed (retried): {e}");
        Vec::new()
    });
    let count = rows.len();
    let mut seqs: Vec<u64> = rows.into_iter().map(|v| v as u64).collect();
    seqs.sort_unstable();
    seqs.dedup();
    (seqs, count)
}

/// Waits until every seq in 0..n is stored; returns (distinct seqs, rows).
async fn wait_stored(sluice: &Sluice, n: u64) -> (u64, u64) {
    sluice
        .eventually(&format!("seqs 0..{n} stored"), BOUND, || async {
            let (seqs, rows) = stored(sluice).await;
            // Sorted and distinct: the first n are 0..n exactly when seq n - 1 is n - 1.
            let all = n == 0 || seqs.get(n as usize - 1) == Some(&(n - 1));
            all.then_some((seqs.len() as u64, rows as u64))
        })
        .await
}

/// The `/metrics` lines, by name with labels.
async fn metrics(sluice: &Sluice) -> BTreeMap<String, f64> {
    sluice
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn disk_full_gauge(sluice: &Sluice) -> Option<f64> {
    metrics(sluice).await.get("sluice_spool_disk_full").copied()
}

async fn wait_disk_full(sluice: &Sluice, full: bool) {
    let want = if full { 1.0 } else { 0.0 };
    sluice
        .eventually(&format!("sluice_spool_disk_full {want}"), BOUND, || async {
            (disk_full_gauge(sluice).await == Some(want)).then_some(())
        })
        .await;
}

/// What still works while the spool's disk is full: a new MQTT connection
/// answers PINGREQ, the gRPC health check answers, /metrics answers.
async fn the_rest_still_works(sluice: &Sluice) {
    const CONNECT: &[u8] = &[
        0x10, 0x11, // CONNECT, remaining length 17
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, // "MQTT", level 4
        0x02, // clean session
        0x00, 0x3C, // keep alive 60 s
        0x00, 0x05, b'p', b'r', b'o', b'b', b'e', // client id "probe"
    ];
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", sluice.mqtt_port))
        .await
        .unwrap();
    socket.write_all(CONNECT).await.unwrap();
    socket.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
    let mut reply = [0u8; 6];
    tokio::time::timeout(BOUND, socket.read_exact(&mut reply))
        .await
        .expect("CONNACK and PINGRESP while the disk is full")
        .unwrap();
    assert_eq!(reply, [0x20, 0x02, 0x00, 0x00, 0xD0, 0x00]);

    // Answers at all: whether Telemetry reports serving while the
    // database is away is the database's business, not the spool's.
    let channel = sluice.grpc_channel().await.unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Telemetry".into(),
        })
        .await
        .expect("the gRPC health check answers while the disk is full");
    assert!(
        metrics(sluice)
            .await
            .contains_key("sluice_spool_records_appended_total")
    );
}

/// The data directory on the tmpfs: the spool is `{data_dir}/spool`.
fn options(data_dir: &Path) -> Options {
    Options {
        env: vec![
            ("SLUICE_DATA_DIR".into(), data_dir.display().to_string()),
            // Small segments, so drained ones can be deleted while the
            // newest is still being written.
            ("SLUICE_BROKER__SPOOL__SEGMENT_BYTES".into(), "65536".into()),
            ("SLUICE_BROKER__MAX_PUBLISH_RATE".into(), "0".into()),
            // A stop while the database is away gives up on it this soon.
            ("SLUICE_SHUTDOWN_DRAIN_MS".into(), "2000".into()),
        ],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_holds_acks_back_and_recovers_without_loss() {
    // Declared first, so it is unmounted after Sluice is gone.
    let tmpfs = Tmpfs::mount(TMPFS_BYTES);
    let spool_dir: PathBuf = tmpfs.path().join("spool");
    let mut sluice = Sluice::start_with(options(tmpfs.path()), |_| {}).await;
    assert_eq!(disk_full_gauge(&sluice).await, Some(0.0));

    // Warm-up: the path works end to end before the disk fills.
    let acked = Arc::new(AtomicU64::new(0));
    stream(publisher_options(&sluice), 0..200, acked.clone()).await;
    assert_eq!(acked.load(Ordering::SeqCst), 200);
    wait_stored(&sluice, 200).await;

    // 1. The database goes away, so nothing drains, and the load is more
    // than the disk holds.
    sluice.pg.suspend("fast").await.unwrap();
    let first_end = 200 + FIRST_LOAD;
    let acked = Arc::new(AtomicU64::new(0));
    let streaming = tokio::spawn(stream(
        publisher_options(&sluice),
        200..first_end,
        acked.clone(),
    ));
    wait_disk_full(&sluice, true).await;
    the_rest_still_works(&sluice).await;
    let held = acked.load(Ordering::SeqCst);
    let m = metrics(&sluice).await;
    assert!(
        held < FIRST_LOAD,
        "every message was acknowledged on a full disk"
    );
    assert!(m["sluice_spool_disk_full_retries_total"] >= 1.0);
    assert_eq!(
        m["sluice_spool_disk_full"], 1.0,
        "the disk stopped being full"
    );
    assert!(
        !streaming.is_finished(),
        "the publisher stopped: {}",
        sluice.log()
    );
    eprintln!(
        "first load: {held} of {FIRST_LOAD} acknowledged when the 2 MiB disk filled \
         ({} messages held back)",
        FIRST_LOAD - held
    );

    // The database returns: the pipeline drains the spool, the checkpoint is
    // saved on the full disk, drained segments are deleted, and the held
    // messages are written and acknowledged.
    sluice.pg.resume().await.unwrap();
    tokio::time::timeout(BOUND, streaming)
        .await
        .expect("acks resumed after the drain freed space")
        .unwrap();
    assert_eq!(acked.load(Ordering::SeqCst), FIRST_LOAD, "{}", sluice.log());
    wait_disk_full(&sluice, false).await;
    let stored_now = wait_stored(&sluice, first_end).await;
    assert_eq!(
        stored_now,
        (first_end, first_end),
        "(distinct, rows) after the first load: nothing more, nothing twice"
    );

    // 2. The database away again and a file fills what is left of the disk;
    // then the operator removes it.
    sluice.pg.suspend("fast").await.unwrap();
    let filler = tmpfs.path().join("filler");
    let filled = fill(&filler);
    let second_end = first_end + SECOND_LOAD;
    let acked = Arc::new(AtomicU64::new(0));
    let streaming = tokio::spawn(stream(
        publisher_options(&sluice),
        first_end..second_end,
        acked.clone(),
    ));
    wait_disk_full(&sluice, true).await;
    the_rest_still_works(&sluice).await;
    let held = acked.load(Ordering::SeqCst);
    assert!(
        held < SECOND_LOAD,
        "every message was acknowledged on a full disk"
    );
    eprintln!(
        "second load: {held} of {SECOND_LOAD} acknowledged after a {filled}-byte file \
         filled the disk"
    );
    std::fs::remove_file(&filler).unwrap();
    // Acknowledged with the database still away: the spool has room again.
    tokio::time::timeout(BOUND, streaming)
        .await
        .expect("acks resumed after the file was removed")
        .unwrap();
    assert_eq!(
        acked.load(Ordering::SeqCst),
        SECOND_LOAD,
        "{}",
        sluice.log()
    );
    wait_disk_full(&sluice, false).await;

    // 3. A crash while those messages are only in the spool (in the segment
    // that was cut back after each refused write), then a restart: the
    // spool opens cleanly, replays them, and nothing is stored twice.
    sluice.kill();
    sluice.pg.resume().await.unwrap();
    let log_before = sluice.log().len();
    sluice.restart().await;
    let restarted = sluice.log()[log_before..].to_owned();
    assert!(restarted.contains("spool opened"), "{restarted}");
    assert!(!restarted.contains("corrupt"), "{restarted}");
    // Everything was written whole: not even a torn tail to cut.
    assert!(!restarted.contains("torn"), "{restarted}");
    let stored_now = wait_stored(&sluice, second_end).await;
    sluice
        .eventually("the spool drained", BOUND, || async {
            (metrics(&sluice).await.get("sluice_spool_pending_records") == Some(&0.0)).then_some(())
        })
        .await;
    let (seqs, rows) = stored(&sluice).await;
    assert_eq!(stored_now, (second_end, second_end), "(distinct, rows)");
    assert_eq!(
        (seqs.len() as u64, rows as u64),
        (second_end, second_end),
        "stored twice after the restart"
    );
    assert!(spool_dir.join("checkpoint").exists());

    // 4. SIGTERM while the disk is full: the process still stops cleanly
    // (`terminate` asserts exit 0 within 30 s). What was not written was
    // never acknowledged; every acknowledged message is stored after the
    // next start, once.
    sluice.pg.suspend("fast").await.unwrap();
    let filled = fill(&filler);
    let third_end = second_end + THIRD_LOAD;
    let acked = Arc::new(AtomicU64::new(0));
    let streaming = tokio::spawn(stream(
        publisher_options(&sluice),
        second_end..third_end,
        acked.clone(),
    ));
    wait_disk_full(&sluice, true).await;
    sluice.terminate();
    tokio::time::timeout(BOUND, streaming)
        .await
        .expect("the connection ended with the process")
        .unwrap();
    let held = acked.load(Ordering::SeqCst);
    assert!(
        held < THIRD_LOAD,
        "every message was acknowledged on a full disk"
    );
    eprintln!(
        "third load: {held} of {THIRD_LOAD} acknowledged before SIGTERM ({filled}-byte file)"
    );
    std::fs::remove_file(&filler).unwrap();
    sluice.pg.resume().await.unwrap();
    let log_before = sluice.log().len();
    sluice.restart().await;
    let stopped = &sluice.log()[..log_before];
    assert!(
        stopped.contains("spool closed while its disk was full"),
        "the writer did not give up at the stop: {stopped}"
    );
    let restarted = sluice.log()[log_before..].to_owned();
    assert!(restarted.contains("spool opened"), "{restarted}");
    assert!(!restarted.contains("corrupt"), "{restarted}");
    let (distinct, rows) = wait_stored(&sluice, second_end + held).await;
    assert_eq!(rows, distinct, "stored twice after a stop on a full disk");
    let log = sluice.stop();
    assert!(
        log.contains("spool disk full: holding back acknowledgements"),
        "the full disk was not reported: {log}"
    );
    // The figures RELIABILITY.md quotes.
    for line in log.lines().filter(|l| {
        l.contains("spool disk")
            || l.contains("spool opened")
            || l.contains("checkpoint waits")
            || l.contains("closed while its disk")
    }) {
        eprintln!("{line}");
    }
    drop(tmpfs);
}
