//! `--verify`: read this run's `seq` points back through the gRPC API and
//! compare them with what each device sent.
//!
//! Every message stores its `seq` as a point of metric `seq` at the
//! message's `ts`, so device `d` should have exactly the values
//! `0..sent(d)`, once each, between the run's start and its last `ts`. The
//! time range keeps an earlier run with the same device ids out.
//!
//! Reads use `StreamPoints` (no pages, no page tokens), a bounded number of
//! device ids and expected rows per call; a call the server still finds too
//! large (`RESOURCE_EXHAUSTED`, its scan bound) is split in halves, by
//! devices and then by time. While points are still arriving, only the
//! devices not yet complete are read again.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::json;
use sluice_proto::v1::QueryPointsRequest;
use tokio::time::Instant;

use crate::api::{SEQ_METRIC, Telemetry, seq_of, timestamp};
use crate::patience::{POLL, Patience, Progress};

/// Device ids per call: the API's limit.
const MAX_IDS_PER_CALL: usize = 10_000;
/// Expected rows per call, well below the server's default scan bound
/// (10 million), so one call stays short.
const ROWS_PER_CALL: u64 = 1_000_000;
/// Halvings of one call refused as too large, before giving up.
const MAX_SPLITS: u32 = 24;
/// A single streamed read may take this long.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// What one device did, as the check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRun {
    pub id: String,
    /// Messages sent: seqs `0..sent`.
    pub sent: u64,
    /// PUBACKs received (QoS 1).
    pub acked: u64,
}

impl DeviceRun {
    fn unacked(&self) -> u64 {
        self.sent - self.acked.min(self.sent)
    }
}

/// The time range of this run's points, in epoch milliseconds: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// One device's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCheck {
    pub id: String,
    /// Messages sent (seq 0..expected-1).
    pub expected: u64,
    /// Distinct seqs of those that were stored.
    pub received: u64,
    /// Sent seqs never seen.
    pub missing: u64,
    /// Extra copies of seqs seen more than once.
    pub duplicates: u64,
    /// Points whose seq was never sent (≥ expected, or not a whole number).
    pub unexpected: u64,
}

impl DeviceCheck {
    fn problems(&self) -> u64 {
        self.missing + self.duplicates + self.unexpected
    }
}

/// The result of `--verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    /// Missing messages the broker had acknowledged (QoS 1): lost by the
    /// server. Counted per device as what is missing beyond its
    /// unacknowledged messages; 0 at QoS 0.
    pub lost: u64,
    /// Every sent message was seen.
    pub complete: bool,
    /// How long the read-back took, waiting included.
    pub waited: Duration,
    pub devices: Vec<DeviceCheck>,
}

impl Verification {
    /// Up to `n` devices with the most problems, worst first; only devices
    /// that have any.
    pub fn worst(&self, n: usize) -> Vec<&DeviceCheck> {
        let mut bad: Vec<&DeviceCheck> = self.devices.iter().filter(|d| d.problems() > 0).collect();
        bad.sort_by(|a, b| {
            b.problems()
                .cmp(&a.problems())
                .then_with(|| a.id.cmp(&b.id))
        });
        bad.truncate(n);
        bad
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "expected": self.expected,
            "received": self.received,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "lost": self.lost,
            "complete": self.complete,
            "waited_secs": (self.waited.as_secs_f64() * 1000.0).round() / 1000.0,
            "devices": self.devices.iter().map(|d| json!({
                "id": d.id,
                "expected": d.expected,
                "received": d.received,
                "missing": d.missing,
                "duplicates": d.duplicates,
                "unexpected": d.unexpected,
            })).collect::<Vec<_>>(),
        })
    }
}

/// What was read back of one device's seqs.
#[derive(Debug, Clone)]
struct Tally {
    sent: u64,
    /// Bit `s` set once seq `s` was seen.
    seen: Vec<u64>,
    received: u64,
    duplicates: u64,
    unexpected: u64,
}

impl Tally {
    fn new(sent: u64) -> Self {
        Tally {
            sent,
            seen: vec![0; usize::try_from(sent.div_ceil(64)).unwrap_or(usize::MAX)],
            received: 0,
            duplicates: 0,
            unexpected: 0,
        }
    }

    fn add(&mut self, value: f64) {
        let Some(seq) = seq_of(value).filter(|&s| s < self.sent) else {
            self.unexpected += 1;
            return;
        };
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
        } else {
            self.seen[word] |= bit;
            self.received += 1;
        }
    }

    fn points(&self) -> u64 {
        self.received + self.duplicates + self.unexpected
    }

    fn complete(&self) -> bool {
        self.received == self.sent
    }
}

/// Reads the devices' seqs back, waiting for stragglers (see
/// `patience.rs`), and compares them with what was sent.
pub async fn verify(
    client: &mut Telemetry,
    runs: &[DeviceRun],
    qos1: bool,
    window: Window,
    timeout: Duration,
) -> Result<Verification> {
    let started = Instant::now();
    let mut tallies: Vec<Tally> = runs.iter().map(|r| Tally::new(r.sent)).collect();
    let mut pending: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].sent > 0).collect();
    let mut patience = Patience::new(timeout, started);
    loop {
        for &i in &pending {
            tallies[i] = Tally::new(runs[i].sent);
        }
        read(client, runs, &pending, window, &mut tallies).await?;
        pending.retain(|&i| !tallies[i].complete());
        let progress = Progress {
            count: tallies.iter().map(Tally::points).sum(),
            complete: pending.is_empty(),
            must_arrive: qos1
                && pending
                    .iter()
                    .any(|&i| runs[i].sent - tallies[i].received > runs[i].unacked()),
        };
        if !patience.keep_waiting(progress, Instant::now()) {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(summarize(runs, &tallies, qos1, started.elapsed()))
}

fn summarize(runs: &[DeviceRun], tallies: &[Tally], qos1: bool, waited: Duration) -> Verification {
    let devices: Vec<DeviceCheck> = runs
        .iter()
        .zip(tallies)
        .map(|(run, t)| DeviceCheck {
            id: run.id.clone(),
            expected: run.sent,
            received: t.received,
            missing: run.sent - t.received,
            duplicates: t.duplicates,
            unexpected: t.unexpected,
        })
        .collect();
    let sum = |f: fn(&DeviceCheck) -> u64| devices.iter().map(f).sum::<u64>();
    let lost = if qos1 {
        runs.iter()
            .zip(&devices)
            .map(|(run, d)| d.missing.saturating_sub(run.unacked()))
            .sum()
    } else {
        0
    };
    Verification {
        expected: sum(|d| d.expected),
        received: sum(|d| d.received),
        missing: sum(|d| d.missing),
        duplicates: sum(|d| d.duplicates),
        unexpected: sum(|d| d.unexpected),
        lost,
        complete: devices.iter().all(|d| d.missing == 0),
        waited,
        devices,
    }
}

/// Groups devices (indexes into `runs`) into calls of at most
/// [`MAX_IDS_PER_CALL`] ids and, unless one device alone has more,
/// [`ROWS_PER_CALL`] expected rows.
fn calls(which: &[usize], runs: &[DeviceRun]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut rows = 0u64;
    for &i in which {
        let sent = runs[i].sent;
        match out.last_mut() {
            Some(call)
                if call.len() < MAX_IDS_PER_CALL && rows.saturating_add(sent) <= ROWS_PER_CALL =>
            {
                call.push(i);
                rows += sent;
            }
            _ => {
                out.push(vec![i]);
                rows = sent;
            }
        }
    }
    out
}

/// One call's worth: these devices over this time range.
struct Call {
    devices: Vec<usize>,
    start_ms: i64,
    end_ms: i64,
    splits: u32,
}

/// Reads every seq point of the devices `which` into their tallies.
async fn read(
    client: &mut Telemetry,
    runs: &[DeviceRun],
    which: &[usize],
    window: Window,
    tallies: &mut [Tally],
) -> Result<()> {
    let index: HashMap<&str, usize> = which.iter().map(|&i| (runs[i].id.as_str(), i)).collect();
    let mut work: Vec<Call> = calls(which, runs)
        .into_iter()
        .map(|devices| Call {
            devices,
            start_ms: window.start_ms,
            end_ms: window.end_ms,
            splits: 0,
        })
        .collect();
    while let Some(call) = work.pop() {
        let request = QueryPointsRequest {
            device_ids: call.devices.iter().map(|&i| runs[i].id.clone()).collect(),
            metric: SEQ_METRIC.to_owned(),
            start: Some(timestamp(call.start_ms)),
            end: Some(timestamp(call.end_ms)),
            ..Default::default()
        };
        let mut stream = match client.stream_points(request).await {
            Ok(response) => response.into_inner(),
            Err(status)
                if status.code() == tonic::Code::ResourceExhausted && call.splits < MAX_SPLITS =>
            {
                work.extend(split(call).ok_or_else(|| {
                    anyhow!(
                        "the server refuses to stream even one device's points over 1 ms: {}",
                        status.message()
                    )
                })?);
                continue;
            }
            Err(status) => bail!("StreamPoints failed: {}", status.message()),
        };
        let drained = tokio::time::timeout(READ_TIMEOUT, async {
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|s| anyhow!("StreamPoints failed: {}", s.message()))?;
                for point in batch.points {
                    if let Some(&i) = index.get(point.device_id.as_str()) {
                        tallies[i].add(point.value);
                    }
                }
            }
            anyhow::Ok(())
        })
        .await;
        drained.map_err(|_| anyhow!("StreamPoints did not finish within {READ_TIMEOUT:?}"))??;
    }
    Ok(())
}

/// Halves a call: by devices while there are several, else by time.
fn split(call: Call) -> Option<[Call; 2]> {
    let splits = call.splits + 1;
    if call.devices.len() > 1 {
        let mut first = call.devices;
        let second = first.split_off(first.len() / 2);
        return Some([
            Call {
                devices: first,
                splits,
                ..call
            },
            Call {
                devices: second,
                splits,
                ..call
            },
        ]);
    }
    if call.end_ms - call.start_ms < 2 {
        return None;
    }
    let middle = call.start_ms + (call.end_ms - call.start_ms) / 2;
    Some([
        Call {
            devices: call.devices.clone(),
            end_ms: middle,
            splits,
            ..call
        },
        Call {
            devices: call.devices,
            start_ms: middle,
            splits,
            ..call
        },
    ])
}

/// The read-back as a plain function of what was read, for the tests.
#[cfg(test)]
fn check(runs: &[DeviceRun], points: &[(usize, f64)], qos1: bool) -> Verification {
    let mut tallies: Vec<Tally> = runs.iter().map(|r| Tally::new(r.sent)).collect();
    for &(i, v) in points {
        tallies[i].add(v);
    }
    summarize(runs, &tallies, qos1, Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, sent: u64, acked: u64) -> DeviceRun {
        DeviceRun {
            id: id.into(),
            sent,
            acked,
        }
    }

    #[test]
    fn counts_missing_duplicates_and_unexpected_per_device() {
        let runs = [run("a", 5, 5), run("b", 3, 3), run("c", 0, 0)];
        let mut points: Vec<(usize, f64)> = (0..5).map(|s| (0, s as f64)).collect();
        // b: 0 twice, 1 missing, 2, and a 3 it never sent, and a fraction.
        points.extend([(1, 0.0), (1, 0.0), (1, 2.0), (1, 3.0), (1, 0.5)]);
        let v = check(&runs, &points, true);
        assert_eq!(
            v.devices[1],
            DeviceCheck {
                id: "b".into(),
                expected: 3,
                received: 2,
                missing: 1,
                duplicates: 1,
                unexpected: 2,
            }
        );
        assert_eq!(v.devices[0].problems(), 0);
        assert_eq!(v.devices[2].expected, 0);
        assert_eq!(
            (
                v.expected,
                v.received,
                v.missing,
                v.duplicates,
                v.unexpected
            ),
            (8, 7, 1, 1, 2)
        );
        assert!(!v.complete);
        assert_eq!(v.lost, 1, "b's missing message had been acked");
    }

    #[test]
    fn only_missing_acknowledged_messages_are_lost() {
        // 10 sent, 7 acked, 4 missing: at least one acked message is gone.
        let runs = [run("a", 10, 7)];
        let points: Vec<(usize, f64)> = (0..6).map(|s| (0, s as f64)).collect();
        assert_eq!(check(&runs, &points, true).lost, 1);
        let points: Vec<(usize, f64)> = (0..7).map(|s| (0, s as f64)).collect();
        assert_eq!(check(&runs, &points, true).lost, 0);
        // QoS 0 loss is reported, never counted as lost.
        let v = check(&[run("a", 10, 0)], &[], false);
        assert_eq!((v.missing, v.lost), (10, 0));
    }

    #[test]
    fn worst_devices_come_first_and_clean_ones_not_at_all() {
        let runs: Vec<DeviceRun> = (0..15).map(|i| run(&format!("d{i:02}"), 20, 20)).collect();
        let mut points = Vec::new();
        for (i, _) in runs.iter().enumerate() {
            // Device i misses i messages.
            points.extend((i as u64..20).map(|s| (i, s as f64)));
        }
        let v = check(&runs, &points, true);
        let worst: Vec<&str> = v.worst(10).iter().map(|d| d.id.as_str()).collect();
        assert_eq!(worst.len(), 10);
        assert_eq!(worst[0], "d14");
        assert_eq!(worst[9], "d05");
        assert!(v.worst(100).iter().all(|d| d.id != "d00"));
    }

    #[test]
    fn json_has_totals_and_every_device() {
        let v = check(
            &[run("a", 2, 2), run("b", 1, 1)],
            &[(0, 0.0), (0, 1.0)],
            true,
        );
        let j = v.to_json();
        assert_eq!(j["expected"], 3);
        assert_eq!(j["missing"], 1);
        assert_eq!(j["lost"], 1);
        assert_eq!(j["devices"].as_array().unwrap().len(), 2);
        assert_eq!(j["devices"][1]["id"], "b");
        assert_eq!(j["devices"][1]["missing"], 1);
    }

    #[test]
    fn calls_respect_the_id_and_row_bounds() {
        let runs: Vec<DeviceRun> = (0..25_000).map(|i| run(&i.to_string(), 10, 10)).collect();
        let all: Vec<usize> = (0..runs.len()).collect();
        let c = calls(&all, &runs);
        assert_eq!(
            c.iter().map(Vec::len).collect::<Vec<_>>(),
            [10_000, 10_000, 5_000]
        );

        let big = [
            run("a", 600_000, 0),
            run("b", 600_000, 0),
            run("c", 5_000_000, 0),
            run("d", 1, 0),
        ];
        let c = calls(&[0, 1, 2, 3], &big);
        assert_eq!(c, [vec![0], vec![1], vec![2], vec![3]]);
        assert!(calls(&[], &big).is_empty());
    }

    #[test]
    fn a_refused_call_splits_by_devices_then_by_time() {
        let call = Call {
            devices: vec![1, 2, 3],
            start_ms: 0,
            end_ms: 100,
            splits: 0,
        };
        let [a, b] = split(call).unwrap();
        assert_eq!((a.devices, b.devices), (vec![1], vec![2, 3]));
        assert_eq!((a.start_ms, a.end_ms, a.splits), (0, 100, 1));
        let one = Call {
            devices: vec![7],
            start_ms: 0,
            end_ms: 100,
            splits: 3,
        };
        let [a, b] = split(one).unwrap();
        assert_eq!(
            (a.start_ms, a.end_ms, b.start_ms, b.end_ms),
            (0, 50, 50, 100)
        );
        assert_eq!(b.splits, 4);
        let tiny = Call {
            devices: vec![7],
            start_ms: 0,
            end_ms: 1,
            splits: 0,
        };
        assert!(split(tiny).is_none());
    }
}
