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
//! | `Q.delay`   | durable delay queue: no consumer; per-message TTL dead-letters back to `Q`  |
//! | results     | the configured results queue, durable                                        |
//!
//! With `queue_type = "quorum"` every queue is a quorum queue, the work queue carries
//! `x-delivery-limit` when configured, and the work and delay queues dead-letter
//! at-least-once (`x-dead-letter-strategy`, which needs `x-overflow = reject-publish`).
//!
//! How a claim ends. Every message this backend publishes is persistent (delivery mode 2) and
//! goes out on a channel in confirm mode; the delivery is acked (manual acks) only after every
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
//! * `Retry`: the same body to `Q.delay` with `expiration` = the delay, `x-attempt` and the
//!   attempt history (`x-lar-history`, JSON) in headers; confirm; ack. The broker moves it back
//!   to `Q` when it expires.
//! * `DeadLetter`: the body untouched to `Q.dlx` with `x-lar-reason`, `x-lar-history`;
//!   confirm; ack.
//! * `Release`: `basic.nack(requeue = true)`.
//!
//! Fencing. AMQP has no leases: a delivery belongs to the channel it came on, and the broker
//! redelivers it when that channel (or the connection) dies. A finish on a claim whose channel
//! is gone does nothing and returns [`Fenced::Lost`]; the broker's redelivery is the takeover.
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
//! and restarts. A dead letter shovelled back to `Q` is not a redelivery but a new life of the
//! job: it carries the `x-lar-failed-at` header of its dead-lettering, and its marker is
//! `<queue>:done:<job_id>:redriven:<failed_at>`, so it runs and publishes again. What remains: a result the broker stored whose confirm never reached the worker
//! (the connection died in between) is indistinguishable from one the broker never got, so the
//! redelivered job publishes again. Producers that need strict once-only consumption dedupe
//! results on `message_id`.
//!
//! Known limits, by design of AMQP 0-9-1 and RabbitMQ:
//! * `depth().claimed` counts what *this process* holds (handed out or buffered): the protocol
//!   gives clients no unacknowledged count of a queue (the management plugin does).
//! * The broker expires per-message TTLs only at the head of the delay queue, so a retry
//!   with a long delay holds back shorter ones queued behind it: a retry never comes back
//!   early, but may come back late.
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
//! Connection loss. A supervisor task reconnects with [`Backoff::reconnect`], declares again
//! and re-consumes every queue that was being consumed. Deliveries buffered from the dead
//! channel are dropped (the broker redelivers them), and claims already handed out finish as
//! `Lost`.

use super::run_store::{Deciding, Paused, RunStore};
use super::*;
use crate::backoff::Backoff;
use crate::config::AmqpQueueType;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest any one broker operation may take before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a done marker lives in Redis.
const MARKER_TTL_SECS: u64 = 86_400;
/// How long a finished run stays after its retirement, in case its delivery was never acked
/// and comes back to resume it (see `RunStore::retire`): as long as a done marker.
const RETIRED_RUN_KEPT: Duration = Duration::from_secs(MARKER_TTL_SECS);
/// Done markers remembered in this process.
const MEMO_CAP: usize = 200_000;
const PERSISTENT: u8 = 2;
/// Where this process's delivery numbers start (see `Shared::epoch`).
const LOCAL_EPOCHS: u64 = 1 << 63;
/// The header that carries a human decision on a resumed job's message.
const DECISION_HEADER: &str = "x-lar-decision";
/// Stamped by each dead-lettering: a redriven copy is a new life of its job (see `memo_key`).
const FAILED_AT_HEADER: &str = "x-lar-failed-at";
/// A decision still in the store's `deciding` hash after this long is published again.
const DECISION_REDELIVER_AFTER: Duration = Duration::from_secs(60);

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

/// The names of one work queue's topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub results: String,
    pub delay: String,
    pub dead: String,
    pub dlx: String,
}

impl Topology {
    pub fn of(q: &QueueNames) -> Self {
        Topology {
            jobs: q.jobs.clone(),
            results: q.results.clone(),
            delay: format!("{}.delay", q.jobs),
            dead: format!("{}.dead", q.jobs),
            dlx: format!("{}.dlx", q.jobs),
        }
    }
}

/// The url with its password masked, for logs and errors.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", mask_credentials(rest)),
        None => url.to_string(),
    }
}

/// The part of a url after `scheme://`, with the password of `user:password@host` masked.
pub fn mask_credentials(rest: &str) -> String {
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split(':').next().unwrap_or("");
            format!("{user}:***@{host}")
        }
        None => rest.to_string(),
    }
}

fn amqp_err(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Amqp(format!("{what}: {e}"))
}

/// Runs one broker operation with a deadline, mapping its error.
async fn io<T>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(explain(what, e)),
        Err(_) => Err(QueueError::Amqp(format!(
            "{what}: no answer from the broker within {IO_TIMEOUT:?}"
        ))),
    }
}

/// Waits for a publish or its confirms for as long as `ch` is open, with no deadline. A publish
/// given up on while its channel lives still goes out once the broker reads it (after a memory
/// or disk alarm, say): its outcome is unknown, and publishing again would add a copy on every
/// try. A channel that closes (the broker closed it, or the connection died, which heartbeats
/// detect) ends the wait: then each message went out at most once.
async fn while_open<T>(
    ch: &Channel,
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    tokio::pin!(fut);
    let mut check = tokio::time::interval(Duration::from_millis(500));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut fut => return r.map_err(|e| explain(what, e)),
            _ = check.tick() => {
                if !ch.status().connected() {
                    return Err(QueueError::Amqp(format!(
                        "{what}: the channel closed before the broker answered"
                    )));
                }
            }
        }
    }
}

/// Adds a hint to the errors operators meet when the topology does not match the config.
fn explain(what: &str, e: lapin::Error) -> QueueError {
    let text = e.to_string();
    let hint = if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
        match p.get_id() {
            404 => " (it does not exist; with declare = false the operators must create it)",
            406 => {
                " (it exists with other arguments: was it declared with another queue_type or \
                 delivery_limit? delete it or match the config)"
            }
            403 => " (the broker user lacks the permission)",
            _ => "",
        }
    } else {
        ""
    };
    QueueError::Amqp(format!("{what}: {text}{hint}"))
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn header<'a>(h: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    h.inner().get(key)
}

fn value_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn value_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => value_text(v)?.trim().parse().ok(),
        _ => None,
    }
}

fn header_text(h: &FieldTable, key: &str) -> Option<String> {
    header(h, key).and_then(value_text)
}

/// The job's headers to carry onto a republished copy: the broker's own bookkeeping
/// (`x-death`, `x-first-death-*`, `x-last-death-*`, `x-delivery-count`) stays behind.
fn carried_headers(props: &BasicProperties) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let k_str = k.as_str();
            if k_str == "x-death"
                || k_str.starts_with("x-first-death")
                || k_str.starts_with("x-last-death")
                || k_str == "x-delivery-count"
            {
                continue;
            }
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Fresh persistent properties carrying the job's routing-relevant fields (never `user_id`,
/// which the broker checks against the connection's user, nor `expiration`).
fn job_props(orig: &BasicProperties, job_id: &str, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(job_id))
        .with_headers(headers);
    if let Some(v) = orig.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = orig.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = orig.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = orig.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = orig.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = orig.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = orig.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = orig.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

/// `run_id`, `status` and `signature` of a result message (envelope or state format).
fn result_meta(result: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(result) else {
        return (None, None, None);
    };
    let m = match v.get(crate::worker::payload::META_KEY) {
        Some(m) if m.is_object() => m,
        _ => &v,
    };
    let get = |k: &str| m.get(k).and_then(|x| x.as_str()).map(str::to_string);
    (get("run_id"), get("status"), get("signature"))
}

/// A publish and the confirm to await for it.
type Confirm = (String, PublisherConfirm);
/// A result's confirm and, when the job has a `reply_to`, its reply's.
type Confirms = (Confirm, Option<Confirm>);

/// The messages of one finish, to tell their confirms apart.
#[derive(Clone, Copy)]
enum Part {
    Result,
    Reply,
    DeadLetter,
}

/// A delivery as the consumer received it, waiting to be claimed.
struct Pending {
    generation: u64,
    channel: Channel,
    delivery: lapin::message::Delivery,
}

/// A claim handed to the worker: what its finish needs.
#[derive(Clone)]
struct Held {
    generation: u64,
    channel: Channel,
    delivery_tag: u64,
    queue: String,
    props: BasicProperties,
    /// What a finish already got confirmed: a retried finish publishes only the rest, so a
    /// result the broker stored is never published twice because another part failed.
    sent: Sent,
}

#[derive(Clone, Copy, Default)]
struct Sent {
    result: bool,
    dead_letter: bool,
}

/// One queue's deliveries, filled by the consumer task, drained by `claim`. It outlives
/// connections: a reconnect's consumer feeds the same buffer.
struct Buffer {
    tx: mpsc::UnboundedSender<Pending>,
    rx: Mutex<mpsc::UnboundedReceiver<Pending>>,
    len: AtomicUsize,
}

struct Consuming {
    channel: Channel,
    tag: String,
    /// Set before a deliberate cancel, so the consumer task does not report a failure.
    stopping: Arc<AtomicBool>,
}

/// One live connection and its channels.
struct Live {
    generation: u64,
    /// Ends the connection's event watcher.
    stop: CancellationToken,
    conn: Connection,
    /// The confirm-mode channel every publish goes out on (re-opened if it closes).
    publish: Mutex<Option<Channel>>,
    consumers: StdMutex<HashMap<String, Consuming>>,
    /// Work queues whose topology was declared (or checked) on this connection.
    declared: StdMutex<HashSet<String>>,
}

/// Job ids whose result was published, remembered in this process (oldest forgotten first).
#[derive(Default)]
struct Memo {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Memo {
    fn insert(&mut self, key: String) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            while self.order.len() > MEMO_CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
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

/// The AMQP backend. Cheap to share; one connection with a publish channel and one consumer
/// channel per consumed queue.
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

/// Reconnects after a reported failure of the current connection, with backoff, until it
/// works or the backend closes.
async fn supervise(shared: Weak<Shared>, mut reports: mpsc::UnboundedReceiver<u64>) {
    while let Some(generation) = reports.recv().await {
        let Some(s) = shared.upgrade() else { return };
        if s.closing.load(Ordering::SeqCst) {
            return;
        }
        if generation != s.generation.load(Ordering::SeqCst) {
            continue; // a late report about a connection already replaced
        }
        let old = lock(&s.live).take();
        if let Some(old) = old {
            old.stop.cancel();
            warn!(
                generation,
                "amqp connection lost: in-flight deliveries return to the queue; reconnecting"
            );
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    old.conn.close(200, "reconnecting"),
                )
                .await;
            });
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            tokio::time::sleep(Backoff::reconnect().delay(attempt)).await;
            if s.closing.load(Ordering::SeqCst) {
                return;
            }
            match s.connect_once().await {
                Ok(()) => {
                    info!(
                        attempts = attempt,
                        generation = s.generation.load(Ordering::SeqCst),
                        "amqp reconnected"
                    );
                    break;
                }
                Err(e) => warn!(attempt, error = %e, "amqp reconnect failed"),
            }
        }
    }
}

/// Reports the connection's first error to the supervisor; warns while the broker blocks
/// publishing (a resource alarm: confirms, and so finishes, stall until it clears).
async fn watch_events(
    events: impl futures::Stream<Item = lapin::Event> + Send + 'static,
    status: lapin::ConnectionStatus,
    generation: u64,
    broken: mpsc::UnboundedSender<u64>,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            // Channel-level closes (a 404 from a passive declare, say) come here too; only a
            // connection that is no longer connected is worth a reconnect.
            Some(lapin::Event::Error(e)) if status.connected() => {
                debug!(generation, error = %e, "amqp channel error");
            }
            Some(lapin::Event::Error(e)) => {
                debug!(generation, error = %e, "amqp connection error");
                let _ = broken.send(generation);
                return;
            }
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                warn!(%reason, "the broker blocked publishing on this connection");
            }
            Some(lapin::Event::ConnectionUnblocked) => info!("the broker unblocked publishing"),
            Some(_) => {}
        }
    }
}

/// Forwards a consumer's deliveries into its queue's buffer; reports the connection when the
/// stream ends without a deliberate cancel.
async fn pump(
    mut consumer: lapin::Consumer,
    channel: Channel,
    generation: u64,
    buffer: Arc<Buffer>,
    stopping: Arc<AtomicBool>,
    broken: mpsc::UnboundedSender<u64>,
    queue: String,
) {
    while let Some(item) = consumer.next().await {
        match item {
            Ok(delivery) => {
                buffer.len.fetch_add(1, Ordering::SeqCst);
                let pending = Pending {
                    generation,
                    channel: channel.clone(),
                    delivery,
                };
                if buffer.tx.send(pending).is_err() {
                    buffer.len.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    warn!(queue = %queue, error = %e, "amqp consumer failed");
                }
                break;
            }
        }
    }
    if !stopping.load(Ordering::SeqCst) {
        debug!(queue = %queue, generation, "amqp consumer ended");
        let _ = broken.send(generation);
    }
}

impl Shared {
    fn current(&self) -> Result<Arc<Live>, QueueError> {
        lock(&self.live)
            .clone()
            .ok_or_else(|| QueueError::Amqp("not connected to the broker (reconnecting)".into()))
    }

    fn buffer(&self, queue: &str) -> Arc<Buffer> {
        let mut b = lock(&self.buffers);
        Arc::clone(b.entry(queue.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Arc::new(Buffer {
                tx,
                rx: Mutex::new(rx),
                len: AtomicUsize::new(0),
            })
        }))
    }

    async fn connect_once(self: &Arc<Self>) -> Result<(), QueueError> {
        let _setup = self.setup.lock().await;
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("lar-worker {}", self.worker_id).into_bytes(),
        ));
        let url = redact(&self.opts.url);
        let conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.opts.url, props))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(amqp_err(&format!("cannot connect to {url}"), e)),
                Err(_) => {
                    return Err(QueueError::Amqp(format!(
                        "cannot connect to {url}: no answer within {CONNECT_TIMEOUT:?}"
                    )))
                }
            };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let stop = CancellationToken::new();
        tokio::spawn(watch_events(
            conn.events_listener(),
            conn.status().clone(),
            generation,
            self.broken.clone(),
            stop.clone(),
        ));
        let live = Arc::new(Live {
            generation,
            stop,
            conn,
            publish: Mutex::new(None),
            consumers: StdMutex::new(HashMap::new()),
            declared: StdMutex::new(HashSet::new()),
        });
        *lock(&self.live) = Some(Arc::clone(&live));
        let wanted: Vec<QueueNames> = lock(&self.wanted).values().cloned().collect();
        for q in &wanted {
            if let Err(e) = self.start_consumer(&live, q).await {
                *lock(&self.live) = None;
                live.stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), live.conn.close(200, "retry"))
                    .await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Declares (or checks) the topology of `q` once per connection.
    async fn ensure_topology(&self, live: &Live, q: &QueueNames) -> Result<(), QueueError> {
        if lock(&live.declared).contains(&q.jobs) {
            return Ok(());
        }
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let res = self.declare_on(&ch, q).await;
        if ch.status().connected() {
            let _ = io("close a channel", ch.close(200, "declared")).await;
        }
        res?;
        lock(&live.declared).insert(q.jobs.clone());
        Ok(())
    }

    async fn declare_on(&self, ch: &Channel, q: &QueueNames) -> Result<(), QueueError> {
        let t = Topology::of(q);
        let quorum = self.opts.queue_type == AmqpQueueType::Quorum;
        let passive = !self.opts.declare;
        let qopts = QueueDeclareOptions {
            passive,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let typed = |extra: &[(&str, AMQPValue)]| {
            let mut a = FieldTable::default();
            if quorum {
                a.insert("x-queue-type".into(), text("quorum"));
            }
            for (k, v) in extra {
                a.insert(ShortString::from(*k), v.clone());
            }
            a
        };
        let at_least_once: Vec<(&str, AMQPValue)> = if quorum {
            vec![
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ]
        } else {
            Vec::new()
        };
        if passive {
            io(
                &format!("check exchange '{}'", t.dlx),
                ch.exchange_declare(
                    &t.dlx,
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            for name in [&t.jobs, &t.results, &t.delay, &t.dead] {
                io(
                    &format!("check queue '{name}'"),
                    ch.queue_declare(name, qopts, FieldTable::default()),
                )
                .await?;
            }
            return Ok(());
        }
        io(
            &format!("declare exchange '{}'", t.dlx),
            ch.exchange_declare(
                &t.dlx,
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        io(
            &format!("declare queue '{}'", t.dead),
            ch.queue_declare(&t.dead, qopts, typed(&[])),
        )
        .await?;
        io(
            &format!("bind queue '{}'", t.dead),
            ch.queue_bind(
                &t.dead,
                &t.dlx,
                &t.jobs,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let mut work: Vec<(&str, AMQPValue)> = vec![
            ("x-dead-letter-exchange", text(&t.dlx)),
            ("x-dead-letter-routing-key", text(&t.jobs)),
        ];
        if let Some(limit) = self.opts.delivery_limit.filter(|_| quorum) {
            work.push(("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit))));
        }
        work.extend(at_least_once.iter().cloned());
        io(
            &format!("declare queue '{}'", t.jobs),
            ch.queue_declare(&t.jobs, qopts, typed(&work)),
        )
        .await?;
        let mut delay: Vec<(&str, AMQPValue)> = vec![
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&t.jobs)),
        ];
        delay.extend(at_least_once.iter().cloned());
        io(
            &format!("declare queue '{}'", t.delay),
            ch.queue_declare(&t.delay, qopts, typed(&delay)),
        )
        .await?;
        io(
            &format!("declare queue '{}'", t.results),
            ch.queue_declare(&t.results, qopts, typed(&[])),
        )
        .await?;
        Ok(())
    }

    /// Starts consuming `q` on `live` (its own channel, `basic.qos(prefetch)`).
    async fn start_consumer(&self, live: &Live, q: &QueueNames) -> Result<(), QueueError> {
        if lock(&live.consumers).contains_key(&q.jobs) {
            return Ok(());
        }
        self.ensure_topology(live, q).await?;
        let ch = io("open a consumer channel", live.conn.create_channel()).await?;
        io(
            "basic.qos",
            ch.basic_qos(self.opts.prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let tag = format!(
            "lar-worker-{}-{}-{}",
            self.worker_id,
            live.generation,
            crate::ids::new_id()
        );
        let consumer = io(
            &format!("consume '{}'", q.jobs),
            ch.basic_consume(
                &q.jobs,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let stopping = Arc::new(AtomicBool::new(false));
        tokio::spawn(pump(
            consumer,
            ch.clone(),
            live.generation,
            self.buffer(&q.jobs),
            Arc::clone(&stopping),
            self.broken.clone(),
            q.jobs.clone(),
        ));
        lock(&live.consumers).insert(
            q.jobs.clone(),
            Consuming {
                channel: ch,
                tag,
                stopping,
            },
        );
        info!(queue = %q.jobs, prefetch = self.opts.prefetch, generation = live.generation, "amqp consuming");
        Ok(())
    }

    /// Makes sure `q` is consumed on the current connection (or will be after a reconnect).
    async fn ensure_consumer(&self, q: &QueueNames) -> Result<(), QueueError> {
        lock(&self.wanted)
            .entry(q.jobs.clone())
            .or_insert_with(|| q.clone());
        let consuming = |live: &Live| lock(&live.consumers).contains_key(&q.jobs);
        match lock(&self.live).clone() {
            None => return Ok(()), // the reconnect starts it
            Some(live) if consuming(&live) => return Ok(()),
            Some(_) => {}
        }
        let _setup = self.setup.lock().await;
        let Some(live) = lock(&self.live).clone() else {
            return Ok(());
        };
        if consuming(&live) {
            return Ok(());
        }
        self.start_consumer(&live, q).await
    }

    /// The confirm-mode publish channel, re-opened if it closed.
    async fn publisher(&self) -> Result<Channel, QueueError> {
        let live = self.current()?;
        let mut slot = live.publish.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = io("open the publish channel", live.conn.create_channel()).await?;
        io(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Whether a claim's delivery can still be settled: its channel is the current
    /// connection's and open.
    fn is_live(&self, h: &Held) -> bool {
        let current = lock(&self.live).as_ref().map(|l| l.generation);
        current == Some(h.generation) && h.channel.status().connected()
    }

    /// A buffered delivery as a claim, or `None` when its channel is gone (the broker
    /// redelivers it). The flag says the message named no job id (see [`Shared::stamp`]).
    fn adopt(&self, q: &QueueNames, p: Pending) -> Option<(Claim, bool)> {
        if p.generation != self.generation.load(Ordering::SeqCst) || !p.channel.status().connected()
        {
            return None;
        }
        let d = p.delivery;
        let props = d.properties;
        let headers = props.headers().clone().unwrap_or_default();
        let named = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .filter(|m| !m.is_empty())
            .or_else(|| {
                self.envelope
                    .contains(&q.jobs)
                    .then(|| envelope_id(&d.data))
                    .flatten()
            });
        let unnamed = named.is_none();
        let job_id = named.unwrap_or_else(crate::ids::new_id);
        let done_before = header(&headers, "x-attempt")
            .and_then(value_int)
            .map(|n| n.clamp(0, i64::from(u32::MAX - 1)) as u32)
            .unwrap_or(0);
        let history: Vec<AttemptRecord> = header_text(&headers, "x-lar-history")
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        // A decision that does not parse is dropped here; the run then stays halted and the
        // worker pauses it again, so the job waits for a well-formed one.
        let decision = header_text(&headers, DECISION_HEADER).and_then(|s| {
            serde_json::from_str(&s)
                .map_err(|e| warn!(%job_id, error = %e, "unreadable decision header ignored"))
                .ok()
        });
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.held).insert(
            (job_id.clone(), epoch),
            Held {
                generation: p.generation,
                channel: p.channel,
                delivery_tag: d.delivery_tag,
                queue: q.jobs.clone(),
                props,
                sent: Sent::default(),
            },
        );
        Some((
            Claim {
                job_id,
                payload: d.data,
                attempt: done_before + 1,
                epoch,
                history,
                decision,
                // The run store is elsewhere; the worker reads it.
                fresh: false,
                handle: ClaimHandle::Amqp {
                    delivery_tag: d.delivery_tag,
                    channel: p.generation,
                },
            },
            unnamed,
        ))
    }

    /// Gives a message that names no job (no `message_id`, no envelope `id`) the id it is
    /// known by from now on: a copy carrying `message_id` goes back to the work queue, with
    /// a confirm, and only then is the original acked. Without this a redelivery (a crash, a
    /// lost connection) would come back as a new job: it would run again from its first step
    /// and publish a second result, since checkpoints, fencing and the done marker are all
    /// keyed by job id. The copy queues behind what is waiting; a crash between the confirm
    /// and the ack leaves the original to be stamped again (two jobs, never none).
    async fn stamp(&self, q: &QueueNames, c: &Claim) {
        let Some(h) = lock(&self.held).remove(&(c.job_id.clone(), c.epoch)) else {
            return;
        };
        let stamped = async {
            let props = job_props(&h.props, &c.job_id, carried_headers(&h.props));
            let ch = self.publisher().await?;
            let what = format!("job with its new id (queue '{}')", q.jobs);
            let pending =
                vec![Self::publish(&ch, "", &q.jobs, true, &c.payload, props, what).await?];
            Self::confirmed(&ch, pending).await
        }
        .await;
        match stamped {
            Ok(()) => {
                debug!(job_id = %c.job_id, "message without an id stamped and queued again");
                self.ack(&h).await;
            }
            Err(e) => {
                warn!(error = %e, "cannot stamp a message without an id: handed back");
                self.requeue(&h).await;
            }
        }
    }

    /// Gives a delivered claim the job's next epoch from the checkpoint store, so checkpoint
    /// writes of any earlier holder of the job (a worker cut off from the broker) are refused.
    async fn fence(&self, q: &QueueNames, c: &mut Claim) -> Result<(), QueueError> {
        let Some(runs) = &self.runs else {
            return Ok(());
        };
        let epoch = runs.next_epoch(q, &c.job_id).await?;
        let mut held = lock(&self.held);
        if let Some(h) = held.remove(&(c.job_id.clone(), c.epoch)) {
            held.insert((c.job_id.clone(), epoch), h);
        }
        c.epoch = epoch;
        Ok(())
    }

    /// Whether this process still holds the claim's delivery on a live channel.
    fn holds(&self, c: &Claim) -> bool {
        lock(&self.held)
            .get(&(c.job_id.clone(), c.epoch))
            .is_some_and(|h| self.is_live(h))
    }

    /// Returns a claim's delivery to the queue (a claim that cannot be fenced).
    async fn give_back(&self, c: &Claim) {
        let h = lock(&self.held).remove(&(c.job_id.clone(), c.epoch));
        if let Some(h) = h {
            self.requeue(&h).await;
        }
    }

    /// The done marker of one life of a job. A dead letter moved back to the work queue (a
    /// shovel, after review) is a new life: it carries the `x-lar-failed-at` its dead-lettering
    /// stamped, so it gets a marker of its own and runs again instead of being acked as done.
    fn memo_key(q: &QueueNames, job_id: &str, h: &Held) -> String {
        let redriven = h
            .props
            .headers()
            .as_ref()
            .and_then(|hs| header_text(hs, FAILED_AT_HEADER));
        match redriven {
            Some(at) => format!("{}:done:{job_id}:redriven:{at}", q.jobs),
            None => format!("{}:done:{job_id}", q.jobs),
        }
    }

    /// Whether a result for this job (in this life, see [`Self::memo_key`]) was already
    /// published (this process, or Redis).
    async fn already_done(&self, key: &str) -> Result<bool, QueueError> {
        if lock(&self.memo).set.contains(key) {
            return Ok(true);
        }
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let n: i64 = ::redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut conn)
                .await?;
            return Ok(n > 0);
        }
        Ok(false)
    }

    /// Records that this job's result is published (before the ack).
    async fn mark_done(&self, key: String, job_id: &str) {
        lock(&self.memo).insert(key.clone());
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let set: Result<Option<String>, _> = ::redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("EX")
                .arg(MARKER_TTL_SECS)
                .arg("NX")
                .query_async(&mut conn)
                .await;
            if let Err(e) = set {
                // The result is out and the ack follows; only a redelivery to another replica
                // after a lost ack could now publish a second result.
                warn!(job_id, error = %e, "cannot set the done marker in Redis");
            }
        }
    }

    /// Acks a claim's delivery: `Lost` when its channel is gone.
    async fn ack(&self, h: &Held) -> Fenced {
        if !self.is_live(h) {
            return Fenced::Lost;
        }
        match io(
            "basic.ack",
            h.channel
                .basic_ack(h.delivery_tag, BasicAckOptions { multiple: false }),
        )
        .await
        {
            Ok(()) => Fenced::Done,
            Err(e) => {
                warn!(error = %e, "ack failed: the broker will redeliver");
                Fenced::Lost
            }
        }
    }

    async fn requeue(&self, h: &Held) -> Fenced {
        if !self.is_live(h) {
            return Fenced::Lost;
        }
        match io(
            "basic.nack",
            h.channel.basic_nack(
                h.delivery_tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            ),
        )
        .await
        {
            Ok(()) => Fenced::Done,
            Err(e) => {
                warn!(error = %e, "nack failed: the broker will redeliver");
                Fenced::Lost
            }
        }
    }

    /// Publishes one message; returns its confirm to await with the others.
    async fn publish(
        ch: &Channel,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
        what: String,
    ) -> Result<(String, PublisherConfirm), QueueError> {
        let confirm = while_open(
            ch,
            &format!("publish the {what}"),
            ch.basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                props,
            ),
        )
        .await?;
        Ok((what, confirm))
    }

    /// Awaits every confirm at once. A nack, a return (unroutable mandatory message) or a
    /// channel failure is an error: the delivery is not acked.
    async fn confirmed(
        ch: &Channel,
        pending: Vec<(String, PublisherConfirm)>,
    ) -> Result<(), QueueError> {
        Self::confirm_each(ch, pending).await?.into_iter().collect()
    }

    /// Awaits every confirm at once and says, per message, whether the broker took it. Only
    /// the channel closing first fails the whole: then nothing is known of any of them.
    async fn confirm_each(
        ch: &Channel,
        pending: Vec<(String, PublisherConfirm)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let (whats, confirms): (Vec<String>, Vec<PublisherConfirm>) = pending.into_iter().unzip();
        let outcomes = while_open(
            ch,
            &format!("publisher confirms (for: {})", whats.join(", ")),
            async { Ok(futures::future::join_all(confirms).await) },
        )
        .await?;
        Ok(whats
            .iter()
            .zip(outcomes)
            .map(|(what, outcome)| match outcome {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
                    Err(QueueError::Amqp(format!(
                        "the {what} was returned unroutable ({} {}): does its queue exist?",
                        ret.reply_code, ret.reply_text
                    )))
                }
                Ok(Confirmation::Nack(None)) => Err(QueueError::Amqp(format!(
                    "the broker refused the {what} (publisher nack)"
                ))),
                Ok(Confirmation::NotRequested) => Err(QueueError::Amqp(format!(
                    "the {what} went out on a channel without confirms"
                ))),
                Err(e) => Err(amqp_err(&format!("confirm of the {what}"), e)),
            })
            .collect())
    }

    fn dead_letter_props(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        dl: &DeadLetter,
    ) -> BasicProperties {
        let mut headers = carried_headers(&h.props);
        headers.insert("x-lar-reason".into(), text(&dl.reason));
        headers.insert(
            "x-lar-history".into(),
            text(&serde_json::to_string(&dl.attempts).unwrap_or_else(|_| "[]".into())),
        );
        headers.insert("x-lar-job-id".into(), text(&dl.job_id));
        headers.insert("x-lar-queue".into(), text(&q.jobs));
        headers.insert(FAILED_AT_HEADER.into(), text(&crate::exec::run::now_utc()));
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        job_props(&h.props, &claim.job_id, headers)
    }

    async fn finish_publish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: Vec<u8>,
        dead_letter: Option<DeadLetter>,
    ) -> Result<Fenced, QueueError> {
        let marker = Self::memo_key(q, &claim.job_id, h);
        if self.already_done(&marker).await? {
            info!(job_id = %claim.job_id, "a result for this job is already published (a redelivery): acking without publishing again");
            self.retire(q, claim).await;
            return Ok(self.ack(h).await);
        }
        let ch = self.publisher().await?;
        // Parts a previous try of this finish got confirmed are not sent again.
        let mut parts = Vec::new();
        let mut pending = Vec::new();
        if !h.sent.result {
            let (result_part, reply_part) = Self::publish_result(&ch, q, claim, h, &result).await?;
            parts.push(Part::Result);
            pending.push(result_part);
            if let Some(reply) = reply_part {
                parts.push(Part::Reply);
                pending.push(reply);
            }
        }
        if let (Some(dl), false) = (&dead_letter, h.sent.dead_letter) {
            let t = Topology::of(q);
            parts.push(Part::DeadLetter);
            pending.push(
                Self::publish(
                    &ch,
                    &t.dlx,
                    &t.jobs,
                    true,
                    &claim.payload,
                    self.dead_letter_props(q, claim, h, dl),
                    format!("dead letter (exchange '{}')", t.dlx),
                )
                .await?,
            );
        }
        let confirmed = Self::confirm_each(&ch, pending).await.and_then(|outcomes| {
            let mut first_error = None;
            let mut held = lock(&self.held);
            let entry = held.get_mut(&(claim.job_id.clone(), claim.epoch));
            let mut sent = entry.as_ref().map(|e| e.sent).unwrap_or_default();
            for (part, outcome) in parts.iter().zip(outcomes) {
                match (part, outcome) {
                    (Part::Result, Ok(())) => sent.result = true,
                    (Part::DeadLetter, Ok(())) => sent.dead_letter = true,
                    (Part::Reply, Ok(())) => {}
                    // The reply is the caller's copy, and its queue is the caller's: a full
                    // or vanished one must not hold the job (the results queue has the result).
                    (Part::Reply, Err(e)) => {
                        warn!(job_id = %claim.job_id, error = %e, "the reply_to copy was not taken; the result is in the results queue")
                    }
                    (_, Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(entry) = entry {
                entry.sent = sent;
            }
            first_error.map_or(Ok(()), Err)
        });
        if let Err(e) = confirmed {
            if self.is_live(h) {
                return Err(e); // refused or unroutable: nothing acked, the worker retries
            }
            // The connection died with the result unconfirmed: the broker may have stored it
            // or not, and cannot be asked. The delivery comes back and publishes again, so
            // this job may end with two results (the one window the done marker cannot close).
            warn!(job_id = %claim.job_id, error = %e,
                  "result unconfirmed when the connection died: the redelivery publishes it again (possible duplicate result)");
            return Ok(Fenced::Lost);
        }
        self.mark_done(marker, &claim.job_id).await;
        self.retire(q, claim).await;
        let fenced = self.ack(h).await;
        if fenced == Fenced::Lost {
            info!(job_id = %claim.job_id, "result published but the ack was lost: the redelivery will be acked by the done marker");
        }
        Ok(fenced)
    }

    /// Publishes a result (final or `awaiting_decision`) to the results queue, and to the
    /// job's `reply_to` with its `correlation_id` when it has one; returns the confirms (the
    /// result's, the reply's).
    async fn publish_result(
        ch: &Channel,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: &[u8],
    ) -> Result<Confirms, QueueError> {
        let (run_id, status, signature) = result_meta(result);
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("x-run-id", run_id),
            ("x-status", status),
            ("x-signature", signature),
        ] {
            if let Some(v) = v {
                headers.insert(k.into(), text(&v));
            }
        }
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(claim.job_id.as_str()))
            .with_app_id("lar-worker".into())
            .with_headers(headers);
        if let Some(c) = h.props.correlation_id() {
            props = props.with_correlation_id(c.clone());
        }
        let result_part = Self::publish(
            ch,
            "",
            &q.results,
            true,
            result,
            props.clone(),
            format!("result (queue '{}')", q.results),
        )
        .await?;
        let mut reply_part = None;
        if let Some(reply_to) = h
            .props
            .reply_to()
            .as_ref()
            .filter(|r| !r.as_str().is_empty())
        {
            // Not mandatory: an RPC caller that went away must not block the job.
            reply_part = Some(
                Self::publish(
                    ch,
                    "",
                    reply_to.as_str(),
                    false,
                    result,
                    props,
                    format!("reply (reply_to '{}')", reply_to.as_str()),
                )
                .await?,
            );
        }
        Ok((result_part, reply_part))
    }

    /// Pauses a run for a human: the pending record into the store (fenced on the epoch),
    /// the `awaiting_decision` result out with its confirm, then the ack.
    async fn finish_pause(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        result: Vec<u8>,
        pending: Vec<u8>,
    ) -> Result<Fenced, QueueError> {
        let Some(runs) = &self.runs else {
            // Unreachable: the worker pauses only on backends that support it.
            warn!(job_id = %claim.job_id, "no checkpoint store to pause in: publishing the awaiting_decision result as final");
            return self.finish_publish(q, claim, h, result, None).await;
        };
        let failed_at = h
            .props
            .headers()
            .as_ref()
            .and_then(|hs| header_text(hs, FAILED_AT_HEADER));
        let props = serde_json::json!({
            "reply_to": h.props.reply_to().as_ref().map(|r| r.as_str().to_string()),
            "correlation_id": h.props.correlation_id().as_ref().map(|c| c.as_str().to_string()),
            // A redriven job's life (see `memo_key`) goes on after the decision: without it,
            // the resumed run would find the first life's done marker and publish nothing.
            "failed_at": failed_at,
        })
        .to_string();
        match runs
            .pause(q, claim, &pending, &props, claim.decision.is_some())
            .await?
        {
            Paused::Stored => {}
            Paused::AlreadyDecided => {
                // This delivery is a copy of a job a human has already answered; the
                // decision's own message resumes the run.
                info!(job_id = %claim.job_id, "a decision for this job is already on its way: acking the copy");
                return Ok(self.ack(h).await);
            }
            Paused::Fenced => {
                // A newer delivery of the same job id holds the run; this copy is redundant.
                self.ack(h).await;
                return Ok(Fenced::Lost);
            }
        }
        let ch = self.publisher().await?;
        let (result_part, reply_part) = Self::publish_result(&ch, q, claim, h, &result).await?;
        let mut outcomes = Self::confirm_each(
            &ch,
            std::iter::once(result_part).chain(reply_part).collect(),
        )
        .await?
        .into_iter();
        outcomes.next().unwrap_or(Ok(()))?;
        if let Some(Err(e)) = outcomes.next() {
            warn!(job_id = %claim.job_id, error = %e, "the reply_to copy was not taken; the result is in the results queue");
        }
        Ok(self.ack(h).await)
    }

    /// Publishes the message that resumes a decided job (its original payload, the decision
    /// in a header), and drops the store's `deciding` entry once the broker confirms it.
    async fn publish_decision(
        &self,
        q: &QueueNames,
        runs: &dyn RunStore,
        job_id: &str,
        entry: &Deciding,
    ) -> Result<(), QueueError> {
        let pending: crate::durable::Pending =
            serde_json::from_str(&entry.pending).map_err(|e| {
                QueueError::Other(format!(
                    "the pending record of job {job_id} is unreadable: {e}"
                ))
            })?;
        let props: serde_json::Value = serde_json::from_str(&entry.props).unwrap_or_default();
        let mut headers = FieldTable::default();
        headers.insert(DECISION_HEADER.into(), text(&entry.decision));
        // The failed attempts before the pause go on with the job.
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(pending.attempt)),
        );
        if !pending.history.is_empty() {
            headers.insert(
                "x-lar-history".into(),
                text(&serde_json::to_string(&pending.history).unwrap_or_else(|_| "[]".into())),
            );
        }
        if let Some(at) = props.get("failed_at").and_then(|v| v.as_str()) {
            headers.insert(FAILED_AT_HEADER.into(), text(at));
        }
        let mut p = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(job_id))
            .with_app_id("lar-worker".into())
            .with_headers(headers);
        if let Some(r) = props.get("reply_to").and_then(|v| v.as_str()) {
            p = p.with_reply_to(ShortString::from(r));
        }
        if let Some(c) = props.get("correlation_id").and_then(|v| v.as_str()) {
            p = p.with_correlation_id(ShortString::from(c));
        }
        let ch = self.publisher().await?;
        let confirm = Self::publish(
            &ch,
            "",
            &q.jobs,
            true,
            pending.payload.as_bytes(),
            p,
            format!("decided job (queue '{}')", q.jobs),
        )
        .await?;
        Self::confirmed(&ch, vec![confirm]).await?;
        runs.decided(q, job_id, pending.step).await
    }

    async fn finish_retry(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        delay: Duration,
        error: String,
        keep_run: bool,
    ) -> Result<Fenced, QueueError> {
        let mut history = claim.history.clone();
        history.push(AttemptRecord {
            attempt: claim.attempt,
            at: crate::exec::run::now_utc(),
            error,
        });
        let mut headers = carried_headers(&h.props);
        if !keep_run {
            // A retry from the first step asks its human again: a decision kept on the job
            // would answer a run that is gone.
            let mut without = FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != DECISION_HEADER {
                    without.insert(k.clone(), v.clone());
                }
            }
            headers = without;
        }
        headers.insert(
            "x-attempt".into(),
            AMQPValue::LongLongInt(i64::from(claim.attempt)),
        );
        headers.insert(
            "x-lar-history".into(),
            text(&serde_json::to_string(&history).unwrap_or_else(|_| "[]".into())),
        );
        let props = job_props(&h.props, &claim.job_id, headers)
            .with_expiration(ShortString::from(delay.as_millis().to_string()));
        let t = Topology::of(q);
        let ch = self.publisher().await?;
        let pending = vec![
            Self::publish(
                &ch,
                "",
                &t.delay,
                true,
                &claim.payload,
                props,
                format!("retry (queue '{}')", t.delay),
            )
            .await?,
        ];
        Self::confirmed(&ch, pending).await?;
        Ok(self.ack(h).await)
    }

    /// Retires the claim's run just before the ack that ends it, so a crash between the ack
    /// and `end_run` (after it, in `finish`) leaves no run for ever (`RunStore::retire`). A
    /// store that fails only risks that orphan: the finish goes on.
    async fn retire(&self, q: &QueueNames, claim: &Claim) {
        if let Some(runs) = &self.runs {
            if let Err(e) = runs.retire(q, claim, RETIRED_RUN_KEPT).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot retire the finished run");
            }
        }
    }

    async fn finish_dead(
        &self,
        q: &QueueNames,
        claim: &Claim,
        h: &Held,
        dl: DeadLetter,
    ) -> Result<Fenced, QueueError> {
        let t = Topology::of(q);
        let ch = self.publisher().await?;
        let pending = vec![
            Self::publish(
                &ch,
                &t.dlx,
                &t.jobs,
                true,
                &claim.payload,
                self.dead_letter_props(q, claim, h, &dl),
                format!("dead letter (exchange '{}')", t.dlx),
            )
            .await?,
        ];
        Self::confirmed(&ch, pending).await?;
        if !dl.keep_run {
            self.retire(q, claim).await;
        }
        Ok(self.ack(h).await)
    }

    /// Up to `max` messages of `queue` on a channel of their own, unacked; the caller acks or
    /// requeues them all through the returned channel and last tag.
    async fn browse(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<(Channel, Option<u64>, Vec<lapin::message::Delivery>), QueueError> {
        let live = self.current()?;
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let mut out = Vec::new();
        let mut last = None;
        while out.len() < max {
            match io(
                &format!("basic.get '{queue}'"),
                ch.basic_get(queue, BasicGetOptions { no_ack: false }),
            )
            .await?
            {
                Some(m) => {
                    last = Some(m.delivery.delivery_tag);
                    out.push(m.delivery);
                }
                None => break,
            }
        }
        Ok((ch, last, out))
    }

    async fn settle_browsed(ch: Channel, last: Option<u64>, take: bool) -> Result<(), QueueError> {
        if let Some(tag) = last {
            if take {
                io(
                    "basic.ack",
                    ch.basic_ack(tag, BasicAckOptions { multiple: true }),
                )
                .await?;
            } else {
                io(
                    "basic.nack",
                    ch.basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    ),
                )
                .await?;
            }
        }
        // Closing also hands back anything unacked.
        io("close a channel", ch.close(200, "done")).await
    }
}

/// A dead-letter queue message as the JSON entry operators read.
fn dead_entry(q: &QueueNames, d: &lapin::message::Delivery) -> serde_json::Value {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let job_id = header_text(&headers, "x-lar-job-id")
        .or_else(|| {
            d.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
        })
        .unwrap_or_default();
    let broker_reason = header_text(&headers, "x-first-death-reason");
    let reason = header_text(&headers, "x-lar-reason").unwrap_or_else(|| {
        format!(
            "dead-lettered by the broker: {} (from queue '{}')",
            broker_reason.as_deref().unwrap_or("unknown reason"),
            header_text(&headers, "x-first-death-queue").unwrap_or_else(|| q.jobs.clone())
        )
    });
    let attempts: Vec<AttemptRecord> = header_text(&headers, "x-lar-history")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let dl = DeadLetter {
        job_id,
        reason,
        attempts,
        keep_run: false,
    };
    // A shovel moves the message itself back, with its decision header.
    let mut entry = dead_letter_entry(&q.jobs, &dl, &d.data, None);
    if let Some(at) = header_text(&headers, FAILED_AT_HEADER) {
        entry["failed_at"] = serde_json::Value::String(at);
    }
    if let Some(r) = broker_reason {
        entry["broker_reason"] = serde_json::Value::String(r);
    }
    if let Some(n) = header(&headers, "x-delivery-count").and_then(value_int) {
        entry["delivery_count"] = serde_json::Value::from(n);
    }
    entry
}

#[async_trait]
impl Backend for AmqpBackend {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        _lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        let s = &self.shared;
        s.ensure_consumer(q).await?;
        let buffer = s.buffer(&q.jobs);
        let mut rx = buffer.rx.lock().await;
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut unnamed = Vec::new();
        while out.len() + unnamed.len() < max {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if !out.is_empty() || !unnamed.is_empty() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(p) = next else { break };
            buffer.len.fetch_sub(1, Ordering::SeqCst);
            match s.adopt(q, p) {
                Some((c, false)) => out.push(c),
                Some((c, true)) => unnamed.push(c),
                None => {}
            }
        }
        drop(rx);
        // Stamped copies come back through the queue as claims of their own.
        futures::future::join_all(unnamed.iter().map(|c| s.stamp(q, c))).await;
        // With a checkpoint store every claim gets the job's next epoch there; a store that
        // cannot be reached hands every delivery back (fenced or not: none is handed out).
        for i in 0..out.len() {
            if let Err(e) = s.fence(q, &mut out[i]).await {
                for c in &out {
                    s.give_back(c).await;
                }
                return Err(e);
            }
        }
        Ok(out)
    }

    async fn extend(
        &self,
        _q: &QueueNames,
        claims: &[(String, u64)],
        _lease: Duration,
    ) -> Result<Vec<bool>, QueueError> {
        let held = lock(&self.shared.held);
        Ok(claims
            .iter()
            .map(|key| held.get(key).is_some_and(|h| self.shared.is_live(h)))
            .collect())
    }

    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError> {
        let s = &self.shared;
        let key = (claim.job_id.clone(), claim.epoch);
        let Some(h) = lock(&s.held).get(&key).cloned() else {
            return Ok(Fenced::Lost);
        };
        // A retry of a failed run starts from its first step, so its run is forgotten before
        // the retry is published: a crash in between then only repeats what the retry would
        // have run. A retry that keeps its run resumes it. Every other final outcome forgets
        // the run after its ack (below).
        let forget_first = matches!(
            how,
            Finish::Retry {
                keep_run: false,
                ..
            }
        );
        if let (true, Some(runs), true) = (forget_first, &s.runs, s.is_live(&h)) {
            runs.end_run(q, claim).await?;
        }
        let ends_run = match &how {
            Finish::Publish { .. } => true,
            Finish::DeadLetter(dl) => !dl.keep_run,
            _ => false,
        };
        let keeps_run = matches!(&how, Finish::DeadLetter(dl) if dl.keep_run);
        // The decision this claim carried is no longer on its way once its message ends
        // without applying it (see `RunStore::drop_decision`). Its entry goes before the ack,
        // and a store that fails fails the finish: an entry left behind would take a later
        // redrive of the job, pausing at that halt, for a copy, and ack it with nothing kept.
        // Dropped too early costs nothing: a redelivered decision applies without its entry.
        let drops_decision = claim.decision.is_some()
            && matches!(
                &how,
                Finish::DeadLetter(_)
                    | Finish::Retry {
                        keep_run: false,
                        ..
                    }
            );
        if let (true, Some(runs), true) = (drops_decision, &s.runs, s.is_live(&h)) {
            let step = claim.decision.as_ref().and_then(|d| d.step);
            runs.drop_decision(q, &claim.job_id, step).await?;
        }
        let out = if !s.is_live(&h) {
            // The channel it came on is gone: the broker redelivers it; publish nothing.
            Ok(Fenced::Lost)
        } else {
            match how {
                Finish::Publish {
                    result,
                    dead_letter,
                } => s.finish_publish(q, claim, &h, result, dead_letter).await,
                Finish::Retry {
                    delay,
                    error,
                    keep_run,
                } => s.finish_retry(q, claim, &h, delay, error, keep_run).await,
                Finish::DeadLetter(dl) => s.finish_dead(q, claim, &h, dl).await,
                Finish::Release => Ok(s.requeue(&h).await),
                Finish::Pause { result, pending } => {
                    s.finish_pause(q, claim, &h, result, pending).await
                }
            }
        };
        if out.is_ok() {
            lock(&s.held).remove(&key);
        }
        if let (Ok(Fenced::Done), Some(runs), true) = (&out, &s.runs, ends_run) {
            // After the ack: a crash in between leaves the run retired (above), to expire or be
            // swept a day later; never a lost job.
            if let Err(e) = runs.end_run(q, claim).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot remove the finished run's checkpoint");
            }
        }
        if let (Ok(Fenced::Done), Some(runs), true) = (&out, &s.runs, keeps_run) {
            if let Err(e) = runs.release(q, claim).await {
                warn!(job_id = %claim.job_id, error = %e, "cannot drop the dead-lettered job's epoch entry");
            }
        }
        out
    }

    fn supports_checkpoints(&self) -> bool {
        self.shared.runs.is_some()
    }

    fn supports_pause(&self) -> bool {
        self.shared.runs.is_some()
    }

    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.load_run(q, job_id).await,
            None => Ok(None),
        }
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        // The delivery's channel is the broker's fence; the store's epoch is the run's.
        if !self.shared.holds(claim) {
            return Ok(Fenced::Lost);
        }
        match &self.shared.runs {
            Some(runs) => runs.save_step(q, claim, step).await,
            None => Err(QueueError::Other(
                "the amqp backend stores checkpoints only with `checkpoint_store` set".into(),
            )),
        }
    }

    /// The broker redelivers the deliveries of dead channels and expires the delay queue;
    /// what is left is decisions whose resume message a crash may have kept from the broker.
    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let s = &self.shared;
        let Some(runs) = &s.runs else {
            return Ok(0);
        };
        // A sweep that fails (the file busy) is tried again next tick; the decisions below
        // must not wait for it.
        match runs.sweep_retired(q).await {
            Ok(0) => {}
            Ok(swept) => {
                info!(queue = %q.jobs, swept, "forgot finished runs a crash left between ack and cleanup")
            }
            Err(e) => warn!(queue = %q.jobs, error = %e, "cannot sweep retired runs"),
        }
        let mut moved = 0;
        for (job_id, entry) in runs.stale_decisions(q, DECISION_REDELIVER_AFTER).await? {
            info!(%job_id, "publishing a decision again: its resume message was never confirmed");
            // One entry failing (the broker refusing it) must not hold back the others; it
            // stays in `deciding` and is tried again after the same delay.
            match s.publish_decision(q, runs.as_ref(), &job_id, &entry).await {
                Ok(()) => moved += 1,
                Err(e) => {
                    warn!(%job_id, error = %e, "cannot publish the decision again; it is retried later")
                }
            }
        }
        Ok(moved)
    }

    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.list_pending(q).await,
            None => Ok(Vec::new()),
        }
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        match &self.shared.runs {
            Some(runs) => runs.get_pending(q, job_id).await,
            None => Ok(None),
        }
    }

    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        let job_id = pending.job_id.as_str();
        let s = &self.shared;
        let Some(runs) = &s.runs else {
            return Err(QueueError::Other(
                "the amqp backend pauses jobs only with `checkpoint_store` set".into(),
            ));
        };
        let step = decision.step;
        let decision = serde_json::to_string(decision)
            .map_err(|e| QueueError::Other(format!("cannot encode the decision: {e}")))?;
        let Some(entry) = runs.decide(q, job_id, step, &decision).await? else {
            return Ok(false);
        };
        // The decision is taken and kept in the store; if the broker does not confirm the
        // resume message now, `recover` publishes it again.
        if let Err(e) = s.publish_decision(q, runs.as_ref(), job_id, &entry).await {
            warn!(%job_id, error = %e, "decision recorded; its resume message will be published again by a worker");
        }
        Ok(true)
    }

    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError> {
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let id = s
            .envelope
            .contains(&q.jobs)
            .then(|| envelope_id(payload))
            .flatten()
            .unwrap_or_else(crate::ids::new_id);
        let props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(id.as_str()));
        let ch = s.publisher().await?;
        let pending = vec![
            Shared::publish(
                &ch,
                "",
                &q.jobs,
                true,
                payload,
                props,
                format!("job (queue '{}')", q.jobs),
            )
            .await?,
        ];
        Shared::confirmed(&ch, pending).await?;
        Ok(Some(id))
    }

    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let t = Topology::of(q);
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut counts = [0u64; 4];
        for (i, name) in [&t.jobs, &t.delay, &t.dead, &t.results].iter().enumerate() {
            let queue = io(
                &format!("check queue '{name}'"),
                ch.queue_declare(name, passive, FieldTable::default()),
            )
            .await?;
            counts[i] = u64::from(queue.message_count());
        }
        let _ = io("close a channel", ch.close(200, "depth")).await;
        let held = lock(&s.held).values().filter(|h| h.queue == q.jobs).count();
        let buffered = lock(&s.buffers)
            .get(&q.jobs)
            .map(|b| b.len.load(Ordering::SeqCst))
            .unwrap_or(0);
        Ok(QueueDepth {
            ready: counts[0],
            // What this process holds: AMQP does not report other consumers' unacked count.
            claimed: (held + buffered) as u64,
            delayed: counts[1],
            dead: counts[2],
            results: counts[3],
        })
    }

    async fn results(
        &self,
        q: &QueueNames,
        max: usize,
        take: bool,
    ) -> Result<Vec<Vec<u8>>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let (ch, last, got) = s.browse(&q.results, max).await?;
        Shared::settle_browsed(ch, last, take).await?;
        Ok(got.into_iter().map(|d| d.data).collect())
    }

    /// Not per job on AMQP: the dead letters are messages in `<queue>.dead`, readable only by
    /// consuming them. Move them with a shovel (`rabbitmqctl set_parameter shovel ...`) after review.
    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        Err(QueueError::Amqp(format!(
            "redriving one dead letter ({job_id}) is not supported on amqp: move messages from '{}.dead' back to '{}' with a shovel after review",
            q.jobs, q.jobs
        )))
    }

    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let live = s.current()?;
        s.ensure_topology(&live, q).await?;
        let t = Topology::of(q);
        let (ch, last, got) = s.browse(&t.dead, max).await?;
        Shared::settle_browsed(ch, last, false).await?;
        Ok(got.iter().map(|d| dead_entry(q, d)).collect())
    }

    async fn deregister(&self, q: &QueueNames) -> Result<(), QueueError> {
        let s = &self.shared;
        let last = {
            let mut wanted = lock(&s.wanted);
            wanted.remove(&q.jobs);
            wanted.is_empty()
        };
        if last {
            s.closing.store(true, Ordering::SeqCst);
        }
        let Some(live) = lock(&s.live).clone() else {
            return Ok(());
        };
        let consuming = lock(&live.consumers).remove(&q.jobs);
        if let Some(c) = consuming {
            c.stopping.store(true, Ordering::SeqCst);
            if c.channel.status().connected() {
                let _ = io(
                    "basic.cancel",
                    c.channel
                        .basic_cancel(&c.tag, BasicCancelOptions::default()),
                )
                .await;
                // Deliveries still buffered are unacked: closing the channel hands them back.
                let _ = io(
                    "close the consumer channel",
                    c.channel.close(200, "stopping"),
                )
                .await;
            }
        }
        let buffer = s.buffer(&q.jobs);
        let mut rx = buffer.rx.lock().await;
        while rx.try_recv().is_ok() {
            buffer.len.fetch_sub(1, Ordering::SeqCst);
        }
        drop(rx);
        if last {
            if let Some(ch) = live.publish.lock().await.take() {
                if ch.status().connected() {
                    let _ = io("close the publish channel", ch.close(200, "stopping")).await;
                }
            }
            live.stop.cancel();
            *lock(&s.live) = None;
            io(
                "close the connection",
                live.conn.close(200, "lar-worker stopped"),
            )
            .await?;
            info!("amqp connection closed");
        }
        Ok(())
    }
}

/// Deletes a work queue's whole topology (tests, benchmarks, operators' cleanup).
pub async fn delete_topology(url: &str, q: &QueueNames) -> Result<(), QueueError> {
    let conn = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(amqp_err(&format!("cannot connect to {}", redact(url)), e)),
        Err(_) => return Err(QueueError::Amqp("connect timed out".into())),
    };
    let t = Topology::of(q);
    let mut first_err = None;
    for name in [&t.jobs, &t.results, &t.delay, &t.dead] {
        // A channel per delete: an error closes the channel.
        let ch = io("open a channel", conn.create_channel()).await?;
        match io(
            &format!("delete queue '{name}'"),
            ch.queue_delete(name, QueueDeleteOptions::default()),
        )
        .await
        {
            Ok(_) => {
                let _ = io("close a channel", ch.close(200, "ok")).await;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let ch = io("open a channel", conn.create_channel()).await?;
    if let Err(e) = io(
        &format!("delete exchange '{}'", t.dlx),
        ch.exchange_delete(&t.dlx, lapin::options::ExchangeDeleteOptions::default()),
    )
    .await
    {
        first_err.get_or_insert(e);
    }
    let _ = io("close the connection", conn.close(200, "cleanup")).await;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
    }

    #[test]
    fn reads_result_meta_in_both_formats() {
        let env = br#"{"job_id":"j","run_id":"r1","status":"completed","signature":"s"}"#;
        assert_eq!(
            result_meta(env),
            (
                Some("r1".into()),
                Some("completed".into()),
                Some("s".into())
            )
        );
        let state = br#"{"x":1,"__lar_worker":{"run_id":"r2","status":"failed","signature":null}}"#;
        assert_eq!(
            result_meta(state),
            (Some("r2".into()), Some("failed".into()), None)
        );
        assert_eq!(result_meta(b"not json"), (None, None, None));
    }

    #[test]
    fn envelope_ids() {
        assert_eq!(envelope_id(br#"{"id":"a-1"}"#), Some("a-1".into()));
        assert_eq!(envelope_id(br#"{"id":42}"#), Some("42".into()));
        assert_eq!(envelope_id(br#"{"id":""}"#), None);
        assert_eq!(envelope_id(b"[1]"), None);
    }

    #[test]
    fn header_values() {
        assert_eq!(value_int(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(value_int(&AMQPValue::ShortShortUInt(2)), Some(2));
        assert_eq!(value_int(&text(" 7 ")), Some(7));
        assert_eq!(value_text(&text("x")), Some("x".into()));
    }

    #[test]
    fn broker_bookkeeping_is_not_carried() {
        let mut h = FieldTable::default();
        h.insert("x-death".into(), AMQPValue::Void);
        h.insert("x-first-death-reason".into(), text("expired"));
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        h.insert("tenant".into(), text("acme"));
        let props = BasicProperties::default().with_headers(h);
        let out = carried_headers(&props);
        assert_eq!(out.inner().len(), 1);
        assert!(out.contains_key("tenant"));
    }

    #[test]
    fn memo_forgets_the_oldest() {
        let mut m = Memo::default();
        for i in 0..(MEMO_CAP + 5) {
            m.insert(i.to_string());
        }
        assert_eq!(m.set.len(), MEMO_CAP);
        assert!(!m.set.contains("0"));
        assert!(m.set.contains(&(MEMO_CAP + 4).to_string()));
    }
}
