//! Counters the worker keeps: for its log lines, systemd STATUS= and /metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub claimed: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub halted: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retried: AtomicU64,
    pub released: AtomicU64,
    /// Finishes refused because the lease had moved to another worker.
    pub fenced: AtomicU64,
    pub in_flight: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    pub fn summary(&self) -> String {
        format!(
            "claimed={} completed={} failed={} halted={} dead_lettered={} retried={} released={} fenced={} in_flight={}",
            Self::get(&self.claimed),
            Self::get(&self.completed),
            Self::get(&self.failed),
            Self::get(&self.halted),
            Self::get(&self.dead_lettered),
            Self::get(&self.retried),
            Self::get(&self.released),
            Self::get(&self.fenced),
            Self::get(&self.in_flight),
        )
    }
}
