//! The embedded (SQLite) backend against real files in temp dirs.

use lar_worker::queue::embedded::EmbeddedBackend;
use lar_worker::queue::prelude::*;
use lar_worker::queue::{Claim, DeadLetter, Fenced, Finish, QueueNames};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(30);
const NO_WAIT: Duration = Duration::ZERO;

fn names() -> QueueNames {
    QueueNames {
        jobs: "agent:jobs".into(),
        results: "agent:results".into(),
    }
}

fn open(path: &Path, worker: &str) -> EmbeddedBackend {
    EmbeddedBackend::open(path, worker.to_string()).expect("open")
}

async fn claim_one(b: &EmbeddedBackend, q: &QueueNames, lease: Duration) -> Claim {
    let mut claims = b.claim(q, 1, lease, NO_WAIT).await.expect("claim");
    assert_eq!(claims.len(), 1, "expected one claim");
    claims.remove(0)
}

#[tokio::test]
async fn publish_gives_one_result_and_removes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    let job_id = b.enqueue(&q, br#"{"x":1}"#).await.unwrap().expect("job id");
    assert_eq!(b.depth(&q).await.unwrap().ready, 1);

    let c = claim_one(&b, &q, LEASE).await;
    assert_eq!(c.job_id, job_id);
    assert_eq!(c.payload, br#"{"x":1}"#);
    assert_eq!(c.attempt, 1);
    assert_eq!(c.epoch, 1);
    assert!(c.history.is_empty());
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed), (0, 1));

    let how = Finish::Publish {
        result: b"result-1".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(&q, &c, how.clone()).await.unwrap(), Fenced::Done);
    // The same claim again: refused, and nothing is published twice.
    assert_eq!(b.finish(&q, &c, how).await.unwrap(), Fenced::Lost);
    assert_eq!(
        b.finish(&q, &c, Finish::Release).await.unwrap(),
        Fenced::Lost
    );

    let d = b.depth(&q).await.unwrap();
    assert_eq!(
        (d.ready, d.claimed, d.delayed, d.dead, d.results),
        (0, 0, 0, 0, 1)
    );
    assert!(b.claim(&q, 10, LEASE, NO_WAIT).await.unwrap().is_empty());

    // Reading without take leaves the result; take removes it.
    assert_eq!(
        b.results(&q, 10, false).await.unwrap(),
        vec![b"result-1".to_vec()]
    );
    assert_eq!(
        b.results(&q, 10, true).await.unwrap(),
        vec![b"result-1".to_vec()]
    );
    assert!(b.results(&q, 10, true).await.unwrap().is_empty());
    assert_eq!(b.depth(&q).await.unwrap().results, 0);
}

#[tokio::test]
async fn publish_with_dead_letter_records_both() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    let job_id = b.enqueue(&q, b"state").await.unwrap().unwrap();
    let c = claim_one(&b, &q, LEASE).await;
    let dl = DeadLetter {
        job_id: job_id.clone(),
        reason: "run failed".into(),
        attempts: vec![],
        keep_run: false,
    };
    let how = Finish::Publish {
        result: b"{\"status\":\"failed\"}".to_vec(),
        dead_letter: Some(dl),
    };
    assert_eq!(b.finish(&q, &c, how).await.unwrap(), Fenced::Done);
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.dead, d.results, d.ready, d.claimed), (1, 1, 0, 0));
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead[0]["job_id"], job_id.as_str());
    assert_eq!(dead[0]["payload"], "state");
    assert_eq!(dead[0]["reason"], "run failed");
}

#[tokio::test]
async fn expired_lease_is_recovered_and_the_old_holder_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let first = open(&path, "worker-a");
    // A second open of the same file, as another process would.
    let second = open(&path, "worker-b");
    let q = names();
    let job_id = first.enqueue(&q, b"job").await.unwrap().unwrap();

    let old = claim_one(&first, &q, Duration::from_millis(50)).await;
    assert_eq!(old.epoch, 1);
    // Not expired yet: nothing to recover, nothing to claim.
    assert_eq!(second.recover(&q).await.unwrap(), 0);
    assert!(second
        .claim(&q, 1, LEASE, NO_WAIT)
        .await
        .unwrap()
        .is_empty());

    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(second.recover(&q).await.unwrap(), 1);
    assert_eq!(second.recover(&q).await.unwrap(), 0);

    let new = claim_one(&second, &q, LEASE).await;
    assert_eq!(new.job_id, job_id, "the job id is stable across recoveries");
    assert!(new.epoch > old.epoch);
    // A recovery is not a failed attempt.
    assert_eq!(new.attempt, 1);

    // The zombie cannot renew, publish, retry, dead-letter or release.
    assert_eq!(
        first
            .extend(&q, &[(old.job_id.clone(), old.epoch)], LEASE)
            .await
            .unwrap(),
        vec![false]
    );
    let publish = Finish::Publish {
        result: b"zombie".to_vec(),
        dead_letter: None,
    };
    assert_eq!(first.finish(&q, &old, publish).await.unwrap(), Fenced::Lost);
    let retry = Finish::Retry {
        delay: Duration::ZERO,
        error: "zombie".into(),
        keep_run: false,
    };
    assert_eq!(first.finish(&q, &old, retry).await.unwrap(), Fenced::Lost);
    let dl = Finish::DeadLetter(DeadLetter {
        job_id: job_id.clone(),
        reason: "zombie".into(),
        attempts: vec![],
        keep_run: false,
    });
    assert_eq!(first.finish(&q, &old, dl).await.unwrap(), Fenced::Lost);
    assert_eq!(
        first.finish(&q, &old, Finish::Release).await.unwrap(),
        Fenced::Lost
    );
    let d = second.depth(&q).await.unwrap();
    assert_eq!((d.claimed, d.results, d.dead), (1, 0, 0));

    // The current holder renews and publishes.
    assert_eq!(
        second
            .extend(&q, &[(new.job_id.clone(), new.epoch)], LEASE)
            .await
            .unwrap(),
        vec![true]
    );
    let publish = Finish::Publish {
        result: b"real".to_vec(),
        dead_letter: None,
    };
    assert_eq!(
        second.finish(&q, &new, publish).await.unwrap(),
        Fenced::Done
    );
    assert_eq!(
        first.results(&q, 10, true).await.unwrap(),
        vec![b"real".to_vec()]
    );
}

#[tokio::test]
async fn the_epoch_alone_fences_a_reclaim_by_the_same_worker() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    b.enqueue(&q, b"job").await.unwrap();
    let old = claim_one(&b, &q, Duration::from_millis(30)).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(b.recover(&q).await.unwrap(), 1);
    let new = claim_one(&b, &q, LEASE).await;
    assert_eq!(new.epoch, old.epoch + 1);
    assert_eq!(
        b.extend(&q, &[(old.job_id.clone(), old.epoch)], LEASE)
            .await
            .unwrap(),
        vec![false]
    );
    let publish = Finish::Publish {
        result: b"stale".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(&q, &old, publish).await.unwrap(), Fenced::Lost);
    assert_eq!(b.depth(&q).await.unwrap().results, 0);
    assert_eq!(
        b.finish(&q, &new, Finish::Release).await.unwrap(),
        Fenced::Done
    );
}

#[tokio::test]
async fn extend_keeps_a_claim_alive_past_its_first_lease() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    b.enqueue(&q, b"job").await.unwrap();
    let c = claim_one(&b, &q, Duration::from_millis(100)).await;
    let held = b
        .extend(
            &q,
            &[(c.job_id.clone(), c.epoch), ("no-such-job".into(), 1)],
            LEASE,
        )
        .await
        .unwrap();
    assert_eq!(held, vec![true, false]);
    // A wrong epoch is not held either.
    assert_eq!(
        b.extend(&q, &[(c.job_id.clone(), c.epoch + 1)], LEASE)
            .await
            .unwrap(),
        vec![false]
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        b.recover(&q).await.unwrap(),
        0,
        "the renewed lease has not expired"
    );
    assert_eq!(
        b.finish(&q, &c, Finish::Release).await.unwrap(),
        Fenced::Done
    );
}

#[tokio::test]
async fn retry_is_delayed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    let job_id = b.enqueue(&q, b"job").await.unwrap().unwrap();

    let c1 = claim_one(&b, &q, LEASE).await;
    let retry = Finish::Retry {
        delay: Duration::from_millis(300),
        error: "tool timed out".into(),
        keep_run: false,
    };
    assert_eq!(b.finish(&q, &c1, retry).await.unwrap(), Fenced::Done);
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.delayed), (0, 0, 1));
    assert!(
        b.claim(&q, 1, LEASE, NO_WAIT).await.unwrap().is_empty(),
        "claimable before its delay"
    );
    // The delay also holds across recover (nothing to promote).
    assert_eq!(b.recover(&q).await.unwrap(), 0);

    tokio::time::sleep(Duration::from_millis(350)).await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.delayed), (1, 0));
    let c2 = claim_one(&b, &q, LEASE).await;
    assert_eq!(c2.job_id, job_id);
    assert_eq!(c2.attempt, 2);
    assert!(c2.epoch > c1.epoch);
    assert_eq!(c2.history.len(), 1);
    assert_eq!(c2.history[0].attempt, 1);
    assert_eq!(c2.history[0].error, "tool timed out");
    assert!(!c2.history[0].at.is_empty());

    // A second retry appends; waiting in claim picks the job up once it is due.
    let retry = Finish::Retry {
        delay: Duration::from_millis(100),
        error: "again".into(),
        keep_run: false,
    };
    assert_eq!(b.finish(&q, &c2, retry).await.unwrap(), Fenced::Done);
    let c3 = b.claim(&q, 1, LEASE, Duration::from_secs(5)).await.unwrap();
    assert_eq!(c3.len(), 1);
    assert_eq!(c3[0].attempt, 3);
    let errors: Vec<_> = c3[0]
        .history
        .iter()
        .map(|h| (h.attempt, h.error.as_str()))
        .collect();
    assert_eq!(errors, vec![(1, "tool timed out"), (2, "again")]);
}

#[tokio::test]
async fn dead_letter_keeps_the_exact_payload() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    let text = "{\"name\": \"Zoë\", \"n\": 1.000000000000000000001}";
    let binary: &[u8] = &[0xff, 0x00, 0xfe, b'a', 0x80];
    let text_id = b.enqueue(&q, text.as_bytes()).await.unwrap().unwrap();
    let bin_id = b.enqueue(&q, binary).await.unwrap().unwrap();

    let claims = b.claim(&q, 10, LEASE, NO_WAIT).await.unwrap();
    assert_eq!(claims.len(), 2);
    assert_eq!(claims[0].job_id, text_id, "oldest first");
    assert_eq!(claims[0].payload, text.as_bytes());
    assert_eq!(claims[1].payload, binary);
    for c in &claims {
        let dl = DeadLetter {
            job_id: c.job_id.clone(),
            reason: "bad input".into(),
            attempts: c.history.clone(),
            keep_run: false,
        };
        assert_eq!(
            b.finish(&q, c, Finish::DeadLetter(dl)).await.unwrap(),
            Fenced::Done
        );
    }
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.dead, d.results), (0, 0, 2, 0));

    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["job_id"], text_id.as_str());
    assert_eq!(dead[0]["payload"], text);
    assert_eq!(dead[0]["queue"], "agent:jobs");
    assert_eq!(dead[0]["reason"], "bad input");
    assert_eq!(dead[1]["job_id"], bin_id.as_str());
    assert_eq!(dead[1]["payload_hex"], "ff00fe6180");
    assert!(dead[1].get("payload").is_none());
    assert_eq!(b.dead_letters(&q, 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn empty_payload_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    b.enqueue(&q, b"").await.unwrap();
    let c = claim_one(&b, &q, LEASE).await;
    assert!(c.payload.is_empty());
}

#[tokio::test]
async fn release_gives_the_job_back_without_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let b = open(&path, "w1");
    let other = open(&path, "w2");
    let q = names();
    let job_id = b.enqueue(&q, b"job").await.unwrap().unwrap();
    let c1 = claim_one(&b, &q, LEASE).await;
    assert_eq!(
        b.finish(&q, &c1, Finish::Release).await.unwrap(),
        Fenced::Done
    );
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.delayed), (1, 0, 0));

    let c2 = claim_one(&other, &q, LEASE).await;
    assert_eq!(c2.job_id, job_id);
    assert_eq!(c2.attempt, 1, "a release is not a failed attempt");
    assert!(c2.history.is_empty());
    assert!(c2.epoch > c1.epoch);
    assert_eq!(
        b.finish(&q, &c1, Finish::Release).await.unwrap(),
        Fenced::Lost
    );
}

#[tokio::test]
async fn queues_are_separate() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let a = names();
    let other = QueueNames {
        jobs: "other:jobs".into(),
        results: "other:results".into(),
    };
    b.enqueue(&a, b"for a").await.unwrap();
    assert!(b
        .claim(&other, 10, LEASE, NO_WAIT)
        .await
        .unwrap()
        .is_empty());
    let c = claim_one(&b, &a, LEASE).await;
    // A claim finished against the wrong queue is refused, not published elsewhere.
    let publish = Finish::Publish {
        result: b"r".to_vec(),
        dead_letter: None,
    };
    assert_eq!(
        b.finish(&other, &c, publish.clone()).await.unwrap(),
        Fenced::Lost
    );
    assert_eq!(b.finish(&a, &c, publish).await.unwrap(), Fenced::Done);
    assert_eq!(b.depth(&other).await.unwrap().results, 0);
    assert_eq!(b.depth(&a).await.unwrap().results, 1);
}

#[tokio::test]
async fn claim_waits_then_returns_empty() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1");
    let q = names();
    let started = Instant::now();
    let claims = b
        .claim(&q, 8, LEASE, Duration::from_millis(400))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(claims.is_empty());
    assert!(
        took >= Duration::from_millis(380),
        "returned early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "overran the wait: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_wakes_up_for_a_job_enqueued_while_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let consumer = open(&path, "w1");
    let producer = open(&path, "producer");
    let q = names();
    let q2 = q.clone();
    let push = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        producer.enqueue(&q2, b"late").await.unwrap().unwrap()
    });
    let started = Instant::now();
    let claims = consumer
        .claim(&q, 4, LEASE, Duration::from_secs(10))
        .await
        .unwrap();
    let job_id = push.await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].job_id, job_id);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// An idle claim on a watched file polls only every minute here, once its first quick looks
/// are done (about half a second): what ends it early is a change of the file (another
/// connection's commit, seen by the file watch), this backend's own write, or a delayed retry
/// coming due. Polling alone would hold each claim below for the whole 30 s wait.
const LONG_POLL: Duration = Duration::from_secs(60);
/// Past a claim's first quick looks.
const SETTLED: Duration = Duration::from_millis(1500);
const SOON: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_claim_wakes_for_another_processs_commit_not_its_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let consumer = open(&path, "w1").with_watched_poll(LONG_POLL);
    let producer = open(&path, "producer");
    let q = names();
    for round in 0..3 {
        let claim =
            woken_by_a_late_enqueue(&consumer, &producer, &q, &format!("round {round}")).await;
        let done = Finish::Publish {
            result: b"r".to_vec(),
            dead_letter: None,
        };
        assert_eq!(
            consumer.finish(&q, &claim, done).await.unwrap(),
            Fenced::Done
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_claim_wakes_for_its_own_backends_enqueue_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(&dir.path().join("q.db"), "w1").with_watched_poll(LONG_POLL));
    let q = names();
    let push = {
        let (b, q) = (Arc::clone(&b), q.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.enqueue(&q, b"own").await.unwrap().unwrap()
        }
    };
    let started = Instant::now();
    let (claims, job_id) = tokio::join!(b.claim(&q, 4, LEASE, Duration::from_secs(30)), push);
    let claims = claims.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].job_id, job_id);
    assert!(
        started.elapsed() < SOON,
        "waited for the poll: {:?}",
        started.elapsed()
    );

    // A hand-back readies the job again: a waiting claim of the same backend takes it.
    let release = {
        let (b, q, c) = (Arc::clone(&b), q.clone(), claims[0].clone());
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.finish(&q, &c, Finish::Release).await.unwrap()
        }
    };
    let started = Instant::now();
    let (again, released) = tokio::join!(b.claim(&q, 4, LEASE, Duration::from_secs(30)), release);
    assert_eq!(released, Fenced::Done);
    assert_eq!(again.unwrap().len(), 1);
    assert!(
        started.elapsed() < SOON,
        "waited for the poll: {:?}",
        started.elapsed()
    );
}

/// Someone removes the doorbell: the watch stops (claims poll), the next ring makes the file
/// again, and a later claim watches it again and is woken by rings as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_doorbell_is_watched_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let consumer = open(&path, "w1")
        .with_watched_poll(LONG_POLL)
        .with_watch_retry(Duration::from_millis(200));
    let producer = open(&path, "producer");
    let q = names();
    let idle_look = || async { consumer.claim(&q, 1, LEASE, NO_WAIT).await.unwrap() };
    assert!(idle_look().await.is_empty());
    assert!(consumer.doorbell_watched());
    std::fs::remove_file(dir.path().join("q.db-wake")).unwrap();
    let until = Instant::now() + SOON;
    while consumer.doorbell_watched() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !consumer.doorbell_watched(),
        "the watch did not notice the removal"
    );
    // The first ring after the removal makes the doorbell again; its job is found by a look.
    producer.enqueue(&q, b"first").await.unwrap().unwrap();
    let first = consumer.claim(&q, 1, LEASE, SOON).await.unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(idle_look().await.is_empty());
    assert!(
        consumer.doorbell_watched(),
        "the doorbell is not watched again"
    );
    // Watched again: a job enqueued while the claim waits idle wakes it.
    woken_by_a_late_enqueue(&consumer, &producer, &q, "watched again").await;
}

/// An idle claim of `consumer` while `producer` (another connection, as another process)
/// enqueues a job once the claim has settled: the claim gets that job, well before its poll.
async fn woken_by_a_late_enqueue(
    consumer: &EmbeddedBackend,
    producer: &EmbeddedBackend,
    q: &QueueNames,
    what: &str,
) -> Claim {
    let push = async {
        tokio::time::sleep(SETTLED).await;
        producer.enqueue(q, b"late").await.unwrap().unwrap()
    };
    let started = Instant::now();
    let (claims, job_id) = tokio::join!(consumer.claim(q, 4, LEASE, Duration::from_secs(30)), push);
    let mut claims = claims.unwrap();
    assert_eq!(claims.len(), 1, "{what}: nothing claimed");
    assert_eq!(claims[0].job_id, job_id);
    assert!(
        started.elapsed() < SOON,
        "{what}: the claim waited for its poll ({:?})",
        started.elapsed()
    );
    claims.remove(0)
}

#[tokio::test]
async fn a_waiting_claim_takes_a_delayed_retry_when_it_comes_due() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db"), "w1").with_watched_poll(LONG_POLL);
    let q = names();
    b.enqueue(&q, b"job").await.unwrap().unwrap();
    let c1 = claim_one(&b, &q, LEASE).await;
    let retry = Finish::Retry {
        delay: SETTLED,
        error: "busy".into(),
        keep_run: false,
    };
    assert_eq!(b.finish(&q, &c1, retry).await.unwrap(), Fenced::Done);
    let started = Instant::now();
    let claims = b
        .claim(&q, 1, LEASE, Duration::from_secs(30))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(claims.len(), 1, "the retry was not claimed");
    assert_eq!(claims[0].attempt, 2);
    assert!(
        took >= SETTLED - Duration::from_millis(100),
        "claimed before its delay: {took:?}"
    );
    assert!(
        took < SOON,
        "waited for the poll, not the due time: {took:?}"
    );
}

/// Claims and publishes until the queue is empty; returns (job id, epoch) of every claim.
async fn drain(b: Arc<EmbeddedBackend>, q: QueueNames, batch: usize) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    loop {
        let claims = b
            .claim(&q, batch, LEASE, Duration::from_millis(100))
            .await
            .unwrap();
        if claims.is_empty() {
            return seen;
        }
        for c in claims {
            seen.push((c.job_id.clone(), c.epoch));
            let how = Finish::Publish {
                result: c.job_id.clone().into_bytes(),
                dead_letter: None,
            };
            assert_eq!(b.finish(&q, &c, how).await.unwrap(), Fenced::Done);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_share_a_job_and_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let a = Arc::new(open(&path, "worker-a"));
    let b = Arc::new(open(&path, "worker-b"));
    let q = names();
    let mut enqueued = HashSet::new();
    for i in 0..500 {
        let id = a
            .enqueue(&q, format!("{{\"i\":{i}}}").as_bytes())
            .await
            .unwrap()
            .unwrap();
        enqueued.insert(id);
    }
    let ta = tokio::spawn(drain(Arc::clone(&a), q.clone(), 7));
    let tb = tokio::spawn(drain(Arc::clone(&b), q.clone(), 5));
    let seen_a = ta.await.unwrap();
    let seen_b = tb.await.unwrap();

    let ids_a: HashSet<_> = seen_a.iter().map(|(id, _)| id.clone()).collect();
    let ids_b: HashSet<_> = seen_b.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids_a.len(), seen_a.len(), "worker a got a job twice");
    assert_eq!(ids_b.len(), seen_b.len(), "worker b got a job twice");
    assert!(
        ids_a.is_disjoint(&ids_b),
        "a job was handed to both workers"
    );
    let all: HashSet<_> = ids_a.union(&ids_b).cloned().collect();
    assert_eq!(all, enqueued, "a job was lost");
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "both workers took part"
    );

    let results = a.results(&q, 1000, true).await.unwrap();
    assert_eq!(results.len(), 500);
    let published: HashSet<_> = results
        .into_iter()
        .map(|r| String::from_utf8(r).unwrap())
        .collect();
    assert_eq!(published, enqueued, "exactly one result per job");
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.delayed, d.results), (0, 0, 0, 0));
}

const CHILD_ENV: &str = "LAR_EMBEDDED_TEST_CHILD_DB";

/// Not a test on its own: the worker process `several_processes_share_one_file` starts.
#[tokio::test]
#[ignore = "child process of several_processes_share_one_file"]
async fn child_worker_process() {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return;
    };
    let worker = format!("child-{}", std::process::id());
    let b = Arc::new(EmbeddedBackend::open(Path::new(&db), worker).unwrap());
    for (job_id, epoch) in drain(b, names(), 8).await {
        println!("CLAIMED {job_id} {epoch}");
    }
}

#[test]
fn several_processes_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = open(&path, "producer");
    let q = names();
    let mut enqueued = HashSet::new();
    rt.block_on(async {
        for i in 0..300 {
            enqueued.insert(
                b.enqueue(&q, format!("{i}").as_bytes())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
    });
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_worker_process",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &path)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut claimed = Vec::new();
    let mut per_child = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed");
        let lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            // With --nocapture the harness's "test ... " may share the first line.
            .filter_map(|l| l.split_once("CLAIMED ").map(|(_, rest)| rest.to_string()))
            .collect();
        per_child.push(lines.len());
        claimed.extend(lines);
    }
    let ids: Vec<&str> = claimed.iter().filter_map(|l| l.split(' ').next()).collect();
    let unique: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "a job was handed out twice: {per_child:?}"
    );
    let lost: Vec<_> = enqueued.difference(&unique).collect();
    assert!(lost.is_empty(), "jobs lost: {lost:?} ({per_child:?})");
    assert_eq!(unique.len(), enqueued.len());
    let results = rt.block_on(b.results(&q, 1000, false)).unwrap();
    assert_eq!(results.len(), 300);
}

/// `cargo test --release --test embedded_backend -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput() {
    const JOBS: usize = 5_000;
    const BATCH: usize = 32;
    for full in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let b = EmbeddedBackend::open_with(&dir.path().join("q.db"), "bench".into(), full).unwrap();
        let q = names();
        let payload = br#"{"ticket": "printer on fire", "priority": 2}"#;

        let started = Instant::now();
        for _ in 0..JOBS {
            b.enqueue(&q, payload).await.unwrap();
        }
        let enqueue = started.elapsed();

        let started = Instant::now();
        let mut claim_time = Duration::ZERO;
        let mut done = 0;
        loop {
            let t = Instant::now();
            let claims = b.claim(&q, BATCH, LEASE, NO_WAIT).await.unwrap();
            claim_time += t.elapsed();
            if claims.is_empty() {
                break;
            }
            for c in &claims {
                let how = Finish::Publish {
                    result: b"{\"status\":\"success\"}".to_vec(),
                    dead_letter: None,
                };
                assert_eq!(b.finish(&q, c, how).await.unwrap(), Fenced::Done);
                done += 1;
            }
        }
        let cycle = started.elapsed();
        assert_eq!(done, JOBS);
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "synchronous={}: enqueue {JOBS} jobs in {enqueue:.2?} ({:.0}/s); claim(batch {BATCH})+finish(publish) in {cycle:.2?} ({:.0} jobs/s; claims took {claim_time:.2?}, finishes {:.2?})",
            if full { "FULL" } else { "NORMAL" },
            rate(JOBS, enqueue),
            rate(JOBS, cycle),
            cycle.saturating_sub(claim_time),
        );
    }
}

/// On an envelope queue the envelope's `id` is the job id (as on redis and amqp), a producer's
/// retry of a job still waiting is not queued twice, and an id in use on another queue of the
/// same file is refused rather than dropped.
#[tokio::test]
async fn envelope_ids_are_job_ids() {
    let dir = tempfile::tempdir().unwrap();
    let loans = QueueNames {
        jobs: "loans".into(),
        results: "loans:results".into(),
    };
    let q = names();
    let b = open(&dir.path().join("q.db"), "w1")
        .with_envelope_queues(HashSet::from([loans.jobs.clone()]));
    let msg = br#"{"id":"loan-7","input":{"amount":5}}"#;
    assert_eq!(
        b.enqueue(&loans, msg).await.unwrap().as_deref(),
        Some("loan-7")
    );
    assert_eq!(
        b.enqueue(&loans, msg).await.unwrap().as_deref(),
        Some("loan-7")
    );
    assert_eq!(b.depth(&loans).await.unwrap().ready, 1, "queued once");
    let c = claim_one(&b, &loans, LEASE).await;
    assert_eq!(c.job_id, "loan-7");

    // A state queue ignores `id`; an envelope id taken on another queue is an error.
    let other = b.enqueue(&q, msg).await.unwrap().expect("an id");
    assert_ne!(other, "loan-7");
    let shadow = QueueNames {
        jobs: "loans-2".into(),
        results: "r".into(),
    };
    let b2 = open(&dir.path().join("q.db"), "w2")
        .with_envelope_queues(HashSet::from([shadow.jobs.clone()]));
    let err = b2.enqueue(&shadow, msg).await.unwrap_err().to_string();
    assert!(err.contains("in use on queue 'loans'"), "{err}");
}
