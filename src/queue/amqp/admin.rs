//! Reading queues for operators: browsing up to `max` messages of a queue unacked (the
//! results, the dead letters) and settling them after, a dead letter as the JSON entry
//! operators read, and redriving one dead letter by its job id.

use super::connection::io;
use super::headers::{
    carried_headers, header, header_text, job_props, value_int, DECISION_HEADER, FAILED_AT_HEADER,
};
use super::{Shared, Topology};
use crate::queue::{
    dead_letter_entry, redrive_decision, AttemptRecord, DeadLetter, QueueError, QueueNames,
};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

/// Headers of a dead letter that describe its dead-lettering, not the job: a redriven job
/// starts its attempts again (as on the other backends). `x-lar-failed-at` stays: it makes the
/// redriven copy a new life of the job (see `Shared::memo_key`).
const DEAD_LETTER_ONLY: [&str; 5] = [
    "x-attempt",
    "x-lar-history",
    "x-lar-reason",
    "x-lar-job-id",
    "x-lar-queue",
];

impl Shared {
    /// Up to `max` messages of `queue` on a channel of their own, unacked; the caller acks or
    /// requeues them all through the returned channel and last tag.
    pub(super) async fn browse(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<(Channel, Option<u64>, Vec<lapin::message::Delivery>), QueueError> {
        let live = self.current()?;
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let mut out = Vec::new();
        let mut last = None;
        while out.len() < max {
            match io(
                &format!("basic.get '{queue}'"),
                ch.basic_get(queue, BasicGetOptions { no_ack: false }),
            )
            .await?
            {
                Some(m) => {
                    last = Some(m.delivery.delivery_tag);
                    out.push(m.delivery);
                }
                None => break,
            }
        }
        Ok((ch, last, out))
    }

    pub(super) async fn settle_browsed(
        ch: Channel,
        last: Option<u64>,
        take: bool,
    ) -> Result<(), QueueError> {
        if let Some(tag) = last {
            if take {
                io(
                    "basic.ack",
                    ch.basic_ack(tag, BasicAckOptions { multiple: true }),
                )
                .await?;
            } else {
                io(
                    "basic.nack",
                    ch.basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    ),
                )
                .await?;
            }
        }
        // Closing also hands back anything unacked.
        io("close a channel", ch.close(200, "done")).await
    }
}

impl Shared {
    /// Puts the dead letter of `job_id` back on the work queue under its own id; `false` when
    /// `<queue>.dead` holds none. The dead letters are read in order with `basic.get`, unacked,
    /// on a channel of this redrive, up to the first of that job; its copy is published to the
    /// work queue and confirmed, only then is the dead letter acked (removed), and the ones
    /// before it are nacked back into their places (a classic queue requeues a message where it
    /// was; a quorum queue returns them ahead of the rest, in order). Those after it were never
    /// taken. Nothing is atomic across the two queues, so a crash (or a lost connection) between
    /// the confirm and the ack leaves the dead letter in place beside its redriven copy: a
    /// duplicate, never a loss. The copy carries the dead letter's `x-lar-failed-at`, so a
    /// second redrive of it is the same life of the job: once one copy has published its
    /// result, the done marker acks the other without publishing; copies running at once are
    /// fenced by the checkpoint store (each delivery takes a new epoch there, and the older
    /// one's next step save is refused). Without a store or a `dedupe_redis_url` Redis only
    /// this process's marker is there to absorb it.
    pub(super) async fn redrive(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        let live = self.current()?;
        self.ensure_topology(&live, q).await?;
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let out = self.redrive_on(&ch, q, job_id).await;
        // Closing hands back, in place, whatever is still unacked (an error on the way).
        if ch.status().connected() {
            let _ = io("close a channel", ch.close(200, "redrive")).await;
        }
        out
    }

    async fn redrive_on(
        &self,
        ch: &Channel,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<bool, QueueError> {
        let t = Topology::of(q);
        let mut before = None;
        let found = loop {
            match io(
                &format!("basic.get '{}'", t.dead),
                ch.basic_get(&t.dead, BasicGetOptions { no_ack: false }),
            )
            .await?
            {
                Some(m) if dead_job_id(&m.delivery).as_deref() == Some(job_id) => {
                    break Some(m.delivery)
                }
                Some(m) => before = Some(m.delivery.delivery_tag),
                None => break None,
            }
        };
        let back_in_place = |tag: Option<u64>| async move {
            match tag {
                Some(tag) => {
                    io(
                        "basic.nack",
                        ch.basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: true,
                                requeue: true,
                            },
                        ),
                    )
                    .await
                }
                None => Ok(()),
            }
        };
        let Some(d) = found else {
            back_in_place(before).await?;
            return Ok(false);
        };
        let props = self.redriven_props(q, job_id, &d.properties).await?;
        let p = self.publisher().await?;
        let what = format!("redriven job {job_id} (queue '{}')", q.jobs);
        let confirm = Self::publish(&p, "", &q.jobs, true, &d.data, props, what).await?;
        // Refused or unknown: the dead letter stays (the channel's close hands it back).
        Self::confirmed(&p, vec![confirm]).await?;
        io(
            "basic.ack (the redriven dead letter)",
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: false }),
        )
        .await?;
        back_in_place(before).await?;
        Ok(true)
    }

    /// The properties of a redriven copy: the dead letter's, without the broker's bookkeeping
    /// and the dead-lettering's own headers, under the job's id, with the decision it kept
    /// only when the run it resumes is still stored (`finish::redrive_decision`).
    async fn redriven_props(
        &self,
        q: &QueueNames,
        job_id: &str,
        dead: &BasicProperties,
    ) -> Result<BasicProperties, QueueError> {
        let carried = carried_headers(dead);
        let kept = header_text(&carried, DECISION_HEADER);
        let run_stored = match (&kept, &self.runs) {
            (Some(_), Some(runs)) => runs.load_run(q, job_id).await?.is_some(),
            _ => false,
        };
        let decision = redrive_decision(kept, run_stored);
        let mut headers = FieldTable::default();
        for (k, v) in carried.inner() {
            let k_str = k.as_str();
            if DEAD_LETTER_ONLY.contains(&k_str) || k_str == DECISION_HEADER {
                continue;
            }
            headers.insert(k.clone(), v.clone());
        }
        if let Some(d) = decision {
            headers.insert(DECISION_HEADER.into(), super::headers::text(&d));
        }
        Ok(job_props(dead, job_id, headers))
    }
}

/// The job a dead-letter queue message belongs to: the id this worker stamped on it, else its
/// `message_id` (a message the broker dead-lettered).
fn dead_job_id(d: &lapin::message::Delivery) -> Option<String> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| header_text(h, "x-lar-job-id"))
        .or_else(|| {
            d.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
        })
}

/// A dead-letter queue message as the JSON entry operators read.
pub(super) fn dead_entry(q: &QueueNames, d: &lapin::message::Delivery) -> serde_json::Value {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let job_id = dead_job_id(d).unwrap_or_default();
    let broker_reason = header_text(&headers, "x-first-death-reason");
    let reason = header_text(&headers, "x-lar-reason").unwrap_or_else(|| {
        format!(
            "dead-lettered by the broker: {} (from queue '{}')",
            broker_reason.as_deref().unwrap_or("unknown reason"),
            header_text(&headers, "x-first-death-queue").unwrap_or_else(|| q.jobs.clone())
        )
    });
    let attempts: Vec<AttemptRecord> = header_text(&headers, "x-lar-history")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let dl = DeadLetter {
        job_id,
        reason,
        attempts,
        keep_run: false,
    };
    // A redrive moves the message itself back, with its decision header (kept while its run
    // is stored), as a shovel would.
    let mut entry = dead_letter_entry(&q.jobs, &dl, &d.data, None);
    if let Some(at) = header_text(&headers, FAILED_AT_HEADER) {
        entry["failed_at"] = serde_json::Value::String(at);
    }
    if let Some(r) = broker_reason {
        entry["broker_reason"] = serde_json::Value::String(r);
    }
    if let Some(n) = header(&headers, "x-delivery-count").and_then(value_int) {
        entry["delivery_count"] = serde_json::Value::from(n);
    }
    entry
}
