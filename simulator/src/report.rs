//! The result of a whole run: the summary, and what `--verify` and
//! `--latency` found; its text and JSON forms and the exit status.

use std::fmt;
use std::time::Duration;

use crate::stats::Summary;
use crate::stored_latency::StoredLatency;
use crate::verify::Verification;

/// Exit status of a failed run (missing acks, a read-back that failed).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status when `--verify` found acknowledged QoS 1 messages missing.
pub const EXIT_LOST: u8 = 4;
/// Devices listed by name in the text summary's verify section.
const WORST_SHOWN: usize = 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub summary: Summary,
    /// With `--verify` (unless reading back failed: see `failures`).
    pub verify: Option<Verification>,
    /// With `--latency` (unless the stream could not be opened).
    pub stored_latency: Option<StoredLatency>,
    /// What went wrong besides the counters: a crashed device task, a
    /// read-back the API refused. Each fails the run.
    pub failures: Vec<String>,
    /// The run's `--drain-timeout-secs`, for the missing-acks message.
    pub drain_timeout: Duration,
}

impl Report {
    /// The process exit status this run deserves (see `--help`).
    pub fn exit_status(&self) -> u8 {
        if self.verify.as_ref().is_some_and(|v| v.lost > 0) {
            EXIT_LOST
        } else if self.summary.missing_acks() > 0 || !self.failures.is_empty() {
            EXIT_FAILURE
        } else {
            0
        }
    }

    /// One line per problem, for standard error.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let missing = self.summary.missing_acks();
        if missing > 0 {
            out.push(format!(
                "{missing} of {} QoS 1 messages were not acknowledged (drain timeout {:.1} s)",
                self.summary.sent,
                self.drain_timeout.as_secs_f64()
            ));
        }
        if let Some(v) = self.verify.as_ref().filter(|v| v.lost > 0) {
            out.push(format!(
                "{} QoS 1 messages the broker acknowledged were not stored (--verify)",
                v.lost
            ));
        }
        out.extend(self.failures.iter().cloned());
        out
    }

    /// The summary as one JSON object (`--json`): the summary's keys, plus
    /// `verify` and `stored_latency_ms` when asked for.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.summary.to_json();
        if let Some(object) = json.as_object_mut() {
            if let Some(v) = &self.verify {
                object.insert("verify".into(), v.to_json());
            }
            if let Some(l) = &self.stored_latency {
                object.insert("stored_latency_ms".into(), l.to_json());
            }
        }
        json
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary)?;
        if let Some(l) = &self.stored_latency {
            match l.latency {
                Some(p) => write!(
                    f,
                    "\nstored latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                    p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, l.count
                )?,
                None => write!(f, "\nstored latency: no samples")?,
            }
            if l.unmatched > 0 {
                write!(
                    f,
                    "\n                {} points not timed (their publish time was forgotten)",
                    l.unmatched
                )?;
            }
            if l.gap > 0 {
                write!(
                    f,
                    "\n                the subscriber fell behind and missed {} items",
                    l.gap
                )?;
            }
        }
        if let Some(v) = &self.verify {
            write!(
                f,
                "\nverify:         {} of {} messages stored ({} missing, {} duplicates, {} unexpected) \
                 read back in {:.1} s",
                v.received,
                v.expected,
                v.missing,
                v.duplicates,
                v.unexpected,
                v.waited.as_secs_f64()
            )?;
            if v.lost > 0 {
                write!(f, "\n                {} acknowledged messages lost", v.lost)?;
            }
            let worst = v.worst(WORST_SHOWN);
            if !worst.is_empty() {
                write!(f, "\nworst devices:")?;
                for d in worst {
                    write!(
                        f,
                        "\n  {}: {} missing, {} duplicates, {} unexpected of {} sent",
                        d.id, d.missing, d.duplicates, d.unexpected, d.expected
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Latency, Snapshot};
    use crate::verify::DeviceCheck;

    fn summary(sent: u64, acked: u64) -> Summary {
        let counters = Snapshot {
            sent,
            acked,
            ..Snapshot::default()
        };
        Summary::new(2, 1, 5, counters, Duration::from_secs(1))
    }

    fn verification(missing: u64, lost: u64, duplicates: u64) -> Verification {
        let device = |id: &str, missing| DeviceCheck {
            id: id.into(),
            expected: 10,
            received: 10 - missing,
            missing,
            duplicates: 0,
            unexpected: 0,
        };
        Verification {
            expected: 20,
            received: 20 - missing,
            missing,
            duplicates,
            unexpected: 0,
            lost,
            complete: missing == 0,
            waited: Duration::from_millis(200),
            devices: vec![device("a", 0), device("b", missing)],
        }
    }

    fn report(summary: Summary, verify: Option<Verification>) -> Report {
        Report {
            summary,
            verify,
            stored_latency: None,
            failures: Vec::new(),
            drain_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn exit_status_follows_the_documented_precedence() {
        assert_eq!(report(summary(20, 20), None).exit_status(), 0);
        assert_eq!(report(summary(20, 19), None).exit_status(), EXIT_FAILURE);
        let lost = report(summary(20, 19), Some(verification(3, 2, 0)));
        assert_eq!(lost.exit_status(), EXIT_LOST, "loss beats missing acks");
        assert_eq!(lost.problems().len(), 2);
        // Missing but never acknowledged (QoS 0 or no ack): reported only.
        let unacked = report(summary(20, 20), Some(verification(3, 0, 0)));
        assert_eq!(unacked.exit_status(), 0);
        let dups = report(summary(20, 20), Some(verification(0, 0, 4)));
        assert_eq!(
            dups.exit_status(),
            0,
            "duplicates are reported, not a failure"
        );
        let mut failed = report(summary(20, 20), None);
        failed.failures.push("StreamPoints failed".into());
        assert_eq!(failed.exit_status(), EXIT_FAILURE);
    }

    #[test]
    fn text_and_json_carry_verify_and_stored_latency() {
        let mut r = report(summary(20, 20), Some(verification(3, 0, 0)));
        r.stored_latency = Some(StoredLatency {
            latency: Some(Latency {
                samples: 17,
                p50_ms: 5.0,
                p90_ms: 6.0,
                p99_ms: 7.0,
                max_ms: 8.0,
            }),
            count: 17,
            unmatched: 0,
            repeated: 0,
            gap: 0,
            error: None,
        });
        let text = r.to_string();
        for needle in [
            "stored latency: p50 5.00 ms, p90 6.00 ms, p99 7.00 ms, max 8.00 ms (17 samples)",
            "verify:         17 of 20 messages stored (3 missing, 0 duplicates, 0 unexpected)",
            "worst devices:\n  b: 3 missing",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        assert!(!text.contains("  a:"), "clean devices are not listed");
        let json = r.to_json();
        assert_eq!(json["verify"]["missing"], 3);
        assert_eq!(json["stored_latency_ms"]["count"], 17);
        assert_eq!(json["sent"], 20);
        let plain = report(summary(1, 1), None).to_json();
        assert!(plain.get("verify").is_none() && plain.get("stored_latency_ms").is_none());
    }
}
