//! `sluice-auth-flood`: how much a flood of bad logins slows a good device,
//! against a running `sluice serve` with MQTT authentication on.
//!
//! One real device (its id and secret given) connects, publishes one QoS 1
//! message and disconnects, over and over: the latency of connect→CONNACK
//! and publish→PUBACK is recorded, first with no flood for `--seconds`,
//! then for as long again while `--flood-tasks` tasks send
//! `--flood-rate` bad logins per second in all (open loop: each attempt
//! runs on its own, so slow answers do not slow the flood). A share of them
//! (`--unknown-share`) use device ids that do not exist, the rest the real
//! id with wrong secrets. Prints both sets of percentiles, their ratio, and
//! how the flood was answered.
//!
//! Client and server share this machine (and its two cores), so the figures
//! include the flood's own client-side cost.

use anyhow::{Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "sluice-auth-flood", version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// The real device's id (client id and user name).
    #[arg(long)]
    device: String,
    /// The real device's secret. (Not SLUICE_…: the server takes every
    /// SLUICE_ variable as its configuration and refuses unknown ones.)
    #[arg(long, env = "SIM_DEVICE_SECRET", hide_env_values = true)]
    secret: String,
    /// Length of each phase (no flood, then flood).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Bad logins per second, all tasks together.
    #[arg(long, default_value_t = 200)]
    flood_rate: u32,
    /// Tasks sending the bad logins.
    #[arg(long, default_value_t = 8)]
    flood_tasks: u32,
    /// Share of bad logins that use ids that do not exist (0..=1).
    #[arg(long, default_value_t = 0.5)]
    unknown_share: f64,
    /// Most bad logins waiting for an answer at once, per task (bounds this
    /// tool's sockets when the server answers slower than the rate).
    #[arg(long, default_value_t = 500)]
    max_outstanding: usize,
}

/// Give up on one exchange after this long (counted as a timeout).
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct FloodOutcomes {
    bad_credentials: AtomicU64,
    not_authorized: AtomicU64,
    unavailable: AtomicU64,
    accepted: AtomicU64,
    other: AtomicU64,
    timed_out: AtomicU64,
    skipped: AtomicU64,
    /// The first few unexpected errors, to tell what they were.
    examples: std::sync::Mutex<Vec<String>>,
}

struct Latencies {
    connect: Histogram<u64>,
    publish: Histogram<u64>,
    refused: u64,
}

impl Latencies {
    fn new() -> Result<Self> {
        Ok(Self {
            connect: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            publish: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            refused: 0,
        })
    }
}

fn options(args: &Args, id: &str, secret: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, &args.host, args.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(id, secret);
    o
}

/// One connect → CONNACK, publish → PUBACK, disconnect of the real device.
async fn good_cycle(args: &Args, seq: u64, out: &mut Latencies) -> Result<()> {
    let (client, mut events) = AsyncClient::new(options(args, &args.device, &args.secret), 10);
    let started = Instant::now();
    loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await {
            Err(_) => bail!("no CONNACK within {PATIENCE:?}"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                out.refused += 1;
                bail!("the real device was refused: {code:?}");
            }
            Ok(Err(e)) => bail!("connect failed: {e}"),
        }
    }
    out.connect.record(micros(started.elapsed()))?;

    let topic = format!("devices/{}/telemetry", args.device);
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"seq":{seq}}}"#),
        )
        .await?;
    let started = Instant::now();
    loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await {
            Err(_) => bail!("no PUBACK within {PATIENCE:?}"),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("closed before PUBACK: {e}"),
        }
    }
    out.publish.record(micros(started.elapsed()))?;

    client.disconnect().await?;
    // Drive the event loop until the DISCONNECT is out and the socket ends.
    while let Ok(Ok(_)) = tokio::time::timeout(PATIENCE, events.poll()).await {}
    Ok(())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The real device's cycles for `for_how_long`.
async fn measure(args: &Args, for_how_long: Duration) -> Result<Latencies> {
    let mut out = Latencies::new()?;
    let end = Instant::now() + for_how_long;
    let mut seq = 0;
    while Instant::now() < end {
        if let Err(e) = good_cycle(args, seq, &mut out).await {
            eprintln!("real device: {e:#}");
        }
        seq += 1;
    }
    Ok(out)
}

/// One bad login, answered or not.
async fn bad_login(opts: MqttOptions, outcomes: &FloodOutcomes) {
    let (_client, mut events) = AsyncClient::new(opts, 1);
    // rumqttc gives up after 5 s by default; wait for the server's answer
    // (a login queued for a hash slot gets CONNACK 3 after
    // `auth_timeout_ms`, 10 s by default).
    let mut network = events.network_options();
    network.set_connection_timeout(PATIENCE.as_secs());
    events.set_network_options(network);
    let counter = loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await {
            Err(_) => break &outcomes.timed_out,
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break &outcomes.accepted,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                break match code {
                    ConnectReturnCode::BadUserNamePassword => &outcomes.bad_credentials,
                    ConnectReturnCode::NotAuthorized => &outcomes.not_authorized,
                    ConnectReturnCode::ServiceUnavailable => &outcomes.unavailable,
                    _ => &outcomes.other,
                };
            }
            Ok(Err(e)) => {
                let mut examples = outcomes.examples.lock().unwrap_or_else(|p| p.into_inner());
                if examples.len() < 5 {
                    examples.push(format!("{e:?}"));
                }
                break &outcomes.other;
            }
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One flood task: `rate` bad logins per second until `end`.
async fn flood_task(
    args: Arc<Args>,
    task: u32,
    rate: f64,
    end: Instant,
    outcomes: Arc<FloodOutcomes>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let outstanding = Arc::new(tokio::sync::Semaphore::new(args.max_outstanding.max(1)));
    let mut attempts = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while Instant::now() < end {
        ticks.tick().await;
        n += 1;
        let Ok(permit) = outstanding.clone().try_acquire_owned() else {
            outcomes.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Spread the unknown ids evenly over the sequence.
        let unknown = ((n as f64) * args.unknown_share).floor()
            > (((n - 1) as f64) * args.unknown_share).floor();
        let opts = if unknown {
            options(&args, &format!("nobody-{task}-{n}"), "guess")
        } else {
            options(&args, &args.device, &format!("guess-{task}-{n}"))
        };
        let outcomes = outcomes.clone();
        attempts.spawn(async move {
            bad_login(opts, &outcomes).await;
            drop(permit);
        });
    }
    // Every attempt answered (or given up on) before the outcomes are read.
    while attempts.join_next().await.is_some() {}
}

fn row(name: &str, h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name:<26} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    )
}

fn ratio(a: &Histogram<u64>, b: &Histogram<u64>, q: f64) -> f64 {
    b.value_at_quantile(q) as f64 / a.value_at_quantile(q).max(1) as f64
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if !(0.0..=1.0).contains(&args.unknown_share) {
        bail!("--unknown-share must be within 0..=1");
    }
    let phase = Duration::from_secs(args.seconds.max(1));

    eprintln!("phase 1: no flood, {} s", phase.as_secs());
    let quiet = measure(&args, phase).await?;

    eprintln!(
        "phase 2: {} bad logins/s from {} tasks, {} s",
        args.flood_rate,
        args.flood_tasks,
        phase.as_secs()
    );
    let outcomes = Arc::new(FloodOutcomes::default());
    let tasks = args.flood_tasks.max(1);
    let end = Instant::now() + phase;
    let per_task = f64::from(args.flood_rate.max(1)) / f64::from(tasks);
    let flood: Vec<_> = (0..tasks)
        .map(|t| tokio::spawn(flood_task(args.clone(), t, per_task, end, outcomes.clone())))
        .collect();
    let flooded = measure(&args, phase).await?;
    for f in flood {
        f.await?;
    }

    println!(
        "{:<26} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "n", "p50", "p90", "p99", "max"
    );
    println!("{}", row("connect, no flood", &quiet.connect));
    println!("{}", row("connect, during flood", &flooded.connect));
    println!("{}", row("publish, no flood", &quiet.publish));
    println!("{}", row("publish, during flood", &flooded.publish));
    println!(
        "ratio flood/no flood: connect p50 {:.2}× p99 {:.2}×, publish p50 {:.2}× p99 {:.2}×",
        ratio(&quiet.connect, &flooded.connect, 0.5),
        ratio(&quiet.connect, &flooded.connect, 0.99),
        ratio(&quiet.publish, &flooded.publish, 0.5),
        ratio(&quiet.publish, &flooded.publish, 0.99),
    );
    let o = &outcomes;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "flood answered: {} bad credentials (4), {} not authorized (5), {} unavailable (3), \
         {} accepted, {} other errors, {} timed out; {} not sent (outstanding limit)",
        get(&o.bad_credentials),
        get(&o.not_authorized),
        get(&o.unavailable),
        get(&o.accepted),
        get(&o.other),
        get(&o.timed_out),
        get(&o.skipped),
    );
    let examples = o.examples.lock().unwrap_or_else(|p| p.into_inner());
    if !examples.is_empty() {
        println!("other errors, e.g.: {}", examples.join("; "));
    }
    println!(
        "real device refused: {} (no flood), {} (during flood)",
        quiet.refused, flooded.refused
    );
    if get(&o.accepted) > 0 {
        bail!("a bad login was accepted");
    }
    Ok(())
}
