//! Rate-limited logging: at most one line per problem per interval, with the number of
//! occurrences that were not logged in between.
//!
//! A problem that repeats as fast as the CPU allows (a failing `accept`, a flood of refused
//! connections) must not turn into gigabytes of log. Declare a limiter next to the code that
//! logs and ask it before each line:
//!
//! ```
//! use std::time::Duration;
//! use qanat_broker::ratelog::LogLimiter;
//!
//! static ACCEPT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
//!
//! if let Some(suppressed) = ACCEPT_LOG.check("accept") {
//!     tracing::warn!(suppressed, "accept failed");
//! }
//! ```
//!
//! Invariant: for each problem key, the first occurrence is logged, and then at most one per
//! interval; the line that is logged reports how many occurrences were skipped since the
//! previous line, so the log still accounts for every occurrence.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The interval used by the broker's own rate-limited lines.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Per problem key: when it was last logged and how many occurrences were skipped since.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    // A handful of static keys per limiter: a vector beats a map and allows `const fn new`.
    slots: Mutex<Vec<Slot>>,
}

#[derive(Debug)]
struct Slot {
    problem: &'static str,
    logged_at: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            slots: parking_lot::const_mutex(Vec::new()),
        }
    }

    /// Record one occurrence of `problem`. `Some(n)`: log a line now, `n` occurrences were
    /// skipped since the previous line; `None`: skip this one.
    pub fn check(&self, problem: &'static str) -> Option<u64> {
        self.check_at(problem, Instant::now())
    }

    /// [`check`](Self::check) at a given time (for tests).
    pub fn check_at(&self, problem: &'static str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock();
        match slots.iter_mut().find(|s| s.problem == problem) {
            None => {
                slots.push(Slot {
                    problem,
                    logged_at: now,
                    suppressed: 0,
                });
                Some(0)
            }
            Some(slot) if now.saturating_duration_since(slot.logged_at) >= self.interval => {
                let skipped = slot.suppressed;
                slot.logged_at = now;
                slot.suppressed = 0;
                Some(skipped)
            }
            Some(slot) => {
                slot.suppressed += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_skipped_count() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.check_at("accept", t0), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(
                limiter.check_at("accept", t0 + Duration::from_millis(ms)),
                None
            );
        }
        assert_eq!(
            limiter.check_at("accept", t0 + Duration::from_secs(10)),
            Some(3)
        );
        assert_eq!(
            limiter.check_at("accept", t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            limiter.check_at("accept", t0 + Duration::from_secs(25)),
            Some(1)
        );
    }

    #[test]
    fn problems_are_limited_independently() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.check_at("a", t0), Some(0));
        assert_eq!(limiter.check_at("b", t0), Some(0));
        assert_eq!(limiter.check_at("a", t0), None);
        assert_eq!(limiter.check_at("b", t0 + Duration::from_secs(10)), Some(0));
    }
}
