//! Ending a claim when the store does not cooperate: a finish is tried again (only what a retry
//! can fix) for a few leases with the lease renewed, then given up, handed back or
//! dead-lettered with the reason, and counted (`lar_worker_finishes_abandoned_total`). The
//! decision of what to do after a failed finish is a pure function, tested below.

use super::lease::Lane;
use super::stats::Stats;
use super::*;
use crate::backoff::Backoff;
use crate::queue::{Claim, Fenced, Finish};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How long a finish is tried, in leases, before the claim is handed back: the lease is
/// renewed meanwhile, so a store that answers again within it loses nothing.
const FINISH_LEASES: u32 = 3;
/// How long a hand-back after a finish given up may take.
const GIVE_BACK_WAIT: Duration = Duration::from_secs(2);

impl Worker {
    /// Processes one claim and finishes it. A finish the store fails is tried again (only what
    /// [`QueueError::is_retryable`](crate::queue::QueueError::is_retryable) allows) for
    /// [`FINISH_LEASES`] leases; then, or at once for a refusal, the claim is given up and
    /// counted (`lar_worker_finishes_abandoned_total`): see [`Worker::give_up_finish`].
    pub(super) async fn handle(
        self: Arc<Self>,
        qi: usize,
        claim: Claim,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let (finish, verdict) = self.process(qi, &claim, &shutdown, &hard_stop).await;
        self.finishing(qi, Lane::Jobs, &claim);
        let names = &self.queues[qi].names;
        let bound = self.cfg.lease() * FINISH_LEASES;
        let deadline = tokio::time::Instant::now() + bound;
        let mut tries = 0u32;
        let outcome = loop {
            // A try the store does not answer is cut off at the deadline too (it is fenced: if
            // it still lands later, it lands once, or is refused for a newer claim).
            let tried = tokio::time::timeout_at(
                deadline,
                self.backend.finish(names, &claim, finish.clone()),
            )
            .await;
            let e = match tried {
                Ok(Ok(f)) => break Some(f),
                Ok(Err(e)) => e,
                Err(_) => crate::queue::QueueError::Transport(format!(
                    "the finish did not answer within {} ms",
                    bound.as_millis()
                )),
            };
            tries += 1;
            let next = after_failed_finish(
                e.is_retryable(),
                tokio::time::Instant::now() >= deadline,
                hard_stop.is_cancelled(),
                tries,
            );
            let pause = match next {
                AfterFailure::RetryIn(pause) => pause,
                AfterFailure::GiveUp(why) => {
                    self.give_up_finish(qi, &claim, &finish, &e, why, tries)
                        .await;
                    break None;
                }
            };
            warn!(job_id = %claim.job_id, error = %e, tries, retry_in_ms = pause.as_millis() as u64, "finish failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = hard_stop.cancelled() => {}
            }
        };
        match outcome {
            Some(Fenced::Done) => outcome::count(&self.stats[qi], verdict, &finish),
            Some(Fenced::Lost) if tries > 0 => {
                // An earlier try may have been applied with its answer lost (a reply timeout):
                // the job may be finished by this very worker. Say so rather than "nothing".
                Stats::add(&self.stats[qi].fenced, 1);
                warn!(job_id = %claim.job_id, epoch = claim.epoch, tries,
                      "finish refused after a failed try: the failed try may have finished the job (its answer was lost), or another worker holds it");
            }
            Some(Fenced::Lost) => {
                Stats::add(&self.stats[qi].fenced, 1);
                warn!(job_id = %claim.job_id, epoch = claim.epoch, "claim lost to another worker: nothing published");
            }
            None => {}
        }
    }

    /// Gives up a claim whose finish failed (`error`, the last of `tries`): counted, reported,
    /// and handed on. After a refusal (not retryable) the job is dead-lettered with the reason,
    /// as a step write the store refuses is: handing it back would run it again only to meet the
    /// same refusal, for ever. After the time bound (the store keeps failing) it is handed back
    /// (`Finish::Release`) if the store takes that. Either way, when the store takes nothing,
    /// the caller stops renewing the lease on return and it lapses: the reaper of any replica
    /// then brings the job back (counted as a recovery, so `max_recoveries` bounds even that).
    async fn give_up_finish(
        &self,
        qi: usize,
        claim: &Claim,
        finish: &Finish,
        error: &crate::queue::QueueError,
        why: GiveUp,
        tries: u32,
    ) {
        let names = &self.queues[qi].names;
        Stats::add(&self.stats[qi].finishes_abandoned, 1);
        let instead = match why {
            GiveUp::Refused if !matches!(finish, Finish::DeadLetter(_)) => {
                Some(Finish::DeadLetter(crate::queue::DeadLetter {
                    job_id: claim.job_id.clone(),
                    reason: format!("the queue store refused to finish the job: {error}"),
                    attempts: claim.history.clone(),
                    keep_run: true,
                }))
            }
            GiveUp::TooLong if !matches!(finish, Finish::Release) => Some(Finish::Release),
            _ => None,
        };
        error!(job_id = %claim.job_id, error = %error, tries, reason = why.text(),
               then = instead.as_ref().map_or("leaving it to lease expiry", |f| match f {
                   Finish::DeadLetter(_) => "dead-lettering it",
                   _ => "handing it back",
               }),
               "giving up the finish");
        let Some(instead) = instead else {
            return;
        };
        let kind = if matches!(instead, Finish::Release) {
            "hand-back"
        } else {
            "dead letter"
        };
        match tokio::time::timeout(
            GIVE_BACK_WAIT,
            self.backend.finish(names, claim, instead.clone()),
        )
        .await
        {
            Ok(Ok(Fenced::Done)) => match instead {
                Finish::Release => Stats::add(&self.stats[qi].released, 1),
                _ => Stats::add(&self.stats[qi].dead_lettered, 1),
            },
            Ok(Ok(Fenced::Lost)) => {
                warn!(job_id = %claim.job_id, "the {kind} was refused: another worker holds the job, or a failed try finished it")
            }
            Ok(Err(e)) => {
                warn!(job_id = %claim.job_id, error = %e, "the {kind} failed too: leaving the job to lease expiry")
            }
            Err(_) => {
                warn!(job_id = %claim.job_id, "the {kind} did not answer: leaving the job to lease expiry")
            }
        }
    }
}

/// Why a finish is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    /// The store refused it (not retryable): trying again meets the same refusal.
    Refused,
    /// It kept failing for [`FINISH_LEASES`] leases.
    TooLong,
    /// The stop cut the hand-back grace short.
    Stopping,
}

impl GiveUp {
    fn text(self) -> &'static str {
        match self {
            GiveUp::Refused => "the store refused it",
            GiveUp::TooLong => "it kept failing past its bound",
            GiveUp::Stopping => "the worker is stopping",
        }
    }
}

/// What follows a failed finish try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    RetryIn(Duration),
    GiveUp(GiveUp),
}

/// The finish retry decision, from values: a refusal is given up at once, a retryable error is
/// tried again with the reconnect backoff until the `past_bound`, or until the stop (the drain
/// deadline passed: `hard_stop`) after three tries.
fn after_failed_finish(
    retryable: bool,
    past_bound: bool,
    hard_stop: bool,
    tries: u32,
) -> AfterFailure {
    if !retryable {
        AfterFailure::GiveUp(GiveUp::Refused)
    } else if past_bound {
        AfterFailure::GiveUp(GiveUp::TooLong)
    } else if hard_stop && tries >= 3 {
        AfterFailure::GiveUp(GiveUp::Stopping)
    } else {
        AfterFailure::RetryIn(Backoff::reconnect().delay(tries))
    }
}

#[cfg(test)]
mod tests {
    use super::{after_failed_finish, AfterFailure, GiveUp};

    #[test]
    fn a_refused_finish_is_given_up_at_once() {
        assert_eq!(
            after_failed_finish(false, false, false, 1),
            AfterFailure::GiveUp(GiveUp::Refused)
        );
    }

    #[test]
    fn a_failing_finish_is_retried_until_its_bound() {
        assert!(matches!(
            after_failed_finish(true, false, false, 40),
            AfterFailure::RetryIn(_)
        ));
        assert_eq!(
            after_failed_finish(true, true, false, 2),
            AfterFailure::GiveUp(GiveUp::TooLong)
        );
    }

    #[test]
    fn the_stop_gives_three_tries() {
        assert!(matches!(
            after_failed_finish(true, false, true, 2),
            AfterFailure::RetryIn(_)
        ));
        assert_eq!(
            after_failed_finish(true, false, true, 3),
            AfterFailure::GiveUp(GiveUp::Stopping)
        );
    }
}
