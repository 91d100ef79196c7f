//! The AMQP backend against a real RabbitMQ (`LAR_TEST_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f). Every test uses its own queue names and deletes its
//! topology at the end. The done-marker tests use the Redis at `LAR_TEST_REDIS_URL` (default
//! redis://127.0.0.1:6379/0).

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use lar_worker::config::AmqpQueueType;
use lar_worker::queue::amqp::{delete_topology, AmqpBackend, AmqpOptions, Topology};
use lar_worker::queue::prelude::*;
use lar_worker::queue::{DeadLetter, Fenced, Finish, QueueNames};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "amqp-backend-test-secret";

#[path = "common/skip.rs"]
mod skip;

/// The broker-restart test holds it exclusively; every other test shares it, so none of them
/// runs while the broker is down.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn amqp_url() -> String {
    std::env::var("LAR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("LAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Unique names for one test; deletes the topology (and its Redis keys: done markers, the
/// checkpoint store's runs, pauses and decisions) when dropped.
struct Names {
    q: QueueNames,
}

impl Names {
    fn new(test: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Names {
            q: QueueNames {
                jobs: format!("amqp-test-{test}-{tag}:jobs"),
                results: format!("amqp-test-{test}-{tag}:results"),
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
                .map_err(|e| e.to_string())?;
            let client = redis::Client::open(redis_url()).map_err(|e| e.to_string())?;
            let mut conn = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", q.jobs))
                .query(&mut conn)
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(&keys)
                    .query(&mut conn)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of {} failed: {e}", self.q.jobs),
            Err(_) => eprintln!("cleanup of {} panicked", self.q.jobs),
        }
    }
}

fn opts(queue_type: AmqpQueueType) -> AmqpOptions {
    AmqpOptions {
        queue_type,
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

/// Declares the topology through `b`, then opens a plain client connection and channel to
/// publish or consume beside the worker.
async fn client_beside(b: &AmqpBackend, q: &QueueNames) -> (Connection, lapin::Channel) {
    b.ensure_topology(q).await.expect("topology");
    let conn = lapin_conn().await;
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Claims until one claim arrives or `within` passes.
async fn claim_one(b: &AmqpBackend, q: &QueueNames, within: Duration) -> lar_worker::queue::Claim {
    let start = Instant::now();
    loop {
        let mut got = b
            .claim(q, 1, Duration::from_secs(30), Duration::from_millis(500))
            .await
            .expect("claim");
        if let Some(c) = got.pop() {
            return c;
        }
        assert!(
            start.elapsed() < within,
            "no delivery within {within:?}: {:?}",
            b.depth(q).await
        );
    }
}

async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the daemon ---------------------------------------------------------------------------

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait on the worker") {
                return s;
            }
            assert!(
                start.elapsed() < within,
                "the worker did not exit within {within:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on a child we started and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- worker log ---\n{}", self.log());
        }
    }
}

fn bench_graph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml")
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A worker process's settings beyond the defaults.
struct Run<'a> {
    graph: PathBuf,
    backend_extra: &'a str,
    worker_extra: &'a str,
    url: String,
    concurrency: usize,
    exit_when_idle: bool,
}

impl Run<'_> {
    fn bench(concurrency: usize, exit_when_idle: bool) -> Self {
        Run {
            graph: bench_graph(),
            backend_extra: "",
            worker_extra: "drain_timeout_ms = 5000",
            url: amqp_url(),
            concurrency,
            exit_when_idle,
        }
    }
}

/// Starts `lar-worker run` on `q` with the bench graph.
fn start_daemon(
    q: &QueueNames,
    backend_extra: &str,
    concurrency: usize,
    exit_when_idle: bool,
) -> Daemon {
    start(
        q,
        Run {
            backend_extra,
            ..Run::bench(concurrency, exit_when_idle)
        },
    )
}

/// Writes `dir/workers.toml` for `q`.
fn write_config(dir: &Path, q: &QueueNames, run: &Run<'_>) -> PathBuf {
    let cfg = dir.join("workers.toml");
    let toml = format!(
        "[worker]\nconcurrency = {concurrency}\nlog_dir = {log}\n{worker_extra}\n\n\
         [backend]\nkind = \"amqp\"\nurl = {url}\n{backend_extra}\n\n\
         [[queues]]\nname = {jobs}\nresults = {results}\ngraph = {graph}\n",
        concurrency = run.concurrency,
        worker_extra = run.worker_extra,
        backend_extra = run.backend_extra,
        log = toml_str(&dir.join("audit").display().to_string()),
        url = toml_str(&run.url),
        jobs = toml_str(&q.jobs),
        results = toml_str(&q.results),
        graph = toml_str(&run.graph.display().to_string()),
    );
    std::fs::write(&cfg, toml).expect("write workers.toml");
    cfg
}

/// Starts `lar-worker run` on `q`, in a temporary directory of its own.
fn start(q: &QueueNames, run: Run<'_>) -> Daemon {
    let dir = tempfile::tempdir().expect("a temp dir");
    let cfg = write_config(dir.path(), q, &run);
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("a log file");
    let err = log.try_clone().expect("clone the log handle");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lar-worker"));
    cmd.arg("run").arg("--config").arg(&cfg);
    if run.exit_when_idle {
        cmd.arg("--exit-when-idle");
    }
    let child = cmd
        .env_remove("LAR_BACKEND_URL")
        .env_remove("LAR_CONCURRENCY")
        .env("HMAC_SECRET", SECRET)
        .env("RUST_LOG", "warn,lar_worker::queue=info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("start lar-worker");
    Daemon { child, dir }
}

fn bench_job(seq: usize) -> Value {
    if seq.is_multiple_of(2) {
        json!({"kind": "sum", "numbers": [seq, 2, 3], "seq": seq})
    } else {
        json!({"kind": "text", "text": format!("hello-{seq}"), "seq": seq})
    }
}

/// Every message of `queue`, consumed (acked), with its properties.
async fn drain_queue(conn: &Connection, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
    let ch = conn.create_channel().await.expect("a channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue, BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
    {
        ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack");
        out.push((m.delivery.properties, m.delivery.data));
    }
    let _ = ch.close(200, "ok").await;
    out
}

fn header_text(p: &BasicProperties, key: &str) -> Option<String> {
    match p.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

async fn daemon_happy_path(queue_type: &str, qt: AmqpQueueType) {
    let _shared = BROKER.read().await;
    let names = Names::new(&format!("happy-{queue_type}"));
    let q = &names.q;
    let b = backend(opts(qt), "producer").await;
    let n = 30;
    let mut ids = BTreeMap::new();
    for i in 0..n {
        let id = b
            .enqueue(q, bench_job(i).to_string().as_bytes())
            .await
            .expect("enqueue")
            .expect("a job id");
        ids.insert(id, i);
    }
    assert_eq!(b.depth(q).await.expect("depth").ready, n as u64);
    let mut d = start_daemon(q, &format!("queue_type = \"{queue_type}\""), 8, true);
    let status = d.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "worker: {status}\n{}", d.log());
    let depth = b.depth(q).await.expect("depth");
    assert_eq!(
        (
            depth.ready,
            depth.claimed,
            depth.delayed,
            depth.dead,
            depth.results
        ),
        (0, 0, 0, 0, n as u64),
        "{depth:?}"
    );
    let conn = lapin_conn().await;
    let results = drain_queue(&conn, &q.results).await;
    assert_eq!(results.len(), n);
    let mut seen = HashSet::new();
    for (props, body) in &results {
        let v: Value = serde_json::from_slice(body).expect("a JSON result");
        let meta = &v["__lar_worker"];
        let id = props
            .message_id()
            .as_ref()
            .expect("message_id")
            .as_str()
            .to_string();
        assert!(seen.insert(id.clone()), "two results for {id}");
        let seq = *ids.get(&id).expect("message_id is the enqueued job id") as u64;
        assert_eq!(v["seq"], seq, "{v}");
        assert_eq!(v["status"], "done", "{v}");
        assert_eq!(meta["job_id"], id.as_str());
        assert_eq!(meta["status"], "completed");
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(header_text(props, "x-status").as_deref(), Some("completed"));
        assert_eq!(
            header_text(props, "x-run-id").as_deref(),
            meta["run_id"].as_str()
        );
        let sig = header_text(props, "x-signature").expect("x-signature");
        assert_eq!(Some(sig.as_str()), meta["signature"].as_str());
        let log = PathBuf::from(meta["audit_log"].as_str().expect("audit_log"));
        let secret = lar_worker::audit::Secret::new(SECRET).expect("secret");
        assert!(lar_worker::audit::verify_file(&log, &secret).is_valid());
    }
    let logs = std::fs::read_dir(d.audit_dir()).expect("audit dir").count();
    assert_eq!(logs, n, "one audit log per job");
    let _ = conn.close(200, "ok").await;
}

/// Jobs through a worker process: one result each, persistent, with its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_happy_path_classic() {
    daemon_happy_path("classic", AmqpQueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_happy_path_quorum() {
    daemon_happy_path("quorum", AmqpQueueType::Quorum).await;
}

/// A job with `reply_to` and `correlation_id`: the result reaches the caller's own queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_and_correlation_id_reach_the_caller() {
    let _shared = BROKER.read().await;
    let names = Names::new("rpc");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let (conn, ch) = client_beside(&b, q).await;
    let reply = ch
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a reply queue");
    let mut replies = ch
        .basic_consume(
            reply.name().as_str(),
            "rpc-caller",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    let corr = format!("corr-{}", uuid::Uuid::new_v4());
    ch.basic_publish(
        "",
        &q.jobs,
        BasicPublishOptions::default(),
        bench_job(4).to_string().as_bytes(),
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to(reply.name().clone())
            .with_correlation_id(corr.as_str().into())
            .with_message_id("rpc-job-1".into()),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let d = start_daemon(q, "", 2, false);
    let delivery = tokio::time::timeout(Duration::from_secs(60), replies.next())
        .await
        .unwrap_or_else(|_| panic!("no reply within 60 s\n{}", d.log()))
        .expect("a reply")
        .expect("a delivery");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some(corr.as_str())
    );
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("rpc-job-1")
    );
    let v: Value = serde_json::from_slice(&delivery.data).expect("JSON");
    assert_eq!(v["__lar_worker"]["status"], "completed", "{v}");
    assert_eq!(v["result"], 9, "{v}");
    // The results queue has its copy too.
    let results = eventually("the results copy", Duration::from_secs(20), || async {
        let r = b.results(q, 10, false).await.expect("results");
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(results.len(), 1);
    let _ = conn.close(200, "ok").await;
}

/// The `reply_to` copy is the caller's: a caller whose queue refuses it (full, with
/// `reject-publish`) does not hold the job, and the result is in the results queue once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reply_does_not_hold_the_job_or_double_its_result() {
    let _shared = BROKER.read().await;
    let names = Names::new("fullreply");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "fullreply").await;
    let (conn, ch) = client_beside(&b, q).await;
    let reply = format!("{}:reply", q.jobs);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(&reply, QueueDeclareOptions::default(), args)
        .await
        .expect("a reply queue that refuses everything");
    ch.basic_publish(
        "",
        &q.jobs,
        BasicPublishOptions::default(),
        br#"{"n":1}"#,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to(reply.as_str().into())
            .with_correlation_id("corr-full".into())
            .with_message_id("rpc-full-1".into()),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let c = claim_one(&b, q, Duration::from_secs(10)).await;
    let done = b
        .finish(
            q,
            &c,
            Finish::Publish {
                result: br#"{"ok":true}"#.to_vec(),
                dead_letter: None,
            },
        )
        .await;
    let _ = ch
        .queue_delete(&reply, lapin::options::QueueDeleteOptions::default())
        .await;
    assert_eq!(done.expect("the finish succeeds"), Fenced::Done);
    let results = b.results(q, 10, true).await.expect("results");
    assert_eq!(results, vec![br#"{"ok":true}"#.to_vec()], "one result");
    let d = b.depth(q).await.expect("depth");
    assert_eq!(d.ready, 0, "the job is acked: {d:?}");
    let _ = conn.close(200, "ok").await;
}

/// Retry twice through the delay queue (attempt count and history in headers), then a dead
/// letter with the whole history and the body untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_then_dead_letter_with_attempt_history() {
    let _shared = BROKER.read().await;
    let names = Names::new("retry");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "retry").await;
    let body = br#"{"kind":"sum","numbers":[1],"note":"caf\u00e9"}"#;
    let id = b.enqueue(q, body).await.expect("enqueue").expect("id");
    let delay = Duration::from_millis(300);

    let c1 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!((c1.job_id.as_str(), c1.attempt), (id.as_str(), 1));
    assert!(c1.history.is_empty());
    let t1 = Instant::now();
    let f = b
        .finish(
            q,
            &c1,
            Finish::Retry {
                delay,
                error: "boom 1".into(),
                keep_run: false,
            },
        )
        .await
        .expect("finish");
    assert_eq!(f, Fenced::Done);
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.delayed), (0, 1), "{d:?}");

    let c2 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert!(t1.elapsed() >= delay, "came back after {:?}", t1.elapsed());
    assert_eq!((c2.job_id.as_str(), c2.attempt), (id.as_str(), 2));
    assert_eq!(c2.payload, body.to_vec(), "the body is kept exactly");
    assert_eq!(c2.history.len(), 1);
    assert_eq!(c2.history[0].attempt, 1);
    assert_eq!(c2.history[0].error, "boom 1");
    b.finish(
        q,
        &c2,
        Finish::Retry {
            delay,
            error: "boom 2".into(),
            keep_run: false,
        },
    )
    .await
    .expect("finish");

    let c3 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(c3.attempt, 3);
    assert_eq!(
        c3.history
            .iter()
            .map(|h| h.error.as_str())
            .collect::<Vec<_>>(),
        ["boom 1", "boom 2"]
    );
    let mut attempts = c3.history.clone();
    attempts.push(lar_worker::queue::AttemptRecord {
        attempt: 3,
        at: "2026-01-01T00:00:00Z".into(),
        error: "boom 3".into(),
    });
    let dl = DeadLetter {
        job_id: c3.job_id.clone(),
        reason: "gave up after 3 attempts: boom 3".into(),
        attempts,
        keep_run: false,
    };
    assert_eq!(
        b.finish(q, &c3, Finish::DeadLetter(dl))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!(
        (d.ready, d.delayed, d.dead, d.results),
        (0, 0, 1, 0),
        "{d:?}"
    );
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    let e = &dead[0];
    assert_eq!(e["job_id"], id.as_str());
    assert_eq!(e["reason"], "gave up after 3 attempts: boom 3");
    assert_eq!(e["payload"], std::str::from_utf8(body).unwrap());
    let hist = e["attempts"].as_array().expect("attempts");
    assert_eq!(hist.len(), 3, "{e}");
    for (i, a) in hist.iter().enumerate() {
        assert_eq!(a["attempt"], i as u64 + 1);
    }
    // Reading dead letters does not remove them; the message itself is the body, untouched,
    // with the reason in headers.
    assert_eq!(b.depth(q).await.expect("depth").dead, 1);
    let conn = lapin_conn().await;
    let raw = drain_queue(&conn, &Topology::of(q).dead).await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].1, body.to_vec());
    assert_eq!(
        header_text(&raw[0].0, "x-lar-reason").as_deref(),
        Some("gave up after 3 attempts: boom 3")
    );
    let _ = conn.close(200, "ok").await;
}

/// A quorum queue with `delivery_limit`: a message handed back (nack, requeue) more often
/// than the limit is dead-lettered by the broker, reason and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_delivery_limit_dead_letters_a_poison_message() {
    let _shared = BROKER.read().await;
    let names = Names::new("poison");
    let q = &names.q;
    let o = AmqpOptions {
        delivery_limit: Some(2),
        ..opts(AmqpQueueType::Quorum)
    };
    let b = backend(o, "poison").await;
    let body = br#"{"poison":true}"#;
    let id = b.enqueue(q, body).await.expect("enqueue").expect("id");
    let mut deliveries = 0;
    let start = Instant::now();
    loop {
        let got = b
            .claim(q, 1, Duration::from_secs(30), Duration::from_millis(500))
            .await
            .expect("claim");
        for c in got {
            assert_eq!(c.job_id, id);
            deliveries += 1;
            assert_eq!(
                b.finish(q, &c, Finish::Release).await.expect("release"),
                Fenced::Done
            );
        }
        let d = b.depth(q).await.expect("depth");
        if d.dead == 1 && d.ready == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30) && deliveries <= 10,
            "not dead-lettered after {deliveries} deliveries: {d:?}"
        );
    }
    assert_eq!(deliveries, 3, "delivered once plus the 2 the limit allows");
    let dead = b.dead_letters(q, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["payload"], std::str::from_utf8(body).unwrap());
    assert_eq!(dead[0]["job_id"], id.as_str());
    assert_eq!(dead[0]["broker_reason"], "delivery_limit", "{}", dead[0]);
    let none = b
        .claim(q, 1, Duration::from_secs(30), Duration::from_millis(300))
        .await
        .expect("claim");
    assert!(none.is_empty(), "nothing left to deliver");
}

/// A claim whose connection died is fenced: its finish publishes nothing and says Lost, the
/// backend reconnects by itself, the broker redelivers, and the redelivery completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_fences_the_claim_and_the_job_is_redelivered() {
    let _shared = BROKER.read().await;
    let names = Names::new("fence");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "fence").await;
    let id = b
        .enqueue(q, b"{\"n\":1}")
        .await
        .expect("enqueue")
        .expect("id");
    let c1 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(
        b.extend(q, &[(c1.job_id.clone(), c1.epoch)], Duration::from_secs(30))
            .await
            .expect("extend"),
        vec![true]
    );
    let gen = b.connection_generation();
    b.simulate_connection_loss().await;
    assert_eq!(
        b.extend(q, &[(c1.job_id.clone(), c1.epoch)], Duration::from_secs(30))
            .await
            .expect("extend"),
        vec![false]
    );
    let f = b
        .finish(
            q,
            &c1,
            Finish::Publish {
                result: b"{\"late\":true}".to_vec(),
                dead_letter: None,
            },
        )
        .await
        .expect("finish");
    assert_eq!(f, Fenced::Lost);
    let c2 = claim_one(&b, q, Duration::from_secs(20)).await;
    assert!(b.connection_generation() > gen, "reconnected");
    assert_eq!(c2.job_id, id, "the same job, redelivered");
    assert_eq!(c2.attempt, 1, "a redelivery is not a failed attempt");
    let f = b
        .finish(
            q,
            &c2,
            Finish::Publish {
                result: b"{\"ok\":true}".to_vec(),
                dead_letter: None,
            },
        )
        .await
        .expect("finish");
    assert_eq!(f, Fenced::Done);
    let results = b.results(q, 10, true).await.expect("results");
    assert_eq!(
        results,
        vec![b"{\"ok\":true}".to_vec()],
        "only the live claim published"
    );
}

/// A message without `message_id` (a plain pika producer) is stamped on its first delivery:
/// its redeliveries are the same job (so a crash resumes it and the done marker catches a
/// second result), and its `reply_to`, `correlation_id` and headers stay with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_an_id_keeps_one_job_id_across_redeliveries() {
    let _shared = BROKER.read().await;
    let names = Names::new("noid");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Quorum), "noid").await;
    let (conn, ch) = client_beside(&b, q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    ch.basic_publish(
        "",
        &q.jobs,
        BasicPublishOptions::default(),
        br#"{"n":1}"#,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to("caller-queue".into())
            .with_correlation_id("corr-7".into())
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");

    let first = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(first.payload, br#"{"n":1}"#.to_vec());
    assert_eq!(first.attempt, 1);
    // Handed back (a shutdown, a lost connection): the broker delivers it again.
    assert_eq!(
        b.finish(q, &first, Finish::Release).await.expect("release"),
        Fenced::Done
    );
    let again = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(again.job_id, first.job_id, "one job id for every delivery");
    assert_eq!(again.attempt, 1, "a redelivery is not a failed attempt");
    let d = b.depth(q).await.expect("depth");
    assert_eq!(d.ready, 0, "the original was acked once stamped: {d:?}");

    // What the producer set travels with the stamped copy.
    b.deregister(q).await.expect("deregister");
    // Done or Lost: either way the broker has it back.
    b.finish(q, &again, Finish::Release).await.expect("release");
    let left = eventually(
        "the stamped copy back in the queue",
        Duration::from_secs(10),
        || {
            let conn = &conn;
            async move {
                let got = drain_queue(conn, &q.jobs).await;
                (!got.is_empty()).then_some(got)
            }
        },
    )
    .await;
    assert_eq!(left.len(), 1, "one message, never two");
    let (props, body) = &left[0];
    assert_eq!(body, &br#"{"n":1}"#.to_vec());
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some(first.job_id.as_str())
    );
    assert_eq!(
        props.reply_to().as_ref().map(|m| m.as_str()),
        Some("caller-queue")
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|m| m.as_str()),
        Some("corr-7")
    );
    assert_eq!(header_text(props, "x-tenant").as_deref(), Some("acme"));
    let _ = conn.close(200, "ok").await;
}

/// The done marker: a job delivered again after its result went out is acked without a second
/// result, in the same process (memo) and in another one (Redis marker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_marker_acks_a_redelivered_job_without_a_second_result() {
    let _shared = BROKER.read().await;
    let names = Names::new("dedupe");
    let q = &names.q;
    let o = AmqpOptions {
        dedupe_redis_url: Some(redis_url()),
        envelope_queues: vec![q.jobs.clone()],
        ..opts(AmqpQueueType::Classic)
    };
    let a = backend(o.clone(), "dedupe-a").await;
    let job = br#"{"id":"same-job","input":{}}"#;
    for _ in 0..2 {
        assert_eq!(
            a.enqueue(q, job).await.expect("enqueue").as_deref(),
            Some("same-job")
        );
    }
    let publish = |r: &str| Finish::Publish {
        result: r.as_bytes().to_vec(),
        dead_letter: None,
    };
    let c1 = claim_one(&a, q, Duration::from_secs(10)).await;
    assert_eq!(
        a.finish(q, &c1, publish("{\"n\":1}"))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let c2 = claim_one(&a, q, Duration::from_secs(10)).await;
    assert_eq!(c2.job_id, "same-job");
    assert_eq!(
        a.finish(q, &c2, publish("{\"n\":2}"))
            .await
            .expect("finish"),
        Fenced::Done
    );
    // Another replica, fresh memory: the Redis marker. (Replica A stops consuming first, or
    // its prefetch would take the message.)
    a.deregister(q).await.expect("deregister");
    drop(a);
    let b = backend(o, "dedupe-b").await;
    b.enqueue(q, job).await.expect("enqueue");
    let c3 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(
        b.finish(q, &c3, publish("{\"n\":3}"))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.results), (0, 1), "{d:?}");
    assert_eq!(
        b.results(q, 10, false).await.expect("results"),
        vec![b"{\"n\":1}".to_vec()]
    );
}

/// A dead letter moved back to the work queue (what a shovel does after review) is a new life
/// of the job: it runs and publishes again, though its first life's result went out within the
/// done marker's day. A plain redelivery of the redriven message is still acked without a third
/// result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_dead_letter_runs_again_despite_the_done_marker() {
    let _shared = BROKER.read().await;
    let names = Names::new("redrive");
    let q = &names.q;
    let o = AmqpOptions {
        dedupe_redis_url: Some(redis_url()),
        ..opts(AmqpQueueType::Classic)
    };
    let b = backend(o, "redrive").await;
    let id = b
        .enqueue(q, br#"{"kind":"sum","numbers":[1]}"#)
        .await
        .expect("enqueue")
        .expect("an id");
    let publish = |r: &str, dead_letter: Option<DeadLetter>| Finish::Publish {
        result: r.as_bytes().to_vec(),
        dead_letter,
    };
    let c1 = claim_one(&b, q, Duration::from_secs(10)).await;
    let dl = DeadLetter {
        job_id: c1.job_id.clone(),
        reason: "the tool failed".into(),
        attempts: Vec::new(),
        keep_run: false,
    };
    assert_eq!(
        b.finish(q, &c1, publish("{\"n\":1}", Some(dl)))
            .await
            .expect("finish"),
        Fenced::Done
    );

    // The shovel: the dead letter, properties and headers as they are, back to the work queue
    // (twice: the second copy stands for a redelivery of the redriven job).
    let (conn, ch) = client_beside(&b, q).await;
    let dead = drain_queue(&conn, &Topology::of(q).dead).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let (props, body) = dead[0].clone();
    assert!(
        header_text(&props, "x-lar-failed-at").is_some(),
        "{props:?}"
    );
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for _ in 0..2 {
        ch.basic_publish(
            "",
            &q.jobs,
            BasicPublishOptions::default(),
            &body,
            props.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let c2 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(c2.job_id, id, "the redriven job keeps its id");
    assert_eq!(
        b.finish(q, &c2, publish("{\"n\":2}", None))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let c3 = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(
        b.finish(q, &c3, publish("{\"n\":3}", None))
            .await
            .expect("finish"),
        Fenced::Done
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.dead), (0, 0), "{d:?}");
    assert_eq!(
        b.results(q, 10, false).await.expect("results"),
        vec![b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()],
        "the first life's result, then the redriven one's; no third"
    );
    let _ = conn.close(200, "ok").await;
}

/// `declare = false`: nothing is created; a missing topology fails the start with a clear
/// error; an existing one is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_false_only_checks_the_topology() {
    let _shared = BROKER.read().await;
    let names = Names::new("passive");
    let q = &names.q;
    let passive = AmqpOptions {
        declare: false,
        ..opts(AmqpQueueType::Classic)
    };
    let p = backend(passive.clone(), "passive").await;
    let err = p.ensure_topology(q).await.expect_err("missing topology");
    let text = err.to_string();
    assert!(text.contains("does not exist"), "{text}");
    assert!(
        !text.contains("guest:guest"),
        "no credentials in errors: {text}"
    );
    // A channel-level error (the 404 closed the declaring channel) is not a lost connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.connection_generation(),
        1,
        "no reconnect after a channel error"
    );
    let owner = backend(opts(AmqpQueueType::Classic), "owner").await;
    owner.ensure_topology(q).await.expect("declared");
    let p = backend(passive, "passive-2").await;
    p.ensure_topology(q).await.expect("checked");
    p.enqueue(q, b"{}").await.expect("enqueue");
    assert_eq!(p.depth(q).await.expect("depth").ready, 1);
}

/// Graceful shutdown: SIGTERM mid-run exits 0, hands buffered and in-flight jobs back (the
/// connection closes cleanly), and a second worker finishes the rest: none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_everything_back() {
    let _shared = BROKER.read().await;
    let names = Names::new("sigterm");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let n = 400;
    for i in 0..n {
        b.enqueue(q, bench_job(i).to_string().as_bytes())
            .await
            .expect("enqueue");
    }
    let mut a = start_daemon(q, "prefetch = 32", 8, false);
    eventually("50 results", Duration::from_secs(60), || async {
        (b.depth(q).await.ok()?.results >= 50).then_some(())
    })
    .await;
    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", a.log());
    assert!(a.log().contains("amqp connection closed"), "{}", a.log());
    let d = b.depth(q).await.expect("depth");
    assert_eq!(
        d.ready + d.results,
        n as u64,
        "nothing held after exit: {d:?}"
    );
    assert!(d.ready > 0, "SIGTERM came mid-way: {d:?}");
    let mut second = start_daemon(q, "", 8, true);
    assert!(second.wait_exit(Duration::from_secs(120)).success());
    let results = b.results(q, 10_000, true).await.expect("results");
    let mut seqs: Vec<u64> = results
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(r).expect("JSON")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..n as u64).collect::<Vec<_>>(),
        "each job exactly once"
    );
}

/// Whether the local `rabbitmqctl` controls the broker these tests talk to (the reason when not).
fn local_rabbitmqctl() -> Result<(), String> {
    skip::rabbitmqctl_controls(&amqp_url())
}

/// Raises a memory alarm on the local broker (it blocks every publishing connection) until
/// dropped, which puts the watermark back where it was.
struct MemoryAlarm {
    previous: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let out = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                "vm_memory_monitor:get_vm_memory_high_watermark().",
            ])
            .output()
            .expect("rabbitmqctl eval");
        let previous = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            previous.parse::<f64>().is_ok(),
            "a relative watermark to restore, not {previous:?}"
        );
        let set = Command::new("rabbitmqctl")
            .args(["-q", "set_vm_memory_high_watermark", "absolute", "1"])
            .status()
            .expect("rabbitmqctl");
        assert!(set.success(), "raise the alarm");
        MemoryAlarm { previous }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let ok = Command::new("rabbitmqctl")
            .args(["-q", "set_vm_memory_high_watermark", &self.previous])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!(
                "could not restore the memory watermark to {}: run `rabbitmqctl set_vm_memory_high_watermark {}`",
                self.previous, self.previous
            );
        }
    }
}

/// A memory alarm that outlasts any deadline (the broker stops reading from publishers): a
/// finish waits for its confirm instead of giving up, so the result goes out once. Giving up
/// after a deadline and retrying used to queue one more copy per try, all published when the
/// alarm cleared. Needs a local `rabbitmqctl` controlling the test broker (else it fails, unless
/// `LAR_TEST_ALLOW_SKIPS=1`); holds the broker alone (`BROKER`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_longer_than_any_deadline_publishes_one_result() {
    if let Err(why) = local_rabbitmqctl() {
        if skip::skip_or_fail(
            "a_memory_alarm_longer_than_any_deadline_publishes_one_result",
            &why,
        ) {
            return;
        }
    }
    let _exclusive = BROKER.write().await;
    let names = Names::new("alarm");
    let q = names.q.clone();
    let b = std::sync::Arc::new(backend(opts(AmqpQueueType::Classic), "alarm").await);
    b.enqueue(&q, br#"{"kind":"sum","numbers":[1]}"#)
        .await
        .expect("enqueue");
    let c = claim_one(&b, &q, Duration::from_secs(10)).await;
    let alarm = MemoryAlarm::raise();
    let finish = {
        let (b, q) = (b.clone(), q.clone());
        tokio::spawn(async move {
            let publish = Finish::Publish {
                result: br#"{"n":1}"#.to_vec(),
                dead_letter: None,
            };
            b.finish(&q, &c, publish).await
        })
    };
    // Past the 30 s any broker call used to be given.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let waited = !finish.is_finished();
    drop(alarm);
    let outcome = tokio::time::timeout(Duration::from_secs(60), finish).await;
    assert!(waited, "the finish gave up while the broker was blocked");
    let outcome = outcome
        .expect("the finish ends once the alarm clears")
        .expect("the finish task");
    assert_eq!(outcome.expect("finish"), Fenced::Done);
    let results = eventually("the result", Duration::from_secs(10), || async {
        let r = b.results(&q, 10, false).await.ok()?;
        (!r.is_empty()).then_some(r)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.results(&q, 10, false).await.expect("results"),
        vec![br#"{"n":1}"#.to_vec()],
        "one result: {results:?}"
    );
}

/// `rabbitmqctl stop_app` / `start_app` in the middle of 2,000 jobs: the worker reconnects by
/// itself, no job is lost, and every job has one result, except a job whose result confirm
/// the dying connection swallowed: the broker may have stored that result or not and cannot
/// be asked, so the redelivery publishes it again. The worker names each such job in its log
/// ("possible duplicate result"); the test allows a second result only for those, and prints
/// how many there were.
///
/// It stops the local broker for ~3 s, so the other tests of this file wait for it (the
/// `BROKER` lock). It needs a local `rabbitmqctl` that controls the broker at
/// `LAR_TEST_AMQP_URL`: without one it fails with the reason, unless `LAR_TEST_ALLOW_SKIPS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_nothing() {
    if let Err(why) = local_rabbitmqctl() {
        if skip::skip_or_fail("broker_restart_mid_run_loses_nothing", &why) {
            return;
        }
    }
    let _exclusive = BROKER.write().await;
    let names = Names::new("restart");
    let q = &names.q;
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let n = 2000;
    let mut seq_of_job = BTreeMap::new();
    for i in 0..n {
        let id = b
            .enqueue(q, bench_job(i).to_string().as_bytes())
            .await
            .expect("enqueue")
            .expect("id");
        seq_of_job.insert(id, i as u64);
    }
    let extra = format!("dedupe_redis_url = {}", toml_str(&redis_url()));
    let d = start_daemon(q, &extra, 16, false);
    eventually("300 results", Duration::from_secs(120), || async {
        (b.depth(q).await.ok()?.results >= 300).then_some(())
    })
    .await;
    let ctl = |arg: &str| {
        let out = Command::new("rabbitmqctl")
            .arg(arg)
            .output()
            .expect("run rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {arg}: {out:?}");
    };
    ctl("stop_app");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ctl("start_app");
    let depth = eventually("2000 results", Duration::from_secs(300), || async {
        let d = b.depth(q).await.ok()?;
        (d.results >= n as u64 && d.ready == 0 && d.delayed == 0).then_some(d)
    })
    .await;
    // Give a late duplicate the chance to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let results = b.results(q, 100_000, false).await.expect("results");
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &results {
        let v: Value = serde_json::from_slice(r).expect("JSON");
        assert_eq!(v["__lar_worker"]["status"], "completed", "{v}");
        *count.entry(v["seq"].as_u64().expect("seq")).or_default() += 1;
    }
    let log = d.log();
    let missing: Vec<u64> = (0..n as u64).filter(|s| !count.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}\n{log}");
    assert!(log.contains("amqp reconnected"), "{log}");
    // Jobs the worker reported as published-but-unconfirmed when the connection died.
    let uncertain: HashSet<u64> = log
        .lines()
        .filter(|l| l.contains("possible duplicate result"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| seq_of_job.get(v["job_id"].as_str()?).copied())
        .collect();
    let twice: Vec<(u64, usize)> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(s, c)| (*s, *c))
        .collect();
    for (seq, c) in &twice {
        assert!(
            *c == 2 && uncertain.contains(seq),
            "job {seq} has {c} results and was not one the worker reported unconfirmed \
             ({uncertain:?}); {depth:?}\n{log}"
        );
    }
    assert_eq!(results.len(), n + twice.len());
    eprintln!(
        "broker restart: {n} jobs, none lost; {} results unconfirmed at the cut, {} of them published twice",
        uncertain.len(),
        twice.len()
    );
}

// ---- crash, freeze and drain deadline: the AMQP forms of the conformance scenarios that
// ---- watch `claimed` (here: `ready`, which the broker does report) -----------------------

/// A graph with a slow python3 tool (sleeps `<files>/sleep_seconds`, default 2 s).
fn slow_graph(files: &Path) -> PathBuf {
    let tool = files.join("slow_tool.py");
    std::fs::write(
        &tool,
        format!(
            "import json, sys, time\njob = json.load(sys.stdin)\ntry:\n    secs = float(open({p:?}).read())\n\
             except OSError:\n    secs = 2.0\ntime.sleep(secs)\njson.dump({{\"seq\": job.get(\"seq\"), \"slept\": secs}}, sys.stdout)\n",
            p = files.join("sleep_seconds").display().to_string()
        ),
    )
    .expect("write the tool");
    let graph = files.join("slow.toml");
    std::fs::write(
        &graph,
        format!(
            "name = \"slow\"\nentry = \"start\"\n\n[[nodes]]\nid = \"start\"\ntype = \"set\"\nkey = \"status\"\n\
             value = \"started\"\nnext = \"work\"\n\n[[nodes]]\nid = \"work\"\ntype = \"tool\"\ntool = \"slow_tool\"\n\
             inputs = [\"seq\"]\noutput = \"work\"\nnext = \"done\"\n\n[[nodes]]\nid = \"done\"\ntype = \"set\"\n\
             key = \"status\"\nvalue = \"done\"\n\n[tools.slow_tool]\ncommand = [\"python3\", {tool}]\ntimeout_ms = 60000\n",
            tool = toml_str(&tool.display().to_string())
        ),
    )
    .expect("write the graph");
    graph
}

/// Each of `0..n` exactly once among `results`, all completed; returns the metadata.
fn assert_exactly_once(results: &[Vec<u8>], n: usize) -> Vec<Value> {
    let mut seen = BTreeMap::new();
    for r in results {
        let v: Value = serde_json::from_slice(r).expect("JSON");
        assert_eq!(v["__lar_worker"]["status"], "completed", "{v}");
        let seq = v["seq"].as_u64().expect("seq");
        assert!(seen.insert(seq, v).is_none(), "job {seq} has two results");
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..n as u64).collect::<Vec<_>>()
    );
    seen.into_values().collect()
}

/// SIGKILL of a worker holding 4 jobs: the broker returns them when the connection drops, and a
/// second worker finishes all 8, one result each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_holder_returns_its_jobs() {
    let _shared = BROKER.read().await;
    let names = Names::new("kill9");
    let q = &names.q;
    let files = tempfile::tempdir().expect("a temp dir");
    let graph = slow_graph(files.path());
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let n = 8;
    for i in 0..n {
        b.enqueue(q, json!({"seq": i}).to_string().as_bytes())
            .await
            .expect("enqueue");
    }
    let run = |exit_when_idle| Run {
        graph: graph.clone(),
        ..Run::bench(4, exit_when_idle)
    };
    let mut a = start(q, run(false));
    eventually(
        "worker A to hold 4 jobs",
        Duration::from_secs(60),
        || async { (b.depth(q).await.ok()?.ready <= 4).then_some(()) },
    )
    .await;
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reap");
    assert_eq!(b.depth(q).await.expect("depth").results, 0);
    let mut second = start(q, run(true));
    let status = second.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{}", second.log());
    let results = b.results(q, 100, false).await.expect("results");
    for v in assert_exactly_once(&results, n) {
        assert_eq!(
            v["__lar_worker"]["attempt"], 1,
            "a crash is not a failed attempt"
        );
    }
}

/// SIGSTOP freezes a worker holding 4 jobs: the broker's heartbeat timeout ends its connection
/// and returns them, a second worker completes everything; the zombie, woken, finishes its runs
/// but publishes nothing (its deliveries' channel is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_is_fenced_by_the_heartbeat_timeout() {
    let _shared = BROKER.read().await;
    let names = Names::new("zombie");
    let q = &names.q;
    let files = tempfile::tempdir().expect("a temp dir");
    let graph = slow_graph(files.path());
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let n = 8;
    for i in 0..n {
        b.enqueue(q, json!({"seq": i}).to_string().as_bytes())
            .await
            .expect("enqueue");
    }
    let sep = if amqp_url().contains('?') { '&' } else { '?' };
    let run = || Run {
        graph: graph.clone(),
        url: format!("{}{sep}heartbeat=3", amqp_url()),
        ..Run::bench(4, false)
    };
    let mut a = start(q, run());
    eventually(
        "worker A to hold 4 jobs",
        Duration::from_secs(60),
        || async { (b.depth(q).await.ok()?.ready <= 4).then_some(()) },
    )
    .await;
    let pid = a.child.id() as i32;
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let _second = start(q, run());
    eventually("8 results", Duration::from_secs(120), || async {
        (b.depth(q).await.ok()?.results >= n as u64).then_some(())
    })
    .await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.sigterm();
    assert!(
        a.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        a.log()
    );
    let runs_a = std::fs::read_dir(a.audit_dir())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        runs_a,
        4,
        "the zombie finished its 4 runs (evidence) …\n{}",
        a.log()
    );
    let results = b.results(q, 100, false).await.expect("results");
    assert_exactly_once(&results, n);
}

/// SIGTERM with jobs that outlast the drain deadline: exit 0 soon after it, every job handed
/// back at once (not as a failed attempt), and a second worker finishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_deadline_hands_jobs_back() {
    let _shared = BROKER.read().await;
    let names = Names::new("deadline");
    let q = &names.q;
    let files = tempfile::tempdir().expect("a temp dir");
    let graph = slow_graph(files.path());
    std::fs::write(files.path().join("sleep_seconds"), "30").expect("write");
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    let n = 6;
    for i in 0..n {
        b.enqueue(q, json!({"seq": i}).to_string().as_bytes())
            .await
            .expect("enqueue");
    }
    let run = |exit_when_idle| Run {
        graph: graph.clone(),
        worker_extra: "drain_timeout_ms = 1000",
        ..Run::bench(4, exit_when_idle)
    };
    let mut a = start(q, run(false));
    eventually(
        "worker A to hold 4 jobs",
        Duration::from_secs(60),
        || async { (b.depth(q).await.ok()?.ready <= 2).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the runs are in their tool
    let t = Instant::now();
    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", a.log());
    assert!(
        t.elapsed() <= Duration::from_secs(9),
        "took {:?}",
        t.elapsed()
    );
    let d = b.depth(q).await.expect("depth");
    assert_eq!((d.ready, d.results, d.dead), (n as u64, 0, 0), "{d:?}");
    std::fs::write(files.path().join("sleep_seconds"), "0.1").expect("write");
    let mut second = start(q, run(true));
    assert!(second.wait_exit(Duration::from_secs(120)).success());
    let results = b.results(q, 100, false).await.expect("results");
    for v in assert_exactly_once(&results, n) {
        assert_eq!(
            v["__lar_worker"]["attempt"], 1,
            "a hand-back is not a failed attempt"
        );
    }
}

/// The operator commands on an amqp config: enqueue, inspect, results --take, dead-letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_work_on_amqp() {
    let _shared = BROKER.read().await;
    let names = Names::new("cli");
    let q = &names.q;
    let dir = tempfile::tempdir().expect("a temp dir");
    let cfg = write_config(dir.path(), q, &Run::bench(2, true));
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lar-worker"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("LAR_BACKEND_URL")
            .env("HMAC_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run lar-worker");
        assert!(out.status.success(), "lar-worker {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let job = bench_job(2).to_string();
    let id = cli(&["enqueue", &job]);
    assert_eq!(id.trim().len(), 36, "prints the job id: {id}");
    let inspect = cli(&["inspect"]);
    assert!(inspect.contains(&q.jobs), "{inspect}");
    let mut d = start_daemon(q, "", 2, true);
    assert!(
        d.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        d.log()
    );
    let results = cli(&["results", "--take"]);
    let v: Value = serde_json::from_str(results.trim()).expect("one JSON result");
    assert_eq!(v["__lar_worker"]["job_id"], id.trim());
    assert_eq!(b_depth(q).await.results, 0, "--take consumed it");
    assert_eq!(cli(&["dead-letters", "list"]).trim(), "");
}

async fn b_depth(q: &QueueNames) -> lar_worker::queue::QueueDepth {
    backend(opts(AmqpQueueType::Classic), "depth")
        .await
        .depth(q)
        .await
        .expect("depth")
}

fn pause_record(job: &str, step: u64, payload: &str) -> Vec<u8> {
    json!({"job_id": job, "run_id": "r", "queue": "q", "node": "jury", "step": step,
        "request": {"prompt": "ok?", "choices": ["yes", "no"], "context": {}, "output": "d"},
        "awaiting_since": "now", "payload": payload})
    .to_string()
    .into_bytes()
}

fn yes_at(step: u64) -> lar_worker::exec::Decision {
    lar_worker::exec::Decision {
        choice: "yes".into(),
        rationale: String::new(),
        decided_by: "me@example.com".into(),
        role: None,
        step: Some(step),
        signature: None,
    }
}

fn step_write(index: u64) -> lar_worker::queue::StepWrite<'static> {
    lar_worker::queue::StepWrite {
        index,
        record: b"{}",
        checkpoint: b"c",
    }
}

/// The decision's `deciding` entry outlives the resume (the confirm reached the submitter
/// late, or its removal failed): the resumed run halts at the next jury, and that pause must
/// be stored and announced, not acked away as "already decided" (the job would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_pause_is_kept_while_the_earlier_decision_awaits_its_confirm() {
    let n = Names::new("later-pause");
    let q = &n.q;
    let o = AmqpOptions {
        checkpoint_store: Some(redis_url()),
        ..opts(AmqpQueueType::Classic)
    };
    let b = backend(o, "later-pause").await;
    let payload = r#"{"x":1}"#;
    let id = b.enqueue(q, payload.as_bytes()).await.unwrap().unwrap();
    let first = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(
        b.save_step(q, &first, step_write(0)).await.unwrap(),
        Fenced::Done
    );
    let pause = Finish::Pause {
        result: b"awaiting-1".to_vec(),
        pending: pause_record(&id, 1, payload),
    };
    assert_eq!(b.finish(q, &first, pause).await.unwrap(), Fenced::Done);
    assert!(b
        .submit_decision(
            q,
            &serde_json::from_slice(&pause_record(&id, 1, payload)).unwrap(),
            &yes_at(1)
        )
        .await
        .unwrap());
    // As if the confirm had not been seen yet: the entry is still in `deciding`.
    let entry = json!({"at": lar_worker::clock::now_ms(), "decision": "{}", "props": "{}",
        "pending": String::from_utf8(pause_record(&id, 1, payload)).unwrap()});
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:deciding", q.jobs))
        .arg(&id)
        .arg(entry.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let resumed = claim_one(&b, q, Duration::from_secs(10)).await;
    assert!(resumed.decision.is_some());
    for i in 1..3 {
        assert_eq!(
            b.save_step(q, &resumed, step_write(i)).await.unwrap(),
            Fenced::Done
        );
    }
    let again = Finish::Pause {
        result: b"awaiting-2".to_vec(),
        pending: pause_record(&id, 3, payload),
    };
    assert_eq!(b.finish(q, &resumed, again).await.unwrap(), Fenced::Done);
    assert!(
        b.get_pending(q, &id).await.unwrap().is_some(),
        "the second halt waits for its decision"
    );
    let results = b.results(q, 10, false).await.unwrap();
    assert_eq!(
        results,
        vec![b"awaiting-1".to_vec(), b"awaiting-2".to_vec()]
    );
}

/// A dead letter redriven (its `x-lar-failed-at` makes it a new life of the job) that pauses:
/// the resume message carries the life on, so the final result is published instead of being
/// taken for the first life's, already published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_job_that_pauses_publishes_its_final_result() {
    let n = Names::new("redrive-pause");
    let q = &n.q;
    let o = AmqpOptions {
        checkpoint_store: Some(redis_url()),
        dedupe_redis_url: Some(redis_url()),
        ..opts(AmqpQueueType::Classic)
    };
    let b = backend(o, "redrive-pause").await;
    let payload = r#"{"x":2}"#;
    let id = b.enqueue(q, payload.as_bytes()).await.unwrap().unwrap();
    let first = claim_one(&b, q, Duration::from_secs(10)).await;
    let dl = DeadLetter {
        job_id: id.clone(),
        reason: "failed".into(),
        attempts: vec![],
        keep_run: false,
    };
    let failed = Finish::Publish {
        result: b"r1-failed".to_vec(),
        dead_letter: Some(dl),
    };
    assert_eq!(b.finish(q, &first, failed).await.unwrap(), Fenced::Done);
    let (conn, ch) = client_beside(&b, q).await;
    let dead = drain_queue(&conn, &Topology::of(q).dead).await;
    assert_eq!(dead.len(), 1);
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "",
        &q.jobs,
        BasicPublishOptions::default(),
        &dead[0].1,
        dead[0].0.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let second = claim_one(&b, q, Duration::from_secs(10)).await;
    assert_eq!(
        b.save_step(q, &second, step_write(0)).await.unwrap(),
        Fenced::Done
    );
    let pause = Finish::Pause {
        result: b"awaiting".to_vec(),
        pending: pause_record(&id, 1, payload),
    };
    assert_eq!(b.finish(q, &second, pause).await.unwrap(), Fenced::Done);
    assert!(b
        .submit_decision(
            q,
            &serde_json::from_slice(&pause_record(&id, 1, payload)).unwrap(),
            &yes_at(1)
        )
        .await
        .unwrap());
    let resumed = claim_one(&b, q, Duration::from_secs(10)).await;
    let done = Finish::Publish {
        result: b"r2-final".to_vec(),
        dead_letter: None,
    };
    assert_eq!(b.finish(q, &resumed, done).await.unwrap(), Fenced::Done);
    let results = b.results(q, 10, false).await.unwrap();
    assert!(
        results.contains(&b"r2-final".to_vec()),
        "{:?}",
        results
            .iter()
            .map(|r| String::from_utf8_lossy(r))
            .collect::<Vec<_>>()
    );
    let _ = conn.close(200, "ok").await;
}
