//! The daemon: claims jobs from every configured queue, runs up to `concurrency` at once (each
//! on its own [`crate::exec::Run`]), finishes each claim exactly once, renews leases, reaps
//! expired claims, and drains on shutdown within a deadline.

mod decisions;
mod finishing;
mod hooks;
mod lease;
mod liveness;
mod outcome;
pub mod payload;
mod process;
pub mod stats;
mod supervise;

use crate::backoff::Backoff;
use crate::config::{LoadedQueue, WorkerSection};
use crate::job::AuditSettings;
use crate::ops::health::Readiness;
use crate::ops::metrics::{QueueSample, StepMetrics};
use crate::ops::notify::Notifier;
use crate::queue::{Backend, Claim, Finish};
use crate::tools::Registry;
use hooks::Wedge;
use lease::{Held, Holding, Lane};
use liveness::{Beat, ClaimLoopState};
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
    /// Each claim loop's beat and whether it is down (same order as `queues`).
    claim_loops: Vec<ClaimLoopState>,
    /// The lease renewal loop's beat.
    renewal_beat: Beat,
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
        let claim_loops = queues.iter().map(|_| ClaimLoopState::new()).collect();
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
            claim_loops,
            renewal_beat: Beat::idle(),
            started: Instant::now(),
            notifier: Notifier::from_env(),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight_count.load(Ordering::Relaxed)
    }

    /// The READY/`/ready` checks.
    pub async fn readiness(&self) -> Readiness {
        let mut r = crate::ops::health::readiness(
            self.backend.as_ref(),
            &self.queues,
            &self.audit.log_dir,
            self.audit.secret.is_some(),
        )
        .await;
        r.add(self.claim_loop_checks());
        r
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        let mut samples = Vec::with_capacity(self.queues.len());
        for (qi, q) in self.queues.iter().enumerate() {
            let depth = self.backend.depth(&q.names).await.ok();
            let pending = match self.backend.pauses() {
                Some(pauses) => pauses
                    .list_pending(&q.names)
                    .await
                    .ok()
                    .map(|p| p.len() as u64),
                None => None,
            };
            samples.push(QueueSample {
                queue: q.names.jobs.clone(),
                counters: self.stats[qi].counters(),
                finishes_abandoned: Stats::get(&self.stats[qi].finishes_abandoned),
                ready: depth.as_ref().map(|d| d.ready),
                claimed: depth.as_ref().map(|d| d.claimed),
                delayed: depth.as_ref().map(|d| d.delayed),
                dead: depth.as_ref().map(|d| d.dead),
                pending,
            });
        }
        crate::ops::metrics::render(&samples, self.in_flight(), &self.steps)
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
            claimers.spawn(async move { w.supervise_claim_loop(qi, sd, hs, p).await });
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
        self: &Arc<Self>,
        qi: usize,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
    ) {
        let names = self.queues[qi].names.clone();
        let beat = &self.claim_loops[qi].beat;
        self.turn(beat);
        if hooks::claim_loop_panics(&names.jobs) {
            panic!(
                "test hook LAR_WORKER_TEST_CLAIM_LOOP_PANICS: the claim loop of {} panics",
                names.jobs
            );
        }
        let mut failures = 0u32;
        let mut wedge = Wedge::None;
        let batch_max = self.cfg.concurrency.min(MAX_BATCH);
        loop {
            self.turn(beat);
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    // Its `Holding` was dropped in the unwind: the lease is no longer renewed,
                    // expires, and the reaper hands the job to the next claim.
                    error!(queue = %names.jobs, error = %e, "a job task panicked; its lease will expire");
                }
            }
            // Every permit busy (steps of minutes) is a wait, not a stall: the loop still turns.
            let first = self
                .turning(beat, async {
                    tokio::select! {
                        _ = shutdown.cancelled() => None,
                        p = Arc::clone(permits).acquire_owned() => p.ok(),
                    }
                })
                .await;
            let Some(first) = first else {
                break;
            };
            let mut held = vec![first];
            while held.len() < batch_max {
                match Arc::clone(permits).try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            match wedge {
                Wedge::None => {}
                Wedge::ClaimLoop => {
                    // Test hook (LAR_WORKER_TEST_WEDGE=1): the loop stops turning, as one stuck
                    // on a call would, but still honours the stop so the test can end it.
                    shutdown.cancelled().await;
                    break;
                }
                Wedge::Runtime => {
                    // Test hook (LAR_WORKER_TEST_WEDGE=runtime): nothing async runs any more.
                    hooks::block_the_runtime();
                    shutdown.cancelled().await;
                    break;
                }
            }
            let Some(claimed) = self.claim_or_stop(&names, held.len(), shutdown).await else {
                break;
            };
            self.turn(beat);
            let claims = match claimed {
                Ok(c) => {
                    failures = 0;
                    wedge = hooks::wedge();
                    c
                }
                Err(e) => {
                    failures += 1;
                    let pause = Backoff::reconnect().delay(failures);
                    warn!(queue = %names.jobs, error = %e, retry_in_ms = pause.as_millis() as u64, "claim failed");
                    let stopped = self
                        .turning(beat, async {
                            tokio::select! {
                                _ = shutdown.cancelled() => true,
                                _ = tokio::time::sleep(pause) => false,
                            }
                        })
                        .await;
                    if stopped {
                        break;
                    }
                    continue;
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
                let w = Arc::clone(self);
                let hs = hard_stop.clone();
                let sd = shutdown.clone();
                let holding = Holding::start(self, qi, &claim);
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
        self.claim_loops[qi].beat_stop();
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
