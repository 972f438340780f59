//! `--latency`: publish → stored latency, from the API's live feed.
//!
//! A `Subscribe` stream for this run's `seq` points is opened before the
//! first device starts (once the call returns, the server follows the feed
//! for it), so every point of the run is seen as soon as the writer has
//! committed it. Each point is timed against the moment its device
//! published that `seq` (`sent_log.rs` says why not against `ts`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use sluice_proto::v1::SubscribeRequest;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{SEQ_METRIC, Telemetry, epoch_ms, seq_of};
use crate::patience::{POLL, Patience, Progress};
use crate::sent_log::{Lookup, SentLog};
use crate::stats::{Latency, new_latency_histogram};

/// Device ids a Subscribe request may name; past it the stream takes every
/// device and the ids are filtered here.
const MAX_SUBSCRIBED_IDS: usize = 10_000;

/// The result of `--latency`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLatency {
    /// Percentiles; None when no point was sampled.
    pub latency: Option<Latency>,
    /// Points sampled (distinct messages timed).
    pub count: u64,
    /// This run's points that could not be timed: their publish time was
    /// already forgotten (see `sent_log.rs`).
    pub unmatched: u64,
    /// Points seen again (stored twice); not sampled twice.
    pub repeated: u64,
    /// Items the server skipped because this subscriber fell behind.
    pub gap: u64,
    /// Why the stream ended early, if it did.
    pub error: Option<String>,
}

impl StoredLatency {
    /// `stored_latency_ms` of the JSON summary.
    pub fn to_json(&self) -> serde_json::Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let l = self.latency;
        json!({
            "p50": l.map(|l| round(l.p50_ms)),
            "p90": l.map(|l| round(l.p90_ms)),
            "p99": l.map(|l| round(l.p99_ms)),
            "max": l.map(|l| round(l.max_ms)),
            "count": self.count,
        })
    }
}

/// What the follower task gathered.
struct Gathered {
    histogram: Histogram<u64>,
    matched: u64,
    unmatched: u64,
    repeated: u64,
    gap: u64,
    error: Option<String>,
}

/// A running Subscribe stream, timing this run's points.
pub struct Follower {
    task: JoinHandle<Gathered>,
    stop: oneshot::Sender<()>,
    /// Points of this run seen so far (timed or not).
    seen: watch::Receiver<u64>,
}

/// Opens the stream. `ids` are the run's device ids, by device index;
/// points older than `run_start_ms` (an earlier run's) are ignored.
pub async fn follow(
    client: &mut Telemetry,
    ids: &[String],
    log: Arc<SentLog>,
    run_start_ms: i64,
) -> Result<Follower> {
    let request = SubscribeRequest {
        device_ids: if ids.len() <= MAX_SUBSCRIBED_IDS {
            ids.to_vec()
        } else {
            Vec::new()
        },
        metrics: vec![SEQ_METRIC.to_owned()],
        points: true,
        ..Default::default()
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(|s| anyhow!("cannot subscribe for --latency: {}", s.message()))?
        .into_inner();
    let index: HashMap<String, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i as u32))
        .collect();
    let (stop, mut stopped) = oneshot::channel();
    let (seen_tx, seen) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut g = Gathered {
            histogram: new_latency_histogram(),
            matched: 0,
            unmatched: 0,
            repeated: 0,
            gap: 0,
            error: None,
        };
        loop {
            let response = tokio::select! {
                biased;
                _ = &mut stopped => break,
                r = stream.next() => r,
            };
            let response = match response {
                Some(Ok(r)) => r,
                Some(Err(status)) => {
                    g.error = Some(format!("the Subscribe stream failed: {}", status.message()));
                    break;
                }
                None => {
                    g.error = Some("the server ended the Subscribe stream".to_owned());
                    break;
                }
            };
            let now = Instant::now();
            g.gap += response.gap;
            for point in response.points {
                if point.metric != SEQ_METRIC {
                    continue;
                }
                let Some(&device) = index.get(&point.device_id) else {
                    continue;
                };
                if point
                    .time
                    .as_ref()
                    .is_none_or(|t| epoch_ms(t) < run_start_ms)
                {
                    continue;
                }
                let lookup = match seq_of(point.value) {
                    Some(seq) => log.take(device, seq, now),
                    None => Lookup::Unknown,
                };
                match lookup {
                    Lookup::Latency(d) => {
                        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
                        g.histogram.saturating_record(micros);
                        g.matched += 1;
                    }
                    Lookup::Repeated => g.repeated += 1,
                    Lookup::Unknown => g.unmatched += 1,
                }
            }
            seen_tx.send_replace(g.matched + g.unmatched);
        }
        g
    });
    Ok(Follower { task, stop, seen })
}

impl Follower {
    /// Waits until `expected` points were seen (or the wait gives up, see
    /// `patience.rs`), then closes the stream. `must_arrive`: every message
    /// was acknowledged at QoS 1, so all of them will be stored.
    pub async fn finish(
        mut self,
        expected: u64,
        must_arrive: bool,
        timeout: Duration,
    ) -> StoredLatency {
        let mut patience = Patience::new(timeout, Instant::now());
        loop {
            let count = *self.seen.borrow_and_update();
            let progress = Progress {
                count,
                complete: count >= expected,
                must_arrive,
            };
            if !patience.keep_waiting(progress, Instant::now()) {
                break;
            }
            tokio::select! {
                changed = self.seen.changed() => if changed.is_err() { break }, // the stream ended
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        let _ = self.stop.send(());
        match self.task.await {
            Ok(g) => StoredLatency {
                latency: Latency::of(&g.histogram),
                count: g.matched,
                unmatched: g.unmatched,
                repeated: g.repeated,
                gap: g.gap,
                error: g.error,
            },
            Err(e) => StoredLatency {
                latency: None,
                count: 0,
                unmatched: 0,
                repeated: 0,
                gap: 0,
                error: Some(format!("the latency follower failed: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_keys_even_without_samples() {
        let none = StoredLatency {
            latency: None,
            count: 0,
            unmatched: 0,
            repeated: 0,
            gap: 0,
            error: None,
        };
        let j = none.to_json();
        let mut keys: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["count", "max", "p50", "p90", "p99"]);
        assert!(j["p50"].is_null());
        let some = StoredLatency {
            latency: Some(Latency {
                samples: 3,
                p50_ms: 1.2344,
                p90_ms: 2.0,
                p99_ms: 3.0,
                max_ms: 4.0,
            }),
            count: 3,
            ..none
        };
        assert_eq!(some.to_json()["p50"], 1.234);
        assert_eq!(some.to_json()["count"], 3);
    }
}
