//! Recoveries counted in the store, on the backends that count them (embedded and Redis): a
//! claim taken back from a holder that did not end it (an expired lease; on Redis also a dead
//! worker's list) adds one to its job's count, which the next claim hands out; a hand-back, a
//! retry and a fenced-off late finish do not change it; a finish that ends the job's life
//! (publish, dead letter) resets it, so the same id sent again, or redriven, starts at 0.
//! Driven through the library's backends directly (two replicas: two backend values with
//! their own worker ids on one store); the end-to-end case with real dying workers is
//! `tests/poison_jobs.rs`.

mod common;

use lar_worker::queue::embedded::EmbeddedBackend;
use lar_worker::queue::prelude::*;
use lar_worker::queue::redis::RedisBackend;
use lar_worker::queue::{Claim, DeadLetter, Fenced, Finish, QueueNames};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short enough to expire at once, long enough to be claimed first.
const SHORT: Duration = Duration::from_millis(60);
const LONG: Duration = Duration::from_secs(30);
const NO_WAIT: Duration = Duration::ZERO;
/// The bound of every wait on a condition.
const WITHIN: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    std::env::var("LAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Two replicas of one store, on an envelope queue (the job id is the message's `id`).
struct Replicas {
    a: Arc<dyn Backend>,
    b: Arc<dyn Backend>,
    q: QueueNames,
    /// Redis: the key prefix to delete at the end.
    redis_prefix: Option<String>,
    _dir: tempfile::TempDir,
}

impl Replicas {
    async fn embedded() -> Replicas {
        let dir = tempfile::tempdir().unwrap();
        let q = names("embedded");
        let path = dir.path().join("q.db");
        let open = |worker: &str| -> Arc<dyn Backend> {
            Arc::new(
                EmbeddedBackend::open(&path, worker.into())
                    .unwrap()
                    .with_envelope_queues([q.jobs.clone()].into()),
            )
        };
        Replicas {
            a: open("w-a"),
            b: open("w-b"),
            q,
            redis_prefix: None,
            _dir: dir,
        }
    }

    async fn redis() -> Replicas {
        let q = names("redis");
        let connect = |worker: &'static str| {
            let jobs = q.jobs.clone();
            async move {
                Arc::new(
                    RedisBackend::connect(&redis_url(), worker.into(), vec![jobs])
                        .await
                        .unwrap(),
                ) as Arc<dyn Backend>
            }
        };
        Replicas {
            a: connect("w-a").await,
            b: connect("w-b").await,
            redis_prefix: Some(q.jobs.clone()),
            q,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn push(&self, id: &str) {
        let msg = format!(r#"{{"id":"{id}","input":{{}}}}"#);
        self.a.enqueue(&self.q, msg.as_bytes()).await.unwrap();
    }

    /// Runs `recover` on `by` until it moved something (the lease expired), bounded.
    async fn expire_and_recover(&self, by: &dyn Backend) {
        let start = Instant::now();
        while by.recover(&self.q).await.unwrap() == 0 {
            assert!(start.elapsed() < WITHIN, "the short lease never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One claim by `by`, promoting due retries (Redis) until there is one, bounded.
    async fn claim(&self, by: &dyn Backend, lease: Duration) -> Claim {
        let start = Instant::now();
        loop {
            let mut got = by.claim(&self.q, 1, lease, NO_WAIT).await.unwrap();
            if let Some(c) = got.pop() {
                assert!(got.is_empty());
                return c;
            }
            assert!(start.elapsed() < WITHIN, "no job to claim");
            by.recover(&self.q).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(&self, by: &dyn Backend, c: &Claim, how: Finish) -> Fenced {
        by.finish(&self.q, c, how).await.unwrap()
    }

    /// Redis: how many jobs have a stored count (the `Q:recoveries` hash's length).
    async fn counted_jobs(&self) -> Option<usize> {
        let prefix = self.redis_prefix.as_ref()?;
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        Some(
            redis::cmd("HLEN")
                .arg(format!("{prefix}:recoveries"))
                .query_async(&mut conn)
                .await
                .unwrap(),
        )
    }

    async fn cleanup(&self) {
        if let Some(prefix) = &self.redis_prefix {
            common::delete_redis_keys(&redis_url(), prefix).await;
        }
    }
}

fn names(kind: &str) -> QueueNames {
    let jobs = format!("lar-test-recoveries-{kind}-{}", uuid::Uuid::new_v4());
    QueueNames {
        results: format!("{jobs}:results"),
        jobs,
    }
}

fn publish() -> Finish {
    Finish::Publish {
        result: b"{}".to_vec(),
        dead_letter: None,
    }
}

/// The whole counting rule on one job, claim by claim.
async fn expired_leases_count_and_the_jobs_end_resets(r: &Replicas) {
    r.push("poison").await;
    let first = r.claim(&*r.a, SHORT).await;
    assert_eq!((first.job_id.as_str(), first.recoveries), ("poison", 0));

    // Its holder stops renewing (it died): the lease expires and another replica takes it back.
    r.expire_and_recover(&*r.b).await;
    let second = r.claim(&*r.b, SHORT).await;
    assert_eq!(
        second.job_id, "poison",
        "the job id is stable across recoveries"
    );
    assert_eq!(second.recoveries, 1, "one claim taken back from its holder");
    assert_eq!(second.attempt, 1, "a recovery is not a failed attempt");
    // The old holder's late finish is fenced off: it resets nothing.
    assert_eq!(r.finish(&*r.a, &first, publish()).await, Fenced::Lost);

    r.expire_and_recover(&*r.a).await;
    let third = r.claim(&*r.a, LONG).await;
    assert_eq!(third.recoveries, 2, "the second claim taken back");

    // A hand-back is not a recovery.
    assert_eq!(r.finish(&*r.a, &third, Finish::Release).await, Fenced::Done);
    let fourth = r.claim(&*r.b, LONG).await;
    assert_eq!(
        (fourth.recoveries, fourth.attempt),
        (2, 1),
        "after a hand-back"
    );

    // A retry keeps the count: a job that kills its worker on attempt 2 still counts.
    let retry = Finish::Retry {
        delay: Duration::ZERO,
        error: "boom".into(),
        keep_run: false,
    };
    assert_eq!(r.finish(&*r.b, &fourth, retry).await, Fenced::Done);
    let fifth = r.claim(&*r.b, LONG).await;
    assert_eq!((fifth.recoveries, fifth.attempt), (2, 2), "after a retry");

    // Publishing ends the job's life: the same id sent again starts at 0.
    assert_eq!(r.finish(&*r.b, &fifth, publish()).await, Fenced::Done);
    assert_eq!(
        r.counted_jobs().await.unwrap_or(0),
        0,
        "the count goes with the job"
    );
    r.push("poison").await;
    let again = r.claim(&*r.a, SHORT).await;
    assert_eq!((again.job_id.as_str(), again.recoveries), ("poison", 0));

    // So does a dead letter: its redrive starts at 0.
    r.expire_and_recover(&*r.b).await;
    let recovered = r.claim(&*r.b, LONG).await;
    assert_eq!(recovered.recoveries, 1);
    let dead = Finish::DeadLetter(DeadLetter {
        job_id: "poison".into(),
        reason: "its worker died".into(),
        attempts: Vec::new(),
        keep_run: true,
    });
    assert_eq!(r.finish(&*r.b, &recovered, dead).await, Fenced::Done);
    assert_eq!(r.counted_jobs().await.unwrap_or(0), 0);
    assert!(r.b.redrive_dead_letter(&r.q, "poison").await.unwrap());
    let redriven = r.claim(&*r.a, LONG).await;
    assert_eq!(
        (redriven.job_id.as_str(), redriven.recoveries),
        ("poison", 0),
        "a redriven dead letter starts a new life"
    );
    assert_eq!(r.finish(&*r.a, &redriven, publish()).await, Fenced::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_counts_expired_leases_and_the_jobs_end_resets() {
    let r = Replicas::embedded().await;
    expired_leases_count_and_the_jobs_end_resets(&r).await;
    r.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_expired_leases_and_the_jobs_end_resets() {
    let r = Replicas::redis().await;
    expired_leases_count_and_the_jobs_end_resets(&r).await;
    r.cleanup().await;
}

/// Redis's other path: a worker whose heartbeat expired has its processing list drained by
/// the reaper. Each claim it held counts a recovery; a message it moved but never adopted (no
/// claim held it: nobody was running it) goes back without counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counts_the_claims_of_a_dead_workers_list() {
    let q = names("redis-dead");
    let url = redis_url();
    let dead = RedisBackend::connect(&url, "w-dead".into(), vec![q.jobs.clone()])
        .await
        .unwrap();
    let other = RedisBackend::connect(&url, "w-other".into(), vec![q.jobs.clone()])
        .await
        .unwrap();
    dead.heartbeat(&q, Duration::from_millis(1000))
        .await
        .unwrap();
    dead.enqueue(&q, br#"{"id":"held","input":{}}"#)
        .await
        .unwrap();
    let held = dead.claim(&q, 1, LONG, NO_WAIT).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].recoveries, 0);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::AsyncCommands::lpush(
        &mut conn,
        format!("{}:processing:w-dead", q.jobs),
        br#"{"id":"stray","input":{}}"#.to_vec(),
    )
    .await
    .unwrap();

    // The worker dies: its heartbeat runs out (its lease, 30 s, has not).
    let start = Instant::now();
    while redis::AsyncCommands::exists::<_, bool>(&mut conn, format!("{}:hb:w-dead", q.jobs))
        .await
        .unwrap()
    {
        assert!(start.elapsed() < WITHIN, "the heartbeat never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        other.recover(&q).await.unwrap(),
        2,
        "both go back to the queue"
    );
    let mut claims = other.claim(&q, 5, LONG, NO_WAIT).await.unwrap();
    claims.sort_by(|x, y| x.job_id.cmp(&y.job_id));
    let got: Vec<(&str, u32)> = claims
        .iter()
        .map(|c| (c.job_id.as_str(), c.recoveries))
        .collect();
    assert_eq!(got, vec![("held", 1), ("stray", 0)]);
    for c in &claims {
        assert_eq!(other.finish(&q, c, publish()).await.unwrap(), Fenced::Done);
    }
    let left: usize = redis::cmd("HLEN")
        .arg(format!("{}:recoveries", q.jobs))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "a finished job leaves no count behind");
    common::delete_redis_keys(&url, &q.jobs).await;
}
