//! How a claim ends: publishing its result (and dead letter), pausing it for a human and
//! resuming it with the decision, a retry through the delay queue, a dead letter; each
//! confirmed before the ack, and the run retired in the store just before it.

use super::claims::Held;
use super::dedupe::MARKER_TTL_SECS;
use super::headers::{
    carried_headers, header_text, job_props, result_meta, text, DECISION_HEADER, FAILED_AT_HEADER,
    PERSISTENT,
};
use super::publish::{Confirms, Publisher};
use super::{lock, Shared, Topology};
use crate::queue::run_store::{Deciding, Paused, RunStore};
use crate::queue::{failed_attempt, Claim, DeadLetter, Fenced, QueueError, QueueNames};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use std::time::Duration;
use tracing::{info, warn};

/// How long a finished run stays after its retirement, in case its delivery was never acked
/// and comes back to resume it (see `RunStore::retire`): as long as a done marker.
const RETIRED_RUN_KEPT: Duration = Duration::from_secs(MARKER_TTL_SECS);

/// The messages of one finish, to tell their confirms apart.
#[derive(Clone, Copy)]
enum Part {
    Result,
    Reply,
    DeadLetter,
}

impl Shared {
    fn dead_letter_props(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        dl: &DeadLetter,
    ) -> BasicProperties {
        let mut headers = carried_headers(&h.props);
        headers.insert("x-lar-reason".into(), text(&dl.reason));
        headers.insert(
            "x-lar-history".into(),
            text(&serde_json::to_string(&dl.attempts).unwrap_or_else(|_| "[]".into())),
        );
        headers.insert("x-lar-job-id".into(), text(&dl.job_id));
        headers.insert("x-lar-queue".into(), text(&q.jobs));
        headers.insert(FAILED_AT_HEADER.into(), text(&crate::clock::now_utc()));
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        job_props(&h.props, &claim.job_id, headers)
    }

    pub(super) async fn finish_publish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: Vec<u8>,
        dead_letter: Option<DeadLetter>,
    ) -> Result<Fenced, QueueError> {
        let marker = Self::memo_key(q, &claim.job_id, h);
        if self.already_done(&marker).await? {
            info!(job_id = %claim.job_id, "a result for this job is already published (a redelivery): acking without publishing again");
            self.retire(q, claim).await;
            return Ok(self.ack(h).await);
        }
        let ch = self.publisher().await?;
        // Parts a previous try of this finish got confirmed are not sent again.
        let mut parts = Vec::new();
        let mut pending = Vec::new();
        if !h.sent.result {
            let (result_part, reply_part) = Self::publish_result(&ch, q, claim, h, &result).await?;
            parts.push(Part::Result);
            pending.push(result_part);
            if let Some(reply) = reply_part {
                parts.push(Part::Reply);
                pending.push(reply);
            }
        }
        if let (Some(dl), false) = (&dead_letter, h.sent.dead_letter) {
            let t = Topology::of(q);
            parts.push(Part::DeadLetter);
            pending.push(
                Self::publish(
                    &ch,
                    &t.dlx,
                    &t.jobs,
                    true,
                    &claim.payload,
                    self.dead_letter_props(q, claim, h, dl),
                    format!("dead letter (exchange '{}')", t.dlx),
                )
                .await?,
            );
        }
        let confirmed = Self::confirm_each(&ch, pending).await.and_then(|outcomes| {
            let mut first_error = None;
            let mut held = lock(&self.held);
            let entry = held.get_mut(&(claim.job_id.clone(), claim.epoch));
            let mut sent = entry.as_ref().map(|e| e.sent).unwrap_or_default();
            for (part, outcome) in parts.iter().zip(outcomes) {
                match (part, outcome) {
                    (Part::Result, Ok(())) => sent.result = true,
                    (Part::DeadLetter, Ok(())) => sent.dead_letter = true,
                    (Part::Reply, Ok(())) => {}
                    // The reply is the caller's copy, and its queue is the caller's: a full
                    // or vanished one must not hold the job (the results queue has the result).
                    (Part::Reply, Err(e)) => {
                        warn!(job_id = %claim.job_id, error = %e, "the reply_to copy was not taken; the result is in the results queue")
                    }
                    (_, Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(entry) = entry {
                entry.sent = sent;
            }
            first_error.map_or(Ok(()), Err)
        });
        if let Err(e) = confirmed {
            if self.is_live(h) {
                return Err(e); // refused or unroutable: nothing acked, the worker retries
            }
            // The connection died with the result unconfirmed: the broker may have stored it
            // or not, and cannot be asked. The delivery comes back and publishes again, so
            // this job may end with two results (the one window the done marker cannot close).
            warn!(job_id = %claim.job_id, error = %e,
                  "result unconfirmed when the connection died: the redelivery publishes it again (possible duplicate result)");
            return Ok(Fenced::Lost);
        }
        self.mark_done(marker, &claim.job_id).await;
        self.retire(q, claim).await;
        let fenced = self.ack(h).await;
        if fenced == Fenced::Lost {
            info!(job_id = %claim.job_id, "result published but the ack was lost: the redelivery will be acked by the done marker");
        }
        Ok(fenced)
    }

    /// Publishes a result (final or `awaiting_decision`) to the results queue, and to the
    /// job's `reply_to` with its `correlation_id` when it has one; returns the confirms (the
    /// result's, the reply's).
    async fn publish_result(
        ch: &Publisher,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: &[u8],
    ) -> Result<Confirms, QueueError> {
        let (run_id, status, signature) = result_meta(result);
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("x-run-id", run_id),
            ("x-status", status),
            ("x-signature", signature),
        ] {
            if let Some(v) = v {
                headers.insert(k.into(), text(&v));
            }
        }
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(claim.job_id.as_str()))
            .with_app_id("lar-worker".into())
            .with_headers(headers);
        if let Some(c) = h.props.correlation_id() {
            props = props.with_correlation_id(c.clone());
        }
        let result_part = Self::publish(
            ch,
            "",
            &q.results,
            true,
            result,
            props.clone(),
            format!("result (queue '{}')", q.results),
        )
        .await?;
        let mut reply_part = None;
        if let Some(reply_to) = h
            .props
            .reply_to()
            .as_ref()
            .filter(|r| !r.as_str().is_empty())
        {
            // Not mandatory: an RPC caller that went away must not block the job.
            reply_part = Some(
                Self::publish(
                    ch,
                    "",
                    reply_to.as_str(),
                    false,
                    result,
                    props,
                    format!("reply (reply_to '{}')", reply_to.as_str()),
                )
                .await?,
            );
        }
        Ok((result_part, reply_part))
    }

    /// Pauses a run for a human: the pending record into the store (fenced on the epoch),
    /// the `awaiting_decision` result out with its confirm, then the ack.
    pub(super) async fn finish_pause(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: Vec<u8>,
        pending: Vec<u8>,
    ) -> Result<Fenced, QueueError> {
        let Some(runs) = &self.runs else {
            // Unreachable: the worker pauses only on backends that support it.
            warn!(job_id = %claim.job_id, "no checkpoint store to pause in: publishing the awaiting_decision result as final");
            return self.finish_publish(q, claim, h, result, None).await;
        };
        let failed_at = h
            .props
            .headers()
            .as_ref()
            .and_then(|hs| header_text(hs, FAILED_AT_HEADER));
        let props = serde_json::json!({
            "reply_to": h.props.reply_to().as_ref().map(|r| r.as_str().to_string()),
            "correlation_id": h.props.correlation_id().as_ref().map(|c| c.as_str().to_string()),
            // A redriven job's life (see `memo_key`) goes on after the decision: without it,
            // the resumed run would find the first life's done marker and publish nothing.
            "failed_at": failed_at,
        })
        .to_string();
        match runs
            .pause(q, claim, &pending, &props, claim.decision.is_some())
            .await?
        {
            Paused::Stored => {}
            Paused::AlreadyDecided => {
                // This delivery is a copy of a job a human has already answered; the
                // decision's own message resumes the run.
                info!(job_id = %claim.job_id, "a decision for this job is already on its way: acking the copy");
                return Ok(self.ack(h).await);
            }
            Paused::Fenced => {
                // A newer delivery of the same job id holds the run; this copy is redundant.
                self.ack(h).await;
                return Ok(Fenced::Lost);
            }
        }
        let ch = self.publisher().await?;
        let (result_part, reply_part) = Self::publish_result(&ch, q, claim, h, &result).await?;
        let mut outcomes = Self::confirm_each(
            &ch,
            std::iter::once(result_part).chain(reply_part).collect(),
        )
        .await?
        .into_iter();
        outcomes.next().unwrap_or(Ok(()))?;
        if let Some(Err(e)) = outcomes.next() {
            warn!(job_id = %claim.job_id, error = %e, "the reply_to copy was not taken; the result is in the results queue");
        }
        Ok(self.ack(h).await)
    }

    /// Publishes the message that resumes a decided job (its original payload, the decision
    /// in a header), and drops the store's `deciding` entry once the broker confirms it.
    pub(super) async fn publish_decision(
        &self,
        q: &QueueNames,
        runs: &dyn RunStore,
        job_id: &str,
        entry: &Deciding,
    ) -> Result<(), QueueError> {
        let pending: crate::durable::Pending =
            serde_json::from_str(&entry.pending).map_err(|e| {
                QueueError::Corrupt(format!(
                    "the pending record of job {job_id} is unreadable: {e}"
                ))
            })?;
        let props: serde_json::Value = serde_json::from_str(&entry.props).unwrap_or_default();
        let mut headers = FieldTable::default();
        headers.insert(DECISION_HEADER.into(), text(&entry.decision));
        // The failed attempts before the pause go on with the job.
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(pending.attempt)),
        );
        if !pending.history.is_empty() {
            headers.insert(
                "x-lar-history".into(),
                text(&serde_json::to_string(&pending.history).unwrap_or_else(|_| "[]".into())),
            );
        }
        if let Some(at) = props.get("failed_at").and_then(|v| v.as_str()) {
            headers.insert(FAILED_AT_HEADER.into(), text(at));
        }
        let mut p = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(job_id))
            .with_app_id("lar-worker".into())
            .with_headers(headers);
        if let Some(r) = props.get("reply_to").and_then(|v| v.as_str()) {
            p = p.with_reply_to(ShortString::from(r));
        }
        if let Some(c) = props.get("correlation_id").and_then(|v| v.as_str()) {
            p = p.with_correlation_id(ShortString::from(c));
        }
        let ch = self.publisher().await?;
        let confirm = Self::publish(
            &ch,
            "",
            &q.jobs,
            true,
            pending.payload.as_bytes(),
            p,
            format!("decided job (queue '{}')", q.jobs),
        )
        .await?;
        Self::confirmed(&ch, vec![confirm]).await?;
        runs.decided(q, job_id, pending.step).await
    }

    pub(super) async fn finish_retry(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        delay: Duration,
        error: String,
        keeps_decision: bool,
    ) -> Result<Fenced, QueueError> {
        let history = failed_attempt(
            &claim.history,
            claim.attempt,
            error,
            crate::clock::now_utc(),
        );
        let mut headers = carried_headers(&h.props);
        if !keeps_decision {
            let mut without = FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != DECISION_HEADER {
                    without.insert(k.clone(), v.clone());
                }
            }
            headers = without;
        }
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        headers.insert(
            "x-lar-history".into(),
            text(&serde_json::to_string(&history).unwrap_or_else(|_| "[]".into())),
        );
        // The delay rounded up to its bucket (`Topology::delay_for`). The queue's TTL is the
        // bucket's; the message carries it too, for a bucket an operator created without one.
        let t = Topology::of(q);
        let bucket = t.delay_for(delay);
        let props = job_props(&h.props, &claim.job_id, headers)
            .with_expiration(ShortString::from(bucket.after.as_millis().to_string()));
        let ch = self.publisher().await?;
        let pending = vec![
            Self::publish(
                &ch,
                "",
                &bucket.queue,
                true,
                &claim.payload,
                props,
                format!("retry (queue '{}')", bucket.queue),
            )
            .await?,
        ];
        Self::confirmed(&ch, pending).await?;
        Ok(self.ack(h).await)
    }

    /// Retires the claim's run just before the ack that ends it, so a crash between the ack
    /// and `end_run` (after it, in `finish`) leaves no run for ever (`RunStore::retire`). A
    /// store that fails only risks that orphan: the finish goes on.
    async fn retire(&self, q: &QueueNames, claim: &Claim) {
        if let Some(runs) = &self.runs {
            if let Err(e) = runs.retire(q, claim, RETIRED_RUN_KEPT).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot retire the finished run");
            }
        }
    }

    pub(super) async fn finish_dead(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        dl: DeadLetter,
    ) -> Result<Fenced, QueueError> {
        let t = Topology::of(q);
        let ch = self.publisher().await?;
        let pending = vec![
            Self::publish(
                &ch,
                &t.dlx,
                &t.jobs,
                true,
                &claim.payload,
                self.dead_letter_props(q, claim, h, &dl),
                format!("dead letter (exchange '{}')", t.dlx),
            )
            .await?,
        ];
        Self::confirmed(&ch, pending).await?;
        if !dl.keep_run {
            self.retire(q, claim).await;
        }
        Ok(self.ack(h).await)
    }
}
