//! The `lar-worker` command line: bad input is a clear message and exit 2 (never a panic),
//! run outcomes map to exit codes 0 / 3 / 4, I/O trouble to 1, and `manifest` lists what a
//! compliance reviewer needs.

mod common;

use common::{bin, manifest_dir, only_log, reference_logs_dir, run, write, SECRET};
use lar_worker::queue::prelude::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

const SIMPLE: &str = r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "status"
value = "done"
"#;

/// `run-once` with the secret set, logs in `dir/logs`, the given graph and input.
fn run_once(dir: &Path, graph: &Path, input: &str) -> Command {
    let mut cmd = bin();
    cmd.env("HMAC_SECRET", SECRET)
        .arg("run-once")
        .arg("--no-fsync")
        .arg("--graph")
        .arg(graph)
        .arg("--input")
        .arg(input)
        .arg("--log-dir")
        .arg(dir.join("logs"));
    cmd
}

/// Asserts exit 2, a message on stderr containing `needle`, nothing on stdout, no log.
fn assert_usage_error(dir: &Path, cmd: &mut Command, needle: &str) {
    let (code, out, err) = run(cmd);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("error: "), "{err}");
    assert!(
        err.contains(needle),
        "expected {needle:?} in stderr:\n{err}"
    );
    assert!(out.is_empty(), "nothing ran, nothing printed: {out}");
    assert!(!dir.join("logs").exists(), "nothing ran, no log");
}

#[test]
fn run_once_rejects_invalid_json_input() {
    let dir = TempDir::new().unwrap();
    let g = write(dir.path(), "g.toml", SIMPLE);
    assert_usage_error(
        dir.path(),
        &mut run_once(dir.path(), &g, "{\"amount\": 12,"),
        "--input is not valid JSON",
    );
}

#[test]
fn run_once_rejects_non_object_input() {
    let dir = TempDir::new().unwrap();
    let g = write(dir.path(), "g.toml", SIMPLE);
    for (input, kind) in [
        ("[1, 2]", "an array"),
        ("\"text\"", "a string"),
        ("null", "null"),
        ("42", "a number"),
    ] {
        assert_usage_error(
            dir.path(),
            &mut run_once(dir.path(), &g, input),
            &format!("--input must be a JSON object (the initial state), found {kind}"),
        );
    }
}

#[test]
fn run_once_reads_input_files() {
    let dir = TempDir::new().unwrap();
    let g = write(dir.path(), "g.toml", SIMPLE);
    let missing = dir.path().join("no_such_input.json");
    assert_usage_error(
        dir.path(),
        &mut run_once(dir.path(), &g, &format!("@{}", missing.display())),
        &format!("cannot read input file '{}'", missing.display()),
    );
    let bad = write(dir.path(), "bad_input.json", "{oops");
    assert_usage_error(
        dir.path(),
        &mut run_once(dir.path(), &g, &format!("@{}", bad.display())),
        &format!("input file '{}' is not valid JSON", bad.display()),
    );
    let good = write(dir.path(), "input.json", "{\"who\": \"file\"}\n");
    let (code, out, err) = run(&mut run_once(
        dir.path(),
        &g,
        &format!("@{}", good.display()),
    ));
    assert_eq!(code, 0, "{err}");
    let state: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(state["who"], "file");
}

#[test]
fn run_once_needs_a_secret_unless_unsigned() {
    let dir = TempDir::new().unwrap();
    let g = write(dir.path(), "g.toml", SIMPLE);
    let mut cmd = run_once(dir.path(), &g, "{}");
    cmd.env_remove("HMAC_SECRET");
    assert_usage_error(dir.path(), &mut cmd, "no HMAC secret");
    // An empty HMAC_SECRET is no secret either.
    let mut cmd = run_once(dir.path(), &g, "{}");
    cmd.env("HMAC_SECRET", "");
    assert_usage_error(dir.path(), &mut cmd, "no HMAC secret");
    // A secret file that is not there.
    let mut cmd = run_once(dir.path(), &g, "{}");
    cmd.arg("--secret-file").arg(dir.path().join("nope"));
    assert_usage_error(dir.path(), &mut cmd, "cannot read secret file");

    // --unsigned runs and writes a log without a signature, as Lár does without a secret.
    let mut cmd = run_once(dir.path(), &g, "{}");
    cmd.env_remove("HMAC_SECRET").arg("--unsigned");
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    let log: Value =
        serde_json::from_slice(&std::fs::read(only_log(&dir.path().join("logs"))).unwrap())
            .unwrap();
    assert!(log.get("signature").is_none());
    assert!(log["steps"][0].get("chain").is_none());

    // A secret file works like HMAC_SECRET (one trailing newline dropped).
    let logs2 = TempDir::new().unwrap();
    let secret_file = write(dir.path(), "secret", &format!("{SECRET}\n"));
    let (code, _, err) = run(bin()
        .args(["run-once", "--no-fsync", "--input", "{}", "--graph"])
        .arg(&g)
        .arg("--log-dir")
        .arg(logs2.path())
        .arg("--secret-file")
        .arg(&secret_file));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(bin()
        .env("HMAC_SECRET", SECRET)
        .arg("verify")
        .arg(logs2.path()));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn run_once_rejects_an_invalid_graph() {
    let dir = TempDir::new().unwrap();
    let g = write(
        dir.path(),
        "bad.toml",
        "entry = \"a\"\n[[nodes]]\nid = \"a\"\ntype = \"set\"\nkey = \"k\"\nvalue = 1\nnext = \"ghost\"\n",
    );
    assert_usage_error(
        dir.path(),
        &mut run_once(dir.path(), &g, "{}"),
        &format!(
            "the graph is invalid:\n{}: node 'a': field 'next': no node has id 'ghost'",
            g.display()
        ),
    );
    let missing = dir.path().join("missing.toml");
    assert_usage_error(
        dir.path(),
        &mut run_once(dir.path(), &missing, "{}"),
        &format!("{}: cannot read", missing.display()),
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = run(&mut bin());
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(bin().arg("frobnicate"));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(bin().args(["run-once", "--input", "{}"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--graph"), "{err}");
    // verify cannot work without a secret.
    let (code, _, err) = run(bin().arg("verify").arg(reference_logs_dir()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no HMAC secret"), "{err}");
}

fn state_of(out: &str) -> Value {
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("stdout is not the state ({e}): {out}"))
}

fn log_of(dir: &Path) -> Value {
    let logs = dir.join("logs");
    let (code, out, _) = run(bin().env("HMAC_SECRET", SECRET).arg("verify").arg(&logs));
    assert_eq!(code, 0, "{out}");
    serde_json::from_slice(&std::fs::read(only_log(&logs)).unwrap()).unwrap()
}

#[test]
fn run_once_completed_exits_0() {
    let dir = TempDir::new().unwrap();
    let g = manifest_dir().join("graphs/bench.toml");
    let (code, out, err) = run(&mut run_once(
        dir.path(),
        &g,
        r#"{"kind":"text","text":"hello"}"#,
    ));
    assert_eq!(code, 0, "{err}");
    let state = state_of(&out);
    assert_eq!(state["result"], "HELLO");
    assert_eq!(state["status"], "done");
    assert!(err.contains("completed after 5 steps"), "{err}");
    let log = log_of(dir.path());
    assert_eq!(log["outcome"], json!({"status": "completed"}));
    assert_eq!(log["summary"]["total_steps"], 5);
    assert_eq!(log["graph_name"], "bench");
}

#[test]
fn run_once_failed_exits_3() {
    let dir = TempDir::new().unwrap();
    let g = write(
        dir.path(),
        "fail.toml",
        "entry = \"f\"\n[[nodes]]\nid = \"f\"\ntype = \"tool\"\ntool = \"fail\"\ninputs = [\"reason\"]\n",
    );
    let (code, out, err) = run(&mut run_once(dir.path(), &g, r#"{"reason":"no funds"}"#));
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("the run failed: no funds"), "{err}");
    assert_eq!(state_of(&out)["last_error"], "no funds");
    let log = log_of(dir.path());
    assert_eq!(
        log["outcome"],
        json!({"status": "failed", "reason": "no funds"})
    );
    assert_eq!(log["steps"][0]["outcome"], "error");
}

#[test]
fn run_once_halted_exits_4() {
    let dir = TempDir::new().unwrap();
    let g = manifest_dir().join("graphs/loan_review.toml");
    let (code, out, err) = run(&mut run_once(
        dir.path(),
        &g,
        r#"{"applicant":"Acme GmbH","amount":250000,"sector":"construction"}"#,
    ));
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("halted"), "{err}");
    let state = state_of(&out);
    assert_eq!(state["risk_level"], "high");
    let log = log_of(dir.path());
    assert_eq!(log["outcome"], json!({"status": "halted"}));
    let steps = log["steps"].as_array().unwrap();
    let last = steps.last().unwrap();
    assert_eq!(last["node_id"], "jury");
    assert_eq!(last["halt"]["choices"], json!(["approve", "reject"]));
    assert_eq!(
        last["halt"]["context"],
        json!({"applicant": "Acme GmbH", "amount": 250000, "risk": 0.55})
    );

    // A low-risk application goes through without a human.
    let dir = TempDir::new().unwrap();
    let (code, out, err) = run(&mut run_once(
        dir.path(),
        &g,
        r#"{"applicant":"Small Co","amount":10000,"sector":"software"}"#,
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(state_of(&out)["status"], "approved");

    // The python tool's own failure (exit 2 on a bad amount) takes the graph's error path.
    let dir = TempDir::new().unwrap();
    let (code, out, err) = run(&mut run_once(
        dir.path(),
        &g,
        r#"{"applicant":"X","amount":-5,"sector":"software"}"#,
    ));
    assert_eq!(code, 3, "last_error is still set at the end: {err}");
    let state = state_of(&out);
    assert_eq!(state["status"], "needs_manual_scoring");
    let reason = state["last_error"].as_str().unwrap();
    assert!(reason.contains("exited with status 2"), "{reason}");
    assert!(
        reason.contains("amount must be a positive number, got -5"),
        "{reason}"
    );
}

#[test]
fn run_once_io_error_exits_1() {
    let dir = TempDir::new().unwrap();
    let g = write(dir.path(), "g.toml", SIMPLE);
    let blocker = write(dir.path(), "not_a_dir", "x");
    let (code, _, err) = run(bin()
        .env("HMAC_SECRET", SECRET)
        .args(["run-once", "--input", "{}", "--graph"])
        .arg(&g)
        .arg("--log-dir")
        .arg(blocker.join("logs")));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot write the audit log"), "{err}");
}

#[test]
fn verify_accepts_the_reference_logs() {
    let (code, out, err) = run(bin()
        .env("HMAC_SECRET", SECRET)
        .arg("verify")
        .arg(reference_logs_dir()));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": valid (").count(), 5, "{out}");
    assert!(out.contains("valid (authority ledger, 1 records)"), "{out}");
    let (code, out, _) = run(bin()
        .env("HMAC_SECRET", "wrong")
        .arg("verify")
        .arg(reference_logs_dir()));
    assert_eq!(code, 3);
    assert_eq!(
        out.matches(": INVALID: signature mismatch").count(),
        5,
        "{out}"
    );
}

#[test]
fn manifest_of_loan_review() {
    let (code, out, err) = run(bin().arg("manifest").arg("graphs/loan_review.toml"));
    assert_eq!(code, 0, "{err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["graph"], "loan_review");
    assert_eq!(m["entry"], "score");
    assert_eq!(
        m["limits"],
        json!({"max_steps": 100, "max_node_fatigue": 20})
    );
    assert_eq!(m["nodes"].as_array().unwrap().len(), 7);
    assert_eq!(
        m["external_actions"],
        json!([{
            "node": "score",
            "tool": "risk_score",
            "transport": "command",
            "detail": {"argv": ["python3", "tools/risk_score.py"], "timeout_ms": 5000, "timeout_explicit": true, "secrets": []},
            "inputs": ["amount", "sector"],
            "output": null,
        }])
    );
    assert_eq!(
        m["human_approval_points"],
        json!([{
            "node": "jury",
            "prompt": "Approve this SME loan?",
            "choices": ["approve", "reject"],
            "output": "jury_decision",
            "context": ["applicant", "amount", "risk"],
            "expiry": null,
        }])
    );
    let risks: Vec<(String, String)> = m["risks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["risk"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Low-risk loans are approved with no human on the path; after_jury has no default.
    assert!(
        risks.contains(&(
            "score".into(),
            "external_action_without_human_review".into()
        )),
        "{risks:?}"
    );
    assert!(
        risks.contains(&("after_jury".into(), "router_without_default".into())),
        "{risks:?}"
    );
    // score has an error path and a timeout: no such flags for it.
    assert!(
        !risks
            .iter()
            .any(|(_, r)| r == "tool_failure_ends_run" || r == "tool_without_timeout"),
        "{risks:?}"
    );
    assert_eq!(m["graph_digest"].as_str().unwrap().len(), 64);
}

#[test]
fn manifest_flags_tools_without_timeout_or_error_path() {
    let dir = TempDir::new().unwrap();
    let g = write(
        dir.path(),
        "risky.toml",
        "entry = \"t\"\n[[nodes]]\nid = \"t\"\ntype = \"tool\"\ntool = \"x\"\n[tools.x]\ncommand = [\"python3\", \"x.py\"]\n",
    );
    let (code, out, err) = run(bin().arg("manifest").arg(&g));
    assert_eq!(code, 0, "{err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = m["risks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["risk"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"tool_without_timeout"), "{kinds:?}");
    assert!(kinds.contains(&"tool_failure_ends_run"), "{kinds:?}");
    assert_eq!(m["external_actions"][0]["detail"]["timeout_ms"], 30000);

    let bad = write(dir.path(), "bad.toml", "entry = \"nope\"\nnodes = []\n");
    let (code, out, err) = run(bin().arg("manifest").arg(&bad));
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("the graph is invalid"), "{err}");
    assert!(err.contains("field 'entry'"), "{err}");
}

/// A router expression that is quadratic in a producer's list (fine on small input) is cut off
/// after its time budget: the run fails on that step with the reason, and the process exits
/// promptly instead of computing for minutes.
#[test]
fn a_runaway_router_expression_fails_the_step_instead_of_hanging() {
    let dir = TempDir::new().unwrap();
    let graph = write(
        dir.path(),
        "quad.toml",
        r#"
entry = "r"
[[nodes]]
id = "r"
type = "router"
when = '''items.exists(a, items.exists(b, a + b == -1)) ? "a" : "b"'''
routes = { a = "done" }
default = "done"
[[nodes]]
id = "done"
type = "set"
key = "status"
value = "done"
"#,
    );
    let items: Vec<u32> = (0..6000).collect();
    let input = json!({ "items": items }).to_string();
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = run(&mut run_once(dir.path(), &graph, &input));
    let took = started.elapsed();
    assert_eq!(code, 3, "the run failed: {stdout}{stderr}");
    assert!(
        stderr.contains("took more than 2 s"),
        "the reason is given: {stderr}"
    );
    // Without the budget the expression runs for minutes (36 million comparisons).
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
}

/// One job id waiting for a decision on two queues (two producers chose the same envelope id):
/// `decide` without `--queue` names both and decides nothing; with `--queue` it decides that one.
#[test]
fn decide_asks_for_the_queue_when_a_job_id_waits_on_two() {
    use lar_worker::queue::embedded::EmbeddedBackend;
    use lar_worker::queue::{Finish, QueueNames};
    let dir = TempDir::new().unwrap();
    let graph = write(dir.path(), "g.toml", SIMPLE);
    let config = write(
        dir.path(),
        "workers.toml",
        &format!(
            "[backend]\nkind = \"embedded\"\npath = \"q.db\"\n\
             [[queues]]\nname = \"first\"\nresults = \"first:out\"\npayload = \"envelope\"\ngraph = {g:?}\n\
             [[queues]]\nname = \"second\"\nresults = \"second:out\"\npayload = \"envelope\"\ngraph = {g:?}\n",
            g = graph.display().to_string()
        ),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = EmbeddedBackend::open(&dir.path().join("q.db"), "w1".into())
            .unwrap()
            .with_envelope_queues(["first".into(), "second".into()].into_iter().collect());
        for name in ["first", "second"] {
            let q = QueueNames {
                jobs: name.into(),
                results: format!("{name}:out"),
            };
            let job = br#"{"id":"same-id","input":{}}"#;
            b.enqueue(&q, job).await.unwrap();
            let c = b
                .claim(
                    &q,
                    1,
                    std::time::Duration::from_secs(30),
                    std::time::Duration::ZERO,
                )
                .await
                .unwrap()
                .remove(0);
            let pending = json!({"job_id": "same-id", "run_id": "r", "queue": name, "node": "jury",
                "step": 1, "request": {"prompt": "ok?", "choices": ["approve"], "context": {},
                "output": "d"}, "awaiting_since": "now", "payload": String::from_utf8_lossy(job)});
            let pause = Finish::Pause {
                result: b"{}".to_vec(),
                pending: pending.to_string().into_bytes(),
            };
            b.finish(&q, &c, pause).await.unwrap();
        }
    });
    let decide = |queue: Option<&str>| {
        let mut cmd = bin();
        cmd.env("HMAC_SECRET", SECRET)
            .args([
                "decide", "same-id", "--choice", "approve", "--by", "a@x", "--config",
            ])
            .arg(&config);
        if let Some(q) = queue {
            cmd.args(["--queue", q]);
        }
        run(&mut cmd)
    };
    let (code, _, err) = decide(None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("several queues (first, second)"), "{err}");
    let (code, out, err) = decide(Some("second"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("decision 'approve' recorded for job same-id"),
        "{out}"
    );
}

/// Runs `cmd` with its output in files under `dir`; a command still running after `within`
/// is killed and fails the test (a daemon that should have refused to start must not hang
/// the suite). Returns (exit code, stdout, stderr, how long it took).
fn run_within(
    dir: &Path,
    cmd: &mut Command,
    within: std::time::Duration,
) -> (i32, String, String, std::time::Duration) {
    let (out_path, err_path) = (dir.join("cmd.out"), dir.join("cmd.err"));
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {within:?}: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let took = started.elapsed();
    let (out, err) = (
        std::fs::read_to_string(&out_path).unwrap(),
        std::fs::read_to_string(&err_path).unwrap(),
    );
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    (
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {err}")),
        out,
        err,
        took,
    )
}

/// A config file `name` for the embedded backend in `dir`, with `worker_extra` in `[worker]`.
fn daemon_config(dir: &Path, name: &str, worker_extra: &str) -> std::path::PathBuf {
    write(dir, "g.toml", SIMPLE);
    write(
        dir,
        name,
        &format!(
            "[worker]\nlog_dir = \"audit\"\n{worker_extra}\n\
             [backend]\nkind = \"embedded\"\npath = \"queue.db\"\n\
             [[queues]]\nname = \"d:jobs\"\nresults = \"d:results\"\ngraph = \"g.toml\"\n"
        ),
    )
}

/// `lar-worker run --exit-when-idle` on `config`, without any of the environment's overrides.
fn daemon(config: &Path) -> Command {
    let mut cmd = bin();
    for var in [
        "LAR_SECRET_FILE",
        "LAR_BACKEND_URL",
        "LAR_DB_PATH",
        "LAR_CONCURRENCY",
        "LAR_ADMIN_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(["run", "--exit-when-idle", "--config"])
        .arg(config);
    cmd
}

/// `lar-worker run` refuses an invalid configuration with exit 2 and the reason on stderr,
/// before it opens a queue or writes anything. `--exit-when-idle` makes a daemon that wrongly
/// starts exit 0 at once; the last run shows the same file, made valid, does start.
#[test]
fn run_refuses_an_invalid_config_with_exit_2() {
    let limit = std::time::Duration::from_secs(30);
    for (what, worker_extra, needle) in [
        (
            "unknown field",
            "concurency = 4",
            "unknown field `concurency`",
        ),
        (
            "out of range",
            "concurrency = 0",
            "worker.concurrency: must be between 1",
        ),
        ("not TOML", "lease_ms = = 5", "TOML parse error"),
        ("a graph that is not there", "", "nope.toml: cannot read"),
    ] {
        let dir = TempDir::new().unwrap();
        let config = daemon_config(dir.path(), "workers.toml", worker_extra);
        if what == "a graph that is not there" {
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, text.replace("\"g.toml\"", "\"nope.toml\"")).unwrap();
        }
        let (code, out, err, _) = run_within(
            dir.path(),
            daemon(&config).env("HMAC_SECRET", SECRET),
            limit,
        );
        assert_eq!(code, 2, "{what}: stdout {out}\nstderr {err}");
        assert!(
            err.contains("error: ") && err.contains(needle),
            "{what}: expected {needle:?} in stderr:\n{err}"
        );
        assert!(
            !dir.path().join("queue.db").exists() && !dir.path().join("audit").exists(),
            "{what}: nothing opened or written"
        );
    }
    let dir = TempDir::new().unwrap();
    let config = daemon_config(dir.path(), "workers.toml", "concurrency = 4");
    let (code, out, err, _) = run_within(
        dir.path(),
        daemon(&config).env("HMAC_SECRET", SECRET),
        limit,
    );
    assert_eq!(code, 0, "the valid config runs: {out}{err}");
}

/// `lar-worker run` without a secret (no HMAC_SECRET, or an empty one, no secret_file, no
/// systemd credential) and not unsigned exits 2 with the reason, as does a secret_file that is
/// not there. The same config runs with `--unsigned`, `unsigned = true` or a secret.
#[test]
fn run_without_a_secret_exits_2() {
    let limit = std::time::Duration::from_secs(30);
    let dir = TempDir::new().unwrap();
    let config = daemon_config(dir.path(), "workers.toml", "");
    let no_credential = dir.path().join("credentials");
    std::fs::create_dir(&no_credential).unwrap();
    // (what, a variable set to a value that gives no secret)
    let cases = [
        ("nothing", None),
        (
            "an empty HMAC_SECRET",
            Some(("HMAC_SECRET", std::ffi::OsString::new())),
        ),
        (
            "a credentials directory without hmac_secret",
            Some(("CREDENTIALS_DIRECTORY", no_credential.into_os_string())),
        ),
    ];
    for (what, var) in &cases {
        let mut cmd = daemon(&config);
        if let Some((name, value)) = var {
            cmd.env(name, value);
        }
        let (code, out, err, _) = run_within(dir.path(), &mut cmd, limit);
        assert_eq!(code, 2, "{what}: stdout {out}\nstderr {err}");
        assert!(err.contains("error: no HMAC secret"), "{what}: {err}");
        assert!(!dir.path().join("audit").exists(), "{what}: nothing ran");
    }
    let missing = dir.path().join("no-such-secret");
    let with_file = daemon_config(
        dir.path(),
        "with-file.toml",
        &format!("secret_file = \"{}\"", missing.display()),
    );
    let (code, _, err, _) = run_within(dir.path(), &mut daemon(&with_file), limit);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("error: cannot read secret file") && err.contains("no-such-secret"),
        "{err}"
    );
    assert!(!dir.path().join("audit").exists(), "nothing ran");

    // The refusals were for the secret alone: the same config starts with one.
    let (code, _, err, _) = run_within(dir.path(), daemon(&config).arg("--unsigned"), limit);
    assert_eq!(code, 0, "--unsigned: {err}");
    let unsigned = daemon_config(dir.path(), "unsigned.toml", "unsigned = true");
    let (code, _, err, _) = run_within(dir.path(), &mut daemon(&unsigned), limit);
    assert_eq!(code, 0, "unsigned = true: {err}");
    let (code, _, err, _) = run_within(
        dir.path(),
        daemon(&config).env("HMAC_SECRET", SECRET),
        limit,
    );
    assert_eq!(code, 0, "HMAC_SECRET: {err}");
}

/// `results` and `dead-letters` give up on a server that accepts the connection and never
/// answers (a listener posing as Redis), after `--timeout` and with exit 1, instead of hanging
/// a script (`results --take` is the exception: it waits for what it removes).
#[test]
fn results_and_dead_letters_give_up_on_a_server_that_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        // Held open, never read, never answered.
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let dir = TempDir::new().unwrap();
    write(dir.path(), "g.toml", SIMPLE);
    let config = write(
        dir.path(),
        "workers.toml",
        &format!(
            "[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}/0\"\n\
             [[queues]]\nname = \"silent:jobs\"\nresults = \"silent:results\"\ngraph = \"g.toml\"\n"
        ),
    );
    let timeout = std::time::Duration::from_secs(1);
    for args in [
        vec!["results"],
        vec!["dead-letters", "list"],
        vec!["dead-letters", "show", "some-job"],
        vec!["dead-letters", "redrive", "some-job"],
    ] {
        let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
        let mut cmd = bin();
        cmd.env_remove("LAR_BACKEND_URL")
            .args(&args)
            .arg("--config")
            .arg(&config)
            .args(["--timeout", "1"]);
        let (code, out, err, took) =
            run_within(dir.path(), &mut cmd, std::time::Duration::from_secs(30));
        let what = args.join(" ");
        assert_eq!(code, 1, "`{what}`: stdout {out}\nstderr {err}");
        assert!(
            err.contains("no answer from the backend within 1 s (--timeout)"),
            "`{what}`: {err}"
        );
        assert!(
            accepted.load(std::sync::atomic::Ordering::SeqCst) > before,
            "`{what}` reached the silent server"
        );
        assert!(
            took >= timeout && took < timeout + std::time::Duration::from_secs(4),
            "`{what}` gave up after {took:?}, not about the timeout"
        );
    }
}
