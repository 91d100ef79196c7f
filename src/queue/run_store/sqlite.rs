//! Durable runs in a SQLite file (WAL), for the amqp backend on one host: the same contract
//! as the Redis store (`run_store::redis`), each operation one transaction. Every replica of
//! the host opens the same file; replicas on other hosts need the Redis store.

use super::{answered_earlier, Deciding, Paused, RunStore};
use crate::clock::now_ms;
use crate::durable::pending::{step_of, waits_at};
use crate::queue::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS epochs (
    queue  TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    epoch  INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS pending (
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    record     BLOB    NOT NULL,
    props      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS deciding (
    queue    TEXT    NOT NULL,
    job_id   TEXT    NOT NULL,
    decision TEXT    NOT NULL,
    pending  TEXT    NOT NULL,
    props    TEXT    NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS deciding_confirmed (
    queue  TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (queue, job_id)
);
";

/// The checkpoint and journal tables, shared with the embedded backend's file.
pub(in crate::queue) const RUN_TABLES: &str = "
CREATE TABLE IF NOT EXISTS runs (
    queue      TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    checkpoint BLOB NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS run_steps (
    queue  TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    idx    INTEGER NOT NULL,
    record BLOB    NOT NULL,
    PRIMARY KEY (queue, job_id, idx)
);
CREATE TABLE IF NOT EXISTS epoch_seq (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
";

/// Starts the file's epoch sequence, once, above `highest` (the largest epoch the file already
/// holds, for files from before the sequence). Epochs come from this one sequence, never from
/// a per-job counter: a job's row or entry goes when its run ends, and a counter started again
/// at 1 would meet a cut-off holder that still has the old epoch.
pub(in crate::queue) fn seed_epoch_seq(conn: &Connection, highest: &str) -> Result<(), QueueError> {
    conn.execute(
        &format!("INSERT OR IGNORE INTO epoch_seq (id, n) VALUES (1, COALESCE(({highest}), 0))"),
        [],
    )?;
    Ok(())
}

/// The next epoch of the file's sequence (see [`seed_epoch_seq`]).
pub(in crate::queue) fn next_epoch(conn: &Connection) -> Result<i64, QueueError> {
    Ok(conn
        .prepare_cached("UPDATE epoch_seq SET n = n + 1 WHERE id = 1 RETURNING n")?
        .query_row([], |r| r.get(0))?)
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a SQLite file in WAL mode with `busy` as its busy timeout. Switching a file to WAL
/// needs it to itself for a moment, and SQLite answers "database is locked" at once rather
/// than waiting when another process (a replica starting at the same time) has it open: the
/// switch is tried again until `busy` has passed.
pub(in crate::queue) fn open_wal(path: &Path, busy: Duration) -> Result<Connection, QueueError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    let deadline = std::time::Instant::now() + busy;
    let mode: String = loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(QueueError::Unsupported(format!(
            "{}: SQLite refused WAL mode (journal_mode is '{mode}')",
            path.display()
        )));
    }
    Ok(conn)
}

/// The store's column on `runs` (added to files from before it): when a retired run goes, in
/// ms since the epoch (see `RunStore::retire`); NULL for a live run. Its index holds only the
/// retired runs, so the sweep never reads the live ones. Runs inside the opening's immediate
/// transaction: replicas starting together must not both add the column.
fn add_retire_at(tx: &rusqlite::Transaction<'_>) -> Result<(), QueueError> {
    let has: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('runs') WHERE name = 'retire_at'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        tx.execute_batch("ALTER TABLE runs ADD COLUMN retire_at INTEGER")?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_retired ON runs (queue, retire_at)
         WHERE retire_at IS NOT NULL",
    )?;
    Ok(())
}

/// Every table that holds something of a job's run.
const JOB_TABLES: &[&str] = &[
    "runs",
    "run_steps",
    "epochs",
    "pending",
    "deciding",
    "deciding_confirmed",
];

pub(in crate::queue) struct SqliteRunStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteRunStore {
    /// Opens (creating when missing) the store file and its tables.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                QueueError::Transport(format!(
                    "cannot create the directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let mut conn = open_wal(path, BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // One immediate transaction: replicas starting together take turns (a deferred one
        // that reads the schema, then writes, fails at once when another wrote in between).
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(RUN_TABLES)?;
        add_retire_at(&tx)?;
        seed_epoch_seq(&tx, "SELECT MAX(epoch) FROM epochs")?;
        tx.commit()?;
        Ok(SqliteRunStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| {
                QueueError::Transport("checkpoint store: the connection lock is poisoned".into())
            })?;
            f(&mut guard)
        })
        .await
        .map_err(|e| {
            QueueError::Transport(format!("checkpoint store: the blocking task failed: {e}"))
        })?
    }
}

/// Whether `epoch` is the job's current one.
fn holds(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
    epoch: u64,
) -> Result<bool, QueueError> {
    let current: Option<i64> = tx
        .prepare_cached("SELECT epoch FROM epochs WHERE queue = ?1 AND job_id = ?2")?
        .query_row(params![queue, job_id], |r| r.get(0))
        .optional()?;
    Ok(current.is_some_and(|c| i64::try_from(epoch) == Ok(c)))
}

/// Journals `step` (unless the journal already ends with it: a retried save) and replaces the
/// checkpoint; a step whose predecessor is missing is refused. The caller has fenced the write
/// and commits the transaction.
pub(in crate::queue) fn write_step(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
    step: StepWrite<'_>,
) -> Result<(), QueueError> {
    let held: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM run_steps WHERE queue = ?1 AND job_id = ?2")?
        .query_row(params![queue, job_id], |r| r.get(0))?;
    let index = i64::try_from(step.index).unwrap_or(i64::MAX);
    if held == index {
        tx.prepare_cached(
            "INSERT INTO run_steps (queue, job_id, idx, record) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![queue, job_id, index, step.record])?;
    } else if held != index.saturating_add(1) {
        return Err(QueueError::Conflict(format!(
            "the journal of job {job_id} holds {held} steps, this step is number {index}"
        )));
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO runs (queue, job_id, checkpoint) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![queue, job_id, step.checkpoint])?;
    Ok(())
}

/// A job's checkpoint and journal, if it has a checkpoint.
pub(in crate::queue) fn read_run(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<Option<StoredRun>, QueueError> {
    let checkpoint: Option<Vec<u8>> = tx
        .prepare_cached("SELECT checkpoint FROM runs WHERE queue = ?1 AND job_id = ?2")?
        .query_row(params![queue, job_id], |r| r.get(0))
        .optional()?;
    let Some(checkpoint) = checkpoint else {
        return Ok(None);
    };
    let journal = tx
        .prepare_cached(
            "SELECT record FROM run_steps WHERE queue = ?1 AND job_id = ?2 ORDER BY idx",
        )?
        .query_map(params![queue, job_id], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(StoredRun {
        checkpoint,
        journal,
    }))
}

/// Forgets a run's checkpoint and journal, unless the job waits for a human (a pending
/// record): then the claim that ended was a copy of the paused job (a producer sent its id
/// again), and the paused run is not its to end.
pub(in crate::queue) fn forget_run(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<(), QueueError> {
    // A pending record whose halt the journal shows answered is stale (a copy of the job
    // paused again while the decision was on its way): it goes with the run, or a later
    // decision of it would resume the ended run and publish a second result.
    if let Some(record) = row_of(tx, "pending", "record", queue, job_id)? {
        if !answered(tx, queue, job_id, &record)? {
            return Ok(());
        }
        delete_rows(tx, &["pending"], queue, job_id)?;
    }
    delete_rows(tx, &["runs", "run_steps"], queue, job_id)
}

/// Deletes the job's rows in each of `tables` (keyed by queue and job id).
fn delete_rows(
    tx: &rusqlite::Transaction<'_>,
    tables: &[&str],
    queue: &str,
    job_id: &str,
) -> Result<(), QueueError> {
    for table in tables {
        tx.prepare_cached(&format!(
            "DELETE FROM {table} WHERE queue = ?1 AND job_id = ?2"
        ))?
        .execute(params![queue, job_id])?;
    }
    Ok(())
}

/// A job's `deciding` entry and its confirmed mark.
const DECIDING_TABLES: &[&str] = &["deciding", "deciding_confirmed"];

/// The pending record inside the job's `deciding` entry, if it has one.
fn deciding_of(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<Option<Vec<u8>>, QueueError> {
    row_of(tx, "deciding", "pending", queue, job_id)
}

/// Whether a `deciding` entry's pending record answers the halt at `step` (any, when `None`;
/// an entry without a readable step answers any).
fn answers_halt(pending: &[u8], step: Option<u64>) -> bool {
    match (step, step_of(pending)) {
        (Some(want), Some(s)) => s == want,
        _ => true,
    }
}

/// `column` of the job's row in `table` (keyed by queue and job id), if it has one.
fn row_of(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    column: &str,
    queue: &str,
    job_id: &str,
) -> Result<Option<Vec<u8>>, QueueError> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT CAST({column} AS BLOB) FROM {table} WHERE queue = ?1 AND job_id = ?2"
        ))?
        .query_row(params![queue, job_id], |r| r.get(0))
        .optional()?)
}

/// Whether the halt a pending record (or a deciding entry's) waits at is already journaled:
/// its decision was applied, so the record is stale.
fn answered(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
    pending: &[u8],
) -> Result<bool, QueueError> {
    let Some(step) = step_of(pending) else {
        return Ok(false);
    };
    Ok(tx
        .prepare_cached("SELECT 1 FROM run_steps WHERE queue = ?1 AND job_id = ?2 AND idx = ?3")?
        .query_row(params![queue, job_id, step as i64], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Whether [`delete_run`] would forget the run: nothing live waits for a human.
fn run_is_done(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<bool, QueueError> {
    if let Some(p) = deciding_of(tx, queue, job_id)? {
        if !answered(tx, queue, job_id, &p)? {
            return Ok(false);
        }
    }
    match row_of(tx, "pending", "record", queue, job_id)? {
        Some(record) => answered(tx, queue, job_id, &record),
        None => Ok(true),
    }
}

/// Forgets a run and its epoch: the job is done with.
fn delete_run(tx: &rusqlite::Transaction<'_>, queue: &str, job_id: &str) -> Result<(), QueueError> {
    // A decision on its way to the broker needs the run as much as a pending one, unless
    // the journal shows it applied.
    match deciding_of(tx, queue, job_id)? {
        Some(p) if !answered(tx, queue, job_id, &p)? => {}
        Some(_) => {
            delete_rows(tx, DECIDING_TABLES, queue, job_id)?;
            forget_run(tx, queue, job_id)?;
        }
        None => forget_run(tx, queue, job_id)?,
    }
    delete_rows(tx, &["epochs"], queue, job_id)
}

fn to_deciding(decision: String, pending: Vec<u8>, props: String) -> Deciding {
    Deciding {
        decision,
        pending: String::from_utf8_lossy(&pending).into_owned(),
        props,
    }
}

#[async_trait]
impl RunStore for SqliteRunStore {
    async fn next_epoch(&self, q: &QueueNames, job_id: &str) -> Result<u64, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let epoch = next_epoch(&tx)?;
            tx.prepare_cached(
                "INSERT INTO epochs (queue, job_id, epoch) VALUES (?1, ?2, ?3)
                 ON CONFLICT (queue, job_id) DO UPDATE SET epoch = excluded.epoch",
            )?
            .execute(params![queue, job_id, epoch])?;
            tx.prepare_cached(
                "UPDATE runs SET retire_at = NULL
                 WHERE queue = ?1 AND job_id = ?2 AND retire_at IS NOT NULL",
            )?
            .execute(params![queue, job_id])?;
            tx.commit()?;
            Ok(u64::try_from(epoch).unwrap_or(0))
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
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !holds(&tx, &queue, &job_id, epoch)? {
                return Ok(Fenced::Lost);
            }
            let step = StepWrite {
                index,
                record: &record,
                checkpoint: &checkpoint,
            };
            write_step(&tx, &queue, &job_id, step)?;
            tx.commit()?;
            Ok(Fenced::Done)
        })
        .await
    }

    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<StoredRun>, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn| read_run(&conn.transaction()?, &queue, &job_id))
            .await
    }

    async fn end_run(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !holds(&tx, &queue, &job_id, epoch)? {
                return Ok(false);
            }
            delete_run(&tx, &queue, &job_id)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn retire(
        &self,
        q: &QueueNames,
        claim: &Claim,
        keep: Duration,
    ) -> Result<bool, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        let at = now_ms().saturating_add(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !holds(&tx, &queue, &job_id, epoch)? {
                return Ok(false);
            }
            if run_is_done(&tx, &queue, &job_id)? {
                tx.prepare_cached(
                    "UPDATE runs SET retire_at = ?3 WHERE queue = ?1 AND job_id = ?2",
                )?
                .execute(params![queue, job_id, at])?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn sweep_retired(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let queue = q.jobs.clone();
        self.with_conn(move |conn| {
            // The retired runs' index answers without the write lock; it is taken only when
            // something is due, and each run is checked again under it (a delivery may have
            // taken it back in between).
            let due = |c: &Connection| -> Result<Vec<String>, QueueError> {
                Ok(c.prepare_cached(
                    "SELECT job_id FROM runs
                     WHERE queue = ?1 AND retire_at IS NOT NULL AND retire_at <= ?2 LIMIT 1000",
                )?
                .query_map(params![queue, now_ms()], |r| r.get(0))?
                .collect::<Result<_, _>>()?)
            };
            if due(conn)?.is_empty() {
                return Ok(0);
            }
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let due = due(&tx)?;
            for job_id in &due {
                delete_rows(&tx, JOB_TABLES, &queue, job_id)?;
            }
            tx.commit()?;
            Ok(due.len() as u64)
        })
        .await
    }

    async fn release(&self, q: &QueueNames, claim: &Claim) -> Result<bool, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !holds(&tx, &queue, &job_id, epoch)? {
                return Ok(false);
            }
            delete_rows(&tx, &["epochs"], &queue, &job_id)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn pause(
        &self,
        q: &QueueNames,
        claim: &Claim,
        pending: &[u8],
        props: &str,
        carries_decision: bool,
    ) -> Result<Paused, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        let (pending, props) = (pending.to_vec(), props.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !holds(&tx, &queue, &job_id, epoch)? {
                return Ok(Paused::Fenced);
            }
            if let Some(decided) = deciding_of(&tx, &queue, &job_id)? {
                if !carries_decision && !answered_earlier(&decided, &pending) {
                    return Ok(Paused::AlreadyDecided);
                }
                // The decision on its way answered an earlier halt and was applied (this run
                // moved past it), or this claim carried it and did not apply it.
                delete_rows(&tx, DECIDING_TABLES, &queue, &job_id)?;
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO pending (queue, job_id, record, props, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![queue, job_id, pending, props, now_ms()])?;
            tx.commit()?;
            Ok(Paused::Stored)
        })
        .await
    }

    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        let queue = q.jobs.clone();
        self.with_conn(move |conn| {
            Ok(conn
                .prepare_cached("SELECT record FROM pending WHERE queue = ?1 ORDER BY created_at")?
                .query_map(params![queue], |r| r.get::<_, Vec<u8>>(0))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn| {
            Ok(conn
                .prepare_cached("SELECT record FROM pending WHERE queue = ?1 AND job_id = ?2")?
                .query_row(params![queue, job_id], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn decide(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
        decision: &str,
    ) -> Result<Option<Deciding>, QueueError> {
        let (queue, job_id, decision) = (q.jobs.clone(), job_id.to_string(), decision.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(Vec<u8>, String)> = tx
                .prepare_cached(
                    "SELECT record, props FROM pending WHERE queue = ?1 AND job_id = ?2",
                )?
                .query_row(params![queue, job_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((pending, props)) = row.filter(|(record, _)| waits_at(record, step)) else {
                return Ok(None);
            };
            delete_rows(&tx, &["pending"], &queue, &job_id)?;
            delete_rows(&tx, DECIDING_TABLES, &queue, &job_id)?;
            let entry = to_deciding(decision, pending, props);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO deciding (queue, job_id, decision, pending, props, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                queue,
                job_id,
                entry.decision,
                entry.pending,
                entry.props,
                now_ms()
            ])?;
            tx.commit()?;
            Ok(Some(entry))
        })
        .await
    }

    async fn decided(&self, q: &QueueNames, job_id: &str, step: u64) -> Result<(), QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let entry = deciding_of(&tx, &queue, &job_id)?;
            if entry.is_some_and(|p| answers_halt(&p, Some(step))) {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO deciding_confirmed (queue, job_id) VALUES (?1, ?2)",
                )?
                .execute(params![queue, job_id])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn drop_decision(
        &self,
        q: &QueueNames,
        job_id: &str,
        step: Option<u64>,
    ) -> Result<(), QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let entry = deciding_of(&tx, &queue, &job_id)?;
            if entry.is_some_and(|p| answers_halt(&p, step)) {
                delete_rows(&tx, DECIDING_TABLES, &queue, &job_id)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn stale_decisions(
        &self,
        q: &QueueNames,
        stale_after: Duration,
    ) -> Result<Vec<(String, Deciding)>, QueueError> {
        let queue = q.jobs.clone();
        let before = now_ms().saturating_sub(i64::try_from(stale_after.as_millis()).unwrap_or(0));
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows: Vec<(String, String, String, String, bool)> = tx
                .prepare_cached(
                    "SELECT d.job_id, d.decision, d.pending, d.props, c.job_id IS NOT NULL
                     FROM deciding d LEFT JOIN deciding_confirmed c
                       ON c.queue = d.queue AND c.job_id = d.job_id
                     WHERE d.queue = ?1 AND d.at < ?2",
                )?
                .query_map(params![queue, before], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::new();
            for (job_id, decision, pending, props, confirmed) in rows {
                let run_exists = row_of(&tx, "runs", "checkpoint", &queue, &job_id)?.is_some();
                let applied = answered(&tx, &queue, &job_id, pending.as_bytes())?;
                if !run_exists || applied {
                    delete_rows(&tx, DECIDING_TABLES, &queue, &job_id)?;
                } else if confirmed {
                    // The broker holds its message: it waits to be applied, not sent again.
                } else {
                    tx.prepare_cached(
                        "UPDATE deciding SET at = ?3 WHERE queue = ?1 AND job_id = ?2",
                    )?
                    .execute(params![queue, job_id, now_ms()])?;
                    out.push((
                        job_id,
                        Deciding {
                            decision,
                            pending,
                            props,
                        },
                    ));
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}
