//! `sluice-api-bench`: the query API's figures on a known data set, against
//! a running `sluice serve` (the script `simulator/bench/api_queries.sh`
//! starts one and runs the phases in order).
//!
//! - `load`: publishes DEVICES × POINTS messages over MQTT, each carrying
//!   METRICS values and an explicit timestamp, spread evenly over the last
//!   DAYS days (so every series has POINTS points), then waits until the
//!   database holds them all. Data arrives through the product's own path
//!   (broker, rules, writer), so the rollups and latest values are the
//!   writer's.
//! - `queries`: times `LatestPoints` for every device × metric,
//!   `AggregatePoints` of one series over 30 days in 1-hour buckets, and
//!   `StreamPoints` of the devices whose ids start with a prefix, each
//!   `--repeat` times (medians and more on stdout as JSON).
//! - `subscribe`: publishes at `--rate` points per second with `ts` = the
//!   time of publishing, while a `Subscribe` client follows some of the
//!   devices; reports the latency from publish to the subscriber's receipt.
//!
//! Client and server share this machine's clock, so the latency needs no
//! synchronisation; both also share its two cores.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, TimeDelta, Utc};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use sluice_proto::v1::telemetry_client::TelemetryClient;
use sluice_proto::v1::{
    Aggregate, AggregatePointsRequest, LatestPointsRequest, QueryPointsRequest, SubscribeRequest,
};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "sluice-api-bench", version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    #[arg(long, default_value_t = 50051)]
    grpc_port: u16,
    /// Devices are `bench-0000`, `bench-0001`, ...
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Metrics per device (`m0`, `m1`, ...).
    #[arg(long, default_value_t = 10)]
    metrics: usize,
    #[command(subcommand)]
    phase: Phase,
}

#[derive(Debug, Subcommand)]
enum Phase {
    Load {
        /// Points per series.
        #[arg(long, default_value_t = 1000)]
        points: usize,
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// MQTT connections publishing in parallel.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Wait until `points` holds this many rows in all (via this URL).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    Queries {
        #[arg(long, default_value_t = 30)]
        repeat: usize,
        /// StreamPoints reads the devices whose ids start with this.
        #[arg(long, default_value = "bench-00")]
        stream_prefix: String,
        #[arg(long, default_value_t = 3)]
        stream_repeat: usize,
    },
    Subscribe {
        /// Points per second published (values per message: --metrics).
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        /// The subscriber follows this many of the devices.
        #[arg(long, default_value_t = 10)]
        follow: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn device(i: usize) -> String {
    format!("bench-{i:04}")
}

fn body(metrics: usize, seed: usize, ts_millis: i64) -> String {
    let mut b = String::with_capacity(16 + 16 * metrics);
    b.push('{');
    for m in 0..metrics {
        let v = ((seed * 31 + m * 7) % 1000) as f64 / 10.0;
        b.push_str(&format!("\"m{m}\":{v},"));
    }
    b.push_str(&format!("\"ts\":{ts_millis}}}"));
    b
}

/// An MQTT client whose event loop runs in the background; `acked` counts PUBACKs.
fn mqtt(args: &Args, id: &str) -> (AsyncClient, tokio::sync::watch::Receiver<u64>) {
    let mut opts = MqttOptions::new(id, &args.host, args.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    n += 1;
                    acked_tx.send_replace(n);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("mqtt {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    (client, acked)
}

async fn grpc(args: &Args) -> Result<TelemetryClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{}:{}", args.host, args.grpc_port))?
        .connect()
        .await
        .context("connecting to the gRPC API")?;
    Ok(TelemetryClient::new(channel).max_decoding_message_size(64 << 20))
}

async fn load(
    args: &Args,
    points: usize,
    days: i64,
    connections: usize,
    url: &str,
) -> Result<serde_json::Value> {
    let now = Utc::now();
    let first = now - TimeDelta::days(days);
    let step = TimeDelta::days(days) / points as i32;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, acked) = mqtt(args, &format!("bench-loader-{c}"));
        let (devices, metrics) = (args.devices, args.metrics);
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (c..devices).step_by(connections).collect();
            let mut sent = 0u64;
            // Time-major, as a live fleet would send them.
            for k in 0..points {
                let ts = (first + step * k as i32).timestamp_millis();
                for &d in &mine {
                    let topic = format!("devices/{}/telemetry", device(d));
                    client
                        .publish(topic, QoS::AtLeastOnce, false, body(metrics, d + k, ts))
                        .await?;
                    sent += 1;
                }
            }
            let mut acked = acked;
            while *acked.borrow() < sent {
                acked.changed().await?;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    let published = started.elapsed().as_secs_f64();
    let expected = (sent as usize * args.metrics) as i64;
    let db = sqlx::PgPool::connect(url).await?;
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM points")
            .fetch_one(&db)
            .await?;
        eprintln!("stored {n} of {expected} points");
        if n >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(json!({
        "messages": sent,
        "points": expected,
        "publish_seconds": published,
        "stored_seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Median, 90th percentile and minimum of a sample, in milliseconds.
fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({"median_ms": at(0.5), "p90_ms": at(0.9), "min_ms": ms[0], "runs": ms.len()})
}

async fn queries(
    args: &Args,
    repeat: usize,
    stream_prefix: &str,
    stream_repeat: usize,
) -> Result<serde_json::Value> {
    let mut api = grpc(args).await?;
    let ids: Vec<String> = (0..args.devices).map(device).collect();
    let metrics: Vec<String> = (0..args.metrics).map(|m| format!("m{m}")).collect();

    let mut latest = Vec::new();
    for _ in 0..repeat + 1 {
        let t = Instant::now();
        let r = api
            .latest_points(LatestPointsRequest {
                device_ids: ids.clone(),
                metrics: metrics.clone(),
                limit: 10_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        latest.push(t.elapsed().as_secs_f64() * 1e3);
        if r.points.len() != (args.devices * args.metrics).min(10_000) {
            bail!("LatestPoints returned {} points", r.points.len());
        }
    }
    latest.remove(0); // the first call prepares the statements

    let now = Utc::now();
    let ts = |t: DateTime<Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let mut aggregate = Vec::new();
    let mut buckets = 0;
    for _ in 0..repeat * 3 + 1 {
        let t = Instant::now();
        let r = api
            .aggregate_points(AggregatePointsRequest {
                device_ids: vec![device(0)],
                metrics: vec!["m0".into()],
                start: Some(ts(now - TimeDelta::days(30))),
                end: Some(ts(now)),
                bucket: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                aggregates: [
                    Aggregate::Avg,
                    Aggregate::Min,
                    Aggregate::Max,
                    Aggregate::Count,
                ]
                .iter()
                .map(|a| *a as i32)
                .collect(),
                ..Default::default()
            })
            .await?
            .into_inner();
        aggregate.push(t.elapsed().as_secs_f64() * 1e3);
        buckets = r.series.first().map_or(0, |s| s.buckets.len());
    }
    aggregate.remove(0);

    let mut streams = Vec::new();
    let mut streamed = 0;
    for _ in 0..stream_repeat {
        let t = Instant::now();
        let mut s = api
            .stream_points(QueryPointsRequest {
                device_id_prefix: stream_prefix.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut n = 0usize;
        while let Some(batch) = s.next().await {
            n += batch?.points.len();
        }
        let secs = t.elapsed().as_secs_f64();
        streams.push(json!({"points": n, "seconds": secs, "points_per_sec": n as f64 / secs}));
        streamed = n;
    }
    Ok(json!({
        "latest_points": {"points": args.devices * args.metrics, "time": summary(latest)},
        "aggregate_points": {"buckets": buckets, "time": summary(aggregate)},
        "stream_points": {"prefix": stream_prefix, "points": streamed, "runs": streams},
    }))
}

async fn subscribe(
    args: &Args,
    rate: u64,
    follow: usize,
    seconds: u64,
) -> Result<serde_json::Value> {
    let mut api = grpc(args).await?;
    let followed: Vec<String> = (0..follow).map(device).collect();
    let mut live = api
        .subscribe(SubscribeRequest {
            device_ids: followed,
            points: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let warmup = Duration::from_secs(3);
    let until = Instant::now() + warmup + Duration::from_secs(seconds);
    let receiver = tokio::spawn(async move {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000, 3).expect("bounds");
        let (mut gaps, started) = (0u64, Instant::now());
        while let Ok(Some(r)) = tokio::time::timeout_at(until.into(), live.next()).await {
            let r = r?;
            gaps += r.gap;
            let now = Utc::now().timestamp_millis();
            if started.elapsed() < warmup {
                continue;
            }
            for p in &r.points {
                let t = p.time.as_ref().expect("time");
                let sent = t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
                hist.record((now - sent).max(1) as u64).ok();
            }
        }
        anyhow::Ok((hist, gaps))
    });

    // Publishers: one connection per 50k points/s, messages spread evenly.
    let per_message = args.metrics as u64;
    let messages_per_sec = rate.div_ceil(per_message);
    let connections = rate.div_ceil(50_000).max(1) as usize;
    let mut publishers = Vec::new();
    for c in 0..connections {
        let (client, _) = mqtt(args, &format!("bench-live-{c}"));
        let (devices, metrics) = (args.devices, args.metrics);
        let interval = Duration::from_secs_f64(connections as f64 / messages_per_sec as f64);
        publishers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut k = c;
            while Instant::now() < until {
                tick.tick().await;
                let d = k % devices;
                let topic = format!("devices/{}/telemetry", device(d));
                let ts = Utc::now().timestamp_millis();
                client
                    .publish(topic, QoS::AtLeastOnce, false, body(metrics, k, ts))
                    .await?;
                k += connections;
            }
            anyhow::Ok(k / connections)
        }));
    }
    let mut sent = 0;
    for p in publishers {
        sent += p.await??;
    }
    let (hist, gaps) = receiver.await??;
    let q = |p: f64| hist.value_at_quantile(p);
    Ok(json!({
        "rate_points_per_sec": rate,
        "messages": sent,
        "followed_devices": follow,
        "received_points": hist.len(),
        "gaps": gaps,
        "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": hist.max()},
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let out = match &args.phase {
        Phase::Load {
            points,
            days,
            connections,
            database_url,
        } => load(&args, *points, *days, *connections, database_url).await?,
        Phase::Queries {
            repeat,
            stream_prefix,
            stream_repeat,
        } => queries(&args, *repeat, stream_prefix, *stream_repeat).await?,
        Phase::Subscribe {
            rate,
            follow,
            seconds,
        } => subscribe(&args, *rate, *follow, *seconds).await?,
    };
    println!("{out}");
    Ok(())
}
