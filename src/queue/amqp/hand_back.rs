//! Hand-backs as confirmed copies: a job given back (shutdown, a finish given up) is published
//! again with its message id, headers and recovery count, then its delivery acked, so a quorum
//! queue counts no delivery toward `delivery_limit`.

use super::claims::*;
use super::headers::{carried_headers, job_props, RECOVERIES_HEADER};
use super::{lock, Shared};
use crate::queue::{Claim, Fenced, QueueError, QueueNames};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use tracing::warn;

/// A job's message as a hold keeps it, to publish it again (`RunStore::hold`).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Parked {
    payload_hex: String,
    headers: FieldTable,
    content_type: Option<String>,
    content_encoding: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    priority: Option<u8>,
    timestamp: Option<u64>,
    kind: Option<String>,
    app_id: Option<String>,
}

fn text_of(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_string())
}

impl Parked {
    pub(super) fn of(h: &Held, payload: &[u8], recoveries: u32) -> Self {
        let p = &h.props;
        let mut headers = carried_headers(p);
        headers.insert(
            RECOVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(recoveries)),
        );
        Parked {
            payload_hex: hex::encode(payload),
            headers,
            content_type: text_of(p.content_type()),
            content_encoding: text_of(p.content_encoding()),
            correlation_id: text_of(p.correlation_id()),
            reply_to: text_of(p.reply_to()),
            priority: *p.priority(),
            timestamp: *p.timestamp(),
            kind: text_of(p.kind()),
            app_id: text_of(p.app_id()),
        }
    }

    /// The payload and the properties of the job's copy.
    pub(super) fn message(self, job_id: &str) -> Option<(Vec<u8>, BasicProperties)> {
        let payload = hex::decode(&self.payload_hex).ok()?;
        let mut p = BasicProperties::default();
        let set = |v: Option<String>| v.map(|s| ShortString::from(s.as_str()));
        if let Some(v) = set(self.content_type) {
            p = p.with_content_type(v);
        }
        if let Some(v) = set(self.content_encoding) {
            p = p.with_content_encoding(v);
        }
        if let Some(v) = set(self.correlation_id) {
            p = p.with_correlation_id(v);
        }
        if let Some(v) = set(self.reply_to) {
            p = p.with_reply_to(v);
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = self.timestamp {
            p = p.with_timestamp(v);
        }
        if let Some(v) = set(self.kind) {
            p = p.with_type(v);
        }
        if let Some(v) = set(self.app_id) {
            p = p.with_app_id(v);
        }
        Some((payload, job_props(&p, job_id, self.headers)))
    }
}

impl Shared {
    /// Hands a claim back without costing it an attempt: a copy (same `message_id`, headers
    /// and properties, its recovery count in `x-lar-recoveries`) goes to the back of the work
    /// queue with a confirm, and only then is the original settled. A `nack(requeue)` would
    /// count toward a quorum queue's `x-delivery-limit`, and come back `redelivered`, as if
    /// its worker had died. A crash between the confirm and the ack leaves both: the
    /// original's redelivery and the copy are the same job (one epoch holds, one result).
    /// A copy the broker does not take falls back to the nack (or, for a claim in the store,
    /// fails: its hold expires and is published again).
    pub(super) async fn hand_back(
        &self,
        q: &QueueNames,
        c: &Claim,
        h: &Held,
    ) -> Result<Fenced, QueueError> {
        if !self.is_live(h) {
            return Ok(Fenced::Lost);
        }
        let copied = async {
            let (payload, props) = Parked::of(h, &c.payload, c.recoveries)
                .message(&c.job_id)
                .ok_or_else(|| QueueError::Corrupt("unreadable parked message".into()))?;
            let ch = self.publisher().await?;
            let what = format!("handed-back job (queue '{}')", q.jobs);
            let pending = vec![Self::publish(&ch, "", &q.jobs, true, &payload, props, what).await?];
            Self::confirmed(&ch, pending).await
        }
        .await;
        match copied {
            Ok(()) => {
                if let Some(runs) = &self.runs {
                    // Before the ack, while the claim holds the job.
                    if let Err(e) = runs.let_go(q, c).await {
                        warn!(job_id = %c.job_id, error = %e, "cannot let go of the handed-back job's epoch");
                    }
                }
                Ok(self.settle(h).await)
            }
            Err(e) if h.detached => Err(e),
            Err(e) => {
                warn!(job_id = %c.job_id, error = %e, "cannot publish the handed-back copy: nacking it back");
                lock(&self.returned).insert(c.job_id.clone());
                Ok(self.requeue(h).await)
            }
        }
    }

    /// Hands back, as copies, the buffered deliveries of a consumer that stopped (never
    /// handed out): closing their channel would return them `redelivered` (and, on a quorum
    /// queue, one delivery nearer the limit). Redelivered ones and those with no job id are
    /// left to the close: the next holder counts the recovery they already were.
    pub(super) async fn hand_back_buffered(
        &self,
        q: &QueueNames,
        pending: Vec<super::consumer::Pending>,
    ) {
        for p in pending {
            if p.delivery.redelivered || !p.channel.status().connected() {
                continue;
            }
            let Some((c, false)) = self.adopt(q, p) else {
                continue;
            };
            let Some(h) = lock(&self.held).remove(&(c.job_id.clone(), c.epoch)) else {
                continue;
            };
            if let Err(e) = self.hand_back(q, &c, &h).await {
                warn!(job_id = %c.job_id, error = %e, "cannot hand a buffered delivery back");
            }
        }
    }
}
