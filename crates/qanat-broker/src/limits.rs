//! Connection-level limits: how many connections, from where, and how much request memory.
//!
//! Invariants:
//! - The bytes of every request frame being received or waiting for its answer come out of
//!   one [`RequestPool`] of `queued_max_request_bytes`. A frame reserves its declared size
//!   before its body is read; when the pool cannot cover it, its connection stops reading
//!   (TCP backpressure) until enough requests are answered. The reservation is returned when
//!   the response is written (or the request needs none, or the connection closes).
//! - A [`ConnectionSlot`] exists for every open connection; the totals it counts never exceed
//!   `max_connections`, nor per source address `max_connections_per_ip`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Memory for received requests, shared by all connections (Kafka's queued.max.request.bytes).
#[derive(Debug, Clone)]
pub struct RequestPool {
    permits: Arc<Semaphore>,
}

/// A frame's share of the [`RequestPool`]; returned when dropped.
#[derive(Debug)]
pub struct PoolReservation {
    _permit: OwnedSemaphorePermit,
    bytes: u32,
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        metrics::gauge!("qanat_request_pool_used_bytes").decrement(f64::from(self.bytes));
    }
}

impl RequestPool {
    /// A pool of `bytes` (capped at what a semaphore can count, far above any real memory).
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(bytes)),
        }
    }

    /// Reserve `bytes` without waiting, if the pool has them now.
    pub fn try_reserve(&self, bytes: u32) -> Option<PoolReservation> {
        match self.permits.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => Some(Self::reserved(permit, bytes)),
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => None,
        }
    }

    /// Reserve `bytes`, waiting (first come, first served) until the pool has them.
    /// Cancel-safe: dropping the future reserves nothing.
    pub async fn reserve(&self, bytes: u32) -> PoolReservation {
        match self.permits.clone().acquire_many_owned(bytes).await {
            Ok(permit) => Self::reserved(permit, bytes),
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    fn reserved(permit: OwnedSemaphorePermit, bytes: u32) -> PoolReservation {
        metrics::gauge!("qanat_request_pool_used_bytes").increment(f64::from(bytes));
        PoolReservation {
            _permit: permit,
            bytes,
        }
    }
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refusal {
    /// The metric label and the name of the configuration key that caused it.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Counts open connections, in total and per source address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: u32,
    max_per_ip: u32,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

/// One admitted connection; its count is released when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: u32, max_per_ip: u32) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            open: Mutex::new(OpenConnections::default()),
        })
    }

    /// Count a new connection from `ip`, or say which cap it would exceed.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let mut open = self.open.lock();
        if open.total >= self.max_total {
            return Err(Refusal::MaxConnections);
        }
        let from_ip = open.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(Refusal::MaxConnectionsPerIp);
        }
        *from_ip += 1;
        open.total += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now (total).
    pub fn open(&self) -> u32 {
        self.open.lock().total
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_total_and_per_ip_and_releases_on_drop() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let limits = ConnectionLimits::new(3, 2);
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::MaxConnectionsPerIp);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::MaxConnections);
        assert_eq!(limits.open(), 3);
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _a3 = limits.admit(a).unwrap();
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let ms: Vec<u128> = (0..9).map(|_| b.failed().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn pool_waits_first_come_first_served_and_returns_on_drop() {
        let pool = RequestPool::new(100);
        let r60 = pool.try_reserve(60).unwrap();
        assert!(pool.try_reserve(50).is_none(), "only 40 bytes are left");
        let r40 = pool.try_reserve(40).unwrap();
        assert_eq!(pool.available(), 0);
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.reserve(70).await }
        });
        drop(r60);
        // 60 free, the waiter needs 70: it still waits until r40 is returned too.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        drop(r40);
        let r70 = waiter.await.unwrap();
        assert_eq!(pool.available(), 30);
        drop(r70);
        assert_eq!(pool.available(), 100);
    }
}
