//! "PUBACK means stored": QoS 1 streams through a SIGKILL of Sluice,
//! through a database outage, through PostgreSQL stopped (fast and
//! immediate) and restarted under load, and through a start while
//! PostgreSQL is unreachable, checked message by message afterwards.

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

/// Sum of a counter over all its labels, from the Prometheus endpoint.
fn counter_total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Rows in `dead_letters`, on a connection of its own (see `stored_seqs`).
async fn dead_letter_count(sluice: &Sluice) -> i64 {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&sluice.pg.database_url())
        .await
        .unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    n
}

const RESTART_DEVICES: usize = 4;
const RESTART_RATE: u64 = 200;
const RESTART_COUNT: u64 = RESTART_RATE * 12;

/// PostgreSQL stopped with `pg_ctl stop -m MODE` while devices stream QoS
/// 1, kept down for a few seconds, started again on the same port.
/// `immediate` kills every backend without a checkpoint, so the server
/// runs crash recovery on restart, and a batch whose COMMIT was on its way
/// has an unknown outcome to the writer (the test of `committed_in_doubt`
/// in `ingest/src/writer/mod.rs`).
async fn database_restarted_under_load(mode: &'static str) {
    let sluice = Sluice::start_with(Options::authenticated(), |_| {}).await;
    let mut devices = Vec::new();
    for i in 0..RESTART_DEVICES {
        let id = format!("{mode}{i}");
        let secret = sluice.create_device(&id).await;
        devices.push((id, secret, Arc::new(AtomicU64::new(0))));
    }
    let streams: Vec<_> = devices
        .iter()
        .map(|(id, secret, acked)| {
            tokio::spawn(stream(
                device_options(&sluice, id, secret),
                format!("devices/{id}/telemetry"),
                0..RESTART_COUNT,
                acked.clone(),
                Some(RESTART_RATE),
            ))
        })
        .collect();
    let total = || {
        devices
            .iter()
            .map(|d| d.2.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    // Some of it stored before the stop.
    sluice
        .eventually(
            "the first messages stored",
            Duration::from_secs(60),
            || async {
                let stored = stored_seqs(&sluice).await;
                (stored.values().map(|(d, _)| d.len()).sum::<usize>() >= 500).then_some(())
            },
        )
        .await;
    let errors_before = counter_total(&sluice.metrics().await, "sluice_write_errors_total");

    sluice.pg.suspend(mode).await.unwrap();
    let at_stop = total();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = total() - at_stop;
    sluice.pg.resume().await.unwrap();
    // Each device streams on the one connection it opened before the stop
    // (`stream` does not reconnect), so all acks arriving also shows that
    // the process never exited.
    for s in streams {
        s.await.unwrap();
    }
    for (id, _, acked) in &devices {
        assert_eq!(
            acked.load(Ordering::SeqCst),
            RESTART_COUNT,
            "{id}: the stream was not fully acked\n{}",
            sluice.log()
        );
    }
    // The spool took the messages while the database was away.
    assert!(during > 0, "no acks during the outage\n{}", sluice.log());

    let want: BTreeMap<String, u64> = devices
        .iter()
        .map(|(id, _, _)| (id.clone(), RESTART_COUNT))
        .collect();
    let stored = sluice
        .eventually(
            "everything stored after the restart",
            Duration::from_secs(90),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &want).then_some(s)
            },
        )
        .await;
    let metrics = sluice.metrics().await;
    let in_doubt = counter_total(&metrics, "sluice_batches_committed_in_doubt_total");
    eprintln!(
        "pg_ctl stop -m {mode}: {during} acks during the 5 s outage; {in_doubt} batches \
         committed without their answer (not written again)"
    );
    // Exactly once: no message lost, none stored twice (a batch retried
    // after its COMMIT had in fact gone through would be).
    for (id, _, _) in &devices {
        let (distinct, rows) = &stored[id];
        assert_eq!(distinct.len() as u64, RESTART_COUNT, "{id}");
        assert_eq!(
            *rows as u64,
            RESTART_COUNT,
            "{id}: {} duplicate rows after the restart\n{}",
            *rows - distinct.len(),
            sluice.log()
        );
    }
    assert_eq!(dead_letter_count(&sluice).await, 0, "{}", sluice.log());
    let errors_after = counter_total(&metrics, "sluice_write_errors_total");
    assert!(
        errors_after > errors_before,
        "the writer saw no error ({errors_before} → {errors_after})"
    );
    sluice.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_shutdown_and_restart_under_load_loses_nothing() {
    database_restarted_under_load("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_shutdown_and_restart_under_load_loses_nothing() {
    database_restarted_under_load("immediate").await;
}

/// An MQTT client without credentials (`--allow-anonymous`), publishing
/// as device `id` through the topic.
fn anonymous_options(sluice: &Sluice, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, "127.0.0.1", sluice.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    opts
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Sluice started while PostgreSQL is down: it waits for the database,
/// says so (log, `sluice_database_up`, gRPC health), and the broker serves
/// meanwhile: publishes are acknowledged from the spool until it is full,
/// then acks wait. Once PostgreSQL starts, everything is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_at_start_spools_and_stores_later() {
    const DEVICES: usize = 3;
    const COUNT: u64 = 1500;
    let sluice = Sluice::start_with_database_down(Options {
        env: vec![
            // Small, so the spool fills while the database is away.
            ("SLUICE_BROKER__SPOOL__MAX_BYTES".into(), "65536".into()),
            ("SLUICE_BROKER__SPOOL__SEGMENT_BYTES".into(), "16384".into()),
            ("SLUICE_BROKER__AUTH_TIMEOUT_MS".into(), "1000".into()),
        ],
        ..Options::default()
    })
    .await;

    // It says the database is away.
    assert_eq!(sluice.telemetry_health().await, Some(NOT_SERVING));
    sluice
        .eventually(
            "the database reported down",
            Duration::from_secs(30),
            || async {
                (sluice.metrics().await.contains("sluice_database_up 0")
                    && sluice.log().contains("PostgreSQL is not reachable"))
                .then_some(())
            },
        )
        .await;
    let mut telemetry = sluice.telemetry().await;
    let refused = telemetry
        .latest_points(sluice_proto::v1::LatestPointsRequest::default())
        .await
        .expect_err("a query while the database is away");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // A device whose secret this process never verified cannot be checked
    // against the registry: server unavailable, after auth_timeout_ms.
    let login = support::mqtt_connect(sluice.device_options("stranger", "secret")).await;
    let refusal = login.err().expect("a login the registry cannot check");
    assert!(refusal.contains("ServiceUnavailable"), "{refusal}");

    // Anonymous devices publish; the spool acknowledges until it is full.
    let devices: Vec<(String, Arc<AtomicU64>)> = (0..DEVICES)
        .map(|i| (format!("late{i}"), Arc::new(AtomicU64::new(0))))
        .collect();
    let streams: Vec<_> = devices
        .iter()
        .map(|(id, acked)| {
            tokio::spawn(stream(
                anonymous_options(&sluice, id),
                format!("devices/{id}/telemetry"),
                0..COUNT,
                acked.clone(),
                None,
            ))
        })
        .collect();
    let total = || {
        devices
            .iter()
            .map(|d| d.1.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    // Acks stop short of the total: the full spool holds them back.
    let mut last = u64::MAX;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while still < 4 {
        assert!(
            Instant::now() < deadline,
            "acks never settled\n{}",
            sluice.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = total();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let held = total();
    assert!(
        held > 0,
        "nothing acknowledged from the spool\n{}",
        sluice.log()
    );
    assert!(
        held < DEVICES as u64 * COUNT,
        "every ack came although the spool was full\n{}",
        sluice.log()
    );
    eprintln!("acknowledged from the spool before it filled: {held}");
    assert_eq!(sluice.telemetry_health().await, Some(NOT_SERVING));

    // The database comes: the rest is acknowledged and everything stored.
    sluice.pg.resume().await.unwrap();
    for s in streams {
        s.await.unwrap();
    }
    assert_eq!(total(), DEVICES as u64 * COUNT, "{}", sluice.log());
    let want: BTreeMap<String, u64> = devices.iter().map(|(id, _)| (id.clone(), COUNT)).collect();
    let stored = sluice
        .eventually("everything stored", Duration::from_secs(60), || async {
            let s = stored_seqs(&sluice).await;
            all_acked_stored(&s, &want).then_some(s)
        })
        .await;
    for (id, _) in &devices {
        let (distinct, rows) = &stored[id];
        assert_eq!(distinct.len() as u64, COUNT, "{id}");
        assert_eq!(*rows as u64, COUNT, "{id}: duplicates");
    }
    sluice
        .eventually("health SERVING", Duration::from_secs(30), || async {
            (sluice.telemetry_health().await == Some(SERVING)).then_some(())
        })
        .await;
    sluice
        .eventually(
            "the database reported up",
            Duration::from_secs(30),
            || async {
                sluice
                    .metrics()
                    .await
                    .contains("sluice_database_up 1")
                    .then_some(())
            },
        )
        .await;
    assert_eq!(dead_letter_count(&sluice).await, 0);
    let log = sluice.stop();
    for line in log.lines().filter(|l| l.contains("PostgreSQL")) {
        eprintln!("{line}");
    }
}

/// SIGTERM while Sluice still waits for PostgreSQL: what devices sent is
/// acknowledged from the spool, the process exits 0, and the next start
/// (with the database) stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_before_the_database_came_keeps_the_spool() {
    const COUNT: u64 = 300;
    let mut sluice = Sluice::start_with_database_down(Options::default()).await;
    let acked = Arc::new(AtomicU64::new(0));
    stream(
        anonymous_options(&sluice, "early"),
        "devices/early/telemetry".into(),
        0..COUNT,
        acked.clone(),
        None,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), COUNT, "{}", sluice.log());

    sluice.terminate();
    assert!(
        sluice
            .log()
            .contains("stopped before PostgreSQL was reachable"),
        "{}",
        sluice.log()
    );

    sluice.pg.resume().await.unwrap();
    sluice.restart().await;
    let want: BTreeMap<String, u64> = [("early".to_string(), COUNT)].into();
    let stored = sluice
        .eventually(
            "the spooled messages stored",
            Duration::from_secs(60),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &want).then_some(s)
            },
        )
        .await;
    assert_eq!(stored["early"].1 as u64, COUNT, "duplicates");
    sluice.stop();
}

/// With `broker.spool.dir` set, the spool's identity must live in that
/// directory beside its segments. It used to be kept under
/// `{data_dir}/spool` whatever the setting, so wiping the configured
/// directory restarted the spool's sequence under the old identity, and
/// the pipeline skipped the new messages as already stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_directory_of_its_own_keeps_its_identity_beside_it() {
    let spool_parent = tempfile::tempdir().unwrap();
    let spool_dir = spool_parent.path().join("spool");
    let mut sluice = Sluice::start_with(
        Options {
            env: vec![(
                "SLUICE_BROKER__SPOOL__DIR".into(),
                spool_dir.display().to_string(),
            )],
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let opts = |port| MqttOptions::new("own-spool", "127.0.0.1", port);
    let topic = "devices/own-spool/telemetry".to_string();
    let acked = Arc::new(AtomicU64::new(0));
    stream(
        opts(sluice.mqtt_port),
        topic.clone(),
        0..100,
        acked.clone(),
        None,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), 100);
    let first: BTreeMap<String, u64> = [("own-spool".to_string(), 100)].into();
    sluice
        .eventually("the first 100 stored", Duration::from_secs(30), || async {
            all_acked_stored(&stored_seqs(&sluice).await, &first).then_some(())
        })
        .await;
    assert!(
        spool_dir.join("id").is_file(),
        "the identity file is not in the configured spool directory"
    );

    // The operator wipes the spool directory while Sluice is stopped.
    sluice.terminate();
    std::fs::remove_dir_all(&spool_dir).unwrap();
    sluice.restart().await;

    let acked = Arc::new(AtomicU64::new(100));
    stream(opts(sluice.mqtt_port), topic, 100..200, acked.clone(), None).await;
    assert_eq!(acked.load(Ordering::SeqCst), 200);
    let all: BTreeMap<String, u64> = [("own-spool".to_string(), 200)].into();
    let stored = sluice
        .eventually(
            "the 100 sent after the wipe stored too",
            Duration::from_secs(30),
            || async {
                let s = stored_seqs(&sluice).await;
                all_acked_stored(&s, &all).then_some(s)
            },
        )
        .await;
    assert_eq!(stored["own-spool"].1, 200, "a message was stored twice");
    sluice.stop();
}
