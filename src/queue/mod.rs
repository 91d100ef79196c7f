//! Queue backends behind one trait. A backend hands out claims with a lease, and finishes each
//! claim exactly once: published result, delayed retry, dead letter, or hand-back. Every finish
//! is fenced on the claim's epoch, so a worker that lost its lease cannot publish.
//!
//! | capability            | embedded (SQLite)        | redis                          | amqp                       |
//! |-----------------------|--------------------------|--------------------------------|----------------------------|
//! | processes             | one machine (WAL file)   | any number of hosts            | any number of hosts        |
//! | claim                 | UPDATE in a transaction  | LMOVE/BLMOVE to own list + Lua | basic.consume, prefetch    |
//! | lease / expiry        | lease_until column       | sorted set + reaper            | broker redelivery on close |
//! | fenced completion     | epoch check in the txn   | epoch check in one Lua script  | delivery tag on channel    |
//! | delayed retry         | available_at column      | sorted set, promoted by reaper | TTL delay queue → DLX      |
//! | dead letters          | table                    | list `<queue>:dead`            | dead-letter queue          |
//! | wake-up when empty    | polling (≤ 200 ms)       | blocking BLMOVE                | push (consumer)            |
//! | one result per job    | the fenced transaction   | the fenced Lua script          | confirm, done marker, ack  |
//! | checkpoints, pause    | tables in the same file  | `Q:run:<job>`, `Q:pending`     | only with `checkpoint_store` (a Redis): the same keys there |

pub mod amqp;
pub mod embedded;
pub mod redis;
mod redis_batch;
mod redis_runs;
pub mod run_store;
mod sqlite_runs;
pub mod wrapper;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Failures talking to the queue's store. Retried by the worker with its backoff policy.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("amqp: {0}")]
    Amqp(String),
    #[error("queue store: {0}")]
    Other(String),
}

/// One earlier attempt, kept with the job so a dead letter carries its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub at: String,
    pub error: String,
}

/// One step to make durable: its journal record and the checkpoint after it.
#[derive(Debug, Clone, Copy)]
pub struct StepWrite<'a> {
    /// The record's index: how many records the journal holds before it.
    pub index: u64,
    pub record: &'a [u8],
    pub checkpoint: &'a [u8],
}

/// A job claimed by this worker.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Stable across redeliveries and retries.
    pub job_id: String,
    /// The producer's bytes, exactly as sent.
    pub payload: Vec<u8>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Fencing token: grows with every claim of this job.
    pub epoch: u64,
    pub history: Vec<AttemptRecord>,
    /// A human decision this delivery carries (a paused job coming back to resume).
    pub decision: Option<crate::exec::Decision>,
    /// The backend saw, atomically with this claim, that the job has no stored run: there is
    /// nothing to resume, and none can appear (only this claim's epoch may write one), so the
    /// worker starts the run without reading the store. False where the backend did not look.
    pub fresh: bool,
    /// Backend-specific handle (the stored message, a row id, a delivery tag).
    pub handle: ClaimHandle,
}

#[derive(Debug, Clone)]
pub enum ClaimHandle {
    /// The wrapped message as it sits in the worker's processing list.
    Redis {
        stored: Vec<u8>,
    },
    Sqlite {
        seq: i64,
    },
    Amqp {
        delivery_tag: u64,
        channel: u64,
    },
}

/// How a claim ends.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Publish `result` to the results destination (and optionally record a dead letter too).
    Publish {
        result: Vec<u8>,
        dead_letter: Option<DeadLetter>,
    },
    /// Retry later with the attempt recorded.
    Retry {
        delay: Duration,
        error: String,
        /// The attempt failed for want of infrastructure (the store, the audit disk), not in
        /// the graph: the checkpoint and journal stay, so the next attempt resumes after the
        /// last completed step. Without it the run is forgotten and starts from its first step
        /// (a failed run retried on purpose).
        keep_run: bool,
    },
    /// Move to the dead letters without a result.
    DeadLetter(DeadLetter),
    /// Give the job back untouched (shutdown): not a failed attempt. Its checkpoint stays, so
    /// the next claim resumes after the last completed step.
    Release,
    /// Pause for a human: publish the `awaiting_decision` result, store the pending record,
    /// and let go of the message. The checkpoint stays.
    Pause { result: Vec<u8>, pending: Vec<u8> },
}

/// What an operator finds in the dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job_id: String,
    pub reason: String,
    pub attempts: Vec<AttemptRecord>,
    /// Keep the run's checkpoint and journal: the job gave up on infrastructure (the store or
    /// the audit disk), not on its own steps, so a redrive resumes after its last finished step
    /// instead of running the finished ones again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_run: bool,
}

/// Whether the finish took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// This worker still held the claim; the finish happened.
    Done,
    /// The lease expired and the job was taken over (or finished) elsewhere: nothing was done.
    Lost,
}

/// Depths for `inspect` and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueDepth {
    pub ready: u64,
    pub claimed: u64,
    pub delayed: u64,
    pub dead: u64,
    pub results: u64,
}

/// The names one configured queue uses.
#[derive(Debug, Clone)]
pub struct QueueNames {
    pub jobs: String,
    pub results: String,
}

/// A job's durable run data as stored: the signed checkpoint and the journaled step records.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub checkpoint: Vec<u8>,
    pub journal: Vec<Vec<u8>>,
}

/// The contract every backend meets (and `tests/conformance` checks).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
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

    /// Ends a claim, fenced on its epoch.
    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError>;

    /// Returns expired claims (and claims of dead workers) to the queue and promotes due
    /// retries. Safe to run in every replica at once. Returns how many jobs it moved.
    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError>;

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
    /// entry, atomically. `false` when no dead letter has that job id.
    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError>;

    /// Called periodically by the worker: heartbeats, registrations. Default: nothing.
    async fn heartbeat(&self, _q: &QueueNames, _ttl: Duration) -> Result<(), QueueError> {
        Ok(())
    }

    /// Whether this backend stores checkpoints, journals and pending decisions (the methods
    /// below). Backends that do not run jobs from scratch on redelivery and cannot pause.
    fn supports_checkpoints(&self) -> bool {
        false
    }

    /// Whether a halted run can wait for a human as a checkpoint plus a pending record (the
    /// pending methods below). Without it a `human_jury` halt is the job's final result.
    fn supports_pause(&self) -> bool {
        self.supports_checkpoints()
    }

    /// The stored checkpoint and journal of a job, if it has run before.
    async fn load_run(
        &self,
        _q: &QueueNames,
        _job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        Ok(None)
    }

    /// Appends a step record to the job's journal and replaces its checkpoint, in one atomic
    /// write, only while `claim` still holds the job (its epoch is current).
    /// Idempotent: saving the step the journal already ends with only rewrites the checkpoint,
    /// so a write retried after a lost reply never journals a step twice.
    async fn save_step(
        &self,
        _q: &QueueNames,
        _claim: &Claim,
        _step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        Err(QueueError::Other(format!(
            "the {} backend does not store checkpoints",
            self.kind()
        )))
    }

    /// Pending-decision records (JSON), oldest first.
    async fn list_pending(&self, _q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        Ok(Vec::new())
    }

    /// One job's pending-decision record.
    async fn get_pending(
        &self,
        _q: &QueueNames,
        _job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(None)
    }

    /// If the job is still pending at the halt `decision.step` names (any, when it is `None`):
    /// removes the pending record and queues the job again with `decision` attached,
    /// atomically. `false` when it is not (unknown, already decided, or paused at a later
    /// halt: see [`crate::durable::pending::waits_at`]).
    async fn submit_decision(
        &self,
        _q: &QueueNames,
        _pending: &crate::durable::Pending,
        _decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        Err(QueueError::Other(format!(
            "the {} backend cannot pause jobs",
            self.kind()
        )))
    }

    /// Called once on a clean exit, after every claim is finished: drops registrations.
    async fn deregister(&self, _q: &QueueNames) -> Result<(), QueueError> {
        Ok(())
    }
}

/// The job id an envelope carries (`id`, a string or a number, up to 200 bytes: an AMQP
/// `message_id` holds at most 255, so a longer id would break the frame): on envelope
/// queues it is the job id on every backend, so `decide`, `pending` and results name the job
/// as the producer did.
pub fn envelope_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match v.get("id")? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 200 => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()).filter(|s| s.len() <= 200),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch (the clocks of leases and delays).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The JSON entry stored for a dead letter: the payload kept exactly (as text when it is UTF-8,
/// as hex otherwise), the reason and every attempt.
pub fn dead_letter_entry(
    queue: &str,
    dl: &DeadLetter,
    payload: &[u8],
    decision: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "job_id": dl.job_id,
        "queue": queue,
        "reason": dl.reason,
        "attempts": dl.attempts,
        "failed_at": crate::exec::run::now_utc(),
    });
    match std::str::from_utf8(payload) {
        Ok(text) => entry["payload"] = serde_json::Value::String(text.to_string()),
        Err(_) => entry["payload_hex"] = serde_json::Value::String(hex::encode(payload)),
    }
    // A human's decision the job carried, kept with a run kept for the redrive: the redriven
    // job applies it (once more verified, and only at the halt it answers) instead of asking
    // the human again. A dead letter that forgets its run starts over, so it keeps none (and a
    // redrive finding no run drops it).
    if let Some(d) = decision.filter(|_| dl.keep_run) {
        entry["decision"] = d;
    }
    entry
}

/// The decision a dead-letter entry keeps for its redrive (see [`dead_letter_entry`]).
pub fn dead_letter_decision(entry: &serde_json::Value) -> Option<crate::exec::Decision> {
    serde_json::from_value(entry.get("decision")?.clone()).ok()
}

/// The producer's exact bytes kept in a dead-letter entry (`payload` text or `payload_hex`).
pub fn dead_letter_payload(entry: &serde_json::Value) -> Option<Vec<u8>> {
    if let Some(text) = entry.get("payload").and_then(|v| v.as_str()) {
        return Some(text.as_bytes().to_vec());
    }
    entry
        .get("payload_hex")
        .and_then(|v| v.as_str())
        .and_then(|h| hex::decode(h).ok())
}

/// Opens the backend a config names.
pub async fn connect(
    cfg: &crate::config::Config,
    worker_id: String,
) -> Result<std::sync::Arc<dyn Backend>, QueueError> {
    use crate::config::{BackendSection, PayloadFormat};
    // Queues whose messages are envelopes: every backend takes their `id` as the job id.
    let envelope_queues: Vec<String> = cfg
        .queues
        .iter()
        .filter(|q| q.payload == PayloadFormat::Envelope)
        .map(|q| q.name.clone())
        .collect();
    match &cfg.backend {
        BackendSection::Redis { url } => Ok(std::sync::Arc::new(
            redis::RedisBackend::connect(url, worker_id, envelope_queues).await?,
        )),
        BackendSection::Embedded { path } => Ok(std::sync::Arc::new(
            embedded::EmbeddedBackend::open(path, worker_id)?
                .with_envelope_queues(envelope_queues.into_iter().collect()),
        )),
        BackendSection::Amqp {
            url,
            prefetch,
            queue_type,
            delivery_limit,
            declare,
            dedupe_redis_url,
            checkpoint_store,
        } => {
            let opts = amqp::AmqpOptions {
                url: url.clone(),
                prefetch: prefetch
                    .unwrap_or_else(|| cfg.worker.concurrency.min(u16::MAX as usize) as u16),
                queue_type: *queue_type,
                delivery_limit: *delivery_limit,
                declare: *declare,
                dedupe_redis_url: dedupe_redis_url.clone(),
                checkpoint_store: checkpoint_store.clone(),
                envelope_queues,
            };
            let backend = amqp::AmqpBackend::connect(opts, worker_id).await?;
            // Declare (or check) every configured queue now: a wrong topology fails the start.
            for q in &cfg.queues {
                backend
                    .ensure_topology(&QueueNames {
                        jobs: q.name.clone(),
                        results: q.results.clone(),
                    })
                    .await?;
            }
            Ok(std::sync::Arc::new(backend))
        }
    }
}
