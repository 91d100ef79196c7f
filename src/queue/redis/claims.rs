//! How a claim crosses the script boundary: the keys and arguments CLAIM and ADOPT share, their
//! replies made [`Claim`]s, and a claim made a stored message again (a retry, a hand-back) or
//! its decision a dead-letter entry's.

use super::keys::Keys;
use super::wrapper::{unwrap_bytes, Wrapped};
use super::RedisBackend;
use crate::queue::run_store::redis::run_key;
use crate::queue::{AttemptRecord, Claim, ClaimHandle, QueueNames};
use std::time::Duration;

/// The decision a claim carries, for its dead-letter entry.
pub(super) fn decision_value(claim: &Claim) -> Option<serde_json::Value> {
    claim
        .decision
        .as_ref()
        .and_then(|d| serde_json::to_value(d).ok())
}

impl RedisBackend {
    fn envelope_flag(&self, q: &QueueNames) -> &'static str {
        if self.envelope_queues.contains(&q.jobs) {
            "1"
        } else {
            "0"
        }
    }

    /// The (stored, epoch, id, has run, recoveries) quintuples CLAIM and ADOPT return. The id
    /// is the one the script filed the claim and epoch under: the finish must name exactly it,
    /// whatever Rust would make of the message (a decoder stricter than cjson, a message that
    /// only looks wrapped). The recoveries come from the queue's hash, not the message.
    pub(super) fn decode_claims(&self, items: Vec<::redis::Value>) -> Vec<Claim> {
        let mut out = Vec::with_capacity(items.len() / 5);
        let mut it = items.into_iter();
        while let (Some(stored), Some(epoch), Some(id), Some(has_run), Some(recoveries)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        {
            // The script only returns bytes, numbers and a UTF-8 id (candidates are ours); a
            // claim that still does not decode is left to its lease, and says so.
            let decoded = (|| -> Result<_, ::redis::RedisError> {
                Ok((
                    ::redis::from_redis_value::<Vec<u8>>(stored)?,
                    ::redis::from_redis_value::<u64>(epoch)?,
                    ::redis::from_redis_value::<String>(id)?,
                    ::redis::from_redis_value::<i64>(has_run)?,
                    ::redis::from_redis_value::<i64>(recoveries)?,
                ))
            })();
            match decoded {
                Ok((stored, epoch, id, has_run, recoveries)) => {
                    let mut claim = Self::to_claim(stored, epoch, id);
                    claim.fresh = has_run == 0;
                    claim.recoveries =
                        u32::try_from(recoveries.clamp(0, i64::from(u32::MAX))).unwrap_or(u32::MAX);
                    out.push(claim);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a claim the script returned does not decode; its lease will expire")
                }
            }
        }
        out
    }

    fn to_claim(stored: Vec<u8>, epoch: u64, job_id: String) -> Claim {
        match unwrap_bytes(&stored) {
            Some((w, raw)) => Claim {
                job_id,
                payload: raw,
                attempt: w.attempt.saturating_add(1),
                epoch,
                history: w.history,
                decision: w.decision,
                fresh: false,
                recoveries: 0,
                handle: ClaimHandle::default(),
            },
            // A producer's message that only looks wrapped (the script checks its prefix and
            // its `id`, not every field), or one cjson reads and serde does not (hex numbers,
            // deep nesting): keep the bytes so the worker dead-letters them, under the id the
            // script filed, or the finish would be fenced off and the message would loop
            // through lease expiry for ever.
            None => Claim {
                job_id,
                payload: stored,
                attempt: 1,
                epoch,
                history: Vec::new(),
                decision: None,
                fresh: false,
                recoveries: 0,
                handle: ClaimHandle::default(),
            },
        }
    }

    /// The keys and leading arguments CLAIM and ADOPT share (see the scripts' KEYS/ARGV).
    pub(super) fn claim_invocation(
        &self,
        inv: &mut ::redis::ScriptInvocation<'_>,
        q: &QueueNames,
        k: &Keys,
        lease: Duration,
        n: usize,
    ) {
        inv.key(&k.queue)
            .key(&k.processing)
            .key(&k.leases)
            .key(&k.claims)
            .key(&k.owners)
            .key(&k.epochs)
            .key(&k.epoch_seq)
            .key(&k.delayed)
            .key(run_key(q, ""))
            .key(&k.recoveries);
        inv.arg(&self.worker_id)
            .arg(lease.as_millis() as u64)
            .arg(n)
            .arg(self.envelope_flag(q));
    }

    /// The stored message again, with a changed attempt count and history.
    /// `keeps_decision`: false for a retry from the first step, which asks its human again (a
    /// decision kept on the job would answer a run that is gone).
    pub(super) fn rewrap(
        claim: &Claim,
        attempt: u32,
        history: Vec<AttemptRecord>,
        keeps_decision: bool,
    ) -> Vec<u8> {
        Wrapped {
            lar_worker: 1,
            id: claim.job_id.clone(),
            attempt,
            history,
            raw: String::from_utf8_lossy(&claim.payload).into_owned(),
            decision: claim.decision.clone().filter(|_| keeps_decision),
        }
        .encode()
    }
}
