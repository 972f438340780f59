//! "PUBACK means stored", round after round: many devices publish QoS 1
//! continuously while `sluice` is killed with SIGKILL at random moments
//! (under load, soon after a restart, and while it is still starting and
//! replaying its spool), then restarted on the same data directory. The
//! devices behave as real ones with a resend queue: whatever was sent but
//! not acknowledged on a connection is sent again on the next. At the end
//! every acknowledged message must be stored, and every duplicate must be a
//! message that was sent more than once because its PUBACK was lost in a
//! kill.
//!
//! The kill moments come from a seeded generator; the seed is printed, and
//! `CRASH_ROUNDS_SEED` (and `CRASH_ROUNDS`, the number of rounds) replay a
//! run. Not `SLUICE_*` names: Sluice takes every such variable as its own
//! setting.

mod support;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use support::Sluice;

/// Modest load for a 2-core machine shared with other tests: 1,000
/// messages a second in all.
const DEVICES: usize = 25;
const PER_SECOND: u64 = 40;
const DEFAULT_ROUNDS: usize = 10;
/// Safety nets only; nothing here measures speed.
const WAIT: Duration = Duration::from_secs(120);

/// splitmix64: small, seeded, and the same on every platform, so a seed
/// replays the same kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low + 1))
    }
}

/// What one device has sent and had acknowledged, over all its connections.
#[derive(Default)]
struct Log {
    /// The next new seq.
    next: u64,
    /// Handed to a connection and not acknowledged (yet).
    unacked: BTreeSet<u64>,
    /// PUBACK received.
    acked: BTreeSet<u64>,
    /// How many times each seq was handed to a connection (index = seq).
    sends: Vec<u32>,
}

struct Device {
    id: String,
    log: Mutex<Log>,
}

impl Device {
    fn topic(&self) -> String {
        format!("devices/{}/telemetry", self.id)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

fn payload(seq: u64) -> String {
    format!(r#"{{"seq": {seq}}}"#)
}

/// One device for ever: connect, resend what is unacknowledged, publish
/// new messages at its rate, and on any failure start again. The test
/// aborts it when done.
async fn run_device(device: Arc<Device>, port: Arc<AtomicU16>, generating: Arc<AtomicBool>) {
    loop {
        let mut opts = MqttOptions::new(&device.id, "127.0.0.1", port.load(Ordering::SeqCst));
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(50);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        if connack(&mut eventloop).await {
            connection(&device, &generating, client, eventloop).await;
        }
        // The server is down or starting: try again soon.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// True once the server accepted the connection.
async fn connack(eventloop: &mut EventLoop) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return ack.code == ConnectReturnCode::Success;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// Drives one connection until it fails, matching each PUBACK to its seq
/// through the packet id rumqttc gave the publish.
async fn connection(
    device: &Arc<Device>,
    generating: &Arc<AtomicBool>,
    client: AsyncClient,
    mut eventloop: EventLoop,
) {
    // Seqs in the order they were handed to the client; rumqttc sends them
    // in that order and reports each one's packet id as it goes out.
    let handed: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let resend: Vec<u64> = device.log().unacked.iter().copied().collect();
    let publisher = tokio::spawn(publish(
        device.clone(),
        generating.clone(),
        client,
        resend,
        handed.clone(),
    ));
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(seq) = handed.lock().unwrap().pop_front() {
                    in_flight.insert(pkid, seq);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(seq) = in_flight.remove(&ack.pkid) {
                    let mut log = device.log();
                    log.unacked.remove(&seq);
                    log.acked.insert(seq);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    publisher.abort();
}

/// Sends `resend` again, then a new seq every 1/PER_SECOND s while
/// `generating`.
async fn publish(
    device: Arc<Device>,
    generating: Arc<AtomicBool>,
    client: AsyncClient,
    resend: Vec<u64>,
    handed: Arc<Mutex<VecDeque<u64>>>,
) {
    let topic = device.topic();
    for seq in resend {
        device.log().sends[seq as usize] += 1;
        handed.lock().unwrap().push_back(seq);
        if client
            .publish(&topic, QoS::AtLeastOnce, false, payload(seq))
            .await
            .is_err()
        {
            return;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PER_SECOND));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let seq = {
            // Checked under the log's lock, so once the test has turned
            // `generating` off and sees nothing unacknowledged, no new seq
            // can appear.
            let mut log = device.log();
            if !generating.load(Ordering::SeqCst) {
                return;
            }
            let seq = log.next;
            log.next += 1;
            log.unacked.insert(seq);
            log.sends.push(1);
            seq
        };
        handed.lock().unwrap().push_back(seq);
        if client
            .publish(&topic, QoS::AtLeastOnce, false, payload(seq))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Where in Sluice's life a kill is aimed.
#[derive(Clone, Copy, Debug)]
enum Moment {
    /// Ready and under load for 0.5–3 s.
    Load,
    /// Ready for 0–300 ms: devices reconnecting, the replay being written.
    Early,
    /// 0–150 ms after the process started, without waiting for it to be
    /// ready: connecting to PostgreSQL, opening and replaying the spool
    /// (here the listeners opened after about 100 ms).
    Startup,
}

struct Kill {
    moment: Moment,
    after: Duration,
    /// How far the start had got, from the process's log.
    phase: &'static str,
    /// Records the spool held for replay when it opened.
    replay: Option<u64>,
    acked: usize,
}

/// How far a start got, from what it logged (`log` is this process's part).
fn phase(log: &str) -> (&'static str, Option<u64>) {
    let replay = log
        .lines()
        .find(|l| l.contains("spool opened"))
        .and_then(|l| {
            let digits = l.split("replay=").nth(1)?;
            digits
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
    let phase = if log.contains("sluice is ready") {
        "ready"
    } else if replay.is_some() {
        "starting, spool opened"
    } else {
        "starting, spool not opened yet"
    };
    (phase, replay)
}

/// Stored seqs per device, with how many rows each has.
async fn stored(sluice: &Sluice) -> BTreeMap<String, HashMap<u64, i64>> {
    let rows: Vec<(String, f64, i64)> = sqlx::query_as(
        "SELECT s.device_id, p.value, count(*) FROM points p \
         JOIN series s ON s.id = p.series_id WHERE s.metric = 'seq' GROUP BY 1, 2",
    )
    .fetch_all(&sluice.db)
    .await
    .unwrap();
    let mut out: BTreeMap<String, HashMap<u64, i64>> = BTreeMap::new();
    for (device, value, n) in rows {
        out.entry(device).or_default().insert(value as u64, n);
    }
    out
}

/// The acknowledged seqs that are not stored, per device.
fn missing(
    acked: &BTreeMap<String, BTreeSet<u64>>,
    stored: &BTreeMap<String, HashMap<u64, i64>>,
) -> BTreeMap<String, Vec<u64>> {
    let none = HashMap::new();
    acked
        .iter()
        .map(|(id, seqs)| {
            let have = stored.get(id).unwrap_or(&none);
            let lost: Vec<u64> = seqs
                .iter()
                .copied()
                .filter(|s| !have.contains_key(s))
                .collect();
            (id.clone(), lost)
        })
        .filter(|(_, lost)| !lost.is_empty())
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_at_random_moments() {
    let clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let seed = env_or("CRASH_ROUNDS_SEED", clock);
    let rounds = env_or("CRASH_ROUNDS", DEFAULT_ROUNDS);
    eprintln!(
        "crash rounds: seed {seed}; replay with CRASH_ROUNDS_SEED={seed} CRASH_ROUNDS={rounds}"
    );
    let mut rng = Rng(seed);

    let mut sluice = Sluice::start(|_| {}).await;
    let port = Arc::new(AtomicU16::new(sluice.mqtt_port));
    let generating = Arc::new(AtomicBool::new(true));
    let devices: Vec<Arc<Device>> = (0..DEVICES)
        .map(|i| {
            Arc::new(Device {
                id: format!("c{i:02}"),
                log: Mutex::default(),
            })
        })
        .collect();
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| tokio::spawn(run_device(d.clone(), port.clone(), generating.clone())))
        .collect();
    let acked_now = || -> BTreeMap<String, BTreeSet<u64>> {
        devices
            .iter()
            .map(|d| (d.id.clone(), d.log().acked.clone()))
            .collect()
    };
    let count = |m: &BTreeMap<String, BTreeSet<u64>>| m.values().map(BTreeSet::len).sum::<usize>();

    // The first round kills the first process under load; later ones
    // cycle through the moments, each at a random point of its window.
    let mut kills = Vec::new();
    for round in 0..rounds {
        let moment = match round % 3 {
            0 => Moment::Load,
            1 => Moment::Startup,
            _ => Moment::Early,
        };
        let after = match moment {
            Moment::Load => rng.millis(500, 3_000),
            Moment::Early => rng.millis(0, 300),
            Moment::Startup => rng.millis(0, 150),
        };
        // Round 0 kills the process the test started with.
        let log_start = if round == 0 { 0 } else { sluice.log().len() };
        match moment {
            Moment::Startup => sluice.respawn(),
            _ if round > 0 => {
                sluice.restart().await;
                port.store(sluice.mqtt_port, Ordering::SeqCst);
            }
            _ => {}
        }
        tokio::time::sleep(after).await;
        sluice.kill();
        let acked = count(&acked_now());
        let (phase, replay) = phase(&sluice.log()[log_start..]);
        eprintln!(
            "round {round}: SIGKILL {moment:?} +{} ms ({phase}, replay {replay:?}), \
             {acked} acked so far",
            after.as_millis()
        );
        kills.push(Kill {
            moment,
            after,
            phase,
            replay,
            acked,
        });
    }
    let acked_at_last_kill = acked_now();

    // After the last restart, every message acknowledged before any kill
    // is stored.
    sluice.restart().await;
    port.store(sluice.mqtt_port, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    loop {
        let lost = missing(&acked_at_last_kill, &stored(&sluice).await);
        if lost.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged before a SIGKILL, not stored after the restart \
             (seed {seed}): {lost:?}\n{}",
            sluice.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The devices stop making new messages and send what is still
    // unacknowledged until it is; then a clean stop drains the spool.
    generating.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while devices.iter().any(|d| !d.log().unacked.is_empty()) {
        assert!(
            Instant::now() < deadline,
            "devices still have unacknowledged messages:\n{}",
            sluice.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in &tasks {
        t.abort();
    }
    sluice.terminate();

    // Every message sent is stored; a seq stored more than once must have
    // been sent that many times.
    let stored = stored(&sluice).await;
    let all_acked = acked_now();
    let lost = missing(&all_acked, &stored);
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    let mut failures = Vec::new();
    let (mut sent, mut resent, mut rows, mut duplicates) = (0u64, 0u64, 0i64, 0i64);
    for device in &devices {
        let log = device.log();
        assert_eq!(
            log.acked.len() as u64,
            log.next,
            "{}: all acknowledged",
            device.id
        );
        sent += log.next;
        resent += log.sends.iter().map(|&n| u64::from(n) - 1).sum::<u64>();
        for (&seq, &n) in stored.get(&device.id).into_iter().flatten() {
            rows += n;
            duplicates += n - 1;
            match log.sends.get(seq as usize) {
                None => failures.push(format!("{}: seq {seq} stored but never sent", device.id)),
                Some(&times) if n > i64::from(times) => failures.push(format!(
                    "{}: seq {seq} stored {n} times but sent {times} times",
                    device.id
                )),
                Some(_) => {}
            }
        }
    }
    eprintln!(
        "crash rounds summary (seed {seed}): {rounds} SIGKILLs; {sent} messages from \
         {DEVICES} devices, all acknowledged in the end; {resent} resends of messages \
         whose PUBACK a kill cut off; {rows} rows stored for {} distinct messages: \
         {duplicates} duplicates, {} of them not explained by a resend",
        rows - duplicates,
        failures.len()
    );
    for (round, k) in kills.iter().enumerate() {
        eprintln!(
            "  round {round}: {:?} +{} ms, {}, spool replay {:?} records, {} acked by then",
            k.moment,
            k.after.as_millis(),
            k.phase,
            k.replay,
            k.acked
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(rows - duplicates, sent as i64);
    let log = sluice.log();
    assert!(!log.contains("panicked"), "{log}");
}
