//! The RabbitMQ (AMQP 0-9-1) backend, on `lapin`.
//!
//! Topology, for a work queue `Q` (declared idempotently at first use on every connection, or
//! only checked with passive declares when `declare = false`):
//!
//! | name        | what                                                                        |
//! |-------------|-----------------------------------------------------------------------------|
//! | `Q`         | durable work queue; dead-letters (broker side) to `Q.dlx` with key `Q`      |
//! | `Q.dlx`     | durable direct exchange for dead letters                                     |
//! | `Q.dead`    | durable dead-letter queue, bound to `Q.dlx` with key `Q`                    |
//! | `Q.delay.T` | durable delay buckets (`T`: `1s`, `3s`, `10s`, `30s`, `1m` … `3d`, `7d`), no consumer; each one's `x-message-ttl` dead-letters back to `Q` |
//! | results     | the configured results queue, durable                                        |
//!
//! With `queue_type = "quorum"` every queue is a quorum queue, the work queue carries
//! `x-delivery-limit` when configured, and the work and delay queues dead-letter
//! at-least-once (`x-dead-letter-strategy`, which needs `x-overflow = reject-publish`).
//!
//! How a claim ends. Every message this backend publishes is persistent (delivery mode 2) and
//! goes out on a channel in confirm mode: the connection's shared one, or, for what the broker
//! may refuse by closing the channel (a named exchange, a body over 1 MiB), one of its own, so
//! one refused publish cannot leave the others' outcomes unknown (`publish.rs`); the delivery is acked (manual acks) only after every
//! confirm of its finish has arrived, so nothing leaves the broker's hands before its outcome is
//! durable there. Finishes run concurrently (one task per job), so many confirms are in flight
//! at once; no finish waits for another's round trip. Publishes and confirms have no deadline
//! while their channel is open: a broker that blocks publishers (a memory or disk alarm) holds
//! the finish until it clears, because a publish given up on would still go out later and a
//! retry would add a copy.
//!
//! * `Publish`: result to the results queue (`message_id` = job id, `x-run-id`, `x-status`,
//!   `x-signature` headers), a copy to `reply_to` with the job's `correlation_id` when the job
//!   asked for one, the dead-letter entry too when the worker gives one; confirm; done marker;
//!   ack. A finish that is retried sends only what was not confirmed yet, and the reply is
//!   best effort (the caller's queue may be gone or full; the results queue has the result).
//! * `Retry`: the same body to the delay bucket of its delay, rounded up (a 20 s delay waits in
//!   `Q.delay.30s`), with `expiration` = the bucket's, `x-attempt` and the attempt history
//!   (`x-lar-history`, JSON) in headers; confirm; ack. The broker moves it back to `Q` when it
//!   expires.
//! * `DeadLetter`: the body untouched to `Q.dlx` with `x-lar-reason`, `x-lar-history`;
//!   confirm; ack.
//! * `Release`: `basic.nack(requeue = true)`.
//!
//! Redrive (`Admin::redrive_dead_letter`, `lar-worker dead-letters redrive ID`): the job's dead
//! letter is found in `Q.dead` (read in order, unacked), published back to `Q` under its own
//! id with a confirm, then acked; the dead letters read before it go back in place. A crash in
//! between leaves a duplicate, never a loss (`admin.rs`, `Shared::redrive`, says why the done
//! marker and the fencing absorb it).
//!
//! Fencing. AMQP has no leases: a delivery belongs to the channel it came on, and the broker
//! redelivers it when that channel (or the connection) dies. A finish on a claim whose channel
//! is gone does nothing and returns [`Fenced::Lost`](crate::queue::Fenced::Lost); the broker's redelivery is the takeover.
//! `extend` reports whether the claim's channel is still open (the broker's `consumer_timeout`,
//! 30 minutes by default, bounds how long one delivery may stay unacked).
//!
//! Job ids. A job is known by its `message_id` (or, on envelope queues, its `id`). A message
//! with neither is stamped when first delivered: a copy with a new `message_id` is published
//! back to the work queue (confirmed) and the original acked, so every later delivery of it
//! is the same job. It costs such producers one more publish per job and moves the job behind
//! what is queued; producers that set `message_id` pay nothing.
//!
//! One result per job. A redelivery after a lost ack would publish a second result, so a
//! done marker is kept per job id: checked before publishing, set after the confirms, before
//! the ack. It lives in this process (always) and in Redis when `dedupe_redis_url` is set
//! (`SET <queue>:done:<job_id> 1 EX 86400 NX`), which covers redeliveries to other replicas
//! and restarts. A dead letter moved back to `Q` is not a redelivery but a new life of the
//! job (a redrive, or a shovel): it carries the `x-lar-failed-at` header of its dead-lettering, and its marker is
//! `<queue>:done:<job_id>:redriven:<failed_at>`, so it runs and publishes again. What remains: a result the broker stored whose confirm never reached the worker
//! (the connection died in between) is indistinguishable from one the broker never got, so the
//! redelivered job publishes again. Producers that need strict once-only consumption dedupe
//! results on `message_id`.
//!
//! Known limits, by design of AMQP 0-9-1 and RabbitMQ:
//! * `depth().claimed` counts what *this process* holds (handed out or buffered): the protocol
//!   gives clients no unacknowledged count of a queue (the management plugin does).
//! * The broker expires messages only at the head of a queue, so retries wait in buckets of
//!   one delay each: a retry never comes back early, and at most one step of the ladder (about
//!   3x) late, since its delay is rounded up to its bucket's. Retries still in the single
//!   `Q.delay` of earlier versions come back as they did; `delete_topology` removes it.
//! * On quorum queues every return counts toward `delivery_limit`, a shutdown's `Release` and
//!   a crash included.
//! * Checkpoints only with `checkpoint_store` (a Redis URL, or a SQLite file for the replicas
//!   of one host; `run_store`): each run's checkpoint and journal live there, and every
//!   delivery bumps the job's epoch there,
//!   so a redelivered job resumes after its last finished step and a worker cut off from the
//!   broker cannot write over the newer attempt. A finished run is retired before its ack (set
//!   to go a day later, unless a redelivery takes it back) and forgotten after it, so a crash
//!   in between leaves nothing for ever and loses no job; a retried one before the retry
//!   is published, since the retry starts from the first step. Without a store a redelivered
//!   job runs from its first step.
//! * The human pause needs `checkpoint_store` too (without one a `human_jury` halt is a final
//!   result). A pause stores the pending record there (fenced on the epoch), publishes the
//!   `awaiting_decision` result with a confirm, then acks: no delivery waits on a human. A
//!   decision moves the record to `deciding` in the store, publishes the job's message
//!   again with the decision in the `x-lar-decision` header (and the original `reply_to` and
//!   `correlation_id`), and drops the entry after the confirm; `recover` publishes entries a
//!   crash left behind again. Anyone allowed to publish to the work queue can attach a
//!   decision header, exactly as anyone allowed to write the redis backend's list can: the
//!   worker still applies a decision only to a run halted at a jury, with an allowed choice.
//!
//! Connection loss. A supervisor task reconnects with [`Backoff::reconnect`](crate::backoff::Backoff::reconnect), declares again
//! and re-consumes every queue that was being consumed. Deliveries buffered from the dead
//! channel are dropped (the broker redelivers them), and claims already handed out finish as
//! `Lost`.

mod admin;
mod backend;
mod claims;
mod connection;
mod consumer;
mod dedupe;
mod finish;
mod headers;
mod publish;
#[cfg(test)]
mod tests;
mod topology;

pub use connection::{mask_credentials, redact};
pub use topology::{delete_topology, AmqpQueueType, Topology};

use super::run_store::RunStore;
use super::{QueueError, QueueNames};
use claims::Held;
use connection::{supervise, Live};
use consumer::Buffer;
use dedupe::Memo;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// Where this process's delivery numbers start (see `Shared::epoch`).
const LOCAL_EPOCHS: u64 = 1 << 63;

/// Everything the backend needs from workers.toml.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub url: String,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    pub queue_type: AmqpQueueType,
    pub delivery_limit: Option<u32>,
    pub declare: bool,
    pub dedupe_redis_url: Option<String>,
    /// A Redis that keeps checkpoints and journals (crash resume); `None`: jobs rerun from
    /// their first step on redelivery.
    pub checkpoint_store: Option<String>,
    /// Queues whose messages are envelopes (their `id` is the job id when no `message_id`).
    pub envelope_queues: Vec<String>,
}

impl AmqpOptions {
    /// Options with the defaults of workers.toml, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpOptions {
            url: url.into(),
            prefetch: 16,
            queue_type: AmqpQueueType::Classic,
            delivery_limit: None,
            declare: true,
            dedupe_redis_url: None,
            checkpoint_store: None,
            envelope_queues: Vec::new(),
        }
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    opts: AmqpOptions,
    worker_id: String,
    envelope: HashSet<String>,
    live: StdMutex<Option<Arc<Live>>>,
    /// Grows with every connection; a claim is live only on the current one.
    generation: AtomicU64,
    /// Serializes connecting and starting consumers.
    setup: Mutex<()>,
    /// Queues to consume (re-consumed after a reconnect).
    wanted: StdMutex<HashMap<String, QueueNames>>,
    buffers: StdMutex<HashMap<String, Arc<Buffer>>>,
    /// Deliveries handed out, by (job id, epoch).
    held: StdMutex<HashMap<(String, u64), Held>>,
    /// This process's delivery numbers, the epoch of a claim until the store gives it one
    /// (`fence`). They start at [`LOCAL_EPOCHS`], apart from every store epoch (below 2^63:
    /// SQLite's are i64), so a copy's number can never be another copy's store epoch in
    /// `held` (its finish would settle the other's delivery).
    epoch: AtomicU64,
    dedupe: Option<::redis::aio::ConnectionManager>,
    /// Checkpoints and journals, with each job's epoch, when a store is configured.
    runs: Option<Box<dyn RunStore>>,
    memo: StdMutex<Memo>,
    closing: AtomicBool,
    /// Reports of a failed connection (its generation) to the supervisor.
    broken: mpsc::UnboundedSender<u64>,
}

/// The AMQP backend. Cheap to share; one connection with a shared publish channel (and one per
/// dead-letter exchange published to) and one consumer channel per consumed queue.
pub struct AmqpBackend {
    shared: Arc<Shared>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl AmqpBackend {
    /// Connects (failing fast when the broker or the dedupe Redis is unreachable) and starts
    /// the reconnect supervisor. Consuming starts at the first `claim` of a queue.
    pub async fn connect(opts: AmqpOptions, worker_id: String) -> Result<Self, QueueError> {
        let dedupe = match &opts.dedupe_redis_url {
            Some(url) => Some(super::redis::connection(url).await?),
            None => None,
        };
        let runs = match &opts.checkpoint_store {
            Some(spec) => Some(super::run_store::open(spec).await?),
            None => None,
        };
        let (broken, reports) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            envelope: opts.envelope_queues.iter().cloned().collect(),
            opts,
            worker_id,
            live: StdMutex::new(None),
            generation: AtomicU64::new(0),
            setup: Mutex::new(()),
            wanted: StdMutex::new(HashMap::new()),
            buffers: StdMutex::new(HashMap::new()),
            held: StdMutex::new(HashMap::new()),
            epoch: AtomicU64::new(LOCAL_EPOCHS),
            dedupe,
            runs,
            memo: StdMutex::new(Memo::default()),
            closing: AtomicBool::new(false),
            broken,
        });
        shared.connect_once().await?;
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&shared), reports));
        Ok(AmqpBackend { shared, supervisor })
    }

    /// Declares (or, with `declare = false`, checks) a queue's topology now.
    pub async fn ensure_topology(&self, q: &QueueNames) -> Result<(), QueueError> {
        let live = self.shared.current()?;
        self.shared.ensure_topology(&live, q).await
    }

    /// Closes the current connection abruptly, as a network failure would (tests).
    #[doc(hidden)]
    pub async fn simulate_connection_loss(&self) {
        let live = lock(&self.shared.live).clone();
        if let Some(live) = live {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                live.conn
                    .close(320, "lar-worker test: simulated connection loss"),
            )
            .await;
            let _ = self.shared.broken.send(live.generation);
        }
    }

    /// How many connections this backend has opened (tests).
    #[doc(hidden)]
    pub fn connection_generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }
}

impl Drop for AmqpBackend {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.supervisor.abort();
        let live = lock(&self.shared.live).take();
        if let Some(live) = &live {
            live.stop.cancel();
        }
        if let (Some(live), Ok(rt)) = (live, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), live.conn.close(200, "bye")).await;
            });
        }
    }
}
