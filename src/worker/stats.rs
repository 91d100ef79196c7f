//! Counters the worker keeps per queue: for its log lines, systemd STATUS= and /metrics.

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
    /// Finishes given up (the store kept failing past the bound, refused them, or the stop
    /// came): the claim was dead-lettered, handed back, or left to lease expiry. Not a job
    /// outcome (the job ends later, elsewhere), so not among [`Stats::counters`].
    pub finishes_abandoned: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    /// (outcome, count) pairs, in a fixed order.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("claimed", Self::get(&self.claimed)),
            ("completed", Self::get(&self.completed)),
            ("failed", Self::get(&self.failed)),
            ("halted", Self::get(&self.halted)),
            ("dead_lettered", Self::get(&self.dead_lettered)),
            ("retried", Self::get(&self.retried)),
            ("released", Self::get(&self.released)),
            ("fenced", Self::get(&self.fenced)),
        ]
    }
}

/// Totals over queues, as `name=value` pairs for a log line.
pub fn summary(all: &[Stats], in_flight: u64) -> String {
    let mut totals: Vec<(&'static str, u64)> = Vec::new();
    for s in all {
        for (i, (k, v)) in s.counters().into_iter().enumerate() {
            match totals.get_mut(i) {
                Some(t) => t.1 += v,
                None => totals.push((k, v)),
            }
        }
    }
    let mut out: Vec<String> = totals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push(format!("in_flight={in_flight}"));
    out.join(" ")
}
