//! The AMQP backend's topology against a real RabbitMQ (`LAR_TEST_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f): a publish the broker refuses by closing its channel
//! leaves the others' confirms alone, the delay buckets keep a short retry from waiting behind
//! a long one, and one dead letter is redriven by its job id. Every test uses its own queue
//! names and deletes its topology at the end.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use lar_worker::config::AmqpQueueType;
use lar_worker::queue::amqp::{delete_topology, AmqpBackend, AmqpOptions, Topology};
use lar_worker::queue::prelude::*;
use lar_worker::queue::{AttemptRecord, Claim, DeadLetter, Fenced, Finish, QueueNames};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn amqp_url() -> String {
    std::env::var("LAR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Unique names for one test; deletes the topology when dropped.
struct Names {
    q: QueueNames,
}

impl Names {
    fn new(test: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Names {
            q: QueueNames {
                jobs: format!("amqp-topo-{test}-{tag}:jobs"),
                results: format!("amqp-topo-{test}-{tag}:results"),
            },
        }
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let q = self.q.clone();
        // Drop runs inside the test's runtime: clean up on a thread with its own.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(delete_topology(&amqp_url(), &q))
                .map_err(|e| e.to_string())
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of {} failed: {e}", self.q.jobs),
            Err(_) => eprintln!("cleanup of {} panicked", self.q.jobs),
        }
    }
}

fn opts() -> AmqpOptions {
    AmqpOptions {
        queue_type: AmqpQueueType::Classic,
        prefetch: 64,
        ..AmqpOptions::new(amqp_url())
    }
}

async fn backend(o: AmqpOptions, who: &str) -> AmqpBackend {
    AmqpBackend::connect(o, format!("test-{who}"))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"))
}

async fn lapin_conn() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("a lapin client connection")
}

/// Claims until `n` claims arrived or `within` passed.
async fn claim_n(b: &AmqpBackend, q: &QueueNames, n: usize, within: Duration) -> Vec<Claim> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        let got = b
            .claim(
                q,
                n - out.len(),
                Duration::from_secs(30),
                Duration::from_millis(200),
            )
            .await
            .expect("claim");
        out.extend(got);
        assert!(
            start.elapsed() < within || out.len() >= n,
            "{} of {n} deliveries within {within:?}: {:?}",
            out.len(),
            b.depth(q).await
        );
    }
    out
}

async fn claim_one(b: &AmqpBackend, q: &QueueNames, within: Duration) -> Claim {
    claim_n(b, q, 1, within).await.remove(0)
}

fn publish(result: String) -> Finish {
    Finish::Publish {
        result: result.into_bytes(),
        dead_letter: None,
    }
}

fn dead_letter(c: &Claim, reason: &str) -> Finish {
    Finish::DeadLetter(DeadLetter {
        job_id: c.job_id.clone(),
        reason: reason.into(),
        attempts: vec![AttemptRecord {
            attempt: c.attempt,
            at: "2026-01-01T00:00:00Z".into(),
            error: reason.into(),
        }],
        keep_run: false,
    })
}

fn dead_ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["job_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A dead letter whose exchange is gone (an operator deleted it; `declare = false` against a
/// half-made topology) is refused by the broker with a 404 that closes the channel it went out
/// on. Results finishing at the same time, before and after it, are confirmed all the same:
/// each reaches the results queue exactly once, and only the dead letter's finish fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_does_not_cost_the_others_their_confirms() {
    let names = Names::new("isolate");
    let q = &names.q;
    let b = backend(opts(), "isolate").await;
    const N: usize = 41;
    const BAD: usize = 10;
    for i in 0..N {
        b.enqueue(q, format!("{{\"n\":{i}}}").as_bytes())
            .await
            .expect("enqueue");
    }
    let claims = claim_n(&b, q, N, Duration::from_secs(20)).await;
    // The dead-letter exchange goes away behind the worker's back (declared once per
    // connection, the worker does not look again).
    let t = Topology::of(q);
    let conn = lapin_conn().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_delete(&t.dlx, ExchangeDeleteOptions::default())
        .await
        .expect("delete the dlx");

    let finishes = claims.iter().enumerate().map(|(i, c)| {
        let how = if i == BAD {
            dead_letter(c, "bad input")
        } else {
            publish(format!("{{\"result\":{i}}}"))
        };
        b.finish(q, c, how)
    });
    let outcomes = futures::future::join_all(finishes).await;
    let failed: Vec<usize> = (0..N)
        .filter(|i| *i != BAD && !matches!(outcomes[*i], Ok(Fenced::Done)))
        .collect();
    let bad = format!("{:?}", outcomes[BAD]);
    // What a worker then does: try the failed finishes again (their claims are still held).
    for i in &failed {
        let again = b
            .finish(q, &claims[*i], publish(format!("{{\"result\":{i}}}")))
            .await;
        eprintln!(
            "finish {i} failed first ({:?}); again: {again:?}",
            outcomes[*i]
        );
    }
    let results = b.results(q, 10 * N, false).await.expect("results");
    let distinct: HashSet<&Vec<u8>> = results.iter().collect();
    eprintln!(
        "{} of {} good finishes failed with the bad one; results: {} ({} distinct)",
        failed.len(),
        N - 1,
        results.len(),
        distinct.len()
    );
    assert!(
        failed.is_empty(),
        "good finishes failed beside the refused one: {failed:?} (bad: {bad})"
    );
    assert!(
        bad.contains("Err") && bad.contains(&t.dlx),
        "the refused dead letter fails its own finish: {bad}"
    );
    assert_eq!(results.len(), N - 1, "every result once, none twice");
    assert_eq!(distinct.len(), N - 1);

    // The exchange back, the dead letter's finish goes through on the same backend.
    ch.exchange_declare(
        &t.dlx,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the dlx again");
    ch.queue_bind(
        &t.dead,
        &t.dlx,
        &t.jobs,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the dead-letter queue again");
    assert_eq!(
        b.finish(q, &claims[BAD], dead_letter(&claims[BAD], "bad input"))
            .await
            .expect("the dead letter's finish, tried again"),
        Fenced::Done
    );
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead_ids(&dead), vec![claims[BAD].job_id.clone()]);
    let _ = conn.close(200, "ok").await;
}

/// A result over a MiB goes out on a channel of its own (one a low `max_message_size` may
/// close), beside small ones on the shared channel: every one is confirmed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_on_its_own_channel_is_confirmed_with_the_small_ones() {
    let names = Names::new("large");
    let q = &names.q;
    let b = backend(opts(), "large").await;
    for i in 0..3 {
        b.enqueue(q, format!("{{\"n\":{i}}}").as_bytes())
            .await
            .expect("enqueue");
    }
    let claims = claim_n(&b, q, 3, Duration::from_secs(10)).await;
    let large = format!("{{\"blob\":\"{}\"}}", "x".repeat(3 << 20));
    let finishes = claims.iter().enumerate().map(|(i, c)| {
        let result = if i == 1 {
            large.clone()
        } else {
            format!("{{\"result\":{i}}}")
        };
        b.finish(q, c, publish(result))
    });
    for outcome in futures::future::join_all(finishes).await {
        assert_eq!(outcome.expect("finish"), Fenced::Done);
    }
    let results = b.results(q, 10, false).await.expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(
        results.iter().filter(|r| r.len() == large.len()).count(),
        1,
        "the large result once"
    );
}

/// One delay queue expires only from its head, so a 60 s retry held a 1 s retry queued after
/// it for the whole minute. With a bucket per delay class the short one comes back within its
/// bucket's time while the long one still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_is_not_held_behind_a_long_one() {
    let names = Names::new("buckets");
    let q = &names.q;
    let b = backend(opts(), "buckets").await;
    let t = Topology::of(q);
    let long = b.enqueue(q, b"{\"n\":\"long\"}").await.expect("enqueue");
    let c = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(Some(&c.job_id), long.as_ref());
    let retry = |delay| Finish::Retry {
        delay,
        error: "boom".into(),
        keep_run: false,
    };
    assert_eq!(
        b.finish(q, &c, retry(Duration::from_secs(60)))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let short = b.enqueue(q, b"{\"n\":\"short\"}").await.expect("enqueue");
    let c = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(Some(&c.job_id), short.as_ref());
    // 700 ms: rounded up to the 1 s bucket.
    let bucket = t.delay_for(Duration::from_millis(700)).after;
    assert_eq!(bucket, Duration::from_secs(1));
    let sent = Instant::now();
    assert_eq!(
        b.finish(q, &c, retry(Duration::from_millis(700)))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.delayed), (0, 2), "{d:?}");

    let back = claim_one(&b, q, Duration::from_secs(10)).await;
    let took = sent.elapsed();
    assert_eq!(Some(&back.job_id), short.as_ref(), "the short retry first");
    assert_eq!(back.attempt, 2);
    assert!(
        took >= bucket && took < bucket + Duration::from_secs(4),
        "back after {took:?}, its bucket is {bucket:?}"
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!(d.delayed, 1, "the long retry still waits: {d:?}");
}

/// `declare = false` checks every delay bucket: a topology missing one is refused at start,
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_false_checks_every_delay_bucket() {
    let names = Names::new("passive");
    let q = &names.q;
    let owner = backend(opts(), "owner").await;
    owner.ensure_topology(q).await.expect("declared");
    let passive = AmqpOptions {
        declare: false,
        ..opts()
    };
    backend(passive.clone(), "passive-1")
        .await
        .ensure_topology(q)
        .await
        .expect("the whole topology is there");
    let t = Topology::of(q);
    let missing = &t.delays[4].queue;
    let conn = lapin_conn().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(missing, QueueDeleteOptions::default())
        .await
        .expect("delete one bucket");
    let err = backend(passive, "passive-2")
        .await
        .ensure_topology(q)
        .await
        .expect_err("a bucket is missing");
    let text = err.to_string();
    assert!(
        text.contains(missing.as_str()) && text.contains("does not exist"),
        "{text}"
    );
    let _ = conn.close(200, "ok").await;
}

fn write_config(dir: &Path, q: &QueueNames) -> std::path::PathBuf {
    let s = |v: &str| Value::String(v.to_string()).to_string();
    let cfg = dir.join("workers.toml");
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml");
    let toml = format!(
        "[worker]\nconcurrency = 1\nlog_dir = {log}\n\n\
         [backend]\nkind = \"amqp\"\nurl = {url}\n\n\
         [[queues]]\nname = {jobs}\nresults = {results}\ngraph = {graph}\n",
        log = s(&dir.join("audit").display().to_string()),
        url = s(&amqp_url()),
        jobs = s(&q.jobs),
        results = s(&q.results),
        graph = s(&graph.display().to_string()),
    );
    std::fs::write(&cfg, toml).expect("write workers.toml");
    cfg
}

/// `lar-worker dead-letters redrive ID` on AMQP: of three dead letters the middle one goes back
/// to the work queue under its own id, with its payload, and runs again from its first attempt;
/// the other two stay, in order. An unknown id changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_puts_one_dead_letter_back_and_keeps_the_others_in_order() {
    let names = Names::new("redrive");
    let q = &names.q;
    let b = backend(opts(), "redrive").await;
    let mut ids = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..3 {
        let body = format!("{{\"kind\":\"sum\",\"numbers\":[{i}],\"seq\":{i}}}");
        let id = b
            .enqueue(q, body.as_bytes())
            .await
            .expect("enqueue")
            .expect("an id");
        let c = claim_one(&b, q, Duration::from_secs(10)).await;
        assert_eq!(c.job_id, id);
        assert_eq!(
            b.finish(q, &c, dead_letter(&c, &format!("failed {i}")))
                .await
                .expect("finish"),
            Fenced::Done
        );
        ids.push(id);
        bodies.push(body);
    }
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead_ids(&dead), ids);

    let dir = tempfile::tempdir().expect("a temp dir");
    let cfg = write_config(dir.path(), q);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lar-worker"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("LAR_BACKEND_URL")
            .env("HMAC_SECRET", "amqp-topology-test-secret")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run lar-worker")
    };
    let out = cli(&["dead-letters", "redrive", &ids[1]]);
    assert!(out.status.success(), "redrive: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is back on"),
        "{out:?}"
    );
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead_ids(&dead), vec![ids[0].clone(), ids[2].clone()]);
    assert_eq!(dead[0]["reason"], "failed 0");
    assert_eq!(dead[1]["reason"], "failed 2");

    // The redriven job runs again, under its own id, as a new first attempt, and completes.
    let c = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(c.job_id, ids[1]);
    assert_eq!(
        c.payload,
        bodies[1].as_bytes(),
        "the payload as it was sent"
    );
    assert_eq!(c.attempt, 1, "a redrive starts the attempts again");
    assert!(c.history.is_empty(), "{:?}", c.history);
    assert_eq!(
        b.finish(q, &c, publish("{\"redriven\":true}".into()))
            .await
            .expect("finish"),
        Fenced::Done
    );
    assert_eq!(
        b.results(q, 10, false).await.expect("results"),
        vec![b"{\"redriven\":true}".to_vec()]
    );

    // An unknown id: nothing moves, the walk puts every dead letter back in its place.
    let out = cli(&["dead-letters", "redrive", "no-such-job"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no dead letter"),
        "{out:?}"
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.dead), (0, 2), "{d:?}");
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead_ids(&dead), vec![ids[0].clone(), ids[2].clone()]);
    // And the last one, straight through the backend.
    assert!(b.redrive_dead_letter(q, &ids[2]).await.expect("redrive"));
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead_ids(&dead), vec![ids[0].clone()]);
    assert_eq!(
        claim_one(&b, q, Duration::from_secs(10)).await.job_id,
        ids[2]
    );
}
