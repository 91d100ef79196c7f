//! How a job ends, decided from values: the finish and verdict for a run's report, a retry or
//! a dead letter for a failure, the dead letter for a message that cannot start, a result cut
//! down to `worker.max_result_bytes`, and the counters a verdict moves. Plain functions of the
//! claim, the report and the worker's [`Policy`] (no backend, no run), so every branch is
//! tested below without processes or stores.

use super::payload::{awaiting_message, result_message, without_state, ParsedJob, META_KEY};
use super::stats::Stats;
use crate::backoff::Backoff;
use crate::config::{PayloadFormat, RetrySection};
use crate::durable::{DecisionRequest, Pending};
use crate::exec::RunStatus;
use crate::job::JobReport;
use crate::queue::{AttemptRecord, Claim, DeadLetter, Finish};
use serde_json::{Map, Value};
use tracing::warn;

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

/// What the decisions below read from the worker and the job's queue: its policy.
pub(super) struct Policy<'a> {
    /// `worker.retry`: how many attempts, and whether a failed run is retried.
    pub(super) retry: &'a RetrySection,
    /// The delay before each retry.
    pub(super) backoff: &'a Backoff,
    /// Runs are checkpointed (`Worker::durable`): a retry or dead letter may keep the run.
    pub(super) durable: bool,
    /// A halted run waits for a human (`Worker::pauses`), else its halt is the final result.
    pub(super) pauses: bool,
    /// The queue's message format.
    pub(super) format: PayloadFormat,
    /// The queue's name (its jobs queue), for a pending record.
    pub(super) queue: &'a str,
    /// `worker.max_result_bytes`.
    pub(super) max_result_bytes: usize,
    /// `worker.max_recoveries`.
    pub(super) max_recoveries: u32,
}

/// Keeps what is published within `worker.max_result_bytes`: an oversized result goes out
/// without its state (see [`without_state`]), a final one as a failure with a dead letter,
/// so an operator sees it; retrying could never make it fit.
pub(super) fn fit_result(
    policy: &Policy,
    claim: &Claim,
    (finish, verdict): (Finish, Verdict),
) -> (Finish, Verdict) {
    let max = policy.max_result_bytes;
    let size = match &finish {
        Finish::Publish { result, .. } | Finish::Pause { result, .. } if result.len() > max => {
            result.len()
        }
        _ => return (finish, verdict),
    };
    let reason = format!(
        "the result is {size} bytes, over worker.max_result_bytes ({max}): it went out \
         without the run's state, which the signed audit log holds"
    );
    warn!(job_id = %claim.job_id, %reason, "result too large");
    let format = policy.format;
    if let Finish::Pause { result, pending } = &finish {
        if let Some(result) = without_state(format, result, None, &reason, max) {
            let pending = pending.clone();
            return (Finish::Pause { result, pending }, verdict);
        }
    }
    let result = match &finish {
        Finish::Publish { result, .. } | Finish::Pause { result, .. } => {
            without_state(format, result, Some("failed"), &reason, max)
        }
        _ => None,
    }
    .unwrap_or_else(|| {
        serde_json::to_vec(&serde_json::json!({
            META_KEY: {"job_id": claim.job_id, "status": "failed", "error": reason}
        }))
        .unwrap_or_default()
    });
    let dead_letter = match finish {
        Finish::Publish {
            dead_letter: Some(d),
            ..
        } => d,
        _ => dead_letter(claim, &reason),
    };
    (
        Finish::Publish {
            result,
            dead_letter: Some(dead_letter),
        },
        Verdict::Failed,
    )
}

/// How a run that ended (completed, failed, or halted) finishes its claim.
pub(super) fn finish_for(
    policy: &Policy,
    claim: &Claim,
    job: &ParsedJob,
    report: &JobReport,
) -> (Finish, Verdict) {
    let retry = policy.retry;
    match &report.status {
        RunStatus::Completed => {
            let result = result_message(policy.format, job, report, claim.attempt);
            (
                Finish::Publish {
                    result,
                    dead_letter: None,
                },
                Verdict::Completed,
            )
        }
        RunStatus::Halted if policy.pauses => match pending_for(policy.queue, claim, report) {
            Some(pending) => {
                let result = awaiting_message(policy.format, job, report, &pending);
                let pending = serde_json::to_vec(&pending).unwrap_or_default();
                (Finish::Pause { result, pending }, Verdict::Halted)
            }
            None => {
                let result = result_message(policy.format, job, report, claim.attempt);
                (
                    Finish::Publish {
                        result,
                        dead_letter: None,
                    },
                    Verdict::Halted,
                )
            }
        },
        RunStatus::Halted | RunStatus::Running => {
            let result = result_message(policy.format, job, report, claim.attempt);
            (
                Finish::Publish {
                    result,
                    dead_letter: None,
                },
                Verdict::Halted,
            )
        }
        RunStatus::Failed { reason } => {
            if retry.retry_failed_runs && claim.attempt < retry.attempts {
                let error = format!("run {} failed: {reason}", report.run_id);
                retry_or_dead(policy, claim, error, false)
            } else {
                let result = result_message(policy.format, job, report, claim.attempt);
                let dead_letter = retry.retry_failed_runs.then(|| {
                    dead_letter(claim, &format!("run {} failed: {reason}", report.run_id))
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

/// The pending record for a run halted at a jury (from its last step's `halt` marker).
fn pending_for(queue: &str, claim: &Claim, report: &JobReport) -> Option<Pending> {
    let halt = report.last_step.as_ref()?.get("halt")?;
    let request = DecisionRequest::from_halt(halt)?;
    let node = report
        .last_step
        .as_ref()
        .and_then(|s| s.get("node_id"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some(Pending {
        job_id: claim.job_id.clone(),
        run_id: report.run_id.clone(),
        queue: queue.to_string(),
        node,
        step: report.steps as u64,
        request,
        awaiting_since: halted_at(&report.last_step).unwrap_or_else(crate::clock::now_utc),
        payload: String::from_utf8_lossy(&claim.payload).into_owned(),
        expires_at_ms: request_expiry(&report.last_step),
        attempt: claim.attempt.saturating_sub(1),
        history: claim.history.clone(),
    })
}

/// Another attempt after the backoff, or the dead letters once the attempts are spent.
/// `keep_run`: see [`Finish::Retry`].
pub(super) fn retry_or_dead(
    policy: &Policy,
    claim: &Claim,
    error: String,
    keep_run: bool,
) -> (Finish, Verdict) {
    if claim.attempt < policy.retry.attempts {
        let delay = policy.backoff.delay(claim.attempt);
        let keep_run = keep_run && policy.durable;
        (
            Finish::Retry {
                delay,
                error,
                keep_run,
            },
            Verdict::Retry,
        )
    } else {
        let reason = format!("gave up after {} attempts: {error}", claim.attempt);
        let mut dead = dead_letter(claim, &reason);
        // Infrastructure gave out, not the run: a redrive resumes it.
        dead.keep_run = keep_run && policy.durable;
        (Finish::DeadLetter(dead), Verdict::DeadLetter)
    }
}

/// A message the worker cannot start or resume (unreadable, a checkpoint or journal that
/// fails verification, a graph changed under a run): a dead letter
/// that keeps the job's stored run. The journal is the only evidence of the steps already
/// taken (no final log exists), of tampering too, and a redrive after the cause is fixed
/// resumes after the last finished step instead of running them again.
/// A job whose worker died `max_recoveries` times while running it is dead-lettered instead of
/// run again (its run kept, so a redrive after the fix resumes). `at` names where the run
/// stood: the step it was in when its workers died.
pub(super) fn too_many_recoveries(
    policy: &Policy,
    claim: &Claim,
    at: &str,
) -> Option<(Finish, Verdict)> {
    if claim.recoveries < policy.max_recoveries {
        return None;
    }
    let reason = format!(
        "its worker died {} times while running it ({at}); worker.max_recoveries is {}",
        claim.recoveries, policy.max_recoveries
    );
    warn!(job_id = %claim.job_id, %reason, "poison job: dead-lettered");
    Some(refused(policy, claim, &reason))
}

pub(super) fn refused(policy: &Policy, claim: &Claim, reason: &str) -> (Finish, Verdict) {
    let dead = DeadLetter {
        keep_run: policy.durable,
        ..dead_letter(claim, reason)
    };
    (Finish::DeadLetter(dead), Verdict::DeadLetter)
}

fn dead_letter(claim: &Claim, reason: &str) -> DeadLetter {
    let mut attempts = claim.history.clone();
    attempts.push(AttemptRecord {
        attempt: claim.attempt,
        at: crate::clock::now_utc(),
        error: reason.to_string(),
    });
    DeadLetter {
        job_id: claim.job_id.clone(),
        reason: reason.to_string(),
        attempts,
        keep_run: false,
    }
}

/// Counts a finished job in its queue's counters: its verdict, and the dead letter a failed
/// result may carry.
pub(super) fn count(s: &Stats, verdict: Verdict, finish: &Finish) {
    match verdict {
        Verdict::Completed => Stats::add(&s.completed, 1),
        Verdict::Failed => {
            Stats::add(&s.failed, 1);
            if matches!(
                finish,
                Finish::Publish {
                    dead_letter: Some(_),
                    ..
                }
            ) {
                Stats::add(&s.dead_lettered, 1);
            }
        }
        Verdict::Halted => Stats::add(&s.halted, 1),
        Verdict::Retry => Stats::add(&s.retried, 1),
        Verdict::DeadLetter => Stats::add(&s.dead_lettered, 1),
        Verdict::Release => Stats::add(&s.released, 1),
    }
}

/// When a halted run's default path is due, from its halt marker.
/// Counted from the halt step itself, not from this pause: a job paused again at the same
/// halt (a copy of it, an ignored unsigned decision) keeps its deadline, or repeated copies
/// would postpone the default path for ever.
fn request_expiry(last_step: &Option<Map<String, Value>>) -> Option<i64> {
    let after = last_step
        .as_ref()?
        .get("halt")?
        .get("expires_after_ms")?
        .as_u64()?;
    let since = halted_at(last_step)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
        .map_or_else(crate::clock::now_ms, |t| t.timestamp_millis());
    Some(since.saturating_add(i64::try_from(after).unwrap_or(i64::MAX)))
}

/// When the halt step ran (its `started_at`), for a halted run's last step.
fn halted_at(last_step: &Option<Map<String, Value>>) -> Option<String> {
    let step = last_step.as_ref()?;
    step.get("halt")?;
    step.get("started_at")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests;
