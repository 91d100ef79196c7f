//! Durable runs on every backend that stores checkpoints (the real Redis and the embedded
//! SQLite file): the human pause across worker restarts, refused decisions and checkpoints,
//! crash resume without replaying completed steps, and zombie fencing. The AMQP backend with a
//! Redis checkpoint store (the real RabbitMQ and Redis) runs the crash-resume and SIGTERM
//! scenarios; it has no human pause yet.

use redis::Commands;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "durable-test-secret";
const BIN: &str = env!("CARGO_BIN_EXE_lar-worker");

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Redis,
    Embedded,
    /// RabbitMQ, checkpoints in Redis.
    Amqp,
    /// RabbitMQ alone: no checkpoints, no pause.
    AmqpWithoutStore,
    /// RabbitMQ, checkpoints in a SQLite file.
    AmqpSqlite,
}

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Env {
    kind: Kind,
    dir: tempfile::TempDir,
    queue: String,
    config: PathBuf,
    redis: redis::Connection,
    rt: tokio::runtime::Runtime,
    backend: std::sync::Arc<dyn lar_worker::queue::Backend>,
    names: lar_worker::queue::QueueNames,
}

impl Env {
    fn new(
        kind: Kind,
        graph_toml: &str,
        payload: &str,
        lease_ms: u64,
        tools: &[(&str, &str)],
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("dur-{tag}:jobs");
        let results = format!("dur-{tag}:results");
        for (name, body) in tools {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let graph = dir.path().join("g.toml");
        std::fs::write(
            &graph,
            graph_toml.replace("$DIR", &dir.path().display().to_string()),
        )
        .unwrap();
        let backend_toml = match kind {
            Kind::Redis => "[backend]\nkind = \"redis\"\n",
            Kind::Embedded => "[backend]\nkind = \"embedded\"\npath = \"queue.db\"\n",
            Kind::Amqp => &format!(
                "[backend]\nkind = \"amqp\"\nurl = \"{AMQP_URL}\"\ncheckpoint_store = \"redis://127.0.0.1:6379/0\"\n"
            ),
            Kind::AmqpWithoutStore => &format!("[backend]\nkind = \"amqp\"\nurl = \"{AMQP_URL}\"\n"),
            Kind::AmqpSqlite => &format!(
                "[backend]\nkind = \"amqp\"\nurl = \"{AMQP_URL}\"\ncheckpoint_store = \"sqlite:runs.db\"\n"
            ),
        };
        let config = dir.path().join("workers.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nconcurrency = 4\nlog_dir = \"audit\"\nlease_ms = {lease_ms}\ndrain_timeout_ms = 3000\n\
                 [worker.retry]\nattempts = 2\ninitial_backoff_ms = 100\n{backend_toml}\
                 [[queues]]\nname = \"{queue}\"\nresults = \"{results}\"\npayload = \"{payload}\"\ngraph = \"g.toml\"\ndecisions = \"{queue}:decisions\"\n"
            ),
        )
        .unwrap();
        let redis = redis::Client::open("redis://127.0.0.1:6379/0")
            .unwrap()
            .get_connection()
            .unwrap();
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
        let names = lar_worker::queue::QueueNames {
            jobs: queue.clone(),
            results,
        };
        Env {
            kind,
            dir,
            queue,
            config,
            redis,
            rt,
            backend,
            names,
        }
    }

    fn worker(&self) -> Proc {
        self.worker_logging_to(Stdio::null())
    }

    /// Adds a `[worker]` setting to the config, before any worker reads it.
    fn worker_setting(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let with = text.replacen("[worker]\n", &format!("[worker]\n{line}\n"), 1);
        assert_ne!(text, with);
        std::fs::write(&self.config, with).unwrap();
    }

    /// For replicas struck at random whatever they run: a job held through several strikes
    /// (killed, frozen past its lease, cut off) is no poison job, and must not be dead-lettered
    /// as one after `worker.max_recoveries` (3) of them.
    fn forgive_recoveries(&self) {
        self.worker_setting("max_recoveries = 1000");
    }

    fn worker_logging_to(&self, stderr: impl Into<Stdio>) -> Proc {
        Proc(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(&self.config)
                .env("HMAC_SECRET", SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        )
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("HMAC_SECRET", SECRET)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `lar-worker decide JOB --choice CHOICE --by BY`, which must succeed.
    fn decide(&self, job: &str, choice: &str, by: &str) {
        let (code, out, err) = self.cli(&["decide", job, "--choice", choice, "--by", by]);
        assert_eq!(code, 0, "{out}{err}");
    }

    fn push(&mut self, msg: &str) {
        self.rt
            .block_on(self.backend.enqueue(&self.names, msg.as_bytes()))
            .unwrap();
    }

    fn results_now(&self) -> Vec<Value> {
        let items = self
            .rt
            .block_on(self.backend.results(&self.names, 1000, false))
            .unwrap();
        items
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    fn decisions(&self) -> lar_worker::queue::QueueNames {
        let d = format!("{}:decisions", self.queue);
        lar_worker::queue::QueueNames {
            jobs: d.clone(),
            results: format!("{d}:replies"),
        }
    }

    fn wait_replies(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let items = self
                .rt
                .block_on(self.backend.results(&self.decisions(), 100, false))
                .unwrap();
            if items.len() >= n || start.elapsed() > Duration::from_secs(20) {
                return items
                    .iter()
                    .map(|b| serde_json::from_slice(b).unwrap())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn clear_results(&self) {
        self.rt
            .block_on(self.backend.results(&self.names, 1000, true))
            .unwrap();
    }

    fn dead(&self) -> Vec<Value> {
        self.rt
            .block_on(self.backend.dead_letters(&self.names, 1000))
            .unwrap()
    }

    /// The dead letters, once there is one or `within` passed.
    fn wait_dead(&self, within: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let dead = self.dead();
            if !dead.is_empty() || start.elapsed() > within {
                return dead;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_results(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let items = self.results_now();
            if items.len() >= n || start.elapsed() > within {
                return items;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn audit(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    /// The SQLite file holding runs: the embedded queue's, or the AMQP checkpoint store.
    fn db(&self) -> rusqlite::Connection {
        let file = if self.kind == Kind::AmqpSqlite {
            "runs.db"
        } else {
            "queue.db"
        };
        rusqlite::Connection::open(self.dir.path().join(file)).unwrap()
    }

    /// Changes `from` to `to` inside the stored checkpoint of `job`.
    fn tamper_checkpoint(&mut self, job: &str, from: &str, to: &str) {
        self.tamper(job, None, from, to);
    }

    /// Changes `from` to `to` inside journal record `idx` of `job`.
    fn tamper_journal(&mut self, job: &str, idx: u64, from: &str, to: &str) {
        self.tamper(job, Some(idx), from, to);
    }

    /// Edits the checkpoint (`idx` None) or one journal record of `job` where it is stored.
    fn tamper(&mut self, job: &str, idx: Option<u64>, from: &str, to: &str) {
        let key = format!("{}:run:{job}", self.queue);
        let field = idx.map_or("ckpt".to_string(), |i| i.to_string());
        // One parameter list for both: the checkpoint's queries pass index -1 and check it.
        let (select, update) = match idx {
            None => (
                "SELECT checkpoint FROM runs WHERE job_id = ?1 AND ?2 = -1",
                "UPDATE runs SET checkpoint = ?1 WHERE job_id = ?2 AND ?3 = -1",
            ),
            Some(_) => (
                "SELECT record FROM run_steps WHERE job_id = ?1 AND idx = ?2",
                "UPDATE run_steps SET record = ?1 WHERE job_id = ?2 AND idx = ?3",
            ),
        };
        let idx = idx.map_or(-1, |i| i as i64);
        let sqlite = matches!(self.kind, Kind::Embedded | Kind::AmqpSqlite);
        let stored: String = if sqlite {
            let b: Vec<u8> = self
                .db()
                .query_row(select, rusqlite::params![job, idx], |r| r.get(0))
                .unwrap();
            String::from_utf8(b).unwrap()
        } else {
            self.redis.hget(&key, &field).unwrap()
        };
        let changed = stored.replacen(from, to, 1);
        assert_ne!(stored, changed);
        if sqlite {
            self.db()
                .execute(update, rusqlite::params![changed.into_bytes(), job, idx])
                .unwrap();
        } else {
            let _: () = self.redis.hset(&key, &field, changed).unwrap();
        }
    }
    /// Runs left in the store: (live, retired). A retired run is one an AMQP replica set to
    /// expire before its ack and was killed before forgetting (see `RunStore::retire`).
    fn runs_left(&mut self) -> (usize, usize) {
        match self.kind {
            Kind::Redis | Kind::Amqp | Kind::AmqpWithoutStore => {
                let keys: Vec<String> = self.redis.keys(format!("{}:run:*", self.queue)).unwrap();
                let retired = keys
                    .iter()
                    .filter(|k| self.redis.pttl::<_, i64>(k.as_str()).unwrap() > 0)
                    .count();
                (keys.len() - retired, retired)
            }
            Kind::AmqpSqlite => self
                .db()
                .query_row(
                    "SELECT COUNT(*) FILTER (WHERE retire_at IS NULL),
                            COUNT(*) FILTER (WHERE retire_at IS NOT NULL) FROM runs",
                    [],
                    |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
                )
                .unwrap(),
            Kind::Embedded => (self.checkpoints_left(), 0),
        }
    }

    fn checkpoints_left(&mut self) -> usize {
        match self.kind {
            Kind::Redis | Kind::Amqp | Kind::AmqpWithoutStore => {
                let keys: Vec<String> = self.redis.keys(format!("{}:run:*", self.queue)).unwrap();
                keys.len()
            }
            Kind::Embedded | Kind::AmqpSqlite => self
                .db()
                .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get::<_, i64>(0))
                .unwrap() as usize,
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.kind == Kind::Embedded {
            return;
        }
        if matches!(
            self.kind,
            Kind::Amqp | Kind::AmqpWithoutStore | Kind::AmqpSqlite
        ) {
            for names in [self.names.clone(), self.decisions()] {
                let _ = self
                    .rt
                    .block_on(lar_worker::queue::amqp::delete_topology(AMQP_URL, &names));
            }
        }
        let mut keys: Vec<String> = self
            .redis
            .keys(format!("{}*", self.queue))
            .unwrap_or_default();
        keys.push(self.names.results.clone());
        let _: Result<(), _> = self.redis.del(keys);
    }
}

/// A worker process that is killed when dropped unstopped: a failed assertion unwinds past
/// the test's `stop`, and the daemon must not outlive the test (and keep taking jobs).
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn stop(mut child: Proc) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill").args([sig, pid]).status();
}

fn kill9(mut child: Proc) {
    let _ = child.kill();
    let _ = child.wait();
}

fn verify_with_python(path: &Path) -> bool {
    let script = r#"
import hmac, hashlib, json, sys
d = json.load(open(sys.argv[1])); sig = d.pop("signature")
# Every step, resumed ones included, has Lár's key order (COMPAT.md).
for s in d["steps"]:
    assert list(s)[:6] == ["step", "node", "state_before", "state_diff", "run_metadata", "outcome"], list(s)
    assert list(s).index("state_after") > list(s).index("outcome"), list(s)
msg = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
sys.exit(0 if hmac.compare_digest(hmac.new(sys.argv[2].encode(), msg, hashlib.sha256).hexdigest(), sig) else 1)
"#;
    Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .arg(SECRET)
        .status()
        .unwrap()
        .success()
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

fn pending_job_id(env: &mut Env) -> String {
    let results = env.wait_results(1, Duration::from_secs(20));
    assert_eq!(results.len(), 1, "awaiting_decision result");
    let r = &results[0];
    assert_eq!(r["status"], "awaiting_decision", "{r}");
    assert_eq!(
        r["decision_request"]["choices"],
        serde_json::json!(["approve", "reject"])
    );
    assert_eq!(r["decision_request"]["context"]["amount"], 5000);
    env.clear_results();
    r["decision_request"]["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn halt_stop_every_worker_decide_resume_elsewhere(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-7","input":{"amount":5000},"user_id":"officer-1"}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    assert_eq!(job, "loan-7", "an envelope's id is the job id");
    stop(w1);

    // Nothing runs while the human thinks: the message is acked, the job is a pending record.
    let depth = env.rt.block_on(env.backend.depth(&env.names)).unwrap();
    assert_eq!((depth.ready, depth.claimed), (0, 0));
    let (code, out, _) = env.cli(&["pending"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("\"job_id\":\"{job}\"")) && out.contains("Approve payout?"),
        "{out}"
    );

    let (code, _, err) = env.cli(&[
        "decide",
        &job,
        "--choice",
        "maybe",
        "--by",
        "cfo@example.com",
    ]);
    assert_eq!(code, 2, "invalid choice refused");
    assert!(
        err.contains("not an allowed choice") && err.contains("stays pending"),
        "{err}"
    );
    let (code, _, err) = env.cli(&["decide", "no-such-job", "--choice", "approve", "--by", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("no pending decision"), "{err}");
    let (code, out, err) = env.cli(&[
        "decide",
        &job,
        "--choice",
        "approve",
        "--rationale",
        "Within policy limits.",
        "--by",
        "cfo@example.com",
        "--role",
        "CFO",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = env.cli(&["decide", &job, "--choice", "reject", "--by", "x"]);
    assert_eq!(code, 2, "already decided is refused");
    assert!(err.contains("no pending decision"), "{err}");

    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(20));
    stop(w2);
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["state"]["paid"], true);
    assert_eq!(
        r["state"]["jury_decision_rationale"],
        "Within policy limits."
    );

    let log_path = PathBuf::from(r["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    let steps = log["steps"].as_array().unwrap();
    let ids: Vec<&str> = steps
        .iter()
        .map(|s| s["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["score", "jury", "jury", "route", "pay"]);
    assert!(steps[1].get("halt").is_some(), "the pause is marked");
    assert_eq!(
        steps[2]["decision"]["decided_by"], "cfo@example.com",
        "the resume is marked"
    );
    assert!(
        verify_with_python(&log_path),
        "Lár's recipe accepts the log"
    );
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let v = lar_worker::audit::verify_file(&log_path, &secret);
    assert!(v.is_valid(), "{v:?}");

    let ledger = std::fs::read_dir(env.audit())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("authority_"))
        .expect("a ledger file")
        .path();
    assert!(lar_worker::audit::verify_file(&ledger, &secret).is_valid());
    let ledger: Value = serde_json::from_str(&std::fs::read_to_string(&ledger).unwrap()).unwrap();
    let rec = &ledger["records"][0];
    assert_eq!(rec["run_id"], log["run_id"]);
    assert_eq!(rec["job_id"], job.as_str());
    assert_eq!(rec["decision"], "approve");
    assert_eq!(rec["stakeholder_role"], "CFO");
    assert_eq!(rec["risk_score_at_decision"], 0.82);
}

/// One byte of the signed checkpoint changed: refused, the job dead-lettered.
fn tampered_checkpoint_is_refused(kind: Kind) {
    tampered_run_is_refused(
        kind,
        |env, job| env.tamper_checkpoint(job, "\"attempt\":1", "\"attempt\":7"),
        &["checkpoint refused", "signature mismatch"],
    );
}

/// One byte of the state the run resumes from (the jury step's `state_after` in the journal)
/// changed: the chain catches it, the job is dead-lettered, the tampered run kept as evidence.
fn tampered_state_is_refused(kind: Kind) {
    tampered_run_is_refused(
        kind,
        |env, job| env.tamper_journal(job, 1, "5000", "9000"),
        &["journal refused", "chain broken at step 1"],
    );
}

fn tampered_run_is_refused(kind: Kind, tamper: impl FnOnce(&mut Env, &str), expect: &[&str]) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-t","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    tamper(&mut env, &job);
    let (code, _, _) = env.cli(&["decide", &job, "--choice", "approve", "--by", "x"]);
    assert_eq!(code, 0);
    let dead = env.wait_dead(Duration::from_secs(20));
    stop(w1);
    assert_eq!(dead.len(), 1, "the job is dead-lettered, not resumed");
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(expect.iter().all(|e| reason.contains(e)), "{reason}");
    assert!(
        env.results_now().is_empty(),
        "nothing published from a tampered checkpoint"
    );
    // The stored run stays: its journal is the only evidence of the steps taken (and of the
    // tampering), and a redrive once the cause is fixed resumes it.
    assert_eq!(env.checkpoints_left(), 1, "the refused run is kept");
}

const SIDE_EFFECT_TOOL: &str = r#"
import json, os, sys, time
json.load(sys.stdin)
with open(os.environ["SIDE_FILE"], "a") as f:
    f.write(os.environ["LAR_IDEMPOTENCY_KEY"] + "\n")
time.sleep(float(os.environ.get("SLEEP", "0.15")))
print(json.dumps({"ok": True}))
"#;

fn twenty_step_graph() -> String {
    let mut g = String::from("name = \"twenty\"\nentry = \"s0\"\n");
    for i in 0..20 {
        g.push_str(&format!(
            "[[nodes]]\nid = \"s{i}\"\ntype = \"tool\"\ntool = \"effect\"\noutput = \"r{i}\"\n{}\n",
            if i < 19 {
                format!("next = \"s{}\"", i + 1)
            } else {
                String::new()
            }
        ));
    }
    g.push_str("[tools.effect]\ncommand = [\"python3\", \"$DIR/effect.py\"]\ntimeout_ms = 10000\nenv = { SIDE_FILE = \"$DIR/side.txt\" }\n");
    g
}

/// Waits until the side-effect tool has appended `n` lines (the run is that far).
fn wait_for_side_effects(side: &Path, n: usize) {
    let start = Instant::now();
    while std::fs::read_to_string(side)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < n
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run did not progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the log file at `path` holds `line`; fails with the log when it does not in time.
fn wait_for_log(path: &Path, line: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(line) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "no '{line}' in {} after {within:?}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_9_mid_run_resumes_without_replaying_completed_steps(kind: Kind) {
    let mut env = Env::new(
        kind,
        &twenty_step_graph(),
        "state",
        2000,
        &[("effect.py", SIDE_EFFECT_TOOL)],
    );
    env.push(r#"{"job":"twenty"}"#);
    let side = env.dir.path().join("side.txt");
    let w1 = env.worker();
    wait_for_side_effects(&side, 8);
    kill9(w1);
    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(40));
    stop(w2);
    assert_eq!(results.len(), 1, "exactly one result");
    let r = &results[0];
    assert_eq!(r["__lar_worker"]["status"], "completed", "{r}");

    let lines: Vec<String> = std::fs::read_to_string(&side)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut distinct = lines.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 20, "every step ran");
    // Only the step that was running at the kill may run again (at-least-once per step).
    assert!(lines.len() <= 21, "completed steps ran twice: {lines:?}");

    let log_path = PathBuf::from(r["__lar_worker"]["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 20);
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    assert!(lar_worker::audit::verify_file(&log_path, &secret).is_valid());
    assert!(verify_with_python(&log_path));
}

fn a_frozen_worker_past_its_lease_cannot_publish_or_rewind(kind: Kind) {
    let mut env = Env::new(
        kind,
        &twenty_step_graph(),
        "state",
        1500,
        &[("effect.py", SIDE_EFFECT_TOOL)],
    );
    env.push(r#"{"job":"zombie"}"#);
    let side = env.dir.path().join("side.txt");
    let zombie_log = env.dir.path().join("zombie.log");
    let w1 = env.worker_logging_to(std::fs::File::create(&zombie_log).unwrap());
    wait_for_side_effects(&side, 4);
    let pid = w1.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(2500));
    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(40));
    assert_eq!(results.len(), 1);
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    // The zombie's next checkpoint is fenced, so it hands the job back, and that finish is
    // fenced too; the worker says so once both were refused. Only then is its silence proof.
    wait_for_log(
        &zombie_log,
        "claim lost to another worker: nothing published",
        Duration::from_secs(40),
    );
    stop(w1);
    stop(w2);
    let results = env.results_now();
    assert_eq!(results.len(), 1, "the zombie published nothing");
    assert_eq!(
        env.checkpoints_left(),
        0,
        "the zombie did not write a checkpoint after completion"
    );
    let r = &results[0];
    let log_path = PathBuf::from(r["__lar_worker"]["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 20);
}

fn decisions_arrive_as_messages(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-m","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    let dq = env.decisions();
    let send = |env: &Env, msg: String| {
        env.rt
            .block_on(env.backend.enqueue(&dq, msg.as_bytes()))
            .unwrap()
    };
    send(&env, "this is not json".to_string());
    // Over max_message_bytes (1 MiB): refused unread, however well-formed.
    send(
        &env,
        format!(
            r#"{{"job_id":"{job}","choice":"approve","by":"cfo@example.com","pad":"{}"}}"#,
            "x".repeat(1 << 20)
        ),
    );
    send(
        &env,
        format!(r#"{{"job_id":"{job}","choice":"maybe","by":"cfo@example.com"}}"#),
    );
    let replies = env.wait_replies(1);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["status"], "rejected");
    assert!(replies[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not an allowed choice"));
    send(
        &env,
        format!(
            r#"{{"job_id":"{job}","choice":"reject","rationale":"too risky","by":"cfo@example.com","role":"CFO"}}"#
        ),
    );
    let results = env.wait_results(1, Duration::from_secs(20));
    let replies = env.wait_replies(2);
    stop(w1);
    assert_eq!(replies[1]["status"], "accepted", "{replies:?}");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "completed");
    assert_eq!(results[0]["state"]["paid"], false);
    let dead = env.rt.block_on(env.backend.dead_letters(&dq, 10)).unwrap();
    let mut reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons.len(),
        2,
        "the malformed and the oversized decision: {reasons:?}"
    );
    assert!(reasons[0].starts_with("invalid JSON"), "{reasons:?}");
    assert!(reasons[1].starts_with("message too large"), "{reasons:?}");
}

fn an_expired_pending_job_takes_the_default_path(kind: Kind) {
    let graph = LOAN.replace(
        "next = \"route\"",
        "next = \"route\"\nexpires_after_ms = 300\non_expiry = \"reject\"",
    );
    let mut env = Env::new(kind, &graph, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-x","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let _job = pending_job_id(&mut env);
    let results = env.wait_results(1, Duration::from_secs(20));
    stop(w1);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "completed");
    assert_eq!(results[0]["state"]["paid"], false);
    let log_path = PathBuf::from(results[0]["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    let decision = log["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("decision"))
        .unwrap()
        .clone();
    assert_eq!(decision["decided_by"], "system:expiry");
    assert_eq!(decision["choice"], "reject");
}

/// A decision is applied only once its authority ledger record is on disk: when the record
/// cannot be written, no step runs past the jury and no result goes out; the job is retried,
/// then dead-lettered with the reason, and no ledger-less decision is ever in a log.
fn a_decision_without_its_ledger_record_is_not_applied(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-l","input":{"amount":5000}}"#);
    let w = env.worker();
    let results = env.wait_results(1, Duration::from_secs(20));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "awaiting_decision", "{}", results[0]);
    let run_id = results[0]["run_id"].as_str().unwrap().to_string();
    env.clear_results();
    // The decision is step 2 (score, jury halt, jury decision): a directory where its ledger
    // file goes makes the write fail.
    let blocker = env.audit().join(format!("authority_{run_id}_2.json"));
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let (code, out, err) = env.cli(&[
        "decide",
        "loan-l",
        "--choice",
        "approve",
        "--by",
        "cfo@example.com",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let dead = env.wait_dead(Duration::from_secs(20));
    stop(w);
    assert_eq!(dead.len(), 1, "the job is dead-lettered");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot write the authority ledger"),
        "{reason}"
    );
    assert!(env.results_now().is_empty(), "no result without the ledger");
    // The only log written is the pause's: no step past the jury was ever signed.
    for entry in std::fs::read_dir(env.audit()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("run_") {
            let log: Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            assert_eq!(log["steps"].as_array().unwrap().len(), 2, "{name}");
        }
    }
}

macro_rules! on_backends {
    ($($scenario:ident),* $(,)?) => {
        mod redis_backend {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::Redis) } )*
        }
        mod embedded_backend {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::Embedded) } )*
        }
    };
}

/// A decision that passed `decide` but no longer fits when the worker applies it (here: a
/// choice the jury does not offer, submitted straight to the backend and signed) is refused
/// without ending the job: it waits for a decision again, and a good one then resumes it.
fn a_decision_that_does_not_fit_leaves_the_job_waiting(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-misfit","input":{"amount":5000}}"#);
    let w = env.worker();
    let job = pending_job_id(&mut env);
    let raw = env
        .rt
        .block_on(
            env.backend
                .pauses()
                .expect("pauses")
                .get_pending(&env.names, &job),
        )
        .unwrap()
        .expect("a pending record");
    let pending: lar_worker::durable::Pending = serde_json::from_slice(&raw).unwrap();
    let mut misfit = lar_worker::exec::Decision {
        choice: "maybe".into(),
        rationale: "".into(),
        decided_by: "cfo@example.com".into(),
        role: None,
        step: Some(pending.step),
        signature: None,
    };
    misfit.sign(&job, &lar_worker::audit::Secret::new(SECRET).unwrap());
    assert!(env
        .rt
        .block_on(
            env.backend
                .pauses()
                .expect("pauses")
                .submit_decision(&env.names, &pending, &misfit),
        )
        .unwrap());
    let again = env.wait_results(1, Duration::from_secs(20));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["status"], "awaiting_decision", "{}", again[0]);
    assert!(
        env.dead().is_empty(),
        "refused, not dead-lettered: {:?}",
        env.dead()
    );
    env.clear_results();
    env.decide(&job, "reject", "cfo@example.com");
    let done = env.wait_results(1, Duration::from_secs(20));
    stop(w);
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    assert_eq!(done[0]["state"]["paid"], false);
}

/// A number too large for a float (`1e400`) is written as Python writes it, a bare `Infinity`,
/// in the journal and the log. The run still resumes from its journal after the pause (the
/// journal is read as the verifier reads logs), and its final log verifies both ways.
fn an_overflowing_number_survives_a_pause(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-inf","input":{"amount":5000,"limit":1e400}}"#);
    let w = env.worker();
    let job = pending_job_id(&mut env);
    env.decide(&job, "approve", "cfo@example.com");
    let done = env.wait_results(1, Duration::from_secs(20));
    stop(w);
    assert_eq!(done.len(), 1);
    assert!(env.dead().is_empty(), "dead-lettered: {:?}", env.dead());
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    assert_eq!(done[0]["state"]["paid"], true);
    let log_path = PathBuf::from(done[0]["audit_log"].as_str().unwrap());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains(r#""limit":Infinity"#),
        "written as Python writes it"
    );
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let v = lar_worker::audit::verify_file(&log_path, &secret);
    assert!(v.is_valid(), "{v:?}");
    assert!(
        verify_with_python(&log_path),
        "Lár's recipe accepts the log"
    );
}

/// A run that completes is forgotten by the checkpoint store: no checkpoint or journal stays.
fn a_finished_run_leaves_no_checkpoint(kind: Kind) {
    let graph = "name = \"three\"\nentry = \"a\"\n\
        [[nodes]]\nid = \"a\"\ntype = \"set\"\nkey = \"x\"\nvalue = 1\nnext = \"b\"\n\
        [[nodes]]\nid = \"b\"\ntype = \"set\"\nkey = \"y\"\nvalue = 2\nnext = \"c\"\n\
        [[nodes]]\nid = \"c\"\ntype = \"set\"\nkey = \"z\"\nvalue = 3\n";
    let mut env = Env::new(kind, graph, "state", 5000, &[]);
    for i in 0..5 {
        env.push(&format!(r#"{{"n":{i}}}"#));
    }
    let w = env.worker();
    let results = env.wait_results(5, Duration::from_secs(30));
    stop(w);
    assert_eq!(results.len(), 5);
    for r in &results {
        assert_eq!(r["__lar_worker"]["status"], "completed", "{r}");
        assert_eq!(r["z"], 3, "{r}");
    }
    assert_eq!(env.checkpoints_left(), 0, "finished runs are forgotten");
}

/// Without a human pause (AMQP without a checkpoint store) a jury halt is the job's final, `halted` result, and the
/// run is forgotten like any finished one.
fn a_halt_without_pause_is_a_final_result(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-final","input":{"amount":5000}}"#);
    let w = env.worker();
    let results = env.wait_results(1, Duration::from_secs(30));
    stop(w);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "halted", "{}", results[0]);
    assert_eq!(env.checkpoints_left(), 0);
    let (code, out, _) = env.cli(&["pending"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains("loan-final"),
        "nothing waits for a human: {out}"
    );
}

/// The same scenarios with the checkpoint store in a SQLite file (the replicas of one host).
mod amqp_sqlite_store {
    #[test]
    fn halt_stop_every_worker_decide_resume_elsewhere() {
        super::halt_stop_every_worker_decide_resume_elsewhere(super::Kind::AmqpSqlite)
    }
    #[test]
    fn tampered_checkpoint_is_refused() {
        super::tampered_checkpoint_is_refused(super::Kind::AmqpSqlite)
    }
    #[test]
    fn tampered_state_is_refused() {
        super::tampered_state_is_refused(super::Kind::AmqpSqlite)
    }
    #[test]
    fn decisions_arrive_as_messages() {
        super::decisions_arrive_as_messages(super::Kind::AmqpSqlite)
    }
    #[test]
    fn kill_9_mid_run_resumes_without_replaying_completed_steps() {
        super::kill_9_mid_run_resumes_without_replaying_completed_steps(super::Kind::AmqpSqlite)
    }
    #[test]
    fn sigterm_hands_a_long_run_back_at_a_step_boundary() {
        super::sigterm_hands_a_long_run_back_at_a_step_boundary(super::Kind::AmqpSqlite)
    }
    #[test]
    fn a_finished_run_leaves_no_checkpoint() {
        super::a_finished_run_leaves_no_checkpoint(super::Kind::AmqpSqlite)
    }
    #[test]
    fn replicas_killed_at_random_lose_no_job_and_replay_no_completed_step() {
        super::replicas_killed_at_random_lose_no_job_and_replay_no_completed_step(
            super::Kind::AmqpSqlite,
        )
    }
    #[test]
    fn paused_jobs_decided_while_replicas_die() {
        super::paused_jobs_decided_while_replicas_die(super::Kind::AmqpSqlite)
    }
    #[test]
    fn connections_cut_at_random_lose_nothing() {
        super::connections_cut_at_random_lose_nothing(super::Kind::AmqpSqlite)
    }
}

/// Every scenario but the frozen worker (AMQP has no lease to expire: a frozen consumer keeps
/// its deliveries until the broker's heartbeat timeout, `tests/amqp_backend.rs`), on RabbitMQ
/// with the Redis checkpoint store.
mod amqp_backend {
    #[test]
    fn a_decision_that_does_not_fit_leaves_the_job_waiting() {
        super::a_decision_that_does_not_fit_leaves_the_job_waiting(super::Kind::Amqp)
    }
    #[test]
    fn halt_stop_every_worker_decide_resume_elsewhere() {
        super::halt_stop_every_worker_decide_resume_elsewhere(super::Kind::Amqp)
    }
    #[test]
    fn tampered_checkpoint_is_refused() {
        super::tampered_checkpoint_is_refused(super::Kind::Amqp)
    }
    #[test]
    fn tampered_state_is_refused() {
        super::tampered_state_is_refused(super::Kind::Amqp)
    }
    #[test]
    fn decisions_arrive_as_messages() {
        super::decisions_arrive_as_messages(super::Kind::Amqp)
    }
    #[test]
    fn an_expired_pending_job_takes_the_default_path() {
        super::an_expired_pending_job_takes_the_default_path(super::Kind::Amqp)
    }
    #[test]
    fn kill_9_mid_run_resumes_without_replaying_completed_steps() {
        super::kill_9_mid_run_resumes_without_replaying_completed_steps(super::Kind::Amqp)
    }
    #[test]
    fn sigterm_hands_a_long_run_back_at_a_step_boundary() {
        super::sigterm_hands_a_long_run_back_at_a_step_boundary(super::Kind::Amqp)
    }
    #[test]
    fn a_halt_without_pause_is_a_final_result() {
        super::a_halt_without_pause_is_a_final_result(super::Kind::AmqpWithoutStore)
    }
    #[test]
    fn an_rpc_caller_hears_the_pause_then_the_result() {
        super::an_rpc_caller_hears_the_pause_then_the_result()
    }
    #[test]
    fn a_decision_the_broker_never_got_is_published_again() {
        super::a_decision_the_broker_never_got_is_published_again()
    }
    #[test]
    fn a_forged_decision_header_is_ignored() {
        super::a_forged_decision_header_is_ignored()
    }
    #[test]
    fn a_finished_run_leaves_no_checkpoint() {
        super::a_finished_run_leaves_no_checkpoint(super::Kind::Amqp)
    }
    #[test]
    fn replicas_killed_at_random_lose_no_job_and_replay_no_completed_step() {
        super::replicas_killed_at_random_lose_no_job_and_replay_no_completed_step(super::Kind::Amqp)
    }
    #[test]
    fn paused_jobs_decided_while_replicas_die() {
        super::paused_jobs_decided_while_replicas_die(super::Kind::Amqp)
    }
    #[test]
    fn connections_cut_at_random_lose_nothing() {
        super::connections_cut_at_random_lose_nothing(super::Kind::Amqp)
    }
}

/// AMQP: a job sent with `reply_to` and `correlation_id` answers its caller twice, both times
/// with the caller's `correlation_id`: `awaiting_decision` when it pauses (the delivery acked),
/// then the final result after a human decides.
fn an_rpc_caller_hears_the_pause_then_the_result() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let env = Env::new(Kind::Amqp, LOAN, "envelope", 5000, &[]);
    let w = env.worker();
    let replies = env.rt.block_on(async {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
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
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                reply.name().as_str(),
                "caller",
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        ch.basic_publish(
            "",
            &env.queue,
            BasicPublishOptions::default(),
            br#"{"id":"loan-rpc","input":{"amount":5000}}"#,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_reply_to(reply.name().clone())
                .with_correlation_id("corr-42".into())
                .with_message_id("loan-rpc".into()),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        for round in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .unwrap_or_else(|_| panic!("no reply {round} within 30 s"))
                .unwrap()
                .unwrap();
            let corr = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            let v: Value = serde_json::from_slice(&d.data).unwrap();
            if round == 0 {
                let (code, out, err) = env.cli(&[
                    "decide",
                    "loan-rpc",
                    "--choice",
                    "approve",
                    "--by",
                    "cfo@example.com",
                ]);
                assert_eq!(code, 0, "{out}{err}");
            }
            got.push((corr, v));
        }
        let _ = conn.close(200, "done").await;
        got
    });
    stop(w);
    assert_eq!(replies[0].0.as_deref(), Some("corr-42"));
    assert_eq!(
        replies[0].1["status"], "awaiting_decision",
        "{}",
        replies[0].1
    );
    assert_eq!(replies[1].0.as_deref(), Some("corr-42"));
    assert_eq!(replies[1].1["status"], "completed", "{}", replies[1].1);
    assert_eq!(replies[1].1["state"]["paid"], true);
}

/// Two juries in a row: a copy of the first decision delivered while the run waits at the
/// second (a resume message published twice) is not applied there; the run pauses again and
/// only a decision for the second jury moves it on.
#[test]
fn a_late_copy_of_a_decision_does_not_answer_the_next_jury() {
    let graph = r#"
name = "two-juries"
entry = "first"
[[nodes]]
id = "first"
type = "human_jury"
prompt = "First sign-off?"
choices = ["approve", "reject"]
output = "first_decision"
next = "second"
[[nodes]]
id = "second"
type = "human_jury"
prompt = "Second sign-off?"
choices = ["approve", "reject"]
output = "second_decision"
"#;
    let mut env = Env::new(Kind::Embedded, graph, "envelope", 5000, &[]);
    let msg = r#"{"id":"two-1","input":{"amount":5}}"#;
    env.push(msg);
    let w = env.worker();
    let wait_pending_at = |env: &Env, node: &str| {
        let start = Instant::now();
        loop {
            let (_, out, _) = env.cli(&["pending"]);
            if out.contains(&format!("\"node\":\"{node}\"")) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not pending at {node}: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_pending_at(&env, "first");
    env.decide("two-1", "approve", "a@x");
    wait_pending_at(&env, "second");

    // The copy: the same job queued again carrying the first decision (step 1), signed with
    // the workers' secret as `decide` signs it, so only the halt check can refuse it.
    let mut first = lar_worker::exec::Decision {
        choice: "approve".into(),
        rationale: "".into(),
        decided_by: "a@x".into(),
        role: None,
        step: Some(1),
        signature: None,
    };
    first.sign("two-1", &lar_worker::audit::Secret::new(SECRET).unwrap());
    let first = serde_json::to_string(&first).unwrap();
    env.db()
        .execute(
            "INSERT INTO jobs (queue, job_id, payload, state, available_at, enqueued_at, decision)
             VALUES (?1, 'two-1', ?2, 'ready', 0, 0, ?3)",
            rusqlite::params![env.queue, msg.as_bytes(), first],
        )
        .unwrap();
    let start = Instant::now();
    while env
        .db()
        .query_row(
            "SELECT COUNT(*) FROM jobs WHERE job_id = 'two-1'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the copy was not taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It paused at the second jury again instead of deciding it.
    wait_pending_at(&env, "second");
    assert!(
        env.results_now().iter().all(|r| r["status"] != "completed"),
        "the copy completed the run"
    );
    env.decide("two-1", "reject", "b@x");
    let results = env.wait_results(4, Duration::from_secs(20));
    stop(w);
    let done: Vec<&Value> = results
        .iter()
        .filter(|r| r["status"] == "completed")
        .collect();
    assert_eq!(done.len(), 1, "{results:?}");
    assert_eq!(done[0]["state"]["first_decision"], "approve");
    assert_eq!(
        done[0]["state"]["second_decision"], "reject",
        "the copy did not decide it"
    );
}

/// AMQP: a crash between taking a decision (pending → deciding in the store) and the broker's
/// confirm of the resume message leaves the decision in `deciding`; a worker publishes it again.
fn a_decision_the_broker_never_got_is_published_again() {
    let mut env = Env::new(Kind::Amqp, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-lost","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    stop(w1);
    let pending_key = format!("{}:pending", env.queue);
    let deciding_key = format!("{}:deciding", env.queue);
    let pending: String = env.redis.hget(&pending_key, &job).unwrap();
    let _: () = env.redis.hdel(&pending_key, &job).unwrap();
    // What `decide` stored before the crash: the decision for the halt, signed.
    let halt_step = serde_json::from_str::<Value>(&pending).unwrap()["step"]
        .as_u64()
        .unwrap();
    let mut decision = lar_worker::exec::Decision {
        choice: "approve".into(),
        rationale: "ok".into(),
        decided_by: "cfo@example.com".into(),
        role: None,
        step: Some(halt_step),
        signature: None,
    };
    decision.sign(&job, &lar_worker::audit::Secret::new(SECRET).unwrap());
    let decision = serde_json::to_string(&decision).unwrap();
    let at = chrono::Utc::now().timestamp_millis() - 120_000;
    let entry =
        serde_json::json!({"at": at, "decision": decision, "pending": pending, "props": "{}"});
    let _: () = env
        .redis
        .hset(&deciding_key, &job, entry.to_string())
        .unwrap();
    let (code, out, _) = env.cli(&["pending"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&job), "decided, so not pending: {out}");

    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(20));
    stop(w2);
    assert_eq!(results.len(), 1, "the decision resumed the run");
    assert_eq!(results[0]["status"], "completed", "{}", results[0]);
    assert_eq!(results[0]["state"]["paid"], true);
    let left: usize = env.redis.hlen(&deciding_key).unwrap();
    assert_eq!(left, 0, "the delivered decision is forgotten");
}

/// AMQP: anyone who may publish to the work queue can write an `x-lar-decision` header. A
/// decision that was not submitted through `decide` (unsigned, or signed for other values) is
/// ignored: the run waits again, and only the real decision resumes it.
fn a_forged_decision_header_is_ignored() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let mut env = Env::new(Kind::Amqp, LOAN, "envelope", 5000, &[]);
    let job_msg = r#"{"id":"loan-f","input":{"amount":5000}}"#;
    env.push(job_msg);
    let w = env.worker();
    let job = pending_job_id(&mut env);
    let pending: String = env
        .redis
        .hget(format!("{}:pending", env.queue), &job)
        .unwrap();
    let halt_step = serde_json::from_str::<Value>(&pending).unwrap()["step"]
        .as_u64()
        .unwrap();
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let mut signed_for_reject = lar_worker::exec::Decision {
        choice: "reject".into(),
        rationale: String::new(),
        decided_by: "mallory".into(),
        role: None,
        step: Some(halt_step),
        signature: None,
    };
    signed_for_reject.sign(&job, &secret);
    let mut altered = signed_for_reject.clone();
    altered.choice = "approve".into();
    let forgeries = [
        format!(
            r#"{{"choice":"approve","rationale":"","decided_by":"mallory","step":{halt_step}}}"#
        ),
        serde_json::to_string(&altered).unwrap(),
    ];
    for forged in &forgeries {
        env.rt.block_on(async {
            let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut headers = FieldTable::default();
            headers.insert(
                "x-lar-decision".into(),
                AMQPValue::LongString(forged.as_str().into()),
            );
            ch.basic_publish(
                "",
                &env.queue,
                BasicPublishOptions::default(),
                job_msg.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(job.as_str().into())
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
            let _ = conn.close(200, "ok").await;
        });
        let results = env.wait_results(1, Duration::from_secs(20));
        assert_eq!(results.len(), 1);
        assert_eq!(
            results[0]["status"], "awaiting_decision",
            "a forged decision does not resume the run: {}",
            results[0]
        );
        env.clear_results();
    }
    env.decide(&job, "approve", "cfo@example.com");
    let results = env.wait_results(1, Duration::from_secs(20));
    stop(w);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "completed", "{}", results[0]);
    assert_eq!(results[0]["state"]["paid"], true);
    let log_path = PathBuf::from(results[0]["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    let deciders: Vec<&Value> = log["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.get("decision"))
        .collect();
    assert_eq!(deciders.len(), 1, "one decision applied: {deciders:?}");
    assert_eq!(deciders[0]["decided_by"], "cfo@example.com");
}

fn sigterm_hands_a_long_run_back_at_a_step_boundary(kind: Kind) {
    let mut env = Env::new(
        kind,
        &twenty_step_graph(),
        "state",
        5000,
        &[("effect.py", SIDE_EFFECT_TOOL)],
    );
    env.push(r#"{"job":"long"}"#);
    let side = env.dir.path().join("side.txt");
    let stderr = env.dir.path().join("w1.log");
    let mut w1 = env.worker_logging_to(std::fs::File::create(&stderr).unwrap());
    wait_for_side_effects(&side, 5);
    let stopped = Instant::now();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(w1.id().to_string())
        .status();
    // The signal is delivered (kill(1) has exited): from here on, only a step the worker had
    // started before it saw the signal may still run.
    let started_by_signal = std::fs::read_to_string(&side).unwrap().lines().count();
    let status = w1.wait().unwrap();
    let took = stopped.elapsed();
    assert!(status.success(), "clean exit");
    let done_before = std::fs::read_to_string(&side).unwrap().lines().count();
    // Stopped at the next boundary, not after the whole graph: counted in steps, not seconds
    // (one step is a python3 start-up, which two busy cores can stretch past a second).
    assert!(
        done_before <= started_by_signal + 1,
        "steps went on after the signal: {started_by_signal} had started, {done_before} ran"
    );
    assert!(
        done_before < 20,
        "handed back unfinished ({done_before} steps ran)"
    );
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        !log.contains("drain deadline reached"),
        "the step ended within the drain; the deadline did not cut it off:\n{log}"
    );
    // What the worker promises systemd for a stop (EXTEND_TIMEOUT_USEC): the drain (3 s here)
    // plus its 12 s margin for the claims, the decision loops and the deregistration.
    assert!(
        took < Duration::from_secs(3 + 12),
        "the stop took {took:?}, past the drain and its margin"
    );
    assert!(env.results_now().is_empty());
    let w2_log = env.dir.path().join("w2.log");
    let w2 = env.worker_logging_to(std::fs::File::create(&w2_log).unwrap());
    let results = env.wait_results(1, Duration::from_secs(40));
    stop(w2);
    assert_eq!(results.len(), 1);
    let lines: Vec<String> = std::fs::read_to_string(&side)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut distinct = lines.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 20);
    assert_eq!(
        lines.len(),
        20,
        "no step ran twice: the stop waited for the step to end; {done_before} ran before the \
         stop: {lines:?}\nw1: {log}\nw2: {}",
        std::fs::read_to_string(&w2_log).unwrap_or_default()
    );
}

/// A second SIGTERM ends the drain at once: the step still running is cut off, the job is
/// handed back, and the next worker runs that step again (it was never finished) and completes.
fn a_second_sigterm_stops_at_once(kind: Kind) {
    const SLOW_ONCE: &str = r#"
import json, os, sys, time
json.load(sys.stdin)
side = os.environ["SIDE_FILE"]
first = not os.path.exists(side)
with open(side, "a") as f:
    f.write(os.environ["LAR_IDEMPOTENCY_KEY"] + "\n")
if first:
    time.sleep(60)
print(json.dumps({"ok": True}))
"#;
    let graph = "name = \"slow\"\nentry = \"slow\"\n\
        [[nodes]]\nid = \"slow\"\ntype = \"tool\"\ntool = \"slow\"\noutput = \"r\"\nnext = \"done\"\n\
        [[nodes]]\nid = \"done\"\ntype = \"set\"\nkey = \"status\"\nvalue = \"done\"\n\
        [tools.slow]\ncommand = [\"python3\", \"$DIR/slow.py\"]\ntimeout_ms = 120000\n\
        env = { SIDE_FILE = \"$DIR/side.txt\" }\n";
    let mut env = Env::new(kind, graph, "state", 5000, &[("slow.py", SLOW_ONCE)]);
    // A drain long enough that only the second signal can end it this soon.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("drain_timeout_ms = 3000", "drain_timeout_ms = 60000"),
    )
    .unwrap();
    env.push(r#"{"job":"slow"}"#);
    let side = env.dir.path().join("side.txt");
    let mut w1 = env.worker();
    wait_for_side_effects(&side, 1);
    let pid = w1.id().to_string();
    signal("-TERM", &pid);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w1.try_wait().unwrap().is_none(),
        "one SIGTERM drains: the running step may finish"
    );
    let second = Instant::now();
    signal("-TERM", &pid);
    let status = w1.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "the second SIGTERM stopped it at once, not after the 60 s step or drain: {:?}",
        second.elapsed()
    );
    assert!(env.results_now().is_empty(), "nothing published");
    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(30));
    stop(w2);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "done", "{}", results[0]);
    let runs = std::fs::read_to_string(&side).unwrap();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        vec![runs.lines().next().unwrap(); 2],
        "the cut-off step ran again under the same idempotency key"
    );
}

/// The replica scenarios' tool: notes that its step started (the idempotency key, `job:step`)
/// before it works, so a step cut off by a kill and run again shows as a second line.
const NOTING_TOOL: &str = "#!/bin/sh\ncat > /dev/null\necho \"$LAR_IDEMPOTENCY_KEY\" >> \"$SIDE_FILE\"\nsleep 0.08\necho '{\"ok\":true}'\n";
const NOTING_TOOL_DEF: &str = "[tools.note]\ncommand = [\"sh\", \"$DIR/note.sh\"]\ntimeout_ms = 10000\nenv = { SIDE_FILE = \"$DIR/side.txt\" }\n";

const CHAOS_STEPS: usize = 8;
const CHAOS_JOBS: usize = 40;
/// Env's worker config: the most steps one kill can cut off.
const CHAOS_CONCURRENCY: usize = 4;

fn chaos_graph() -> String {
    let mut g = String::from("name = \"chaos\"\nentry = \"s0\"\n");
    for i in 0..CHAOS_STEPS {
        g.push_str(&format!(
            "[[nodes]]\nid = \"s{i}\"\ntype = \"tool\"\ntool = \"note\"\noutput = \"r{i}\"\n{}\n",
            if i + 1 < CHAOS_STEPS {
                format!("next = \"s{}\"", i + 1)
            } else {
                String::new()
            }
        ));
    }
    g + NOTING_TOOL_DEF
}

/// Three replicas of one queue that a seeded schedule kills (`kill -9`, now and then a
/// SIGTERM) and restarts, and on the backends with leases also freezes (SIGSTOP) past their
/// lease and thaws. The seed is printed; `CHAOS_SEED=n` replays a schedule.
struct Replicas {
    live: Vec<Proc>,
    started: usize,
    kills: usize,
    terms: usize,
    freezes: usize,
    /// Connections cut (`ss -K`): to the broker, and to Redis (the backend or the store).
    broker_cuts: usize,
    redis_cuts: usize,
    thaws: Vec<std::thread::JoinHandle<()>>,
    seed: u64,
    rng: rand::rngs::StdRng,
}

impl Replicas {
    fn start(env: &Env) -> Replicas {
        use rand::SeedableRng;
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        let mut r = Replicas {
            live: Vec::new(),
            started: 0,
            kills: 0,
            terms: 0,
            freezes: 0,
            broker_cuts: 0,
            redis_cuts: 0,
            thaws: Vec::new(),
            seed,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        };
        for _ in 0..3 {
            let child = r.spawn(env);
            r.live.push(child);
        }
        r
    }

    fn spawn(&mut self, env: &Env) -> Proc {
        self.started += 1;
        let log = env.dir.path().join(format!("replica-{}.log", self.started));
        env.worker_logging_to(std::fs::File::create(log).unwrap())
    }

    /// Waits a random while, then kills or stops one replica at random and starts another,
    /// or (backends with leases) freezes one for longer than its lease: others take its jobs
    /// over, and once thawed it can neither checkpoint nor publish them.
    fn strike(&mut self, env: &Env) {
        use rand::Rng;
        std::thread::sleep(Duration::from_millis(self.rng.random_range(150..450)));
        let victim = self.rng.random_range(0..self.live.len());
        if env.kind != Kind::Embedded && self.rng.random_bool(0.2) && self.cut(victim) {
            return;
        }
        let leases = matches!(env.kind, Kind::Redis | Kind::Embedded);
        if leases && self.rng.random_bool(0.2) {
            self.freezes += 1;
            let pid = self.live[victim].id().to_string();
            signal("-STOP", &pid);
            self.thaws.push(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2500));
                signal("-CONT", &pid);
            }));
            return;
        }
        let fresh = self.spawn(env);
        let old = std::mem::replace(&mut self.live[victim], fresh);
        if self.rng.random_bool(0.25) {
            self.terms += 1;
            stop(old);
        } else {
            self.kills += 1;
            kill9(old);
        }
    }

    /// Aborts one of replica `victim`'s connections (Redis, the broker, the store) at random;
    /// false when it has none.
    fn cut(&mut self, victim: usize) -> bool {
        use rand::Rng;
        let pid = self.live[victim].id();
        let mut conns = connections_of(pid, 6379);
        conns.extend(connections_of(pid, 5672));
        if conns.is_empty() {
            return false;
        }
        let (local, peer) = conns[self.rng.random_range(0..conns.len())].clone();
        if !cut_connection(&local, peer) {
            return false;
        }
        if peer == 5672 {
            self.broker_cuts += 1;
        } else {
            self.redis_cuts += 1;
        }
        true
    }

    fn stop_all(&mut self) {
        for thaw in self.thaws.drain(..) {
            let _ = thaw.join();
        }
        for r in self.live.drain(..) {
            stop(r);
        }
    }

    fn context(&self) -> String {
        format!(
            "seed {}, {} kills, {} stops, {} freezes, {} broker and {} Redis connections cut",
            self.seed, self.kills, self.terms, self.freezes, self.broker_cuts, self.redis_cuts
        )
    }

    /// The most steps the schedule can have cut off: each kill, freeze or connection cut (a
    /// broker's gives its deliveries back; a reconnect to Redis can outlast a short lease), one
    /// per job the replica held.
    fn cut_off(&self) -> usize {
        (self.kills + self.freezes + self.broker_cuts + self.redis_cuts) * CHAOS_CONCURRENCY
    }

    /// Every replica's stderr, for a failure's message.
    fn logs(&self, env: &Env) -> String {
        (1..=self.started)
            .map(|n| {
                let file = env.dir.path().join(format!("replica-{n}.log"));
                let text = std::fs::read_to_string(file).unwrap_or_default();
                format!("--- replica {n}\n{text}")
            })
            .collect()
    }

    /// How many distinct jobs have a result with `status` (a repeated AMQP result counts once).
    fn jobs_with(results: &[Value], status: &str) -> usize {
        results
            .iter()
            .filter(|r| r["status"] == status)
            .filter_map(|r| r["job_id"].as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    /// Waits until `n` distinct jobs have a `completed` result, or `within` passed.
    fn wait_completed(env: &Env, n: usize, within: Duration) {
        let start = Instant::now();
        while Self::jobs_with(&env.results_now(), "completed") < n && start.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The results with `status`, one per job id, after checking how often each repeats. A
    /// broker has no atomic "publish and ack": a replica killed after the broker confirmed a
    /// result and before its done marker and ack leaves the delivery to come back and publish
    /// the same result again (README, "one result per job"). So on AMQP a result may repeat,
    /// byte for byte, at most once for each job a killed replica held; on Redis and the
    /// embedded file the finish is atomic and nothing repeats.
    fn one_per_job<'a>(
        &self,
        env: &Env,
        results: &'a [Value],
        status: &str,
    ) -> std::collections::BTreeMap<String, &'a Value> {
        let mut by_job: std::collections::BTreeMap<String, Vec<&Value>> = Default::default();
        for r in results.iter().filter(|r| r["status"] == status) {
            let id = r["job_id"].as_str().unwrap_or("?").to_string();
            by_job.entry(id).or_default().push(r);
        }
        let amqp = matches!(env.kind, Kind::Amqp | Kind::AmqpSqlite);
        let mut repeated = 0;
        for (id, rs) in &by_job {
            repeated += rs.len() - 1;
            assert!(
                rs.iter().all(|r| *r == rs[0]) && (amqp || rs.len() == 1),
                "{}: job {id} has {} {status} results: {rs:?}\n{}",
                self.context(),
                rs.len(),
                self.logs(env)
            );
        }
        assert!(
            repeated <= if amqp { self.cut_off() } else { 0 },
            "{}: {repeated} {status} results repeated\n{}",
            self.context(),
            self.logs(env)
        );
        by_job.into_iter().map(|(id, rs)| (id, rs[0])).collect()
    }

    /// No run is left live; a run is left retired (to expire) only where a kill fell between
    /// an AMQP ack and the run's cleanup, at most one per job the killed replica held.
    fn check_runs_left(&self, env: &mut Env) {
        let (live, retired) = env.runs_left();
        assert_eq!(live, 0, "{}: no run left behind", self.context());
        assert!(
            retired <= self.cut_off(),
            "{}: {retired} retired runs left",
            self.context()
        );
    }

    /// The side-effect lines: each expected step ran, and a step ran again only where a kill
    /// cut it off (at most one step per job the killed replica held). Returns the repeats.
    fn check_side_effects(&self, env: &Env, expected: usize) -> usize {
        let lines: Vec<String> = std::fs::read_to_string(env.dir.path().join("side.txt"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let mut distinct = lines.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            expected,
            "{}: every step ran",
            self.context()
        );
        let replayed = lines.len() - distinct.len();
        assert!(
            replayed <= self.cut_off(),
            "{}: {replayed} steps ran again, more than the kills could cut off",
            self.context()
        );
        replayed
    }
}

/// A final log's steps, after checking it verifies.
fn verified_steps(log_path: &Path) -> Vec<Value> {
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let v = lar_worker::audit::verify_file(log_path, &secret);
    assert!(v.is_valid(), "{}: {v:?}", log_path.display());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(log_path).unwrap()).unwrap();
    log["steps"].as_array().unwrap().clone()
}

fn node_ids(steps: &[Value]) -> Vec<&str> {
    steps
        .iter()
        .map(|s| s["node_id"].as_str().unwrap())
        .collect()
}

/// A backlog of `CHAOS_JOBS` multi-step jobs worked through by three replicas that `strike`
/// hits up to `strikes` times (until every job is done). Then every job ends with one result
/// (AMQP: see [`Replicas::one_per_job`]), nothing is dead-lettered, each log holds every step
/// once and verifies, no run is left behind, and a step ran a second time only where a strike
/// cut it off. Returns the replicas (stopped), the env and how many steps ran again.
fn backlog_under_fire(
    kind: Kind,
    lease_ms: u64,
    strikes: usize,
    mut strike: impl FnMut(&mut Replicas, &Env),
) -> (Replicas, Env, usize) {
    let mut env = Env::new(
        kind,
        &chaos_graph(),
        "envelope",
        lease_ms,
        &[("note.sh", NOTING_TOOL)],
    );
    env.forgive_recoveries();
    for i in 0..CHAOS_JOBS {
        env.push(&format!(r#"{{"id":"chaos-{i}","input":{{"n":{i}}}}}"#));
    }
    let mut replicas = Replicas::start(&env);
    for _ in 0..strikes {
        if Replicas::jobs_with(&env.results_now(), "completed") >= CHAOS_JOBS {
            break;
        }
        strike(&mut replicas, &env);
    }
    Replicas::wait_completed(&env, CHAOS_JOBS, Duration::from_secs(90));
    // Anything still on its way (a second result, a late zombie) has time to show.
    std::thread::sleep(Duration::from_secs(2));
    let results = env.results_now();
    replicas.stop_all();
    let context = replicas.context();
    let finals = replicas.one_per_job(&env, &results, "completed");
    assert_eq!(
        finals.len(),
        CHAOS_JOBS,
        "{context}: every job completed: {results:?}\n{}",
        replicas.logs(&env)
    );
    assert!(
        env.dead().is_empty(),
        "{context}: dead letters {:?}",
        env.dead()
    );
    let expected: Vec<String> = (0..CHAOS_STEPS).map(|i| format!("s{i}")).collect();
    for r in finals.values() {
        let steps = verified_steps(Path::new(r["audit_log"].as_str().unwrap()));
        assert_eq!(
            node_ids(&steps),
            expected,
            "{context}: every step once, in order"
        );
    }
    let replayed = replicas.check_side_effects(&env, CHAOS_JOBS * CHAOS_STEPS);
    replicas.check_runs_left(&mut env);
    eprintln!("{context}: {replayed} steps ran again");
    (replicas, env, replayed)
}

/// Several replicas of one queue, killed, stopped, frozen and cut off at random while they
/// work through a backlog ([`backlog_under_fire`]); a SIGTERM cuts off nothing.
fn replicas_killed_at_random_lose_no_job_and_replay_no_completed_step(kind: Kind) {
    backlog_under_fire(kind, 1500, 10, |replicas, env| replicas.strike(env));
}

/// Jobs that pause for a human while their replicas are killed and restarted at random; the
/// humans answer as they see each request, half through `lar-worker decide`, half as messages
/// on the decisions queue (which the replicas under fire consume). Every job asks once (AMQP:
/// the same request may repeat, see [`Replicas::one_per_job`]), takes its decision once,
/// completes once on the decided path, and its log (the pause, the decision, the resumed
/// steps) verifies; nothing stays pending, dead-lettered or stored.
fn paused_jobs_decided_while_replicas_die(kind: Kind) {
    const JOBS: usize = 20;
    let graph = format!(
        "name = \"chaos-jury\"\nentry = \"s0\"\n\
         [[nodes]]\nid = \"s0\"\ntype = \"tool\"\ntool = \"note\"\noutput = \"r0\"\nnext = \"jury\"\n\
         [[nodes]]\nid = \"jury\"\ntype = \"human_jury\"\nprompt = \"Go on?\"\nchoices = [\"approve\", \"reject\"]\nnext = \"route\"\n\
         [[nodes]]\nid = \"route\"\ntype = \"router\"\non = \"jury_decision\"\nroutes = {{ approve = \"s2\", reject = \"s2\" }}\n\
         [[nodes]]\nid = \"s2\"\ntype = \"tool\"\ntool = \"note\"\noutput = \"r2\"\nnext = \"s3\"\n\
         [[nodes]]\nid = \"s3\"\ntype = \"tool\"\ntool = \"note\"\noutput = \"r3\"\n{NOTING_TOOL_DEF}"
    );
    let mut env = Env::new(kind, &graph, "envelope", 1500, &[("note.sh", NOTING_TOOL)]);
    env.forgive_recoveries();
    for i in 0..JOBS {
        env.push(&format!(r#"{{"id":"jury-{i}","input":{{"n":{i}}}}}"#));
    }
    let number = |job: &str| -> usize { job.trim_start_matches("jury-").parse().unwrap() };
    let choice = |job: &str| {
        if number(job) % 3 == 0 {
            "reject"
        } else {
            "approve"
        }
    };
    let mut replicas = Replicas::start(&env);
    let mut decided = std::collections::BTreeSet::new();
    let start = Instant::now();
    let mut strikes = 0;
    loop {
        let results = env.results_now();
        let done = Replicas::jobs_with(&results, "completed");
        if done >= JOBS || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        for r in results
            .iter()
            .filter(|r| r["status"] == "awaiting_decision")
        {
            let job = r["decision_request"]["job_id"]
                .as_str()
                .unwrap()
                .to_string();
            if decided.contains(&job) {
                continue;
            }
            let by = format!("officer-{}@example.com", number(&job));
            if number(&job) % 2 == 0 {
                let args = [
                    "decide",
                    &job,
                    "--choice",
                    choice(&job),
                    "--rationale",
                    "checked",
                    "--by",
                    &by,
                ];
                let (code, out, err) = env.cli(&args);
                assert_eq!(code, 0, "{}: decide {job}: {out}{err}", replicas.context());
            } else {
                let msg = format!(
                    r#"{{"job_id":"{job}","choice":"{}","rationale":"checked","by":"{by}"}}"#,
                    choice(&job)
                );
                env.rt
                    .block_on(env.backend.enqueue(&env.decisions(), msg.as_bytes()))
                    .unwrap();
            }
            decided.insert(job);
        }
        if strikes < 10 {
            strikes += 1;
            replicas.strike(&env);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let results = env.results_now();
    replicas.stop_all();
    let context = replicas.context();
    let asked = replicas.one_per_job(&env, &results, "awaiting_decision");
    let finals = replicas.one_per_job(&env, &results, "completed");
    assert_eq!(
        (asked.len(), finals.len()),
        (JOBS, JOBS),
        "{context}: every job asked and completed: {results:?}\n{}",
        replicas.logs(&env)
    );
    let expected = ["s0", "jury", "jury", "route", "s2", "s3"];
    for (job, r) in &finals {
        assert_eq!(r["state"]["jury_decision"], choice(job), "{context}: {r}");
        let steps = verified_steps(Path::new(r["audit_log"].as_str().unwrap()));
        assert_eq!(node_ids(&steps), expected, "{context}: {job}");
        let decisions: Vec<&Value> = steps.iter().filter_map(|s| s.get("decision")).collect();
        assert_eq!(decisions.len(), 1, "{context}: {job} took one decision");
        let by = format!("officer-{}@example.com", number(job));
        assert_eq!(decisions[0]["decided_by"], by.as_str(), "{context}: {job}");
    }
    assert!(
        env.dead().is_empty(),
        "{context}: dead letters {:?}",
        env.dead()
    );
    let (code, out, _) = env.cli(&["pending"]);
    assert_eq!(code, 0);
    assert!(!out.contains("jury-"), "{context}: still pending: {out}");
    // s0, s2 and s3 of every job (the idempotency key is job:step index).
    let replayed = replicas.check_side_effects(&env, JOBS * 3);
    replicas.check_runs_left(&mut env);
    eprintln!("{context}: {replayed} steps ran again");
}

/// The TCP connections the process `pid` holds to 127.0.0.1 on `port`, as (local port, peer
/// port), read from `ss`.
fn connections_of(pid: u32, port: u16) -> Vec<(String, u16)> {
    let out = Command::new("ss")
        .args(["-tnpH", &format!("dport = :{port}")])
        .output()
        .expect("ss (iproute2) lists the replicas' connections");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next().map(|p| (p.to_string(), port)))
        .collect()
}

/// Aborts one TCP connection on this host (`ss -K`): both ends see it die at once, as when a
/// network path or a middlebox drops it.
fn cut_connection(local_port: &str, peer_port: u16) -> bool {
    Command::new("ss")
        .args([
            "-K",
            "dst",
            "127.0.0.1",
            "dport",
            "=",
            &format!(":{peer_port}"),
            "sport",
            "=",
            &format!(":{local_port}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Connections of live replicas (Redis, the broker, the checkpoint store's Redis) cut at
/// random while they work through a backlog: blocked claims, step saves, publishes, confirms,
/// acks and finishes lose their connection or their reply mid-call. Every job still completes,
/// each log holds every step once and verifies, and nothing is left behind. On Redis no step
/// runs twice: no process died, and a call whose reply was lost is retried (every write is
/// idempotent or fenced), not its step. On AMQP the connection is the claim: a cut one gives
/// its deliveries back, so the steps they were running may run again (at most one per job
/// the replica held) and a result whose confirm was lost may repeat, byte for byte.
fn connections_cut_at_random_lose_nothing(kind: Kind) {
    use rand::Rng;
    // A lease far longer than a reconnect's backoff (up to 2 s): a lease that lapsed while a
    // replica reconnected would legitimately run a step again elsewhere.
    let (replicas, env, replayed) = backlog_under_fire(kind, 10_000, 25, |replicas, _| {
        std::thread::sleep(Duration::from_millis(replicas.rng.random_range(50..250)));
        let victim = replicas.rng.random_range(0..replicas.live.len());
        replicas.cut(victim);
    });
    let context = replicas.context();
    assert!(
        replicas.broker_cuts + replicas.redis_cuts > 0,
        "{context}: the replicas' connections were found"
    );
    if kind == Kind::Redis {
        assert_eq!(
            replayed,
            0,
            "{context}: no step ran twice\n{}",
            replicas.logs(&env)
        );
    }
}

#[test]
fn redis_connections_cut_at_random_lose_nothing() {
    connections_cut_at_random_lose_nothing(Kind::Redis)
}

on_backends!(
    halt_stop_every_worker_decide_resume_elsewhere,
    tampered_checkpoint_is_refused,
    tampered_state_is_refused,
    kill_9_mid_run_resumes_without_replaying_completed_steps,
    a_frozen_worker_past_its_lease_cannot_publish_or_rewind,
    sigterm_hands_a_long_run_back_at_a_step_boundary,
    decisions_arrive_as_messages,
    an_expired_pending_job_takes_the_default_path,
    a_decision_without_its_ledger_record_is_not_applied,
    replicas_killed_at_random_lose_no_job_and_replay_no_completed_step,
    paused_jobs_decided_while_replicas_die,
    a_decision_that_does_not_fit_leaves_the_job_waiting,
    an_overflowing_number_survives_a_pause,
    a_second_sigterm_stops_at_once,
);

/// A replica that dies holding decision messages (here: one left in a dead worker's
/// processing list of the decisions queue, as a `kill -9` between claim and finish leaves it)
/// loses no human decision: the reaper covers decisions queues like job queues, so the next
/// worker takes the message over and the job resumes with it.
#[test]
fn a_dead_workers_decision_messages_come_back() {
    let mut env = Env::new(Kind::Redis, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-ghost","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    stop(w1);
    let dq = env.decisions();
    let decision = format!(r#"{{"job_id":"{job}","choice":"approve","by":"cfo@example.com"}}"#);
    let ghost = "ghost-worker";
    let _: () = env
        .redis
        .lpush(format!("{}:processing:{ghost}", dq.jobs), decision)
        .unwrap();
    let _: () = env
        .redis
        .sadd(format!("{}:workers", dq.jobs), ghost)
        .unwrap();
    let w2 = env.worker();
    let results = env.wait_results(1, Duration::from_secs(20));
    let replies = env.wait_replies(1);
    stop(w2);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["status"], "accepted", "{replies:?}");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "completed");
    assert_eq!(results[0]["state"]["paid"], true);
}

/// [`LOAN`] up to its jury, whose approval then fails the run (`last_error` set).
fn fails_after_jury() -> String {
    let head = LOAN
        .split("[[nodes]]\nid = \"route\"")
        .next()
        .unwrap_or(LOAN)
        .replace("next = \"route\"", "next = \"boom\"");
    format!("{head}[[nodes]]\nid = \"boom\"\ntype = \"set\"\nkey = \"last_error\"\nvalue = \"payout service refused\"\n")
}

/// A run that fails after its decision is retried from its first step (`retry_failed_runs`),
/// so the retry asks its human again: it must not carry the decision, which would answer a
/// run that is gone (it was dead-lettered as "a decision arrived for a job with no
/// checkpoint", and the producer never saw a final result).
fn a_run_failing_after_its_decision_is_retried_and_asks_again(kind: Kind) {
    let mut env = Env::new(kind, &fails_after_jury(), "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-rf","input":{"amount":5000}}"#);
    let w = env.worker();
    let job = pending_job_id(&mut env);
    let decide = |env: &Env| env.cli(&["decide", &job, "--choice", "approve", "--by", "cfo@x"]);
    let (code, out, err) = decide(&env);
    assert_eq!(code, 0, "{out}{err}");
    let again = env.wait_results(1, Duration::from_secs(20));
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["status"], "awaiting_decision", "{again:?}");
    assert!(env.dead().is_empty(), "{:?}", env.dead());
    env.clear_results();
    let (code, out, err) = decide(&env);
    assert_eq!(code, 0, "{out}{err}");
    let last = env.wait_results(1, Duration::from_secs(20));
    let dead = env.wait_dead(Duration::from_secs(10));
    stop(w);
    assert_eq!(last[0]["status"], "failed", "{last:?}");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("payout service refused"), "{reason}");
}

/// A producer re-sends a paused job's id and a human decides before the copy is worked on
/// (Redis and AMQP take the decision; the embedded file refuses it while the copy holds the
/// id). The copy must not pause the job again: a second decision would override the first.
fn a_copy_racing_a_decision_does_not_reopen_the_pause(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    let msg = r#"{"id":"loan-cp","input":{"amount":5000}}"#;
    env.push(msg);
    let w = env.worker();
    let job = pending_job_id(&mut env);
    stop(w);
    env.push(msg);
    let (code, out, err) = env.cli(&["decide", &job, "--choice", "approve", "--by", "first@x"]);
    assert_eq!(code, 0, "{out}{err}");
    let w = env.worker();
    let finished = env.wait_results(1, Duration::from_secs(30));
    let (code2, _, err2) = env.cli(&["decide", &job, "--choice", "reject", "--by", "second@x"]);
    std::thread::sleep(Duration::from_millis(500));
    let results = env.results_now();
    let dead = env.dead();
    let (_, pending, _) = env.cli(&["pending"]);
    stop(w);
    assert_eq!(code2, 2, "the second decision is refused: {err2}");
    assert_eq!(finished[0]["status"], "completed", "{results:?}");
    assert_eq!(
        results.len(),
        1,
        "no second awaiting_decision, no second result: {results:?}"
    );
    assert_eq!(
        results[0]["state"]["paid"], true,
        "the first decision was applied"
    );
    assert!(dead.is_empty(), "{dead:?}");
    assert!(pending.trim().is_empty(), "{pending}");
}

mod decisions_and_retries {
    #[test]
    fn redis_failed_after_decision() {
        super::a_run_failing_after_its_decision_is_retried_and_asks_again(super::Kind::Redis)
    }
    #[test]
    fn embedded_failed_after_decision() {
        super::a_run_failing_after_its_decision_is_retried_and_asks_again(super::Kind::Embedded)
    }
    #[test]
    fn amqp_failed_after_decision() {
        super::a_run_failing_after_its_decision_is_retried_and_asks_again(super::Kind::Amqp)
    }
    #[test]
    fn redis_copy_racing_a_decision() {
        super::a_copy_racing_a_decision_does_not_reopen_the_pause(super::Kind::Redis)
    }
    #[test]
    fn amqp_copy_racing_a_decision() {
        super::a_copy_racing_a_decision_does_not_reopen_the_pause(super::Kind::Amqp)
    }
    #[test]
    fn amqp_sqlite_copy_racing_a_decision() {
        super::a_copy_racing_a_decision_does_not_reopen_the_pause(super::Kind::AmqpSqlite)
    }
}

/// The SHA-256 of a file, as `sha256sum` prints it (the runs' `graph_digest`).
fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The README's promise for a graph changed under a run: a paused job decided after its graph
/// file changed is dead-lettered with the graph-digest reason (it does not resume on steps it
/// never took), its stored run kept as the evidence; once the graph is reverted, `dead-letters
/// redrive` resumes it from its checkpoint, the kept decision applied at the halt it answers,
/// and it completes.
fn a_graph_changed_under_a_paused_run_is_dead_lettered_and_redriven(kind: Kind) {
    let mut env = Env::new(kind, LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-g","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    stop(w1);
    let graph = env.dir.path().join("g.toml");
    let original = std::fs::read_to_string(&graph).unwrap();
    let started_on = sha256_hex(&graph);
    let changed = original.replace("value = 0.82", "value = 0.91");
    assert_ne!(changed, original);
    std::fs::write(&graph, &changed).unwrap();
    let now = sha256_hex(&graph);

    let w2 = env.worker();
    env.decide(&job, "approve", "cfo@example.com");
    let dead = env.wait_dead(Duration::from_secs(20));
    stop(w2);
    assert_eq!(dead.len(), 1, "dead-lettered, not resumed: {dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!(
            "the run started on graph digest {started_on}, the configured graph is now {now}"
        )),
        "{reason}"
    );
    assert!(
        env.results_now().is_empty(),
        "nothing published from a run on another graph"
    );
    assert_eq!(env.checkpoints_left(), 1, "the refused run is kept");

    std::fs::write(&graph, &original).unwrap();
    let w3 = env.worker();
    let (code, out, err) = env.cli(&["dead-letters", "redrive", &job]);
    assert_eq!(code, 0, "{out}{err}");
    // The entry kept the human's decision: the redrive applies it, nobody is asked twice.
    let results = env.wait_results(1, Duration::from_secs(20));
    stop(w3);
    assert_eq!(results.len(), 1, "{results:?}");
    let r = &results[0];
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["state"]["paid"], true);
    assert_eq!(r["state"]["risk"], 0.82, "the run's own graph ran");
    assert!(env.dead().is_empty(), "{:?}", env.dead());
    assert_eq!(env.checkpoints_left(), 0);
    // Resumed, not restarted: the run's first steps are the ones taken before the pause.
    let log_path = PathBuf::from(r["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    assert_eq!(log["graph_digest"], started_on.as_str());
    let steps = log["steps"].as_array().unwrap();
    let ids: Vec<&str> = steps
        .iter()
        .map(|s| s["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["score", "jury", "jury", "route", "pay"]);
    assert_eq!(steps[2]["decision"]["decided_by"], "cfo@example.com");
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    assert!(lar_worker::audit::verify_file(&log_path, &secret).is_valid());
}

mod graph_changed_under_a_pause {
    #[test]
    fn embedded() {
        super::a_graph_changed_under_a_paused_run_is_dead_lettered_and_redriven(
            super::Kind::Embedded,
        )
    }
    #[test]
    fn redis() {
        super::a_graph_changed_under_a_paused_run_is_dead_lettered_and_redriven(super::Kind::Redis)
    }
}
