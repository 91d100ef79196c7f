//! Human decisions that arrive as data: messages on a queue's decisions queue, and the system's
//! default decision when a pending job expires. Both go through [`crate::decide`].

use super::Worker;
use crate::decide::{submit, submit_for, Refusal};
use crate::durable::Pending;
use crate::exec::Decision;
use crate::queue::{Claim, DeadLetter, Finish};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

impl Worker {
    /// Consumes the decisions queue of queue `qi` until shutdown.
    pub(super) async fn decision_loop(self: Arc<Self>, qi: usize, shutdown: CancellationToken) {
        let Some(dq) = self.queues[qi].decisions.clone() else {
            return;
        };
        let mut failures = 0;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let Some(claimed) = self.claim_or_stop(&dq, 16, &shutdown).await else {
                return;
            };
            let claims = match claimed {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err(e) => {
                    failures += 1;
                    warn!(queue = %dq.jobs, error = %e, "claiming decisions failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(crate::backoff::Backoff::reconnect().delay(failures)) => continue,
                    }
                }
            };
            // Every claim of the batch is renewed until its own finish.
            let held: Vec<_> = claims
                .iter()
                .map(|c| super::Holding::decision(&self, qi, c))
                .collect();
            for (claim, holding) in claims.iter().zip(held) {
                // On shutdown what is left of the batch goes back untouched, for a replica.
                let finish = if shutdown.is_cancelled() {
                    Finish::Release
                } else {
                    self.decide_from_message(qi, claim).await
                };
                self.finishing(qi, super::Lane::Decisions, claim);
                self.finish_decision(&dq, claim, finish, &shutdown).await;
                drop(holding);
            }
        }
    }

    /// Finishes a decision message, trying again on a store error for as long as the worker
    /// runs (the claim is held, its lease renewed), unlike job finishes (bounded). Giving up would leave
    /// an AMQP delivery unacked on a live channel, which no lease brings back: the human's
    /// decision would wait for the broker's consumer timeout (30 min by default) or for ever.
    /// On shutdown it is left to redelivery.
    async fn finish_decision(
        &self,
        dq: &crate::queue::QueueNames,
        claim: &Claim,
        finish: Finish,
        shutdown: &CancellationToken,
    ) {
        let mut tries = 0u32;
        loop {
            match self.backend.finish(dq, claim, finish.clone()).await {
                Ok(_) => return,
                Err(e) if shutdown.is_cancelled() => {
                    warn!(job_id = %claim.job_id, error = %e, "cannot finish a decision message; it will be redelivered");
                    return;
                }
                Err(e) => {
                    tries = tries.saturating_add(1);
                    warn!(job_id = %claim.job_id, error = %e, tries, "cannot finish a decision message; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(crate::backoff::Backoff::reconnect().delay(tries)) => {}
                    }
                }
            }
        }
    }

    /// One decision message: submitted, or rejected with a reply saying why.
    async fn decide_from_message(&self, qi: usize, claim: &Claim) -> Finish {
        if let Some(pause) = super::hooks::slow_decisions() {
            tokio::time::sleep(pause).await;
        }
        let names = &self.queues[qi].names;
        let parsed: Result<(String, Decision), String> =
            super::payload::within_size(&claim.payload, self.cfg.max_message_bytes)
                .and_then(|()| {
                    serde_json::from_slice::<Value>(&claim.payload)
                        .map_err(|e| format!("invalid JSON: {e}"))
                })
                .and_then(|v| {
                    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                    let job_id = s("job_id").ok_or("a decision needs 'job_id'")?;
                    let choice = s("choice").ok_or("a decision needs 'choice'")?;
                    let by = s("by")
                        .or_else(|| s("decided_by"))
                        .ok_or("a decision needs 'by' (who decides)")?;
                    Ok((
                        job_id,
                        Decision {
                            choice,
                            rationale: s("rationale").unwrap_or_default(),
                            decided_by: by,
                            role: s("role"),
                            step: None,
                            signature: None,
                        },
                    ))
                });
        let (job_id, decision) = match parsed {
            Ok(p) => p,
            Err(reason) => {
                return Finish::DeadLetter(DeadLetter {
                    job_id: claim.job_id.clone(),
                    reason,
                    attempts: claim.history.clone(),
                    keep_run: false,
                })
            }
        };
        let reply = match submit(
            self.backend.as_ref(),
            names,
            &job_id,
            &decision,
            self.audit.secret.as_ref(),
        )
        .await
        {
            Ok(()) => {
                info!(%job_id, choice = %decision.choice, "decision accepted from the decisions queue");
                json!({"job_id": job_id, "status": "accepted", "choice": decision.choice})
            }
            Err(Refusal::Store(e)) => {
                return Finish::Retry {
                    delay: self.backoff.delay(claim.attempt),
                    error: e.to_string(),
                    keep_run: false,
                }
            }
            Err(e) => {
                warn!(%job_id, reason = %e, "decision rejected");
                json!({"job_id": job_id, "status": "rejected", "reason": e.to_string()})
            }
        };
        Finish::Publish {
            result: reply.to_string().into_bytes(),
            dead_letter: None,
        }
    }

    /// Runs the default path of every pending job whose expiry has passed.
    pub(super) async fn expire_pending(&self) {
        let Some(pauses) = self.backend.pauses().filter(|_| self.pauses()) else {
            return;
        };
        let now = crate::clock::now_ms();
        for q in &self.queues {
            let Ok(items) = pauses.list_pending(&q.names).await else {
                continue;
            };
            for raw in items {
                let Ok(p) = serde_json::from_slice::<Pending>(&raw) else {
                    continue;
                };
                let Some(decision) = p.expiry_decision(now) else {
                    continue;
                };
                match submit_for(
                    self.backend.as_ref(),
                    &q.names,
                    &p,
                    &decision,
                    self.audit.secret.as_ref(),
                )
                .await
                {
                    Ok(()) => {
                        info!(job_id = %p.job_id, choice = %decision.choice, "no decision in time: the default path runs")
                    }
                    // Another replica got there first, or a human just decided.
                    Err(Refusal::NotPending(_)) => {}
                    Err(e) => {
                        warn!(job_id = %p.job_id, error = %e, "cannot apply the expiry decision")
                    }
                }
            }
        }
    }
}
