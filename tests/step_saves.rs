//! `Backend::save_step` on the backends that store checkpoints (the real Redis on 127.0.0.1:6379
//! and a SQLite file): fenced on the claim's epoch, idempotent for a step the journal already
//! ends with, refused when the journal is out of step, and (on Redis, where saves from many jobs
//! are batched into one script call) every job answered on its own.

mod common;

use lar_worker::queue::embedded::EmbeddedBackend;
use lar_worker::queue::prelude::*;
use lar_worker::queue::redis::RedisBackend;
use lar_worker::queue::{Claim, Fenced, Finish, QueueNames, StepWrite};
use std::sync::Arc;
use std::time::Duration;

const REDIS: &str = "redis://127.0.0.1:6379/0";
const LEASE: Duration = Duration::from_secs(30);

/// A backend with durable runs and pauses: what these tests exercise.
trait Durable: Backend + Runs + Pauses {}
impl<T: Backend + Runs + Pauses> Durable for T {}

fn names() -> QueueNames {
    let id = uuid::Uuid::new_v4().simple().to_string();
    QueueNames {
        jobs: format!("test:steps:{id}"),
        results: format!("test:steps:{id}:results"),
    }
}

fn step<'a>(index: u64, record: &'a [u8], checkpoint: &'a [u8]) -> StepWrite<'a> {
    StepWrite {
        index,
        record,
        checkpoint,
    }
}

/// An unsigned approval by `by` of the halt at `step`, without rationale or role.
fn approval(by: &str, step: u64) -> lar_worker::exec::Decision {
    lar_worker::exec::Decision {
        choice: "approve".into(),
        rationale: String::new(),
        decided_by: by.into(),
        role: None,
        step: Some(step),
        signature: None,
    }
}

/// A pending record as `decide` reads it, for `submit_decision`.
fn waiting(job_id: &str, payload: &[u8], step: u64) -> lar_worker::durable::Pending {
    serde_json::from_value(serde_json::json!({
        "job_id": job_id, "run_id": "r", "queue": "q", "node": "jury", "step": step,
        "request": {"prompt": "ok?", "choices": ["approve"], "context": {}, "output": "d"},
        "awaiting_since": "now", "payload": String::from_utf8_lossy(payload),
    }))
    .unwrap()
}

async fn claim_all(b: &dyn Durable, q: &QueueNames, n: usize) -> Vec<Claim> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = b
            .claim(q, n - out.len(), LEASE, Duration::ZERO)
            .await
            .unwrap();
        assert!(!got.is_empty(), "claimed {} of {n}", out.len());
        out.extend(got);
    }
    out
}

/// Claims a job retried with no delay (Redis promotes due retries in its reaper).
async fn claim_retried(b: &dyn Durable, q: &QueueNames) -> Claim {
    b.recover(q).await.unwrap();
    claim_all(b, q, 1).await.remove(0)
}

async fn journal(b: &dyn Durable, q: &QueueNames, job: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    let run = b.load_run(q, job).await.unwrap().expect("a stored run");
    (run.journal, run.checkpoint)
}

/// One job: saves are idempotent per index, gaps are refused, a finished claim is fenced off.
async fn save_step_contract(b: &dyn Durable, q: &QueueNames) {
    b.enqueue(q, br#"{"x":1}"#).await.unwrap();
    let c = claim_all(b, q, 1).await.remove(0);
    assert!(c.fresh, "a new job has no run to read");

    assert_eq!(
        b.save_step(q, &c, step(0, b"r0", b"c0")).await.unwrap(),
        Fenced::Done
    );
    // The same step again (a retry after a lost reply): the journal keeps one copy.
    assert_eq!(
        b.save_step(q, &c, step(0, b"r0", b"c0'")).await.unwrap(),
        Fenced::Done
    );
    assert_eq!(
        b.save_step(q, &c, step(1, b"r1", b"c1")).await.unwrap(),
        Fenced::Done
    );
    let (records, checkpoint) = journal(b, q, &c.job_id).await;
    assert_eq!(records, vec![b"r0".to_vec(), b"r1".to_vec()]);
    assert_eq!(checkpoint, b"c1");

    // A step that skips one is refused, and changes nothing.
    let err = b
        .save_step(q, &c, step(3, b"r3", b"c3"))
        .await
        .expect_err("a gap in the journal");
    assert!(err.to_string().contains("journal"), "{err}");
    let (records, checkpoint) = journal(b, q, &c.job_id).await;
    assert_eq!(records.len(), 2);
    assert_eq!(checkpoint, b"c1");

    // Handed back, claimed again (a new epoch): the old claim can no longer save.
    assert_eq!(
        b.finish(q, &c, Finish::Release).await.unwrap(),
        Fenced::Done
    );
    let again = claim_all(b, q, 1).await.remove(0);
    assert_eq!(again.job_id, c.job_id);
    assert!(again.epoch > c.epoch);
    assert!(!again.fresh, "a job with a stored run is resumed from it");
    assert_eq!(
        b.save_step(q, &c, step(2, b"stale", b"stale"))
            .await
            .unwrap(),
        Fenced::Lost
    );
    assert_eq!(
        b.save_step(q, &again, step(2, b"r2", b"c2")).await.unwrap(),
        Fenced::Done
    );
    let (records, checkpoint) = journal(b, q, &c.job_id).await;
    assert_eq!(records.len(), 3);
    assert_eq!(checkpoint, b"c2");

    // An infrastructure retry keeps the run: the next attempt resumes it.
    let keep = Finish::Retry {
        delay: Duration::ZERO,
        error: "the audit disk is full".into(),
        keep_run: true,
    };
    assert_eq!(b.finish(q, &again, keep).await.unwrap(), Fenced::Done);
    let third = claim_retried(b, q).await;
    assert_eq!(
        (third.job_id.as_str(), third.attempt),
        (c.job_id.as_str(), 2)
    );
    let (records, checkpoint) = journal(b, q, &c.job_id).await;
    assert_eq!(records.len(), 3, "the retry kept the journal");
    assert_eq!(checkpoint, b"c2");

    // A failed run retried on purpose starts over: its run is forgotten.
    let fresh = Finish::Retry {
        delay: Duration::ZERO,
        error: "run failed".into(),
        keep_run: false,
    };
    assert_eq!(b.finish(q, &third, fresh).await.unwrap(), Fenced::Done);
    assert!(b.load_run(q, &c.job_id).await.unwrap().is_none());
    let again = claim_retried(b, q).await;
    assert_eq!(again.attempt, 3);

    let done = Finish::Publish {
        result: b"done".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &again, done).await.unwrap(), Fenced::Done);
    assert!(
        b.load_run(q, &c.job_id).await.unwrap().is_none(),
        "a published job leaves no checkpoint"
    );
}

/// Many jobs saving at once (one Redis script call carries many): each gets its own answer.
async fn concurrent_saves(b: Arc<dyn Durable>, q: &QueueNames) {
    const JOBS: usize = 200;
    for i in 0..JOBS {
        b.enqueue(q, format!(r#"{{"i":{i}}}"#).as_bytes())
            .await
            .unwrap();
    }
    let claims = claim_all(b.as_ref(), q, JOBS).await;
    let mut tasks = Vec::new();
    for (i, c) in claims.iter().cloned().enumerate() {
        let (b, q) = (Arc::clone(&b), q.clone());
        tasks.push(tokio::spawn(async move {
            for s in 0..3u64 {
                let rec = format!("job{i}-step{s}");
                // Every seventh job writes each step twice, as a retry would.
                let times = if i % 7 == 0 { 2 } else { 1 };
                for _ in 0..times {
                    let got = b
                        .save_step(&q, &c, step(s, rec.as_bytes(), rec.as_bytes()))
                        .await
                        .unwrap();
                    assert_eq!(got, Fenced::Done);
                }
            }
            c
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let c = t.await.unwrap();
        let (records, checkpoint) = journal(b.as_ref(), q, &c.job_id).await;
        let want: Vec<Vec<u8>> = (0..3)
            .map(|s| format!("job{i}-step{s}").into_bytes())
            .collect();
        assert_eq!(records, want, "job {i}");
        assert_eq!(checkpoint, want[2]);
        let done = Finish::Publish {
            result: format!("r{i}").into_bytes(),
            dead_letter: None,
        };
        assert_eq!(b.finish(q, &c, done).await.unwrap(), Fenced::Done);
    }
    assert_eq!(b.results(q, 10_000, true).await.unwrap().len(), JOBS);
}

async fn redis() -> RedisBackend {
    let worker = format!("test-{}", uuid::Uuid::new_v4().simple());
    RedisBackend::connect(REDIS, worker, Vec::new())
        .await
        .expect("Redis on 127.0.0.1:6379")
}

async fn cleanup_redis(q: &QueueNames) {
    common::delete_redis_keys(REDIS, &q.jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_saves_are_answered_one_by_one() {
    let q = names();
    let b: Arc<dyn Durable> = Arc::new(redis().await);
    concurrent_saves(Arc::clone(&b), &q).await;
    b.deregister(&q).await.unwrap();
    cleanup_redis(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_concurrent_saves_are_answered_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Durable> =
        Arc::new(EmbeddedBackend::open(&dir.path().join("q.db"), "w1".into()).unwrap());
    concurrent_saves(b, &names()).await;
}

/// Epochs stay monotonic across a human pause: a holder whose lease expired before the job
/// paused cannot write or finish once the decided job is claimed again (a reset epoch would
/// hand the resumed claim the zombie's number).
async fn a_zombie_stays_fenced_across_a_pause(b: &dyn Durable, q: &QueueNames) {
    let short = Duration::from_millis(300);
    b.enqueue(q, br#"{"x":1}"#).await.unwrap();
    let zombie = b
        .claim(q, 1, short, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    b.recover(q).await.unwrap();
    let holder = claim_all(b, q, 1).await.remove(0);
    assert!(holder.epoch > zombie.epoch);
    assert_eq!(
        b.save_step(q, &holder, step(0, b"r0", b"c0"))
            .await
            .unwrap(),
        Fenced::Done
    );
    let pending = serde_json::json!({"job_id": holder.job_id, "step": 1}).to_string();
    let paused = b
        .finish(
            q,
            &holder,
            Finish::Pause {
                result: b"{}".to_vec(),
                pending: pending.into_bytes(),
            },
        )
        .await
        .unwrap();
    assert_eq!(paused, Fenced::Done);
    let decision = approval("a@x", 1);
    assert!(b
        .submit_decision(q, &waiting(&holder.job_id, &holder.payload, 1), &decision)
        .await
        .unwrap());
    let resumed = claim_all(b, q, 1).await.remove(0);
    assert!(
        resumed.epoch > holder.epoch,
        "epoch {} after {}",
        resumed.epoch,
        holder.epoch
    );
    assert_eq!(
        b.save_step(q, &zombie, step(1, b"zombie", b"zombie"))
            .await
            .unwrap(),
        Fenced::Lost
    );
    let late = Finish::Publish {
        result: b"{\"zombie\":true}".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &zombie, late).await.unwrap(), Fenced::Lost);
    let done = Finish::Publish {
        result: b"{}".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &resumed, done).await.unwrap(), Fenced::Done);
    assert_eq!(
        b.results(q, 10, true).await.unwrap().len(),
        2,
        "awaiting + final"
    );
}

/// A holder cut off past its lease (a zombie), then two more claims of the same job id (the
/// job taken over, and a second copy a producer sent): once the takeover's result is out, the
/// job's epoch is forgotten, and the next claim must still get an epoch the zombie never had,
/// or the zombie's late finish would pass the fence and publish a second result.
#[tokio::test]
async fn redis_a_holder_of_an_earlier_copy_stays_fenced() {
    let q = names();
    let backend = |name: &str| {
        let worker = format!("test-{name}-{}", uuid::Uuid::new_v4().simple());
        RedisBackend::connect(REDIS, worker, vec![q.jobs.clone()])
    };
    let (a, b, c) = (
        backend("a").await.unwrap(),
        backend("b").await.unwrap(),
        backend("c").await.unwrap(),
    );
    let job = br#"{"id":"same-job","input":{}}"#;
    let publish = |r: &str| Finish::Publish {
        result: r.as_bytes().to_vec(),
        dead_letter: None,
    };
    a.enqueue(&q, job).await.unwrap();
    let first = a
        .claim(&q, 1, Duration::from_millis(200), Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    // `a` freezes past its lease; the reaper hands the job to `b`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.recover(&q).await.unwrap();
    let second = claim_all(&b, &q, 1).await.remove(0);
    assert_eq!(
        b.finish(&q, &second, publish("b")).await.unwrap(),
        Fenced::Done
    );
    a.enqueue(&q, job).await.unwrap();
    let third = claim_all(&c, &q, 1).await.remove(0);
    assert_eq!(
        (first.job_id.as_str(), third.job_id.as_str()),
        ("same-job", "same-job")
    );
    assert_ne!(third.epoch, first.epoch, "an epoch came again");
    assert_eq!(
        a.finish(&q, &first, publish("a")).await.unwrap(),
        Fenced::Lost,
        "the first copy's holder is fenced off"
    );
    assert_eq!(
        c.finish(&q, &third, publish("c")).await.unwrap(),
        Fenced::Done
    );
    assert_eq!(
        a.results(&q, 10, false).await.unwrap(),
        vec![b"b".to_vec(), b"c".to_vec()]
    );
    for w in [&a, &b, &c] {
        w.deregister(&q).await.unwrap();
    }
    cleanup_redis(&q).await;
}

/// Two copies of one job id at once: the second is not claimed beside the first (their
/// claims, leases and checkpoints share the id); it waits a lease in the delayed set, then
/// runs once the first is done. Neither copy is stranded or lost.
#[tokio::test]
async fn redis_a_second_copy_waits_while_the_first_is_held() {
    let q = names();
    let worker = format!("test-dup-{}", uuid::Uuid::new_v4().simple());
    let b = RedisBackend::connect(REDIS, worker, vec![q.jobs.clone()])
        .await
        .unwrap();
    let job = br#"{"id":"twice","input":{}}"#;
    b.enqueue(&q, job).await.unwrap();
    b.enqueue(&q, job).await.unwrap();
    let got = b.claim(&q, 1, LEASE, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1);
    // The copy, claimed with a short lease: it waits that long in the delayed set.
    let short = Duration::from_millis(300);
    assert!(b
        .claim(&q, 1, short, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.delayed), (0, 1, 1), "{d:?}");
    // Due while the first is still held: it waits again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    b.recover(&q).await.unwrap();
    assert!(b
        .claim(&q, 1, short, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(b.depth(&q).await.unwrap().delayed, 1, "waiting again");
    let publish = |r: &str| Finish::Publish {
        result: r.as_bytes().to_vec(),
        dead_letter: None,
    };
    assert_eq!(
        b.finish(&q, &got[0], publish("1")).await.unwrap(),
        Fenced::Done
    );
    // Due again: the copy runs now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    b.recover(&q).await.unwrap();
    let second = b.claim(&q, 2, LEASE, Duration::ZERO).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].job_id, "twice");
    assert_eq!(second[0].payload, job.to_vec(), "the copy's bytes are kept");
    assert_eq!(
        b.finish(&q, &second[0], publish("2")).await.unwrap(),
        Fenced::Done
    );
    assert_eq!(
        b.results(&q, 10, false).await.unwrap(),
        vec![b"1".to_vec(), b"2".to_vec()]
    );
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.ready, d.claimed, d.delayed), (0, 0, 0), "{d:?}");
    b.deregister(&q).await.unwrap();
    cleanup_redis(&q).await;
}

/// Embedded: a job's row goes when it ends, and a re-sent id comes back as a new row. Its
/// claim must still get an epoch the earlier row's holder never had: `save_step` fences on
/// the id and the epoch, and a stalled task of the same process would write into the new run.
#[tokio::test]
async fn embedded_a_re_sent_id_never_gets_an_old_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let q = names();
    let b = EmbeddedBackend::open(&dir.path().join("q.db"), "w1".into())
        .unwrap()
        .with_envelope_queues([q.jobs.clone()].into_iter().collect());
    let job = br#"{"id":"again","input":{}}"#;
    b.enqueue(&q, job).await.unwrap();
    let first = claim_all(&b, &q, 1).await.remove(0);
    let publish = Finish::Publish {
        result: b"1".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(&q, &first, publish).await.unwrap(), Fenced::Done);
    b.enqueue(&q, job).await.unwrap();
    let second = claim_all(&b, &q, 1).await.remove(0);
    assert_eq!(second.job_id, "again");
    assert!(
        second.epoch > first.epoch,
        "{} then {}",
        first.epoch,
        second.epoch
    );
    assert_eq!(
        b.save_step(&q, &first, step(0, b"stale", b"c"))
            .await
            .unwrap(),
        Fenced::Lost,
        "the earlier holder is fenced off"
    );
    assert_eq!(
        b.save_step(&q, &second, step(0, b"r0", b"c0"))
            .await
            .unwrap(),
        Fenced::Done
    );
}

/// A copy of a paused job (a producer sent its id again) is claimed and dead-lettered: the
/// paused run (its checkpoint and journal) and its pending record stay for the human.
async fn a_copy_of_a_paused_job_leaves_its_run(b: &dyn Durable, q: &QueueNames) {
    let job = br#"{"id":"paused-job","input":{}}"#;
    b.enqueue(q, job).await.unwrap();
    let first = claim_all(b, q, 1).await.remove(0);
    assert_eq!(
        b.save_step(q, &first, step(0, b"r0", b"c0")).await.unwrap(),
        Fenced::Done
    );
    let pause = Finish::Pause {
        result: b"awaiting".to_vec(),
        pending: br#"{"job_id":"paused-job","step":1}"#.to_vec(),
    };
    assert_eq!(b.finish(q, &first, pause).await.unwrap(), Fenced::Done);
    b.enqueue(q, job).await.unwrap();
    let copy = claim_all(b, q, 1).await.remove(0);
    assert_eq!(copy.job_id, "paused-job");
    let dead = Finish::DeadLetter(lar_worker::queue::DeadLetter {
        job_id: copy.job_id.clone(),
        reason: "a copy".into(),
        attempts: Vec::new(),
        keep_run: false,
    });
    assert_eq!(b.finish(q, &copy, dead).await.unwrap(), Fenced::Done);
    let run = b
        .load_run(q, "paused-job")
        .await
        .unwrap()
        .expect("the paused run is kept");
    assert_eq!(run.journal, vec![b"r0".to_vec()]);
    assert_eq!(run.checkpoint, b"c0");
    assert_eq!(
        b.list_pending(q).await.unwrap().len(),
        1,
        "still waiting for a human"
    );
}

/// A job dead-lettered because infrastructure gave out (its attempts spent on a failing store
/// or audit disk, `keep_run`) keeps its checkpoint and journal: a redrive resumes after its
/// last finished step instead of running the finished ones again. Its normal end forgets them.
async fn a_dead_letter_after_infrastructure_failures_keeps_its_run(
    b: &dyn Durable,
    q: &QueueNames,
    payload: &[u8],
) {
    b.enqueue(q, payload).await.unwrap();
    let c = claim_all(b, q, 1).await.remove(0);
    let id = c.job_id.clone();
    assert_eq!(
        b.save_step(q, &c, step(0, b"r0", b"c0")).await.unwrap(),
        Fenced::Done
    );
    let dead = Finish::DeadLetter(lar_worker::queue::DeadLetter {
        job_id: id.clone(),
        reason: "gave up after 3 attempts: the audit disk is full".into(),
        attempts: Vec::new(),
        keep_run: true,
    });
    assert_eq!(b.finish(q, &c, dead).await.unwrap(), Fenced::Done);
    assert_eq!(b.depth(q).await.unwrap().dead, 1);
    let kept = b.load_run(q, &id).await.unwrap().expect("the run is kept");
    assert_eq!(kept.journal, vec![b"r0".to_vec()]);
    assert!(b.redrive_dead_letter(q, &id).await.unwrap());
    let again = claim_all(b, q, 1).await.remove(0);
    assert_eq!(again.job_id, id, "the redriven job keeps its id");
    assert_eq!(again.payload, payload, "and its bytes");
    assert!(
        b.load_run(q, &id).await.unwrap().is_some(),
        "the redriven job can resume"
    );
    let publish = Finish::Publish {
        result: b"done".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &again, publish).await.unwrap(), Fenced::Done);
    assert!(b.load_run(q, &id).await.unwrap().is_none());
}

/// Pauses the claimed job `c` at `halt`, submits a decision for that halt, and claims the job
/// again: the returned claim carries the decision.
async fn decided_and_claimed(
    b: &dyn Durable,
    q: &QueueNames,
    c: &Claim,
    halt: u64,
    decision: &lar_worker::exec::Decision,
) -> Claim {
    let record = waiting(&c.job_id, &c.payload, halt);
    let pause = Finish::Pause {
        result: b"awaiting".to_vec(),
        pending: serde_json::to_vec(&record).unwrap(),
    };
    assert_eq!(b.finish(q, c, pause).await.unwrap(), Fenced::Done);
    assert!(b.submit_decision(q, &record, decision).await.unwrap());
    let carrying = claim_all(b, q, 1).await.remove(0);
    assert_eq!(
        carrying.decision.as_ref().map(|d| d.choice.as_str()),
        Some(decision.choice.as_str())
    );
    carrying
}

/// Dead-letters `claim` (keeping its run or not), redrives it and claims it back.
async fn dead_and_redriven(
    b: &dyn Durable,
    q: &QueueNames,
    claim: &Claim,
    keep_run: bool,
) -> Claim {
    let dead = Finish::DeadLetter(lar_worker::queue::DeadLetter {
        job_id: claim.job_id.clone(),
        reason: "gave up after 3 attempts: the checkpoint store is down".into(),
        attempts: Vec::new(),
        keep_run,
    });
    assert_eq!(b.finish(q, claim, dead).await.unwrap(), Fenced::Done);
    assert!(b.redrive_dead_letter(q, &claim.job_id).await.unwrap());
    let again = claim_all(b, q, 1).await.remove(0);
    assert_eq!(again.job_id, claim.job_id, "the redriven job keeps its id");
    again
}

/// A redriven job that must start over: no decision comes back with it; it then completes.
async fn starts_over_without_a_decision(b: &dyn Durable, q: &QueueNames, fresh: &Claim) {
    assert!(fresh.decision.is_none(), "{:?}", fresh.decision);
    let publish = Finish::Publish {
        result: b"done".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, fresh, publish).await.unwrap(), Fenced::Done);
}

/// A job dead-lettered while it carried a human's decision, its run kept (the store gave out
/// while applying it), carries the decision again after a redrive: the human is not asked
/// twice. A dead letter that does not keep its run (it starts over) keeps no decision.
async fn a_redriven_decision_keeps_its_decision(b: &dyn Durable, q: &QueueNames) {
    b.enqueue(q, br#"{"x":1}"#).await.unwrap();
    let c = claim_all(b, q, 1).await.remove(0);
    assert_eq!(
        b.save_step(q, &c, step(0, b"r0", b"c0")).await.unwrap(),
        Fenced::Done
    );
    let decision = lar_worker::exec::Decision {
        rationale: "within limits".into(),
        role: Some("CFO".into()),
        signature: Some("ab".repeat(32)),
        ..approval("cfo@example.com", 1)
    };
    let carrying = decided_and_claimed(b, q, &c, 1, &decision).await;
    let again = dead_and_redriven(b, q, &carrying, true).await;
    let kept = again
        .decision
        .clone()
        .expect("the redrive carries the decision");
    assert_eq!(
        (
            kept.choice.as_str(),
            kept.decided_by.as_str(),
            kept.step,
            kept.signature.clone()
        ),
        (
            "approve",
            "cfo@example.com",
            Some(1),
            decision.signature.clone()
        ),
        "the same decision, signature and all"
    );
    assert!(
        b.load_run(q, &c.job_id).await.unwrap().is_some(),
        "and the run it resumes"
    );

    // Dead again, this time starting over: the redrive carries no decision.
    let fresh = dead_and_redriven(b, q, &again, false).await;
    starts_over_without_a_decision(b, q, &fresh).await;
}

/// A dead letter that kept a decision but whose job has no run to resume (the decision came
/// for a job whose run was gone) goes back without it: the job starts over instead of being
/// refused again at every redrive.
async fn a_redrive_without_a_run_drops_the_decision(b: &dyn Durable, q: &QueueNames) {
    b.enqueue(q, br#"{"x":2}"#).await.unwrap();
    let c = claim_all(b, q, 1).await.remove(0);
    let decision = approval("cfo@example.com", 0);
    let carrying = decided_and_claimed(b, q, &c, 0, &decision).await;
    assert!(
        b.load_run(q, &c.job_id).await.unwrap().is_none(),
        "no step was ever saved"
    );
    let fresh = dead_and_redriven(b, q, &carrying, true).await;
    starts_over_without_a_decision(b, q, &fresh).await;
}

/// A decision is validated against the pending record read first (the halt at step 1 here).
/// When the job has since been decided, resumed and halted again, the decision read for the
/// earlier halt takes nothing: the later pause stays pending, for its own decision.
async fn a_decision_for_an_earlier_halt_takes_nothing(b: &dyn Durable, q: &QueueNames) {
    b.enqueue(q, br#"{"x":1}"#).await.unwrap();
    let c = claim_all(b, q, 1).await.remove(0);
    for i in 0..3 {
        assert_eq!(
            b.save_step(q, &c, step(i, b"r", b"c")).await.unwrap(),
            Fenced::Done
        );
    }
    let pending = serde_json::json!({"job_id": c.job_id, "step": 3}).to_string();
    let pause = Finish::Pause {
        result: b"{}".to_vec(),
        pending: pending.into_bytes(),
    };
    assert_eq!(b.finish(q, &c, pause).await.unwrap(), Fenced::Done);
    let decision = |step| approval("a@x", step);
    assert!(!b
        .submit_decision(q, &waiting(&c.job_id, &c.payload, 1), &decision(1))
        .await
        .unwrap());
    assert_eq!(b.list_pending(q).await.unwrap().len(), 1, "still pending");
    assert!(b
        .claim(q, 1, LEASE, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert!(b
        .submit_decision(q, &waiting(&c.job_id, &c.payload, 3), &decision(3))
        .await
        .unwrap());
    assert!(b.list_pending(q).await.unwrap().is_empty());
    let resumed = claim_all(b, q, 1).await.remove(0);
    assert_eq!(resumed.decision.as_ref().map(|d| d.step), Some(Some(3)));
    let done = Finish::Publish {
        result: b"{}".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &resumed, done).await.unwrap(), Fenced::Done);
}

/// A producer re-sends a paused job's id; while that copy runs (and pauses again at the same
/// halt), a human decides. The copy's pause re-creates the pending record; the resumed run
/// then ends and publishes. That stale record must go with the run: otherwise a second
/// decision (or its expiry) would resume the ended run and publish a second result.
async fn a_stale_pause_from_a_copy_goes_with_the_run(b: &dyn Durable, q: &QueueNames) {
    let job = br#"{"id":"copied-job","input":{}}"#;
    let pending = br#"{"job_id":"copied-job","step":1}"#.to_vec();
    b.enqueue(q, job).await.unwrap();
    let first = claim_all(b, q, 1).await.remove(0);
    assert_eq!(
        b.save_step(q, &first, step(0, b"r0", b"c0")).await.unwrap(),
        Fenced::Done
    );
    let pause = |pending: &Vec<u8>| Finish::Pause {
        result: b"awaiting".to_vec(),
        pending: pending.clone(),
    };
    assert_eq!(
        b.finish(q, &first, pause(&pending)).await.unwrap(),
        Fenced::Done
    );
    b.enqueue(q, job).await.unwrap();
    let copy = claim_all(b, q, 1).await.remove(0);
    let decision = approval("a@x", 1);
    // Redis takes the decision now; the embedded file (unique job ids) refuses it while the
    // copy holds the id, with a reason, and takes it once the copy is done.
    let taken_now = match b
        .submit_decision(q, &waiting("copied-job", job, 1), &decision)
        .await
    {
        Ok(taken) => {
            assert!(taken, "the job is pending");
            true
        }
        Err(e) => {
            assert!(
                e.to_string()
                    .contains("decide again once that copy is done"),
                "{e}"
            );
            false
        }
    };
    assert_eq!(
        b.finish(q, &copy, pause(&pending)).await.unwrap(),
        Fenced::Done
    );
    if !taken_now {
        assert!(b
            .submit_decision(q, &waiting("copied-job", job, 1), &decision)
            .await
            .unwrap());
    }
    let resumed = claim_all(b, q, 1).await.remove(0);
    assert!(resumed.decision.is_some());
    for i in 1..3 {
        assert_eq!(
            b.save_step(q, &resumed, step(i, b"r", b"c")).await.unwrap(),
            Fenced::Done
        );
    }
    let done = Finish::Publish {
        result: b"final".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &resumed, done).await.unwrap(), Fenced::Done);
    assert!(
        b.get_pending(q, "copied-job").await.unwrap().is_none(),
        "a stale pending record is left"
    );
    assert!(b.load_run(q, "copied-job").await.unwrap().is_none());
}

/// The same dead letter on an envelope queue, where the job names its id.
async fn a_dead_letter_keeps_its_run_on_an_envelope_queue(b: &dyn Durable, q: &QueueNames) {
    let envelope = br#"{"id":"stuck","input":{}}"#;
    a_dead_letter_after_infrastructure_failures_keeps_its_run(b, q, envelope).await;
}

/// The same on a `state` queue, where the id is given at the first claim: the redrive keeps it.
async fn a_redriven_state_job_keeps_its_id_and_run(b: &dyn Durable, q: &QueueNames) {
    a_dead_letter_after_infrastructure_failures_keeps_its_run(b, q, br#"{"x":1}"#).await;
}

/// A Redis backend for `q` (its messages envelopes or not), under a worker id of its own.
async fn redis_for(q: &QueueNames, envelope: bool) -> RedisBackend {
    let worker = format!("test-{}", uuid::Uuid::new_v4().simple());
    let envelopes = if envelope {
        vec![q.jobs.clone()]
    } else {
        Vec::new()
    };
    RedisBackend::connect(REDIS, worker, envelopes)
        .await
        .expect("Redis on 127.0.0.1:6379")
}

/// An embedded backend for `q` in a file under `dir`.
fn embedded_for(dir: &std::path::Path, q: &QueueNames, envelope: bool) -> EmbeddedBackend {
    let b = EmbeddedBackend::open(&dir.join("q.db"), "w1".into()).unwrap();
    if envelope {
        b.with_envelope_queues([q.jobs.clone()].into_iter().collect())
    } else {
        b
    }
}

/// Runs each scenario against the real Redis and an embedded file.
macro_rules! on_both_backends {
    ($($scenario:ident: envelope = $envelope:expr),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn redis() {
                let q = super::names();
                let b = super::redis_for(&q, $envelope).await;
                super::$scenario(&b, &q).await;
                lar_worker::queue::Consumer::deregister(&b, &q).await.unwrap();
                super::cleanup_redis(&q).await;
            }

            #[tokio::test]
            async fn embedded() {
                let dir = tempfile::tempdir().unwrap();
                let q = super::names();
                let b = super::embedded_for(dir.path(), &q, $envelope);
                super::$scenario(&b, &q).await;
            }
        }
    )*};
}

on_both_backends!(
    save_step_contract: envelope = false,
    a_zombie_stays_fenced_across_a_pause: envelope = false,
    a_copy_of_a_paused_job_leaves_its_run: envelope = true,
    a_dead_letter_keeps_its_run_on_an_envelope_queue: envelope = true,
    a_redriven_state_job_keeps_its_id_and_run: envelope = false,
    a_decision_for_an_earlier_halt_takes_nothing: envelope = false,
    a_redriven_decision_keeps_its_decision: envelope = false,
    a_redrive_without_a_run_drops_the_decision: envelope = false,
    a_stale_pause_from_a_copy_goes_with_the_run: envelope = true,
);
