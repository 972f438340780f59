//! Per-connection limits: a publish rate limit and topic syntax and size
//! checks.

use std::time::{Duration, Instant};

/// Longest interval between tokens: rates below one per day are treated as
/// one per day (keeps every `Instant` computation far from overflow).
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// Per-connection publish rate limit (token bucket). Over the rate the
/// connection is throttled (the caller sleeps for the returned duration
/// before reading more), never dropped.
///
/// The bucket holds up to `burst` tokens, starts full and refills at
/// `rate_per_second`. It is kept as the time at which the bucket would next
/// be full ("theoretical arrival time"), so there is no floating point drift.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// `None`: unlimited.
    limit: Option<Limit>,
}

#[derive(Debug, Clone)]
struct Limit {
    /// Time to refill one token.
    interval: Duration,
    /// Time to refill the whole bucket: `burst × interval`.
    window: Duration,
    /// When the bucket will be full again if nothing more is taken. At or
    /// before `now` means full; more than `window` after `now` means debt.
    full_at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilling at `rate_per_second`.
    ///
    /// `rate_per_second <= 0` (or NaN, or infinite) means unlimited. `burst`
    /// is at least 1 (0 is treated as 1).
    pub fn new(rate_per_second: f64, burst: u32, now: Instant) -> Self {
        if !(rate_per_second > 0.0 && rate_per_second.is_finite()) {
            return Self { limit: None };
        }
        let interval = Duration::try_from_secs_f64(rate_per_second.recip())
            .unwrap_or(MAX_INTERVAL)
            .clamp(Duration::from_nanos(1), MAX_INTERVAL);
        let window = interval.saturating_mul(burst.max(1));
        Self {
            limit: Some(Limit {
                interval,
                window,
                full_at: now,
            }),
        }
    }

    /// A bucket that never throttles.
    pub fn unlimited() -> Self {
        Self { limit: None }
    }

    /// Whether this bucket never throttles.
    pub fn is_unlimited(&self) -> bool {
        self.limit.is_none()
    }

    /// Takes one token. Returns `None` if one was available, or `Some(wait)`:
    /// how long until the token taken would have been available. The token is
    /// still taken (the bucket goes into debt), so the caller just sleeps that
    /// long and carries on.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let limit = self.limit.as_mut()?;
        let from = limit.full_at.max(now);
        limit.full_at = from.checked_add(limit.interval).unwrap_or(from);
        let wait = limit
            .full_at
            .saturating_duration_since(now)
            .saturating_sub(limit.window);
        (!wait.is_zero()).then_some(wait)
    }
}

/// Limits on topic names and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Longest topic name or filter, in bytes of UTF-8.
    pub max_bytes: usize,
    /// Most levels (`a/b/c` has 3).
    pub max_levels: usize,
}

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes long, over the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("topic has {levels} levels, over the limit of {max} levels")]
    TooManyLevels { levels: usize, max: usize },
    #[error(
        "topic name contains a wildcard ('+' or '#'); wildcards are only allowed in subscription filters"
    )]
    Wildcard,
    #[error("topic contains a NUL character (U+0000)")]
    Nul,
    #[error("invalid topic filter: {0}")]
    InvalidFilter(&'static str),
}

/// Empty, length, NUL and level count checks shared by names and filters.
fn check_common(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limits.max_bytes {
        return Err(TopicError::TooLong {
            len: topic.len(),
            max: limits.max_bytes,
        });
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    let levels = topic.bytes().filter(|&b| b == b'/').count() + 1;
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: limits.max_levels,
        });
    }
    Ok(())
}

/// For PUBLISH topic names: non-empty, no `+` or `#`, no U+0000, within
/// `limits`.
pub fn check_topic_name(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(topic, limits)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// For SUBSCRIBE filters: non-empty, `#` only as the whole last level, `+`
/// only as a whole level, no U+0000, within `limits`.
pub fn check_topic_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::InvalidFilter(
                "'#' must be the whole last level",
            ));
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::InvalidFilter("'+' must be a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_then_wait_amounts() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        assert!(!bucket.is_unlimited());
        // The burst is free.
        assert_eq!(bucket.take(t0), None);
        assert_eq!(bucket.take(t0), None);
        assert_eq!(bucket.take(t0), None);
        // Then each token costs another 100 ms of debt.
        assert_eq!(bucket.take(t0), Some(100 * MS));
        assert_eq!(bucket.take(t0), Some(200 * MS));
        assert_eq!(bucket.take(t0), Some(300 * MS));
        // The caller slept 300 ms: the debt is paid, the next one waits 100 ms.
        let t1 = t0 + 300 * MS;
        assert_eq!(bucket.take(t1), Some(100 * MS));
        // Sleeping exactly the returned wait each time gives the rate.
        let mut now = t1 + 100 * MS;
        for _ in 0..10 {
            let wait = bucket.take(now).expect("still throttled");
            assert_eq!(wait, 100 * MS);
            now += wait;
        }
    }

    #[test]
    fn refill_over_time() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 4, t0);
        for _ in 0..4 {
            assert_eq!(bucket.take(t0), None);
        }
        assert_eq!(bucket.take(t0), Some(500 * MS));
        // 1.5 s later: the debt of one token is repaid and two are back.
        let t1 = t0 + 1500 * MS;
        assert_eq!(bucket.take(t1), None);
        assert_eq!(bucket.take(t1), None);
        assert_eq!(bucket.take(t1), Some(500 * MS));
        // 200 ms later the token owed above is still 300 ms away, and the
        // next one is another 500 ms after it.
        assert_eq!(bucket.take(t1 + 200 * MS), Some(800 * MS));

        // A long idle period refills to `burst`, never beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..4 {
            assert_eq!(bucket.take(t2), None);
        }
        assert_eq!(bucket.take(t2), Some(500 * MS));

        // Steady traffic at exactly the rate is never throttled.
        let t3 = t2 + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(2.0, 1, t3);
        for i in 0..100 {
            assert_eq!(bucket.take(t3 + i * 500 * MS), None, "take {i}");
        }
    }

    #[test]
    fn fractional_rates_and_burst_zero() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.5, 0, t0); // burst 0 acts as 1
        assert_eq!(bucket.take(t0), None);
        assert_eq!(bucket.take(t0), Some(Duration::from_secs(2)));
        assert_eq!(bucket.take(t0 + Duration::from_secs(4)), None);

        // Non-integral intervals (1/3 s) stay close to exact.
        let mut bucket = TokenBucket::new(3.0, 1, t0);
        assert_eq!(bucket.take(t0), None);
        let wait = bucket.take(t0).unwrap();
        assert!(wait.abs_diff(Duration::from_secs(1) / 3) < Duration::from_micros(1));
        assert_eq!(bucket.take(t0 + Duration::from_secs(2)), None);

        // Absurdly low rates are capped at one per day instead of overflowing.
        let mut bucket = TokenBucket::new(1e-300, 1, t0);
        assert_eq!(bucket.take(t0), None);
        assert_eq!(bucket.take(t0), Some(MAX_INTERVAL));
        // Absurdly high rates are effectively unlimited.
        let mut bucket = TokenBucket::new(1e300, 1, t0);
        for _ in 0..1000 {
            assert!(
                bucket
                    .take(t0)
                    .is_none_or(|w| w <= Duration::from_micros(1))
            );
        }
    }

    #[test]
    fn unlimited() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut bucket = TokenBucket::new(rate, 1, t0);
            assert!(bucket.is_unlimited(), "rate {rate}");
            for _ in 0..10_000 {
                assert_eq!(bucket.take(t0), None);
            }
        }
        let mut bucket = TokenBucket::unlimited();
        assert_eq!(bucket.take(t0), None);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut bucket = TokenBucket::new(10.0, 1, t1);
        assert_eq!(bucket.take(t1), None);
        // An earlier `now` (e.g. captured before a wait by another task) only
        // lengthens the wait; nothing panics or underflows.
        assert_eq!(bucket.take(t0), Some(Duration::from_secs(1) + 100 * MS));
    }

    const LIMITS: TopicLimits = TopicLimits {
        max_bytes: 16,
        max_levels: 4,
    };

    #[test]
    fn topic_names() {
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("devices/d1/t", Ok(())),
            ("/", Ok(())),
            ("a//b", Ok(())),
            ("$sluice/x", Ok(())),
            ("a/b/c/d", Ok(())),
            ("0123456789abcdef", Ok(())),
            ("", Err(TopicError::Empty)),
            (
                "0123456789abcdefg",
                Err(TopicError::TooLong { len: 17, max: 16 }),
            ),
            // Length is in bytes: 8 × 'é' is 16 bytes, 9 is 18.
            ("éééééééé", Ok(())),
            ("ééééééééé", Err(TopicError::TooLong { len: 18, max: 16 })),
            (
                "a/b/c/d/e",
                Err(TopicError::TooManyLevels { levels: 5, max: 4 }),
            ),
            ("////", Err(TopicError::TooManyLevels { levels: 5, max: 4 })),
            ("a/+", Err(TopicError::Wildcard)),
            ("a/#", Err(TopicError::Wildcard)),
            ("a+b", Err(TopicError::Wildcard)),
            ("#", Err(TopicError::Wildcard)),
            ("a\0b", Err(TopicError::Nul)),
        ];
        for (topic, expected) in cases {
            assert_eq!(&check_topic_name(topic, LIMITS), expected, "{topic:?}");
        }
    }

    #[test]
    fn topic_filters() {
        let hash = TopicError::InvalidFilter("'#' must be the whole last level");
        let plus = TopicError::InvalidFilter("'+' must be a whole level");
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("a/#", Ok(())),
            ("+/+/#", Ok(())),
            ("a/+/c", Ok(())),
            ("/#", Ok(())),
            ("+//+", Ok(())),
            ("$sluice/+", Ok(())),
            ("", Err(TopicError::Empty)),
            (
                "0123456789abcdefg",
                Err(TopicError::TooLong { len: 17, max: 16 }),
            ),
            (
                "+/+/+/+/#",
                Err(TopicError::TooManyLevels { levels: 5, max: 4 }),
            ),
            ("a/#/b", Err(hash.clone())),
            ("#/a", Err(hash.clone())),
            ("a#", Err(hash.clone())),
            ("a/b#", Err(hash.clone())),
            ("##", Err(hash.clone())),
            ("a+", Err(plus.clone())),
            ("a/+b", Err(plus.clone())),
            ("++", Err(plus.clone())),
            ("a\0", Err(TopicError::Nul)),
        ];
        for (filter, expected) in cases {
            assert_eq!(&check_topic_filter(filter, LIMITS), expected, "{filter:?}");
        }
    }

    #[test]
    fn error_messages() {
        let cases = [
            (TopicError::Empty, "topic is empty"),
            (
                TopicError::TooLong { len: 300, max: 256 },
                "topic is 300 bytes long, over the limit of 256 bytes",
            ),
            (
                TopicError::TooManyLevels { levels: 9, max: 8 },
                "topic has 9 levels, over the limit of 8 levels",
            ),
            (
                TopicError::Wildcard,
                "topic name contains a wildcard ('+' or '#'); wildcards are only allowed in subscription filters",
            ),
            (TopicError::Nul, "topic contains a NUL character (U+0000)"),
            (
                TopicError::InvalidFilter("'+' must be a whole level"),
                "invalid topic filter: '+' must be a whole level",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
