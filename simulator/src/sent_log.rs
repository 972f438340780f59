//! When each device published each of its recent messages, for `--latency`.
//!
//! Publish → stored latency could be measured against the payload's `ts`,
//! which Sluice stores as the point's time. But `ts` is in whole
//! milliseconds (up to 1 ms of error on latencies of a few ms), and above
//! 1000 msg/s per device it runs ahead of the clock (each message is 1 ms
//! after the previous one), which would understate the latency. So each
//! device records the monotonic time at which it published each `seq`, and
//! the subscriber looks the stored point up here: exact, and free of any
//! wall-clock step during the run.
//!
//! Memory is bounded: each device keeps its last [`SentLog::capacity`]
//! entries (a ring), enough for minutes of lag at ordinary rates. A point
//! whose entry was already overwritten is not sampled, and counted as such.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Entries kept over all devices (8 bytes each: 32 MiB).
const TOTAL_ENTRIES: usize = 4 << 20;
/// ... but at least this many per device, however large the fleet.
const MIN_PER_DEVICE: usize = 1024;
/// Marks an entry whose point was already seen (a duplicate is not sampled twice).
const TAKEN: u64 = u64::MAX;

/// The publish times of every device's recent messages.
#[derive(Debug)]
pub struct SentLog {
    start: Instant,
    capacity: usize,
    devices: Vec<Mutex<Ring>>,
}

/// One device's recent publish times, indexed by `seq`.
#[derive(Debug, Default)]
struct Ring {
    /// `seq` of `times[0]`.
    first: u64,
    /// Microseconds since the log's start, or [`TAKEN`].
    times: VecDeque<u64>,
}

/// What a stored point's lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Published that long before it was seen stored.
    Latency(Duration),
    /// Seen before: a duplicate.
    Repeated,
    /// Never recorded, or forgotten already.
    Unknown,
}

impl SentLog {
    pub fn new(devices: u32, start: Instant) -> Self {
        let capacity = (TOTAL_ENTRIES / devices.max(1) as usize).max(MIN_PER_DEVICE);
        Self::with_capacity(devices, start, capacity)
    }

    fn with_capacity(devices: u32, start: Instant, capacity: usize) -> Self {
        SentLog {
            start,
            capacity,
            devices: (0..devices).map(|_| Mutex::default()).collect(),
        }
    }

    /// Entries kept per device.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Device `device` publishes `seq` now. A device's seqs come in order.
    pub fn record(&self, device: u32, seq: u64) {
        self.record_at(device, seq, Instant::now());
    }

    fn record_at(&self, device: u32, seq: u64, at: Instant) {
        let Some(ring) = self.devices.get(device as usize) else {
            return;
        };
        let micros = u64::try_from(at.saturating_duration_since(self.start).as_micros())
            .unwrap_or(TAKEN - 1)
            .min(TAKEN - 1);
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.times.is_empty() || ring.first + ring.times.len() as u64 != seq {
            // The first message, or (never in practice) a gap: start afresh.
            ring.times.clear();
            ring.first = seq;
        }
        if ring.times.len() == self.capacity {
            ring.times.pop_front();
            ring.first += 1;
        }
        ring.times.push_back(micros);
    }

    /// Device `device`'s message `seq` was seen stored at `seen`.
    pub fn take(&self, device: u32, seq: u64, seen: Instant) -> Lookup {
        let Some(ring) = self.devices.get(device as usize) else {
            return Lookup::Unknown;
        };
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(offset) = seq.checked_sub(ring.first) else {
            return Lookup::Unknown;
        };
        let Some(entry) = usize::try_from(offset)
            .ok()
            .and_then(|i| ring.times.get_mut(i))
        else {
            return Lookup::Unknown;
        };
        if *entry == TAKEN {
            return Lookup::Repeated;
        }
        let sent = self.start + Duration::from_micros(*entry);
        *entry = TAKEN;
        Lookup::Latency(seen.saturating_duration_since(sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_timed_against_its_own_publish_once() {
        let start = Instant::now();
        let log = SentLog::with_capacity(2, start, 4);
        let ms = Duration::from_millis;
        for seq in 0..3 {
            log.record_at(1, seq, start + ms(10 * seq));
        }
        assert_eq!(log.take(1, 1, start + ms(25)), Lookup::Latency(ms(15)));
        assert_eq!(log.take(1, 1, start + ms(26)), Lookup::Repeated);
        assert_eq!(
            log.take(1, 3, start + ms(26)),
            Lookup::Unknown,
            "not sent yet"
        );
        assert_eq!(log.take(0, 0, start), Lookup::Unknown, "another device");
        assert_eq!(log.take(9, 0, start), Lookup::Unknown, "no such device");
        // A clock that saw the point "before" the publish gives 0, not a panic.
        assert_eq!(log.take(1, 2, start), Lookup::Latency(Duration::ZERO));
    }

    #[test]
    fn the_ring_forgets_the_oldest() {
        let start = Instant::now();
        let log = SentLog::with_capacity(1, start, 4);
        for seq in 0..10 {
            log.record_at(0, seq, start);
        }
        assert_eq!(log.take(0, 5, start), Lookup::Unknown);
        assert!(matches!(log.take(0, 6, start), Lookup::Latency(_)));
        assert!(matches!(log.take(0, 9, start), Lookup::Latency(_)));
    }

    #[test]
    fn memory_is_bounded_for_large_fleets() {
        let start = Instant::now();
        assert_eq!(SentLog::new(1, start).capacity(), TOTAL_ENTRIES);
        assert_eq!(SentLog::new(100_000, start).capacity(), MIN_PER_DEVICE);
    }
}
