//! A run's checkpoint and step journal in SQLite, written and read inside the caller's
//! transaction, fenced on the job's epoch. Shared by this store and the embedded backend.

use super::*;
use crate::queue::{QueueError, StepWrite, StoredRun};
use rusqlite::{params, OptionalExtension};

/// Whether `epoch` is the job's current one.
pub(super) fn holds(
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
pub(super) fn delete_rows(
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
