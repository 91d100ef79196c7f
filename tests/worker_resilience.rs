//! The worker against its own production failure modes: long steps under systemd's watchdog
//! (and a runtime that really is stuck), a finish the store never takes, a claim loop that
//! panics, and a batch of decisions that outlives its lease.

use redis::Commands;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lar-worker");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bench_graph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml")
}

fn unique_queue(tag: &str) -> String {
    format!("res-{tag}-{}:jobs", uuid::Uuid::new_v4().simple())
}

/// A graph of one tool step running `script` with `sh` (its stdin read and dropped first), then
/// `status = "done"`.
fn shell_step_graph(dir: &Path, script: &str) -> PathBuf {
    let cmd = format!("cat > /dev/null; {script}");
    let text = format!(
        "name = \"shell\"\nentry = \"work\"\n\
         [[nodes]]\nid = \"work\"\ntype = \"tool\"\ntool = \"work\"\noutput = \"r\"\nnext = \"done\"\n\
         [[nodes]]\nid = \"done\"\ntype = \"set\"\nkey = \"status\"\nvalue = \"done\"\n\
         [tools.work]\ncommand = [\"sh\", \"-c\", {}]\ntimeout_ms = 120000\n",
        serde_json::to_string(&cmd).unwrap()
    );
    let path = dir.join("g.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// workers.toml: `worker` lines go under `[worker]`, `queue` lines under the one `[[queues]]`.
fn write_config(
    dir: &Path,
    redis_url: &str,
    queue: &str,
    graph: &Path,
    worker: &str,
    queue_extra: &str,
    admin: Option<u16>,
) -> PathBuf {
    let mut text = format!(
        "[worker]\nlog_dir = \"audit\"\ndrain_timeout_ms = 2000\n{worker}\n\
         [backend]\nkind = \"redis\"\nurl = \"{redis_url}\"\n\
         [[queues]]\nname = \"{queue}\"\nresults = \"{queue}:out\"\ngraph = \"{}\"\n{queue_extra}\n",
        graph.display()
    );
    if let Some(p) = admin {
        text.push_str(&format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n"));
    }
    let path = dir.join("workers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(config: &Path, extra: &[(&str, &str)]) -> Child {
    let mut c = Command::new(BIN);
    c.args(["run", "--config"])
        .arg(config)
        .env("HMAC_SECRET", "resilience-secret")
        .env("RUST_LOG", "info");
    for (k, v) in extra {
        c.env(k, v);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERM, then SIGKILL if it has not stopped within 20 s; its stderr.
fn stop(mut child: Child) -> String {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    if wait_for(Duration::from_secs(20), || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    stderr_of(child)
}

fn stderr_of(mut child: Child) -> String {
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    err
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The value of a metric line `name{labels} value` on the `/metrics` page.
fn metric(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

fn local_redis() -> redis::Connection {
    redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_connection()
        .unwrap()
}

fn forget_queue(r: &mut redis::Connection, queue: &str) {
    let prefix = queue.trim_end_matches(":jobs");
    let keys: Vec<String> = r.keys(format!("{prefix}*")).unwrap();
    if !keys.is_empty() {
        let _: () = r.del(keys).unwrap();
    }
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A test-owned `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify {
            sock,
            _dir: dir,
            path,
        }
    }

    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap())
    }

    /// Messages received until `until` says stop (given the messages so far) or `d` passed,
    /// each with its arrival time.
    fn collect_until(
        &self,
        d: Duration,
        mut until: impl FnMut(&[(Instant, String)]) -> bool,
    ) -> Vec<(Instant, String)> {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < d && !until(&out) {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        out
    }

    fn collect(&self, d: Duration) -> Vec<(Instant, String)> {
        self.collect_until(d, |_| false)
    }
}

/// The arrival times of the `WATCHDOG=1` pings among `msgs`.
fn pings(msgs: &[(Instant, String)]) -> Vec<Instant> {
    msgs.iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect()
}

/// The longest gap between `from`, the pings after it, and `to`.
fn longest_gap(from: Instant, pings: &[Instant], to: Instant) -> Duration {
    let mut marks: Vec<Instant> = pings.iter().copied().filter(|t| *t >= from).collect();
    marks.insert(0, from);
    marks.push(to);
    marks
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

/// Two steps of 90 s at concurrency 2 (every permit busy, nothing finishing) under a watchdog of
/// 10 s: a healthy worker, whose loops turn, keeps sending `WATCHDOG=1` within the interval
/// for the whole time, far past `WatchdogSec/2` without a finished step.
#[test]
fn long_steps_do_not_starve_the_watchdog() {
    const WATCHDOG: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue("long");
    let graph = shell_step_graph(dir.path(), "sleep 90; echo '{\"ok\":true}'");
    let config = write_config(
        dir.path(),
        "redis://127.0.0.1:6379/0",
        &queue,
        &graph,
        "concurrency = 2\nlease_ms = 5000",
        "",
        None,
    );
    let mut r = local_redis();
    for i in 0..2 {
        let _: () = r.rpush(&queue, format!("{{\"n\":{i}}}")).unwrap();
    }
    let n = Notify::new();
    let usec = WATCHDOG.as_micros().to_string();
    let child = spawn(&config, &[n.env(), ("WATCHDOG_USEC", &usec)]);
    // Both steps running: STATUS= says "in flight 2" (sent with every tick).
    let before = n.collect_until(Duration::from_secs(30), |m| {
        m.iter().any(|(_, s)| s.contains("STATUS=in flight 2,"))
    });
    let busy_from = before
        .iter()
        .find(|(_, s)| s.contains("STATUS=in flight 2,"))
        .map(|(t, _)| *t);
    // Well past WatchdogSec/2 (5 s) with every permit busy and no step finished.
    let during = n.collect(Duration::from_secs(25));
    let end = Instant::now();
    let err = stop(child);
    forget_queue(&mut r, &queue);
    let busy_from = busy_from.unwrap_or_else(|| panic!("both steps never ran: {before:?}\n{err}"));
    assert!(
        during
            .iter()
            .filter(|(_, s)| s.contains("STATUS="))
            .all(|(_, s)| s.contains("STATUS=in flight 2,")),
        "both steps ran the whole time: {during:?}"
    );
    let gap = longest_gap(busy_from, &pings(&during), end);
    assert!(
        gap < WATCHDOG,
        "a {gap:?} gap between watchdog pings (WatchdogSec = {WATCHDOG:?}) while two long steps ran: {during:?}\n{err}"
    );
    assert!(!err.contains("withholding the watchdog ping"), "{err}");
}

/// A runtime that really is stuck (every thread blocked) sends no ping: systemd's watchdog
/// still catches what it is for.
#[test]
fn a_stuck_runtime_stops_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue("stuck");
    let config = write_config(
        dir.path(),
        "redis://127.0.0.1:6379/0",
        &queue,
        &bench_graph(),
        "concurrency = 2\nlease_ms = 5000",
        "",
        None,
    );
    let n = Notify::new();
    let mut child = spawn(
        &config,
        &[
            n.env(),
            ("WATCHDOG_USEC", "1000000"),
            ("LAR_WORKER_TEST_WEDGE", "runtime"),
        ],
    );
    let msgs = n.collect(Duration::from_secs(7));
    let end = Instant::now();
    // Nothing async runs, the signal handler neither.
    let _ = child.kill();
    let _ = child.wait();
    let mut r = local_redis();
    forget_queue(&mut r, &queue);
    assert!(msgs.iter().any(|(_, m)| m.contains("READY=1")), "{msgs:?}");
    let last = pings(&msgs).last().copied();
    if let Some(t) = last {
        assert!(
            end.duration_since(t) > Duration::from_secs(4),
            "pings continued with the runtime stuck: {msgs:?}"
        );
    }
}

mod failing_finish {
    //! A real backend (the shared Redis) whose finishes fail on demand, run in process.
    use async_trait::async_trait;
    use lar_worker::queue::{
        Admin, Backend, Claim, Consumer, Fenced, Finish, Pauses, QueueDepth, QueueError,
        QueueNames, Runs,
    };
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// What the store does with a finish.
    pub const TAKES: u8 = 0;
    /// Fails every finish with a transport error (retryable), as a store that does not answer.
    pub const FAILS: u8 = 1;
    /// Refuses a publish (not retryable), as a store that refuses the write for good.
    pub const REFUSES_PUBLISH: u8 = 2;

    pub struct Flaky {
        pub inner: Arc<dyn Backend>,
        pub mode: AtomicU8,
        pub failed_tries: AtomicU64,
        pub first_failure: Mutex<Option<Instant>>,
        pub extends: AtomicU64,
    }

    #[async_trait]
    impl Consumer for Flaky {
        fn kind(&self) -> &'static str {
            self.inner.kind()
        }
        async fn claim(
            &self,
            q: &QueueNames,
            max: usize,
            lease: Duration,
            wait: Duration,
        ) -> Result<Vec<Claim>, QueueError> {
            self.inner.claim(q, max, lease, wait).await
        }
        async fn extend(
            &self,
            q: &QueueNames,
            claims: &[(String, u64)],
            lease: Duration,
        ) -> Result<Vec<bool>, QueueError> {
            self.extends.fetch_add(1, Ordering::Relaxed);
            self.inner.extend(q, claims, lease).await
        }
        async fn finish(
            &self,
            q: &QueueNames,
            claim: &Claim,
            how: Finish,
        ) -> Result<Fenced, QueueError> {
            let fail = match self.mode.load(Ordering::Relaxed) {
                FAILS => Some(QueueError::Transport(
                    "test: the store does not answer".into(),
                )),
                REFUSES_PUBLISH if matches!(how, Finish::Publish { .. }) => Some(
                    QueueError::Conflict("test: the store refuses this publish".into()),
                ),
                _ => None,
            };
            if let Some(e) = fail {
                self.failed_tries.fetch_add(1, Ordering::Relaxed);
                self.first_failure
                    .lock()
                    .unwrap()
                    .get_or_insert_with(Instant::now);
                return Err(e);
            }
            self.inner.finish(q, claim, how).await
        }
        async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
            self.inner.recover(q).await
        }
        async fn heartbeat(&self, q: &QueueNames, ttl: Duration) -> Result<(), QueueError> {
            self.inner.heartbeat(q, ttl).await
        }
        async fn deregister(&self, q: &QueueNames) -> Result<(), QueueError> {
            self.inner.deregister(q).await
        }
    }

    #[async_trait]
    impl Admin for Flaky {
        async fn enqueue(
            &self,
            q: &QueueNames,
            payload: &[u8],
        ) -> Result<Option<String>, QueueError> {
            self.inner.enqueue(q, payload).await
        }
        async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
            self.inner.depth(q).await
        }
        async fn results(
            &self,
            q: &QueueNames,
            max: usize,
            take: bool,
        ) -> Result<Vec<Vec<u8>>, QueueError> {
            self.inner.results(q, max, take).await
        }
        async fn dead_letters(
            &self,
            q: &QueueNames,
            max: usize,
        ) -> Result<Vec<serde_json::Value>, QueueError> {
            self.inner.dead_letters(q, max).await
        }
        async fn redrive_dead_letter(
            &self,
            q: &QueueNames,
            job_id: &str,
        ) -> Result<bool, QueueError> {
            self.inner.redrive_dead_letter(q, job_id).await
        }
    }

    impl Backend for Flaky {
        fn runs(&self) -> Option<&dyn Runs> {
            self.inner.runs()
        }
        fn pauses(&self) -> Option<&dyn Pauses> {
            self.inner.pauses()
        }
    }
}

/// A worker in this process on the shared Redis with a [`failing_finish::Flaky`] backend in
/// `mode`; lease 1 s, so a finish is given up after 3 s.
struct InProcess {
    _dir: tempfile::TempDir,
    queue: String,
    flaky: std::sync::Arc<failing_finish::Flaky>,
    worker: std::sync::Arc<lar_worker::worker::Worker>,
    shutdown: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl InProcess {
    async fn start(tag: &str, mode: u8) -> InProcess {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let queue = unique_queue(tag);
        let config = write_config(
            dir.path(),
            "redis://127.0.0.1:6379/0",
            &queue,
            &bench_graph(),
            &format!(
                "concurrency = 1\nlease_ms = 1000\nunsigned = true\nlog_dir = \"{}\"",
                dir.path().join("audit").display()
            ),
            "",
            None,
        );
        // The template's own log_dir is relative to the test's cwd: use the one above.
        let text =
            std::fs::read_to_string(&config)
                .unwrap()
                .replacen("log_dir = \"audit\"\n", "", 1);
        std::fs::write(&config, text).unwrap();
        let cfg = lar_worker::config::Config::load(&config).unwrap();
        let registry = lar_worker::tools::Registry::with_builtins();
        let queues = lar_worker::config::load_queues(&cfg, &registry).unwrap();
        let inner = lar_worker::wiring::connect_backend(&cfg, format!("test-{tag}"))
            .await
            .unwrap();
        let flaky = Arc::new(failing_finish::Flaky {
            inner,
            mode: std::sync::atomic::AtomicU8::new(mode),
            failed_tries: Default::default(),
            first_failure: Default::default(),
            extends: Default::default(),
        });
        let audit = lar_worker::job::AuditSettings {
            log_dir: cfg.worker.log_dir.clone(),
            secret: None,
            durable: false,
            writer: None,
        };
        let backend: Arc<dyn lar_worker::queue::Backend> = flaky.clone();
        let worker =
            lar_worker::worker::Worker::new(backend, queues, registry, audit, cfg.worker.clone());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn(
            worker
                .clone()
                .run(shutdown.clone(), lar_worker::worker::RunOptions::default()),
        );
        InProcess {
            _dir: dir,
            queue,
            flaky,
            worker,
            shutdown,
            running,
        }
    }

    fn names(&self) -> lar_worker::queue::QueueNames {
        lar_worker::queue::QueueNames {
            jobs: self.queue.clone(),
            results: format!("{}:out", self.queue),
        }
    }

    async fn abandoned(&self) -> f64 {
        let page = self.worker.metrics_text().await;
        metric(
            &page,
            &format!(
                "lar_worker_finishes_abandoned_total{{queue=\"{}\"}}",
                self.queue
            ),
        )
        .unwrap_or(-1.0)
    }

    async fn results(&self) -> Vec<Value> {
        self.flaky
            .inner
            .results(&self.names(), 100, false)
            .await
            .unwrap()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.running).await;
        let mut r = local_redis();
        forget_queue(&mut r, &self.queue);
    }
}

async fn wait_async<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A finish the store keeps failing (a retryable error, its lease renewed meanwhile) is given
/// up after its bound (3 leases) instead of being held for ever, and counted in `/metrics`;
/// the claim is handed back (here the store takes nothing, so its lease lapses), and once the
/// store takes finishes again the job comes back and completes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_the_store_keeps_failing_is_given_up_and_the_job_completes_once() {
    use lar_worker::queue::Admin;
    use std::sync::atomic::Ordering;
    const BOUND: Duration = Duration::from_secs(3);
    let w = InProcess::start("finfail", failing_finish::FAILS).await;
    w.flaky
        .enqueue(&w.names(), br#"{"kind":"sum","numbers":[20,22]}"#)
        .await
        .unwrap();
    let given_up = wait_async(Duration::from_secs(30), || async {
        (w.abandoned().await >= 1.0).then(Instant::now)
    })
    .await;
    let tries = w.flaky.failed_tries.load(Ordering::Relaxed);
    let first = *w.flaky.first_failure.lock().unwrap();
    let extends_while_failing = w.flaky.extends.load(Ordering::Relaxed);
    let meanwhile = w.results().await.len();
    // The store takes finishes again.
    w.flaky.mode.store(failing_finish::TAKES, Ordering::Relaxed);
    let done = wait_async(Duration::from_secs(30), || async {
        (!w.results().await.is_empty()).then_some(())
    })
    .await;
    // Time for a second result, were there one to come.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let results = w.results().await;
    let abandoned = w.abandoned().await;
    w.stop().await;
    let given_up = given_up.expect("the finish was never given up");
    let took = given_up.duration_since(first.expect("a finish failed"));
    // The bound, then the hand-back try (itself failing at once here), and scheduling slack.
    assert!(
        took >= BOUND - Duration::from_millis(200) && took < BOUND + Duration::from_secs(3),
        "given up after {took:?}"
    );
    assert!(tries >= 3, "retried within the bound: {tries} tries");
    assert!(extends_while_failing > 0, "the lease was renewed meanwhile");
    assert_eq!(meanwhile, 0, "nothing was published while failing");
    assert!(
        done.is_some(),
        "the job never completed after the store recovered"
    );
    assert_eq!(results.len(), 1, "completed once: {results:?}");
    assert_eq!(results[0]["result"], 42, "{}", results[0]);
    assert_eq!(abandoned, 1.0);
}

/// A finish the store refuses (not retryable) is not retried: it is given up at once, counted,
/// and the job is dead-lettered with the reason (handing it back would only run it again into
/// the same refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_finish_is_not_retried_and_the_job_is_dead_lettered_with_the_reason() {
    use lar_worker::queue::Admin;
    use std::sync::atomic::Ordering;
    let w = InProcess::start("finrefused", failing_finish::REFUSES_PUBLISH).await;
    w.flaky
        .enqueue(&w.names(), br#"{"kind":"sum","numbers":[1,2]}"#)
        .await
        .unwrap();
    let dead = wait_async(Duration::from_secs(20), || async {
        let d = w.flaky.dead_letters(&w.names(), 10).await.ok()?;
        (!d.is_empty()).then_some((Instant::now(), d))
    })
    .await;
    let abandoned = w.abandoned().await;
    let tries = w.flaky.failed_tries.load(Ordering::Relaxed);
    let first = *w.flaky.first_failure.lock().unwrap();
    let results = w.results().await;
    w.stop().await;
    let (at, dead) = dead.expect("the job was never dead-lettered");
    assert!(
        at.duration_since(first.unwrap()) < Duration::from_secs(2),
        "at once"
    );
    assert_eq!(tries, 1, "a refusal is not retried");
    assert_eq!(abandoned, 1.0);
    assert!(results.is_empty(), "{results:?}");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused to finish") && reason.contains("refuses this publish"),
        "{reason}"
    );
}

/// A claim loop that panics (a test hook, three times) is restarted with backoff; while its
/// queue has no consumer `/ready` is 503 and names it, and STATUS= says so; then `/ready` is
/// 200 again and the queue's jobs complete.
#[test]
fn a_claim_loop_that_panics_is_restarted_and_ready_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue("panics");
    let port = free_port();
    let config = write_config(
        dir.path(),
        "redis://127.0.0.1:6379/0",
        &queue,
        &bench_graph(),
        "concurrency = 2\nlease_ms = 5000",
        "",
        Some(port),
    );
    let n = Notify::new();
    let hook = format!("{queue}=3");
    let child = spawn(
        &config,
        &[n.env(), ("LAR_WORKER_TEST_CLAIM_LOOP_PANICS", &hook)],
    );
    let notes = std::thread::spawn(move || {
        let msgs = n.collect(Duration::from_secs(15));
        msgs.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
    });
    let down = wait_for(Duration::from_secs(15), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 503)
    });
    let back = wait_for(Duration::from_secs(30), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 200)
    });
    let mut r = local_redis();
    for i in 0..3 {
        let _: () = r
            .rpush(&queue, format!("{{\"kind\":\"sum\",\"numbers\":[{i},1]}}"))
            .unwrap();
    }
    let done = wait_for(Duration::from_secs(20), || {
        let n: u64 = r.llen(format!("{queue}:out")).ok()?;
        (n == 3).then_some(())
    });
    let ready_after = http_get(port, "/ready");
    let err = stop(child);
    let notes = notes.join().unwrap();
    forget_queue(&mut r, &queue);
    let (_, body) = down.unwrap_or_else(|| panic!("/ready never went 503: {err}"));
    let body: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(body["ready"], false, "{body}");
    let failing: Vec<&Value> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failing.len(), 1, "{body}");
    assert_eq!(failing[0]["name"], format!("claim_loop:{queue}"), "{body}");
    assert!(
        failing[0]["detail"].as_str().unwrap().contains(&queue),
        "{body}"
    );
    assert!(
        notes
            .iter()
            .any(|m| m.contains(&format!("no consumer for {queue}"))),
        "STATUS= names the queue without a consumer: {notes:?}"
    );
    assert!(back.is_some(), "/ready never came back: {err}");
    assert!(done.is_some(), "the queue's jobs did not complete: {err}");
    assert_eq!(ready_after.map(|(c, _)| c), Some(200));
    assert_eq!(err.matches("the claim loop panicked").count(), 3, "{err}");
}

const LOAN: &str = r#"
name = "loan"
entry = "score"
[[nodes]]
id = "score"
type = "set"
key = "risk"
value = 0.82
next = "jury"
[[nodes]]
id = "jury"
type = "human_jury"
prompt = "Approve payout?"
choices = ["approve", "reject"]
context = ["amount", "risk"]
next = "route"
[[nodes]]
id = "route"
type = "router"
on = "jury_decision"
routes = { approve = "pay", reject = "deny" }
[[nodes]]
id = "pay"
type = "set"
key = "paid"
value = true
[[nodes]]
id = "deny"
type = "set"
key = "paid"
value = false
"#;

/// A decision message whose processing outlasts its lease (a test hook: 3.5 s against a 1 s
/// lease) is renewed like a job claim: it is applied once, its one reply says accepted, and it
/// is not delivered again to be answered "already decided".
#[test]
fn a_decision_outlasting_its_lease_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue("decide");
    let dq = format!("{queue}:decisions");
    let graph = dir.path().join("g.toml");
    std::fs::write(&graph, LOAN).unwrap();
    let config = write_config(
        dir.path(),
        "redis://127.0.0.1:6379/0",
        &queue,
        &graph,
        "concurrency = 2\nlease_ms = 1000",
        &format!("payload = \"envelope\"\ndecisions = \"{dq}\""),
        None,
    );
    let mut r = local_redis();
    let _: () = r
        .rpush(&queue, r#"{"id":"loan-slow","input":{"amount":5000}}"#)
        .unwrap();
    let child = spawn(&config, &[("LAR_WORKER_TEST_SLOW_DECISIONS_MS", "3500")]);
    let results = format!("{queue}:out");
    let paused = wait_for(Duration::from_secs(20), || {
        let items: Vec<String> = r.lrange(&results, 0, -1).ok()?;
        items
            .iter()
            .filter_map(|s| serde_json::from_str::<Value>(s).ok())
            .find(|v| v["status"] == "awaiting_decision")
    });
    if paused.is_some() {
        let msg = r#"{"job_id":"loan-slow","choice":"approve","by":"cfo@example.com"}"#;
        let _: () = r.rpush(&dq, msg).unwrap();
    }
    let completed = wait_for(Duration::from_secs(30), || {
        let items: Vec<String> = r.lrange(&results, 0, -1).ok()?;
        items
            .iter()
            .filter_map(|s| serde_json::from_str::<Value>(s).ok())
            .find(|v| v["status"] == "completed")
    });
    // A redelivery would take another 3.5 s and then reply.
    std::thread::sleep(Duration::from_secs(6));
    let replies: Vec<String> = r.lrange(format!("{dq}:replies"), 0, -1).unwrap();
    let all_results: Vec<String> = r.lrange(&results, 0, -1).unwrap();
    let err = stop(child);
    forget_queue(&mut r, &queue);
    assert!(paused.is_some(), "the job never paused: {err}");
    let completed =
        completed.unwrap_or_else(|| panic!("the job never completed: {replies:?}\n{err}"));
    assert_eq!(completed["state"]["paid"], true, "{completed}");
    assert_eq!(
        replies.len(),
        1,
        "one reply, no redelivery: {replies:?}\n{err}"
    );
    let reply: Value = serde_json::from_str(&replies[0]).unwrap();
    assert_eq!(reply["status"], "accepted", "{reply}");
    assert_eq!(
        all_results.len(),
        2,
        "awaiting_decision, then completed: {all_results:?}"
    );
    assert!(!err.contains("already decided"), "{err}");
    assert!(!err.contains("lease lost"), "{err}");
}
