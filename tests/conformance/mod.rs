//! The backend conformance suite: one set of scenarios, written once, run against every queue
//! backend. A backend's test file (`tests/conformance_<kind>.rs`) is a few lines:
//!
//! ```ignore
//! #[macro_use]
//! mod conformance;
//! conformance_suite!(conformance::Kind::Redis);
//! ```
//!
//! Every scenario drives real `lar-worker run` processes (so SIGKILL and SIGTERM are real) and
//! uses the library's [`Backend`] only as a producer and an observer: push raw bytes, read
//! results, dead letters and depth. Each [`Fixture`] owns a temporary directory (config, graphs,
//! audit logs, worker logs, the embedded database) and unique queue names, and on drop kills the
//! workers it started and deletes every key it made, so scenarios run in parallel and leave
//! nothing behind.
//!
//! Adding a backend: a [`Kind`] variant, its `[backend]` table in [`Kind::backend_toml`], its
//! cleanup in [`Fixture::cleanup`], and one test file that invokes [`conformance_suite!`].

#![allow(dead_code)]

pub mod scenarios;
#[path = "../common/skip.rs"]
pub mod skip;

use lar_worker::config::Config;
use lar_worker::queue::prelude::*;
use lar_worker::queue::{QueueDepth, QueueNames};
use serde_json::Value;
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Instantiates every shared scenario for one backend. Extra attributes (such as
/// `#[ignore = "why"]`) are put on every generated test.
#[macro_export]
macro_rules! conformance_suite {
    ($kind:expr $(, #[$attr:meta])* $(,)?) => {
        conformance_suite!(@each ($kind) [$(#[$attr])*]
            happy_path_state_payload
            envelope_payload
            bad_input_is_dead_lettered
            an_oversized_result_goes_out_without_its_state
            retry_with_backoff_then_dead_letter
            three_workers_3000_jobs
            kill_9_holder_jobs_are_recovered
            stopped_zombie_worker_is_fenced
            sigterm_under_load_drains_and_loses_nothing
            sigterm_past_drain_deadline_hands_jobs_back
        );
    };
    (@each ($kind:expr) $attrs:tt $($name:ident)*) => {
        $( conformance_suite!(@one ($kind) $attrs $name); )*
    };
    (@one ($kind:expr) [$(#[$attr:meta])*] $name:ident) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::conformance::scenarios::$name($kind).await
        }
    };
}

/// The HMAC secret the workers sign with (passed as HMAC_SECRET) and the tests verify with.
pub const SECRET: &str = "conformance-suite-secret";

/// The repository's benchmark graph (built-in tools only).
pub fn bench_graph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml")
}

/// The backends under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Embedded,
    Amqp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Embedded => "embedded",
            Kind::Amqp => "amqp",
        }
    }

    /// The `[backend]` table of a test's workers.toml.
    fn backend_toml(self, dir: &Path) -> String {
        match self {
            Kind::Redis => format!(
                "[backend]\nkind = \"redis\"\nurl = {}\n",
                toml_str(&redis_url())
            ),
            Kind::Embedded => format!(
                "[backend]\nkind = \"embedded\"\npath = {}\n",
                toml_str(&dir.join("queue.db").display().to_string())
            ),
            // The done markers and the checkpoint store use the suite's Redis (keys under the
            // test's prefix): AMQP is tested as it should be deployed, with crash resume.
            Kind::Amqp => format!(
                "[backend]\nkind = \"amqp\"\nurl = {}\ndedupe_redis_url = {}\ncheckpoint_store = {}\n",
                toml_str(&amqp_url()),
                toml_str(&redis_url()),
                toml_str(&redis_url())
            ),
        }
    }
}

/// The RabbitMQ the suite runs against (`LAR_TEST_AMQP_URL`, default the local broker).
pub fn amqp_url() -> String {
    std::env::var("LAR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The Redis the suite runs against (`LAR_TEST_REDIS_URL`, default the local server).
pub fn redis_url() -> String {
    std::env::var("LAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Worker settings of one test (the `[worker]` and `[worker.retry]` tables).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub lease_ms: u64,
    pub drain_timeout_ms: u64,
    pub max_message_bytes: usize,
    pub max_result_bytes: usize,
    pub fsync: bool,
    pub attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
    pub retry_failed_runs: bool,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 4,
            lease_ms: 10_000,
            drain_timeout_ms: 10_000,
            max_message_bytes: 1024 * 1024,
            max_result_bytes: 8 * 1024 * 1024,
            fsync: true,
            attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            multiplier: 2.0,
            jitter: 0.0,
            retry_failed_runs: true,
        }
    }
}

/// What a test needs configured: the queue's payload format, its graphs, the worker settings,
/// and files to write into the test directory first (`{dir}` in their text becomes the
/// directory's path, so graphs can name tool scripts absolutely).
#[derive(Debug, Clone)]
pub struct Setup {
    pub payload: &'static str,
    /// The queue's `graph` (relative paths are relative to the test directory).
    pub graph: Option<PathBuf>,
    /// The queue's `graphs` table.
    pub graphs: Vec<(String, PathBuf)>,
    pub worker: WorkerSettings,
    pub files: Vec<(String, String)>,
}

impl Setup {
    /// A `state` queue running `graph`.
    pub fn state(graph: impl Into<PathBuf>) -> Self {
        Setup {
            payload: "state",
            graph: Some(graph.into()),
            graphs: Vec::new(),
            worker: WorkerSettings::default(),
            files: Vec::new(),
        }
    }

    /// An `envelope` queue whose envelopes may name `graphs`.
    pub fn envelope(graphs: &[(&str, PathBuf)]) -> Self {
        Setup {
            payload: "envelope",
            graph: None,
            graphs: graphs
                .iter()
                .map(|(n, p)| (n.to_string(), p.clone()))
                .collect(),
            worker: WorkerSettings::default(),
            files: Vec::new(),
        }
    }

    pub fn file(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.to_string(), text.to_string()));
        self
    }

    pub fn worker(mut self, f: impl FnOnce(&mut WorkerSettings)) -> Self {
        f(&mut self.worker);
        self
    }
}

/// A worker process started by a fixture.
struct WorkerProc {
    child: Child,
    log: PathBuf,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
}

/// Identifies a worker process of a fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerId(usize);

/// One test's backend, queue, directory and worker processes.
pub struct Fixture {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    /// Every name this test creates in a shared store starts with it.
    pub prefix: String,
    pub config_path: PathBuf,
    pub config: Config,
    pub names: QueueNames,
    pub backend: Arc<dyn Backend>,
    pub log_dir: PathBuf,
    workers: Mutex<Vec<WorkerProc>>,
}

impl Fixture {
    /// Writes the test's files and workers.toml, loads it as the worker will, and opens the
    /// backend as a producer/observer.
    pub async fn new(kind: Kind, setup: Setup) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("conformance-{}-", kind.name()))
            .tempdir()
            .expect("a temporary directory");
        let prefix = format!("conf-{}", uuid::Uuid::new_v4().simple());
        let dir_text = dir.path().display().to_string();
        for (name, text) in &setup.files {
            let path = dir.path().join(name);
            std::fs::write(&path, text.replace("{dir}", &dir_text)).expect("write a test file");
        }
        let log_dir = dir.path().join("audit");
        let w = &setup.worker;
        let mut toml = String::new();
        writeln!(
            toml,
            "[worker]\nconcurrency = {}\nlog_dir = {}\nlease_ms = {}\ndrain_timeout_ms = {}\n\
             max_message_bytes = {}\nmax_result_bytes = {}\nfsync = {}\n\n[worker.retry]\nattempts = {}\n\
             initial_backoff_ms = {}\nmax_backoff_ms = {}\nmultiplier = {:?}\njitter = {:?}\n\
             retry_failed_runs = {}\n",
            w.concurrency,
            toml_str(&log_dir.display().to_string()),
            w.lease_ms,
            w.drain_timeout_ms,
            w.max_message_bytes,
            w.max_result_bytes,
            w.fsync,
            w.attempts,
            w.initial_backoff_ms,
            w.max_backoff_ms,
            w.multiplier,
            w.jitter,
            w.retry_failed_runs,
        )
        .unwrap();
        toml.push_str(&kind.backend_toml(dir.path()));
        let queue = format!("{prefix}:jobs");
        let results = format!("{prefix}:results");
        writeln!(
            toml,
            "\n[[queues]]\nname = {}\nresults = {}\npayload = {}",
            toml_str(&queue),
            toml_str(&results),
            toml_str(setup.payload)
        )
        .unwrap();
        if let Some(g) = &setup.graph {
            writeln!(toml, "graph = {}", toml_str(&g.display().to_string())).unwrap();
        }
        if !setup.graphs.is_empty() {
            let entries: Vec<String> = setup
                .graphs
                .iter()
                .map(|(n, p)| format!("{n} = {}", toml_str(&p.display().to_string())))
                .collect();
            writeln!(toml, "graphs = {{ {} }}", entries.join(", ")).unwrap();
        }
        let config_path = dir.path().join("workers.toml");
        std::fs::write(&config_path, &toml).expect("write workers.toml");
        let config = Config::load(&config_path)
            .unwrap_or_else(|e| panic!("the test's workers.toml is invalid: {e}\n{toml}"));
        // Graphs are checked here too, so a broken test graph fails with its reason, not as a
        // worker that exits at once.
        lar_worker::config::load_queues(&config, &lar_worker::tools::Registry::with_builtins())
            .unwrap_or_else(|e| panic!("the test's graphs are invalid: {e}"));
        let backend = lar_worker::wiring::connect_backend(&config, format!("{prefix}-observer"))
            .await
            .unwrap_or_else(|e| panic!("cannot open the {} backend under test: {e}", kind.name()));
        Fixture {
            kind,
            dir,
            prefix,
            config_path,
            config,
            names: QueueNames {
                jobs: queue,
                results,
            },
            backend,
            log_dir,
            workers: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    // ---- producer side ------------------------------------------------------------------

    /// Pushes one message, exactly these bytes.
    pub async fn push(&self, bytes: &[u8]) {
        self.backend
            .enqueue(&self.names, bytes)
            .await
            .unwrap_or_else(|e| panic!("enqueue failed: {e}"));
    }

    pub async fn push_json(&self, v: &Value) {
        self.push(v.to_string().as_bytes()).await;
    }

    /// Pushes many messages (a few at a time).
    pub async fn push_all(&self, messages: Vec<Vec<u8>>) {
        use futures::StreamExt;
        let n = messages.len();
        let pushed = futures::stream::iter(messages)
            .map(|m| async move { self.push(&m).await })
            .buffer_unordered(16)
            .count()
            .await;
        assert_eq!(pushed, n);
    }

    // ---- observer side ------------------------------------------------------------------

    pub async fn depth(&self) -> QueueDepth {
        self.backend
            .depth(&self.names)
            .await
            .unwrap_or_else(|e| panic!("depth failed: {e}"))
    }

    /// Every published result (not consumed), each parsed as JSON.
    pub async fn results(&self) -> Vec<Value> {
        let raw = self
            .backend
            .results(&self.names, 1_000_000, false)
            .await
            .unwrap_or_else(|e| panic!("reading results failed: {e}"));
        raw.iter()
            .map(|r| {
                serde_json::from_slice(r).unwrap_or_else(|e| {
                    panic!(
                        "a published result is not JSON ({e}): {}",
                        String::from_utf8_lossy(r)
                    )
                })
            })
            .collect()
    }

    /// Every dead-letter entry.
    pub async fn dead_letters(&self) -> Vec<Value> {
        self.backend
            .dead_letters(&self.names, 1_000_000)
            .await
            .unwrap_or_else(|e| panic!("reading dead letters failed: {e}"))
    }

    /// Polls `probe` (every 100 ms) until it returns `Some`, or fails the test after `timeout`
    /// with `what`, the queue's depth and the workers' log tails.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            if start.elapsed() > timeout {
                let depth = self.backend.depth(&self.names).await;
                panic!(
                    "[{}] timed out after {:?} waiting for: {what}\ndepth: {depth:?}\n{}",
                    self.kind.name(),
                    timeout,
                    self.worker_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until at least `n` results are published; returns them all.
    pub async fn wait_results(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.eventually(&format!("{n} results"), timeout, || async {
            (self.depth().await.results as usize >= n).then_some(())
        })
        .await;
        self.results().await
    }

    /// Waits until at least `n` dead letters are recorded; returns them all.
    pub async fn wait_dead_letters(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.eventually(&format!("{n} dead letters"), timeout, || async {
            (self.depth().await.dead as usize >= n).then_some(())
        })
        .await;
        self.dead_letters().await
    }

    /// Waits until nothing is ready, claimed or delayed.
    pub async fn wait_drained(&self, timeout: Duration) -> QueueDepth {
        self.eventually("the queue to drain", timeout, || async {
            let d = self.depth().await;
            (d.ready == 0 && d.claimed == 0 && d.delayed == 0).then_some(d)
        })
        .await
    }

    /// Once every job is finished: asserts the backend keeps no per-job state (claims, leases,
    /// epochs, checkpoints, journals, processing lists) beyond results and dead letters, which
    /// would otherwise grow without bound in production.
    pub async fn assert_no_job_state_left(&self) {
        match self.kind {
            Kind::Redis | Kind::Amqp => {
                let prefix = self.prefix.clone();
                let keys = tokio::task::spawn_blocking(move || {
                    let client = redis::Client::open(redis_url())?;
                    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
                    redis_keys(&mut conn, &prefix)
                })
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("scanning keys failed: {e}"));
                let q = &self.names.jobs;
                let allowed = |k: &str| {
                    k == self.names.results
                        || k == format!("{q}:dead")
                        || k == format!("{q}:workers")
                        // One counter per queue, not per job.
                        || k == format!("{q}:epoch_seq")
                        || k.starts_with(&format!("{q}:hb:"))
                        // AMQP's one-result markers expire by themselves.
                        || (self.kind == Kind::Amqp && k.starts_with(&format!("{q}:done:")))
                };
                let mut left: Vec<String> = keys.into_iter().filter(|k| !allowed(k)).collect();
                left.sort();
                assert!(
                    left.is_empty(),
                    "per-job state left after every job finished: {left:?}"
                );
            }
            Kind::Embedded => {
                let db = self.dir.path().join("queue.db");
                let left = tokio::task::spawn_blocking(move || embedded_rows_left(&db))
                    .await
                    .unwrap();
                assert!(
                    left.is_empty(),
                    "per-job state left after every job finished (table, rows): {left:?}"
                );
            }
        }
    }

    // ---- worker processes ---------------------------------------------------------------

    /// Starts `lar-worker run --config <dir>/workers.toml` (optionally `--exit-when-idle`).
    pub fn start_worker(&self, exit_when_idle: bool) -> WorkerId {
        let mut workers = self.workers.lock().unwrap();
        let log = self.path(&format!("worker-{}.log", workers.len()));
        let out = std::fs::File::create(&log).expect("create a worker log");
        let err = out.try_clone().expect("clone a file handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lar-worker"));
        cmd.arg("run").arg("--config").arg(&self.config_path);
        if exit_when_idle {
            cmd.arg("--exit-when-idle");
        }
        for var in [
            "LAR_BACKEND_URL",
            "LAR_DB_PATH",
            "LAR_LOG_DIR",
            "LAR_SECRET_FILE",
            "LAR_CONCURRENCY",
        ] {
            cmd.env_remove(var);
        }
        let child = cmd
            .env("HMAC_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start lar-worker");
        workers.push(WorkerProc {
            child,
            log,
            status: None,
        });
        WorkerId(workers.len() - 1)
    }

    pub fn pid(&self, w: WorkerId) -> i32 {
        self.workers.lock().unwrap()[w.0].child.id() as i32
    }

    /// SIGKILL: no drain, no cleanup, exactly like a crash.
    pub fn kill_9(&self, w: WorkerId) {
        let mut workers = self.workers.lock().unwrap();
        let p = &mut workers[w.0];
        p.child.kill().expect("SIGKILL the worker");
        p.status = Some(p.child.wait().expect("reap the worker"));
    }

    /// SIGTERM: the graceful drain.
    pub fn sigterm(&self, w: WorkerId) {
        self.signal(w, libc::SIGTERM);
    }

    /// Sends `sig` (SIGTERM, SIGSTOP, SIGCONT...) to a worker that has not been reaped.
    pub fn signal(&self, w: WorkerId, sig: libc::c_int) {
        assert!(
            self.try_status(w).is_none(),
            "worker {} already exited",
            w.0
        );
        // SAFETY: kill(2) on a child we started and have not reaped, so its pid is ours.
        let rc = unsafe { libc::kill(self.pid(w), sig) };
        assert_eq!(
            rc,
            0,
            "kill({sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The worker's exit status if it has exited.
    pub fn try_status(&self, w: WorkerId) -> Option<ExitStatus> {
        let mut workers = self.workers.lock().unwrap();
        let p = &mut workers[w.0];
        if p.status.is_none() {
            p.status = p.child.try_wait().expect("wait on the worker");
        }
        p.status
    }

    /// Waits for the worker to exit; fails the test after `timeout`.
    pub async fn wait_exit(&self, w: WorkerId, timeout: Duration) -> ExitStatus {
        self.eventually(&format!("worker {} to exit", w.0), timeout, || async {
            self.try_status(w)
        })
        .await
    }

    /// Asserts the worker has not exited (it did not crash).
    pub fn assert_running(&self, w: WorkerId) {
        if let Some(status) = self.try_status(w) {
            panic!(
                "worker {} exited unexpectedly with {status}\n{}",
                w.0,
                self.worker_logs()
            );
        }
    }

    /// The tail of every worker's log, for failure messages.
    pub fn worker_logs(&self) -> String {
        let workers = match self.workers.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        let mut out = String::new();
        for (i, p) in workers.iter().enumerate() {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            let _ = writeln!(
                out,
                "--- worker {i} ({}) log, last {} lines ---\n{}",
                match p.status {
                    Some(s) => s.to_string(),
                    None => "running".into(),
                },
                tail.len(),
                tail.join("\n")
            );
        }
        out
    }

    /// Audit logs written so far (`run_*.json`).
    pub fn audit_logs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&self.log_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("run_") && n.ends_with(".json"))
            })
            .collect();
        out.sort();
        out
    }

    // ---- cleanup ------------------------------------------------------------------------

    /// Kills every worker still running, then deletes what the test made in shared stores.
    fn cleanup(&mut self) {
        let workers = match self.workers.get_mut() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        for p in workers.iter_mut() {
            if p.status.is_none() {
                let _ = p.child.kill();
                p.status = p.child.wait().ok();
            }
        }
        match self.kind {
            Kind::Redis => {
                if let Err(e) = delete_redis_keys(&self.prefix) {
                    eprintln!("conformance: could not delete keys {}*: {e}", self.prefix);
                }
            }
            // Its database lives in the temporary directory, removed with it.
            Kind::Embedded => {}
            Kind::Amqp => {
                if let Err(e) = delete_amqp_topology(&self.names) {
                    eprintln!(
                        "conformance: could not delete the queues of {}: {e}",
                        self.prefix
                    );
                }
                if let Err(e) = delete_redis_keys(&self.prefix) {
                    eprintln!("conformance: could not delete keys {}*: {e}", self.prefix);
                }
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.worker_logs());
        }
        self.cleanup();
    }
}

/// Deletes a queue's AMQP topology (its own thread and runtime: this runs in `Drop`, inside the
/// test's runtime).
pub fn delete_amqp_topology(names: &QueueNames) -> Result<(), String> {
    let names = names.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(lar_worker::queue::amqp::delete_topology(
            &amqp_url(),
            &names,
        ))
        .map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the cleanup thread panicked".to_string())?
}

/// Deletes every key starting with `prefix` (a blocking connection: this runs in `Drop`).
pub fn delete_redis_keys(prefix: &str) -> Result<usize, redis::RedisError> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let keys: Vec<String> = redis_keys(&mut conn, prefix)?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn)?;
    }
    let left = redis_keys(&mut conn, prefix)?;
    if !left.is_empty() {
        eprintln!("conformance: keys left after cleanup: {left:?}");
    }
    Ok(keys.len())
}

fn redis_keys(
    conn: &mut redis::Connection,
    prefix: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Rows in every table of an embedded database except results and dead letters (each test
/// has its own database file, so every row is this test's).
fn embedded_rows_left(db: &Path) -> Vec<(String, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .unwrap_or_else(|e| panic!("list tables of {}: {e}", db.display()));
    let mut left = Vec::new();
    for t in tables {
        // `epoch_seq` is one counter for the file, not per job.
        if ["results", "dead_letters", "epoch_seq"].contains(&t.as_str())
            || t.starts_with("sqlite_")
        {
            continue;
        }
        let n: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM \"{t}\""), [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("count {t}: {e}"));
        if n > 0 {
            left.push((t, n));
        }
    }
    left
}

// ---- assertions shared by scenarios -----------------------------------------------------

/// Verifies an audit log file with the suite's secret.
pub fn assert_log_verifies(path: &Path) {
    assert!(
        path.exists(),
        "the audit log {} does not exist",
        path.display()
    );
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let verdict = lar_worker::audit::verify_file(path, &secret);
    assert!(
        verdict.is_valid(),
        "the audit log {} does not verify: {verdict:?}",
        path.display()
    );
}

/// The bench graph's `digest` of a value: the first 16 hex chars of SHA-256 of its text.
pub fn bench_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}
