//! Decisions on their way, in SQLite: a paused job's `deciding` entry (the decision, the
//! pending record it answers, the delivery's properties) until the broker holds its resume
//! message.

use super::*;
use crate::durable::pending::step_of;
use crate::queue::QueueError;
use rusqlite::{params, OptionalExtension};

/// A job's `deciding` entry and its confirmed mark.
pub(super) const DECIDING_TABLES: &[&str] = &["deciding", "deciding_confirmed"];

/// The pending record inside the job's `deciding` entry, if it has one.
pub(super) fn deciding_of(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<Option<Vec<u8>>, QueueError> {
    row_of(tx, "deciding", "pending", queue, job_id)
}

/// Whether a `deciding` entry's pending record answers the halt at `step` (any, when `None`;
/// an entry without a readable step answers any).
pub(super) fn answers_halt(pending: &[u8], step: Option<u64>) -> bool {
    match (step, step_of(pending)) {
        (Some(want), Some(s)) => s == want,
        _ => true,
    }
}

/// `column` of the job's row in `table` (keyed by queue and job id), if it has one.
pub(super) fn row_of(
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
pub(super) fn answered(
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
pub(super) fn run_is_done(
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
pub(super) fn delete_run(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    job_id: &str,
) -> Result<(), QueueError> {
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

pub(super) fn to_deciding(decision: String, pending: Vec<u8>, props: String) -> Deciding {
    Deciding {
        decision,
        pending: String::from_utf8_lossy(&pending).into_owned(),
        props,
    }
}
