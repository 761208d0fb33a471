//! Connection-level limits.
//!
//! Invariant: a failing `accept` is retried only after an [`AcceptBackoff`] pause.

use std::time::Duration;

/// Delay before the next `accept` after failures: doubles from `min` up to `max`, back to
/// `min` after a success. Out of descriptors, `accept` fails at once for as long as the
/// condition lasts; retrying without a pause would spin a core and starve everything else.
#[derive(Debug)]
pub struct AcceptBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl AcceptBackoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The pause after one more failure.
    pub fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let ms: Vec<u128> = (0..9).map(|_| b.failed().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }
}
