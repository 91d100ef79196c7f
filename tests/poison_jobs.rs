//! A poison job: its tool kills the worker running it (`kill -9 $PPID`), on two replicas that a
//! supervisor restarts whenever they die (systemd's `Restart=always`). Each death leaves a
//! claim nobody ends; the lease expires, the reaper takes it back and counts a recovery. After
//! `worker.max_recoveries` deaths the next claim dead-letters the job with the step it kept
//! dying in, instead of running it again, so the replicas stop dying and every other job is
//! done exactly once. On Redis and on the embedded file.

mod common;

use lar_worker::queue::QueueNames;
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SECRET: &str = "poison-jobs-secret";
const LEASE_MS: u64 = 1000;
const MAX_RECOVERIES: u32 = 3;
/// The bound of every wait: a poison job that is never set aside loops for ever.
const WITHIN: Duration = Duration::from_secs(60);
/// systemd's default `RestartSec`.
const RESTART_SEC: Duration = Duration::from_millis(100);

/// A step that kills the worker running it when its job is the poison one, and answers
/// otherwise. The tool is the worker's child (argv, no shell between), so `$PPID` is the
/// worker. It exits soon after: it runs in its own process group and would outlive the test.
const STEP_TOOL: &str = r#"input=$(cat)
case "$input" in
  *'"poison":true'*) kill -9 "$PPID"; sleep 1; exit 1 ;;
esac
printf '{"done":true}\n'
"#;

const GRAPH: &str = r#"
name = "poison"
entry = "prep"
[[nodes]]
id = "prep"
type = "set"
key = "status"
value = "received"
next = "work"
[[nodes]]
id = "work"
type = "tool"
tool = "step"
inputs = ["n", "poison"]
output = "out"
[tools.step]
command = ["sh", "$DIR/step.sh"]
timeout_ms = 10000
"#;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Redis,
    Embedded,
}

fn redis_url() -> String {
    std::env::var("LAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// One test's world: a temp dir (config, graph, tool, audit logs, worker logs, the embedded
/// file), unique queue names, and a producer-side backend to push and observe with.
struct Env {
    kind: Kind,
    dir: tempfile::TempDir,
    prefix: String,
    config: PathBuf,
    names: QueueNames,
    rt: tokio::runtime::Runtime,
    backend: Arc<dyn lar_worker::queue::Backend>,
}

impl Env {
    fn new(kind: Kind) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("poison-{}", uuid::Uuid::new_v4().simple());
        let names = QueueNames {
            jobs: format!("{prefix}:jobs"),
            results: format!("{prefix}:results"),
        };
        let d = dir.path().display().to_string();
        common::write(dir.path(), "step.sh", STEP_TOOL);
        common::write(dir.path(), "g.toml", &GRAPH.replace("$DIR", &d));
        let backend_toml = match kind {
            Kind::Redis => format!("[backend]\nkind = \"redis\"\nurl = \"{}\"\n", redis_url()),
            Kind::Embedded => "[backend]\nkind = \"embedded\"\npath = \"queue.db\"\n".into(),
        };
        let config = common::write(
            dir.path(),
            "workers.toml",
            &format!(
                // One job at a time per replica: a death takes only the poison job with it,
                // so no other job is recovered (and counted) along with it.
                "[worker]\nconcurrency = 1\nlog_dir = \"audit\"\nlease_ms = {LEASE_MS}\n\
                 drain_timeout_ms = 2000\nmax_recoveries = {MAX_RECOVERIES}\n\
                 [worker.retry]\nattempts = 2\ninitial_backoff_ms = 100\n{backend_toml}\
                 [[queues]]\nname = \"{}\"\nresults = \"{}\"\npayload = \"state\"\ngraph = \"g.toml\"\n",
                names.jobs, names.results
            ),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = lar_worker::config::Config::load(&config).unwrap();
        let backend = rt
            .block_on(lar_worker::wiring::connect_backend(
                &cfg,
                "test-producer".into(),
            ))
            .unwrap();
        Env {
            kind,
            dir,
            prefix,
            config,
            names,
            rt,
            backend,
        }
    }

    fn push(&self, job: &Value) {
        self.rt
            .block_on(
                self.backend
                    .enqueue(&self.names, job.to_string().as_bytes()),
            )
            .unwrap();
    }

    fn results(&self) -> Vec<Value> {
        let items = self
            .rt
            .block_on(self.backend.results(&self.names, 1000, false))
            .unwrap();
        items
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    fn dead(&self) -> Vec<Value> {
        self.rt
            .block_on(self.backend.dead_letters(&self.names, 1000))
            .unwrap()
    }

    fn depth(&self) -> lar_worker::queue::QueueDepth {
        self.rt.block_on(self.backend.depth(&self.names)).unwrap()
    }

    /// A supervised replica (`lar-worker run`), its stderr in `worker-<i>-<start>.log`.
    fn replica(&self, i: usize) -> Supervisor {
        Supervisor::start(
            self.config.clone(),
            self.dir.path().join(format!("worker-{i}")),
        )
    }

    /// The end of every worker log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out.push_str(&format!("--- {}\n", f.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.kind == Kind::Redis {
            self.rt
                .block_on(common::delete_redis_keys(&redis_url(), &self.prefix));
        }
    }
}

/// `Restart=always` for one replica: a thread that starts `lar-worker run`, waits for it to
/// exit, records how it ended and starts it again after [`RESTART_SEC`], until dropped. On drop
/// it kills the running child and waits for it, so no worker outlives the test (a failed
/// assertion unwinds through here too).
struct Supervisor {
    stop: Arc<AtomicBool>,
    starts: Arc<AtomicUsize>,
    exits: Arc<Mutex<Vec<ExitStatus>>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    fn start(config: PathBuf, log_stem: PathBuf) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(AtomicUsize::new(0));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, starts, exits) = (stop.clone(), starts.clone(), exits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let n = starts.fetch_add(1, Ordering::SeqCst);
                    let log =
                        std::fs::File::create(format!("{}-{n}.log", log_stem.display())).unwrap();
                    let mut child: Child = common::bin()
                        .args(["run", "--config"])
                        .arg(&config)
                        .env("HMAC_SECRET", SECRET)
                        .env("RUST_LOG", "warn")
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("lar-worker starts");
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            let _ = child.kill();
                            let _ = child.wait();
                            return;
                        }
                        if let Some(status) = child.try_wait().unwrap() {
                            exits.lock().unwrap().push(status);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    std::thread::sleep(RESTART_SEC);
                }
            })
        };
        Supervisor {
            stop,
            starts,
            exits,
            thread: Some(thread),
        }
    }

    fn exits(&self) -> Vec<ExitStatus> {
        self.exits.lock().unwrap().clone()
    }

    /// Whether the replica is running now (started once more than it exited).
    fn up(&self) -> bool {
        self.starts.load(Ordering::SeqCst) == self.exits.lock().unwrap().len() + 1
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn deaths(replicas: &[Supervisor]) -> Vec<ExitStatus> {
    replicas.iter().flat_map(Supervisor::exits).collect()
}

/// Waits for `done` (bounded by [`WITHIN`]), failing with `what` and the state of things.
fn wait_for(env: &Env, replicas: &[Supervisor], what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WITHIN,
            "{what} within {WITHIN:?} ({:?}): the replicas died {} times ({} by SIGKILL); \
             dead letters: {:?}; results: {}; depth: {:?}\n{}",
            env.kind,
            deaths(replicas).len(),
            deaths(replicas)
                .iter()
                .filter(|s| s.signal() == Some(9))
                .count(),
            env.dead(),
            env.results().len(),
            env.depth(),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn completed_ns(results: &[Value]) -> Vec<u64> {
    let mut ns: Vec<u64> = results
        .iter()
        .map(|r| {
            assert_eq!(r["__lar_worker"]["status"], "completed", "{r}");
            r["n"].as_u64().unwrap()
        })
        .collect();
    ns.sort_unstable();
    ns
}

fn a_poison_job_is_dead_lettered_after_max_recoveries_and_the_replicas_live_on(kind: Kind) {
    let env = Env::new(kind);
    // The poison job among 20 others, all queued before any replica starts.
    for n in 0..21u64 {
        env.push(&serde_json::json!({"n": n, "poison": n == 5}));
    }
    let replicas = [env.replica(0), env.replica(1)];

    wait_for(
        &env,
        &replicas,
        "the poison job was not dead-lettered",
        || !env.dead().is_empty(),
    );
    let dead = env.dead();
    assert_eq!(dead.len(), 1, "only the poison job: {dead:?}");
    let entry = &dead[0];
    let payload: Value = serde_json::from_str(entry["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload, serde_json::json!({"n": 5, "poison": true}));
    // It died in its tool step, every time: after `prep` (step 0) was checkpointed, in step 1.
    let reason = entry["reason"].as_str().unwrap();
    assert_eq!(
        reason,
        format!(
            "its worker died {MAX_RECOVERIES} times while running it (in step 1, node 'work'); \
             worker.max_recoveries is {MAX_RECOVERIES}"
        ),
        "{entry}"
    );

    // Every death was the poison job's SIGKILL: one per recovery, and none after the dead letter.
    let died = deaths(&replicas);
    assert_eq!(died.len(), MAX_RECOVERIES as usize, "{died:?}");
    assert!(died.iter().all(|s| s.signal() == Some(9)), "{died:?}");

    // Every other job completes exactly once.
    wait_for(
        &env,
        &replicas,
        "the 20 other jobs did not complete",
        || env.results().len() >= 20,
    );
    let expected: Vec<u64> = (0..21).filter(|n| *n != 5).collect();
    assert_eq!(completed_ns(&env.results()), expected);

    // And the replicas stay up: both take new work, and nobody dies again.
    for n in 21..26u64 {
        env.push(&serde_json::json!({"n": n, "poison": false}));
    }
    wait_for(
        &env,
        &replicas,
        "the jobs sent after the dead letter did not complete",
        || env.results().len() >= 25,
    );
    let expected: Vec<u64> = (0..26).filter(|n| *n != 5).collect();
    assert_eq!(completed_ns(&env.results()), expected, "each exactly once");
    assert_eq!(
        deaths(&replicas).len(),
        MAX_RECOVERIES as usize,
        "no death after the dead letter"
    );
    assert!(
        replicas.iter().all(Supervisor::up),
        "both replicas are running"
    );
    let depth = env.depth();
    assert_eq!(
        (depth.ready, depth.claimed, depth.delayed, depth.dead),
        (0, 0, 0, 1),
        "{depth:?}"
    );
}

#[test]
fn redis_a_poison_job_is_dead_lettered_after_max_recoveries_and_the_replicas_live_on() {
    a_poison_job_is_dead_lettered_after_max_recoveries_and_the_replicas_live_on(Kind::Redis)
}

#[test]
fn embedded_a_poison_job_is_dead_lettered_after_max_recoveries_and_the_replicas_live_on() {
    a_poison_job_is_dead_lettered_after_max_recoveries_and_the_replicas_live_on(Kind::Embedded)
}
