//! Liveness: whether the process, its runtime and its loops still turn (for `/live` and
//! systemd's watchdog), the STATUS= text sent along, and the worker's answers to the admin port.
//!
//! The watchdog says "this process is alive", not "its jobs are quick": it pings while the
//! runtime runs the watchdog task (a stuck runtime runs nothing, so the pings stop) and every
//! running claim loop and the lease renewal loop turned within the window. A loop waiting for a
//! permit or sleeping out a backoff still turns (see [`Worker::turning`]); a loop stuck in a call
//! that never returns does not. A step that takes minutes (an LLM call) is not a stall: hung
//! steps end by their own timeouts, not by systemd killing every job of a healthy worker.
//! The decisions are plain functions of their inputs, tested below; the worker's methods only
//! read its clock and its loops' beats.

use super::stats::Stats;
use super::{Worker, CLAIM_WAIT};
use crate::ops::admin::WorkerProbe;
use crate::ops::health::{Check, Readiness};
use crate::ops::notify::Notifier;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How often a loop that waits (for a permit, out a backoff, for its next renewal) still marks
/// its turn.
const BEAT_EVERY: Duration = Duration::from_millis(250);

/// A loop's last turn, in ms since the worker started; [`Beat::IDLE`] while the loop does not
/// run (not started yet, or restarting after a panic), when the watchdog does not ask it.
#[derive(Debug)]
pub(super) struct Beat {
    turned_ms: AtomicU64,
}

impl Beat {
    const IDLE: u64 = u64::MAX;

    pub(super) fn idle() -> Self {
        Beat {
            turned_ms: AtomicU64::new(Self::IDLE),
        }
    }

    fn stop(&self) {
        self.turned_ms.store(Self::IDLE, Ordering::Relaxed);
    }

    /// The time since the last turn, `None` while the loop does not run.
    fn since(&self, now_ms: u64) -> Option<Duration> {
        match self.turned_ms.load(Ordering::Relaxed) {
            Self::IDLE => None,
            t => Some(Duration::from_millis(now_ms.saturating_sub(t))),
        }
    }
}

/// A queue's claim loop as its supervisor sees it: its beat, and whether it is down (it
/// panicked and waits for its restart), for `/ready` and STATUS=.
#[derive(Debug)]
pub(super) struct ClaimLoopState {
    pub(super) beat: Beat,
    down: AtomicBool,
    panics: AtomicU32,
}

impl ClaimLoopState {
    pub(super) fn new() -> Self {
        ClaimLoopState {
            beat: Beat::idle(),
            down: AtomicBool::new(false),
            panics: AtomicU32::new(0),
        }
    }

    /// The loop ended (the stop): the watchdog no longer asks it.
    pub(super) fn beat_stop(&self) {
        self.beat.stop();
    }
}

impl Worker {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Marks a turn of the loop `beat` belongs to.
    pub(super) fn turn(&self, beat: &Beat) {
        beat.turned_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Awaits `fut`, a wait of the loop `beat` belongs to that may be long and is not a stall
    /// (a permit while every job runs, a backoff, a timer), marking the loop's turns meanwhile.
    pub(super) async fn turning<F: Future>(&self, beat: &Beat, fut: F) -> F::Output {
        tokio::pin!(fut);
        let mut every = tokio::time::interval(BEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                out = &mut fut => {
                    self.turn(beat);
                    return out;
                }
                _ = every.tick() => self.turn(beat),
            }
        }
    }

    /// A claim loop panicked (`down`) or was restarted: `/ready` and STATUS= follow.
    pub(super) fn claim_loop_down(&self, qi: usize, down: bool) {
        let s = &self.claim_loops[qi];
        if down {
            s.panics.fetch_add(1, Ordering::Relaxed);
            s.beat.stop();
        }
        s.down.store(down, Ordering::Relaxed);
    }

    /// The queues without a consumer: their claim loop panicked and waits for its restart.
    fn queues_without_consumer(&self) -> Vec<(String, u32)> {
        self.queues
            .iter()
            .zip(&self.claim_loops)
            .filter(|(_, s)| s.down.load(Ordering::Relaxed))
            .map(|(q, s)| (q.names.jobs.clone(), s.panics.load(Ordering::Relaxed)))
            .collect()
    }

    /// `/ready`'s checks for the claim loops: one failing check per queue without a consumer.
    pub(super) fn claim_loop_checks(&self) -> Vec<Check> {
        self.queues_without_consumer()
            .into_iter()
            .map(|(queue, panics)| Check {
                name: format!("claim_loop:{queue}"),
                ok: false,
                detail: format!(
                    "no consumer for {queue}: its claim loop panicked ({panics} so far) and is restarting"
                ),
            })
            .collect()
    }

    /// The running loops that did not turn within the window, by name.
    fn stalled_loops(&self) -> Vec<String> {
        let now = self.now_ms();
        let window = Self::liveness_window();
        let loops = self
            .queues
            .iter()
            .zip(&self.claim_loops)
            .map(|(q, s)| (format!("claim loop of {}", q.names.jobs), &s.beat))
            .chain(std::iter::once((
                "lease renewal".to_string(),
                &self.renewal_beat,
            )));
        stalled(loops.map(|(name, beat)| (name, beat.since(now))), window)
    }

    /// Alive = every running loop turned within the watchdog window (or 60 s without one).
    pub fn alive(&self) -> bool {
        self.stalled_loops().is_empty()
    }

    /// How long a loop may go without a turn: half the watchdog interval, but never less than
    /// two empty claim waits (an idle claim loop turns once per wait).
    fn liveness_window() -> Duration {
        liveness_window_for(Notifier::watchdog_interval())
    }

    pub(super) fn status_line(&self) -> String {
        let down: Vec<String> = self
            .queues_without_consumer()
            .into_iter()
            .map(|(q, _)| q)
            .collect();
        status_text(self.in_flight(), &self.stats, &down)
    }

    /// Pings systemd's watchdog while the runtime runs this task and the loops turn; STATUS=
    /// along the way.
    pub(super) async fn watchdog(self: Arc<Self>) {
        let interval = Notifier::watchdog_interval();
        let tick = interval.map(|w| w / 3).unwrap_or(Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let status = self.status_line();
            let stalled = self.stalled_loops();
            match watchdog_tick(interval.is_some(), || stalled.is_empty()) {
                Tick::Ping => self.notifier.notify(&format!("WATCHDOG=1\n{status}")),
                Tick::Withhold => {
                    warn!(
                        stalled = %stalled.join(", "),
                        "a loop stopped turning: withholding the watchdog ping"
                    );
                    self.notifier.notify(&status);
                }
                Tick::StatusOnly => self.notifier.notify(&status),
            }
        }
    }
}

/// The loops (name, time since their last turn, `None` when not running) that did not turn
/// within `window`.
fn stalled(
    loops: impl Iterator<Item = (String, Option<Duration>)>,
    window: Duration,
) -> Vec<String> {
    loops
        .filter(|(_, since)| since.is_some_and(|s| s >= window))
        .map(|(name, _)| name)
        .collect()
}

/// How long a loop may go without a turn, for a watchdog `interval` (if any): see
/// `Worker::liveness_window`.
fn liveness_window_for(interval: Option<Duration>) -> Duration {
    let half = interval.map(|w| w / 2).unwrap_or(Duration::from_secs(60));
    half.max(CLAIM_WAIT * 2)
}

/// The STATUS= line: jobs in flight and the totals over every queue, and the queues without a
/// consumer (`down`), if any.
fn status_text(in_flight: u64, stats: &[Stats], down: &[String]) -> String {
    let total = |f: fn(&Stats) -> &AtomicU64| stats.iter().map(|s| Stats::get(f(s))).sum::<u64>();
    let mut line = format!(
        "STATUS=in flight {}, completed {}, failed {}, halted (pending decisions) {}, dead-lettered {}",
        in_flight,
        total(|s| &s.completed),
        total(|s| &s.failed),
        total(|s| &s.halted),
        total(|s| &s.dead_lettered),
    );
    if !down.is_empty() {
        line.push_str(&format!(
            "; not ready: no consumer for {} (claim loop restarting)",
            down.join(", ")
        ));
    }
    line
}

/// What one watchdog tick sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    /// WATCHDOG=1 with the status: the runtime and the loops turn.
    Ping,
    /// The status alone, and a warning: a loop stopped turning, so systemd may restart it.
    Withhold,
    /// The status alone: no watchdog is configured.
    StatusOnly,
}

/// The watchdog decision: ping only under a watchdog and while the loops turn (asked only
/// under a watchdog).
fn watchdog_tick(watchdog: bool, turning: impl FnOnce() -> bool) -> Tick {
    match watchdog {
        true if turning() => Tick::Ping,
        true => Tick::Withhold,
        false => Tick::StatusOnly,
    }
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
    use super::{
        liveness_window_for, stalled, status_text, watchdog_tick, Stats, Tick, CLAIM_WAIT,
    };
    use std::time::Duration;

    #[test]
    fn without_a_watchdog_the_window_is_a_minute() {
        assert_eq!(liveness_window_for(None), Duration::from_secs(60));
    }

    #[test]
    fn under_a_watchdog_the_window_is_half_its_interval() {
        assert_eq!(
            liveness_window_for(Some(Duration::from_secs(30))),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn the_window_is_never_shorter_than_two_claim_waits() {
        assert_eq!(
            liveness_window_for(Some(Duration::from_millis(500))),
            CLAIM_WAIT * 2
        );
    }

    #[test]
    fn a_loop_that_turned_within_the_window_or_does_not_run_is_not_stalled() {
        let w = Duration::from_secs(5);
        let loops = vec![
            ("fresh".to_string(), Some(Duration::from_secs(1))),
            ("restarting".to_string(), None),
            ("stuck".to_string(), Some(Duration::from_secs(5))),
        ];
        assert_eq!(stalled(loops.into_iter(), w), vec!["stuck".to_string()]);
    }

    #[test]
    fn the_watchdog_pings_only_while_the_loops_turn() {
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
            status_text(7, &stats, &[]),
            "STATUS=in flight 7, completed 5, failed 1, halted (pending decisions) 4, dead-lettered 5"
        );
    }

    #[test]
    fn the_status_names_a_queue_without_a_consumer() {
        let line = status_text(0, &[Stats::default()], &["a:jobs".to_string()]);
        assert!(
            line.ends_with("; not ready: no consumer for a:jobs (claim loop restarting)"),
            "{line}"
        );
    }
}
