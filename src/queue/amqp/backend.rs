//! The four roles of the AMQP backend (consumer, admin, and, with a `checkpoint_store`, runs
//! and pauses), in terms of the pieces in the sibling modules (consumers, claims, finishes,
//! the run store, operator reads).

use super::admin::dead_entry;
use super::connection::io;
use super::headers::PERSISTENT;
use super::{lock, AmqpBackend, Shared, Topology};
use crate::queue::{
    envelope_id, rules, Admin, Backend, Claim, Consumer, DecisionFate, Fenced, Finish, Message,
    Pauses, QueueDepth, QueueError, QueueNames, RunFate, Runs, StepWrite, StoredRun,
};
use async_trait::async_trait;
use lapin::options::{BasicCancelOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{info, warn};

/// A decision still in the store's `deciding` hash after this long is published again.
const DECISION_REDELIVER_AFTER: Duration = Duration::from_secs(60);

#[async_trait]
impl Consumer for AmqpBackend {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        _lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        let s = &self.shared;
        s.ensure_consumer(q).await?;
        let buffer = s.buffer(&q.jobs);
        let mut rx = buffer.rx.lock().await;
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut unnamed = Vec::new();
        while out.len() + unnamed.len() < max {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if !out.is_empty() || !unnamed.is_empty() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(p) = next else { break };
            buffer.len.fetch_sub(1, Ordering::SeqCst);
            match s.adopt(q, p) {
                Some((c, false)) => out.push(c),
                Some((c, true)) => unnamed.push(c),
                None => {}
            }
        }
        drop(rx);
        // Stamped copies come back through the queue as claims of their own.
        futures::future::join_all(unnamed.iter().map(|c| s.stamp(q, c))).await;
        // With a checkpoint store every claim gets the job's next epoch there; a store that
        // cannot be reached hands every delivery back (fenced or not: none is handed out).
        for i in 0..out.len() {
            if let Err(e) = s.fence(q, &mut out[i]).await {
                for c in &out {
                    s.give_back(c).await;
                }
                return Err(e);
            }
        }
        Ok(out)
    }

    async fn extend(
        &self,
        _q: &QueueNames,
        claims: &[(String, u64)],
        _lease: Duration,
    ) -> Result<Vec<bool>, QueueError> {
        let held = lock(&self.shared.held);
        Ok(claims
            .iter()
            .map(|key| held.get(key).is_some_and(|h| self.shared.is_live(h)))
            .collect())
    }

    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError> {
        let s = &self.shared;
        let key = (claim.job_id.clone(), claim.epoch);
        let Some(h) = lock(&s.held).get(&key).cloned() else {
            return Ok(Fenced::Lost);
        };
        let rules = rules(&how);
        // A retry of a failed run starts from its first step, so its run is forgotten before
        // the retry is published: a crash in between then only repeats what the retry would
        // have run. A retry that keeps its run resumes it. Every other outcome that forgets
        // the run forgets it after its ack (below).
        let forget_first = rules.message == Message::Delayed && rules.run == RunFate::Forgotten;
        if let (true, Some(runs), true) = (forget_first, &s.runs, s.is_live(&h)) {
            runs.end_run(q, claim).await?;
        }
        let ends_run = rules.run == RunFate::Forgotten && rules.message != Message::Delayed;
        // A dead letter that keeps its run lets go of the job's epoch entry instead.
        let keeps_run = rules.message == Message::DeadLettered && rules.run == RunFate::Kept;
        // The decision this claim carried is no longer on its way once its message ends
        // without applying it (see `RunStore::drop_decision`). Its entry goes before the ack,
        // and a store that fails fails the finish: an entry left behind would take a later
        // redrive of the job, pausing at that halt, for a copy, and ack it with nothing kept.
        // Dropped too early costs nothing: a redelivered decision applies without its entry.
        let drops_decision = claim.decision.is_some() && rules.drops_decision_on_its_way();
        if let (true, Some(runs), true) = (drops_decision, &s.runs, s.is_live(&h)) {
            let step = claim.decision.as_ref().and_then(|d| d.step);
            runs.drop_decision(q, &claim.job_id, step).await?;
        }
        let out = if !s.is_live(&h) {
            // The channel it came on is gone: the broker redelivers it; publish nothing.
            Ok(Fenced::Lost)
        } else {
            match how {
                Finish::Publish {
                    result,
                    dead_letter,
                } => s.finish_publish(q, claim, &h, result, dead_letter).await,
                Finish::Retry { delay, error, .. } => {
                    let keeps_decision = rules.decision == DecisionFate::StaysWithJob;
                    s.finish_retry(q, claim, &h, delay, error, keeps_decision)
                        .await
                }
                Finish::DeadLetter(dl) => s.finish_dead(q, claim, &h, dl).await,
                Finish::Release => Ok(s.requeue(&h).await),
                Finish::Pause { result, pending } => {
                    s.finish_pause(q, claim, &h, result, pending).await
                }
            }
        };
        if out.is_ok() {
            lock(&s.held).remove(&key);
        }
        if let (Ok(Fenced::Done), Some(runs), true) = (&out, &s.runs, ends_run) {
            // After the ack: a crash in between leaves the run retired (above), to expire or be
            // swept a day later; never a lost job.
            if let Err(e) = runs.end_run(q, claim).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot remove the finished run's checkpoint");
            }
        }
        if let (Ok(Fenced::Done), Some(runs), true) = (&out, &s.runs, keeps_run) {
            if let Err(e) = runs.release(q, claim).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot drop the dead-lettered job's epoch entry");
            }
        }
        out
    }

    /// The broker redelivers the deliveries of dead channels and expires the delay queue;
    /// what is left is decisions whose resume message a crash may have kept from the broker.
    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let s = &self.shared;
        let Some(runs) = &s.runs else {
            return Ok(0);
        };
        // A sweep that fails (the file busy) is tried again next tick; the decisions below
        // must not wait for it.
        match runs.sweep_retired(q).await {
            Ok(0) => {}
            Ok(swept) => {
                info!(queue = %q.jobs, swept, "forgot finished runs a crash left between ack and cleanup")
            }
            Err(e) => warn!(queue = %q.jobs, error = %e, "cannot sweep retired runs"),
        }
        let mut moved = 0;
        for (job_id, entry) in runs.stale_decisions(q, DECISION_REDELIVER_AFTER).await? {
            info!(%job_id, "publishing a decision again: its resume message was never confirmed");
            // One entry failing (the broker refusing it) must not hold back the others; it
            // stays in `deciding` and is tried again after the same delay.
            match s.publish_decision(q, runs.as_ref(), &job_id, &entry).await {
                Ok(()) => moved += 1,
                Err(e) => {
                    warn!(%job_id, error = %e, "cannot publish the decision again; it is retried later")
                }
            }
        }
        Ok(moved)
    }

    async fn deregister(&self, q: &QueueNames) -> Result<(), QueueError> {
        let s = &self.shared;
        let last = {
            let mut wanted = lock(&s.wanted);
            wanted.remove(&q.jobs);
            wanted.is_empty()
        };
        if last {
            s.closing.store(true, Ordering::SeqCst);
        }
        let Some(live) = lock(&s.live).clone() else {
            return Ok(());
        };
        let consuming = lock(&live.consumers).remove(&q.jobs);
        if let Some(c) = consuming {
            c.stopping.store(true, Ordering::SeqCst);
            if c.channel.status().connected() {
                let _ = io(
                    "basic.cancel",
                    c.channel
                        .basic_cancel(&c.tag, BasicCancelOptions::default()),
                )
                .await;
                // Deliveries still buffered are unacked: closing the channel hands them back.
                let _ = io(
                    "close the consumer channel",
                    c.channel.close(200, "stopping"),
                )
                .await;
            }
        }
        let buffer = s.buffer(&q.jobs);
        let mut rx = buffer.rx.lock().await;
        while rx.try_recv().is_ok() {
            buffer.len.fetch_sub(1, Ordering::SeqCst);
        }
        drop(rx);
        if last {
            if let Some(ch) = live.publish.lock().await.take() {
                if ch.status().connected() {
                    let _ = io("close the publish channel", ch.close(200, "stopping")).await;
                }
            }
            live.stop.cancel();
            *lock(&s.live) = None;
            io(
                "close the connection",
                live.conn.close(200, "lar-worker stopped"),
            )
            .await?;
            info!("amqp connection closed");
        }
        Ok(())
    }
}

#[async_trait]
impl Admin for AmqpBackend {
    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError> {
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let id = s
            .envelope
            .contains(&q.jobs)
            .then(|| envelope_id(payload))
            .flatten()
            .unwrap_or_else(crate::ids::new_id);
        let props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(id.as_str()));
        let ch = s.publisher().await?;
        let pending = vec![
            Shared::publish(
                &ch,
                "",
                &q.jobs,
                true,
                payload,
                props,
                format!("job (queue '{}')", q.jobs),
            )
            .await?,
        ];
        Shared::confirmed(&ch, pending).await?;
        Ok(Some(id))
    }

    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let t = Topology::of(q);
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        // The jobs, the dead letters, the results, then every delay bucket (summed).
        let mut counts = [0u64; 4];
        let buckets = t.delays.iter().map(|b| &b.queue);
        for (i, name) in [&t.jobs, &t.dead, &t.results]
            .into_iter()
            .chain(buckets)
            .enumerate()
        {
            let queue = io(
                &format!("check queue '{name}'"),
                ch.queue_declare(name, passive, FieldTable::default()),
            )
            .await?;
            counts[i.min(3)] += u64::from(queue.message_count());
        }
        let _ = io("close a channel", ch.close(200, "depth")).await;
        let held = lock(&s.held).values().filter(|h| h.queue == q.jobs).count();
        let buffered = lock(&s.buffers)
            .get(&q.jobs)
            .map(|b| b.len.load(Ordering::SeqCst))
            .unwrap_or(0);
        Ok(QueueDepth {
            ready: counts[0],
            // What this process holds: AMQP does not report other consumers' unacked count.
            claimed: (held + buffered) as u64,
            delayed: counts[3],
            dead: counts[1],
            results: counts[2],
        })
    }

    async fn results(
        &self,
        q: &QueueNames,
        max: usize,
        take: bool,
    ) -> Result<Vec<Vec<u8>>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let (ch, last, got) = s.browse(&q.results, max).await?;
        Shared::settle_browsed(ch, last, take).await?;
        Ok(got.into_iter().map(|d| d.data).collect())
    }

    /// Finds the job's dead letter in `<queue>.dead`, publishes it back to the work queue
    /// under its own id (confirmed), then removes it; the others stay, in order
    /// (`Shared::redrive` says how, and what a crash in between leaves).
    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        self.shared.redrive(q, job_id).await
    }

    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let t = Topology::of(q);
        let (ch, last, got) = s.browse(&t.dead, max).await?;
        Shared::settle_browsed(ch, last, false).await?;
        Ok(got.iter().map(|d| dead_entry(q, d)).collect())
    }
}

#[async_trait]
impl Runs for AmqpBackend {
    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.load_run(q, job_id).await,
            None => Ok(None),
        }
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        // The delivery's channel is the broker's fence; the store's epoch is the run's.
        if !self.shared.holds(claim) {
            return Ok(Fenced::Lost);
        }
        match &self.shared.runs {
            Some(runs) => runs.save_step(q, claim, step).await,
            None => Err(QueueError::Unsupported(
                "the amqp backend stores checkpoints only with `checkpoint_store` set".into(),
            )),
        }
    }
}

#[async_trait]
impl Pauses for AmqpBackend {
    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.list_pending(q).await,
            None => Ok(Vec::new()),
        }
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.get_pending(q, job_id).await,
            None => Ok(None),
        }
    }

    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        let job_id = pending.job_id.as_str();
        let s = &self.shared;
        let Some(runs) = &s.runs else {
            return Err(QueueError::Unsupported(
                "the amqp backend pauses jobs only with `checkpoint_store` set".into(),
            ));
        };
        let step = decision.step;
        let decision = serde_json::to_string(decision)
            .map_err(|e| QueueError::Corrupt(format!("cannot encode the decision: {e}")))?;
        let Some(entry) = runs.decide(q, job_id, step, &decision).await? else {
            return Ok(false);
        };
        // The decision is taken and kept in the store; if the broker does not confirm the
        // resume message now, `recover` publishes it again.
        if let Err(e) = s.publish_decision(q, runs.as_ref(), job_id, &entry).await {
            warn!(%job_id, error = %e, "decision recorded; its resume message will be published again by a worker");
        }
        Ok(true)
    }
}

impl Backend for AmqpBackend {
    /// Runs and pauses live in the `checkpoint_store`: without one, a redelivered job runs
    /// from its first step and a halt is the job's final result.
    fn runs(&self) -> Option<&dyn Runs> {
        self.shared.runs.as_ref().map(|_| self as &dyn Runs)
    }

    fn pauses(&self) -> Option<&dyn Pauses> {
        self.shared.runs.as_ref().map(|_| self as &dyn Pauses)
    }
}
