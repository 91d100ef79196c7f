//! The daemon: claims jobs from every configured queue, runs up to `concurrency` at once (each
//! on its own [`crate::exec::Run`]), finishes each claim exactly once, renews leases, reaps
//! expired claims, and drains on shutdown within a deadline.

mod decisions;
pub mod payload;
mod process;
pub mod stats;

use crate::backoff::Backoff;
use crate::config::{LoadedQueue, WorkerSection};
use crate::job::AuditSettings;
use crate::ops::admin::WorkerProbe;
use crate::ops::health::Readiness;
use crate::ops::metrics::{QueueSample, StepMetrics};
use crate::ops::notify::Notifier;
use crate::queue::{Backend, Claim, Fenced, Finish};
use crate::tools::Registry;
use process::Verdict;
use stats::Stats;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// How long one claim call waits on an empty queue before the loop looks at shutdown again.
pub(crate) const CLAIM_WAIT: Duration = Duration::from_secs(1);
/// The stop's budget after the drain. The worker asks systemd for the drain plus
/// [`STOP_MARGIN`]; the three waits below (9 s) and the runtime's shutdown (1 s) fit in it with
/// 2 s to spare, so a store that stops answering cannot hold the stop until systemd kills the
/// process.
const STOP_MARGIN: Duration = Duration::from_secs(12);
/// For jobs the drain deadline cut off to hand themselves back.
const HAND_BACK_GRACE: Duration = Duration::from_secs(5);
/// For decision loops still finishing a batch.
const DECISION_LOOPS_GRACE: Duration = Duration::from_secs(2);
/// For the deregistration, which only spares the others a lease's wait.
const DEREGISTER_GRACE: Duration = Duration::from_secs(2);
/// How long a claim in flight at shutdown may still take (a store that answers returns within
/// [`CLAIM_WAIT`]). One cut off is not lost: what it took comes back when its lease ends, or
/// with its channel on AMQP.
const CLAIM_GRACE: Duration = Duration::from_secs(2);
/// How often expired claims are reaped and due retries promoted.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// How often pending decisions are checked for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// The most jobs claimed in one round trip.
const MAX_BATCH: usize = 64;

pub struct Worker {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) queues: Vec<LoadedQueue>,
    pub(crate) registry: Registry,
    pub(crate) audit: AuditSettings,
    pub(crate) cfg: WorkerSection,
    pub(crate) backoff: Backoff,
    /// Counters per queue (same order as `queues`).
    pub stats: Vec<Stats>,
    pub(crate) in_flight_count: AtomicU64,
    /// Step durations and LLM tokens, for /metrics.
    pub(crate) steps: StepMetrics,
    /// When the consumer last made progress (ms since start): a claim call answered, a step or
    /// a job finished. The watchdog pings only while this moves.
    progress_ms: AtomicU64,
    started: Instant,
    notifier: Notifier,
    /// (queue index, lane, job id, epoch) of every claim held, for lease renewal. The epoch is part
    /// of the key: two copies of one job id held at once (a producer sent it twice) are two
    /// claims, and the first to end must not stop the other's renewals.
    /// The value: whether the claim is finishing (its finish sent), so a renewal that finds
    /// it gone is not reported as a lost lease (the finish took it).
    in_flight: Mutex<HashMap<Held, bool>>,
}

/// Options that are not part of workers.toml.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once every queue is empty and nothing is in flight (demos, benchmarks, batch use).
    pub exit_when_idle: bool,
    /// Ends the drain at once (a second SIGTERM or SIGINT): in-flight jobs are handed back
    /// mid-step, as when the drain deadline passes, instead of finishing their step.
    pub stop_now: CancellationToken,
}

impl Worker {
    pub fn new(
        backend: Arc<dyn Backend>,
        queues: Vec<LoadedQueue>,
        registry: Registry,
        audit: AuditSettings,
        cfg: WorkerSection,
    ) -> Arc<Self> {
        let backoff = Backoff::from(&cfg.retry);
        let stats = queues.iter().map(|_| Stats::default()).collect();
        Arc::new(Worker {
            backend,
            queues,
            registry,
            audit,
            cfg,
            backoff,
            stats,
            in_flight_count: AtomicU64::new(0),
            steps: StepMetrics::default(),
            progress_ms: AtomicU64::new(0),
            started: Instant::now(),
            notifier: Notifier::from_env(),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Marks consumer progress (see `progress_ms`).
    pub(crate) fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.progress_ms.store(now, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.progress_ms.load(Ordering::Relaxed)))
    }

    /// Alive = the consumer made progress within the watchdog window (or 60 s without one).
    pub fn alive(&self) -> bool {
        self.since_progress() < Self::progress_window()
    }

    /// How long without progress still counts as alive: half the watchdog interval, but never
    /// less than two empty claim waits (an idle consumer reports progress once per wait).
    fn progress_window() -> Duration {
        let half = Notifier::watchdog_interval()
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(60));
        half.max(CLAIM_WAIT * 2)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight_count.load(Ordering::Relaxed)
    }

    /// The READY/`/ready` checks.
    pub async fn readiness(&self) -> Readiness {
        crate::ops::health::readiness(
            self.backend.as_ref(),
            &self.queues,
            &self.audit.log_dir,
            self.audit.secret.is_some(),
        )
        .await
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        let mut samples = Vec::with_capacity(self.queues.len());
        for (qi, q) in self.queues.iter().enumerate() {
            let depth = self.backend.depth(&q.names).await.ok();
            let pending = if self.backend.supports_pause() {
                self.backend
                    .list_pending(&q.names)
                    .await
                    .ok()
                    .map(|p| p.len() as u64)
            } else {
                None
            };
            samples.push(QueueSample {
                queue: q.names.jobs.clone(),
                counters: self.stats[qi].counters(),
                ready: depth.as_ref().map(|d| d.ready),
                claimed: depth.as_ref().map(|d| d.claimed),
                delayed: depth.as_ref().map(|d| d.delayed),
                dead: depth.as_ref().map(|d| d.dead),
                pending,
            });
        }
        crate::ops::metrics::render(&samples, self.in_flight(), &self.steps)
    }

    fn status_line(&self) -> String {
        let total =
            |f: fn(&Stats) -> &AtomicU64| self.stats.iter().map(|s| Stats::get(f(s))).sum::<u64>();
        format!(
            "STATUS=in flight {}, completed {}, failed {}, halted (pending decisions) {}, dead-lettered {}",
            self.in_flight(),
            total(|s| &s.completed),
            total(|s| &s.failed),
            total(|s| &s.halted),
            total(|s| &s.dead_lettered),
        )
    }

    /// The claims of one lane, every one (`finishing` too) or only those not finishing.
    fn in_flight_of(&self, qi: usize, lane: Lane, finishing: bool) -> Vec<(String, u64)> {
        let held = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        held.iter()
            .filter(|(h, f)| h.qi == qi && h.lane == lane && (finishing || !**f))
            .map(|(h, _)| (h.job_id.clone(), h.epoch))
            .collect()
    }

    fn track(&self, claim: Held, held: bool) {
        let mut m = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if held {
            m.insert(claim, false);
        } else {
            m.remove(&claim);
        }
    }

    /// Marks a held claim as finishing (its finish is about to be sent).
    fn finishing(&self, qi: usize, lane: Lane, claim: &Claim) {
        let mut m = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let key = Held {
            qi,
            lane,
            job_id: claim.job_id.clone(),
            epoch: claim.epoch,
        };
        if let Some(f) = m.get_mut(&key) {
            *f = true;
        }
    }

    /// Runs until `shutdown` fires (or the queues are idle with `exit_when_idle`), then drains.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, opts: RunOptions) {
        let hard_stop = CancellationToken::new();
        // READY only once every check passes; until then, say why and keep trying.
        let mut attempt = 0;
        loop {
            let r = self.readiness().await;
            if r.ready {
                break;
            }
            attempt += 1;
            let failing: Vec<String> = r
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            warn!(failing = %failing.join("; "), "not ready");
            self.notifier
                .notify(&format!("STATUS=not ready: {}", failing.join("; ")));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Backoff::reconnect().delay(attempt)) => {}
            }
        }
        self.touch();
        self.notifier
            .notify(&format!("READY=1\n{}", self.status_line()));
        info!("ready");
        for (_, _, names) in self.lanes() {
            if let Err(e) = self.backend.heartbeat(names, self.cfg.lease()).await {
                warn!(queue = %names.jobs, error = %e, "heartbeat failed");
            }
            match self.backend.recover(names).await {
                Ok(n) if n > 0 => {
                    info!(queue = %names.jobs, moved = n, "recovered expired claims at start")
                }
                Ok(_) => {}
                Err(e) => warn!(queue = %names.jobs, error = %e, "recovery at start failed"),
            }
        }
        let renewal = tokio::spawn(Arc::clone(&self).renew());
        let housekeeping = tokio::spawn(Arc::clone(&self).housekeep(shutdown.clone()));
        let watchdog = tokio::spawn(Arc::clone(&self).watchdog());
        let idle_watch = opts
            .exit_when_idle
            .then(|| tokio::spawn(Arc::clone(&self).watch_idle(shutdown.clone())));

        let permits = Arc::new(Semaphore::new(self.cfg.concurrency));
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut claimers = JoinSet::new();
        let mut decision_loops = JoinSet::new();
        for qi in 0..self.queues.len() {
            match (&self.queues[qi].decisions, self.pauses()) {
                (Some(_), true) => {
                    decision_loops.spawn(Arc::clone(&self).decision_loop(qi, shutdown.clone()));
                }
                (Some(dq), false) => warn!(
                    queue = %self.queues[qi].names.jobs, decisions = %dq.jobs,
                    "a decisions queue is configured, but this worker does not pause (checkpoints off, or an amqp backend without checkpoint_store): nothing consumes it"
                ),
                (None, _) => {}
            }
        }
        for qi in 0..self.queues.len() {
            let w = Arc::clone(&self);
            let (sd, hs, p) = (shutdown.clone(), hard_stop.clone(), Arc::clone(&permits));
            claimers.spawn(async move { w.claim_loop(qi, sd, hs, p).await });
        }
        // Claimers return their in-flight job tasks when shutdown fires; drain them together.
        while let Some(res) = claimers.join_next().await {
            match res {
                Ok(mut set) => {
                    jobs.spawn(async move { while set.join_next().await.is_some() {} });
                }
                Err(e) => error!(error = %e, "a claim loop ended abnormally"),
            }
        }
        let extend = self.cfg.drain_timeout() + STOP_MARGIN;
        self.notifier.notify(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=draining {} jobs",
            extend.as_micros(),
            self.in_flight()
        ));
        info!(in_flight = self.in_flight(), "draining");
        let drained = tokio::select! {
            done = tokio::time::timeout(self.cfg.drain_timeout(), async {
                while jobs.join_next().await.is_some() {}
            }) => match done {
                Ok(()) => true,
                Err(_) => {
                    warn!("drain deadline reached: handing unfinished jobs back to the queue");
                    false
                }
            },
            _ = opts.stop_now.cancelled() => {
                warn!("stopping now: handing unfinished jobs back to the queue");
                false
            }
        };
        if !drained {
            hard_stop.cancel();
            let _ = tokio::time::timeout(HAND_BACK_GRACE, async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
        }
        // The decision loops stopped claiming at shutdown and had the drain to finish their
        // batch; a loop still stuck on a store that does not answer is cut off (its claims come
        // back when their leases end).
        let loops_ended = tokio::time::timeout(DECISION_LOOPS_GRACE, async {
            while decision_loops.join_next().await.is_some() {}
        })
        .await;
        if loops_ended.is_err() {
            warn!("a decision loop did not stop in time: cutting it off");
            decision_loops.shutdown().await;
        }
        // Wait for the aborted tasks, so a heartbeat in flight cannot re-register this worker
        // after `deregister` below.
        renewal.abort();
        housekeeping.abort();
        let _ = renewal.await;
        let _ = housekeeping.await;
        watchdog.abort();
        if let Some(h) = idle_watch {
            h.abort();
        }
        if self.in_flight() == 0 {
            // One grace for every lane together: a frozen store costs the stop 2 s, not 2 s
            // per queue.
            let deregister_all = async {
                for (_, _, names) in self.lanes() {
                    if let Err(e) = self.backend.deregister(names).await {
                        warn!(queue = %names.jobs, error = %e, "deregistration failed");
                    }
                }
            };
            if tokio::time::timeout(DEREGISTER_GRACE, deregister_all)
                .await
                .is_err()
            {
                warn!("deregistration took too long: skipped");
            }
        }
        info!(stats = %stats::summary(&self.stats, self.in_flight()), "worker stopped");
    }

    async fn claim_loop(
        self: Arc<Self>,
        qi: usize,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
        permits: Arc<Semaphore>,
    ) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        let names = self.queues[qi].names.clone();
        let mut failures = 0u32;
        let mut wedged = false;
        let batch_max = self.cfg.concurrency.min(MAX_BATCH);
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    // Its `Holding` was dropped in the unwind: the lease is no longer renewed,
                    // expires, and the reaper hands the job to the next claim.
                    error!(queue = %names.jobs, error = %e, "a job task panicked; its lease will expire");
                }
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut held = vec![first];
            while held.len() < batch_max {
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if wedged {
                // Test hook (LAR_WORKER_TEST_WEDGE=1): the consumer stops claiming, as a wedged
                // one would, but still honours the stop so the test can end it.
                shutdown.cancelled().await;
                break;
            }
            let Some(claimed) = self.claim_or_stop(&names, held.len(), &shutdown).await else {
                break;
            };
            let claims = match claimed {
                Ok(c) => {
                    failures = 0;
                    wedged = wedge_for_tests();
                    self.touch();
                    c
                }
                Err(e) => {
                    failures += 1;
                    let pause = Backoff::reconnect().delay(failures);
                    warn!(queue = %names.jobs, error = %e, retry_in_ms = pause.as_millis() as u64, "claim failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            Stats::add(&self.stats[qi].claimed, claims.len() as u64);
            for claim in claims {
                let Some(permit) = held.pop() else {
                    // More claims than permits cannot happen; keep the job rather than drop it.
                    error!(job_id = %claim.job_id, "claimed beyond the permits; handing back");
                    let _ = self.backend.finish(&names, &claim, Finish::Release).await;
                    continue;
                };
                let w = Arc::clone(&self);
                let hs = hard_stop.clone();
                let sd = shutdown.clone();
                let holding = Holding::start(&self, qi, &claim);
                let span = tracing::info_span!("job", job_id = %claim.job_id, attempt = claim.attempt, queue = %names.jobs);
                tasks.spawn(
                    async move {
                        w.handle(qi, claim, sd, hs).await;
                        drop(holding);
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
        tasks
    }

    /// Claims up to `max` jobs of `names`. On shutdown the claim in flight gets [`CLAIM_GRACE`]
    /// to come back; `None` when it did not (the caller stops).
    pub(crate) async fn claim_or_stop(
        &self,
        names: &crate::queue::QueueNames,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Option<Result<Vec<Claim>, crate::queue::QueueError>> {
        let claim = self.backend.claim(names, max, self.cfg.lease(), CLAIM_WAIT);
        tokio::pin!(claim);
        tokio::select! {
            r = &mut claim => Some(r),
            _ = shutdown.cancelled() => match tokio::time::timeout(CLAIM_GRACE, &mut claim).await {
                Ok(r) => Some(r),
                Err(_) => {
                    warn!(queue = %names.jobs, "the queue store did not answer a claim in time: stopping without it");
                    None
                }
            },
        }
    }

    /// Processes one claim and finishes it, retrying the finish through broker hiccups.
    async fn handle(
        self: Arc<Self>,
        qi: usize,
        claim: Claim,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let (finish, verdict) = self.process(qi, &claim, &shutdown, &hard_stop).await;
        self.finishing(qi, Lane::Jobs, &claim);
        let names = &self.queues[qi].names;
        let mut tries = 0u32;
        let outcome = loop {
            match self.backend.finish(names, &claim, finish.clone()).await {
                Ok(f) => break Some(f),
                Err(e) => {
                    tries += 1;
                    if hard_stop.is_cancelled() && tries > 3 {
                        // The lease will expire and a replica will take the job over.
                        error!(job_id = %claim.job_id, error = %e, "cannot finish the claim; leaving it to lease expiry");
                        break None;
                    }
                    let pause = Backoff::reconnect().delay(tries);
                    warn!(job_id = %claim.job_id, error = %e, "finish failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        };
        match outcome {
            Some(Fenced::Done) => {
                let s = &self.stats[qi];
                match verdict {
                    Verdict::Completed => Stats::add(&s.completed, 1),
                    Verdict::Failed => {
                        Stats::add(&s.failed, 1);
                        if matches!(
                            &finish,
                            Finish::Publish {
                                dead_letter: Some(_),
                                ..
                            }
                        ) {
                            Stats::add(&s.dead_lettered, 1);
                        }
                    }
                    Verdict::Halted => Stats::add(&s.halted, 1),
                    Verdict::Retry => Stats::add(&s.retried, 1),
                    Verdict::DeadLetter => Stats::add(&s.dead_lettered, 1),
                    Verdict::Release => Stats::add(&s.released, 1),
                }
            }
            Some(Fenced::Lost) if tries > 0 => {
                // An earlier try may have been applied with its answer lost (a reply timeout):
                // the job may be finished by this very worker. Say so rather than "nothing".
                Stats::add(&self.stats[qi].fenced, 1);
                warn!(job_id = %claim.job_id, epoch = claim.epoch, tries,
                      "finish refused after a failed try: the failed try may have finished the job (its answer was lost), or another worker holds it");
            }
            Some(Fenced::Lost) => {
                Stats::add(&self.stats[qi].fenced, 1);
                warn!(job_id = %claim.job_id, epoch = claim.epoch, "claim lost to another worker: nothing published");
            }
            None => {}
        }
    }

    /// Pings systemd's watchdog while the consumer makes progress; STATUS= along the way.
    async fn watchdog(self: Arc<Self>) {
        let interval = Notifier::watchdog_interval();
        let tick = interval.map(|w| w / 3).unwrap_or(Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let status = self.status_line();
            match interval {
                Some(_) if self.alive() => self.notifier.notify(&format!("WATCHDOG=1\n{status}")),
                Some(_) => {
                    warn!(
                        since_progress_ms = self.since_progress().as_millis() as u64,
                        "consumer made no progress: withholding the watchdog ping"
                    );
                    self.notifier.notify(&status);
                }
                None => self.notifier.notify(&status),
            }
        }
    }

    /// Lease renewal and heartbeats, in a task of their own: a slow reaper or a long list of
    /// pending jobs to expire never delays a renewal past a lease. Keeps renewing while the
    /// worker drains (in-flight jobs still hold their claims) until it is aborted.
    async fn renew(self: Arc<Self>) {
        let renew_every = (self.cfg.lease() / 3).max(Duration::from_millis(300));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            renew.tick().await;
            self.renew_all().await;
        }
    }

    /// Reaping expired claims and due retries, and expiring pending decisions, until shutdown.
    async fn housekeep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reap = tokio::time::interval(REAP_EVERY);
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = expire.tick() => self.expire_pending().await,
                _ = reap.tick() => {
                    for (_, _, names) in self.lanes() {
                        match self.backend.recover(names).await {
                            Ok(n) if n > 0 => debug!(queue = %names.jobs, moved = n, "reaped or promoted"),
                            Ok(_) => {}
                            Err(e) => warn!(queue = %names.jobs, error = %e, "reaper failed"),
                        }
                    }
                }
            }
        }
    }

    async fn renew_all(&self) {
        for (qi, lane, names) in self.lanes() {
            if let Err(e) = self.backend.heartbeat(names, self.cfg.lease()).await {
                warn!(queue = %names.jobs, error = %e, "heartbeat failed");
            }
            self.extend_lane(qi, lane, names).await;
        }
    }

    /// Every queue this worker claims from: each job queue, and its decisions queue where a
    /// decision loop runs. Each gets the same care: heartbeats, lease renewal, the reaper
    /// (a crashed replica's decision messages come back like its jobs) and deregistration.
    fn lanes(&self) -> impl Iterator<Item = (usize, Lane, &crate::queue::QueueNames)> {
        let pauses = self.pauses();
        self.queues.iter().enumerate().flat_map(move |(qi, q)| {
            let decisions = q.decisions.as_ref().filter(|_| pauses);
            std::iter::once((qi, Lane::Jobs, &q.names))
                .chain(decisions.map(|dq| (qi, Lane::Decisions, dq)))
        })
    }

    async fn extend_lane(&self, qi: usize, lane: Lane, names: &crate::queue::QueueNames) {
        let held = self.in_flight_of(qi, lane, true);
        if held.is_empty() {
            return;
        }
        match self.backend.extend(names, &held, self.cfg.lease()).await {
            Ok(flags) => {
                let still = self.in_flight_of(qi, lane, false);
                for ((id, epoch), ok) in held.iter().zip(flags) {
                    // A claim that ended (or is ending) since the snapshot is not a lost lease.
                    if !ok && still.iter().any(|(i, e)| i == id && e == epoch) {
                        warn!(queue = %names.jobs, job_id = %id, epoch, "lease lost: another worker may take this message over");
                    }
                }
            }
            Err(e) => warn!(queue = %names.jobs, error = %e, "lease renewal failed"),
        }
    }

    /// Cancels `shutdown` once every queue is empty and nothing is in flight, twice in a row.
    async fn watch_idle(self: Arc<Self>, shutdown: CancellationToken) {
        let mut idle_rounds = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.in_flight() > 0 {
                idle_rounds = 0;
                continue;
            }
            let mut empty = true;
            for q in &self.queues {
                match self.backend.depth(&q.names).await {
                    Ok(d) if d.ready == 0 && d.claimed == 0 && d.delayed == 0 => {}
                    _ => empty = false,
                }
            }
            idle_rounds = if empty { idle_rounds + 1 } else { 0 };
            if idle_rounds >= 2 {
                info!("queues are empty: stopping (--exit-when-idle)");
                shutdown.cancel();
                return;
            }
        }
    }
}

/// `LAR_WORKER_TEST_WEDGE=1` makes each claim loop hang after its first claim: a test hook for
/// the watchdog. Never set it in production.
fn wedge_for_tests() -> bool {
    std::env::var("LAR_WORKER_TEST_WEDGE").is_ok_and(|v| v == "1")
}

/// Which of a queue's two inputs a held claim came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Jobs,
    /// The queue's decisions queue: a batch of decisions that outlives a lease (a slow store)
    /// would be delivered again, and the second try would reply "already decided".
    Decisions,
}

/// A claim whose lease the worker renews.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Held {
    qi: usize,
    lane: Lane,
    job_id: String,
    epoch: u64,
}

/// A claim this worker holds: its lease is renewed while the guard lives. Dropped when the
/// claim's work ends by any path, a panic included, so a message is never held forever.
struct Holding {
    worker: Arc<Worker>,
    claim: Held,
}

impl Holding {
    /// A job: also counted in flight (drain, idle, metrics).
    fn start(worker: &Arc<Worker>, qi: usize, claim: &Claim) -> Self {
        let h = Self::hold(worker, qi, Lane::Jobs, claim);
        worker.in_flight_count.fetch_add(1, Ordering::Relaxed);
        h
    }

    /// A decision message, renewed until its finish.
    fn decision(worker: &Arc<Worker>, qi: usize, claim: &Claim) -> Self {
        Self::hold(worker, qi, Lane::Decisions, claim)
    }

    fn hold(worker: &Arc<Worker>, qi: usize, lane: Lane, claim: &Claim) -> Self {
        let claim = Held {
            qi,
            lane,
            job_id: claim.job_id.clone(),
            epoch: claim.epoch,
        };
        worker.track(claim.clone(), true);
        Holding {
            worker: Arc::clone(worker),
            claim,
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.worker.track(self.claim.clone(), false);
        if self.claim.lane == Lane::Jobs {
            self.worker.in_flight_count.fetch_sub(1, Ordering::Relaxed);
            self.worker.touch();
        }
    }
}

/// The admin port's view of the worker (`/live`, `/ready`, `/metrics`).
#[async_trait::async_trait]
impl WorkerProbe for Worker {
    fn alive(&self) -> bool {
        Worker::alive(self)
    }

    async fn readiness(&self) -> Readiness {
        Worker::readiness(self).await
    }

    async fn metrics_text(&self) -> String {
        Worker::metrics_text(self).await
    }
}
