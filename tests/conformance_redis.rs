//! The backend conformance suite against Redis (the server at `LAR_TEST_REDIS_URL`, default
//! redis://127.0.0.1:6379/0), plus the Redis-only interop case with the seed's Python producer.

mod common;
#[macro_use]
mod conformance;

conformance_suite!(conformance::Kind::Redis);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_python_interop() {
    conformance::scenarios::seed_python_interop(conformance::Kind::Redis).await
}

/// A BLMOVE that moved a message into the worker's processing list, then lost its connection
/// before ADOPT ran, must not strand the message there while the worker lives: the next
/// `recover` (every reaper tick) hands it back, and the job is claimed and worked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_moved_but_never_adopted_goes_back_to_the_queue() {
    use lar_worker::queue::prelude::*;
    use lar_worker::queue::redis::RedisBackend;
    use lar_worker::queue::QueueNames;
    use std::time::Duration;

    let jobs = format!("lar-test-adopt-{}", uuid::Uuid::new_v4());
    let names = QueueNames {
        jobs: jobs.clone(),
        results: format!("{jobs}:results"),
    };
    let backend = RedisBackend::connect(&conformance::redis_url(), "w-adopt".into(), vec![])
        .await
        .unwrap();
    let client = redis::Client::open(conformance::redis_url()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let processing = format!("{jobs}:processing:w-adopt");
    let raw = br#"{"ticket":"stranded"}"#.to_vec();
    // A wrapped message (a retry, a hand-back, a decided job) left behind the same way.
    let wrapped_raw = br#"{"ticket":"stranded-retry"}"#.to_vec();
    let wrapped = lar_worker::queue::wrapper::Wrapped {
        lar_worker: 1,
        id: "retry/7".into(),
        attempt: 1,
        history: Vec::new(),
        raw: String::from_utf8(wrapped_raw.clone()).unwrap(),
        decision: None,
    }
    .encode();
    // What the BLMOVE left behind, next to a message this worker really holds.
    let _: () = redis::AsyncCommands::rpush(&mut r, &jobs, b"{\"ticket\":\"held\"}".to_vec())
        .await
        .unwrap();
    let held = backend
        .claim(&names, 1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let _: () = redis::AsyncCommands::lpush(&mut r, &processing, raw.clone())
        .await
        .unwrap();
    let _: () = redis::AsyncCommands::lpush(&mut r, &processing, wrapped)
        .await
        .unwrap();

    let moved = backend.recover(&names).await.unwrap();
    assert_eq!(moved, 2, "the raw and the unheld wrapped message go back");
    let left: Vec<Vec<u8>> = redis::AsyncCommands::lrange(&mut r, &processing, 0, -1)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "the held claim stays where it is");
    assert_ne!(left[0], raw);

    let again = backend
        .claim(&names, 5, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    let retried = again
        .iter()
        .find(|c| c.job_id == "retry/7")
        .expect("the wrapped one keeps its id");
    assert_eq!(retried.payload, wrapped_raw);
    assert!(again.iter().any(|c| c.payload == raw));

    common::delete_redis_keys(&conformance::redis_url(), &jobs).await;
}

/// A worker that stopped cleanly stays registered (without a heartbeat) until a reaper finds
/// its processing list empty: a message a BLMOVE still blocked in Redis landed there after the
/// worker stopped claiming goes back to the queue instead of sitting in a list nobody reaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_landing_after_a_clean_stop_is_reaped() {
    use lar_worker::queue::prelude::*;
    use lar_worker::queue::redis::RedisBackend;
    use lar_worker::queue::QueueNames;
    use std::time::Duration;

    let jobs = format!("lar-test-late-{}", uuid::Uuid::new_v4());
    let names = QueueNames {
        jobs: jobs.clone(),
        results: format!("{jobs}:results"),
    };
    let url = conformance::redis_url();
    let gone = RedisBackend::connect(&url, "w-gone".into(), vec![])
        .await
        .unwrap();
    gone.heartbeat(&names, Duration::from_secs(30))
        .await
        .unwrap();
    gone.deregister(&names).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let late = br#"{"ticket":"late"}"#.to_vec();
    let _: () =
        redis::AsyncCommands::lpush(&mut r, format!("{jobs}:processing:w-gone"), late.clone())
            .await
            .unwrap();
    let other = RedisBackend::connect(&url, "w-other".into(), vec![])
        .await
        .unwrap();
    assert_eq!(other.recover(&names).await.unwrap(), 1);
    let claimed = other
        .claim(&names, 5, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].payload, late);
    let workers: Vec<String> = redis::AsyncCommands::smembers(&mut r, format!("{jobs}:workers"))
        .await
        .unwrap();
    assert!(!workers.contains(&"w-gone".to_string()), "{workers:?}");

    common::delete_redis_keys(&conformance::redis_url(), &jobs).await;
}

/// A claim cut off at shutdown leaves its BLMOVE blocked inside Redis, where it can still move
/// a message into the stopped worker's list. Deregistration waits that BLMOVE out before the
/// heartbeat goes, so no reaper can drop the worker while its list may still fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blmove_cut_off_at_shutdown_strands_nothing() {
    use lar_worker::queue::prelude::*;
    use lar_worker::queue::redis::RedisBackend;
    use lar_worker::queue::QueueNames;
    use std::sync::Arc;
    use std::time::Duration;

    let jobs = format!("lar-test-blocked-{}", uuid::Uuid::new_v4());
    let names = QueueNames {
        jobs: jobs.clone(),
        results: format!("{jobs}:results"),
    };
    let url = conformance::redis_url();
    let gone = Arc::new(
        RedisBackend::connect(&url, "w-blocked".into(), vec![])
            .await
            .unwrap(),
    );
    gone.heartbeat(&names, Duration::from_secs(30))
        .await
        .unwrap();
    let waiting = {
        let (b, q) = (Arc::clone(&gone), names.clone());
        tokio::spawn(async move {
            b.claim(&q, 1, Duration::from_secs(30), Duration::from_secs(1))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    waiting.abort(); // the stop cut the claim off; its BLMOVE is still blocked in Redis
    gone.deregister(&names).await.unwrap();
    let other = RedisBackend::connect(&url, "w-other".into(), vec![])
        .await
        .unwrap();
    other.recover(&names).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let job = br#"{"ticket":"after-the-stop"}"#.to_vec();
    let _: () = redis::AsyncCommands::rpush(&mut r, &jobs, job.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    other.recover(&names).await.unwrap();
    let claimed = other
        .claim(&names, 5, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "the job is stranded in the stopped worker's list"
    );
    assert_eq!(claimed[0].payload, job);

    common::delete_redis_keys(&conformance::redis_url(), &jobs).await;
}

/// A claim blocked on one empty queue does not hold up a claim on another: each queue blocks
/// on its own connection. (With one BLMOVE connection for all, a job pushed to an idle worker
/// waited out its decisions queue's blocking claim: 0.5–1 s instead of 2 ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_blocked_on_one_queue_does_not_hold_up_another() {
    use lar_worker::queue::prelude::*;
    use lar_worker::queue::redis::RedisBackend;
    use lar_worker::queue::QueueNames;
    use std::time::{Duration, Instant};

    let prefix = format!("lar-test-lanes-{}", uuid::Uuid::new_v4());
    let names = |lane: &str| QueueNames {
        jobs: format!("{prefix}:{lane}"),
        results: format!("{prefix}:{lane}:results"),
    };
    let (busy, idle) = (names("jobs"), names("decisions"));
    let backend = std::sync::Arc::new(
        RedisBackend::connect(&conformance::redis_url(), "w-lanes".into(), vec![])
            .await
            .unwrap(),
    );
    let lease = Duration::from_secs(30);
    let wait = Duration::from_secs(4);
    let other = backend.clone();
    let blocked = tokio::spawn(async move { other.claim(&idle, 1, lease, wait).await });
    // The idle queue's BLMOVE is waiting inside Redis by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let push = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        backend.enqueue(&busy, br#"{"n":1}"#).await.unwrap();
    };
    let (claimed, ()) = tokio::join!(backend.claim(&busy, 1, lease, wait), push);
    let took = started.elapsed();
    assert_eq!(claimed.unwrap().len(), 1);
    assert!(
        took < Duration::from_secs(2),
        "the claim waited {took:?}, behind the other queue's {wait:?} wait"
    );
    assert!(blocked.await.unwrap().unwrap().is_empty());

    common::delete_redis_keys(&conformance::redis_url(), &prefix).await;
}
