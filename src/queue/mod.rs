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
mod error;
pub mod finish;
pub mod redis;
pub mod roles;
pub mod run_store;
pub use self::redis::wrapper;

pub use error::QueueError;
pub use roles::{Admin, Backend, Consumer, Pauses, Runs};

/// The four roles at once, for callers that use a backend directly (`use queue::prelude::*`).
pub mod prelude {
    pub use super::roles::{Admin, Backend, Consumer, Pauses, Runs};
}
pub use finish::{
    failed_attempt, redrive_decision, rules, AttemptRecord, DeadLetter, DecisionFate, Fenced,
    Finish, Message, Rules, RunFate,
};
use serde::Serialize;

/// The reserved key of a state-format result that carries the job's metadata (`run_id`,
/// `status`, `signature`, ...). The result format is the queue's contract with producers: the
/// worker writes it, and a backend may read it (AMQP copies those fields into headers).
pub const RESULT_META_KEY: &str = "__lar_worker";

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
    /// How many claims of this job were taken back from a holder that did not end them (its
    /// worker died, or hung past its lease: an expired lease, or a dead worker's claims, handed
    /// back by the backend's `recover`) since the job's life last ended (published,
    /// dead-lettered or paused: [`Rules::resets_recoveries`]). A retry keeps the count, and
    /// neither it nor a hand-back, a redrive or a decision's resume adds one. Counted in the
    /// store (embedded: the `recoveries` column; Redis: the `Q:recoveries` hash), never in the
    /// message, so a producer cannot forge it; 0 where a backend does not count (AMQP). The
    /// worker dead-letters a job that reached `worker.max_recoveries` instead of running it
    /// again.
    pub recoveries: u32,
    /// The backend's own reference to this claim; opaque outside `queue`.
    pub handle: ClaimHandle,
}

/// What a backend keeps on a claim to find it again at its finish: the embedded backend's row
/// (its `seq`). Redis and AMQP find a claim by its job id and epoch and keep nothing here.
/// Only the backends can make or read one: to everyone else a claim is its job id and epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimHandle(pub(in crate::queue) Option<i64>);

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
        "failed_at": crate::clock::now_utc(),
    });
    match std::str::from_utf8(payload) {
        Ok(text) => entry["payload"] = serde_json::Value::String(text.to_string()),
        Err(_) => entry["payload_hex"] = serde_json::Value::String(hex::encode(payload)),
    }
    // A human's decision the job carried, kept with a run kept for the redrive: the redriven
    // job applies it (once more verified, and only at the halt it answers) instead of asking
    // the human again. A dead letter that forgets its run starts over, so it keeps none (and a
    // redrive finding no run drops it).
    if let Some(d) = decision.filter(|_| finish::dead_letter_keeps_decision(dl)) {
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
