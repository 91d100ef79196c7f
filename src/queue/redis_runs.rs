//! Durable runs kept in Redis: each run's checkpoint and step journal in one hash,
//! `Q:run:<job>` (`ckpt` the checkpoint, `0`, `1`, … the records), fenced on the job's epoch in
//! `Q:epochs`. The redis backend keeps them beside its queue (its claim script bumps the epoch);
//! the amqp backend keeps them in a configured Redis (`checkpoint_store`), because a broker has
//! no place for them, and bumps the epoch here on every delivery.

use super::redis_batch::BatchedScript;
use super::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script};

/// The field the checkpoint is stored under in the run hash.
const CHECKPOINT_FIELD: &str = "ckpt";

/// K: epochs, run. A: id, epoch, step index, record, checkpoint, previous index ('' for the
/// first). 1 saved, 0 fenced off, 2 the journal lacks the step before. Idempotent: saving a
/// step again (a retry after a lost reply) rewrites the same fields. Each `redis.call` costs a
/// few µs in Redis (measured): a step costs three.
const SAVE_STEP: &str = r#"
if redis.call('HGET', K[1], A[1]) ~= A[2] then return 0 end
if A[6] ~= '' and redis.call('HEXISTS', K[2], A[6]) == 0 then return 2 end
redis.call('HSET', K[2], A[3], A[4], 'ckpt', A[5])
return 1
"#;

/// KEYS: epochs, run. ARGV: id, epoch. Forgets a finished run, if `epoch` still holds the job.
const END_RUN: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#;

/// A run's hash.
pub(super) fn run_key(q: &QueueNames, job_id: &str) -> String {
    format!("{}:run:{job_id}", q.jobs)
}

/// Each job's current epoch (the claim that may write its run).
pub(super) fn epochs_key(q: &QueueNames) -> String {
    format!("{}:epochs", q.jobs)
}

pub(super) struct RunStore {
    conn: ConnectionManager,
    save_step: BatchedScript,
    end_run: Script,
}

impl RunStore {
    /// Must be called inside the tokio runtime (the step writer is a task).
    pub fn new(conn: ConnectionManager) -> Self {
        RunStore {
            save_step: BatchedScript::start("step", SAVE_STEP, 2, 6, conn.clone()),
            end_run: Script::new(END_RUN),
            conn,
        }
    }

    /// A new epoch for a job just delivered: fences off every earlier holder.
    pub async fn next_epoch(&self, q: &QueueNames, job_id: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.hincr(epochs_key(q), job_id, 1u64).await?)
    }

    pub async fn save_step(
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
            _ => Err(QueueError::Other(format!(
                "the journal of job {} does not hold the {} steps before this one",
                claim.job_id, step.index
            ))),
        }
    }

    pub async fn load_run(
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
    pub async fn end_run(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError> {
        let mut inv = self.end_run.prepare_invoke();
        inv.key(epochs_key(q))
            .key(run_key(q, &claim.job_id))
            .arg(&claim.job_id)
            .arg(claim.epoch);
        let mut conn = self.conn.clone();
        let done: i64 = inv.invoke_async(&mut conn).await?;
        Ok(done == 1)
    }
}
