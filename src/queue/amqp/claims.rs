//! Claims: a buffered delivery adopted as a claim (and stamped with a job id when its
//! message names none), its epoch from the checkpoint store, the deliveries this process
//! holds, and settling them with the broker (ack, or nack to requeue).

use super::connection::io;
use super::consumer::Pending;
use super::headers::{carried_headers, header, header_text, job_props, value_int, DECISION_HEADER};
use super::{lock, Shared};
use crate::queue::{
    envelope_id, AttemptRecord, Claim, ClaimHandle, Fenced, QueueError, QueueNames,
};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{BasicProperties, Channel};
use std::sync::atomic::Ordering;
use tracing::{debug, warn};

/// A claim handed to the worker: what its finish needs.
#[derive(Clone)]
pub(super) struct Held {
    pub(super) generation: u64,
    pub(super) channel: Channel,
    pub(super) delivery_tag: u64,
    pub(super) queue: String,
    pub(super) props: BasicProperties,
    /// What a finish already got confirmed: a retried finish publishes only the rest, so a
    /// result the broker stored is never published twice because another part failed.
    pub(super) sent: Sent,
}

#[derive(Clone, Copy, Default)]
pub(super) struct Sent {
    pub(super) result: bool,
    pub(super) dead_letter: bool,
}

impl Shared {
    /// Whether a claim's delivery can still be settled: its channel is the current
    /// connection's and open.
    pub(super) fn is_live(&self, h: &Held) -> bool {
        let current = lock(&self.live).as_ref().map(|l| l.generation);
        current == Some(h.generation) && h.channel.status().connected()
    }

    /// A buffered delivery as a claim, or `None` when its channel is gone (the broker
    /// redelivers it). The flag says the message named no job id (see [`Shared::stamp`]).
    pub(super) fn adopt(&self, q: &QueueNames, p: Pending) -> Option<(Claim, bool)> {
        if p.generation != self.generation.load(Ordering::SeqCst) || !p.channel.status().connected()
        {
            return None;
        }
        let d = p.delivery;
        let props = d.properties;
        let headers = props.headers().clone().unwrap_or_default();
        let named = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .filter(|m| !m.is_empty())
            .or_else(|| {
                self.envelope
                    .contains(&q.jobs)
                    .then(|| envelope_id(&d.data))
                    .flatten()
            });
        let unnamed = named.is_none();
        let job_id = named.unwrap_or_else(crate::ids::new_id);
        let done_before = header(&headers, "x-attempt")
            .and_then(value_int)
            .map(|n| n.clamp(0, i64::from(u32::MAX - 1)) as u32)
            .unwrap_or(0);
        let history: Vec<AttemptRecord> = header_text(&headers, "x-lar-history")
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        // A decision that does not parse is dropped here; the run then stays halted and the
        // worker pauses it again, so the job waits for a well-formed one.
        let decision = header_text(&headers, DECISION_HEADER).and_then(|s| {
            serde_json::from_str(&s)
                .map_err(|e| warn!(%job_id, error = %e, "unreadable decision header ignored"))
                .ok()
        });
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.held).insert(
            (job_id.clone(), epoch),
            Held {
                generation: p.generation,
                channel: p.channel,
                delivery_tag: d.delivery_tag,
                queue: q.jobs.clone(),
                props,
                sent: Sent::default(),
            },
        );
        Some((
            Claim {
                job_id,
                payload: d.data,
                attempt: done_before + 1,
                epoch,
                history,
                decision,
                // The run store is elsewhere; the worker reads it.
                fresh: false,
                recoveries: 0,
                handle: ClaimHandle::default(),
            },
            unnamed,
        ))
    }

    /// Gives a message that names no job (no `message_id`, no envelope `id`) the id it is
    /// known by from now on: a copy carrying `message_id` goes back to the work queue, with
    /// a confirm, and only then is the original acked. Without this a redelivery (a crash, a
    /// lost connection) would come back as a new job: it would run again from its first step
    /// and publish a second result, since checkpoints, fencing and the done marker are all
    /// keyed by job id. The copy queues behind what is waiting; a crash between the confirm
    /// and the ack leaves the original to be stamped again (two jobs, never none).
    pub(super) async fn stamp(&self, q: &QueueNames, c: &Claim) {
        let Some(h) = lock(&self.held).remove(&(c.job_id.clone(), c.epoch)) else {
            return;
        };
        let stamped = async {
            let props = job_props(&h.props, &c.job_id, carried_headers(&h.props));
            let ch = self.publisher().await?;
            let what = format!("job with its new id (queue '{}')", q.jobs);
            let pending =
                vec![Self::publish(&ch, "", &q.jobs, true, &c.payload, props, what).await?];
            Self::confirmed(&ch, pending).await
        }
        .await;
        match stamped {
            Ok(()) => {
                debug!(job_id = %c.job_id, "message without an id stamped and queued again");
                self.ack(&h).await;
            }
            Err(e) => {
                warn!(error = %e, "cannot stamp a message without an id: handed back");
                self.requeue(&h).await;
            }
        }
    }

    /// Gives a delivered claim the job's next epoch from the checkpoint store, so checkpoint
    /// writes of any earlier holder of the job (a worker cut off from the broker) are refused.
    pub(super) async fn fence(&self, q: &QueueNames, c: &mut Claim) -> Result<(), QueueError> {
        let Some(runs) = &self.runs else {
            return Ok(());
        };
        let epoch = runs.next_epoch(q, &c.job_id).await?;
        let mut held = lock(&self.held);
        if let Some(h) = held.remove(&(c.job_id.clone(), c.epoch)) {
            held.insert((c.job_id.clone(), epoch), h);
        }
        c.epoch = epoch;
        Ok(())
    }

    /// Whether this process still holds the claim's delivery on a live channel.
    pub(super) fn holds(&self, c: &Claim) -> bool {
        lock(&self.held)
            .get(&(c.job_id.clone(), c.epoch))
            .is_some_and(|h| self.is_live(h))
    }

    /// Returns a claim's delivery to the queue (a claim that cannot be fenced).
    pub(super) async fn give_back(&self, c: &Claim) {
        let h = lock(&self.held).remove(&(c.job_id.clone(), c.epoch));
        if let Some(h) = h {
            self.requeue(&h).await;
        }
    }

    /// Acks a claim's delivery: `Lost` when its channel is gone.
    pub(super) async fn ack(&self, h: &Held) -> Fenced {
        if !self.is_live(h) {
            return Fenced::Lost;
        }
        match io(
            "basic.ack",
            h.channel
                .basic_ack(h.delivery_tag, BasicAckOptions { multiple: false }),
        )
        .await
        {
            Ok(()) => Fenced::Done,
            Err(e) => {
                warn!(error = %e, "ack failed: the broker will redeliver");
                Fenced::Lost
            }
        }
    }

    pub(super) async fn requeue(&self, h: &Held) -> Fenced {
        if !self.is_live(h) {
            return Fenced::Lost;
        }
        match io(
            "basic.nack",
            h.channel.basic_nack(
                h.delivery_tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            ),
        )
        .await
        {
            Ok(()) => Fenced::Done,
            Err(e) => {
                warn!(error = %e, "nack failed: the broker will redeliver");
                Fenced::Lost
            }
        }
    }
}
