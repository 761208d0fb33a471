//! Scheduling many tables (E7): tables start in order of priority (higher first), then of
//! arrival (the one waiting longest first); and the tasks (splits) reading from one source
//! server are capped job-wide, whatever table they belong to, so a sync never floods one
//! database. Both rest on tokio's semaphores being fair (first come, first served): tables
//! queue for the table pool in schedule order, tasks queue for their server's slots in the
//! order they asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// The order in which to start tables given `(priority, arrival)` per table: indices into
/// the input, higher priority first, then earlier arrival.
pub fn start_order(tables: &[(i32, usize)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by(|a, b| {
        let (pa, sa) = tables[*a];
        let (pb, sb) = tables[*b];
        pb.cmp(&pa).then(sa.cmp(&sb))
    });
    order
}

/// Job-wide slots per source server: at most `cap` tasks read from one server at once
/// (`cap = 0` is no cap).
#[derive(Debug, Default)]
pub struct ServerSlots {
    cap: usize,
    servers: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ServerSlots {
    pub fn new(cap: usize) -> Self {
        ServerSlots {
            cap,
            servers: Mutex::default(),
        }
    }

    /// The slots of `server`; `None` when there is no cap.
    pub fn slots(&self, server: &str) -> Option<Arc<Semaphore>> {
        if self.cap == 0 {
            return None;
        }
        let mut servers = self.servers.lock().ok()?;
        Some(
            servers
                .entry(server.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.cap)))
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn higher_priority_then_longest_waiting_first() {
        // (priority, arrival)
        let tables = [(0, 0), (5, 1), (0, 2), (5, 3), (-1, 4), (9, 5)];
        assert_eq!(start_order(&tables), vec![5, 1, 3, 0, 2, 4]);
        assert_eq!(start_order(&[]), Vec::<usize>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_server_runs_more_tasks_than_its_cap() {
        let slots = Arc::new(ServerSlots::new(2));
        let running: Arc<HashMap<&str, AtomicUsize>> = Arc::new(
            ["a", "b"]
                .into_iter()
                .map(|s| (s, AtomicUsize::new(0)))
                .collect(),
        );
        let peak: Arc<HashMap<&str, AtomicUsize>> = Arc::new(
            ["a", "b"]
                .into_iter()
                .map(|s| (s, AtomicUsize::new(0)))
                .collect(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let server = if i % 4 == 0 { "b" } else { "a" };
            let (slots, running, peak) = (slots.clone(), running.clone(), peak.clone());
            tasks.spawn(async move {
                let sem = slots.slots(server).ok_or("no slots")?;
                let _permit = sem.acquire_owned().await.map_err(|_| "closed")?;
                let now = running[server].fetch_add(1, Ordering::SeqCst) + 1;
                peak[server].fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running[server].fetch_sub(1, Ordering::SeqCst);
                Ok::<(), &str>(())
            });
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            assert!(matches!(r, Ok(Ok(()))));
            done += 1;
        }
        assert_eq!(done, 40);
        assert!(peak["a"].load(Ordering::SeqCst) <= 2);
        assert!(peak["b"].load(Ordering::SeqCst) <= 2);
        assert!(ServerSlots::new(0).slots("a").is_none());
    }
}
