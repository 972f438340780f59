//! "PUBACK means stored": QoS 1 streams through a SIGKILL of Sluice and
//! through a database outage, checked message by message afterwards.

mod support;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{Options, Sluice};

/// Publishes `{"seq": n}` for every n in `seqs` at QoS 1 and counts PUBACKs
/// in `acked`. Sluice acknowledges in order, so the first `acked` messages
/// are the acknowledged ones. Returns when all are acked or the connection
/// fails (no reconnect: the caller decides what happens next).
async fn stream(
    opts: MqttOptions,
    topic: String,
    seqs: std::ops::Range<u64>,
    acked: Arc<AtomicU64>,
    per_second: Option<u64>,
) {
    let (client, mut eventloop) = AsyncClient::new(opts, 200);
    let total = seqs.end - seqs.start;
    let publisher = tokio::spawn(publish_all(client, topic, seqs, per_second));
    let mut done = 0;
    while done < total {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                done += 1;
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    publisher.abort();
}

async fn publish_all(
    client: AsyncClient,
    topic: String,
    seqs: std::ops::Range<u64>,
    per_second: Option<u64>,
) {
    let started = Instant::now();
    let first = seqs.start;
    for seq in seqs {
        if let Some(rate) = per_second {
            let due = started + Duration::from_secs_f64((seq - first) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let payload = format!(r#"{{"seq": {seq}}}"#);
        if client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

fn device_options(sluice: &Sluice, id: &str, secret: &str) -> MqttOptions {
    let mut opts = sluice.device_options(id, secret);
    opts.set_inflight(100);
    opts
}

/// Stored `seq` values per device: (distinct, total rows).
///
/// On a connection of its own each time: these tests stop and start
/// PostgreSQL, and a pooled connection from before that can fail the poll
/// after the server is back. A failed poll is reported and counts as
/// nothing stored yet.
async fn stored_seqs(sluice: &Sluice) -> BTreeMap<String, (Vec<u64>, usize)> {
    use sqlx::Connection as _;
    let rows: Result<Vec<(String, f64)>, sqlx::Error> = async {
        let mut conn = sqlx::PgConnection::connect(&sluice.pg.database_url()).await?;
        let rows = sqlx::query_as(
            "SELECT s.device_id, p.value FROM points p JOIN series s ON s.id = p.series_id \
             WHERE s.metric = 'seq'",
        )
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
    let mut by_device: BTreeMap<String, (Vec<u64>, usize)> = BTreeMap::new();
    for (device, value) in rows {
        let entry = by_device.entry(device).or_default();
        entry.0.push(value as u64);
        entry.1 += 1;
    }
    for (seqs, _) in by_device.values_mut() {
        seqs.sort_unstable();
        seqs.dedup();
    }
    by_device
}

/// True once every device has every seq below its acked count stored.
fn all_acked_stored(
    stored: &BTreeMap<String, (Vec<u64>, usize)>,
    acked: &BTreeMap<String, u64>,
) -> bool {
    acked.iter().all(|(device, &n)| {
        stored
            .get(device)
            .is_some_and(|(seqs, _)| (0..n).all(|s| seqs.binary_search(&s).is_ok()))
    })
}

const DEVICES: usize = 5;
const PER_DEVICE: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let mut sluice = Sluice::start_with(
        Options {
            // No throttling: the point is to be mid-stream at the kill.
            env: vec![("SLUICE_BROKER__MAX_PUBLISH_RATE".into(), "0".into())],
            ..Options::authenticated()
        },
        |_| {},
    )
    .await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("k{i}");
        let secret = sluice.create_device(&id).await;
        devices.push((id, secret, Arc::new(AtomicU64::new(0))));
    }

    // Stream until about 40% is acknowledged, then SIGKILL mid-stream.
    let mut tasks = Vec::new();
    for (id, secret, acked) in &devices {
        tasks.push(tokio::spawn(stream(
            device_options(&sluice, id, secret),
            format!("devices/{id}/telemetry"),
            0..PER_DEVICE,
            acked.clone(),
            None,
        )));
    }
    let total = || {
        devices
            .iter()
            .map(|d| d.2.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while total() < (DEVICES as u64 * PER_DEVICE) * 2 / 5 {
        assert!(
            Instant::now() < deadline,
            "stream too slow: {} acked\n{}",
            total(),
            sluice.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sluice.kill();
    for t in tasks {
        let _ = t.await;
    }
    let acked: BTreeMap<String, u64> = devices
        .iter()
        .map(|(id, _, a)| (id.clone(), a.load(Ordering::SeqCst)))
        .collect();
    eprintln!("acknowledged before SIGKILL: {acked:?}");
    assert!(acked.values().all(|&n| n < PER_DEVICE), "killed too late");

    // After restart, every acknowledged message is stored.
    sluice.restart().await;
    let stored = sluice
        .eventually(
            "every acknowledged message stored",
            Duration::from_secs(60),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &acked).then_some(s)
            },
        )
        .await;
    for (device, n) in &acked {
        let (distinct, rows) = &stored[device];
        eprintln!(
            "{device}: {n} acked, {} distinct stored, {} duplicate rows",
            distinct.len(),
            rows - distinct.len()
        );
    }

    // The devices resend what was never acknowledged; in the end all
    // 50,000 are stored, none lost.
    let mut tasks = Vec::new();
    for (id, secret, done) in &devices {
        let from = acked[id];
        done.store(from, Ordering::SeqCst);
        tasks.push(tokio::spawn(stream(
            device_options(&sluice, id, secret),
            format!("devices/{id}/telemetry"),
            from..PER_DEVICE,
            done.clone(),
            None,
        )));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let everything: BTreeMap<String, u64> =
        acked.keys().map(|id| (id.clone(), PER_DEVICE)).collect();
    let stored = sluice
        .eventually("all 50,000 stored", Duration::from_secs(60), || async {
            let s = stored_seqs(&sluice).await;
            all_acked_stored(&s, &everything).then_some(s)
        })
        .await;
    let rows: usize = stored.values().map(|(_, r)| r).sum();
    let distinct: usize = stored.values().map(|(d, _)| d.len()).sum();
    assert_eq!(distinct, DEVICES * PER_DEVICE as usize);
    eprintln!(
        "{rows} rows for {distinct} messages: {} duplicates (durable before the kill \
         but not yet acknowledged to the device, which sent them again as new \
         publishes; the replay itself stores nothing twice, see \
         a_replay_after_a_crash_stores_nothing_twice)",
        rows - distinct
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_delays_storage_but_loses_nothing() {
    let sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let secret = sluice.create_device("o1").await;
    const RATE: u64 = 250;
    const COUNT: u64 = RATE * 40;
    let acked = Arc::new(AtomicU64::new(0));
    let streaming = tokio::spawn(stream(
        device_options(&sluice, "o1", &secret),
        "devices/o1/telemetry".into(),
        0..COUNT,
        acked.clone(),
        Some(RATE),
    ));

    tokio::time::sleep(Duration::from_secs(3)).await;
    sluice.pg.suspend("fast").await.unwrap();
    let at_stop = acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = acked.load(Ordering::SeqCst) - at_stop;
    sluice.pg.resume().await.unwrap();

    streaming.await.unwrap();
    assert_eq!(
        acked.load(Ordering::SeqCst),
        COUNT,
        "the stream was not fully acked"
    );
    // Acks went on while the database was away: the spool took the messages.
    assert!(
        during > RATE * 20,
        "only {during} acks during the 30 s outage"
    );
    let want: BTreeMap<String, u64> = [("o1".to_string(), COUNT)].into();
    let stored = sluice
        .eventually(
            "everything stored after the outage",
            Duration::from_secs(60),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &want).then_some(s)
            },
        )
        .await;
    // Counted, not assumed: every seq once, none twice.
    let (distinct, rows) = &stored["o1"];
    assert_eq!(distinct.len() as u64, COUNT);
    assert_eq!(*rows as u64, COUNT, "duplicates after the outage");
    let metrics = sluice.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_write_errors_total{kind=")),
        "write errors by kind: {metrics}"
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_the_database_is_away_keeps_the_rest_in_the_spool() {
    let mut sluice = Sluice::start_with(
        Options {
            env: vec![("SLUICE_SHUTDOWN_DRAIN_MS".into(), "2000".into())],
            ..Options::authenticated()
        },
        |_| {},
    )
    .await;
    let secret = sluice.create_device("q1").await;
    // Verified once while the registry is reachable...
    let acked = Arc::new(AtomicU64::new(0));
    stream(
        device_options(&sluice, "q1", &secret),
        "devices/q1/telemetry".into(),
        0..100,
        acked.clone(),
        None,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), 100);

    // ...so the device gets back in while PostgreSQL is down, and every
    // message is acknowledged from the spool.
    sluice.pg.suspend("immediate").await.unwrap();
    stream(
        device_options(&sluice, "q1", &secret),
        "devices/q1/telemetry".into(),
        100..1100,
        acked.clone(),
        None,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), 1100, "{}", sluice.log());

    // SIGTERM does not wait for the database for ever (terminate() asserts
    // a clean exit)...
    sluice.terminate();
    assert!(
        sluice.log().contains("stays in the spool"),
        "{}",
        sluice.log()
    );

    // ...and the next start stores the rest.
    sluice.pg.resume().await.unwrap();
    sluice.restart().await;
    let want: BTreeMap<String, u64> = [("q1".to_string(), 1100)].into();
    sluice
        .eventually(
            "the spooled messages stored",
            Duration::from_secs(60),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &want).then_some(())
            },
        )
        .await;
    sluice.stop();
}

/// Exactly once across a replay: the spool's checkpoint may lag the last
/// database commit (it is saved in the background), and a crash then
/// replays messages that are already stored. The database's record of the
/// stored position of each writer shard, written with its rows, makes the
/// replay skip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_crash_stores_nothing_twice() {
    const COUNT: u64 = 200;
    let mut sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let secret = sluice.create_device("replayed").await;
    let acked = Arc::new(AtomicU64::new(0));
    stream(
        device_options(&sluice, "replayed", &secret),
        "devices/replayed/telemetry".into(),
        0..COUNT,
        acked.clone(),
        None,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), COUNT);
    sluice
        .eventually("every message stored", Duration::from_secs(30), || async {
            (sluice.all_points("replayed").await.len() as u64 == COUNT).then_some(())
        })
        .await;

    // Crash, and make the spool's checkpoint as stale as it can be: the
    // replay then covers every message, all of them already stored.
    sluice.kill();
    let checkpoint = sluice.dir().join(".sluice/spool/checkpoint");
    let mut stale = 0u64.to_le_bytes().to_vec();
    stale.extend_from_slice(&0x6522_df69u32.to_le_bytes()); // crc32 of the 8 zero bytes
    std::fs::write(&checkpoint, stale).unwrap();

    sluice.restart().await;
    // Messages every writer shard held are skipped whole; those only some
    // shard held (shards commit independently) are filtered record by
    // record. Each message here is one record, so together they make COUNT.
    sluice
        .eventually("the replay skipped", Duration::from_secs(30), || async {
            let metrics = sluice.metrics().await;
            let value = |name: &str| {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let skipped = value("sluice_spool_replay_skipped_total ")
                + value("sluice_replay_records_skipped_total ");
            (skipped == COUNT).then_some(())
        })
        .await;
    // Give a wrongly replayed batch time to be written, then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sluice.all_points("replayed").await.len() as u64, COUNT);
    sluice.stop();
}
