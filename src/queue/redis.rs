//! The Redis backend: producers `RPUSH` JSON onto a list (the seed's `agent:jobs`); a worker
//! claims with `LMOVE` (a batch, in a Lua script) or, when the queue is empty, a blocking
//! `BLMOVE` into a processing list of its own. Every claim gets a lease in a sorted set and a new
//! epoch; every finish is one Lua script that acts only while the epoch is still this claim's, so
//! a result is published exactly once even after a lease expired and another replica took over.
//!
//! Keys, for a queue `Q` (results go to the configured list):
//! `Q:processing:<worker>` claimed messages · `Q:leases` zset id→deadline · `Q:claims` hash
//! id→stored message · `Q:owners` hash id→worker · `Q:epochs` hash id→epoch, drawn from `Q:epoch_seq` · `Q:delayed` zset
//! of retries by due time · `Q:dead` dead letters · `Q:workers` set · `Q:hb:<worker>` heartbeat ·
//! `Q:run:<job>` hash of a durable run (`ckpt` its checkpoint, `0`, `1`, … its step records) ·
//! `Q:pending` hash of jobs waiting for a human · `Q:decided` hash id→halt step of a decision on
//! its way (until its message ends).
//! The reaper touches other workers' processing lists by name, so this backend needs a
//! non-cluster Redis (or all keys of a queue in one hash slot: name queues `{agent}:jobs`).

use super::redis_batch::BatchedScript;
use super::redis_runs::{
    epoch_seq_key, epochs_key, run_key, RedisRunStore, NEXT_EPOCH_FN, STEP_FNS,
};
use super::run_store::RunStore;
use super::wrapper::{unwrap_bytes, Wrapped};
use super::*;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, Script};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Redis's own clock, in ms since the epoch. Every lease deadline, retry due time and expiry
/// check is taken on it, not on the worker's: replicas on hosts whose clocks disagree would
/// otherwise reap each other's live claims early (or a dead one's late).
const NOW_FN: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// Wraps a producer's message with its job id (see `wrapper.rs`). An id taken from a message
/// must be well-formed UTF-8 (Unicode's table 3-7, as Rust checks it): cjson passes any bytes
/// through, and an id the worker cannot hold as text would be fenced off on every finish.
const WRAP_FN: &str = r#"
local PREFIX = '{"lar_worker":1,'
-- Every claim of this call (ARGV[2]: the lease in ms) ends its lease at the same moment.
local deadline = now_ms() + tonumber(ARGV[2])
local function utf8_ok(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    else return false end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      if j > i + 1 then lo, hi = 0x80, 0xBF end
      if not cc or cc < lo or cc > hi then return false end
    end
    i = i + len
  end
  return true
end
local function wrap(raw, candidate, envelope)
  if string.sub(raw, 1, #PREFIX) == PREFIX then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' and type(obj.id) == 'string' and #obj.id > 0
      and utf8_ok(obj.id) then return raw, obj.id end
  end
  local id = candidate
  if envelope == '1' then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' then
      if type(obj.id) == 'string' and #obj.id > 0 and #obj.id <= 200 and utf8_ok(obj.id) then id = obj.id
      elseif type(obj.id) == 'number' then id = string.format('%.17g', obj.id) end
    end
  end
  return PREFIX .. '"id":' .. cjson.encode(id) .. ',"attempt":0,"history":[],"raw":' .. cjson.encode(raw) .. '}', id
end
local function hold(wrapped, id)
  local epoch = next_epoch(KEYS[7])
  redis.call('HSET', KEYS[6], id, epoch)
  redis.call('ZADD', KEYS[3], deadline, id)
  redis.call('HSET', KEYS[4], id, wrapped)
  redis.call('HSET', KEYS[5], id, ARGV[1])
  return epoch
end
"#;

/// KEYS: queue, processing, leases, claims, owners, epochs, epoch sequence, delayed, run-key
/// prefix. ARGV: worker, lease ms, n, envelope, candidate ids... Returns (stored, epoch, id,
/// has run) quadruples: has run is 1 when the job has a stored run (checkpoint and journal).
/// A copy of a job whose id is held right now (a producer sent it twice) is not claimed: it
/// waits in the delayed set for a lease and comes back after, so one id never has two holders
/// (their claims, leases and checkpoints are keyed by the id). Byte-identical copies waiting
/// at the same time wait as one.
/// Epochs come from the queue's sequence (`redis_runs::NEXT_EPOCH_FN`).
const CLAIM: &str = r#"
local out = {}
for i = 1, tonumber(ARGV[3]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'LEFT')
  if not raw then break end
  local wrapped, id = wrap(raw, ARGV[4 + i], ARGV[4])
  if redis.call('HEXISTS', KEYS[4], id) == 1 then
    redis.call('LPOP', KEYS[2])
    redis.call('ZADD', KEYS[8], deadline, wrapped)
  else
    redis.call('LSET', KEYS[2], 0, wrapped)
    out[#out + 1] = wrapped
    out[#out + 1] = hold(wrapped, id)
    out[#out + 1] = id
    out[#out + 1] = redis.call('EXISTS', KEYS[9] .. id)
  end
end
return out
"#;

/// After a BLMOVE: the same, for the one message it moved. ARGV: worker, lease ms, _, envelope,
/// candidate, raw.
const ADOPT: &str = r#"
if redis.call('LREM', KEYS[2], 1, ARGV[6]) == 0 then return {} end
local wrapped, id = wrap(ARGV[6], ARGV[5], ARGV[4])
if redis.call('HEXISTS', KEYS[4], id) == 1 then
  redis.call('ZADD', KEYS[8], deadline, wrapped)
  return {}
end
redis.call('LPUSH', KEYS[2], wrapped)
return {wrapped, hold(wrapped, id), id, redis.call('EXISTS', KEYS[9] .. id)}
"#;

/// KEYS: leases, epochs. ARGV: lease ms, (id, epoch)...
const EXTEND: &str = r#"
local deadline = now_ms() + tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] and redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// Run per job in batches (`redis_batch`). K: processing, leases, claims, owners, epochs,
/// results, dead, queue, delayed, run (checkpoint + journal), pending, decided. A: id, epoch,
/// mode, a, b, '1' when the claim carries a decision (else '').
/// Modes: publish (a = result or '', b = dead entry or ''), retry and retry_keep (a = new
/// stored message, b = delay ms; retry_keep keeps the run for the next attempt to resume), dead and dead_keep (a = entry; dead_keep keeps the run for a redrive to resume), release (a = stored message), pause (a = awaiting_decision
/// result, b = pending record). Every mode but release, pause, retry_keep and dead_keep ends the run: its checkpoint
/// and journal go, unless the job waits for a human (a pending record): then this claim was a
/// copy of the paused job (a producer sent its id again), and the paused run is not its to end.
/// A pending record whose halt the journal shows answered is stale (a copy of the job paused
/// again while the decision was on its way): it goes with the run, or a later decision of it
/// would resume the ended run and publish a second result. A pause keeps the job's epoch, so the claim that resumes it gets a newer
/// one than any earlier holder (a holder whose lease expired stays fenced off).
/// While a decision is on its way (`decided`, set by SUBMIT_DECISION), a copy of the job that
/// pauses again at that halt asks nobody, and no other claim ends the run the decision needs;
/// the decision's own claim clears the mark when it ends (a hand-back and a retry that keeps
/// the run carry the decision on).
/// The claim is looked for from the processing list's tail: claims are pushed at its head, and
/// jobs end roughly in the order they were claimed, so a finish meets its entry near the tail
/// instead of comparing itself with every job in flight (perf: 7 % of Redis's CPU at 256).
const FINISH: &str = r#"
if redis.call('HGET', K[5], A[1]) ~= A[2] then return 0 end
local function forget_run()
  -- A decision on its way (another claim's message) needs the run to resume.
  if A[6] == '1' then redis.call('HDEL', K[12], A[1])
  elseif redis.call('HEXISTS', K[12], A[1]) == 1 then return end
  local p = redis.call('HGET', K[11], A[1])
  if p then
    local s = step_of(p)
    if not (s and redis.call('HEXISTS', K[10], string.format('%d', s)) == 1) then return end
    redis.call('HDEL', K[11], A[1])
  end
  redis.call('DEL', K[10])
end
local stored = redis.call('HGET', K[3], A[1])
if not stored then return 0 end
redis.call('LREM', K[1], -1, stored)
redis.call('ZREM', K[2], A[1])
redis.call('HDEL', K[3], A[1])
redis.call('HDEL', K[4], A[1])
local mode = A[3]
-- The claim carried the decision on its way (`decided`): ending it any way but a hand-back
-- or a retry that keeps the run means no decision is on its way any more.
if A[6] == '1' and (mode == 'dead' or mode == 'dead_keep' or mode == 'retry') then
  redis.call('HDEL', K[12], A[1])
end
if mode == 'publish' then
  if A[4] ~= '' then redis.call('RPUSH', K[6], A[4]) end
  if A[5] ~= '' then redis.call('RPUSH', K[7], A[5]) end
  redis.call('HDEL', K[5], A[1])
  forget_run()
elseif mode == 'retry' or mode == 'retry_keep' then
  redis.call('ZADD', K[9], now_ms() + tonumber(A[5]), A[4])
  if mode == 'retry' then forget_run() end
elseif mode == 'dead' or mode == 'dead_keep' then
  redis.call('RPUSH', K[7], A[4])
  redis.call('HDEL', K[5], A[1])
  if mode == 'dead' then forget_run() end
elseif mode == 'release' then
  redis.call('LPUSH', K[8], A[4])
elseif mode == 'pause' then
  local d = tonumber(redis.call('HGET', K[12], A[1]))
  if d then
    local s = step_of(A[5])
    -- A copy of the job pausing again at a halt whose decision is on its way: nothing to
    -- ask, the decision's message resumes the run. (The decision's own claim pausing there
    -- did not apply it, an unsigned one say: its pause stands.)
    if s and s <= d and A[6] ~= '1' then return 1 end
    redis.call('HDEL', K[12], A[1])
  end
  redis.call('RPUSH', K[6], A[4])
  redis.call('HSET', K[11], A[1], A[5])
end
return 1
"#;

/// KEYS: queue, leases, claims, owners, delayed, workers, epochs, own processing list.
/// ARGV: _, processing-list prefix, heartbeat prefix.
/// Besides expired leases, dead workers' lists and due retries, it hands back any message in
/// the caller's own processing list that no claim holds: one a BLMOVE moved whose ADOPT never
/// ran (the connection dropped in between, or its reply timed out first). A raw message there
/// is held by nobody (only ADOPT wraps); a wrapped one (a retry, a hand-back, a decided job)
/// is held only if `claims` holds exactly it. An ADOPT that comes later finds it gone and
/// claims nothing.
const RECOVER: &str = r#"
local now = now_ms()
local PREFIX = '{"lar_worker":1,'
local function wrapped_id(item)
  local id = string.match(item, '^{"lar_worker":1,"id":"([^"\\]*)",')
  if id then return id end
  local ok, obj = pcall(cjson.decode, item)
  if ok and type(obj) == 'table' and type(obj.id) == 'string' then return obj.id end
  return nil
end
local moved = 0
for _, item in ipairs(redis.call('LRANGE', KEYS[8], 0, -1)) do
  local held = false
  if string.sub(item, 1, #PREFIX) == PREFIX then
    local id = wrapped_id(item)
    held = id ~= nil and redis.call('HGET', KEYS[3], id) == item
  end
  if not held then
    redis.call('LREM', KEYS[8], 1, item)
    redis.call('LPUSH', KEYS[1], item)
    moved = moved + 1
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  local stored = redis.call('HGET', KEYS[3], id)
  local owner = redis.call('HGET', KEYS[4], id)
  if stored then
    if owner then redis.call('LREM', ARGV[2] .. owner, 1, stored) end
    redis.call('LPUSH', KEYS[1], stored)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
for _, w in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if redis.call('EXISTS', ARGV[3] .. w) == 0 then
    local proc = ARGV[2] .. w
    while true do
      local item = redis.call('RPOP', proc)
      if not item then break end
      redis.call('LPUSH', KEYS[1], item)
      moved = moved + 1
      if string.sub(item, 1, #PREFIX) == PREFIX then
        local ok, obj = pcall(cjson.decode, item)
        if ok and type(obj) == 'table' and type(obj.id) == 'string' then
          redis.call('ZREM', KEYS[2], obj.id)
          redis.call('HDEL', KEYS[3], obj.id)
          redis.call('HDEL', KEYS[4], obj.id)
        end
      end
    end
    redis.call('SREM', KEYS[6], w)
  end
end
for _, item in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('RPUSH', KEYS[1], item)
  redis.call('ZREM', KEYS[5], item)
  moved = moved + 1
end
return moved
"#;

/// KEYS: dead, queue. ARGV: entry, payload.
const REDRIVE: &str = r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"#;

/// KEYS: pending, queue, decided. ARGV: id, message, the halt's step ('' for any: see
/// `pending::waits_at`). Marks the job's decision as on its way (`decided`: id → step) until
/// its message ends: a copy of the job (its id sent again) that pauses again at that halt in
/// the meantime asks nobody (FINISH `pause`), or a second decision could override this one.
const SUBMIT_DECISION: &str = r#"
local p = redis.call('HGET', KEYS[1], ARGV[1])
if not p then return 0 end
local step = step_of(p)
if ARGV[3] ~= '' and step ~= tonumber(ARGV[3]) then return 0 end
if step then redis.call('HSET', KEYS[3], ARGV[1], string.format('%d', step)) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"#;

/// The decision a claim carries, for its dead-letter entry.
fn decision_value(claim: &Claim) -> Option<serde_json::Value> {
    claim
        .decision
        .as_ref()
        .and_then(|d| serde_json::to_value(d).ok())
}

pub struct RedisBackend {
    worker_id: String,
    /// Multiplexed, auto-reconnecting: every non-blocking command of every task.
    conn: ConnectionManager,
    /// Where BLMOVE connections come from.
    url: String,
    /// One BLMOVE connection per queue (opened on its first empty claim): a blocking call
    /// stalls its connection, and queues sharing one would wait in turn, so a job pushed to
    /// an idle worker would sit behind every other queue's wait (its decisions queue's, say).
    blocking: std::sync::Mutex<std::collections::HashMap<String, Arc<Blocking>>>,
    envelope_queues: Arc<std::collections::HashSet<String>>,
    scripts: Scripts,
    /// Checkpoints and journals (`Q:run:<job>`), fenced on `Q:epochs`.
    runs: RedisRunStore,
}

/// A queue's BLMOVE connection.
struct Blocking {
    conn: Mutex<ConnectionManager>,
    /// Until when a BLMOVE sent on `conn` may still be waiting inside Redis. A claim cut off
    /// at shutdown leaves its BLMOVE blocked there, and it can still move a message into this
    /// worker's processing list: `deregister` waits this out before dropping the heartbeat.
    until: std::sync::Mutex<Option<std::time::Instant>>,
}

struct Scripts {
    claim: Script,
    adopt: Script,
    extend: Script,
    /// Per job, batched across jobs (see `redis_batch`).
    finish: BatchedScript,
    recover: Script,
    submit_decision: Script,
    redrive: Script,
}

fn keys(q: &QueueNames, worker: &str) -> Keys {
    let p = &q.jobs;
    Keys {
        queue: p.clone(),
        processing: format!("{p}:processing:{worker}"),
        processing_prefix: format!("{p}:processing:"),
        leases: format!("{p}:leases"),
        claims: format!("{p}:claims"),
        owners: format!("{p}:owners"),
        epochs: epochs_key(q),
        epoch_seq: epoch_seq_key(q),
        delayed: format!("{p}:delayed"),
        dead: format!("{p}:dead"),
        workers: format!("{p}:workers"),
        heartbeat_prefix: format!("{p}:hb:"),
        pending: format!("{p}:pending"),
        decided: format!("{p}:decided"),
        results: q.results.clone(),
    }
}

struct Keys {
    queue: String,
    processing: String,
    processing_prefix: String,
    leases: String,
    claims: String,
    owners: String,
    epoch_seq: String,
    epochs: String,
    delayed: String,
    dead: String,
    workers: String,
    heartbeat_prefix: String,
    pending: String,
    decided: String,
    results: String,
}

/// A multiplexed, reconnecting Redis connection that fails fast at start (so readiness can say
/// why), retries briefly and waits at most 10 s for a reply. Every Redis connection of the
/// crate uses it: this backend's, and the AMQP backend's done markers and checkpoint store.
pub(super) async fn connection(url: &str) -> Result<ConnectionManager, QueueError> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_with_config(Client::open(url)?, cfg).await?)
}

impl RedisBackend {
    /// Connects (failing fast when Redis is unreachable, so readiness can say why).
    /// `envelope_queues` are the queues whose messages carry their own `id`.
    pub async fn connect(
        url: &str,
        worker_id: String,
        envelope_queues: Vec<String>,
    ) -> Result<Self, QueueError> {
        let conn = connection(url).await?;
        Ok(RedisBackend {
            worker_id,
            runs: RedisRunStore::new(conn.clone()),
            conn: conn.clone(),
            url: url.to_string(),
            blocking: Default::default(),
            envelope_queues: Arc::new(envelope_queues.into_iter().collect()),
            scripts: Scripts {
                claim: Script::new(&format!("{NOW_FN}{NEXT_EPOCH_FN}{WRAP_FN}{CLAIM}")),
                adopt: Script::new(&format!("{NOW_FN}{NEXT_EPOCH_FN}{WRAP_FN}{ADOPT}")),
                extend: Script::new(&format!("{NOW_FN}{EXTEND}")),
                finish: BatchedScript::start(
                    "finish",
                    &format!("{STEP_FNS}{NOW_FN}"),
                    FINISH,
                    12,
                    6,
                    conn.clone(),
                ),
                recover: Script::new(&format!("{NOW_FN}{RECOVER}")),
                submit_decision: Script::new(&format!("{STEP_FNS}{SUBMIT_DECISION}")),
                redrive: Script::new(REDRIVE),
            },
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The queue's BLMOVE connection, opened on first use.
    async fn blocking(&self, queue: &str) -> Result<Arc<Blocking>, QueueError> {
        if let Some(b) = self.blocking_of(queue) {
            return Ok(b);
        }
        let fresh = Arc::new(Blocking {
            conn: Mutex::new(connection(&self.url).await?),
            until: std::sync::Mutex::new(None),
        });
        // A panic elsewhere cannot leave the map half-changed: take it even if poisoned.
        let mut all = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        Ok(all.entry(queue.to_string()).or_insert(fresh).clone())
    }

    fn blocking_of(&self, queue: &str) -> Option<Arc<Blocking>> {
        let all = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        all.get(queue).cloned()
    }

    fn envelope_flag(&self, q: &QueueNames) -> &'static str {
        if self.envelope_queues.contains(&q.jobs) {
            "1"
        } else {
            "0"
        }
    }

    /// The (stored, epoch, id, has run) quadruples CLAIM and ADOPT return. The id is the one
    /// the script filed the claim and epoch under: the finish must name exactly it, whatever
    /// Rust would make of the message (a decoder stricter than cjson, a message that only
    /// looks wrapped).
    fn decode_claims(&self, items: Vec<::redis::Value>) -> Vec<Claim> {
        let mut out = Vec::with_capacity(items.len() / 4);
        let mut it = items.into_iter();
        while let (Some(stored), Some(epoch), Some(id), Some(has_run)) =
            (it.next(), it.next(), it.next(), it.next())
        {
            // The script only returns bytes, numbers and a UTF-8 id (candidates are ours); a
            // claim that still does not decode is left to its lease, and says so.
            let decoded = (|| -> Result<_, ::redis::RedisError> {
                Ok((
                    ::redis::from_redis_value::<Vec<u8>>(stored)?,
                    ::redis::from_redis_value::<u64>(epoch)?,
                    ::redis::from_redis_value::<String>(id)?,
                    ::redis::from_redis_value::<i64>(has_run)?,
                ))
            })();
            match decoded {
                Ok((stored, epoch, id, has_run)) => {
                    let mut claim = Self::to_claim(stored, epoch, id);
                    claim.fresh = has_run == 0;
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
                handle: ClaimHandle::Redis { stored },
            },
            // A producer's message that only looks wrapped (the script checks its prefix and
            // its `id`, not every field), or one cjson reads and serde does not (hex numbers,
            // deep nesting): keep the bytes so the worker dead-letters them, under the id the
            // script filed, or the finish would be fenced off and the message would loop
            // through lease expiry for ever.
            None => Claim {
                job_id,
                payload: stored.clone(),
                attempt: 1,
                epoch,
                history: Vec::new(),
                decision: None,
                fresh: false,
                handle: ClaimHandle::Redis { stored },
            },
        }
    }

    /// The keys and leading arguments CLAIM and ADOPT share (see the scripts' KEYS/ARGV).
    fn claim_invocation(
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
            .key(super::redis_runs::run_key(q, ""));
        inv.arg(&self.worker_id)
            .arg(lease.as_millis() as u64)
            .arg(n)
            .arg(self.envelope_flag(q));
    }

    /// The stored message again, with a changed attempt count and history.
    /// `keeps_decision`: false for a retry from the first step, which asks its human again (a
    /// decision kept on the job would answer a run that is gone).
    fn rewrap(
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

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut inv = self.scripts.claim.prepare_invoke();
        self.claim_invocation(&mut inv, q, &k, lease, max);
        for _ in 0..max {
            inv.arg(crate::ids::new_id());
        }
        let mut conn = self.conn.clone();
        let items: Vec<::redis::Value> = inv.invoke_async(&mut conn).await?;
        if !items.is_empty() || wait.is_zero() {
            return Ok(self.decode_claims(items));
        }
        // Nothing ready: block on the queue without spinning.
        let blocking = self.blocking(&q.jobs).await?;
        let raw: Option<Vec<u8>> = {
            let mut b = blocking.conn.lock().await;
            let until = std::time::Instant::now() + wait + Duration::from_millis(200);
            if let Ok(mut t) = blocking.until.lock() {
                *t = Some(t.map_or(until, |prev| prev.max(until)));
            }
            ::redis::cmd("BLMOVE")
                .arg(&k.queue)
                .arg(&k.processing)
                .arg("LEFT")
                .arg("LEFT")
                .arg(wait.as_secs_f64())
                .query_async(&mut *b)
                .await?
        };
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        let mut inv = self.scripts.adopt.prepare_invoke();
        self.claim_invocation(&mut inv, q, &k, lease, 1);
        inv.arg(crate::ids::new_id()).arg(raw);
        let items: Vec<::redis::Value> = inv.invoke_async(&mut conn).await?;
        Ok(self.decode_claims(items))
    }

    async fn extend(
        &self,
        q: &QueueNames,
        claims: &[(String, u64)],
        lease: Duration,
    ) -> Result<Vec<bool>, QueueError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let k = keys(q, &self.worker_id);
        let mut inv = self.scripts.extend.prepare_invoke();
        inv.key(&k.leases)
            .key(&k.epochs)
            .arg(lease.as_millis() as u64);
        for (id, epoch) in claims {
            inv.arg(id).arg(epoch.to_string());
        }
        let mut conn = self.conn.clone();
        let flags: Vec<i64> = inv.invoke_async(&mut conn).await?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError> {
        let k = keys(q, &self.worker_id);
        let (mode, a, b): (&str, Vec<u8>, Vec<u8>) = match how {
            Finish::Publish {
                result,
                dead_letter,
            } => {
                let dead = dead_letter
                    .map(|dl| {
                        dead_letter_entry(&q.jobs, &dl, &claim.payload, None)
                            .to_string()
                            .into_bytes()
                    })
                    .unwrap_or_default();
                ("publish", result, dead)
            }
            Finish::Retry {
                delay,
                error,
                keep_run,
            } => {
                let mut history = claim.history.clone();
                history.push(AttemptRecord {
                    attempt: claim.attempt,
                    at: crate::exec::run::now_utc(),
                    error,
                });
                (
                    if keep_run { "retry_keep" } else { "retry" },
                    Self::rewrap(claim, claim.attempt, history, keep_run),
                    (delay.as_millis() as u64).to_string().into_bytes(),
                )
            }
            Finish::DeadLetter(dl) => (
                if dl.keep_run { "dead_keep" } else { "dead" },
                dead_letter_entry(&q.jobs, &dl, &claim.payload, decision_value(claim))
                    .to_string()
                    .into_bytes(),
                Vec::new(),
            ),
            Finish::Release => (
                "release",
                Self::rewrap(
                    claim,
                    claim.attempt.saturating_sub(1),
                    claim.history.clone(),
                    true,
                ),
                Vec::new(),
            ),
            Finish::Pause { result, pending } => ("pause", result, pending),
        };
        let keys = vec![
            k.processing,
            k.leases,
            k.claims,
            k.owners,
            k.epochs,
            k.results,
            k.dead,
            k.queue,
            k.delayed,
            run_key(q, &claim.job_id),
            k.pending,
            k.decided,
        ];
        let args = vec![
            claim.job_id.clone().into_bytes(),
            claim.epoch.to_string().into_bytes(),
            mode.as_bytes().to_vec(),
            a,
            b,
            if claim.decision.is_some() {
                b"1".to_vec()
            } else {
                Vec::new()
            },
        ];
        let done = self.scripts.finish.call(keys, args).await?;
        Ok(if done == 1 {
            Fenced::Done
        } else {
            Fenced::Lost
        })
    }

    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut inv = self.scripts.recover.prepare_invoke();
        inv.key(&k.queue)
            .key(&k.leases)
            .key(&k.claims)
            .key(&k.owners)
            .key(&k.delayed)
            .key(&k.workers)
            .key(&k.epochs)
            .key(&k.processing);
        inv.arg("")
            .arg(&k.processing_prefix)
            .arg(&k.heartbeat_prefix);
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }

    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.rpush(&q.jobs, payload).await?;
        Ok(None)
    }

    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        let (ready, claimed, delayed, dead, results): (u64, u64, u64, u64, u64) = ::redis::pipe()
            .llen(&k.queue)
            .zcard(&k.leases)
            .zcard(&k.delayed)
            .llen(&k.dead)
            .llen(&k.results)
            .query_async(&mut conn)
            .await?;
        Ok(QueueDepth {
            ready,
            claimed,
            delayed,
            dead,
            results,
        })
    }

    async fn results(
        &self,
        q: &QueueNames,
        max: usize,
        take: bool,
    ) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut conn = self.conn.clone();
        if max == 0 {
            return Ok(Vec::new());
        }
        if take {
            let items: Option<Vec<Vec<u8>>> = ::redis::cmd("LPOP")
                .arg(&q.results)
                .arg(max)
                .query_async(&mut conn)
                .await?;
            Ok(items.unwrap_or_default())
        } else {
            Ok(conn.lrange(&q.results, 0, max as isize - 1).await?)
        }
    }

    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        let items: Vec<Vec<u8>> = conn.lrange(&k.dead, 0, max as isize - 1).await?;
        Ok(items
            .iter()
            .map(|b| {
                serde_json::from_slice(b).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                })
            })
            .collect())
    }

    async fn heartbeat(&self, q: &QueueNames, ttl: Duration) -> Result<(), QueueError> {
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        let ttl_ms = ttl.as_millis().max(1000) as u64;
        let _: () = ::redis::pipe()
            .cmd("SET")
            .arg(format!("{}{}", k.heartbeat_prefix, self.worker_id))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .sadd(&k.workers, &self.worker_id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn supports_checkpoints(&self) -> bool {
        true
    }

    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        let entries: Vec<Vec<u8>> = conn.lrange(&k.dead, 0, -1).await?;
        for raw in entries {
            let Ok(entry) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                continue;
            };
            if entry.get("job_id").and_then(|v| v.as_str()) != Some(job_id) {
                continue;
            }
            let Some(payload) = dead_letter_payload(&entry) else {
                return Err(QueueError::Other(format!(
                    "dead letter {job_id} keeps no payload"
                )));
            };
            // Back under its own id: a bare message would be claimed under a new one, and a
            // run kept for the redrive (`keep_run`) would be run again from its first step.
            // The producer's bytes travel untouched inside the wrapper; bytes that are not
            // UTF-8 cannot be wrapped and go back bare (they are refused again anyway).
            // The decision goes back only with the run it resumes: a job whose run is gone
            // starts over, and a decision without a run would only be refused again.
            let decision = match dead_letter_decision(&entry) {
                Some(d) if conn.exists::<_, bool>(run_key(q, job_id)).await? => Some(d),
                _ => None,
            };
            let message = match String::from_utf8(payload) {
                Ok(text) => Wrapped {
                    lar_worker: 1,
                    id: job_id.to_string(),
                    attempt: 0,
                    history: Vec::new(),
                    raw: text,
                    decision,
                }
                .encode(),
                Err(e) => e.into_bytes(),
            };
            let mut inv = self.scripts.redrive.prepare_invoke();
            inv.key(&k.dead).key(&k.queue).arg(raw).arg(message);
            let done: i64 = inv.invoke_async(&mut conn).await?;
            return Ok(done == 1);
        }
        Ok(false)
    }

    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        self.runs.load_run(q, job_id).await
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        self.runs.save_step(q, claim, step).await
    }

    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        Ok(conn.hvals(&k.pending).await?)
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        Ok(conn.hget(&k.pending, job_id).await?)
    }

    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        let k = keys(q, &self.worker_id);
        let job_id = pending.job_id.as_str();
        let msg = Wrapped {
            lar_worker: 1,
            id: job_id.to_string(),
            attempt: pending.attempt,
            history: pending.history.clone(),
            raw: pending.payload.clone(),
            decision: Some(decision.clone()),
        }
        .encode();
        let mut inv = self.scripts.submit_decision.prepare_invoke();
        let step = decision.step.map(|s| s.to_string()).unwrap_or_default();
        inv.key(&k.pending)
            .key(&k.queue)
            .key(&k.decided)
            .arg(job_id)
            .arg(msg)
            .arg(step);
        let mut conn = self.conn.clone();
        let done: i64 = inv.invoke_async(&mut conn).await?;
        Ok(done == 1)
    }

    async fn deregister(&self, q: &QueueNames) -> Result<(), QueueError> {
        // The heartbeat goes; the registration stays for the reapers: they find this worker
        // dead, hand back whatever its processing list still holds, and only then drop it
        // from `Q:workers`. A BLMOVE still blocked in Redis could land a message there after
        // a reaper looked: the heartbeat goes only once none can be.
        let blocked = self
            .blocking_of(&q.jobs)
            .and_then(|b| b.until.lock().ok().and_then(|t| *t));
        if let Some(left) =
            blocked.and_then(|t| t.checked_duration_since(std::time::Instant::now()))
        {
            tokio::time::sleep(left).await;
        }
        let k = keys(q, &self.worker_id);
        let mut conn = self.conn.clone();
        let _: i64 = conn
            .del(format!("{}{}", k.heartbeat_prefix, self.worker_id))
            .await?;
        Ok(())
    }
}
