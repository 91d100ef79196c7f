//! One claim from message to finish: parse, run, decide how the claim ends.

use super::payload::{parse, result_message};
use super::Worker;
use crate::exec::{Run, RunStatus};
use crate::job::{drive, log_header, Driven};
use crate::queue::{AttemptRecord, Claim, DeadLetter, Finish};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What became of the job, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Completed,
    Failed,
    Halted,
    Retry,
    DeadLetter,
    Release,
}

impl Worker {
    /// Decides how `claim` ends. Never fails: every problem becomes a retry or a dead letter.
    pub(super) async fn process(
        &self,
        qi: usize,
        claim: &Claim,
        cancel: &CancellationToken,
    ) -> (Finish, Verdict) {
        let queue = &self.queues[qi];
        let retry = &self.cfg.retry;
        let job = match parse(queue, &claim.payload, self.cfg.max_message_bytes) {
            Ok(j) => j,
            Err(reason) => {
                warn!(job_id = %claim.job_id, %reason, "bad message: dead-lettered");
                return (
                    Finish::DeadLetter(self.dead_letter(claim, &reason)),
                    Verdict::DeadLetter,
                );
            }
        };
        let run_id = crate::ids::new_id();
        let run = Run::new(
            job.graph.clone(),
            claim.job_id.clone(),
            run_id,
            job.input.clone(),
        );
        let log = crate::audit::RunLog::new(log_header(&run, job.user_id.clone()));
        let driven = drive(run, log, &self.registry, &self.audit, cancel).await;
        let report = match driven {
            Ok(Driven::Ended(r)) => r,
            Ok(Driven::Interrupted) => return (Finish::Release, Verdict::Release),
            Err(e) => {
                // The evidence could not be written: never publish without it.
                let error = format!("cannot write the audit log: {e}");
                warn!(job_id = %claim.job_id, %error, "infrastructure failure");
                return self.retry_or_dead(claim, error);
            }
        };
        info!(job_id = %claim.job_id, run_id = %report.run_id, status = report.status_name(),
              steps = report.steps, attempt = claim.attempt, "run ended");
        let result = result_message(queue.payload, &job, &report, claim.attempt);
        match &report.status {
            RunStatus::Completed => (
                Finish::Publish {
                    result,
                    dead_letter: None,
                },
                Verdict::Completed,
            ),
            RunStatus::Halted | RunStatus::Running => (
                Finish::Publish {
                    result,
                    dead_letter: None,
                },
                Verdict::Halted,
            ),
            RunStatus::Failed { reason } => {
                if retry.retry_failed_runs && claim.attempt < retry.attempts {
                    self.retry_or_dead(claim, format!("run {} failed: {reason}", report.run_id))
                } else {
                    let dead_letter = retry.retry_failed_runs.then(|| {
                        self.dead_letter(claim, &format!("run {} failed: {reason}", report.run_id))
                    });
                    (
                        Finish::Publish {
                            result,
                            dead_letter,
                        },
                        Verdict::Failed,
                    )
                }
            }
        }
    }

    fn retry_or_dead(&self, claim: &Claim, error: String) -> (Finish, Verdict) {
        if claim.attempt < self.cfg.retry.attempts {
            let delay = self.backoff.delay(claim.attempt);
            (Finish::Retry { delay, error }, Verdict::Retry)
        } else {
            let reason = format!("gave up after {} attempts: {error}", claim.attempt);
            (
                Finish::DeadLetter(self.dead_letter(claim, &reason)),
                Verdict::DeadLetter,
            )
        }
    }

    fn dead_letter(&self, claim: &Claim, reason: &str) -> DeadLetter {
        let mut attempts = claim.history.clone();
        attempts.push(AttemptRecord {
            attempt: claim.attempt,
            at: crate::exec::run::now_utc(),
            error: reason.to_string(),
        });
        DeadLetter {
            job_id: claim.job_id.clone(),
            reason: reason.to_string(),
            attempts,
        }
    }
}
