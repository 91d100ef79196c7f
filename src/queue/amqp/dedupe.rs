//! One result per job: the done marker, set after a result's confirms and before the ack,
//! checked before publishing. It lives in this process (`Memo`) and, with
//! `dedupe_redis_url`, in Redis.

use super::claims::Held;
use super::headers::{header_text, FAILED_AT_HEADER};
use super::{lock, Shared};
use crate::queue::{QueueError, QueueNames};
use std::collections::{HashSet, VecDeque};
use tracing::warn;

/// How long a done marker lives in Redis.
pub(super) const MARKER_TTL_SECS: u64 = 86_400;
/// Done markers remembered in this process.
pub(super) const MEMO_CAP: usize = 200_000;

/// Job ids whose result was published, remembered in this process (oldest forgotten first).
#[derive(Default)]
pub(super) struct Memo {
    pub(super) set: HashSet<String>,
    order: VecDeque<String>,
}

impl Memo {
    pub(super) fn insert(&mut self, key: String) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            while self.order.len() > MEMO_CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Shared {
    /// The done marker of one life of a job. A dead letter moved back to the work queue (a
    /// redrive, or a shovel, after review) is a new life: it carries the `x-lar-failed-at` its dead-lettering
    /// stamped, so it gets a marker of its own and runs again instead of being acked as done.
    pub(super) fn memo_key(q: &QueueNames, job_id: &str, h: &Held) -> String {
        let redriven = h
            .props
            .headers()
            .as_ref()
            .and_then(|hs| header_text(hs, FAILED_AT_HEADER));
        match redriven {
            Some(at) => format!("{}:done:{job_id}:redriven:{at}", q.jobs),
            None => format!("{}:done:{job_id}", q.jobs),
        }
    }

    /// Whether a result for this job (in this life, see [`Self::memo_key`]) was already
    /// published (this process, or Redis).
    pub(super) async fn already_done(&self, key: &str) -> Result<bool, QueueError> {
        if lock(&self.memo).set.contains(key) {
            return Ok(true);
        }
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let n: i64 = ::redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut conn)
                .await?;
            return Ok(n > 0);
        }
        Ok(false)
    }

    /// Records that this job's result is published (before the ack).
    pub(super) async fn mark_done(&self, key: String, job_id: &str) {
        lock(&self.memo).insert(key.clone());
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let set: Result<Option<String>, _> = ::redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("EX")
                .arg(MARKER_TTL_SECS)
                .arg("NX")
                .query_async(&mut conn)
                .await;
            if let Err(e) = set {
                // The result is out and the ack follows; only a redelivery to another replica
                // after a lost ack could now publish a second result.
                warn!(job_id, error = %e, "cannot set the done marker in Redis");
            }
        }
    }
}
