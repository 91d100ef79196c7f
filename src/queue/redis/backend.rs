//! The Redis backend's [`Backend`] implementation: each operation is one script (claims,
//! finishes, the reaper, decisions) or a plain command or pipeline (enqueue, depth, reads),
//! on the keys `keys` names; durable runs go to the run store beside the queue.

use super::claims::decision_value;
use super::keys::keys;
use super::wrapper::Wrapped;
use super::RedisBackend;
use crate::queue::run_store::redis::run_key;
use crate::queue::run_store::RunStore;
use crate::queue::{
    dead_letter_decision, dead_letter_entry, dead_letter_payload, failed_attempt, redrive_decision,
    rules, Admin, Backend, Claim, Consumer, DecisionFate, Fenced, Finish, Pauses, QueueDepth,
    QueueError, QueueNames, RunFate, Runs, StepWrite, StoredRun,
};
use ::redis::AsyncCommands;
use async_trait::async_trait;
use std::time::Duration;

#[async_trait]
impl Consumer for RedisBackend {
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
        let rules = rules(&how);
        let keeps_decision = rules.decision == DecisionFate::StaysWithJob;
        let (a, b): (Vec<u8>, Vec<u8>) = match how {
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
                (result, dead)
            }
            Finish::Retry { delay, error, .. } => {
                let history = failed_attempt(
                    &claim.history,
                    claim.attempt,
                    error,
                    crate::clock::now_utc(),
                );
                (
                    Self::rewrap(claim, claim.attempt, history, keeps_decision),
                    (delay.as_millis() as u64).to_string().into_bytes(),
                )
            }
            Finish::DeadLetter(dl) => (
                dead_letter_entry(&q.jobs, &dl, &claim.payload, decision_value(claim))
                    .to_string()
                    .into_bytes(),
                Vec::new(),
            ),
            Finish::Release => (
                Self::rewrap(
                    claim,
                    claim.attempt.saturating_sub(1),
                    claim.history.clone(),
                    keeps_decision,
                ),
                Vec::new(),
            ),
            Finish::Pause { result, pending } => (result, pending),
        };
        let flag = |on: bool| if on { b"1".to_vec() } else { Vec::new() };
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
            k.recoveries,
        ];
        let args = vec![
            claim.job_id.clone().into_bytes(),
            claim.epoch.to_string().into_bytes(),
            rules.script_mode().as_bytes().to_vec(),
            a,
            b,
            flag(claim.decision.is_some()),
            flag(rules.drops_decision_on_its_way()),
            flag(rules.run == RunFate::Forgotten),
            flag(rules.resets_recoveries),
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
            .key(&k.processing)
            .key(&k.recoveries);
        inv.arg("")
            .arg(&k.processing_prefix)
            .arg(&k.heartbeat_prefix);
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
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

#[async_trait]
impl Admin for RedisBackend {
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
                return Err(QueueError::Corrupt(format!(
                    "dead letter {job_id} keeps no payload"
                )));
            };
            // Back under its own id: a bare message would be claimed under a new one, and a
            // run kept for the redrive (`keep_run`) would be run again from its first step.
            // The producer's bytes travel untouched inside the wrapper; bytes that are not
            // UTF-8 cannot be wrapped and go back bare (they are refused again anyway).
            // The redrive rule (`finish::redrive_decision`); the run is looked up only when
            // there is a decision to restore.
            let kept = dead_letter_decision(&entry);
            let run_stored = kept.is_some() && conn.exists::<_, bool>(run_key(q, job_id)).await?;
            let decision = redrive_decision(kept, run_stored);
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
}

#[async_trait]
impl Runs for RedisBackend {
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
}

#[async_trait]
impl Pauses for RedisBackend {
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
}

impl Backend for RedisBackend {
    fn runs(&self) -> Option<&dyn Runs> {
        Some(self)
    }

    fn pauses(&self) -> Option<&dyn Pauses> {
        Some(self)
    }
}
