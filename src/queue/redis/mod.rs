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
//! its way (until its message ends) · `Q:recoveries` hash id→how many of the job's claims the
//! reaper took back from a holder that did not end them (until the job's life ends: a
//! publish, a dead letter, a pause).
//! The reaper touches other workers' processing lists by name, so this backend needs a
//! non-cluster Redis (or all keys of a queue in one hash slot: name queues `{agent}:jobs`).
//!
//! Its parts: `keys` (the key names above), `scripts` (its Lua, one file each in `lua/`),
//! `batch` (per-job scripts batched across jobs), `wrapper` (the envelope around a claimed
//! message), `claims` (script replies made claims, claims made stored messages again) and
//! `backend` (the [`Backend`](crate::queue::Backend) implementation).

mod backend;
pub(in crate::queue) mod batch;
mod claims;
mod keys;
mod scripts;
pub mod wrapper;

use self::scripts::Scripts;
use crate::queue::run_store::redis::RedisRunStore;
use crate::queue::QueueError;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

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
            scripts: Scripts::load(&conn),
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
}
