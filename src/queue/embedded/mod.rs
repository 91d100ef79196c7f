//! The embedded backend: a durable queue in one SQLite file (WAL), for one machine.
//!
//! Several worker processes on the same host may share the file. Every read-modify-write runs
//! in a `BEGIN IMMEDIATE` transaction, so SQLite's write lock (waited for with `busy_timeout`)
//! serialises claims and finishes across processes; a claim can therefore never be handed to two
//! workers, and a finish is fenced on the claim's epoch in the same transaction that publishes.
//!
//! Tables:
//! - `jobs`: one row per accepted job, from enqueue until its outcome is durable. `state` is
//!   `ready` or `claimed`; a ready row whose `available_at` lies in the future is a delayed
//!   retry. `epoch` grows with every claim and fences `extend` and `finish`.
//! - `results`: published results, by results-queue name.
//! - `dead_letters`: JSON entries built with [`dead_letter_entry`], by jobs-queue name.
//!
//! Durability: the file runs with `synchronous=NORMAL` by default, which in WAL mode survives a
//! crash of any process (the OS still has the written pages) but may lose the last committed
//! transactions on power loss or a kernel crash. Use [`EmbeddedBackend::open_with`] with
//! `synchronous_full = true` where a finished job must survive power loss too.
//!
//! All SQLite calls run on tokio's blocking pool; the connection sits behind a mutex, so one
//! backend value issues one statement at a time (several values, or processes, run in parallel
//! up to SQLite's single-writer lock).

use super::{
    dead_letter_entry, now_ms, AttemptRecord, Backend, Claim, ClaimHandle, DeadLetter, Fenced,
    Finish, QueueDepth, QueueError, QueueNames, StepWrite,
};
use crate::durable::pending::waits_at;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

mod doorbell;

/// How long a statement waits for another process's write lock before failing with `BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 3;
/// The first pause of `claim` when no job is ready; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest pause between two polls of an empty queue, where the file is not watched.
const MAX_POLL: Duration = Duration::from_millis(200);
/// The pause between two polls of an empty queue while the doorbell is watched
/// ([`doorbell`]): a ring wakes the claim at once, and a delayed retry's due time
/// ends the pause early, so this only bounds what rings no bell (a writer from before the
/// doorbell, another host on a network filesystem, a clock jump).
const WATCHED_POLL: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT    NOT NULL,
    job_id       TEXT    NOT NULL UNIQUE,
    payload      BLOB    NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    epoch        INTEGER NOT NULL DEFAULT 0,
    state        TEXT    NOT NULL CHECK (state IN ('ready', 'claimed')),
    available_at INTEGER NOT NULL,
    owner        TEXT,
    lease_until  INTEGER,
    history      TEXT    NOT NULL DEFAULT '[]',
    enqueued_at  INTEGER NOT NULL,
    decision     TEXT
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, state, available_at);
CREATE TABLE IF NOT EXISTS results (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    body       BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_queue ON results (queue, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    entry      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue, seq);
CREATE TABLE IF NOT EXISTS pending (
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    record     BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    epoch      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, job_id)
);
";

/// The largest epoch a file from before the epoch sequence holds (the sequence starts above
/// it). Epochs come from the sequence (`sqlite_runs::next_epoch`): a job's row goes when it
/// ends, and a redrive or a re-sent id comes back as a new row, so epochs counted per row would
/// start again where a stalled task of this process may still hold the old one (`save_step`
/// and `extend` fence on the id and epoch).
const HIGHEST_EPOCH: &str =
    "SELECT MAX(e) FROM (SELECT MAX(epoch) AS e FROM jobs UNION ALL SELECT MAX(epoch) FROM pending)";

/// Version 2 added durable runs: a decision travelling with a resumed job, plus the `runs`,
/// `run_steps` and `pending` tables (created by [`SCHEMA`]).
const MIGRATE_TO_2: &str = "ALTER TABLE jobs ADD COLUMN decision TEXT;";

/// Version 3 keeps a paused job's epoch with its pending record, so the claim that resumes it
/// gets a newer epoch than every earlier holder.
const MIGRATE_TO_3: &str = "ALTER TABLE pending ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;";

/// How often a claim tries to watch the doorbell again after the watch stopped (by default).
const WATCH_RETRY: Duration = Duration::from_secs(10);

/// The doorbell watch of a backend (see `EmbeddedBackend::watching`).
struct Watching {
    watch: Option<doorbell::FileWatch>,
    /// When a watch that failed or stopped may be tried again.
    retry_at: Option<Instant>,
}

/// A durable queue in one SQLite file.
pub struct EmbeddedBackend {
    conn: Arc<Mutex<Connection>>,
    worker_id: Arc<str>,
    path: PathBuf,
    /// Queues whose messages are envelopes: their `id` is the job id.
    envelope_queues: Arc<std::collections::HashSet<String>>,
    /// Woken when a job may have become claimable: by this backend's own writes that ready
    /// one, and by the doorbell watch for other processes' ([`doorbell`]).
    changed: Arc<Notify>,
    /// Rung after every write that readies a job, for the claims of other processes.
    doorbell: Option<Arc<doorbell::Doorbell>>,
    bell_path: PathBuf,
    /// Started by the first claim (it needs the runtime), and again after it stopped.
    watch: Mutex<Watching>,
    /// How often a claim tries to watch the doorbell again after the watch stopped.
    watch_retry: Duration,
    /// The pause between polls of an empty queue while the file is watched.
    watched_poll: Duration,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("path", &self.path)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBackend {
    /// Opens (creating when missing) the queue file with `synchronous=NORMAL`: committed work
    /// survives process crashes, not necessarily power loss (see [`Self::open_with`]).
    pub fn open(path: &Path, worker_id: String) -> Result<Self, QueueError> {
        Self::open_with(path, worker_id, false)
    }

    /// Opens the queue file; `synchronous_full` selects `synchronous=FULL`, which fsyncs the WAL
    /// on every commit so that committed work also survives power loss (at a throughput cost).
    /// Creates the parent directories and the schema when missing; safe to call from several
    /// processes at once.
    pub fn open_with(
        path: &Path,
        worker_id: String,
        synchronous_full: bool,
    ) -> Result<Self, QueueError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                QueueError::Other(format!(
                    "cannot create the directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let mut conn = super::sqlite_runs::open_wal(path, BUSY_TIMEOUT)?;
        conn.pragma_update(
            None,
            "synchronous",
            if synchronous_full { "FULL" } else { "NORMAL" },
        )?;
        conn.set_prepared_statement_cache_capacity(32);

        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(QueueError::Other(format!(
                "{}: queue schema version {version} is newer than this lar-worker understands ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        let had_jobs: bool = tx
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
                [],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if had_jobs && version < 2 {
            tx.execute_batch(MIGRATE_TO_2)?;
        }
        // Version 2 files have a `pending` table without `epoch`; older ones get the whole
        // table from SCHEMA below.
        if had_jobs && version == 2 {
            tx.execute_batch(MIGRATE_TO_3)?;
        }
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(super::sqlite_runs::RUN_TABLES)?;
        super::sqlite_runs::seed_epoch_seq(&tx, HIGHEST_EPOCH)?;
        if version < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;

        let bell_path = doorbell::doorbell_path(path);
        Ok(EmbeddedBackend {
            conn: Arc::new(Mutex::new(conn)),
            worker_id: Arc::from(worker_id),
            path: path.to_path_buf(),
            envelope_queues: Arc::default(),
            changed: Arc::new(Notify::new()),
            doorbell: doorbell::Doorbell::open(&bell_path, path).map(Arc::new),
            bell_path,
            watch: Mutex::new(Watching {
                watch: None,
                retry_at: None,
            }),
            watch_retry: WATCH_RETRY,
            watched_poll: WATCHED_POLL,
        })
    }

    /// Sets how soon a claim tries to watch the doorbell again after the watch stopped (tests
    /// set it short).
    pub fn with_watch_retry(mut self, every: Duration) -> Self {
        self.watch_retry = every;
        self
    }

    /// Sets the pause between polls of an empty queue while the file is watched (tests set it
    /// long, to show that a change, not a poll, wakes the claim).
    pub fn with_watched_poll(mut self, pause: Duration) -> Self {
        self.watched_poll = pause;
        self
    }

    /// Whether idle claims are woken by rings right now (else they poll): a diagnostic.
    pub fn doorbell_watched(&self) -> bool {
        let w = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        w.watch.as_ref().is_some_and(|w| w.live())
    }

    /// Whether the doorbell is watched, starting the watch on first use and again (at most
    /// every `watch_retry`) after it stopped: a doorbell removed and made again by the next
    /// ring is heard again, not polled for until a restart.
    fn watching(&self) -> bool {
        let mut w = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if w.watch.as_ref().is_some_and(|w| w.live()) {
            return true;
        }
        if w.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        w.retry_at = Some(Instant::now() + self.watch_retry);
        // The doorbell may be gone: make it again before watching it.
        drop(doorbell::Doorbell::open(&self.bell_path, &self.path));
        w.watch = doorbell::FileWatch::start(&self.bell_path, Arc::clone(&self.changed));
        w.watch.is_some()
    }

    /// Names the queues whose messages are envelopes, whose `id` becomes the job id.
    pub fn with_envelope_queues(mut self, queues: std::collections::HashSet<String>) -> Self {
        self.envelope_queues = Arc::new(queues);
        self
    }

    /// The file this backend works on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The owner recorded on the jobs this backend claims.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &str) -> Result<T, QueueError> + Send + 'static,
    {
        self.with_conn_readying(f, |_| false).await
    }

    /// [`Self::with_conn`] for a write that may ready a job: when `readies` says it did, the
    /// claims waiting in this process are woken and the doorbell rung for the others, right
    /// after the commit and on the blocking thread, so a caller that stops waiting (a
    /// timeout, a shutdown) cannot skip it.
    async fn with_conn_readying<T, F, R>(&self, f: F, readies: R) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &str) -> Result<T, QueueError> + Send + 'static,
        R: FnOnce(&T) -> bool + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let worker = Arc::clone(&self.worker_id);
        let (changed, bell) = (Arc::clone(&self.changed), self.doorbell.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| {
                QueueError::Other(
                    "embedded queue: the connection lock is poisoned (an earlier call panicked)"
                        .into(),
                )
            })?;
            let out = f(&mut guard, &worker)?;
            drop(guard);
            if readies(&out) {
                changed.notify_waiters();
                if let Some(bell) = &bell {
                    bell.ring();
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| QueueError::Other(format!("embedded queue: the blocking task failed: {e}")))?
    }
}

/// Milliseconds of a duration as SQLite's integer, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A row count or `LIMIT` as SQLite's integer, saturating.
fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The pause after `current` while polling an empty queue: doubles, capped at [`MAX_POLL`].
fn next_poll(current: Duration) -> Duration {
    (current * 2).min(MAX_POLL)
}

fn sqlite_seq(claim: &Claim) -> Result<i64, QueueError> {
    match claim.handle {
        ClaimHandle::Sqlite { seq } => Ok(seq),
        _ => Err(QueueError::Other(format!(
            "job {}: the claim was not made by the embedded backend",
            claim.job_id
        ))),
    }
}

/// Reads a job's attempt history. Only this module writes it, but a damaged value must not make
/// the job unclaimable (that would stall the queue): it is kept, verbatim, as one record.
fn parse_history(job_id: &str, text: &str) -> Vec<AttemptRecord> {
    match serde_json::from_str(text) {
        Ok(history) => history,
        Err(e) => {
            tracing::warn!(job_id, error = %e, "embedded queue: unreadable attempt history kept as text");
            vec![AttemptRecord {
                attempt: 0,
                at: String::new(),
                error: format!("unreadable attempt history: {text}"),
            }]
        }
    }
}

fn to_json_text<T: serde::Serialize>(value: &T) -> Result<String, QueueError> {
    serde_json::to_string(value)
        .map_err(|e| QueueError::Other(format!("embedded queue: cannot encode JSON: {e}")))
}

/// When the queue's next ready job is (or was) due, in ms: in the past when one can be
/// claimed now, in the future when only delayed retries wait, `None` when no job is ready.
fn next_due(conn: &Connection, queue: &str) -> Result<Option<i64>, QueueError> {
    Ok(conn
        .prepare_cached("SELECT MIN(available_at) FROM jobs WHERE queue = ?1 AND state = 'ready'")?
        .query_row(params![queue], |r| r.get::<_, Option<i64>>(0))?)
}

/// One pass of `claim`: takes up to `max` ready jobs in one write transaction.
fn claim_once(
    conn: &mut Connection,
    worker: &str,
    queue: &str,
    max: usize,
    lease: Duration,
) -> Result<Vec<Claim>, QueueError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let lease_until = now.saturating_add(millis(lease));
    let rows = {
        let mut select = tx.prepare_cached(
            "SELECT seq, job_id, payload, attempt, history, decision FROM jobs
             WHERE queue = ?1 AND state = 'ready' AND available_at <= ?2
             ORDER BY available_at, seq LIMIT ?3",
        )?;
        let rows = select.query_map(params![queue, now, limit(max)], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, Option<String>>(5)?,
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let mut claims = Vec::with_capacity(rows.len());
    {
        let mut update = tx.prepare_cached(
            "UPDATE jobs SET state = 'claimed', owner = ?2, lease_until = ?3, epoch = ?4 WHERE seq = ?1",
        )?;
        let mut has_run =
            tx.prepare_cached("SELECT 1 FROM runs WHERE queue = ?1 AND job_id = ?2")?;
        for (seq, job_id, payload, attempt, history, decision) in rows {
            let epoch = super::sqlite_runs::next_epoch(&tx)?;
            update.execute(params![seq, worker, lease_until, epoch])?;
            let fresh = !has_run.exists(params![queue, job_id])?;
            let attempt = u32::try_from(attempt.saturating_add(1)).map_err(|_| {
                QueueError::Other(format!(
                    "job {job_id}: stored attempt count {attempt} is out of range"
                ))
            })?;
            let epoch = u64::try_from(epoch).map_err(|_| {
                QueueError::Other(format!(
                    "job {job_id}: stored epoch {epoch} is out of range"
                ))
            })?;
            let history = parse_history(&job_id, &history);
            let decision = decision.and_then(|d| serde_json::from_str(&d).ok());
            claims.push(Claim {
                job_id,
                payload,
                attempt,
                epoch,
                history,
                decision,
                fresh,
                handle: ClaimHandle::Sqlite { seq },
            });
        }
    }
    tx.commit()?;
    Ok(claims)
}

fn insert_dead_letter(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    dl: &DeadLetter,
    (payload, decision): (&[u8], Option<&str>),
    now: i64,
) -> Result<(), QueueError> {
    let decision = decision.and_then(|d| serde_json::from_str(d).ok());
    let entry = to_json_text(&dead_letter_entry(queue, dl, payload, decision))?;
    tx.prepare_cached(
        "INSERT INTO dead_letters (queue, job_id, entry, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![queue, dl.job_id, entry, now])?;
    Ok(())
}

/// `finish` in one write transaction: checks the fence, then applies `how`.
fn finish_once(
    conn: &mut Connection,
    worker: &str,
    q: &QueueNames,
    seq: i64,
    job_id: &str,
    epoch: u64,
    how: Finish,
) -> Result<Fenced, QueueError> {
    let Ok(epoch) = i64::try_from(epoch) else {
        return Ok(Fenced::Lost);
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let held: Option<(Vec<u8>, i64, String, Option<String>)> = tx
        .prepare_cached(
            "SELECT payload, attempt, history, decision FROM jobs
             WHERE seq = ?1 AND job_id = ?2 AND epoch = ?3 AND state = 'claimed' AND owner = ?4 AND queue = ?5",
        )?
        .query_row(params![seq, job_id, epoch, worker, q.jobs], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((payload, attempt, history, decision)) = held else {
        // Nothing changed: dropping the transaction rolls it back.
        return Ok(Fenced::Lost);
    };
    let now = now_ms();
    let ends_run = !matches!(
        &how,
        Finish::Release | Finish::Pause { .. } | Finish::Retry { keep_run: true, .. }
    ) && !matches!(&how, Finish::DeadLetter(dl) if dl.keep_run);
    if ends_run {
        super::sqlite_runs::forget_run(&tx, &q.jobs, job_id)?;
    }
    match how {
        Finish::Pause { result, pending } => {
            tx.prepare_cached("DELETE FROM jobs WHERE seq = ?1")?
                .execute(params![seq])?;
            tx.prepare_cached(
                "INSERT INTO results (queue, job_id, body, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![q.results, job_id, result, now])?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO pending (queue, job_id, record, created_at, epoch) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![q.jobs, job_id, pending, now, epoch])?;
        }
        Finish::Publish {
            result,
            dead_letter,
        } => {
            tx.prepare_cached("DELETE FROM jobs WHERE seq = ?1")?
                .execute(params![seq])?;
            tx.prepare_cached(
                "INSERT INTO results (queue, job_id, body, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![q.results, job_id, result, now])?;
            if let Some(dl) = &dead_letter {
                insert_dead_letter(&tx, &q.jobs, dl, (&payload, None), now)?;
            }
        }
        Finish::Retry {
            delay,
            error,
            keep_run,
        } => {
            let failed = attempt.saturating_add(1);
            let mut history = parse_history(job_id, &history);
            history.push(AttemptRecord {
                attempt: u32::try_from(failed).unwrap_or(u32::MAX),
                at: crate::exec::run::now_utc(),
                error,
            });
            let history = to_json_text(&history)?;
            // A retry from the first step asks its human again: a decision kept on the job
            // would answer a run that is gone.
            tx.prepare_cached(
                "UPDATE jobs SET state = 'ready', available_at = ?2, attempt = ?3, history = ?4,
                 owner = NULL, lease_until = NULL,
                 decision = CASE WHEN ?5 THEN decision ELSE NULL END WHERE seq = ?1",
            )?
            .execute(params![
                seq,
                now.saturating_add(millis(delay)),
                failed,
                history,
                keep_run
            ])?;
        }
        Finish::DeadLetter(dl) => {
            tx.prepare_cached("DELETE FROM jobs WHERE seq = ?1")?
                .execute(params![seq])?;
            insert_dead_letter(&tx, &q.jobs, &dl, (&payload, decision.as_deref()), now)?;
        }
        Finish::Release => {
            // `available_at` is already in the past (the job was claimable), so the job is ready
            // at once and keeps its place in line.
            tx.prepare_cached(
                "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL WHERE seq = ?1",
            )?
            .execute(params![seq])?;
        }
    }
    tx.commit()?;
    Ok(Fenced::Done)
}

/// `save_step` in one write transaction, fenced like `finish`.
fn save_step_once(
    conn: &mut Connection,
    worker: &str,
    (queue, job_id, epoch): (&str, &str, u64),
    step: StepWrite<'_>,
) -> Result<Fenced, QueueError> {
    let Ok(epoch) = i64::try_from(epoch) else {
        return Ok(Fenced::Lost);
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let held: Option<i64> = tx
        .prepare_cached(
            "SELECT seq FROM jobs WHERE job_id = ?1 AND epoch = ?2 AND state = 'claimed' AND owner = ?3 AND queue = ?4",
        )?
        .query_row(params![job_id, epoch, worker, queue], |row| row.get(0))
        .optional()?;
    if held.is_none() {
        return Ok(Fenced::Lost);
    }
    super::sqlite_runs::write_step(&tx, queue, job_id, step)?;
    tx.commit()?;
    Ok(Fenced::Done)
}

/// Inserts a ready job with a given id (resumes and redrives keep the job's id). `epoch` is
/// the job's last one: its next claim gets a newer one.
fn insert_job(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
    payload: &[u8],
    decision: Option<&str>,
    (epoch, now): (i64, i64),
) -> Result<(), QueueError> {
    tx.prepare_cached(
        "INSERT INTO jobs (queue, job_id, payload, epoch, state, available_at, enqueued_at, decision)
         VALUES (?1, ?2, ?3, ?4, 'ready', ?5, ?5, ?6)",
    )?
    .execute(params![queue, job_id, payload, epoch, now, decision])?;
    Ok(())
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn supports_checkpoints(&self) -> bool {
        true
    }

    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<super::StoredRun>, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn, _| {
            super::sqlite_runs::read_run(&conn.transaction()?, &queue, &job_id)
        })
        .await
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        let (index, record, checkpoint) =
            (step.index, step.record.to_vec(), step.checkpoint.to_vec());
        self.with_conn(move |conn, worker| {
            let step = StepWrite {
                index,
                record: &record,
                checkpoint: &checkpoint,
            };
            save_step_once(conn, worker, (&queue, &job_id, epoch), step)
        })
        .await
    }

    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        let queue = q.jobs.clone();
        self.with_conn(move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "SELECT record FROM pending WHERE queue = ?1 ORDER BY created_at",
            )?;
            let rows = stmt
                .query_map(params![queue], |row| row.get::<_, Vec<u8>>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn, _| {
            Ok(conn
                .prepare_cached("SELECT record FROM pending WHERE queue = ?1 AND job_id = ?2")?
                .query_row(params![queue, job_id], |row| row.get(0))
                .optional()?)
        })
        .await
    }

    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), pending.job_id.clone());
        let payload = pending.payload.clone().into_bytes();
        let (attempt, history) = (pending.attempt, to_json_text(&pending.history)?);
        let step = decision.step;
        let decision = to_json_text(decision)?;
        self.with_conn_readying(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(i64, Vec<u8>)> = tx
                .prepare_cached(
                    "SELECT epoch, record FROM pending WHERE queue = ?1 AND job_id = ?2",
                )?
                .query_row(params![queue, job_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let Some((epoch, _)) = row.filter(|(_, record)| waits_at(record, step)) else {
                return Ok(false);
            };
            // Job ids are unique in the file: a copy of the job (its id sent again) queued or
            // being worked on holds it until it ends.
            let copy: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM jobs WHERE job_id = ?1")?
                .query_row(params![job_id], |r| r.get(0))
                .optional()?;
            if copy.is_some() {
                return Err(QueueError::Other(format!(
                    "job {job_id} has a copy queued or being worked on (its id was sent again): the decision is not recorded; decide again once that copy is done"
                )));
            }
            tx.prepare_cached("DELETE FROM pending WHERE queue = ?1 AND job_id = ?2")?
                .execute(params![queue, job_id])?;
            insert_job(
                &tx,
                &queue,
                &job_id,
                &payload,
                Some(&decision),
                (epoch, now_ms()),
            )?;
            // The failed attempts before the pause go on with the job.
            tx.prepare_cached(
                "UPDATE jobs SET attempt = ?3, history = ?4 WHERE queue = ?1 AND job_id = ?2",
            )?
            .execute(params![queue, job_id, attempt, history])?;
            tx.commit()?;
            Ok(true)
        }, |decided| *decided)
        .await
    }

    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn_readying(move |conn, _| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(i64, String)> = tx
                .prepare_cached("SELECT seq, entry FROM dead_letters WHERE queue = ?1 AND job_id = ?2 ORDER BY seq LIMIT 1")?
                .query_row(params![queue, job_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let Some((seq, entry)) = found else {
                return Ok(false);
            };
            let entry: serde_json::Value = serde_json::from_str(&entry)
                .map_err(|e| QueueError::Other(format!("dead letter {job_id} is unreadable: {e}")))?;
            let payload = super::dead_letter_payload(&entry)
                .ok_or_else(|| QueueError::Other(format!("dead letter {job_id} keeps no payload")))?;
            // The decision goes back only with the run it resumes: a job whose run is gone
            // starts over, and a decision without a run would only be refused again.
            let has_run = tx
                .prepare_cached("SELECT 1 FROM runs WHERE queue = ?1 AND job_id = ?2")?
                .query_row(params![queue, job_id], |_| Ok(()))
                .optional()?
                .is_some();
            let decision = entry
                .get("decision")
                .filter(|_| has_run)
                .map(|d| d.to_string());
            tx.prepare_cached("DELETE FROM dead_letters WHERE seq = ?1")?.execute(params![seq])?;
            insert_job(&tx, &queue, &job_id, &payload, decision.as_deref(), (0, now_ms()))?;
            tx.commit()?;
            Ok(true)
        }, |redriven| *redriven)
        .await
    }

    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let mut pause = FIRST_POLL;
        loop {
            let watched = self.watching();
            // Listening starts before the look, so a ring meanwhile still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let queue = q.jobs.clone();
            let (claims, due) = self
                .with_conn(move |conn, worker| {
                    // A read first: most looks find nothing, and need no write lock.
                    match next_due(conn, &queue)? {
                        Some(due) if due <= now_ms() => {
                            let claims = claim_once(conn, worker, &queue, max, lease)?;
                            Ok((claims, None))
                        }
                        due => Ok((Vec::new(), due)),
                    }
                })
                .await?;
            if !claims.is_empty() {
                return Ok(claims);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let mut nap = if watched && pause >= MAX_POLL {
                self.watched_poll
            } else {
                pause
            };
            if let Some(due) = due {
                // A delayed retry comes due without a write: wake for it.
                let until = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                nap = nap.min(Duration::from_millis(until.max(1)));
            }
            let woken = tokio::select! {
                _ = &mut changed => true,
                _ = tokio::time::sleep(nap.min(left)) => false,
            };
            // After a ring, quick looks again for a while: the job may have gone to another
            // replica, and the next ring is likelier soon.
            pause = if woken { FIRST_POLL } else { next_poll(pause) };
        }
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
        let queue = q.jobs.clone();
        let claims = claims.to_vec();
        self.with_conn(move |conn, worker| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let lease_until = now_ms().saturating_add(millis(lease));
            let mut held = Vec::with_capacity(claims.len());
            {
                let mut update = tx.prepare_cached(
                    "UPDATE jobs SET lease_until = ?1
                     WHERE job_id = ?2 AND epoch = ?3 AND state = 'claimed' AND owner = ?4 AND queue = ?5",
                )?;
                for (job_id, epoch) in &claims {
                    let still = match i64::try_from(*epoch) {
                        Ok(epoch) => update.execute(params![lease_until, job_id, epoch, worker, queue])? == 1,
                        Err(_) => false,
                    };
                    held.push(still);
                }
            }
            tx.commit()?;
            Ok(held)
        })
        .await
    }

    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError> {
        let seq = sqlite_seq(claim)?;
        let q = q.clone();
        let job_id = claim.job_id.clone();
        let epoch = claim.epoch;
        let readies = matches!(how, Finish::Retry { .. } | Finish::Release);
        self.with_conn_readying(
            move |conn, worker| finish_once(conn, worker, &q, seq, &job_id, epoch, how),
            move |fenced| readies && *fenced == Fenced::Done,
        )
        .await
    }

    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let queue = q.jobs.clone();
        self.with_conn_readying(
            move |conn, _| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // The epoch is left alone: the next claim raises it, which fences the old holder.
                let moved = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL
                     WHERE queue = ?1 AND state = 'claimed' AND lease_until < ?2",
                    )?
                    .execute(params![queue, now_ms()])?;
                tx.commit()?;
                Ok(u64::try_from(moved).unwrap_or(u64::MAX))
            },
            |moved| *moved > 0,
        )
        .await
    }

    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError> {
        let queue = q.jobs.clone();
        let payload = payload.to_vec();
        let job_id = self
            .envelope_queues
            .contains(&queue)
            .then(|| super::envelope_id(&payload))
            .flatten()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.with_conn_readying(move |conn, _| {
            let now = now_ms();
            // An envelope id already waiting or running is not queued twice (a producer's
            // retry); once that job has finished the id can be queued again.
            let added = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO jobs (queue, job_id, payload, attempt, epoch, state, available_at, history, enqueued_at)
                     VALUES (?1, ?2, ?3, 0, 0, 'ready', ?4, '[]', ?4)",
                )?
                .execute(params![queue, job_id, payload, now])?;
            if added == 0 {
                let holder: Option<String> = conn
                    .prepare_cached("SELECT queue FROM jobs WHERE job_id = ?1")?
                    .query_row(params![job_id], |r| r.get(0))
                    .optional()?;
                if let Some(other) = holder.filter(|h| *h != queue) {
                    return Err(QueueError::Other(format!(
                        "job id '{job_id}' is in use on queue '{other}': ids must be unique across the queues of one file"
                    )));
                }
            }
            Ok(Some(job_id))
        }, |_| true)
        .await
    }

    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
        let q = q.clone();
        self.with_conn(move |conn, _| {
            // One read transaction: the counts come from one snapshot.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let (ready, claimed, delayed): (i64, i64, i64) = tx.query_row(
                "SELECT COALESCE(SUM(state = 'ready' AND available_at <= ?2), 0),
                        COALESCE(SUM(state = 'claimed'), 0),
                        COALESCE(SUM(state = 'ready' AND available_at > ?2), 0)
                 FROM jobs WHERE queue = ?1",
                params![q.jobs, now_ms()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )?;
            let dead: i64 = tx.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE queue = ?1",
                params![q.jobs],
                |row| row.get(0),
            )?;
            let results: i64 = tx.query_row(
                "SELECT COUNT(*) FROM results WHERE queue = ?1",
                params![q.results],
                |row| row.get(0),
            )?;
            tx.commit()?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(QueueDepth {
                ready: count(ready),
                claimed: count(claimed),
                delayed: count(delayed),
                dead: count(dead),
                results: count(results),
            })
        })
        .await
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
        let queue = q.results.clone();
        self.with_conn(move |conn, _| {
            let behavior = if take {
                TransactionBehavior::Immediate
            } else {
                TransactionBehavior::Deferred
            };
            let tx = conn.transaction_with_behavior(behavior)?;
            let rows = {
                let mut select = tx.prepare_cached(
                    "SELECT seq, body FROM results WHERE queue = ?1 ORDER BY seq LIMIT ?2",
                )?;
                let rows = select.query_map(params![queue, limit(max)], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
                })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            if take {
                let mut delete = tx.prepare_cached("DELETE FROM results WHERE seq = ?1")?;
                for (seq, _) in &rows {
                    delete.execute(params![seq])?;
                }
            }
            tx.commit()?;
            Ok(rows.into_iter().map(|(_, body)| body).collect())
        })
        .await
    }

    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let queue = q.jobs.clone();
        self.with_conn(move |conn, _| {
            let mut select = conn.prepare_cached(
                "SELECT seq, entry FROM dead_letters WHERE queue = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = select.query_map(params![queue, limit(max)], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, entry) = row?;
                let value = serde_json::from_str(&entry).map_err(|e| {
                    QueueError::Other(format!(
                        "embedded queue: dead letter {seq} is not valid JSON: {e}"
                    ))
                })?;
                out.push(value);
            }
            Ok(out)
        })
        .await
    }
}

/// Opens the embedded backend as the daemon's `dyn Backend`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_backs_off_to_the_cap() {
        // Polls in a 1 s wait: a handful, not a spin.
        let mut pause = FIRST_POLL;
        let mut slept = Duration::ZERO;
        let mut polls = 1;
        while slept < Duration::from_secs(1) {
            slept += pause;
            pause = next_poll(pause);
            polls += 1;
        }
        assert_eq!(pause, MAX_POLL);
        assert!(polls <= 12, "{polls} polls in one second");
    }

    #[test]
    fn claim_uses_the_index_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let b = EmbeddedBackend::open(&dir.path().join("q.db"), "w".into()).unwrap();
        let conn = b.conn.lock().unwrap();
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT seq FROM jobs
                 WHERE queue = 'q' AND state = 'ready' AND available_at <= 5 ORDER BY available_at, seq LIMIT 3",
            )
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("jobs_claim"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    #[test]
    fn open_is_idempotent_and_creates_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/q.db");
        drop(EmbeddedBackend::open(&path, "w1".into()).unwrap());
        let b = EmbeddedBackend::open_with(&path, "w2".into(), true).unwrap();
        let conn = b.conn.lock().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn a_version_2_file_gains_the_pending_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let conn = Connection::open(&path).unwrap();
            // The version 2 schema: SCHEMA without `pending.epoch`.
            conn.execute_batch(&SCHEMA.replace(
                "    created_at INTEGER NOT NULL,\n    epoch      INTEGER NOT NULL DEFAULT 0,\n",
                "    created_at INTEGER NOT NULL,\n",
            ))
            .unwrap();
            conn.execute(
                "INSERT INTO pending (queue, job_id, record, created_at) VALUES ('q', 'j', x'7b7d', 1)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
        }
        let b = EmbeddedBackend::open(&path, "w1".into()).unwrap();
        let conn = b.conn.lock().unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let epoch: i64 = conn
            .query_row("SELECT epoch FROM pending WHERE job_id = 'j'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(epoch, 0);
    }
}
