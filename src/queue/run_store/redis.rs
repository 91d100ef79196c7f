//! Durable runs kept in Redis: each run's checkpoint and step journal in one hash,
//! `Q:run:<job>` (`ckpt` the checkpoint, `0`, `1`, … the records), fenced on the job's epoch in
//! `Q:epochs`. The redis backend keeps them beside its queue (its claim script bumps the epoch);
//! the amqp backend keeps them in a configured Redis (`checkpoint_store`), because a broker has
//! no place for them, and bumps the epoch here on every delivery.
//!
//! For the amqp backend the store also keeps the human pause, which a broker cannot hold
//! (a delivery must not stay unacked while a human thinks): `Q:pending` (job → pending record)
//! and `Q:deciding` (job → a decision taken whose resume message is not yet confirmed by the
//! broker). A decision moves the job from `pending` to `deciding` atomically, so it is always
//! in exactly one of them until the broker holds its resume message; `stale_decisions`
//! hands back entries a crash left in `deciding`, to publish again.
//!
//! Its Lua scripts are in `lua/`, one file each; each file's header says its KEYS, its ARGV
//! and what it does.

use super::{Deciding, Paused, RunStore};
use crate::queue::redis::batch::BatchedScript;
use crate::queue::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script};
use async_trait::async_trait;

/// The field the checkpoint is stored under in the run hash.
const CHECKPOINT_FIELD: &str = "ckpt";

/// Saves one step's record and checkpoint, fenced on the epoch; run per job in batches
/// (see `lua/save_step.lua`).
const SAVE_STEP: &str = include_str!("lua/save_step.lua");

/// The Lua function every epoch comes from, here and in the redis backend's claims:
/// `next_epoch(seq)`, on the queue's one sequence (see `lua/prelude_next_epoch.lua`).
pub(in crate::queue) const NEXT_EPOCH_FN: &str = include_str!("lua/prelude_next_epoch.lua");

/// The job's next epoch (after [`NEXT_EPOCH_FN`], see `lua/next_epoch.lua`).
const NEXT_EPOCH: &str = include_str!("lua/next_epoch.lua");

/// Forgets or retires a finished run, if the epoch still holds the job (see `lua/end_run.lua`).
const END_RUN: &str = include_str!("lua/end_run.lua");

/// `step_of` and `decided_step`: the step of a stored pending record (JSON), or of the one
/// inside a `deciding` entry; shared with the redis backend's scripts (see
/// `lua/prelude_step.lua`).
pub(in crate::queue) const STEP_FNS: &str = include_str!("lua/prelude_step.lua");

/// Forgets the job's epoch entry if the epoch still holds it (see `lua/release.lua`).
const RELEASE: &str = include_str!("lua/release.lua");

/// Stores a paused run's pending record, fenced on the epoch (see `lua/pause.lua`).
const PAUSE: &str = include_str!("lua/pause.lua");

/// Marks the job's `deciding` entry confirmed (see `lua/decided.lua`).
const DECIDED: &str = include_str!("lua/decided.lua");

/// Drops the job's `deciding` entry (see `lua/drop_decision.lua`).
const DROP_DECISION: &str = include_str!("lua/drop_decision.lua");

/// Moves a pending job to `deciding` (see `lua/decide.lua`).
const DECIDE: &str = include_str!("lua/decide.lua");

/// Decisions to publish again (see `lua/stale_decisions.lua`).
const STALE_DECISIONS: &str = include_str!("lua/stale_decisions.lua");

/// A run's hash.
pub(in crate::queue) fn run_key(q: &QueueNames, job_id: &str) -> String {
    format!("{}:run:{job_id}", q.jobs)
}

/// Each job's current epoch (the claim that may write its run).
pub(in crate::queue) fn epochs_key(q: &QueueNames) -> String {
    format!("{}:epochs", q.jobs)
}

/// The queue's epoch sequence (see the redis backend's CLAIM): every claim or delivery takes
/// the next value, so an epoch never comes again, even after a job's own entry was forgotten.
pub(in crate::queue) fn epoch_seq_key(q: &QueueNames) -> String {
    format!("{}:epoch_seq", q.jobs)
}

/// Jobs waiting for a human (amqp backend).
pub(in crate::queue) fn pending_key(q: &QueueNames) -> String {
    format!("{}:pending", q.jobs)
}

/// Decisions whose resume message the broker has not confirmed yet (amqp backend).
fn deciding_key(q: &QueueNames) -> String {
    format!("{}:deciding", q.jobs)
}

pub(in crate::queue) struct RedisRunStore {
    conn: ConnectionManager,
    save_step: BatchedScript,
    next_epoch: Script,
    end_run: Script,
    release: Script,
    pause: Script,
    decide: Script,
    decided: Script,
    drop_decision: Script,
    stale_decisions: Script,
}

impl RedisRunStore {
    /// Must be called inside the tokio runtime (the step writer is a task).
    pub fn new(conn: ConnectionManager) -> Self {
        RedisRunStore {
            save_step: BatchedScript::start("step", "", SAVE_STEP, 2, 6, conn.clone()),
            next_epoch: Script::new(&format!("{NEXT_EPOCH_FN}{NEXT_EPOCH}")),
            end_run: Script::new(&format!("{STEP_FNS}{END_RUN}")),
            release: Script::new(RELEASE),
            pause: Script::new(&format!("{STEP_FNS}{PAUSE}")),
            decided: Script::new(&format!("{STEP_FNS}{DECIDED}")),
            drop_decision: Script::new(&format!("{STEP_FNS}{DROP_DECISION}")),
            decide: Script::new(&format!("{STEP_FNS}{DECIDE}")),
            stale_decisions: Script::new(&format!("{STEP_FNS}{STALE_DECISIONS}")),
            conn,
        }
    }
}

#[async_trait]
impl RunStore for RedisRunStore {
    async fn next_epoch(&self, q: &QueueNames, job_id: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let mut inv = self.next_epoch.prepare_invoke();
        inv.key(epochs_key(q))
            .key(epoch_seq_key(q))
            .key(run_key(q, job_id))
            .arg(job_id);
        Ok(inv.invoke_async(&mut conn).await?)
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        let keys = vec![epochs_key(q), run_key(q, &claim.job_id)];
        let previous = match step.index {
            0 => Vec::new(),
            i => (i - 1).to_string().into_bytes(),
        };
        let args = vec![
            claim.job_id.clone().into_bytes(),
            claim.epoch.to_string().into_bytes(),
            step.index.to_string().into_bytes(),
            step.record.to_vec(),
            step.checkpoint.to_vec(),
            previous,
        ];
        match self.save_step.call(keys, args).await? {
            1 => Ok(Fenced::Done),
            0 => Ok(Fenced::Lost),
            _ => Err(QueueError::Conflict(format!(
                "the journal of job {} does not hold the {} steps before this one",
                claim.job_id, step.index
            ))),
        }
    }

    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        let mut conn = self.conn.clone();
        let fields: Vec<(Vec<u8>, Vec<u8>)> = conn.hgetall(run_key(q, job_id)).await?;
        let mut checkpoint = None;
        let mut steps: Vec<(u64, Vec<u8>)> = Vec::with_capacity(fields.len());
        for (field, value) in fields {
            if field == CHECKPOINT_FIELD.as_bytes() {
                checkpoint = Some(value);
            } else if let Some(i) = std::str::from_utf8(&field)
                .ok()
                .and_then(|f| f.parse().ok())
            {
                steps.push((i, value));
            }
        }
        steps.sort_unstable_by_key(|(i, _)| *i);
        // The journal is the steps from 0 without a gap; a gap shortens it, which the resume's
        // length and chain checks then refuse.
        let journal = steps
            .into_iter()
            .enumerate()
            .take_while(|(n, (i, _))| *n as u64 == *i)
            .map(|(_, (_, record))| record)
            .collect();
        Ok(checkpoint.map(|checkpoint| StoredRun {
            checkpoint,
            journal,
        }))
    }

    /// Forgets a run that ended (published, retried from scratch, dead-lettered), while
    /// `claim` still holds it. The redis backend does this inside its finish script instead.
    async fn end_run(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError> {
        self.end_or_retire(q, claim, None).await
    }

    async fn retire(
        &self,
        q: &QueueNames,
        claim: &Claim,
        keep: std::time::Duration,
    ) -> Result<bool, QueueError> {
        self.end_or_retire(q, claim, Some(keep)).await
    }

    async fn sweep_retired(&self, _q: &QueueNames) -> Result<u64, QueueError> {
        Ok(0)
    }

    async fn release(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError> {
        let mut inv = self.release.prepare_invoke();
        inv.key(epochs_key(q)).arg(&claim.job_id).arg(claim.epoch);
        let mut conn = self.conn.clone();
        let done: i64 = inv.invoke_async(&mut conn).await?;
        Ok(done == 1)
    }

    async fn pause(
        &self,
        q: &QueueNames,
        claim: &Claim,
        pending: &[u8],
        props: &str,
        carries_decision: bool,
    ) -> Result<Paused, QueueError> {
        let mut inv = self.pause.prepare_invoke();
        inv.key(epochs_key(q))
            .key(pending_key(q))
            .key(deciding_key(q))
            .key(run_key(q, &claim.job_id))
            .arg(&claim.job_id)
            .arg(claim.epoch)
            .arg(pending)
            .arg(props)
            .arg(if carries_decision { "1" } else { "" });
        let mut conn = self.conn.clone();
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(match n {
            1 => Paused::Stored,
            2 => Paused::AlreadyDecided,
            _ => Paused::Fenced,
        })
    }

    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.hvals(pending_key(q)).await?)
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.hget(pending_key(q), job_id).await?)
    }

    async fn decide(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
        decision: &str,
    ) -> Result<Option<Deciding>, QueueError> {
        let mut inv = self.decide.prepare_invoke();
        inv.key(pending_key(q))
            .key(deciding_key(q))
            .key(run_key(q, job_id))
            .arg(job_id)
            .arg(decision)
            .arg(crate::clock::now_ms())
            .arg(step.map(|s| s.to_string()).unwrap_or_default());
        let mut conn = self.conn.clone();
        let entry: Option<Vec<u8>> = inv.invoke_async(&mut conn).await?;
        entry.map(|e| parse_deciding(job_id, &e)).transpose()
    }

    async fn drop_decision(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
    ) -> Result<(), QueueError> {
        let mut inv = self.drop_decision.prepare_invoke();
        inv.key(deciding_key(q))
            .arg(job_id)
            .arg(step.map(|s| s.to_string()).unwrap_or_default());
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn decided(&self, q: &QueueNames, job_id: &str, step: u64) -> Result<(), QueueError> {
        let mut inv = self.decided.prepare_invoke();
        inv.key(deciding_key(q)).arg(job_id).arg(step);
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn stale_decisions(
        &self,
        q: &QueueNames,
        stale_after: std::time::Duration,
    ) -> Result<Vec<(String, Deciding)>, QueueError> {
        let mut inv = self.stale_decisions.prepare_invoke();
        inv.key(deciding_key(q))
            .arg(crate::clock::now_ms())
            .arg(stale_after.as_millis() as u64)
            .arg(run_key(q, ""));
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = inv.invoke_async(&mut conn).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            let id = String::from_utf8_lossy(&pair[0]).into_owned();
            out.push((id.clone(), parse_deciding(&id, &pair[1])?));
        }
        Ok(out)
    }
}

impl RedisRunStore {
    /// [`END_RUN`]: forgets the run now (`keep` None) or retires it.
    async fn end_or_retire(
        &self,
        q: &QueueNames,
        claim: &Claim,
        keep: Option<std::time::Duration>,
    ) -> Result<bool, QueueError> {
        let mut inv = self.end_run.prepare_invoke();
        inv.key(epochs_key(q))
            .key(run_key(q, &claim.job_id))
            .key(pending_key(q))
            .key(deciding_key(q))
            .arg(&claim.job_id)
            .arg(claim.epoch)
            .arg(
                keep.map(|k| k.as_millis().max(1).to_string())
                    .unwrap_or_default(),
            );
        let mut conn = self.conn.clone();
        let done: i64 = inv.invoke_async(&mut conn).await?;
        Ok(done == 1)
    }
}

fn parse_deciding(job_id: &str, raw: &[u8]) -> Result<Deciding, QueueError> {
    serde_json::from_slice(raw).map_err(|e| {
        QueueError::Corrupt(format!(
            "the stored decision for job {job_id} is unreadable: {e}"
        ))
    })
}
