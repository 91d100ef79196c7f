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
//!   retry. `epoch` grows with every claim and fences `extend` and `finish`. `recoveries`
//!   counts the claims `recover` took back from a holder whose lease ran out (the row, and
//!   the count, go when the job's life ends; see `Claim::recoveries`).
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
//!
//! The code is split by concern: `schema` (tables and migrations), `claim` (claims, leases,
//! recovery), `finish` (the fenced finish), `runs` (step saves and decisions), `admin`
//! (enqueue, counts, results, dead letters, pending records), `backend` (the `Backend` impl,
//! which hands over to those) and `doorbell` (the wake-up of idle claims).
//!
//! [`dead_letter_entry`]: crate::queue::dead_letter_entry

use crate::queue::{AttemptRecord, QueueError};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

mod admin;
mod backend;
mod claim;
mod doorbell;
mod finish;
mod runs;
mod schema;

/// How long a statement waits for another process's write lock before failing with `BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two polls of an empty queue while the doorbell is watched
/// ([`doorbell`]): a ring wakes the claim at once, and a delayed retry's due time
/// ends the pause early, so this only bounds what rings no bell (a writer from before the
/// doorbell, another host on a network filesystem, a clock jump).
const WATCHED_POLL: Duration = Duration::from_secs(2);

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
                QueueError::Transport(format!(
                    "cannot create the directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let mut conn = crate::queue::run_store::sqlite::open_wal(path, BUSY_TIMEOUT)?;
        conn.pragma_update(
            None,
            "synchronous",
            if synchronous_full { "FULL" } else { "NORMAL" },
        )?;
        conn.set_prepared_statement_cache_capacity(32);

        schema::create_or_migrate(&mut conn, path)?;

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
                QueueError::Transport(
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
        .map_err(|e| {
            QueueError::Transport(format!("embedded queue: the blocking task failed: {e}"))
        })?
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
        .map_err(|e| QueueError::Corrupt(format!("embedded queue: cannot encode JSON: {e}")))
}

/// Opens the embedded backend as the daemon's `dyn Backend`.
#[cfg(test)]
mod tests;
