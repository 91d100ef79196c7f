//! One claim from message to finish: parse, resume or start the run (applying a human decision
//! when the delivery carries one), checkpoint every step, and decide how the claim ends.

use super::outcome::{self, Policy, Verdict};
use super::payload::{parse, ParsedJob};
use super::Worker;
use crate::audit::ledger::{write_ledger_record, AuthorityRecord};
use crate::audit::RunLog;
use crate::durable::{Checkpoint, CheckpointRef, DecisionRequest};
use crate::exec::{Decision, Run, RunStatus};
use crate::job::{drive, log_header, Driven, PersistError, StepSink, Stops};
use crate::queue::{Claim, Fenced, Finish, StepWrite};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
        let Some(runs) = self.worker.backend.runs() else {
            return Err(PersistError::Refused(format!(
                "the {} backend stores no checkpoints",
                self.worker.backend.kind()
            )));
        };
        let mut tries = 0;
        loop {
            match runs
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
                Err(e) if !e.is_retryable() => return Err(PersistError::Refused(e.to_string())),
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
        self.cfg.checkpoints && self.backend.runs().is_some()
    }

    /// Whether a halted run waits for a human (else its halt is the final result).
    pub(super) fn pauses(&self) -> bool {
        self.durable() && self.backend.pauses().is_some()
    }

    /// What the outcome decisions read for a job of queue `qi`.
    fn policy(&self, qi: usize) -> Policy<'_> {
        Policy {
            retry: &self.cfg.retry,
            backoff: &self.backoff,
            durable: self.durable(),
            pauses: self.pauses(),
            format: self.queues[qi].payload,
            queue: &self.queues[qi].names.jobs,
            max_result_bytes: self.cfg.max_result_bytes,
            max_recoveries: self.cfg.max_recoveries,
        }
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
                return outcome::refused(&self.policy(qi), claim, &reason);
            }
        };
        let (mut run, mut log) = match self.start_or_resume(qi, claim, &job).await {
            Ok(pair) => pair,
            Err(Start::Dead(reason)) => {
                warn!(job_id = %claim.job_id, %reason, "cannot resume: dead-lettered");
                return outcome::refused(&self.policy(qi), claim, &reason);
            }
            Err(Start::Store(error)) => {
                return outcome::retry_or_dead(&self.policy(qi), claim, error, true)
            }
        };
        let at = match run.next_node() {
            Some(node) => format!("in step {}, node '{}'", run.steps_taken(), node.id),
            None => format!("after step {}", run.steps_taken()),
        };
        if let Some(end) = outcome::too_many_recoveries(&self.policy(qi), claim, &at) {
            return end;
        }
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
                        return outcome::retry_or_dead(&self.policy(qi), claim, error, true);
                    }
                    if let Some(s) = sink_ref {
                        match s.persist(&run, &log).await {
                            Ok(()) => {}
                            Err(PersistError::Fenced) => {
                                return (Finish::Release, Verdict::Release)
                            }
                            Err(PersistError::Failed(e)) => {
                                return outcome::retry_or_dead(&self.policy(qi), claim, e, true)
                            }
                            Err(PersistError::Refused(e)) => {
                                let reason = format!("the checkpoint store refused the step: {e}");
                                return outcome::refused(&self.policy(qi), claim, &reason);
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
            Ok(Driven::StoreRefused(e)) => {
                let reason = format!("the checkpoint store refused the step: {e}");
                warn!(job_id = %claim.job_id, %reason, "dead-lettered");
                return outcome::refused(&self.policy(qi), claim, &reason);
            }
            Err(e) => {
                // The evidence could not be written: never publish without it.
                let error = format!("cannot write the audit log: {e}");
                warn!(job_id = %claim.job_id, %error, "infrastructure failure");
                return outcome::retry_or_dead(&self.policy(qi), claim, error, true);
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
        let rules = self.policy(qi);
        outcome::fit_result(
            &rules,
            claim,
            outcome::finish_for(&rules, claim, &job, &report),
        )
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
        let runs = self
            .backend
            .runs()
            .filter(|_| self.durable() && !claim.fresh);
        let stored =
            match runs {
                Some(runs) => runs.load_run(names, &claim.job_id).await.map_err(|e| {
                    match e.is_retryable() {
                        true => Start::Store(format!("cannot read the checkpoint: {e}")),
                        false => Start::Dead(format!("the stored run is unreadable: {e}")),
                    }
                })?,
                None => None,
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
            timestamp: crate::clock::now_utc(),
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

/// Why a run could not be started or resumed.
enum Start {
    /// The stored run cannot be trusted or used: dead-letter with the reason.
    Dead(String),
    /// The store did not answer: retry later.
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::{already_applied, answers_this_halt};
    use crate::audit::runlog::{RunLog, RunLogHeader};
    use crate::exec::{Decision, StepRecord};
    use serde_json::{json, Map, Value};

    fn log_of(steps: &[Value]) -> RunLog {
        let mut log = RunLog::new(RunLogHeader {
            run_id: "00000000-0000-4000-8000-000000000000".into(),
            user_id: None,
            timestamp: "t".into(),
            job_id: "j".into(),
            graph_name: "g".into(),
            graph_digest: "d".into(),
        });
        for (i, extra) in steps.iter().enumerate() {
            let mut rec: Map<String, Value> = extra.as_object().cloned().unwrap_or_default();
            rec.insert("step".into(), Value::from(i as u64));
            log.append(StepRecord::new(rec), None);
        }
        log
    }

    fn decision(step: Option<u64>) -> Decision {
        Decision {
            choice: "approve".into(),
            rationale: "ok".into(),
            decided_by: "a@x".into(),
            role: None,
            step,
            signature: None,
        }
    }

    #[test]
    fn a_decision_answers_only_the_halt_its_step_names() {
        // Halted after one step: the decision for this halt has step 1.
        let log = log_of(&[json!({"halt": {"node": "first"}})]);
        assert!(answers_this_halt(&log, &decision(Some(1))));
        // A copy of an earlier decision, or one for a later halt, does not.
        assert!(!answers_this_halt(&log, &decision(Some(0))));
        assert!(!answers_this_halt(&log, &decision(Some(2))));
    }

    #[test]
    fn a_late_copy_meets_the_next_halt_and_is_refused() {
        // first jury halted (0), decided (1), second jury halted (2): a copy of the first
        // decision (step 1) arrives while the run waits at step 3.
        let log = log_of(&[
            json!({"halt": {"node": "first"}}),
            json!({"decision": {"choice": "approve", "decided_by": "a@x", "rationale": "ok"}}),
            json!({"halt": {"node": "second"}}),
        ]);
        assert!(!answers_this_halt(&log, &decision(Some(1))));
        assert!(answers_this_halt(&log, &decision(Some(3))));
    }

    #[test]
    fn a_decision_without_a_step_is_refused_only_when_just_applied() {
        let applied = log_of(&[
            json!({"halt": {"node": "first"}}),
            json!({"decision": {"choice": "approve", "decided_by": "a@x", "rationale": "ok"}}),
        ]);
        assert!(already_applied(&applied, &decision(None)));
        assert!(!answers_this_halt(&applied, &decision(None)));
        // Halted again since: the same words may answer the new halt.
        let halted_again = log_of(&[
            json!({"halt": {"node": "first"}}),
            json!({"decision": {"choice": "approve", "decided_by": "a@x", "rationale": "ok"}}),
            json!({"halt": {"node": "second"}}),
        ]);
        assert!(answers_this_halt(&halted_again, &decision(None)));
        // Another author's decision was not applied.
        let other = Decision {
            decided_by: "b@x".into(),
            ..decision(None)
        };
        assert!(answers_this_halt(&applied, &other));
    }
}
