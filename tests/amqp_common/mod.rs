//! What the AMQP integration tests share (`tests/amqp_backend.rs`, `tests/amqp_failure_modes.rs`):
//! the broker's and Redis's urls, unique queue names cleaned up on drop, a backend, and a
//! `lar-worker run` daemon with its config.
#![allow(dead_code)]

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use lar_worker::config::AmqpQueueType;
use lar_worker::queue::amqp::{delete_topology, AmqpBackend, AmqpOptions};
use lar_worker::queue::prelude::*;
use lar_worker::queue::QueueNames;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "amqp-backend-test-secret";

#[path = "../common/skip.rs"]
pub mod skip;

/// The broker-restart test holds it exclusively; every other test shares it, so none of them
/// runs while the broker is down.
pub static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub fn amqp_url() -> String {
    std::env::var("LAR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("LAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Unique names for one test; deletes the topology (and its Redis keys: done markers, the
/// checkpoint store's runs, pauses and decisions) when dropped.
pub struct Names {
    pub q: QueueNames,
}

impl Names {
    pub fn new(test: &str) -> Self {
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

pub fn opts(queue_type: AmqpQueueType) -> AmqpOptions {
    AmqpOptions {
        queue_type,
        ..AmqpOptions::new(amqp_url())
    }
}

pub async fn backend(o: AmqpOptions, who: &str) -> AmqpBackend {
    AmqpBackend::connect(o, format!("test-{who}"))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"))
}

pub async fn lapin_conn() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("a lapin client connection")
}

/// Declares the topology through `b`, then opens a plain client connection and channel to
/// publish or consume beside the worker.
pub async fn client_beside(b: &AmqpBackend, q: &QueueNames) -> (Connection, lapin::Channel) {
    b.ensure_topology(q).await.expect("topology");
    let conn = lapin_conn().await;
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Claims until one claim arrives or `within` passes.
pub async fn claim_one(
    b: &AmqpBackend,
    q: &QueueNames,
    within: Duration,
) -> lar_worker::queue::Claim {
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

pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
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

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
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

    pub fn sigterm(&self) {
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

pub fn bench_graph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml")
}

pub fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A worker process's settings beyond the defaults.
pub struct Run<'a> {
    pub graph: PathBuf,
    pub backend_extra: &'a str,
    pub worker_extra: &'a str,
    pub url: String,
    pub concurrency: usize,
    pub exit_when_idle: bool,
}

impl Run<'_> {
    pub fn bench(concurrency: usize, exit_when_idle: bool) -> Self {
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
pub fn start_daemon(
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
pub fn write_config(dir: &Path, q: &QueueNames, run: &Run<'_>) -> PathBuf {
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
pub fn start(q: &QueueNames, run: Run<'_>) -> Daemon {
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
        .env(
            "RUST_LOG",
            std::env::var("LAR_TEST_WORKER_LOG")
                .unwrap_or_else(|_| "warn,lar_worker::queue=info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("start lar-worker");
    Daemon { child, dir }
}

pub fn bench_job(seq: usize) -> Value {
    if seq.is_multiple_of(2) {
        json!({"kind": "sum", "numbers": [seq, 2, 3], "seq": seq})
    } else {
        json!({"kind": "text", "text": format!("hello-{seq}"), "seq": seq})
    }
}

/// Every message of `queue`, consumed (acked), with its properties.
pub async fn drain_queue(conn: &Connection, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
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

pub fn header_text(p: &BasicProperties, key: &str) -> Option<String> {
    match p.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Whether the local `rabbitmqctl` controls the broker these tests talk to (the reason when
/// not): its host is this machine and the local node listens for AMQP on its port.
pub fn local_rabbitmqctl() -> Result<(), String> {
    skip::rabbitmqctl_controls(&amqp_url())
}
