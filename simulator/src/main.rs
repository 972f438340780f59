//! `sluice-sim`: a fleet of simulated MQTT devices, Sluice's load generator.
//!
//! This file only orchestrates a run: it starts the devices (ramped), stops
//! them after `--duration` or on Ctrl-C, shows progress, and turns the
//! shared counters into the summary and the exit status. The work itself is
//! in the modules below.

mod args;
mod device;
mod misbehaviour;
mod pacing;
mod stats;
mod telemetry;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

// The load generator shares the machine with the server it measures; a
// faster allocator leaves more of it to the server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::args::{Args, Config};
use crate::stats::{Stats, Summary};

/// Exit status when no device could connect at all.
const EXIT_NO_CONNECTION: u8 = 3;
/// Exit status on invalid arguments (as clap uses for usage errors).
const EXIT_USAGE: u8 = 2;
/// Exit status when Ctrl-C is pressed a second time.
const EXIT_INTERRUPTED: i32 = 130;

fn main() -> ExitCode {
    let config = match Args::parse().into_config(std::io::stderr().is_terminal()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(Arc::new(config)))
}

/// One whole run; returns the process exit status.
async fn run(config: Arc<Config>) -> ExitCode {
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(stop_when_done(config.duration, start, stop_tx));
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
        devices.spawn(device::run(
            index,
            Arc::clone(&config),
            Arc::clone(&stats),
            stop_rx.clone(),
        ));
    }

    let mut crashed = 0;
    while let Some(result) = devices.join_next().await {
        if let Err(e) = result {
            eprintln!("error: a device task failed: {e}");
            crashed += 1;
        }
    }
    let elapsed = start.elapsed();
    stopper.abort();
    if let Some(progress) = progress {
        progress.abort();
    }

    let counters = stats.snapshot();
    if counters.ever_connected == 0 {
        eprintln!(
            "error: could not connect any of the {} devices to {}:{}{}",
            config.devices,
            config.host,
            config.port,
            stats
                .first_error()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        );
        return ExitCode::from(EXIT_NO_CONNECTION);
    }

    let mut summary = Summary::new(
        config.devices,
        config.qos_level(),
        config.points_per_message(),
        counters,
        elapsed,
    );
    summary.latency = stats.latency();
    if config.json {
        println!("{}", summary.to_json());
    } else {
        println!("{summary}");
    }

    let missing = summary.missing_acks();
    if missing > 0 {
        eprintln!(
            "error: {missing} of {} QoS 1 messages were not acknowledged (drain timeout {:.1} s)",
            summary.sent,
            config.drain_timeout.as_secs_f64()
        );
        return ExitCode::FAILURE;
    }
    if crashed > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Turns `stop` true once `duration` has passed since `start` or on the
/// first Ctrl-C, so every device finishes gracefully (drain, disconnect,
/// summary). A second Ctrl-C exits at once.
async fn stop_when_done(duration: Option<Duration>, start: Instant, stop: watch::Sender<bool>) {
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep_until(start + d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = deadline => {}
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping, draining and disconnecting (Ctrl-C again to quit now)");
        }
    }
    stop.send_replace(true);
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(EXIT_INTERRUPTED);
    }
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
