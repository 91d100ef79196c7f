//! Durable runs: a step's journal record and checkpoint saved under the claim's fence
//! (`save_step`), and the human decision that puts a paused job back in the queue to resume
//! (`submit_decision`). The run tables themselves belong to `run_store::sqlite`, shared with the run
//! store.

use super::{admin::insert_job, to_json_text, EmbeddedBackend};
use crate::clock::now_ms;
use crate::durable::pending::waits_at;
use crate::queue::{Fenced, QueueError, QueueNames, StepWrite};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// `save_step` in one write transaction, fenced like `finish`.
pub(super) fn save_step_once(
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
    crate::queue::run_store::sqlite::write_step(&tx, queue, job_id, step)?;
    tx.commit()?;
    Ok(Fenced::Done)
}

impl EmbeddedBackend {
    /// [`Backend::submit_decision`](crate::queue::Backend::submit_decision) on this file.
    pub(super) async fn resume_with_decision(
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
                return Err(QueueError::Conflict(format!(
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
}
