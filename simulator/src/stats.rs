//! Fleet-wide counters and the end-of-run summary.
//!
//! Every device task updates the same few atomics, so the progress line and
//! the summary never need to talk to the devices. Counters are monotonic and
//! only read for reporting, so relaxed ordering is enough.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

/// Counters shared by all device tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages accepted by a device's MQTT client, i.e. `seq` values used.
    sent: AtomicU64,
    /// Deliberately bad messages (the misbehaving profile), not in `sent`.
    misbehaved: AtomicU64,
    /// Extra connections of reconnect storms (the misbehaving profile).
    storm_connects: AtomicU64,
    /// PUBACKs received (QoS 1 only).
    acked: AtomicU64,
    /// Connection errors and failed publishes.
    errors: AtomicU64,
    /// Devices connected right now.
    connected: AtomicU64,
    /// Devices that completed at least one MQTT connection.
    ever_connected: AtomicU64,
    /// Text of the first connection error, for the "could not connect" message.
    first_error: Mutex<Option<String>>,
    /// Publish → PUBACK times in microseconds, merged from every device
    /// when it finishes (each device records into its own histogram, so the
    /// hot path takes no lock).
    ack_latency: Mutex<Option<Histogram<u64>>>,
}

/// A histogram for publish → PUBACK latency in microseconds (1 µs to 1 h,
/// three significant digits).
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub sent: u64,
    pub misbehaved: u64,
    pub storm_connects: u64,
    pub acked: u64,
    pub errors: u64,
    pub connected: u64,
    pub ever_connected: u64,
}

impl Stats {
    pub fn add_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_misbehaved(&self) {
        self.misbehaved.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_storm_connect(&self) {
        self.storm_connects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_acked(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error; remembers its text if it is the first one.
    pub fn add_error(&self, error: &dyn fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }

    /// A device completed a connection; `first_time` when it is its first.
    pub fn device_connected(&self, first_time: bool) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        if first_time {
            self.ever_connected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A device that was connected lost or closed its connection.
    pub fn device_disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds one device's latency histogram to the fleet's.
    pub fn merge_latency(&self, device: &Histogram<u64>) {
        let mut all = self.ack_latency.lock().unwrap_or_else(|e| e.into_inner());
        match all.as_mut() {
            Some(h) => {
                // Same bounds everywhere, so adding cannot fail.
                let _ = h.add(device);
            }
            None => *all = Some(device.clone()),
        }
    }

    /// Publish → PUBACK percentiles in milliseconds, if any ack was timed.
    pub fn latency(&self) -> Option<Latency> {
        let all = self.ack_latency.lock().unwrap_or_else(|e| e.into_inner());
        Latency::of(all.as_ref()?)
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            misbehaved: self.misbehaved.load(Ordering::Relaxed),
            storm_connects: self.storm_connects.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            ever_connected: self.ever_connected.load(Ordering::Relaxed),
        }
    }
}

/// Latency percentiles of a run: publish → PUBACK (QoS 1), or publish →
/// stored (`--latency`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of a histogram of microseconds; None when empty.
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Some(Latency {
            samples: h.len(),
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1000.0,
        })
    }
}

/// The final report of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub latency: Option<Latency>,
    pub devices: u32,
    pub qos: u8,
    pub sent: u64,
    /// Deliberately bad messages (misbehaving profile): sent at QoS 0,
    /// never in `sent`, `acked` or `points`.
    pub misbehaved: u64,
    /// Extra connections opened by reconnect storms (misbehaving profile).
    pub storm_connects: u64,
    pub acked: u64,
    pub errors: u64,
    /// Points Sluice stores for the messages sent: every numeric field is a
    /// point: the profile's numeric fields plus `seq` (`ts` is the points'
    /// timestamp, not a point).
    pub points: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn new(
        devices: u32,
        qos: u8,
        points_per_message: u64,
        counters: Snapshot,
        elapsed: Duration,
    ) -> Self {
        Summary {
            latency: None,
            devices,
            qos,
            sent: counters.sent,
            misbehaved: counters.misbehaved,
            storm_connects: counters.storm_connects,
            acked: counters.acked,
            errors: counters.errors,
            points: counters.sent.saturating_mul(points_per_message),
            elapsed,
        }
    }

    fn per_sec(&self, n: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }

    pub fn msgs_per_sec(&self) -> f64 {
        self.per_sec(self.sent)
    }

    pub fn points_per_sec(&self) -> f64 {
        self.per_sec(self.points)
    }

    /// QoS 1 messages never acknowledged (0 for QoS 0).
    pub fn missing_acks(&self) -> u64 {
        if self.qos == 0 {
            0
        } else {
            self.sent.saturating_sub(self.acked)
        }
    }

    /// The summary as one JSON object (`--json`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "devices": self.devices,
            "qos": self.qos,
            "sent": self.sent,
            "misbehaved": self.misbehaved,
            "storm_connects": self.storm_connects,
            "acked": self.acked,
            "errors": self.errors,
            "points": self.points,
            "elapsed_secs": round(self.elapsed.as_secs_f64(), 3),
            "msgs_per_sec": round(self.msgs_per_sec(), 1),
            "points_per_sec": round(self.points_per_sec(), 1),
            "puback_latency_ms": self.latency.map(|l| json!({
                "samples": l.samples,
                "p50": round(l.p50_ms, 3),
                "p90": round(l.p90_ms, 3),
                "p99": round(l.p99_ms, 3),
                "max": round(l.max_ms, 3),
            })),
        })
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "devices:        {}", self.devices)?;
        writeln!(f, "qos:            {}", self.qos)?;
        writeln!(f, "messages sent:  {}", self.sent)?;
        if self.misbehaved > 0 {
            writeln!(
                f,
                "bad messages:   {} (not counted as sent)",
                self.misbehaved
            )?;
        }
        if self.storm_connects > 0 {
            writeln!(
                f,
                "storm connects: {} (reconnect storms, each a session takeover)",
                self.storm_connects
            )?;
        }
        writeln!(f, "messages acked: {}", self.acked)?;
        writeln!(f, "errors:         {}", self.errors)?;
        writeln!(f, "points sent:    {}", self.points)?;
        writeln!(f, "elapsed:        {:.3} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "messages/s:     {:.1}", self.msgs_per_sec())?;
        write!(f, "points/s:       {:.1}", self.points_per_sec())?;
        if let Some(l) = self.latency {
            write!(
                f,
                "\nPUBACK latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} acks)",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.samples
            )?;
        }
        Ok(())
    }
}

/// One progress line: `elapsed`, counters and the message rate since the
/// previous line (`sent_delta` over `interval`).
pub fn progress_line(
    elapsed: Duration,
    now: Snapshot,
    sent_delta: u64,
    interval: Duration,
    devices: u32,
) -> String {
    let rate = if interval.is_zero() {
        0.0
    } else {
        sent_delta as f64 / interval.as_secs_f64()
    };
    format!(
        "[{:>7.1}s] sent {} acked {} errors {} connected {}/{} {:.0} msg/s",
        elapsed.as_secs_f64(),
        now.sent,
        now.acked,
        now.errors,
        now.connected,
        devices,
        rate
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(sent: u64, acked: u64) -> Snapshot {
        Snapshot {
            sent,
            acked,
            errors: 2,
            ..Snapshot::default()
        }
    }

    #[test]
    fn points_count_seq_but_not_ts() {
        let s = Summary::new(10, 1, 5, counters(100, 100), Duration::from_secs(2));
        assert_eq!(s.points, 500);
        assert_eq!(s.msgs_per_sec(), 50.0);
        assert_eq!(s.points_per_sec(), 250.0);
        let zero = Summary::new(1, 0, 1, counters(7, 0), Duration::ZERO);
        assert_eq!(zero.points, 7);
        assert_eq!(zero.msgs_per_sec(), 0.0);
    }

    #[test]
    fn latency_percentiles_come_from_every_device() {
        let stats = Stats::default();
        assert!(stats.latency().is_none());
        let mut a = new_latency_histogram();
        let mut b = new_latency_histogram();
        for us in 1..=99u64 {
            a.record(us * 1000).unwrap();
        }
        b.record(100_000).unwrap();
        stats.merge_latency(&a);
        stats.merge_latency(&b);
        let l = stats.latency().unwrap();
        assert_eq!(l.samples, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn missing_acks_only_for_qos1() {
        assert_eq!(
            Summary::new(1, 1, 5, counters(10, 7), Duration::ZERO).missing_acks(),
            3
        );
        assert_eq!(
            Summary::new(1, 0, 5, counters(10, 0), Duration::ZERO).missing_acks(),
            0
        );
    }

    #[test]
    fn json_has_exactly_the_documented_keys() {
        let s = Summary::new(3, 1, 5, counters(9, 9), Duration::from_millis(1500));
        let v = s.to_json();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "acked",
                "devices",
                "elapsed_secs",
                "errors",
                "misbehaved",
                "msgs_per_sec",
                "points",
                "points_per_sec",
                "puback_latency_ms",
                "qos",
                "sent",
                "storm_connects"
            ]
        );
        assert_eq!(v["sent"], 9);
        assert_eq!(v["points"], 45);
        assert_eq!(v["elapsed_secs"], 1.5);
        assert_eq!(v["msgs_per_sec"], 6.0);
        assert_eq!(v["points_per_sec"], 30.0);
    }

    #[test]
    fn storm_connects_are_in_text_and_json() {
        let mut c = counters(9, 9);
        c.storm_connects = 5;
        let s = Summary::new(3, 1, 5, c, Duration::from_secs(1));
        assert_eq!(s.to_json()["storm_connects"], 5);
        assert!(s.to_string().contains("storm connects: 5"), "{s}");
        let quiet = Summary::new(3, 1, 5, counters(9, 9), Duration::from_secs(1));
        assert_eq!(quiet.to_json()["storm_connects"], 0);
        assert!(!quiet.to_string().contains("storm"));
    }

    #[test]
    fn text_summary_mentions_every_figure() {
        let text = Summary::new(3, 1, 5, counters(9, 8), Duration::from_secs(3)).to_string();
        for needle in [
            "devices:        3",
            "qos:            1",
            "messages sent:  9",
            "messages acked: 8",
            "errors:         2",
            "points sent:    45",
            "elapsed:        3.000 s",
            "messages/s:     3.0",
            "points/s:       15.0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn counters_and_first_error() {
        let stats = Stats::default();
        stats.add_sent();
        stats.add_sent();
        stats.add_acked();
        stats.add_error(&"first");
        stats.add_error(&"second");
        stats.device_connected(true);
        stats.device_connected(false);
        stats.device_disconnected();
        stats.add_storm_connect();
        let s = stats.snapshot();
        assert_eq!((s.sent, s.acked, s.errors), (2, 1, 2));
        assert_eq!(s.storm_connects, 1);
        assert_eq!((s.connected, s.ever_connected), (1, 1));
        assert_eq!(stats.first_error().as_deref(), Some("first"));
    }

    #[test]
    fn progress_line_shows_rate() {
        let line = progress_line(
            Duration::from_secs(3),
            counters(300, 290),
            100,
            Duration::from_secs(1),
            10,
        );
        assert!(line.contains("sent 300 acked 290 errors 2"), "{line}");
        assert!(line.ends_with("100 msg/s"), "{line}");
    }
}
