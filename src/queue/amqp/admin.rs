//! Reading queues for operators: browsing up to `max` messages of a queue unacked (the
//! results, the dead letters) and settling them after, and a dead letter as the JSON entry
//! operators read.

use super::connection::io;
use super::headers::{header, header_text, value_int, FAILED_AT_HEADER};
use super::Shared;
use crate::queue::{dead_letter_entry, AttemptRecord, DeadLetter, QueueError, QueueNames};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::Channel;

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

/// A dead-letter queue message as the JSON entry operators read.
pub(super) fn dead_entry(q: &QueueNames, d: &lapin::message::Delivery) -> serde_json::Value {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let job_id = header_text(&headers, "x-lar-job-id")
        .or_else(|| {
            d.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
        })
        .unwrap_or_default();
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
    // A shovel moves the message itself back, with its decision header.
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
