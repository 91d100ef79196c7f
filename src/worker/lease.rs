//! Lease tracking: which claims this worker holds (jobs and decision messages, by lane), the
//! guard that holds one for as long as its work runs, and the loop that renews their leases.
//! Kept apart from the claim loop so the bookkeeping that keeps a message from being taken
//! over (or held for ever) reads in one place.

use super::Worker;
use crate::queue::Claim;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

impl Worker {
    /// The claims of one lane, every one (`finishing` too) or only those not finishing.
    fn in_flight_of(&self, qi: usize, lane: Lane, finishing: bool) -> Vec<(String, u64)> {
        let held = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        held.iter()
            .filter(|(h, f)| h.qi == qi && h.lane == lane && (finishing || !**f))
            .map(|(h, _)| (h.job_id.clone(), h.epoch))
            .collect()
    }

    fn track(&self, claim: Held, held: bool) {
        let mut m = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if held {
            m.insert(claim, false);
        } else {
            m.remove(&claim);
        }
    }

    /// Marks a held claim as finishing (its finish is about to be sent).
    pub(super) fn finishing(&self, qi: usize, lane: Lane, claim: &Claim) {
        let mut m = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let key = Held {
            qi,
            lane,
            job_id: claim.job_id.clone(),
            epoch: claim.epoch,
        };
        if let Some(f) = m.get_mut(&key) {
            *f = true;
        }
    }

    /// Lease renewal and heartbeats, in a task of their own: a slow reaper or a long list of
    /// pending jobs to expire never delays a renewal past a lease. Keeps renewing while the
    /// worker drains (in-flight jobs still hold their claims) until it is aborted.
    pub(super) async fn renew(self: Arc<Self>) {
        let renew_every = (self.cfg.lease() / 3).max(Duration::from_millis(300));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Waiting for the next renewal is a turn; a renewal that never returns is not.
            self.turning(&self.renewal_beat, renew.tick()).await;
            self.renew_all().await;
            self.turn(&self.renewal_beat);
        }
    }

    async fn renew_all(&self) {
        for (qi, lane, names) in self.lanes() {
            if let Err(e) = self.backend.heartbeat(names, self.cfg.lease()).await {
                warn!(queue = %names.jobs, error = %e, "heartbeat failed");
            }
            self.extend_lane(qi, lane, names).await;
        }
    }

    /// Every queue this worker claims from: each job queue, and its decisions queue where a
    /// decision loop runs. Each gets the same care: heartbeats, lease renewal, the reaper
    /// (a crashed replica's decision messages come back like its jobs) and deregistration.
    pub(super) fn lanes(&self) -> impl Iterator<Item = (usize, Lane, &crate::queue::QueueNames)> {
        let pauses = self.pauses();
        self.queues.iter().enumerate().flat_map(move |(qi, q)| {
            let decisions = q.decisions.as_ref().filter(|_| pauses);
            std::iter::once((qi, Lane::Jobs, &q.names))
                .chain(decisions.map(|dq| (qi, Lane::Decisions, dq)))
        })
    }

    async fn extend_lane(&self, qi: usize, lane: Lane, names: &crate::queue::QueueNames) {
        let held = self.in_flight_of(qi, lane, true);
        if held.is_empty() {
            return;
        }
        match self.backend.extend(names, &held, self.cfg.lease()).await {
            Ok(flags) => {
                let still = self.in_flight_of(qi, lane, false);
                for (id, epoch) in lost_leases(&held, &flags, &still) {
                    warn!(queue = %names.jobs, job_id = %id, epoch, "lease lost: another worker may take this message over");
                }
            }
            Err(e) => warn!(queue = %names.jobs, error = %e, "lease renewal failed"),
        }
    }
}

/// The claims a renewal failed for that still count as lost leases: `held` is the snapshot
/// renewed, `flags` the store's answer for each, `still` the claims held and not finishing
/// now. A claim that ended (or is ending) since the snapshot is not a lost lease.
fn lost_leases<'a>(
    held: &'a [(String, u64)],
    flags: &[bool],
    still: &[(String, u64)],
) -> Vec<(&'a str, u64)> {
    held.iter()
        .zip(flags)
        .filter(|((id, epoch), ok)| !**ok && still.iter().any(|(i, e)| i == id && e == epoch))
        .map(|((id, epoch), _)| (id.as_str(), *epoch))
        .collect()
}

/// Which of a queue's two inputs a held claim came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    Jobs,
    /// The queue's decisions queue: a batch of decisions that outlives a lease (a slow store)
    /// would be delivered again, and the second try would reply "already decided".
    Decisions,
}

/// A claim whose lease the worker renews.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Held {
    qi: usize,
    lane: Lane,
    job_id: String,
    epoch: u64,
}

/// A claim this worker holds: its lease is renewed while the guard lives. Dropped when the
/// claim's work ends by any path, a panic included, so a message is never held forever.
pub(super) struct Holding {
    worker: Arc<Worker>,
    claim: Held,
}

impl Holding {
    /// A job: also counted in flight (drain, idle, metrics).
    pub(super) fn start(worker: &Arc<Worker>, qi: usize, claim: &Claim) -> Self {
        let h = Self::hold(worker, qi, Lane::Jobs, claim);
        worker.in_flight_count.fetch_add(1, Ordering::Relaxed);
        h
    }

    /// A decision message, renewed until its finish.
    pub(super) fn decision(worker: &Arc<Worker>, qi: usize, claim: &Claim) -> Self {
        Self::hold(worker, qi, Lane::Decisions, claim)
    }

    fn hold(worker: &Arc<Worker>, qi: usize, lane: Lane, claim: &Claim) -> Self {
        let claim = Held {
            qi,
            lane,
            job_id: claim.job_id.clone(),
            epoch: claim.epoch,
        };
        worker.track(claim.clone(), true);
        Holding {
            worker: Arc::clone(worker),
            claim,
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.worker.track(self.claim.clone(), false);
        if self.claim.lane == Lane::Jobs {
            self.worker.in_flight_count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lost_leases;

    fn claims(ids: &[(&str, u64)]) -> Vec<(String, u64)> {
        ids.iter().map(|(i, e)| (i.to_string(), *e)).collect()
    }

    #[test]
    fn a_renewal_refused_for_a_claim_still_held_is_a_lost_lease() {
        let held = claims(&[("a", 1), ("b", 1)]);
        assert_eq!(lost_leases(&held, &[true, false], &held), vec![("b", 1)]);
    }

    #[test]
    fn a_renewal_refused_for_a_claim_that_ended_meanwhile_is_not() {
        let held = claims(&[("a", 1), ("b", 1)]);
        let still = claims(&[("a", 1)]);
        assert!(lost_leases(&held, &[true, false], &still).is_empty());
    }

    #[test]
    fn two_copies_of_one_job_are_told_apart_by_epoch() {
        let held = claims(&[("a", 1), ("a", 2)]);
        let still = claims(&[("a", 2)]);
        assert_eq!(lost_leases(&held, &[false, false], &still), vec![("a", 2)]);
    }

    #[test]
    fn renewals_that_succeed_lose_nothing() {
        let held = claims(&[("a", 1), ("b", 3)]);
        assert!(lost_leases(&held, &[true, true], &held).is_empty());
    }
}
