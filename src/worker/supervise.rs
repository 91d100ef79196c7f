//! Claim loops under supervision: a loop that panics is restarted with backoff, and while it
//! is down its queue has no consumer, which `/ready` and STATUS= report.

use super::*;
use crate::backoff::Backoff;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The restarts of a claim loop that panicked: a second, doubling to a minute. A loop that then
/// runs for [`RESTARTS_FORGOTTEN_AFTER`] starts over from a second.
fn claim_loop_restart() -> Backoff {
    Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.2,
    }
}
const RESTARTS_FORGOTTEN_AFTER: Duration = Duration::from_secs(300);

impl Worker {
    /// Runs the claim loop of queue `qi` until shutdown, restarting it (with backoff) when it
    /// panics. While it is down the queue has no consumer: `/ready` and STATUS= say so. The
    /// job tasks live here, not in the loop, so a panic of the loop cuts off no job.
    pub(super) async fn supervise_claim_loop(
        self: Arc<Self>,
        qi: usize,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
        permits: Arc<Semaphore>,
    ) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        let queue = self.queues[qi].names.jobs.clone();
        let mut restarts = 0u32;
        loop {
            let began = Instant::now();
            let run =
                AssertUnwindSafe(self.claim_loop(qi, &shutdown, &hard_stop, &permits, &mut tasks))
                    .catch_unwind()
                    .await;
            let Err(panic) = run else {
                break;
            };
            restarts = if began.elapsed() > RESTARTS_FORGOTTEN_AFTER {
                1
            } else {
                restarts + 1
            };
            let pause = claim_loop_restart().delay(restarts);
            self.claim_loop_down(qi, true);
            error!(%queue, panic = %panic_text(panic.as_ref()), restart_in_ms = pause.as_millis() as u64,
                   "the claim loop panicked: nothing consumes this queue until it restarts");
            self.notifier.notify(&self.status_line());
            let stopped = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep(pause) => false,
            };
            self.claim_loop_down(qi, false);
            if stopped {
                break;
            }
            info!(%queue, restarts, "claim loop restarted");
            self.notifier.notify(&self.status_line());
        }
        tasks
    }
}

/// A panic's message, for the log.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".to_string()
    }
}
