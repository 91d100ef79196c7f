//! Claims and leases: `claim` (poll or wait for ready jobs, then take them in one write
//! transaction), `extend` (renew the leases of held claims) and `recover` (hand back the jobs
//! whose lease ran out, counting a recovery for each). Each is fenced on the claim's epoch where it touches a held job.

use super::{limit, millis, parse_history, EmbeddedBackend};
use crate::clock::now_ms;
use crate::queue::{Claim, ClaimHandle, QueueError, QueueNames};
use rusqlite::{params, Connection, TransactionBehavior};
use std::time::{Duration, Instant};

/// The first pause of `claim` when no job is ready; it doubles up to [`MAX_POLL`].
pub(super) const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest pause between two polls of an empty queue, where the file is not watched.
pub(super) const MAX_POLL: Duration = Duration::from_millis(200);

/// The pause after `current` while polling an empty queue: doubles, capped at [`MAX_POLL`].
pub(super) fn next_poll(current: Duration) -> Duration {
    (current * 2).min(MAX_POLL)
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
            "SELECT seq, job_id, payload, attempt, history, decision, recoveries FROM jobs
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
                row.get::<_, i64>(6)?,
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
        for (seq, job_id, payload, attempt, history, decision, recoveries) in rows {
            let epoch = crate::queue::run_store::sqlite::next_epoch(&tx)?;
            update.execute(params![seq, worker, lease_until, epoch])?;
            let fresh = !has_run.exists(params![queue, job_id])?;
            let attempt = u32::try_from(attempt.saturating_add(1)).map_err(|_| {
                QueueError::Corrupt(format!(
                    "job {job_id}: stored attempt count {attempt} is out of range"
                ))
            })?;
            let epoch = u64::try_from(epoch).map_err(|_| {
                QueueError::Corrupt(format!(
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
                // Out of range only in a damaged file: clamped.
                recoveries: u32::try_from(recoveries.clamp(0, i64::from(u32::MAX)))
                    .unwrap_or(u32::MAX),
                handle: ClaimHandle(Some(seq)),
            });
        }
    }
    tx.commit()?;
    Ok(claims)
}

impl EmbeddedBackend {
    /// [`Backend::claim`](crate::queue::Backend::claim) on this file.
    pub(super) async fn claim_jobs(
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

    /// [`Backend::extend`](crate::queue::Backend::extend) on this file.
    pub(super) async fn extend_leases(
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

    /// [`Backend::recover`](crate::queue::Backend::recover) on this file.
    pub(super) async fn recover_expired(&self, q: &QueueNames) -> Result<u64, QueueError> {
        let queue = q.jobs.clone();
        self.with_conn_readying(
            move |conn, _| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // The epoch is left alone: the next claim raises it, which fences the old holder.
                // A claim taken back from a holder that did not end it is a recovery (see
                // `Claim::recoveries`); the job's row goes when its life ends, and with it the
                // count (a retry and a hand-back keep the row, and the count).
                let moved = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL,
                         recoveries = recoveries + 1
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
}
