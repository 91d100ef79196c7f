//! Durable runs on the real Redis: the human pause across worker restarts, refused decisions
//! and checkpoints, crash resume without replaying completed steps, and zombie fencing.

use redis::Commands;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "durable-test-secret";
const BIN: &str = env!("CARGO_BIN_EXE_lar-worker");

struct Env {
    dir: tempfile::TempDir,
    queue: String,
    results: String,
    config: PathBuf,
    redis: redis::Connection,
}

impl Env {
    fn new(graph_toml: &str, payload: &str, lease_ms: u64, tools: &[(&str, &str)]) -> Env {
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
        let config = dir.path().join("workers.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nconcurrency = 4\nlog_dir = \"audit\"\nlease_ms = {lease_ms}\ndrain_timeout_ms = 3000\n\
                 [worker.retry]\nattempts = 2\ninitial_backoff_ms = 100\n\
                 [backend]\nkind = \"redis\"\n\
                 [[queues]]\nname = \"{queue}\"\nresults = \"{results}\"\npayload = \"{payload}\"\ngraph = \"g.toml\"\n"
            ),
        )
        .unwrap();
        let redis = redis::Client::open("redis://127.0.0.1:6379/0")
            .unwrap()
            .get_connection()
            .unwrap();
        Env {
            dir,
            queue,
            results,
            config,
            redis,
        }
    }

    fn worker(&self) -> Child {
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("HMAC_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
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

    fn push(&mut self, msg: &str) {
        let _: () = self.redis.rpush(&self.queue, msg).unwrap();
    }

    fn wait_results(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let items: Vec<String> = self.redis.lrange(&self.results, 0, -1).unwrap();
            if items.len() >= n || start.elapsed() > within {
                return items
                    .iter()
                    .map(|s| serde_json::from_str(s).unwrap())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn audit(&self) -> PathBuf {
        self.dir.path().join("audit")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let keys: Vec<String> = self
            .redis
            .keys(format!("{}*", self.queue))
            .unwrap_or_default();
        let mut all = keys;
        all.push(self.results.clone());
        let _: Result<(), _> = self.redis.del(all);
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn verify_with_python(path: &Path) -> bool {
    let script = r#"
import hmac, hashlib, json, sys
d = json.load(open(sys.argv[1])); sig = d.pop("signature")
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
    let _: () = env.redis.del(&env.results).unwrap();
    r["decision_request"]["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn halt_stop_every_worker_decide_resume_elsewhere() {
    let mut env = Env::new(LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-7","input":{"amount":5000},"user_id":"officer-1"}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    assert_eq!(job, "loan-7");
    stop(w1);

    // Nothing runs while the human thinks: the message is acked, the job is a pending record.
    let len: u64 = env.redis.llen(&env.queue).unwrap();
    assert_eq!(len, 0);
    let (code, out, _) = env.cli(&["pending"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"job_id\":\"loan-7\"") && out.contains("Approve payout?"),
        "{out}"
    );

    let (code, _, err) = env.cli(&[
        "decide",
        "loan-7",
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
        "loan-7",
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
    let (code, _, err) = env.cli(&["decide", "loan-7", "--choice", "reject", "--by", "x"]);
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
    assert_eq!(rec["job_id"], "loan-7");
    assert_eq!(rec["decision"], "approve");
    assert_eq!(rec["stakeholder_role"], "CFO");
    assert_eq!(rec["risk_score_at_decision"], 0.82);
}

#[test]
fn tampered_checkpoint_is_refused() {
    let mut env = Env::new(LOAN, "envelope", 5000, &[]);
    env.push(r#"{"id":"loan-t","input":{"amount":5000}}"#);
    let w1 = env.worker();
    let job = pending_job_id(&mut env);
    let key = format!("{}:ckpt:{job}", env.queue);
    let ckpt: String = env.redis.get(&key).unwrap();
    let tampered = ckpt.replacen("5000", "9000", 1);
    assert_ne!(ckpt, tampered);
    let _: () = env.redis.set(&key, tampered).unwrap();
    let (code, _, _) = env.cli(&["decide", &job, "--choice", "approve", "--by", "x"]);
    assert_eq!(code, 0);
    let start = Instant::now();
    let dead: Vec<String> = loop {
        let d: Vec<String> = env
            .redis
            .lrange(format!("{}:dead", env.queue), 0, -1)
            .unwrap();
        if !d.is_empty() || start.elapsed() > Duration::from_secs(20) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop(w1);
    assert_eq!(dead.len(), 1, "the job is dead-lettered, not resumed");
    assert!(
        dead[0].contains("checkpoint refused") && dead[0].contains("signature mismatch"),
        "{}",
        dead[0]
    );
    let results: Vec<String> = env.redis.lrange(&env.results, 0, -1).unwrap();
    assert!(
        results.is_empty(),
        "nothing published from a tampered checkpoint"
    );
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

#[test]
fn kill_9_mid_run_resumes_without_replaying_completed_steps() {
    let mut env = Env::new(
        &twenty_step_graph(),
        "state",
        2000,
        &[("effect.py", SIDE_EFFECT_TOOL)],
    );
    env.push(r#"{"job":"twenty"}"#);
    let side = env.dir.path().join("side.txt");
    let w1 = env.worker();
    let start = Instant::now();
    while std::fs::read_to_string(&side)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 8
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run did not progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

#[test]
fn a_frozen_worker_past_its_lease_cannot_publish_or_rewind() {
    let mut env = Env::new(
        &twenty_step_graph(),
        "state",
        1500,
        &[("effect.py", SIDE_EFFECT_TOOL)],
    );
    env.push(r#"{"job":"zombie"}"#);
    let side = env.dir.path().join("side.txt");
    let w1 = env.worker();
    let start = Instant::now();
    while std::fs::read_to_string(&side)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 4
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run did not progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    // Give the zombie time to try its next checkpoint and its finish.
    std::thread::sleep(Duration::from_secs(3));
    stop(w1);
    stop(w2);
    let results: Vec<String> = env.redis.lrange(&env.results, 0, -1).unwrap();
    assert_eq!(results.len(), 1, "the zombie published nothing");
    let keys: Vec<String> = env.redis.keys(format!("{}:ckpt:*", env.queue)).unwrap();
    assert!(
        keys.is_empty(),
        "the zombie did not write a checkpoint after completion: {keys:?}"
    );
    let r: Value = serde_json::from_str(&results[0]).unwrap();
    let log_path = PathBuf::from(r["__lar_worker"]["audit_log"].as_str().unwrap());
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 20);
}
