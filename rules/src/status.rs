//! Per-rule health and counters, shared by every processor worker and read
//! by the Admin API (`GetRule`, `ListRules`).
//!
//! The same numbers also go to Prometheus through the `metrics` facade; this
//! copy exists because an API answer needs to read them back, which the
//! facade cannot. A rule is **suspended** after `suspend_after` guest
//! failures in a row (traps, timeouts, exhausted limits): its messages then
//! go to the dead letters with the reason, until the rule is deployed again
//! or enabled again. Suspension is what keeps a hostile guest from taking the
//! pipeline's time from the rules that work.

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A rule's runtime state.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleStatus {
    Active,
    Suspended {
        reason: String,
        since: DateTime<Utc>,
    },
}

impl RuleStatus {
    pub fn label(&self) -> &'static str {
        match self {
            RuleStatus::Active => "active",
            RuleStatus::Suspended { .. } => "suspended",
        }
    }
}

/// When a failing rule is suspended. A timeout costs the pipeline the whole
/// time limit, so timeouts have their own, lower threshold; a trap or an
/// exhausted memory limit costs about one instantiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuspendPolicy {
    /// Failures of any kind in a row (0: never).
    pub after_failures: u32,
    /// Timeouts in a row (0: never).
    pub after_timeouts: u32,
}

impl Default for SuspendPolicy {
    fn default() -> Self {
        Self {
            after_failures: 10,
            after_timeouts: 2,
        }
    }
}

/// The rule's Prometheus handles, registered once: building labelled
/// metrics per call showed up in the per-batch cost.
pub struct RuleMetrics {
    pub invocations: metrics::Counter,
    pub messages_in: metrics::Counter,
    pub points: metrics::Counter,
    pub events: metrics::Counter,
    pub publishes: metrics::Counter,
    pub state_writes: metrics::Counter,
    pub batch_seconds: metrics::Histogram,
    pub stored: metrics::Counter,
    pub dropped: metrics::Counter,
    pub dead_letter: metrics::Counter,
}

impl RuleMetrics {
    fn new(rule: &str) -> Self {
        let outcome = |o: &'static str| metrics::counter!("sluice_rule_messages_total", "rule" => rule.to_owned(), "outcome" => o);
        let output = |kind: &'static str| metrics::counter!("sluice_rule_outputs_total", "rule" => rule.to_owned(), "kind" => kind);
        Self {
            invocations: metrics::counter!("sluice_rule_invocations_total", "rule" => rule.to_owned()),
            messages_in: metrics::counter!("sluice_rule_messages_in_total", "rule" => rule.to_owned()),
            points: output("point"),
            events: output("event"),
            publishes: output("publish"),
            state_writes: output("state_write"),
            batch_seconds: metrics::histogram!("sluice_rule_batch_seconds", "rule" => rule.to_owned()),
            stored: outcome("stored"),
            dropped: outcome("dropped"),
            dead_letter: outcome("dead_letter"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum OutputKind {
    Point,
    Event,
    Publish,
    StateWrite,
}

/// Counters of one rule since it was loaded (or the server started).
pub struct RuleStats {
    name: Arc<str>,
    pub metrics: RuleMetrics,
    pub invocations: AtomicU64,
    pub messages_in: AtomicU64,
    pub stored: AtomicU64,
    pub dropped: AtomicU64,
    pub dead_letters: AtomicU64,
    pub points: AtomicU64,
    pub events: AtomicU64,
    pub publishes: AtomicU64,
    pub state_writes: AtomicU64,
    consecutive_failures: AtomicU32,
    consecutive_timeouts: AtomicU32,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Batch call time in microseconds (1 µs .. 60 s, 2 significant digits).
    batch_micros: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Why, since when, and the version that was suspended.
    status: Mutex<Option<(String, DateTime<Utc>, u64)>>,
}

/// A read-out of [`RuleStats`] for the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleStatsSnapshot {
    pub invocations: u64,
    pub messages_in: u64,
    pub stored: u64,
    pub dropped: u64,
    pub dead_letters: u64,
    pub points: u64,
    pub events: u64,
    pub publishes: u64,
    pub state_writes: u64,
    pub failures: BTreeMap<String, u64>,
    pub batch_p50: Duration,
    pub batch_p99: Duration,
}

impl RuleStats {
    pub fn named(name: Arc<str>) -> Self {
        Self {
            metrics: RuleMetrics::new(&name),
            name,
            invocations: AtomicU64::default(),
            messages_in: AtomicU64::default(),
            stored: AtomicU64::default(),
            dropped: AtomicU64::default(),
            dead_letters: AtomicU64::default(),
            points: AtomicU64::default(),
            events: AtomicU64::default(),
            publishes: AtomicU64::default(),
            state_writes: AtomicU64::default(),
            consecutive_failures: AtomicU32::default(),
            consecutive_timeouts: AtomicU32::default(),
            failures: Mutex::default(),
            batch_micros: Mutex::default(),
            status: Mutex::default(),
        }
    }

    /// Counts `n` messages handed to the rule.
    pub fn add_messages_in(&self, n: u64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
        self.metrics.messages_in.increment(n);
    }

    /// Counts outputs of one kind.
    pub fn add_outputs(&self, kind: OutputKind, n: u64) {
        let (total, counter) = match kind {
            OutputKind::Point => (&self.points, &self.metrics.points),
            OutputKind::Event => (&self.events, &self.metrics.events),
            OutputKind::Publish => (&self.publishes, &self.metrics.publishes),
            OutputKind::StateWrite => (&self.state_writes, &self.metrics.state_writes),
        };
        total.fetch_add(n, Ordering::Relaxed);
        counter.increment(n);
    }

    /// `sluice_rule_suspended{rule}`: 1 while the rule is suspended.
    fn publish_status(&self, suspended: bool) {
        metrics::gauge!("sluice_rule_suspended", "rule" => self.name.to_string())
            .set(if suspended { 1.0 } else { 0.0 });
    }

    pub fn record_batch(&self, elapsed: Duration) {
        let mut h = self.batch_micros.lock().unwrap_or_else(|e| e.into_inner());
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
        });
        h.saturating_record(elapsed.as_micros().clamp(1, 60_000_000) as u64);
    }

    pub fn status(&self) -> RuleStatus {
        match &*self.status.lock().unwrap_or_else(|e| e.into_inner()) {
            None => RuleStatus::Active,
            Some((reason, since, _)) => RuleStatus::Suspended {
                reason: reason.clone(),
                since: *since,
            },
        }
    }

    /// The suspension reason if `version` of the rule is suspended. A rule
    /// suspended at another version was deployed since: that clears it.
    pub fn suspension(&self, version: u64) -> Option<String> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &*status {
            Some((reason, _, v)) if *v == version => Some(reason.clone()),
            Some(_) => {
                *status = None;
                self.record_success();
                self.publish_status(false);
                None
            }
            None => None,
        }
    }

    /// Counts a guest failure of `version`; returns true when this one
    /// crossed a threshold of `policy` and suspended the rule.
    pub fn record_failure(
        &self,
        kind: &'static str,
        error: &str,
        policy: SuspendPolicy,
        version: u64,
    ) -> bool {
        *self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let timeouts = if kind == "timeout" {
            self.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        let crossed = |count: u32, limit: u32| limit > 0 && count >= limit;
        if !crossed(n, policy.after_failures) && !crossed(timeouts, policy.after_timeouts) {
            return false;
        }
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.is_some() {
            return false;
        }
        *status = Some((
            format!("suspended after {n} failed calls in a row; the last: {error}"),
            Utc::now(),
            version,
        ));
        self.publish_status(true);
        true
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_timeouts.store(0, Ordering::Relaxed);
    }

    /// Back to active (a new version was deployed, or the rule was enabled).
    pub fn resume(&self) {
        self.record_success();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.publish_status(false);
    }

    pub fn snapshot(&self) -> RuleStatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (p50, p99) = match &*self.batch_micros.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(h) if !h.is_empty() => (h.value_at_quantile(0.5), h.value_at_quantile(0.99)),
            _ => (0, 0),
        };
        RuleStatsSnapshot {
            invocations: load(&self.invocations),
            messages_in: load(&self.messages_in),
            stored: load(&self.stored),
            dropped: load(&self.dropped),
            dead_letters: load(&self.dead_letters),
            points: load(&self.points),
            events: load(&self.events),
            publishes: load(&self.publishes),
            state_writes: load(&self.state_writes),
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            batch_p50: Duration::from_micros(p50),
            batch_p99: Duration::from_micros(p99),
        }
    }
}

/// Every rule's [`RuleStats`], by name.
#[derive(Default)]
pub struct RuleMonitor {
    rules: DashMap<Arc<str>, Arc<RuleStats>>,
}

impl RuleMonitor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn stats(&self, rule: &Arc<str>) -> Arc<RuleStats> {
        if let Some(s) = self.rules.get(rule) {
            return s.clone();
        }
        self.rules
            .entry(rule.clone())
            .or_insert_with(|| Arc::new(RuleStats::named(rule.clone())))
            .clone()
    }

    pub fn get(&self, rule: &str) -> Option<Arc<RuleStats>> {
        self.rules.get(rule).map(|s| s.clone())
    }

    /// A rule was (re)deployed or enabled: clear its suspension.
    pub fn resume(&self, rule: &str) {
        if let Some(s) = self.rules.get(rule) {
            s.resume();
        }
    }

    /// A rule was deleted: forget its counters.
    pub fn remove(&self, rule: &str) {
        self.rules.remove(rule);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: SuspendPolicy = SuspendPolicy {
        after_failures: 3,
        after_timeouts: 0,
    };

    #[test]
    fn suspends_after_consecutive_failures_only() {
        let stats = RuleStats::named("test".into());
        assert!(!stats.record_failure("trap", "boom", THREE, 7));
        assert!(!stats.record_failure("trap", "boom", THREE, 7));
        stats.record_success();
        assert!(!stats.record_failure("trap", "boom", THREE, 7));
        assert!(!stats.record_failure("trap", "boom", THREE, 7));
        assert!(stats.record_failure("timeout", "too slow", THREE, 7));
        assert!(stats.suspension(7).is_some());
        match stats.status() {
            RuleStatus::Suspended { reason, .. } => {
                assert!(reason.contains("3 failed calls"), "{reason}");
                assert!(reason.contains("too slow"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(stats.snapshot().failures["trap"], 4);
        stats.resume();
        assert_eq!(stats.status(), RuleStatus::Active);
        // A new version is not held to the old one's suspension.
        for _ in 0..3 {
            stats.record_failure("trap", "boom", THREE, 7);
        }
        assert_eq!(stats.suspension(8), None);
        assert_eq!(stats.status(), RuleStatus::Active);
    }

    #[test]
    fn timeouts_have_their_own_threshold() {
        let stats = RuleStats::named("test".into());
        let policy = SuspendPolicy::default();
        assert!(!stats.record_failure("timeout", "slow", policy, 1));
        assert!(!stats.record_failure("trap", "boom", policy, 1));
        assert!(stats.record_failure("timeout", "slow", policy, 1));
    }

    #[test]
    fn batch_percentiles() {
        let stats = RuleStats::named("test".into());
        for us in 1..=100 {
            stats.record_batch(Duration::from_micros(us));
        }
        let s = stats.snapshot();
        assert!((49..=51).contains(&s.batch_p50.as_micros()), "{s:?}");
        assert!((98..=100).contains(&s.batch_p99.as_micros()), "{s:?}");
    }
}
