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

use super::redis_batch::BatchedScript;
use super::run_store::{Deciding, Paused, RunStore};
use super::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script};
use async_trait::async_trait;

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

/// The Lua function every epoch comes from, here and in the redis backend's claims: the
/// queue's one sequence (`Q:epoch_seq`), never a per-job counter. Ending a run forgets the
/// job's entry, and a counter started again at 1 would meet a cut-off holder that still has
/// the old epoch. The sequence starts above 2^32, so no per-job epoch of earlier versions
/// comes again during a rolling upgrade.
pub(super) const NEXT_EPOCH_FN: &str = r#"
local function next_epoch(seq)
  local epoch = redis.call('INCR', seq)
  if epoch < 4294967296 then epoch = redis.call('INCRBY', seq, 4294967296) end
  return epoch
end
"#;

/// KEYS: epochs, epoch sequence, run. ARGV: id. The job's next epoch (after
/// [`NEXT_EPOCH_FN`]); a retired run (one set to expire) is the new holder's again.
const NEXT_EPOCH: &str = r#"
local epoch = next_epoch(KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], epoch)
redis.call('PERSIST', KEYS[3])
return epoch
"#;

/// KEYS: epochs, run, pending, deciding. ARGV: id, epoch, '' or ms. Forgets a finished run, if
/// `epoch` still holds the job; with ms, retires it instead (it expires after ms, the epoch
/// entry stays for the `end_run` that follows). A run waiting for a human (pending, or decided
/// with its resume message on the way) is kept: the claim that ended was a copy of the paused
/// job. A pending or deciding entry whose halt the journal shows answered is stale and goes
/// with the run (see the redis backend's FINISH).
const END_RUN: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local function answered(s)
  return s and redis.call('HEXISTS', KEYS[2], string.format('%d', s)) == 1
end
local p = redis.call('HGET', KEYS[3], ARGV[1])
local d = redis.call('HGET', KEYS[4], ARGV[1])
local live = (p and not answered(step_of(p))) or (d and not answered(decided_step(d)))
if not live then
  if p then redis.call('HDEL', KEYS[3], ARGV[1]) end
  if d then redis.call('HDEL', KEYS[4], ARGV[1]) end
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"#;

/// The step of a stored pending record (JSON), or of the one inside a `deciding` entry; shared
/// with the redis backend's scripts.
pub(super) const STEP_FNS: &str = r#"
local function step_of(record)
  local ok, p = pcall(cjson.decode, record)
  if ok and type(p) == 'table' then return tonumber(p.step) end
  return nil
end
local function decided_step(entry)
  local ok, e = pcall(cjson.decode, entry)
  if ok and type(e) == 'table' and type(e.pending) == 'string' then return step_of(e.pending) end
  return nil
end
"#;

/// KEYS: epochs. ARGV: id, epoch. Forgets the job's epoch entry if `epoch` still holds it.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#;

/// K: epochs, pending, deciding, run. A: id, epoch, pending record, delivery properties (JSON),
/// '1' when the pausing claim carried the decision (see `RunStore::pause`).
/// 1 paused, 0 fenced off (a newer delivery holds the job), 2 a decision is already on its way
/// for this halt (a copy of the job raced a human: nothing to pause). A decision on its way
/// for an earlier halt was applied (the run moved past it; its entry only waited for the
/// broker's confirm): its entry goes, and the new pause stands.
const PAUSE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local d = redis.call('HGET', KEYS[3], ARGV[1])
if d then
  local ds, ns = decided_step(d), step_of(ARGV[3])
  if not ((ds and ns and ns > ds) or ARGV[5] == '1') then return 2 end
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[4], 'amqp', ARGV[4])
return 1
"#;

/// K: deciding. A: id, step. Marks the job's `deciding` entry confirmed (the broker holds its
/// message: see `RunStore::decided`) if it answers the halt at `step` (or has no readable
/// step): a late confirm never touches a later decision's entry.
const DECIDED: &str = r#"
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return 0 end
local ok, e = pcall(cjson.decode, d)
if not ok or type(e) ~= 'table' then return 0 end
local ds = decided_step(d)
if ds and ds ~= tonumber(ARGV[2]) then return 0 end
e.confirmed = true
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
return 1
"#;

/// K: deciding. A: id, step ('' for any). Drops the job's `deciding` entry if it answers the
/// halt at `step`: its message ended without applying it.
const DROP_DECISION: &str = r#"
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return 0 end
local ds = decided_step(d)
if ARGV[2] ~= '' and ds and ds ~= tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#;

/// K: pending, deciding, run. A: id, decision (JSON), now ms, the halt's step ('' for any).
/// Moves a pending job to `deciding` and returns the entry there, or nil when the job is not
/// pending at that halt (see `pending::waits_at`).
const DECIDE: &str = r#"
local p = redis.call('HGET', KEYS[1], ARGV[1])
if not p then return false end
if ARGV[4] ~= '' and step_of(p) ~= tonumber(ARGV[4]) then return false end
local entry = cjson.encode({at = tonumber(ARGV[3]), decision = ARGV[2], pending = p,
  props = redis.call('HGET', KEYS[3], 'amqp') or '{}'})
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], entry)
return entry
"#;

/// K: deciding. A: now ms, stale after ms, run key prefix. Entries older than the limit whose
/// decision step is not journaled yet are stamped anew and returned (`id, entry, …`) to publish
/// again; entries whose decision was applied (or whose run is gone) are dropped.
const STALE_DECISIONS: &str = r#"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
for i = 1, #all, 2 do
  local id, raw = all[i], all[i + 1]
  local ok, e = pcall(cjson.decode, raw)
  if ok and type(e) == 'table' and tonumber(e.at) and tonumber(e.at) + tonumber(ARGV[2]) < now then
    local run = ARGV[3] .. id
    local step = type(e.pending) == 'string' and step_of(e.pending)
    if redis.call('EXISTS', run) == 0 or (step and redis.call('HEXISTS', run, string.format('%d', step)) == 1) then
      redis.call('HDEL', KEYS[1], id)
    elseif e.confirmed then
      -- The broker holds its message: it waits to be applied, not sent again.
    else
      e.at = now
      raw = cjson.encode(e)
      redis.call('HSET', KEYS[1], id, raw)
      out[#out + 1] = id
      out[#out + 1] = raw
    end
  end
end
return out
"#;

/// A run's hash.
pub(super) fn run_key(q: &QueueNames, job_id: &str) -> String {
    format!("{}:run:{job_id}", q.jobs)
}

/// Each job's current epoch (the claim that may write its run).
pub(super) fn epochs_key(q: &QueueNames) -> String {
    format!("{}:epochs", q.jobs)
}

/// The queue's epoch sequence (see the redis backend's CLAIM): every claim or delivery takes
/// the next value, so an epoch never comes again, even after a job's own entry was forgotten.
pub(super) fn epoch_seq_key(q: &QueueNames) -> String {
    format!("{}:epoch_seq", q.jobs)
}

/// Jobs waiting for a human (amqp backend).
pub(super) fn pending_key(q: &QueueNames) -> String {
    format!("{}:pending", q.jobs)
}

/// Decisions whose resume message the broker has not confirmed yet (amqp backend).
fn deciding_key(q: &QueueNames) -> String {
    format!("{}:deciding", q.jobs)
}

pub(super) struct RedisRunStore {
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
            _ => Err(QueueError::Other(format!(
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
            .arg(super::now_ms())
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
            .arg(super::now_ms())
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
        QueueError::Other(format!(
            "the stored decision for job {job_id} is unreadable: {e}"
        ))
    })
}
