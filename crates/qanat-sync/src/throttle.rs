//! Job-wide flow control: token buckets on records/s and bytes/s shared by every task of a
//! job. A task takes the tokens for a whole batch and, when that drives the bucket below
//! zero, sleeps until the debt is paid, so the long-run rate equals the limit whatever the
//! batch size. The bucket starts empty and holds at most one second of tokens.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, n: f64) -> Duration {
        self.take_at(n, Instant::now())
    }

    fn take_at(&mut self, n: f64, now: Instant) -> Duration {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Limits on records and bytes per second; `None` is unlimited.
#[derive(Debug)]
pub struct Throttle {
    records: Option<Mutex<Bucket>>,
    bytes: Option<Mutex<Bucket>>,
}

impl Throttle {
    pub fn new(records_per_sec: Option<u64>, bytes_per_sec: Option<u64>) -> Self {
        let bucket = |rate: u64| {
            Mutex::new(Bucket {
                rate: rate as f64,
                tokens: 0.0,
                last: Instant::now(),
            })
        };
        Throttle {
            records: records_per_sec.filter(|r| *r > 0).map(bucket),
            bytes: bytes_per_sec.filter(|r| *r > 0).map(bucket),
        }
    }

    pub fn unlimited() -> Self {
        Throttle::new(None, None)
    }

    /// Wait until `records` and `bytes` may pass.
    pub async fn acquire(&self, records: usize, bytes: usize) {
        let mut wait = Duration::ZERO;
        if let Some(b) = &self.records {
            wait = wait.max(b.lock().await.take(records as f64));
        }
        if let Some(b) = &self.bytes {
            wait = wait.max(b.lock().await.take(bytes as f64));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_run_rate_is_the_limit() {
        let start = Instant::now();
        let mut b = Bucket {
            rate: 1000.0,
            tokens: 0.0,
            last: start,
        };
        // A taker that sleeps exactly as told: 50 batches of 100 take 5 s of virtual time.
        let mut now = start;
        for _ in 0..50 {
            now += b.take_at(100.0, now);
        }
        let secs = now.duration_since(start).as_secs_f64();
        assert!((secs - 5.0).abs() < 0.001, "{secs}");
        // An idle second refills at most one second of tokens: no burst beyond the rate.
        now += Duration::from_secs(10);
        assert_eq!(b.take_at(1000.0, now), Duration::ZERO);
        assert!(b.take_at(500.0, now) >= Duration::from_millis(499));
    }
}
