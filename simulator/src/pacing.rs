//! Pacing of one device's publishing.
//!
//! A benchmark run at `--rate R` must average R messages per second per
//! device over the whole run, even though a single publish may be delayed by
//! back-pressure (full request channel, full inflight window) or by the
//! timer's millisecond granularity. The schedule is therefore absolute: the
//! k-th message (from 0) is due at `start + k / R`, which is what a tokio
//! interval with [`MissedTickBehavior::Burst`] implements. Messages that
//! fell behind are sent as soon as possible — each still waits for room in
//! the bounded request channel, so the catch-up is throttled by the broker
//! rather than dumped into memory — instead of being skipped, which would
//! make long runs undershoot the target.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Time between two messages at `rate` messages per second, or `None` when
/// `rate` is 0 (publish as fast as possible). Never returns a zero period,
/// which tokio's interval rejects.
pub fn period(rate: f64) -> Option<Duration> {
    if rate <= 0.0 || !rate.is_finite() {
        return None;
    }
    let p = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX);
    Some(p.max(Duration::from_nanos(1)))
}

/// The ticker a device waits on before each message: `None` when unpaced.
/// The first tick completes at `start`.
pub fn ticker(rate: f64, start: Instant) -> Option<Interval> {
    period(rate).map(|p| {
        let mut interval = tokio::time::interval_at(start, p);
        interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
        interval
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference model of the schedule the tokio interval must follow.

    /// Offset from the start of the run at which the `k`-th message (from 0) is
    /// due, for messages every `period`. Computed without accumulating rounding.
    fn due_offset(k: u64, period: Duration) -> Duration {
        let nanos = period.as_nanos().saturating_mul(u128::from(k));
        let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, (nanos % 1_000_000_000) as u32)
    }

    /// Number of messages an on-schedule device has sent `elapsed` after the
    /// start (the first one goes out at once), optionally capped at `count`.
    fn messages_due(elapsed: Duration, period: Duration, count: Option<u64>) -> u64 {
        let due = (elapsed.as_nanos() / period.as_nanos().max(1)).saturating_add(1);
        let due = u64::try_from(due).unwrap_or(u64::MAX);
        count.map_or(due, |c| due.min(c))
    }

    #[test]
    fn period_of_common_rates() {
        assert_eq!(period(1.0), Some(Duration::from_secs(1)));
        assert_eq!(period(4.0), Some(Duration::from_millis(250)));
        assert_eq!(period(0.5), Some(Duration::from_secs(2)));
        assert_eq!(period(1000.0), Some(Duration::from_millis(1)));
    }

    #[test]
    fn rate_zero_is_unpaced_and_extremes_do_not_panic() {
        assert_eq!(period(0.0), None);
        assert_eq!(period(f64::NAN), None);
        assert_eq!(period(f64::INFINITY), None);
        assert_eq!(period(1e300), Some(Duration::from_nanos(1)));
        assert_eq!(period(1e-300), Some(Duration::MAX));
        let _ = due_offset(u64::MAX, Duration::MAX);
        let _ = messages_due(Duration::MAX, Duration::from_nanos(1), None);
    }

    #[test]
    fn schedule_is_absolute() {
        let p = period(4.0).unwrap();
        assert_eq!(due_offset(0, p), Duration::ZERO);
        assert_eq!(due_offset(1, p), Duration::from_millis(250));
        assert_eq!(due_offset(10, p), Duration::from_millis(2500));
    }

    #[test]
    fn long_runs_hit_the_target_average() {
        // Periods that are not a whole number of nanoseconds: rounding to
        // the nearest nanosecond is the only error, so the schedule drifts
        // by at most 0.5 ns per message, far below a visible rate error.
        let day = Duration::from_secs(86_400);
        for rate in [3.0, 7.0, 0.3, 1234.5, 33_333.0] {
            let p = period(rate).unwrap();
            let n = (rate * day.as_secs_f64()).round() as u64;
            let drift = due_offset(n, p).as_secs_f64() - day.as_secs_f64();
            let rel = drift.abs() / day.as_secs_f64();
            let bound = 0.5e-9 / p.as_secs_f64() + 1e-12;
            assert!(rel <= bound, "rate {rate}: drift {drift} s per day");
            if rate <= 1000.0 {
                assert!(rel < 1e-6, "rate {rate}: drift {drift} s per day");
            }
            // And the count due by the end of the day matches within one
            // message of rounding.
            let due = messages_due(day, p, None) as f64 - 1.0;
            assert!(
                (due - rate * 86_400.0).abs() <= 1.0 + bound * due,
                "rate {rate}: {due}"
            );
        }
    }

    #[test]
    fn messages_due_counts_the_first_message_at_start_and_caps() {
        let p = Duration::from_millis(100);
        assert_eq!(messages_due(Duration::ZERO, p, None), 1);
        assert_eq!(messages_due(Duration::from_millis(99), p, None), 1);
        assert_eq!(messages_due(Duration::from_millis(100), p, None), 2);
        assert_eq!(messages_due(Duration::from_secs(5), p, None), 51);
        assert_eq!(messages_due(Duration::from_secs(5), p, Some(20)), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn ticker_catches_up_after_a_stall() {
        let p = period(10.0).unwrap();
        let start = Instant::now();
        let mut t = ticker(10.0, start).unwrap();
        assert_eq!(t.tick().await, start);
        let mut fired = 1;
        // Stall for 1 s: the 10 ticks missed meanwhile must complete at
        // once, not be dropped, so the run still averages the target rate.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stall_end = Instant::now();
        for k in 1..=10 {
            assert_eq!(t.tick().await, start + due_offset(k, p));
            assert_eq!(Instant::now(), stall_end);
            fired += 1;
        }
        // Then back on the original schedule.
        let end = start + Duration::from_secs(2);
        loop {
            let scheduled = t.tick().await;
            if scheduled > end {
                break;
            }
            assert!(Instant::now() - scheduled < Duration::from_millis(2));
            fired += 1;
        }
        assert_eq!(fired, messages_due(Duration::from_secs(2), p, None));
    }

    #[test]
    fn no_ticker_when_unpaced() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async { assert!(ticker(0.0, Instant::now()).is_none()) });
    }
}
