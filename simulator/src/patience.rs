//! How long `--verify` and `--latency` wait for stored points after a run.
//!
//! Points arrive a little after their acknowledgement (rules, writer batch,
//! commit), and after a load run there may be a backlog to drain. Waiting
//! stops when everything sent is seen; else when nothing new arrived for
//! [`STABLE_FOR`], but only if the missing messages may legitimately never
//! arrive (QoS 0, or unacknowledged QoS 1): an acknowledged QoS 1 message
//! is durable at the broker, so it is waited for until the deadline rather
//! than called lost while a backlog pauses. `--verify-timeout-secs` bounds
//! it all.

use std::time::Duration;

use tokio::time::Instant;

/// No growth for this long ends the wait (when nothing must still arrive).
pub const STABLE_FOR: Duration = Duration::from_secs(3);
/// Between two looks at the count.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Patience {
    deadline: Instant,
    last_growth: Instant,
    last_count: u64,
}

/// What the waiter sees at one look.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Points seen so far (anything that tells the pipeline is moving).
    pub count: u64,
    /// Everything expected was seen.
    pub complete: bool,
    /// Some of what is missing was acknowledged, so it must still arrive.
    pub must_arrive: bool,
}

impl Patience {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Patience {
            deadline: now + timeout,
            last_growth: now,
            last_count: 0,
        }
    }

    /// Whether to look again after this look at `now`.
    pub fn keep_waiting(&mut self, seen: Progress, now: Instant) -> bool {
        if seen.complete || now >= self.deadline {
            return false;
        }
        if seen.count > self.last_count {
            self.last_count = seen.count;
            self.last_growth = now;
            return true;
        }
        seen.must_arrive || now - self.last_growth < STABLE_FOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(count: u64, complete: bool, must_arrive: bool) -> Progress {
        Progress {
            count,
            complete,
            must_arrive,
        }
    }

    #[test]
    fn stops_when_complete_or_at_the_deadline() {
        let t0 = Instant::now();
        let mut p = Patience::new(Duration::from_secs(30), t0);
        assert!(!p.keep_waiting(look(5, true, true), t0));
        let mut p = Patience::new(Duration::from_secs(30), t0);
        assert!(p.keep_waiting(look(5, false, true), t0 + Duration::from_secs(29)));
        assert!(!p.keep_waiting(look(6, false, true), t0 + Duration::from_secs(30)));
    }

    #[test]
    fn a_stalled_count_ends_the_wait_only_when_nothing_must_arrive() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut p = Patience::new(Duration::from_secs(30), t0);
        assert!(p.keep_waiting(look(10, false, false), s(1)));
        assert!(p.keep_waiting(look(10, false, false), s(3)));
        assert!(p.keep_waiting(look(11, false, false), s(3)), "it grew");
        assert!(!p.keep_waiting(look(11, false, false), s(6)));

        let mut p = Patience::new(Duration::from_secs(30), t0);
        assert!(p.keep_waiting(look(10, false, true), s(1)));
        assert!(
            p.keep_waiting(look(10, false, true), s(20)),
            "acked: keep waiting"
        );
        assert!(!p.keep_waiting(look(10, false, true), s(30)));
    }

    #[test]
    fn a_zero_timeout_looks_once() {
        let t0 = Instant::now();
        let mut p = Patience::new(Duration::ZERO, t0);
        assert!(!p.keep_waiting(look(0, false, true), t0));
    }
}
