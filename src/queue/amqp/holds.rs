//! Holds: a claim held past `detach_after_ms` is taken into the checkpoint store (its message,
//! fenced on its epoch, leased) and its delivery acked, so RabbitMQ's `consumer_timeout` cannot
//! close the channel under a long run; `recover` publishes the job again when a hold's lease
//! passes.

use super::hand_back::Parked;
use super::{lock, Shared};
use crate::queue::{Claim, ClaimHandle, Fenced, QueueError, QueueNames};
use std::time::Duration;
use tracing::{info, warn};

/// A hold taken back by `recover` is not taken again by another replica for this long (its
/// copy is published and the hold dropped long before).
const HOLD_TAKEN_BACK_FOR: Duration = Duration::from_secs(60);

impl Shared {
    /// Takes a claim held past `detach_after` into the checkpoint store (its message, fenced
    /// on its epoch, with a lease) and acks its delivery, so the broker's `consumer_timeout`
    /// cannot close the channel under the run and redeliver it. The hold is renewed by
    /// `extend`, and `recover` publishes the job again when its lease passes (its worker
    /// died). `false` when the claim is no longer live.
    pub(super) async fn detach(
        &self,
        q: &QueueNames,
        key: &(String, u64),
        lease: Duration,
    ) -> bool {
        let Some(runs) = &self.runs else {
            return self.holds_key(key);
        };
        let Some(h) = lock(&self.held).get(key).cloned() else {
            return false;
        };
        if !self.is_live(&h) {
            return false;
        }
        let claim = Claim {
            job_id: key.0.clone(),
            payload: Vec::new(),
            attempt: 0,
            epoch: key.1,
            history: Vec::new(),
            decision: None,
            fresh: false,
            recoveries: 0,
            handle: ClaimHandle::default(),
        };
        // The count is the store's: the copy a recovery publishes carries none.
        let message = match serde_json::to_string(&Parked::of(&h, &h.payload, 0)) {
            Ok(m) => m,
            Err(_) => return true,
        };
        match runs.hold(q, &claim, &message, lease).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                warn!(job_id = %key.0, error = %e, "cannot take a long claim into the store: its delivery stays unacked");
                return true;
            }
        }
        if self.ack(&h).await == Fenced::Done {
            if let Some(h) = lock(&self.held).get_mut(key) {
                h.detached = true;
            }
            info!(job_id = %key.0, held_for = ?h.since.elapsed(), "long claim taken into the checkpoint store: delivery acked");
            true
        } else {
            let _ = runs.drop_hold(q, &key.0, key.1).await;
            false
        }
    }

    fn holds_key(&self, key: &(String, u64)) -> bool {
        lock(&self.held).get(key).is_some_and(|h| self.is_live(h))
    }

    /// `extend` for one claim: renews a hold, takes a long claim into the store, or reports
    /// whether its channel is open.
    pub(super) async fn extend_one(
        &self,
        q: &QueueNames,
        key: &(String, u64),
        lease: Duration,
    ) -> bool {
        let h = lock(&self.held).get(key).cloned();
        let Some(h) = h else { return false };
        match (&self.runs, h.detached) {
            (Some(runs), true) => match runs.renew_hold(q, &key.0, key.1, lease).await {
                Ok(live) => live,
                Err(e) => {
                    warn!(job_id = %key.0, error = %e, "cannot renew the hold");
                    true // the lease is longer than a renewal interval; the next one tries
                }
            },
            (Some(_), false)
                if self
                    .opts
                    .detach_after
                    .is_some_and(|after| h.since.elapsed() >= after) =>
            {
                self.detach(q, key, lease).await
            }
            _ => self.is_live(&h),
        }
    }

    /// Publishes again the jobs whose holds expired (their worker died or hung past its
    /// lease), each as a copy with its recovery counted; the store's epoch fences the old
    /// holder. How many.
    pub(super) async fn recover_holds(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let Some(runs) = &self.runs else {
            return Ok(0);
        };
        let mut moved = 0;
        for (job_id, message) in runs.expired_holds(q, HOLD_TAKEN_BACK_FOR).await? {
            let Some((payload, props)) = serde_json::from_str::<Parked>(&message)
                .ok()
                .and_then(|p| p.message(&job_id))
            else {
                warn!(%job_id, "unreadable hold dropped");
                runs.drop_hold(q, &job_id, 0).await?;
                continue;
            };
            let ch = self.publisher().await?;
            let what = format!("recovered job (queue '{}')", q.jobs);
            let pending = vec![Self::publish(&ch, "", &q.jobs, true, &payload, props, what).await?];
            Self::confirmed(&ch, pending).await?;
            runs.drop_hold(q, &job_id, 0).await?;
            info!(%job_id, "a held job's lease passed (its worker died): published again");
            moved += 1;
        }
        Ok(moved)
    }
}
