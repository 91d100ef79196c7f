//! What a backend can do, as four small roles instead of one wide trait.
//!
//! - [`Consumer`]: the worker's side of a queue: claim, renew leases, finish, recover.
//! - [`Admin`]: the producer's and the operator's side: enqueue, count, read results and
//!   dead letters, redrive.
//! - [`Runs`]: durable runs: a job's checkpoint and step journal, fenced on the claim.
//! - [`Pauses`]: the human pause: pending records and the decision that resumes a job.
//!
//! Every backend is a [`Backend`]: a consumer and an admin. Runs and pauses are capabilities a
//! backend may lack (AMQP without a `checkpoint_store`): it says so by returning `None` from
//! [`Backend::runs`] / [`Backend::pauses`], so a caller cannot reach a method that would only
//! fail. What every finish does to a run and a decision is [`super::finish::rules`].

use super::{Claim, Fenced, Finish, QueueDepth, QueueError, QueueNames, StepWrite, StoredRun};
use async_trait::async_trait;
use std::time::Duration;

/// The worker's side of a queue. Every finish is fenced on the claim's epoch.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// A short name for logs: "embedded", "redis", "amqp".
    fn kind(&self) -> &'static str;

    /// Claims up to `max` jobs, waiting up to `wait` when none is ready.
    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError>;

    /// Renews the leases of claims still held; returns, per claim, whether it is still held.
    async fn extend(
        &self,
        q: &QueueNames,
        claims: &[(String, u64)],
        lease: Duration,
    ) -> Result<Vec<bool>, QueueError>;

    /// Ends a claim, fenced on its epoch, as [`super::finish::rules`] says.
    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError>;

    /// Returns expired claims (and claims of dead workers) to the queue and promotes due
    /// retries. Safe to run in every replica at once. Returns how many jobs it moved.
    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError>;

    /// Called periodically by the worker: heartbeats, registrations. Default: nothing.
    async fn heartbeat(&self, _q: &QueueNames, _ttl: Duration) -> Result<(), QueueError> {
        Ok(())
    }

    /// Called once on a clean exit, after every claim is finished: drops registrations.
    async fn deregister(&self, _q: &QueueNames) -> Result<(), QueueError> {
        Ok(())
    }
}

/// The producer's and the operator's side of a queue.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Adds a job (the producer side, for `lar-worker enqueue` and tests). Returns its job id
    /// when the backend assigns one at enqueue time.
    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError>;

    /// Queue, claim, delayed, dead-letter and result counts.
    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError>;

    /// Reads (and removes, with `take`) up to `max` published results.
    async fn results(
        &self,
        q: &QueueNames,
        max: usize,
        take: bool,
    ) -> Result<Vec<Vec<u8>>, QueueError>;

    /// Reads up to `max` dead letters as JSON entries.
    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError>;

    /// Puts a dead letter's payload back on the queue, exactly as it was sent, and removes the
    /// entry, atomically (a kept decision goes back as [`super::finish::redrive_decision`]
    /// says). `false` when no dead letter has that job id.
    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError>;
}

/// Durable runs: what lets a job resume after its last completed step.
#[async_trait]
pub trait Runs: Send + Sync {
    /// The stored checkpoint and journal of a job, if it has run before.
    async fn load_run(&self, q: &QueueNames, job_id: &str)
        -> Result<Option<StoredRun>, QueueError>;

    /// Appends a step record to the job's journal and replaces its checkpoint, in one atomic
    /// write, only while `claim` still holds the job (its epoch is current).
    /// Idempotent: saving the step the journal already ends with only rewrites the checkpoint,
    /// so a write retried after a lost reply never journals a step twice.
    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError>;
}

/// The human pause: a halted run waits as a checkpoint plus a pending record.
#[async_trait]
pub trait Pauses: Send + Sync {
    /// Pending-decision records (JSON), oldest first.
    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError>;

    /// One job's pending-decision record.
    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError>;

    /// If the job is still pending at the halt `decision.step` names (any, when it is `None`):
    /// removes the pending record and queues the job again with `decision` attached,
    /// atomically. `false` when it is not (unknown, already decided, or paused at a later
    /// halt: see [`crate::durable::pending::waits_at`]).
    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError>;
}

/// A queue backend: always a consumer and an admin; runs and pauses where it has them.
pub trait Backend: Consumer + Admin + 'static {
    /// Its durable runs, when it stores checkpoints and journals.
    fn runs(&self) -> Option<&dyn Runs>;

    /// Its human pause, when a halted run can wait for a decision (without it a `human_jury`
    /// halt is the job's final result).
    fn pauses(&self) -> Option<&dyn Pauses>;
}
