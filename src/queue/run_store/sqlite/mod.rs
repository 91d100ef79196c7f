//! Durable runs in a SQLite file (WAL), for the amqp backend on one host: the same contract
//! as the Redis store (`run_store::redis`), each operation one transaction. Every replica of
//! the host opens the same file; replicas on other hosts need the Redis store.
//!
//! Files: `schema.rs` (tables, WAL, the epoch sequence), `journal.rs` (a run's checkpoint and
//! step journal), `deciding.rs` (decisions on their way); this file holds the store and its
//! [`RunStore`] contract.

mod deciding;
mod journal;
mod schema;

use super::{answered_earlier, Deciding, Paused, RunStore};
use crate::clock::now_ms;
use crate::durable::pending::waits_at;
use crate::queue::{Claim, Fenced, QueueError, QueueNames, StepWrite, StoredRun};
use async_trait::async_trait;
use deciding::*;
use journal::*;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use schema::*;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(in crate::queue) use journal::{forget_run, read_run, write_step};
pub(in crate::queue) use schema::{next_epoch, open_wal, seed_epoch_seq, RUN_TABLES};

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
