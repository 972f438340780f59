//! One whole run: connect the checks' API (if asked), start the devices
//! (ramped), stop them after `--duration` or when interrupted, show
//! progress, then read back what was stored and build the [`Report`].
//! Nothing here prints the result; the binary does.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::api;
use crate::args::Config;
use crate::device::{self, DeviceOutcome};
use crate::report::Report;
use crate::sent_log::SentLog;
use crate::stats::{self, Stats, Summary};
use crate::stored_latency;
use crate::verify::{self, DeviceRun, Window};

/// How far before the run's start `--verify` reads. A message's `ts` is
/// the wall clock when it was made, so never before the start unless the
/// clock is stepped back; a wide margin would count the last points of a
/// run just before this one (same device ids) as this run's.
const VERIFY_START_SLACK_MS: i64 = 10;

/// No device connected at all: the broker is unreachable or refuses
/// everyone (exit status 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoDeviceConnected {
    pub devices: u32,
    pub address: String,
    pub first_error: Option<String>,
}

impl std::fmt::Display for NoDeviceConnected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not connect any of the {} devices to {}",
            self.devices, self.address
        )?;
        match &self.first_error {
            Some(e) => write!(f, " (first error: {e})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for NoDeviceConnected {}

/// Runs the fleet until `--duration` or `--count` is done.
pub async fn run(config: Config) -> Result<Report> {
    run_until(config, std::future::pending()).await
}

/// Like [`run`], but stops the devices early (drain, disconnect, report)
/// when `interrupt` completes.
pub async fn run_until(
    config: Config,
    interrupt: impl Future<Output = ()> + Send + 'static,
) -> Result<Report> {
    let config = Arc::new(config);
    let ids: Vec<String> = (0..config.devices).map(|i| config.device_id(i)).collect();
    let mut client = match &config.api {
        Some(api_config) => Some(api::connect(api_config, config.connect_timeout, &ids[0]).await?),
        None => None,
    };

    let run_start_ms = chrono::Utc::now().timestamp_millis();
    let mut latency = None;
    if config.latency
        && let Some(client) = client.as_mut()
    {
        let log = Arc::new(SentLog::new(config.devices, Instant::now()));
        let follower = stored_latency::follow(client, &ids, Arc::clone(&log), run_start_ms).await?;
        latency = Some((log, follower));
    }

    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(stop_when_done(config.duration, start, stop_tx, interrupt));
    let progress = config
        .progress
        .then(|| tokio::spawn(report_progress(Arc::clone(&stats), start, config.devices)));

    let mut devices = JoinSet::new();
    let gap = config.ramp / config.devices;
    let mut ramp_stop = stop_rx.clone();
    for index in 0..config.devices {
        if !gap.is_zero() && index > 0 {
            tokio::select! {
                _ = tokio::time::sleep_until(start + gap * index) => {}
                _ = ramp_stop.wait_for(|s| *s) => {}
            }
        }
        if *ramp_stop.borrow() {
            break;
        }
        let run = device::run(
            index,
            Arc::clone(&config),
            Arc::clone(&stats),
            latency.as_ref().map(|(log, _)| Arc::clone(log)),
            stop_rx.clone(),
        );
        devices.spawn(async move { (index, run.await) });
    }

    let mut outcomes = vec![DeviceOutcome::default(); config.devices as usize];
    let mut failures = Vec::new();
    while let Some(result) = devices.join_next().await {
        match result {
            Ok((index, outcome)) => outcomes[index as usize] = outcome,
            Err(e) => failures.push(format!("a device task failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    stopper.abort();
    if let Some(progress) = progress {
        progress.abort();
    }

    let counters = stats.snapshot();
    if counters.ever_connected == 0 {
        return Err(NoDeviceConnected {
            devices: config.devices,
            address: format!("{}:{}", config.host, config.port),
            first_error: stats.first_error(),
        }
        .into());
    }
    let mut summary = Summary::new(
        config.devices,
        config.qos_level(),
        config.points_per_message(),
        counters,
        elapsed,
    );
    summary.latency = stats.latency();
    let qos1 = config.qos_level() > 0;

    let stored_latency = match latency {
        Some((_, follower)) => {
            let everything_acked = qos1 && summary.missing_acks() == 0;
            let l = follower
                .finish(summary.sent, everything_acked, config.verify_timeout)
                .await;
            if let Some(e) = &l.error {
                failures.push(format!("--latency: {e}"));
            }
            Some(l)
        }
        None => None,
    };

    let mut verification = None;
    if config.verify
        && let Some(client) = client.as_mut()
    {
        let runs: Vec<DeviceRun> = ids
            .into_iter()
            .zip(&outcomes)
            .map(|(id, o)| DeviceRun {
                id,
                sent: o.sent,
                acked: o.acked,
            })
            .collect();
        let last_ts = outcomes.iter().filter_map(|o| o.last_ts_ms).max();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let window = Window {
            start_ms: run_start_ms - VERIFY_START_SLACK_MS,
            // `ts` may run ahead of the clock (1 ms per message at most).
            end_ms: now_ms.max(last_ts.unwrap_or(now_ms)) + 1,
        };
        match verify::verify(client, &runs, qos1, window, config.verify_timeout).await {
            Ok(v) => verification = Some(v),
            Err(e) => failures.push(format!("--verify: {e:#}")),
        }
    }

    Ok(Report {
        summary,
        verify: verification,
        stored_latency,
        failures,
        drain_timeout: config.drain_timeout,
    })
}

/// Turns `stop` true once `duration` has passed since `start` or when
/// `interrupt` completes, so every device finishes gracefully (drain,
/// disconnect, summary).
async fn stop_when_done(
    duration: Option<Duration>,
    start: Instant,
    stop: watch::Sender<bool>,
    interrupt: impl Future<Output = ()>,
) {
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep_until(start + d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = deadline => {}
        _ = interrupt => {}
    }
    stop.send_replace(true);
}

/// Prints a progress line to stderr once a second until aborted.
async fn report_progress(stats: Arc<Stats>, start: Instant, devices: u32) {
    let period = Duration::from_secs(1);
    let mut interval = tokio::time::interval_at(start + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last_sent = 0;
    let mut last_time = start;
    loop {
        interval.tick().await;
        let now = Instant::now();
        let snapshot = stats.snapshot();
        eprintln!(
            "{}",
            stats::progress_line(
                now - start,
                snapshot,
                snapshot.sent - last_sent,
                now - last_time,
                devices
            )
        );
        last_sent = snapshot.sent;
        last_time = now;
    }
}
