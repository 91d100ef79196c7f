//! The run-store contract (`lar_worker::queue::run_store`), written once and run against both
//! stores the amqp backend can use: the real Redis on 127.0.0.1:6379 and a SQLite file. Epoch
//! fencing, idempotent step saves, the pause, the pending → deciding move, and the sweep of
//! decisions a crash kept from the broker.

mod common;

use lar_worker::queue::run_store::{open, Paused, RunStore};
use lar_worker::queue::{Claim, ClaimHandle, Fenced, QueueNames, StepWrite};
use std::time::Duration;

const REDIS: &str = "redis://127.0.0.1:6379/0";

fn names() -> QueueNames {
    let id = uuid::Uuid::new_v4().simple().to_string();
    QueueNames {
        jobs: format!("test:runstore:{id}"),
        results: format!("test:runstore:{id}:results"),
    }
}

fn claim(job_id: &str, epoch: u64) -> Claim {
    Claim {
        job_id: job_id.to_string(),
        payload: br#"{"x":1}"#.to_vec(),
        attempt: 1,
        epoch,
        history: Vec::new(),
        decision: None,
        fresh: false,
        recoveries: 0,
        handle: ClaimHandle::default(),
    }
}

fn step<'a>(index: u64, record: &'a [u8], checkpoint: &'a [u8]) -> StepWrite<'a> {
    StepWrite {
        index,
        record,
        checkpoint,
    }
}

/// A pending record as the worker writes it: what `stale_decisions` reads is `step`.
fn pending(job: &str, step: u64) -> Vec<u8> {
    serde_json::json!({"job_id": job, "step": step, "payload": "{\"x\":1}"})
        .to_string()
        .into_bytes()
}

async fn contract(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let job = "job-1";

    // Epochs grow per delivery; only the newest may write.
    let e1 = store.next_epoch(&q, job).await.unwrap();
    let e2 = store.next_epoch(&q, job).await.unwrap();
    assert_eq!(e2, e1 + 1);
    let (old, cur) = (claim(job, e1), claim(job, e2));
    assert_eq!(
        store
            .save_step(&q, &old, step(0, b"r0", b"c0"))
            .await
            .unwrap(),
        Fenced::Lost,
        "an older epoch is fenced off"
    );
    assert!(store.load_run(&q, job).await.unwrap().is_none());

    // Saves are idempotent per index; a gap is refused.
    for (i, (r, c)) in [("r0", "c0"), ("r0", "c0'"), ("r1", "c1")]
        .iter()
        .enumerate()
    {
        let index = if i < 2 { 0 } else { 1 };
        assert_eq!(
            store
                .save_step(&q, &cur, step(index, r.as_bytes(), c.as_bytes()))
                .await
                .unwrap(),
            Fenced::Done
        );
    }
    assert!(store
        .save_step(&q, &cur, step(5, b"r5", b"c5"))
        .await
        .is_err());
    let run = store.load_run(&q, job).await.unwrap().unwrap();
    assert_eq!(run.journal, vec![b"r0".to_vec(), b"r1".to_vec()]);
    assert_eq!(run.checkpoint, b"c1");

    // The pause is fenced too.
    assert_eq!(
        store
            .pause(&q, &old, &pending(job, 2), "{}", false)
            .await
            .unwrap(),
        Paused::Fenced
    );
    let props = r#"{"reply_to":"caller","correlation_id":"c-9"}"#;
    assert_eq!(
        store
            .pause(&q, &cur, &pending(job, 2), props, false)
            .await
            .unwrap(),
        Paused::Stored
    );
    assert_eq!(store.list_pending(&q).await.unwrap().len(), 1);
    assert!(store.get_pending(&q, job).await.unwrap().is_some());

    // A copy of the paused job (its id sent again) that ends leaves the paused run alone.
    let e_copy = store.next_epoch(&q, job).await.unwrap();
    assert!(store.end_run(&q, &claim(job, e_copy)).await.unwrap());
    let kept = store
        .load_run(&q, job)
        .await
        .unwrap()
        .expect("the paused run is kept");
    assert_eq!(kept.journal, vec![b"r0".to_vec(), b"r1".to_vec()]);

    // A decision moves the job from pending to deciding, once.
    let d = r#"{"choice":"approve","rationale":"ok","decided_by":"a@b"}"#;
    // A decision read for an earlier halt of the job takes nothing: this pause waits at step 2.
    assert!(store.decide(&q, job, Some(1), d).await.unwrap().is_none());
    assert!(store.get_pending(&q, job).await.unwrap().is_some());
    let entry = store
        .decide(&q, job, Some(2), d)
        .await
        .unwrap()
        .expect("pending");
    assert_eq!(entry.decision, d);
    assert_eq!(entry.pending.as_bytes(), pending(job, 2).as_slice());
    let carried: serde_json::Value = serde_json::from_str(&entry.props).unwrap();
    assert_eq!(carried["reply_to"], "caller");
    assert!(store.decide(&q, job, Some(2), d).await.unwrap().is_none());
    assert!(store.get_pending(&q, job).await.unwrap().is_none());
    assert!(store
        .decide(&q, "no-such-job", None, d)
        .await
        .unwrap()
        .is_none());

    // A copy of the job that halts again while the decision is on its way pauses nothing.
    let e3 = store.next_epoch(&q, job).await.unwrap();
    let copy = claim(job, e3);
    assert_eq!(
        store
            .pause(&q, &copy, &pending(job, 2), "{}", false)
            .await
            .unwrap(),
        Paused::AlreadyDecided
    );
    assert!(store.list_pending(&q).await.unwrap().is_empty());

    // Not stale yet; then stale and not applied: handed back (and stamped anew).
    assert!(store
        .stale_decisions(&q, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stale = store
        .stale_decisions(&q, Duration::from_millis(5))
        .await
        .unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].0, job);
    assert_eq!(stale[0].1.decision, d);
    assert!(
        store
            .stale_decisions(&q, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "stamped anew, so not handed out twice"
    );

    // Once the decision step (index 2) is journaled the entry is dropped.
    assert_eq!(
        store
            .save_step(&q, &copy, step(2, b"r2", b"c2"))
            .await
            .unwrap(),
        Fenced::Done
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store
        .stale_decisions(&q, Duration::from_millis(5))
        .await
        .unwrap()
        .is_empty());

    // Ending a run is fenced; it forgets everything of the job.
    assert!(!store.end_run(&q, &cur).await.unwrap());
    assert!(store.end_run(&q, &copy).await.unwrap());
    assert!(store.load_run(&q, job).await.unwrap().is_none());
    assert!(store.decide(&q, job, Some(2), d).await.unwrap().is_none());

    // An epoch never comes again, not even after the job's run (and its entry) was forgotten:
    // a holder cut off at an old epoch stays fenced off from the job's next delivery.
    let e4 = store.next_epoch(&q, job).await.unwrap();
    assert!(e4 > e3 && e4 != e1, "{e1} {e2} {e3} {e4}");
    let zombie = claim(job, e1);
    assert_eq!(
        store
            .save_step(&q, &zombie, step(0, b"z0", b"z"))
            .await
            .unwrap(),
        Fenced::Lost
    );
    assert!(!store.end_run(&q, &zombie).await.unwrap());
    assert!(store.end_run(&q, &claim(job, e4)).await.unwrap());
    q
}

/// A job claimed, its step 0 saved, paused at step 1 (the halt a decision answers).
async fn paused_at_step_1(store: &dyn RunStore, q: &QueueNames, job: &str) {
    let first = claim(job, store.next_epoch(q, job).await.unwrap());
    let saved = store.save_step(q, &first, step(0, b"r0", b"c0")).await;
    assert_eq!(saved.unwrap(), Fenced::Done);
    let paused = store.pause(q, &first, &pending(job, 1), "{}", false).await;
    assert_eq!(paused.unwrap(), Paused::Stored);
}

/// [`paused_at_step_1`], then decided, the broker holding the resume message (confirmed).
async fn decided_at_step_1(store: &dyn RunStore, q: &QueueNames, job: &str) {
    paused_at_step_1(store, q, job).await;
    assert!(store.decide(q, job, Some(1), "{}").await.unwrap().is_some());
    store.decided(q, job, 1).await.unwrap();
}

/// A decision's `deciding` entry waits for the broker's confirm of its resume message; the
/// resumed run can be faster and halt at a later jury first. That later pause must stand (the
/// entry answered an earlier halt, so it was applied), and the late confirm must not remove
/// the entry of the later halt's decision.
async fn a_later_pause_outlives_an_applied_decision(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let job = "job-2";
    paused_at_step_1(store, &q, job).await;
    let d = r#"{"choice":"approve"}"#;
    assert!(store.decide(&q, job, Some(1), d).await.unwrap().is_some());
    // The resume message is delivered before the confirm reaches the submitter.
    let resumed = claim(job, store.next_epoch(&q, job).await.unwrap());
    for i in 1..3 {
        assert_eq!(
            store
                .save_step(&q, &resumed, step(i, b"r", b"c"))
                .await
                .unwrap(),
            Fenced::Done
        );
    }
    assert_eq!(
        store
            .pause(&q, &resumed, &pending(job, 3), "{}", false)
            .await
            .unwrap(),
        Paused::Stored,
        "the halt at step 3 is not the one decided"
    );
    assert!(store.get_pending(&q, job).await.unwrap().is_some());
    // The later halt is decided; the first decision's confirm arrives late.
    assert!(store.decide(&q, job, Some(3), d).await.unwrap().is_some());
    store.decided(&q, job, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stale = store
        .stale_decisions(&q, Duration::from_millis(5))
        .await
        .unwrap();
    assert_eq!(stale.len(), 1, "the later decision's entry is kept");
    store.decided(&q, job, 3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store
        .stale_decisions(&q, Duration::from_millis(5))
        .await
        .unwrap()
        .is_empty());
    q
}

/// A copy of a paused job (its id sent again) pauses again at the same halt after the
/// decision went out (confirmed by the broker): it asks nobody, and the resumed run's end
/// takes the decision's entry with it.
async fn a_stale_pause_goes_with_the_run(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let job = "job-3";
    decided_at_step_1(store, &q, job).await;
    // The confirmed decision is still on its way: the copy asks nobody.
    let copy = claim(job, store.next_epoch(&q, job).await.unwrap());
    assert_eq!(
        store
            .pause(&q, &copy, &pending(job, 1), "{}", false)
            .await
            .unwrap(),
        Paused::AlreadyDecided
    );
    assert!(store.get_pending(&q, job).await.unwrap().is_none());
    assert!(
        store
            .stale_decisions(&q, Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "a confirmed decision is not published again"
    );
    let resumed = claim(job, store.next_epoch(&q, job).await.unwrap());
    for i in 1..3 {
        assert_eq!(
            store
                .save_step(&q, &resumed, step(i, b"r", b"c"))
                .await
                .unwrap(),
            Fenced::Done
        );
    }
    assert!(store.end_run(&q, &resumed).await.unwrap());
    assert!(store.get_pending(&q, job).await.unwrap().is_none());
    assert!(store.load_run(&q, job).await.unwrap().is_none());
    q
}

/// A dead letter that keeps its run (for a redrive) releases only the job's epoch: the run
/// stays, the released holder is fenced off, the next delivery resumes with a new epoch.
async fn release_keeps_the_run(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let job = "job-4";
    let held = claim(job, store.next_epoch(&q, job).await.unwrap());
    assert_eq!(
        store
            .save_step(&q, &held, step(0, b"r0", b"c0"))
            .await
            .unwrap(),
        Fenced::Done
    );
    assert!(store.release(&q, &held).await.unwrap());
    assert!(!store.release(&q, &held).await.unwrap(), "released once");
    assert!(store.load_run(&q, job).await.unwrap().is_some());
    assert_eq!(
        store
            .save_step(&q, &held, step(1, b"r1", b"c1"))
            .await
            .unwrap(),
        Fenced::Lost
    );
    let next = claim(job, store.next_epoch(&q, job).await.unwrap());
    assert_eq!(
        store
            .save_step(&q, &next, step(1, b"r1", b"c1"))
            .await
            .unwrap(),
        Fenced::Done
    );
    assert!(store.end_run(&q, &next).await.unwrap());
    q
}

/// The decision's own claim pausing at its halt did not apply it (an unsigned one, say): its
/// pause stands. A decision whose message ends without applying it is dropped.
async fn an_unapplied_decision_neither_blocks_nor_lingers(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let job = "job-5";
    decided_at_step_1(store, &q, job).await;
    let carrier = claim(job, store.next_epoch(&q, job).await.unwrap());
    let again = store
        .pause(&q, &carrier, &pending(job, 1), "{}", true)
        .await
        .unwrap();
    assert_eq!(again, Paused::Stored, "the carrier's pause stands");
    assert!(store.get_pending(&q, job).await.unwrap().is_some());
    assert!(store
        .decide(&q, job, Some(1), "{}")
        .await
        .unwrap()
        .is_some());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiting = store.stale_decisions(&q, Duration::ZERO).await.unwrap();
    assert_eq!(waiting.len(), 1, "not confirmed yet: published again");
    store.drop_decision(&q, job, Some(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        store
            .stale_decisions(&q, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        1,
        "another halt's drop leaves it"
    );
    store.drop_decision(&q, job, Some(1)).await.unwrap();
    assert!(store
        .stale_decisions(&q, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    q
}

/// A finished run is retired before its delivery's ack, so a crash before `end_run` leaves no
/// run for ever: it goes by itself after its time (Redis expires it; the SQLite store's sweep
/// forgets it), not before. A redelivery takes it back, and a paused run is never retired.
async fn a_retired_run_goes_unless_taken_back(store: &dyn RunStore) -> QueueNames {
    let q = names();
    let saved = |c: &Claim| {
        let c = c.clone();
        let q = q.clone();
        async move {
            store
                .save_step(&q, &c, step(0, b"r0", b"c0"))
                .await
                .unwrap()
        }
    };
    // Long enough that a stalled machine does not expire a run before its check.
    let keep = Duration::from_secs(2);

    // Retired, then the crash: the run goes once its time is up.
    let gone = claim("job-r1", store.next_epoch(&q, "job-r1").await.unwrap());
    assert_eq!(saved(&gone).await, Fenced::Done);
    assert!(store.retire(&q, &gone, keep).await.unwrap());

    // Retired for longer: still there after the others went.
    let later = claim("job-r0", store.next_epoch(&q, "job-r0").await.unwrap());
    assert_eq!(saved(&later).await, Fenced::Done);
    assert!(store
        .retire(&q, &later, Duration::from_secs(600))
        .await
        .unwrap());

    // Retired, then the delivery came back: the new holder keeps it.
    let back = claim("job-r2", store.next_epoch(&q, "job-r2").await.unwrap());
    assert_eq!(saved(&back).await, Fenced::Done);
    assert!(store.retire(&q, &back, keep).await.unwrap());
    let again = claim("job-r2", store.next_epoch(&q, "job-r2").await.unwrap());
    assert!(!store.retire(&q, &back, keep).await.unwrap(), "fenced off");

    // Paused (waiting for a human): never retired.
    paused_at_step_1(store, &q, "job-r3").await;
    let copy = claim("job-r3", store.next_epoch(&q, "job-r3").await.unwrap());
    assert!(store.retire(&q, &copy, keep).await.unwrap());

    tokio::time::sleep(keep + Duration::from_millis(500)).await;
    let swept = store.sweep_retired(&q).await.unwrap();
    assert!(swept <= 1, "only the retired one: {swept}");
    assert!(
        store.load_run(&q, "job-r1").await.unwrap().is_none(),
        "gone"
    );
    assert!(
        store.load_run(&q, "job-r0").await.unwrap().is_some(),
        "not yet"
    );
    assert!(
        store.load_run(&q, "job-r2").await.unwrap().is_some(),
        "taken back"
    );
    assert!(
        store.load_run(&q, "job-r3").await.unwrap().is_some(),
        "still paused"
    );
    assert!(store.get_pending(&q, "job-r3").await.unwrap().is_some());
    assert!(store.end_run(&q, &again).await.unwrap());
    q
}

/// Runs each scenario against both stores: the real Redis and a SQLite file in a temp dir.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use lar_worker::queue::run_store::open;

            #[tokio::test]
            async fn redis() {
                let store = open(super::REDIS).await.unwrap();
                let q = super::$scenario(store.as_ref()).await;
                super::common::delete_redis_keys(super::REDIS, &q.jobs).await;
            }

            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let spec = format!("sqlite:{}", dir.path().join("runs.db").display());
                let store = open(&spec).await.unwrap();
                super::$scenario(store.as_ref()).await;
            }
        }
    )*};
}

on_both_stores!(
    contract,
    a_later_pause_outlives_an_applied_decision,
    a_stale_pause_goes_with_the_run,
    release_keeps_the_run,
    an_unapplied_decision_neither_blocks_nor_lingers,
    a_retired_run_goes_unless_taken_back,
);

#[tokio::test]
async fn an_unknown_store_is_refused_without_its_password() {
    let err = match open("postgres://user:hunter2@db/x").await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(err.contains("redis:// URL or sqlite:<path>"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

/// Replicas of one host starting together open the same SQLite store at once: each open
/// succeeds, on a new file and on a file from before the `retire_at` column (which one of them
/// adds).
#[test]
fn replicas_opening_one_sqlite_store_at_once_all_start() {
    for old in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.db");
        if old {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE runs (queue TEXT NOT NULL, job_id TEXT NOT NULL,
                 checkpoint BLOB NOT NULL, PRIMARY KEY (queue, job_id));",
            )
            .unwrap();
        }
        let spec = format!("sqlite:{}", path.display());
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let (spec, start) = (spec.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    start.wait();
                    rt.block_on(open(&spec))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for o in opens {
            assert_eq!(o.join().unwrap(), Ok(()), "old file: {old}");
        }
        let c = rusqlite::Connection::open(&path).unwrap();
        let has: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('runs') WHERE name = 'retire_at'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(has, 1, "old file: {old}");
    }
}
