//! Producer and operator calls: `enqueue`, the queue's counts (`depth`), reading or taking
//! results, listing and redriving dead letters, and the paused jobs' pending records. None of
//! them touches a claim's fence.

use super::{limit, EmbeddedBackend};
use crate::clock::now_ms;
use crate::queue::{QueueDepth, QueueError, QueueNames};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

/// Inserts a ready job with a given id (resumes and redrives keep the job's id). `epoch` is
/// the job's last one: its next claim gets a newer one.
pub(super) fn insert_job(
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

impl EmbeddedBackend {
    /// [`Backend::enqueue`](crate::queue::Backend::enqueue) on this file.
    pub(super) async fn enqueue_job(
        &self,
        q: &QueueNames,
        payload: &[u8],
    ) -> Result<Option<String>, QueueError> {
        let queue = q.jobs.clone();
        let payload = payload.to_vec();
        let job_id = self
            .envelope_queues
            .contains(&queue)
            .then(|| crate::queue::envelope_id(&payload))
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
                    return Err(QueueError::Conflict(format!(
                        "job id '{job_id}' is in use on queue '{other}': ids must be unique across the queues of one file"
                    )));
                }
            }
            Ok(Some(job_id))
        }, |_| true)
        .await
    }

    /// [`Backend::depth`](crate::queue::Backend::depth) on this file.
    pub(super) async fn queue_depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
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

    /// [`Backend::results`](crate::queue::Backend::results) on this file.
    pub(super) async fn read_results(
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

    /// [`Backend::dead_letters`](crate::queue::Backend::dead_letters) on this file.
    pub(super) async fn read_dead_letters(
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
                    QueueError::Corrupt(format!(
                        "embedded queue: dead letter {seq} is not valid JSON: {e}"
                    ))
                })?;
                out.push(value);
            }
            Ok(out)
        })
        .await
    }

    /// [`Backend::redrive_dead_letter`](crate::queue::Backend::redrive_dead_letter) on this file.
    pub(super) async fn redrive_job(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<bool, QueueError> {
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
                .map_err(|e| QueueError::Corrupt(format!("dead letter {job_id} is unreadable: {e}")))?;
            let payload = crate::queue::dead_letter_payload(&entry)
                .ok_or_else(|| QueueError::Corrupt(format!("dead letter {job_id} keeps no payload")))?;
            // The redrive rule (`finish::redrive_decision`).
            let has_run = tx
                .prepare_cached("SELECT 1 FROM runs WHERE queue = ?1 AND job_id = ?2")?
                .query_row(params![queue, job_id], |_| Ok(()))
                .optional()?
                .is_some();
            let decision =
                crate::queue::redrive_decision(entry.get("decision"), has_run).map(|d| d.to_string());
            tx.prepare_cached("DELETE FROM dead_letters WHERE seq = ?1")?.execute(params![seq])?;
            insert_job(&tx, &queue, &job_id, &payload, decision.as_deref(), (0, now_ms()))?;
            tx.commit()?;
            Ok(true)
        }, |redriven| *redriven)
        .await
    }

    /// [`Backend::list_pending`](crate::queue::Backend::list_pending) on this file.
    pub(super) async fn pending_records(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
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

    /// [`Backend::get_pending`](crate::queue::Backend::get_pending) on this file.
    pub(super) async fn pending_record(
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
}
