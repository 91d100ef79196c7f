//! One claim from message to finish: parse, resume or start the run (applying a human decision
//! when the delivery carries one), checkpoint every step, and decide how the claim ends.

use super::payload::{awaiting_message, parse, result_message, without_state, ParsedJob};
use super::Worker;
use crate::audit::ledger::{write_ledger_record, AuthorityRecord};
use crate::audit::RunLog;
use crate::durable::{Checkpoint, CheckpointRef, DecisionRequest, Pending};
use crate::exec::{Decision, Run, RunStatus};
use crate::job::{drive, log_header, Driven, JobReport, PersistError, StepSink, Stops};
use crate::queue::{AttemptRecord, Claim, DeadLetter, Fenced, Finish, StepWrite};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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

/// Saves each step's record and checkpoint through the backend, fenced on the claim.
struct CheckpointSink<'a> {
    worker: &'a Worker,
    qi: usize,
    claim: &'a Claim,
}

#[async_trait::async_trait]
impl StepSink for CheckpointSink<'_> {
    async fn persist(&self, run: &Run, log: &RunLog) -> Result<(), PersistError> {
        let Some(last) = log.last_step() else {
            return Ok(());
        };
        self.worker.steps.observe(last);
        self.worker.touch();
        if !self.worker.durable() {
            return Ok(());
        }
        // The journal keeps the record's canonical bytes, chain included, as signed.
        let record = log.last_canonical().unwrap_or_default();
        let h = &log.header;
        let checkpoint = CheckpointRef {
            job_id: &self.claim.job_id,
            run_id: run.run_id(),
            graph_name: &h.graph_name,
            graph_digest: &h.graph_digest,
            user_id: h.user_id.as_deref(),
            started_at: &h.timestamp,
            attempt: self.claim.attempt,
            epoch: self.claim.epoch,
            chain_head: log.chain_head(),
            position: run.position_ref(),
        }
        .encode(self.worker.audit.secret.as_ref());
        let names = &self.worker.queues[self.qi].names;
        let mut tries = 0;
        loop {
            match self
                .worker
                .backend
                .save_step(
                    names,
                    self.claim,
                    StepWrite {
                        index: log.len() as u64 - 1,
                        record,
                        checkpoint: &checkpoint,
                    },
                )
                .await
            {
                Ok(Fenced::Done) => return Ok(()),
                Ok(Fenced::Lost) => return Err(PersistError::Fenced),
                Err(e) if tries < 3 => {
                    tries += 1;
                    warn!(error = %e, "checkpoint write failed; retrying");
                    tokio::time::sleep(crate::backoff::Backoff::reconnect().delay(tries)).await;
                }
                Err(e) => return Err(PersistError::Failed(e.to_string())),
            }
        }
    }
}

impl Worker {
    pub(super) fn durable(&self) -> bool {
        self.cfg.checkpoints && self.backend.supports_checkpoints()
    }

    /// Whether a halted run waits for a human (else its halt is the final result).
    pub(super) fn pauses(&self) -> bool {
        self.durable() && self.backend.supports_pause()
    }

    /// Decides how `claim` ends. Never fails: every problem becomes a retry or a dead letter.
    pub(super) async fn process(
        &self,
        qi: usize,
        claim: &Claim,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> (Finish, Verdict) {
        let queue = &self.queues[qi];
        let job = match parse(queue, &claim.payload, self.cfg.max_message_bytes) {
            Ok(j) => j,
            Err(reason) => {
                warn!(job_id = %claim.job_id, %reason, "bad message: dead-lettered");
                return self.refused(claim, &reason);
            }
        };
        let (mut run, mut log) = match self.start_or_resume(qi, claim, &job).await {
            Ok(pair) => pair,
            Err(Start::Dead(reason)) => {
                warn!(job_id = %claim.job_id, %reason, "cannot resume: dead-lettered");
                return self.refused(claim, &reason);
            }
            Err(Start::Store(error)) => return self.retry_or_dead(claim, error, true),
        };
        let sink = CheckpointSink {
            worker: self,
            qi,
            claim,
        };
        let sink_ref: Option<&dyn StepSink> = if self.durable() { Some(&sink) } else { None };

        if let Some(decision) = claim
            .decision
            .as_ref()
            .filter(|d| self.authentic(claim, d))
            .filter(|d| answers_this_halt(&log, d))
        {
            match run.decide(decision) {
                Ok(record) => {
                    log.append(record, self.audit.secret.as_ref());
                    // The evidence of the decision first: a decision step is saved (and the
                    // run goes on) only once its ledger record is on disk. A crash in between
                    // applies the decision again from the same delivery and rewrites the same
                    // ledger file; a failed write never leaves an applied, unrecorded decision.
                    if let Err(error) = self.record_authority(&run, &log, decision).await {
                        warn!(job_id = %claim.job_id, %error, "decision not applied");
                        return self.retry_or_dead(claim, error, true);
                    }
                    if let Some(s) = sink_ref {
                        match s.persist(&run, &log).await {
                            Ok(()) => {}
                            Err(PersistError::Fenced) => {
                                return (Finish::Release, Verdict::Release)
                            }
                            Err(PersistError::Failed(e)) => {
                                return self.retry_or_dead(claim, e, true)
                            }
                        }
                    }
                }
                Err(e) => {
                    // `decide` and the decisions queue check choices first, so only an unchecked
                    // decision (no secret: nothing is signed) gets here. It is refused and the
                    // job waits for a decision again, as for an unsigned one.
                    warn!(job_id = %claim.job_id, error = %e,
                          "decision refused: the job waits for a decision again");
                }
            }
        }

        // With checkpoints, a shutdown hands the job back at the next step boundary (it resumes
        // elsewhere); without, the run gets the drain deadline to finish.
        let stops = Stops {
            at_boundary: if self.durable() {
                shutdown.clone()
            } else {
                CancellationToken::new()
            },
            abort: hard_stop.clone(),
        };
        let report = match drive(run, log, &self.registry, &self.audit, &stops, sink_ref).await {
            Ok(Driven::Ended(r)) => *r,
            Ok(Driven::Interrupted) | Ok(Driven::Fenced) => {
                return (Finish::Release, Verdict::Release)
            }
            Ok(Driven::StoreFailed(e)) => {
                warn!(job_id = %claim.job_id, error = %e, "checkpoint store failing: handing the job back");
                return (Finish::Release, Verdict::Release);
            }
            Err(e) => {
                // The evidence could not be written: never publish without it.
                let error = format!("cannot write the audit log: {e}");
                warn!(job_id = %claim.job_id, %error, "infrastructure failure");
                return self.retry_or_dead(claim, error, true);
            }
        };
        // A completed run is counted in the metrics and evidenced by its signed log; a line per
        // job at info cost 5 % of the worker's CPU at 3,000 jobs/s (perf). Failed and halted
        // runs are what an operator looks for, so they stay at info.
        if matches!(report.status, RunStatus::Completed) {
            debug!(job_id = %claim.job_id, run_id = %report.run_id, status = report.status_name(),
                   steps = report.steps, attempt = claim.attempt, "run ended");
        } else {
            info!(job_id = %claim.job_id, run_id = %report.run_id, status = report.status_name(),
                  steps = report.steps, attempt = claim.attempt, "run ended");
        }
        self.fit_result(qi, claim, self.finish_for(qi, claim, &job, &report))
    }

    /// Keeps what is published within `worker.max_result_bytes`: an oversized result goes out
    /// without its state (see [`without_state`]), a final one as a failure with a dead letter,
    /// so an operator sees it; retrying could never make it fit.
    fn fit_result(
        &self,
        qi: usize,
        claim: &Claim,
        (finish, verdict): (Finish, Verdict),
    ) -> (Finish, Verdict) {
        let max = self.cfg.max_result_bytes;
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
        let format = self.queues[qi].payload;
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
                super::payload::META_KEY: {"job_id": claim.job_id, "status": "failed", "error": reason}
            }))
            .unwrap_or_default()
        });
        let dead_letter = match finish {
            Finish::Publish {
                dead_letter: Some(d),
                ..
            } => d,
            _ => self.dead_letter(claim, &reason),
        };
        (
            Finish::Publish {
                result,
                dead_letter: Some(dead_letter),
            },
            Verdict::Failed,
        )
    }

    fn finish_for(
        &self,
        qi: usize,
        claim: &Claim,
        job: &ParsedJob,
        report: &JobReport,
    ) -> (Finish, Verdict) {
        let queue = &self.queues[qi];
        let retry = &self.cfg.retry;
        match &report.status {
            RunStatus::Completed => {
                let result = result_message(queue.payload, job, report, claim.attempt);
                (
                    Finish::Publish {
                        result,
                        dead_letter: None,
                    },
                    Verdict::Completed,
                )
            }
            RunStatus::Halted if self.pauses() => match self.pending_for(qi, claim, report) {
                Some(pending) => {
                    let result = awaiting_message(queue.payload, job, report, &pending);
                    let pending = serde_json::to_vec(&pending).unwrap_or_default();
                    (Finish::Pause { result, pending }, Verdict::Halted)
                }
                None => {
                    let result = result_message(queue.payload, job, report, claim.attempt);
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
                let result = result_message(queue.payload, job, report, claim.attempt);
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
                    self.retry_or_dead(claim, error, false)
                } else {
                    let result = result_message(queue.payload, job, report, claim.attempt);
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

    /// The pending record for a run halted at a jury (from its last step's `halt` marker).
    fn pending_for(&self, qi: usize, claim: &Claim, report: &JobReport) -> Option<Pending> {
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
            queue: self.queues[qi].names.jobs.clone(),
            node,
            step: report.steps as u64,
            request,
            awaiting_since: halted_at(&report.last_step).unwrap_or_else(crate::exec::run::now_utc),
            payload: String::from_utf8_lossy(&claim.payload).into_owned(),
            expires_at_ms: request_expiry(&report.last_step),
            attempt: claim.attempt.saturating_sub(1),
            history: claim.history.clone(),
        })
    }

    /// A fresh run, or the stored one after a crash, a hand-back or a pause.
    async fn start_or_resume(
        &self,
        qi: usize,
        claim: &Claim,
        job: &ParsedJob,
    ) -> Result<(Run, RunLog), Start> {
        let names = &self.queues[qi].names;
        // A claim the backend found without a run (most first attempts) has none to read.
        let stored = if self.durable() && !claim.fresh {
            self.backend
                .load_run(names, &claim.job_id)
                .await
                .map_err(|e| Start::Store(format!("cannot read the checkpoint: {e}")))?
        } else {
            None
        };
        let Some(stored) = stored else {
            if claim.decision.is_some() {
                return Err(Start::Dead(
                    "a decision arrived for a job with no checkpoint".into(),
                ));
            }
            let run = Run::new(
                job.graph.clone(),
                claim.job_id.clone(),
                crate::ids::new_id(),
                job.input.clone(),
            );
            let log = RunLog::new(log_header(&run, job.user_id.clone()));
            return Ok((run, log));
        };
        let mut ckpt = Checkpoint::decode(&stored.checkpoint, self.audit.secret.as_ref())
            .map_err(|e| Start::Dead(format!("checkpoint refused: {e}")))?;
        if ckpt.graph_digest != job.graph.digest {
            return Err(Start::Dead(format!(
                "checkpoint refused: the run started on graph digest {}, the configured graph is now {}",
                ckpt.graph_digest, job.graph.digest
            )));
        }
        let mut records: Vec<Value> = Vec::with_capacity(stored.journal.len());
        for (i, rec) in stored.journal.iter().enumerate() {
            match crate::json::parse_written(rec) {
                Ok(v @ Value::Object(_)) => records.push(v),
                _ => return Err(Start::Dead(format!("journal record {i} is unreadable"))),
            }
        }
        // The run's state comes from the journal's last record: every link must hold.
        if let Some(secret) = self.audit.secret.as_ref() {
            if let Some(reason) = crate::audit::verify::check_chain(&records, &ckpt.run_id, secret)
            {
                return Err(Start::Dead(format!("journal refused: {reason}")));
            }
        }
        let journal: Vec<Map<String, Value>> = records
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect();
        ckpt.restore_from(&journal)
            .map_err(|e| Start::Dead(format!("checkpoint refused: {e}")))?;
        let mut log = RunLog::new(ckpt.header());
        for rec in journal {
            log.restore(rec);
        }
        info!(job_id = %claim.job_id, run_id = %ckpt.run_id, step = ckpt.position.step,
              status = ckpt.position.status.name(), "resuming from checkpoint");
        let run = Run::from_position(job.graph.clone(), ckpt.position).map_err(Start::Dead)?;
        Ok((run, log))
    }

    /// Whether a delivered decision was submitted through `decide`, the decisions queue or
    /// expiry (signed with the workers' secret). One that is not is ignored: the run stays
    /// halted and waits again, and no unsigned claim of a decision reaches the evidence.
    fn authentic(&self, claim: &Claim, d: &Decision) -> bool {
        let Some(secret) = &self.audit.secret else {
            return true;
        };
        let ok = d.verify(&claim.job_id, secret);
        if !ok {
            warn!(job_id = %claim.job_id, decided_by = %d.decided_by,
                  "a decision without a valid signature ignored: the job waits for a decision again");
        }
        ok
    }

    /// Writes the authority ledger record for a decision (Lár's fields plus job, run, step),
    /// `authority_<run_id>_<step>.json`: the same name however often the decision is applied.
    async fn record_authority(
        &self,
        run: &Run,
        log: &RunLog,
        decision: &Decision,
    ) -> Result<(), String> {
        let Some(step) = log.last_step() else {
            return Err("no decision step to record".into());
        };
        let request = log.last_halt().and_then(DecisionRequest::from_halt);
        let (prompt, context_keys, risk) = match &request {
            Some(r) => (
                r.prompt.clone(),
                r.context.keys().cloned().collect::<Vec<_>>(),
                r.context
                    .get("risk")
                    .or_else(|| r.context.get("risk_score"))
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
            None => (String::new(), Vec::new(), Value::Null),
        };
        let record = AuthorityRecord {
            timestamp: crate::exec::run::now_utc(),
            action_description: prompt,
            stakeholder_id: decision.decided_by.clone(),
            stakeholder_role: decision.role.clone(),
            decision: decision.choice.clone(),
            rationale: decision.rationale.clone(),
            risk_score_at_decision: risk,
            context_snapshot_keys: context_keys,
            job_id: run.job_id().to_string(),
            run_id: run.run_id().to_string(),
            step: step.get("step").and_then(Value::as_u64).unwrap_or(0),
        };
        let dir = self.audit.log_dir.clone();
        let secret = self.audit.secret.clone();
        let durable = self.audit.durable;
        let written = tokio::task::spawn_blocking(move || {
            write_ledger_record(&dir, &record, secret.as_ref(), durable)
        })
        .await;
        match written {
            Ok(Ok(path)) => {
                info!(ledger = %path.display(), "authority ledger written");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("cannot write the authority ledger: {e}")),
            Err(e) => Err(format!("the authority ledger writer failed: {e}")),
        }
    }

    /// Another attempt after the backoff, or the dead letters once the attempts are spent.
    /// `keep_run`: see [`Finish::Retry`].
    fn retry_or_dead(&self, claim: &Claim, error: String, keep_run: bool) -> (Finish, Verdict) {
        if claim.attempt < self.cfg.retry.attempts {
            let delay = self.backoff.delay(claim.attempt);
            let keep_run = keep_run && self.durable();
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
            let mut dead = self.dead_letter(claim, &reason);
            // Infrastructure gave out, not the run: a redrive resumes it.
            dead.keep_run = keep_run && self.durable();
            (Finish::DeadLetter(dead), Verdict::DeadLetter)
        }
    }

    /// A message the worker cannot start or resume (unreadable, a checkpoint or journal that
    /// fails verification, a graph changed under a run): a dead letter
    /// that keeps the job's stored run. The journal is the only evidence of the steps already
    /// taken (no final log exists), of tampering too, and a redrive after the cause is fixed
    /// resumes after the last finished step instead of running them again.
    fn refused(&self, claim: &Claim, reason: &str) -> (Finish, Verdict) {
        let dead = DeadLetter {
            keep_run: self.durable(),
            ..self.dead_letter(claim, reason)
        };
        (Finish::DeadLetter(dead), Verdict::DeadLetter)
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
            keep_run: false,
        }
    }
}

/// Whether a delivered decision answers the halt the run waits at now. A decision names the
/// step it becomes; a copy delivered again later (a resume message published twice) names an
/// earlier one and is not applied: the run just resumes, or pauses again at a later jury.
/// Decisions without a step (written before it existed) fall back to comparing with the
/// last decision applied.
fn answers_this_halt(log: &RunLog, d: &Decision) -> bool {
    match d.step {
        Some(step) => step == log.len() as u64,
        None => !already_applied(log, d),
    }
}

/// Whether the run already applied this decision after its last halt.
fn already_applied(log: &RunLog, d: &Decision) -> bool {
    let Some(last) = log.last_decision() else {
        return false;
    };
    let halted_since = log.last_step().is_some_and(|s| s.get("halt").is_some());
    let same = |k: &str, v: &str| last.get(k).and_then(Value::as_str) == Some(v);
    !halted_since
        && same("choice", &d.choice)
        && same("decided_by", &d.decided_by)
        && same("rationale", &d.rationale)
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
        .map_or_else(crate::queue::now_ms, |t| t.timestamp_millis());
    Some(since.saturating_add(i64::try_from(after).unwrap_or(i64::MAX)))
}

/// When the halt step ran (its `started_at`), for a halted run's last step.
fn halted_at(last_step: &Option<Map<String, Value>>) -> Option<String> {
    let step = last_step.as_ref()?;
    step.get("halt")?;
    step.get("started_at")?.as_str().map(str::to_string)
}

/// Why a run could not be started or resumed.
enum Start {
    /// The stored run cannot be trusted or used: dead-letter with the reason.
    Dead(String),
    /// The store did not answer: retry later.
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::request_expiry;
    use serde_json::json;

    #[test]
    fn the_expiry_counts_from_the_halt_step_not_from_each_pause() {
        let halt = json!({"started_at": "2026-01-01T00:00:00.000000Z",
                          "halt": {"expires_after_ms": 60000}});
        let step = halt.as_object().cloned();
        // 2026-01-01T00:00:00Z is 1767225600000 ms since the epoch.
        assert_eq!(request_expiry(&step), Some(1_767_225_600_000 + 60_000));
        // A later pause at the same halt reads the same deadline: it does not move with the clock.
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            request_expiry(&step),
            Some(1_767_225_600_000 + 60_000),
            "the same at every pause"
        );
        let no_expiry = json!({"started_at": "2026-01-01T00:00:00Z", "halt": {}});
        assert_eq!(request_expiry(&no_expiry.as_object().cloned()), None);
    }

    /// The expiry of `step` must fall `after_ms` from the clock read around the call.
    fn expires_from_now(step: serde_json::Value, after_ms: i64) {
        let step = step.as_object().cloned();
        let before = crate::queue::now_ms();
        let expiry = request_expiry(&step).expect("an expiry");
        let after = crate::queue::now_ms();
        assert!(
            (before + after_ms..=after + after_ms).contains(&expiry),
            "{expiry} counts from now ({before}..={after}) plus {after_ms} ms"
        );
    }

    #[test]
    fn without_a_started_at_the_expiry_counts_from_now() {
        expires_from_now(json!({"halt": {"expires_after_ms": 60000}}), 60_000);
    }

    #[test]
    fn a_garbled_started_at_counts_from_now() {
        expires_from_now(
            json!({"started_at": "yesterday-ish", "halt": {"expires_after_ms": 60000}}),
            60_000,
        );
        expires_from_now(
            json!({"started_at": 1767225600, "halt": {"expires_after_ms": 60000}}),
            60_000,
        );
    }

    #[test]
    fn an_expiry_too_large_saturates() {
        let step = json!({"started_at": "2026-01-01T00:00:00Z",
                          "halt": {"expires_after_ms": u64::MAX}});
        assert_eq!(request_expiry(&step.as_object().cloned()), Some(i64::MAX));
    }
}
