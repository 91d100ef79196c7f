//! Where a backend without a place of its own for durable runs (amqp) keeps them: each run's
//! checkpoint and step journal fenced on the job's epoch, and the human pause (pending records,
//! decisions on their way). Two stores: a Redis (any number of hosts) and a SQLite file (the
//! replicas of one host).
//!
//! The two stores are `redis` (also the redis backend's own run store) and `sqlite` (whose
//! tables and transactions the embedded backend shares).

pub(super) mod redis;
pub(super) mod sqlite;

use super::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use async_trait::async_trait;
use std::time::Duration;

/// What a pause in the store came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paused {
    Stored,
    /// A newer delivery holds the job.
    Fenced,
    /// A decision for the job is already on its way.
    AlreadyDecided,
}

/// A decision taken for a paused job, kept until the broker holds the message that resumes it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Deciding {
    /// The decision, as JSON.
    pub decision: String,
    /// The pending record it answers, as JSON (its `payload` is the job's message).
    pub pending: String,
    /// The job delivery's properties to carry onto the resume message (`reply_to`, …), as JSON.
    pub props: String,
}

/// Whether a decision on its way (its `deciding` entry's pending record) answered an earlier
/// halt than the pause now asked for: then it was applied, and the new pause stands. A pause
/// at the same halt is a copy of the job that a human has already answered.
pub(super) fn answered_earlier(decided_pending: &[u8], new_pending: &[u8]) -> bool {
    use crate::durable::pending::step_of;
    matches!((step_of(decided_pending), step_of(new_pending)), (Some(d), Some(n)) if n > d)
}

/// The contract of a run store. Every write is fenced on the claim's epoch; `pending` and
/// `deciding` hold a paused job in exactly one of them until its resume message is out.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// A new epoch for a job just delivered: fences off every earlier holder, and takes back
    /// the job's run if it was retired ([`RunStore::retire`]).
    async fn next_epoch(&self, q: &QueueNames, job_id: &str) -> Result<u64, QueueError>;

    /// As [`super::Backend::save_step`]: idempotent per index, a gap refused.
    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError>;

    async fn load_run(&self, q: &QueueNames, job_id: &str)
        -> Result<Option<StoredRun>, QueueError>;

    /// Forgets a run that ended, while `claim` still holds it; `false` when it does not.
    async fn end_run(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError>;

    /// The run ended and its delivery is about to be acked, after which [`RunStore::end_run`]
    /// forgets it. A crash between the ack and `end_run` would leave the run for ever, so
    /// first, while `claim` still holds the job, the run is set to go by itself after `keep`
    /// (long enough for an unacked delivery to come back and resume it). A run `end_run` would
    /// keep (waiting for a human) is left alone; the next delivery of the job
    /// ([`RunStore::next_epoch`]) takes the run back. `false` when the claim no longer holds.
    async fn retire(
        &self,
        q: &QueueNames,
        claim: &Claim,
        keep: std::time::Duration,
    ) -> Result<bool, QueueError>;

    /// Forgets the runs whose time set by [`RunStore::retire`] has passed; how many went.
    /// (Redis expires them by itself: there it finds none.)
    async fn sweep_retired(&self, q: &QueueNames) -> Result<u64, QueueError>;

    /// The claim ended and the run stays (a dead letter that keeps it for a redrive): forgets
    /// only the job's epoch entry, while `claim` still holds it. The next delivery takes a new
    /// epoch from the sequence, so every earlier holder stays fenced off.
    async fn release(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError>;

    /// Stores a paused run's pending record and the delivery properties its resume message
    /// carries, while `claim` still holds the job. While a decision for this halt (or a later
    /// one) is on its way, a copy of the job pausing again asks nobody
    /// ([`Paused::AlreadyDecided`]); the decision's own claim (`carries_decision`) pausing
    /// there did not apply it, and its pause stands.
    async fn pause(
        &self,
        q: &QueueNames,
        claim: &Claim,
        pending: &[u8],
        props: &str,
        carries_decision: bool,
    ) -> Result<Paused, QueueError>;

    /// Pending records, oldest first.
    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError>;

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError>;

    /// Moves a pending job to `deciding` with `decision` (JSON), atomically; `None` when it
    /// is not pending at the halt `step` (any, when `None`; see
    /// [`crate::durable::pending::waits_at`]).
    async fn decide(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
        decision: &str,
    ) -> Result<Option<Deciding>, QueueError>;

    /// The broker holds the job's resume message (its confirm came): the `deciding` entry of
    /// the halt at `step` stays, marked so it is not published again, until the decision is
    /// applied (its step journaled, or a later pause) or its message ends without applying
    /// it ([`RunStore::drop_decision`]). Meanwhile it keeps the run and stops a copy of the job
    /// from pausing again. An entry of another halt is left alone: a late confirm never
    /// touches a later decision.
    async fn decided(&self, q: &QueueNames, job_id: &str, step: u64) -> Result<(), QueueError>;

    /// The decision's message ended without applying it (dead-lettered, or retried from the
    /// first step): its `deciding` entry (for the halt at `step`, or any) goes.
    async fn drop_decision(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
    ) -> Result<(), QueueError>;

    /// Decisions older than `stale_after` whose resume message may never have reached the
    /// broker (a crash between the store and the publish), stamped anew, to publish again.
    /// Entries whose decision step is journaled (or whose run is gone) are dropped.
    async fn stale_decisions(
        &self,
        q: &QueueNames,
        stale_after: Duration,
    ) -> Result<Vec<(String, Deciding)>, QueueError>;
}

/// Opens the store a `checkpoint_store` setting names: `redis://…` / `rediss://…`, or
/// `sqlite:<path>` (a file shared by the replicas of one host).
pub async fn open(spec: &str) -> Result<Box<dyn RunStore>, QueueError> {
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let conn = super::redis::connection(spec).await?;
        return Ok(Box::new(self::redis::RedisRunStore::new(conn)));
    }
    if let Some(path) = spec.strip_prefix("sqlite:") {
        return Ok(Box::new(self::sqlite::SqliteRunStore::open(
            std::path::Path::new(path),
        )?));
    }
    Err(QueueError::Unsupported(format!(
        "checkpoint_store must be a redis:// URL or sqlite:<path>, not '{}'",
        crate::net::mask::redact(spec)
    )))
}
