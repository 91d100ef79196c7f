//! Liveness: when the consumer last made progress, whether that still counts as alive (for
//! `/live` and systemd's watchdog), the STATUS= text sent along, and the worker's answers to the
//! admin port. The decisions are plain functions of their inputs, tested below; the worker's
//! methods only read its clock and counters.

use super::stats::Stats;
use super::{Worker, CLAIM_WAIT};
use crate::ops::admin::WorkerProbe;
use crate::ops::health::Readiness;
use crate::ops::notify::Notifier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

impl Worker {
    /// Marks consumer progress (see `progress_ms`).
    pub(crate) fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.progress_ms.store(now, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.progress_ms.load(Ordering::Relaxed)))
    }

    /// Alive = the consumer made progress within the watchdog window (or 60 s without one).
    pub fn alive(&self) -> bool {
        self.since_progress() < Self::progress_window()
    }

    /// How long without progress still counts as alive: half the watchdog interval, but never
    /// less than two empty claim waits (an idle consumer reports progress once per wait).
    fn progress_window() -> Duration {
        progress_window_for(Notifier::watchdog_interval())
    }

    pub(super) fn status_line(&self) -> String {
        status_text(self.in_flight(), &self.stats)
    }

    /// Pings systemd's watchdog while the consumer makes progress; STATUS= along the way.
    pub(super) async fn watchdog(self: Arc<Self>) {
        let interval = Notifier::watchdog_interval();
        let tick = interval.map(|w| w / 3).unwrap_or(Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let status = self.status_line();
            match watchdog_tick(interval.is_some(), || self.alive()) {
                Tick::Ping => self.notifier.notify(&format!("WATCHDOG=1\n{status}")),
                Tick::Withhold => {
                    warn!(
                        since_progress_ms = self.since_progress().as_millis() as u64,
                        "consumer made no progress: withholding the watchdog ping"
                    );
                    self.notifier.notify(&status);
                }
                Tick::StatusOnly => self.notifier.notify(&status),
            }
        }
    }
}

/// How long without progress still counts as alive, for a watchdog `interval` (if any): see
/// `Worker::progress_window`.
fn progress_window_for(interval: Option<Duration>) -> Duration {
    let half = interval.map(|w| w / 2).unwrap_or(Duration::from_secs(60));
    half.max(CLAIM_WAIT * 2)
}

/// The STATUS= line: jobs in flight and the totals over every queue.
fn status_text(in_flight: u64, stats: &[Stats]) -> String {
    let total = |f: fn(&Stats) -> &AtomicU64| stats.iter().map(|s| Stats::get(f(s))).sum::<u64>();
    format!(
        "STATUS=in flight {}, completed {}, failed {}, halted (pending decisions) {}, dead-lettered {}",
        in_flight,
        total(|s| &s.completed),
        total(|s| &s.failed),
        total(|s| &s.halted),
        total(|s| &s.dead_lettered),
    )
}

/// What one watchdog tick sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    /// WATCHDOG=1 with the status: the consumer makes progress.
    Ping,
    /// The status alone, and a warning: the consumer made no progress, so systemd may restart it.
    Withhold,
    /// The status alone: no watchdog is configured.
    StatusOnly,
}

/// The watchdog decision: ping only under a watchdog and while the consumer is alive (asked
/// only under a watchdog).
fn watchdog_tick(watchdog: bool, alive: impl FnOnce() -> bool) -> Tick {
    match watchdog {
        true if alive() => Tick::Ping,
        true => Tick::Withhold,
        false => Tick::StatusOnly,
    }
}

/// `LAR_WORKER_TEST_WEDGE=1` makes each claim loop hang after its first claim: a test hook for
/// the watchdog. Never set it in production.
pub(super) fn wedge_for_tests() -> bool {
    std::env::var("LAR_WORKER_TEST_WEDGE").is_ok_and(|v| v == "1")
}

/// The admin port's view of the worker (`/live`, `/ready`, `/metrics`).
#[async_trait::async_trait]
impl WorkerProbe for Worker {
    fn alive(&self) -> bool {
        Worker::alive(self)
    }

    async fn readiness(&self) -> Readiness {
        Worker::readiness(self).await
    }

    async fn metrics_text(&self) -> String {
        Worker::metrics_text(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::{progress_window_for, status_text, watchdog_tick, Stats, Tick, CLAIM_WAIT};
    use std::time::Duration;

    #[test]
    fn without_a_watchdog_the_window_is_a_minute() {
        assert_eq!(progress_window_for(None), Duration::from_secs(60));
    }

    #[test]
    fn under_a_watchdog_the_window_is_half_its_interval() {
        assert_eq!(
            progress_window_for(Some(Duration::from_secs(30))),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn the_window_is_never_shorter_than_two_claim_waits() {
        assert_eq!(
            progress_window_for(Some(Duration::from_millis(500))),
            CLAIM_WAIT * 2
        );
    }

    #[test]
    fn the_watchdog_pings_only_while_alive() {
        assert_eq!(watchdog_tick(true, || true), Tick::Ping);
        assert_eq!(watchdog_tick(true, || false), Tick::Withhold);
    }

    #[test]
    fn without_a_watchdog_only_the_status_goes_and_liveness_is_not_asked() {
        assert_eq!(
            watchdog_tick(false, || panic!("not asked")),
            Tick::StatusOnly
        );
    }

    #[test]
    fn the_status_sums_every_queue() {
        let stats = [Stats::default(), Stats::default()];
        Stats::add(&stats[0].completed, 2);
        Stats::add(&stats[1].completed, 3);
        Stats::add(&stats[0].failed, 1);
        Stats::add(&stats[1].halted, 4);
        Stats::add(&stats[1].dead_lettered, 5);
        Stats::add(&stats[0].retried, 9);
        assert_eq!(
            status_text(7, &stats),
            "STATUS=in flight 7, completed 5, failed 1, halted (pending decisions) 4, dead-lettered 5"
        );
    }
}
