//! The fenced finish of a claim: `finish_once` checks in one write transaction that the claim
//! still holds its job (same epoch, owner and queue), then publishes, pauses, retries,
//! dead-letters or hands back the job, so a worker that lost its lease cannot publish.

use super::{millis, parse_history, to_json_text};
use crate::clock::now_ms;
use crate::queue::{
    dead_letter_entry, failed_attempt, rules, Claim, ClaimHandle, DeadLetter, DecisionFate, Fenced,
    Finish, QueueError, QueueNames, RunFate,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

pub(super) fn sqlite_seq(claim: &Claim) -> Result<i64, QueueError> {
    match claim.handle {
        ClaimHandle(Some(seq)) => Ok(seq),
        ClaimHandle(None) => Err(QueueError::Unsupported(format!(
            "job {}: the claim was not made by the embedded backend",
            claim.job_id
        ))),
    }
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
pub(super) fn finish_once(
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
    let rules = rules(&how);
    // The job's count of recoveries lives on its row: a finish that resets it
    // (`rules.resets_recoveries`: publish, dead letter, pause) deletes the row, and a retry or
    // a hand-back keeps the row and the count as they are.
    if rules.run == RunFate::Forgotten {
        crate::queue::run_store::sqlite::forget_run(&tx, &q.jobs, job_id)?;
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
        Finish::Retry { delay, error, .. } => {
            let failed = attempt.saturating_add(1);
            let history = failed_attempt(
                &parse_history(job_id, &history),
                u32::try_from(failed).unwrap_or(u32::MAX),
                error,
                crate::clock::now_utc(),
            );
            let history = to_json_text(&history)?;
            let keeps_decision = rules.decision == DecisionFate::StaysWithJob;
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
                keeps_decision
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
