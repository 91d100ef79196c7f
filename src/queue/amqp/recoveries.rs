//! Recovery counts on AMQP: a redelivery this process did not hand back is a recovery, counted
//! in the checkpoint store when there is one (see `RunStore::claim_epoch`), else in the dedupe
//! Redis, else in this process only.

use super::{lock, Shared};
use crate::queue::{Claim, QueueNames};
use tracing::warn;

/// Recovery counts kept in this process without a store (oldest dropped past this).
const COUNTS_CAP: usize = 100_000;
/// How long a dedupe-Redis recovery count lives.
const COUNT_TTL_SECS: u64 = 86_400;

impl Shared {
    /// A job's recovery count without a checkpoint store: a redelivery (see [`Held`]) is one
    /// more than the count its message carries (`x-lar-recoveries`, which hand-backs copy on)
    /// or than the count kept, in the dedupe Redis (`<queue>:recoveries:<job_id>`, a day) when
    /// there is one, else in this process. Without either the count lives in this process
    /// only: a worker the job kills takes its count with it, so on a classic queue only a
    /// quorum queue's `x-delivery-count` or a store catches a job that kills every worker
    /// that runs it. A dedupe Redis that fails counts in this process instead.
    pub(super) async fn count_recovery(
        &self,
        q: &QueueNames,
        job_id: &str,
        redelivered: bool,
        carried: u32,
    ) -> u32 {
        if !redelivered {
            return carried;
        }
        if let Some(r) = &self.dedupe {
            let script = ::redis::Script::new(
                "local n = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1])) + 1 \
                 redis.call('SET', KEYS[1], n, 'EX', ARGV[2]) return n",
            );
            let mut conn = r.clone();
            let counted: Result<i64, _> = script
                .key(format!("{}:recoveries:{job_id}", q.jobs))
                .arg(carried)
                .arg(COUNT_TTL_SECS)
                .invoke_async(&mut conn)
                .await;
            match counted {
                Ok(n) => return u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                Err(e) => {
                    warn!(job_id, error = %e, "cannot count a recovery in Redis: counting in this process")
                }
            }
        }
        let mut counts = lock(&self.counts);
        if counts.len() >= COUNTS_CAP {
            counts.clear();
        }
        let n = counts.entry(job_id.to_string()).or_insert(0);
        *n = (*n).max(carried) + 1;
        *n
    }

    /// Forgets a job's recovery count when its life ends (a result, a dead letter), where no
    /// store does it with the run (`RunStore::end_run`, `RunStore::release`).
    pub(super) async fn forget_recoveries(&self, q: &QueueNames, c: &Claim) {
        if self.runs.is_some() || c.recoveries == 0 {
            return;
        }
        lock(&self.counts).remove(&c.job_id);
        if let Some(r) = &self.dedupe {
            let mut conn = r.clone();
            let gone: Result<i64, _> = ::redis::cmd("DEL")
                .arg(format!("{}:recoveries:{}", q.jobs, c.job_id))
                .query_async(&mut conn)
                .await;
            if let Err(e) = gone {
                warn!(job_id = %c.job_id, error = %e, "cannot forget the recovery count (it expires in a day)");
            }
        }
    }
}
