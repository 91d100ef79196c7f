//! Claims: a buffered delivery adopted as a claim (and stamped with a job id when its
//! message names none), its epoch and recovery count, the deliveries this process holds,
//! settling them with the broker (ack; a hand-back as a confirmed copy, then the ack), and
//! taking a long claim into the checkpoint store (a hold) so its delivery can be acked early.

use super::connection::io;
use super::consumer::Pending;
use super::headers::{
    carried_headers, header, header_text, job_props, value_int, DECISION_HEADER, RECOVERIES_HEADER,
};
use super::{lock, Shared};
use crate::queue::{
    envelope_id, AttemptRecord, Claim, ClaimHandle, Fenced, QueueError, QueueNames,
};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Recovery counts kept in this process without a store (oldest dropped past this).
const COUNTS_CAP: usize = 100_000;
/// How long a dedupe-Redis recovery count lives.
const COUNT_TTL_SECS: u64 = 86_400;
/// A hold taken back by `recover` is not taken again by another replica for this long (its
/// copy is published and the hold dropped long before).
const HOLD_TAKEN_BACK_FOR: Duration = Duration::from_secs(60);

/// A claim handed to the worker: what its finish needs.
#[derive(Clone)]
pub(super) struct Held {
    pub(super) generation: u64,
    pub(super) channel: Channel,
    pub(super) delivery_tag: u64,
    pub(super) queue: String,
    pub(super) props: BasicProperties,
    /// What a finish already got confirmed: a retried finish publishes only the rest, so a
    /// result the broker stored is never published twice because another part failed.
    pub(super) sent: Sent,
    pub(super) job_id: String,
    /// The claim's epoch (the store's, once fenced).
    pub(super) epoch: u64,
    /// The job's message body, kept only where a long claim may be taken into the store.
    pub(super) payload: Vec<u8>,
    /// When it was handed out (a claim held past `detach_after` is taken into the store).
    pub(super) since: Instant,
    /// Taken into the checkpoint store and its delivery acked ([`Shared::detach`]): the
    /// store's hold, fenced on the epoch, is the claim now, not the channel.
    pub(super) detached: bool,
    /// The broker redelivered it and this process had not handed it back: its previous
    /// holder died or lost its channel (counted in [`Shared::fence`]).
    pub(super) redelivered: bool,
    /// The recoveries before this delivery its message says (`x-lar-recoveries` of a
    /// hand-back's copy, a quorum queue's `x-delivery-count`): the floor of its count.
    pub(super) carried: u32,
}

/// A job's message as a hold keeps it, to publish it again (`RunStore::hold`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Parked {
    payload_hex: String,
    headers: FieldTable,
    content_type: Option<String>,
    content_encoding: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    priority: Option<u8>,
    timestamp: Option<u64>,
    kind: Option<String>,
    app_id: Option<String>,
}

fn text_of(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_string())
}

impl Parked {
    fn of(h: &Held, payload: &[u8], recoveries: u32) -> Self {
        let p = &h.props;
        let mut headers = carried_headers(p);
        headers.insert(
            RECOVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(recoveries)),
        );
        Parked {
            payload_hex: hex::encode(payload),
            headers,
            content_type: text_of(p.content_type()),
            content_encoding: text_of(p.content_encoding()),
            correlation_id: text_of(p.correlation_id()),
            reply_to: text_of(p.reply_to()),
            priority: *p.priority(),
            timestamp: *p.timestamp(),
            kind: text_of(p.kind()),
            app_id: text_of(p.app_id()),
        }
    }

    /// The payload and the properties of the job's copy.
    fn message(self, job_id: &str) -> Option<(Vec<u8>, BasicProperties)> {
        let payload = hex::decode(&self.payload_hex).ok()?;
        let mut p = BasicProperties::default();
        let set = |v: Option<String>| v.map(|s| ShortString::from(s.as_str()));
        if let Some(v) = set(self.content_type) {
            p = p.with_content_type(v);
        }
        if let Some(v) = set(self.content_encoding) {
            p = p.with_content_encoding(v);
        }
        if let Some(v) = set(self.correlation_id) {
            p = p.with_correlation_id(v);
        }
        if let Some(v) = set(self.reply_to) {
            p = p.with_reply_to(v);
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = self.timestamp {
            p = p.with_timestamp(v);
        }
        if let Some(v) = set(self.kind) {
            p = p.with_type(v);
        }
        if let Some(v) = set(self.app_id) {
            p = p.with_app_id(v);
        }
        Some((payload, job_props(&p, job_id, self.headers)))
    }
}

#[derive(Clone, Copy, Default)]
pub(super) struct Sent {
    pub(super) result: bool,
    pub(super) dead_letter: bool,
}

impl Shared {
    /// Whether a claim's delivery can still be settled: its channel is the current
    /// connection's and open.
    pub(super) fn is_live(&self, h: &Held) -> bool {
        if h.detached {
            return true; // fenced by the store's hold (`settle`)
        }
        let current = lock(&self.live).as_ref().map(|l| l.generation);
        current == Some(h.generation) && h.channel.status().connected()
    }

    /// A buffered delivery as a claim, or `None` when its channel is gone (the broker
    /// redelivers it). The flag says the message named no job id (see [`Shared::stamp`]).
    pub(super) fn adopt(&self, q: &QueueNames, p: Pending) -> Option<(Claim, bool)> {
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
        // A hand-back publishes a copy (never redelivered), so a redelivery means the
        // delivery's holder died or lost its channel, unless this process nacked it back.
        let redelivered = d.redelivered && !lock(&self.returned).remove(&job_id);
        let as_int = |key| {
            header(&headers, key)
                .and_then(value_int)
                .map(|n| n.clamp(0, i64::from(u32::MAX)) as u32)
                .unwrap_or(0)
        };
        // The recoveries before this delivery: a copy's header, or the returns a quorum queue
        // counted (this one included, when it is a redelivery).
        let returns = as_int("x-delivery-count");
        let carried = as_int(RECOVERIES_HEADER).max(if d.redelivered {
            returns.saturating_sub(1)
        } else {
            returns
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
                job_id: job_id.clone(),
                epoch,
                payload: if self.runs.is_some() && self.opts.detach_after.is_some() {
                    d.data.clone()
                } else {
                    Vec::new()
                },
                since: Instant::now(),
                detached: false,
                redelivered,
                carried,
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
                recoveries: carried,
                handle: ClaimHandle::default(),
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
    pub(super) async fn stamp(&self, q: &QueueNames, c: &Claim) {
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
    /// writes of any earlier holder of the job (a worker cut off from the broker) are refused,
    /// and its recovery count ([`Shared::count_recovery`]).
    pub(super) async fn fence(&self, q: &QueueNames, c: &mut Claim) -> Result<(), QueueError> {
        let key = (c.job_id.clone(), c.epoch);
        let (redelivered, carried) = match lock(&self.held).get(&key) {
            Some(h) => (h.redelivered, h.carried),
            None => (false, 0),
        };
        let Some(runs) = &self.runs else {
            c.recoveries = self
                .count_recovery(q, &c.job_id, redelivered, carried)
                .await;
            return Ok(());
        };
        let (epoch, counted) = runs.claim_epoch(q, &c.job_id, redelivered).await?;
        let mut held = lock(&self.held);
        if let Some(mut h) = held.remove(&key) {
            h.epoch = epoch;
            held.insert((c.job_id.clone(), epoch), h);
        }
        c.epoch = epoch;
        c.recoveries = counted.max(carried);
        if redelivered || c.recoveries > 0 {
            info!(job_id = %c.job_id, redelivered, carried, counted, "a job recovered from a holder that died");
        }
        Ok(())
    }

    /// A job's recovery count without a checkpoint store: a redelivery (see [`Held`]) is one
    /// more than the count its message carries (`x-lar-recoveries`, which hand-backs copy on)
    /// or than the count kept, in the dedupe Redis (`<queue>:recoveries:<job_id>`, a day) when
    /// there is one, else in this process. Without either the count lives in this process
    /// only: a worker the job kills takes its count with it, so on a classic queue only a
    /// quorum queue's `x-delivery-count` or a store catches a job that kills every worker
    /// that runs it. A dedupe Redis that fails counts in this process instead.
    async fn count_recovery(
        &self,
        q: &QueueNames,
        job_id: &str,
        redelivered: bool,
        carried: u32,
    ) -> u32 {
        if !redelivered {
            return carried;
        }
        if let Some(r) = &self.dedupe {
            let script = ::redis::Script::new(
                "local n = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1])) + 1 \
                 redis.call('SET', KEYS[1], n, 'EX', ARGV[2]) return n",
            );
            let mut conn = r.clone();
            let counted: Result<i64, _> = script
                .key(format!("{}:recoveries:{job_id}", q.jobs))
                .arg(carried)
                .arg(COUNT_TTL_SECS)
                .invoke_async(&mut conn)
                .await;
            match counted {
                Ok(n) => return u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                Err(e) => {
                    warn!(job_id, error = %e, "cannot count a recovery in Redis: counting in this process")
                }
            }
        }
        let mut counts = lock(&self.counts);
        if counts.len() >= COUNTS_CAP {
            counts.clear();
        }
        let n = counts.entry(job_id.to_string()).or_insert(0);
        *n = (*n).max(carried) + 1;
        *n
    }

    /// Forgets a job's recovery count when its life ends (a result, a dead letter), where no
    /// store does it with the run (`RunStore::end_run`, `RunStore::release`).
    pub(super) async fn forget_recoveries(&self, q: &QueueNames, c: &Claim) {
        if self.runs.is_some() || c.recoveries == 0 {
            return;
        }
        lock(&self.counts).remove(&c.job_id);
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let gone: Result<i64, _> = ::redis::cmd("DEL")
                .arg(format!("{}:recoveries:{}", q.jobs, c.job_id))
                .query_async(&mut conn)
                .await;
            if let Err(e) = gone {
                warn!(job_id = %c.job_id, error = %e, "cannot forget the recovery count (it expires in a day)");
            }
        }
    }

    /// Hands a claim back without costing it an attempt: a copy (same `message_id`, headers
    /// and properties, its recovery count in `x-lar-recoveries`) goes to the back of the work
    /// queue with a confirm, and only then is the original settled. A `nack(requeue)` would
    /// count toward a quorum queue's `x-delivery-limit`, and come back `redelivered`, as if
    /// its worker had died. A crash between the confirm and the ack leaves both: the
    /// original's redelivery and the copy are the same job (one epoch holds, one result).
    /// A copy the broker does not take falls back to the nack (or, for a claim in the store,
    /// fails: its hold expires and is published again).
    pub(super) async fn hand_back(
        &self,
        q: &QueueNames,
        c: &Claim,
        h: &Held,
    ) -> Result<Fenced, QueueError> {
        if !self.is_live(h) {
            return Ok(Fenced::Lost);
        }
        let copied = async {
            let (payload, props) = Parked::of(h, &c.payload, c.recoveries)
                .message(&c.job_id)
                .ok_or_else(|| QueueError::Corrupt("unreadable parked message".into()))?;
            let ch = self.publisher().await?;
            let what = format!("handed-back job (queue '{}')", q.jobs);
            let pending = vec![Self::publish(&ch, "", &q.jobs, true, &payload, props, what).await?];
            Self::confirmed(&ch, pending).await
        }
        .await;
        match copied {
            Ok(()) => {
                if let Some(runs) = &self.runs {
                    // Before the ack, while the claim holds the job.
                    if let Err(e) = runs.let_go(q, c).await {
                        warn!(job_id = %c.job_id, error = %e, "cannot let go of the handed-back job's epoch");
                    }
                }
                Ok(self.settle(h).await)
            }
            Err(e) if h.detached => Err(e),
            Err(e) => {
                warn!(job_id = %c.job_id, error = %e, "cannot publish the handed-back copy: nacking it back");
                lock(&self.returned).insert(c.job_id.clone());
                Ok(self.requeue(h).await)
            }
        }
    }

    /// Hands back, as copies, the buffered deliveries of a consumer that stopped (never
    /// handed out): closing their channel would return them `redelivered` (and, on a quorum
    /// queue, one delivery nearer the limit). Redelivered ones and those with no job id are
    /// left to the close: the next holder counts the recovery they already were.
    pub(super) async fn hand_back_buffered(
        &self,
        q: &QueueNames,
        pending: Vec<super::consumer::Pending>,
    ) {
        for p in pending {
            if p.delivery.redelivered || !p.channel.status().connected() {
                continue;
            }
            let Some((c, false)) = self.adopt(q, p) else {
                continue;
            };
            let Some(h) = lock(&self.held).remove(&(c.job_id.clone(), c.epoch)) else {
                continue;
            };
            if let Err(e) = self.hand_back(q, &c, &h).await {
                warn!(job_id = %c.job_id, error = %e, "cannot hand a buffered delivery back");
            }
        }
    }

    /// Takes a claim held past `detach_after` into the checkpoint store (its message, fenced
    /// on its epoch, with a lease) and acks its delivery, so the broker's `consumer_timeout`
    /// cannot close the channel under the run and redeliver it. The hold is renewed by
    /// `extend`, and `recover` publishes the job again when its lease passes (its worker
    /// died). `false` when the claim is no longer live.
    pub(super) async fn detach(
        &self,
        q: &QueueNames,
        key: &(String, u64),
        lease: Duration,
    ) -> bool {
        let Some(runs) = &self.runs else {
            return self.holds_key(key);
        };
        let Some(h) = lock(&self.held).get(key).cloned() else {
            return false;
        };
        if !self.is_live(&h) {
            return false;
        }
        let claim = Claim {
            job_id: key.0.clone(),
            payload: Vec::new(),
            attempt: 0,
            epoch: key.1,
            history: Vec::new(),
            decision: None,
            fresh: false,
            recoveries: 0,
            handle: ClaimHandle::default(),
        };
        // The count is the store's: the copy a recovery publishes carries none.
        let message = match serde_json::to_string(&Parked::of(&h, &h.payload, 0)) {
            Ok(m) => m,
            Err(_) => return true,
        };
        match runs.hold(q, &claim, &message, lease).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                warn!(job_id = %key.0, error = %e, "cannot take a long claim into the store: its delivery stays unacked");
                return true;
            }
        }
        if self.ack(&h).await == Fenced::Done {
            if let Some(h) = lock(&self.held).get_mut(key) {
                h.detached = true;
            }
            info!(job_id = %key.0, held_for = ?h.since.elapsed(), "long claim taken into the checkpoint store: delivery acked");
            true
        } else {
            let _ = runs.drop_hold(q, &key.0, key.1).await;
            false
        }
    }

    fn holds_key(&self, key: &(String, u64)) -> bool {
        lock(&self.held).get(key).is_some_and(|h| self.is_live(h))
    }

    /// `extend` for one claim: renews a hold, takes a long claim into the store, or reports
    /// whether its channel is open.
    pub(super) async fn extend_one(
        &self,
        q: &QueueNames,
        key: &(String, u64),
        lease: Duration,
    ) -> bool {
        let h = lock(&self.held).get(key).cloned();
        let Some(h) = h else { return false };
        match (&self.runs, h.detached) {
            (Some(runs), true) => match runs.renew_hold(q, &key.0, key.1, lease).await {
                Ok(live) => live,
                Err(e) => {
                    warn!(job_id = %key.0, error = %e, "cannot renew the hold");
                    true // the lease is longer than a renewal interval; the next one tries
                }
            },
            (Some(_), false)
                if self
                    .opts
                    .detach_after
                    .is_some_and(|after| h.since.elapsed() >= after) =>
            {
                self.detach(q, key, lease).await
            }
            _ => self.is_live(&h),
        }
    }

    /// Publishes again the jobs whose holds expired (their worker died or hung past its
    /// lease), each as a copy with its recovery counted; the store's epoch fences the old
    /// holder. How many.
    pub(super) async fn recover_holds(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let Some(runs) = &self.runs else {
            return Ok(0);
        };
        let mut moved = 0;
        for (job_id, message) in runs.expired_holds(q, HOLD_TAKEN_BACK_FOR).await? {
            let Some((payload, props)) = serde_json::from_str::<Parked>(&message)
                .ok()
                .and_then(|p| p.message(&job_id))
            else {
                warn!(%job_id, "unreadable hold dropped");
                runs.drop_hold(q, &job_id, 0).await?;
                continue;
            };
            let ch = self.publisher().await?;
            let what = format!("recovered job (queue '{}')", q.jobs);
            let pending = vec![Self::publish(&ch, "", &q.jobs, true, &payload, props, what).await?];
            Self::confirmed(&ch, pending).await?;
            runs.drop_hold(q, &job_id, 0).await?;
            info!(%job_id, "a held job's lease passed (its worker died): published again");
            moved += 1;
        }
        Ok(moved)
    }

    /// Settles a delivery whose finish is out: the ack, or, for a claim in the store, dropping
    /// its hold (`Lost` when it was taken back).
    pub(super) async fn settle(&self, h: &Held) -> Fenced {
        if !h.detached {
            return self.ack(h).await;
        }
        let Some(runs) = &self.runs else {
            return Fenced::Lost;
        };
        let q = QueueNames {
            jobs: h.queue.clone(),
            results: String::new(),
        };
        match runs.drop_hold(&q, &h.job_id, h.epoch).await {
            Ok(true) => Fenced::Done,
            Ok(false) => Fenced::Lost,
            Err(e) => {
                warn!(job_id = %h.job_id, error = %e, "cannot drop the hold: it expires and the job is published again");
                Fenced::Lost
            }
        }
    }

    /// Whether this process still holds the claim's delivery on a live channel.
    pub(super) fn holds(&self, c: &Claim) -> bool {
        lock(&self.held)
            .get(&(c.job_id.clone(), c.epoch))
            .is_some_and(|h| self.is_live(h))
    }

    /// Returns a claim's delivery to the queue (a claim that cannot be fenced).
    pub(super) async fn give_back(&self, c: &Claim) {
        let h = lock(&self.held).remove(&(c.job_id.clone(), c.epoch));
        if let Some(h) = h {
            self.requeue(&h).await;
        }
    }

    /// Acks a claim's delivery: `Lost` when its channel is gone.
    pub(super) async fn ack(&self, h: &Held) -> Fenced {
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

    pub(super) async fn requeue(&self, h: &Held) -> Fenced {
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
}
