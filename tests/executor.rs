//! Executor semantics, step by step, on small graphs written to temp files: every node kind,
//! every way a tool can fail, the error conventions, the circuit breakers, the human jury, and
//! what a tool process sees of its environment.

mod common;

use common::{bin, graph, new_run, node_ids, obj, python_tool, run, run_to_end, SECRET};
use lar_worker::exec::{Decision, DecisionError, Run, RunStatus, StepEnv, StepRecord};
use lar_worker::tools::{Registry, ToolFailure};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn registry() -> Registry {
    Registry::with_builtins()
}

fn state(rec: &StepRecord) -> Value {
    Value::Object(rec.state_after().unwrap().clone())
}

fn diff(rec: &StepRecord) -> &Value {
    rec.get("state_diff").unwrap()
}

fn last_error(rec: &StepRecord) -> String {
    rec.state_after()
        .unwrap()
        .get("last_error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no last_error in {:?}", rec.state_after()))
        .to_string()
}

fn failed_reason(run: &Run) -> String {
    match run.status() {
        RunStatus::Failed { reason } => reason.clone(),
        other => panic!("expected a failed run, got {other:?}"),
    }
}

/// Record indices are 0, 1, 2, ... in order.
fn assert_indices(recs: &[StepRecord]) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.get("step"), Some(&json!(i)), "record {i}");
        assert_eq!(r.step(), i as u64);
    }
}

#[tokio::test]
async fn set_literal_copy_and_missing_copy() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(
        dir.path(),
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "greeting"
value = "hi"
next = "b"
[[nodes]]
id = "b"
type = "set"
key = "copy"
value = "{source}"
next = "c"
[[nodes]]
id = "c"
type = "set"
key = "greeting"
value = { nested = [1, 2.5, "x"] }
next = "d"
[[nodes]]
id = "d"
type = "set"
key = "gone"
value = "{no_such_key}"
next = "e"
[[nodes]]
id = "e"
type = "set"
key = "braces"
value = "{}"
"#,
        &reg,
    );
    let mut run = new_run(&g, json!({"source": {"deep": [1, 2]}}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["a", "b", "c", "d", "e"]);
    assert_indices(&recs);
    assert_eq!(run.status(), &RunStatus::Completed);
    for r in &recs {
        assert_eq!(r.get("node"), Some(&json!("AddValueNode")));
        assert_eq!(r.get("node_type"), Some(&json!("set")));
        assert_eq!(r.outcome(), "success");
        assert!(r.error().is_none());
    }
    assert_eq!(
        diff(&recs[0]),
        &json!({"added": {"greeting": "hi"}, "removed": {}, "updated": {}})
    );
    // "{other}" copies the value, whatever its type.
    assert_eq!(
        diff(&recs[1]),
        &json!({"added": {"copy": {"deep": [1, 2]}}, "removed": {}, "updated": {}})
    );
    assert_eq!(
        diff(&recs[2]),
        &json!({"added": {}, "removed": {}, "updated": {"greeting": {"nested": [1, 2.5, "x"]}}})
    );
    // Copying a missing key stores null.
    assert_eq!(
        diff(&recs[3]),
        &json!({"added": {"gone": null}, "removed": {}, "updated": {}})
    );
    // "{}" is a literal, not a copy.
    assert_eq!(state(&recs[4])["braces"], json!("{}"));
    // state_before of each step is state_after of the one before (bar the visit count).
    for w in recs.windows(2) {
        let mut before = w[1].get("state_before").unwrap().clone();
        let mut after = state(&w[0]);
        before.as_object_mut().unwrap().remove("__node_counts");
        after.as_object_mut().unwrap().remove("__node_counts");
        assert_eq!(before, after);
    }
}

#[tokio::test]
async fn node_counts_are_taken_before_the_step_and_never_in_the_diff() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(
        dir.path(),
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "x"
value = 1
next = "b"
[[nodes]]
id = "b"
type = "set"
key = "x"
value = 2
"#,
        &reg,
    );
    let mut run = new_run(&g, json!({}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(
        recs[0].get("state_before").unwrap()["__node_counts"],
        json!({"a": 1})
    );
    assert_eq!(state(&recs[0])["__node_counts"], json!({"a": 1}));
    assert_eq!(
        recs[1].get("state_before").unwrap()["__node_counts"],
        json!({"a": 1, "b": 1})
    );
    assert_eq!(state(&recs[1])["__node_counts"], json!({"a": 1, "b": 1}));
    assert_eq!(
        diff(&recs[1]),
        &json!({"added": {}, "removed": {}, "updated": {"x": 2}})
    );
    for r in &recs {
        for part in ["added", "removed", "updated"] {
            assert!(
                diff(r)[part].get("__node_counts").is_none(),
                "{part}: {:?}",
                diff(r)
            );
        }
    }
    assert_eq!(run.state()["__node_counts"], json!({"a": 1, "b": 1}));
}

const ROUTER_GRAPH: &str = r#"
entry = "route"
[[nodes]]
id = "route"
type = "router"
on = "kind"
routes = { sum = "sum", text = "text" }
default = "fallback"
[[nodes]]
id = "sum"
type = "set"
key = "went"
value = "sum"
[[nodes]]
id = "text"
type = "set"
key = "went"
value = "text"
[[nodes]]
id = "fallback"
type = "set"
key = "went"
value = "fallback"
"#;

#[tokio::test]
async fn router_on_a_key_matching_route_and_default() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(dir.path(), ROUTER_GRAPH, &reg);
    for (input, expect_node, decision) in [
        (json!({"kind": "sum"}), "sum", "sum"),
        (json!({"kind": "text"}), "text", "text"),
        (json!({"kind": "other"}), "fallback", "other"),
        (json!({}), "fallback", "null"),
    ] {
        let mut run = new_run(&g, input.clone());
        let recs = run_to_end(&mut run, &reg).await;
        assert_eq!(node_ids(&recs), ["route", expect_node], "{input}");
        assert_eq!(recs[0].get("node"), Some(&json!("RouterNode")));
        assert_eq!(
            diff(&recs[0]),
            &json!({"added": {"_router_decision": decision}, "removed": {}, "updated": {}})
        );
        assert_eq!(state(&recs[1])["went"], json!(expect_node));
        assert_eq!(run.status(), &RunStatus::Completed);
    }
}

#[tokio::test]
async fn router_without_match_or_default_ends_the_run() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(
        dir.path(),
        r#"
entry = "route"
[[nodes]]
id = "route"
type = "router"
on = "kind"
routes = { sum = "sum" }
[[nodes]]
id = "sum"
type = "set"
key = "went"
value = "sum"
"#,
        &reg,
    );
    let mut run = new_run(&g, json!({"kind": "nope"}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["route"]);
    assert_eq!(recs[0].outcome(), "success");
    assert_eq!(state(&recs[0])["_router_decision"], json!("nope"));
    let note = recs[0].get("run_metadata").unwrap()["note"]
        .as_str()
        .unwrap();
    assert!(note.contains("no route for 'nope'"), "{note}");
    assert_eq!(run.status(), &RunStatus::Completed);
    // An ended run yields nothing more.
    assert!(run.step(&StepEnv { registry: &reg }).await.is_none());
}

#[tokio::test]
async fn router_on_a_cel_expression() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(
        dir.path(),
        r#"
entry = "route"
[[nodes]]
id = "route"
type = "router"
when = "amount > 1000 && sector != 'software' ? 'review' : 'auto'"
routes = { review = "review", auto = "auto" }
[[nodes]]
id = "review"
type = "set"
key = "went"
value = "review"
[[nodes]]
id = "auto"
type = "set"
key = "went"
value = "auto"
"#,
        &reg,
    );
    for (input, expect) in [
        (json!({"amount": 5000, "sector": "construction"}), "review"),
        (json!({"amount": 5000.5, "sector": "software"}), "auto"),
        (json!({"amount": 10, "sector": "construction"}), "auto"),
    ] {
        let mut run = new_run(&g, input.clone());
        let recs = run_to_end(&mut run, &reg).await;
        assert_eq!(node_ids(&recs), ["route", expect], "{input}");
        assert_eq!(state(&recs[0])["_router_decision"], json!(expect));
        assert_eq!(run.status(), &RunStatus::Completed);
    }
    // An expression that cannot be evaluated (a missing variable) fails the run with an error
    // step instead of crashing.
    let mut run = new_run(&g, json!({"sector": "construction"}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["route"]);
    assert_eq!(recs[0].outcome(), "error");
    let err = recs[0].error().unwrap();
    assert!(err.contains("amount"), "{err}");
    assert!(failed_reason(&run).contains("amount"));
}

#[tokio::test]
async fn registered_tool_output_key_and_failure() {
    let dir = TempDir::new().unwrap();
    let mut reg = registry();
    reg.register_fn("double", |inputs| {
        match inputs.get("n").and_then(Value::as_i64) {
            Some(n) => Ok(json!(n * 2)),
            None => Err(ToolFailure("double: n must be an integer".into())),
        }
    });
    let g = graph(
        dir.path(),
        r#"
entry = "sum"
[[nodes]]
id = "sum"
type = "tool"
tool = "sum_numbers"
inputs = ["numbers"]
output = "n"
next = "double"
[[nodes]]
id = "double"
type = "tool"
tool = "double"
inputs = ["n"]
output = "doubled"
error = "failed"
[[nodes]]
id = "failed"
type = "set"
key = "status"
value = "failed"
"#,
        &reg,
    );
    let mut run = new_run(&g, json!({"numbers": [1, 2, 3]}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["sum", "double"]);
    assert_eq!(recs[0].get("node"), Some(&json!("ToolNode")));
    assert_eq!(
        diff(&recs[0]),
        &json!({"added": {"n": 6}, "removed": {}, "updated": {}})
    );
    assert_eq!(state(&recs[1])["doubled"], json!(12));
    assert_eq!(run.status(), &RunStatus::Completed);

    // A float sum is not an integer: the registered tool fails, last_error names why.
    let mut run = new_run(&g, json!({"numbers": [1, 2.5]}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["sum", "double", "failed"]);
    assert_eq!(recs[1].outcome(), "error");
    assert_eq!(last_error(&recs[1]), "double: n must be an integer");
    assert_eq!(recs[1].error(), Some("double: n must be an integer"));

    // A tool that panics fails like any other: the run takes its error path.
    reg.register_fn("double", |_| panic!("index out of range"));
    let mut run = new_run(&g, json!({"numbers": [1, 2]}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["sum", "double", "failed"]);
    assert_eq!(
        last_error(&recs[1]),
        "tool 'double' panicked: index out of range"
    );
}

#[tokio::test]
async fn command_tool_gets_its_inputs_and_output_key_or_merge() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let echo = python_tool(
        dir.path(),
        "echo.py",
        "import json, sys\nreq = json.load(sys.stdin)\njson.dump({'received': req, 'merged_flag': True}, sys.stdout)\n",
    );
    let scalar = python_tool(
        dir.path(),
        "scalar.py",
        "import json, sys\njson.load(sys.stdin)\nprint(42)\n",
    );
    let toml = format!(
        r#"
entry = "keyed"
[[nodes]]
id = "keyed"
type = "tool"
tool = "echo"
inputs = ["amount", "missing"]
output = "answer"
next = "merge"
[[nodes]]
id = "merge"
type = "tool"
tool = "echo"
inputs = ["amount"]
next = "scalar"
[[nodes]]
id = "scalar"
type = "tool"
tool = "scalar"
[tools.echo]
command = ["python3", '{}']
timeout_ms = 10000
[tools.scalar]
command = ["python3", '{}']
timeout_ms = 10000
"#,
        echo.display(),
        scalar.display()
    );
    let g = graph(dir.path(), &toml, &reg);
    let mut run = new_run(&g, json!({"amount": 250000, "note": "é"}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["keyed", "merge", "scalar"]);
    for r in &recs {
        assert_eq!(r.outcome(), "success", "{:?}", r.error());
    }
    // With an output key the whole result goes there; a missing input arrives as null.
    assert_eq!(
        diff(&recs[0]),
        &json!({"added": {"answer": {"received": {"amount": 250000, "missing": null}, "merged_flag": true}}, "removed": {}, "updated": {}})
    );
    // Without one an object result is merged into the state.
    assert_eq!(
        diff(&recs[1]),
        &json!({"added": {"received": {"amount": 250000}, "merged_flag": true}, "removed": {}, "updated": {}})
    );
    // A non-object result with no output key changes nothing.
    assert_eq!(
        diff(&recs[2]),
        &json!({"added": {}, "removed": {}, "updated": {}})
    );
    assert_eq!(run.status(), &RunStatus::Completed);
}

/// A one-tool graph; `error_path` adds an error node.
fn failing_tool_graph(dir: &Path, argv: &str, timeout_ms: u64, error_path: bool) -> String {
    format!(
        r#"
entry = "call"
[[nodes]]
id = "call"
type = "tool"
tool = "t"
inputs = ["x"]
output = "out"
next = "ok"
{}
[[nodes]]
id = "ok"
type = "set"
key = "status"
value = "ok"
{}
[tools.t]
command = {argv}
timeout_ms = {timeout_ms}
cwd = '{}'
"#,
        if error_path { "error = \"handle\"" } else { "" },
        if error_path {
            "[[nodes]]\nid = \"handle\"\ntype = \"set\"\nkey = \"status\"\nvalue = \"handled\""
        } else {
            ""
        },
        dir.display()
    )
}

/// Runs the failing tool with and without an error path; returns the reason text.
async fn tool_failure_both_ways(dir: &Path, argv: &str, timeout_ms: u64) -> String {
    let reg = registry();
    let sub = dir.join("with_error_path");
    std::fs::create_dir_all(&sub).unwrap();
    let g = graph(&sub, &failing_tool_graph(dir, argv, timeout_ms, true), &reg);
    let mut run = new_run(&g, json!({"x": 1}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["call", "handle"]);
    let reason = last_error(&recs[0]);
    assert_eq!(recs[0].outcome(), "error");
    assert_eq!(recs[0].error(), Some(reason.as_str()));
    assert!(reason.starts_with("tool 't': "), "{reason}");
    assert!(state(&recs[0]).get("out").is_none(), "no output on failure");
    assert_eq!(
        diff(&recs[0])["added"],
        json!({"last_error": reason.clone()}),
        "the failure step adds last_error and nothing else"
    );
    // last_error is sticky: the error path's own step is marked "error" too.
    assert_eq!(recs[1].outcome(), "error");
    assert_eq!(state(&recs[1])["status"], json!("handled"));
    // ... and a run that ends with last_error set counts as failed.
    assert_eq!(failed_reason(&run), reason);

    let sub = dir.join("without_error_path");
    std::fs::create_dir_all(&sub).unwrap();
    let g = graph(
        &sub,
        &failing_tool_graph(dir, argv, timeout_ms, false),
        &reg,
    );
    let mut run = new_run(&g, json!({"x": 1}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["call"], "no error path: the run ends");
    assert_eq!(recs[0].outcome(), "error");
    let reason2 = last_error(&recs[0]);
    assert_eq!(failed_reason(&run), reason2);
    assert!(!run.is_running());
    reason
}

#[tokio::test]
async fn tool_non_zero_exit_keeps_the_stderr_tail() {
    let dir = TempDir::new().unwrap();
    python_tool(
        dir.path(),
        "exit3.py",
        "import json, sys\njson.load(sys.stdin)\nsys.stderr.write('x' * 5000 + '\\nboom: the ledger is locked\\n')\nprint('{\"partial\": true}')\nsys.exit(3)\n",
    );
    let reason = tool_failure_both_ways(dir.path(), r#"["python3", "exit3.py"]"#, 10_000).await;
    assert!(reason.contains("exited with status 3"), "{reason}");
    assert!(reason.contains("stderr: "), "{reason}");
    assert!(reason.ends_with("boom: the ledger is locked"), "{reason}");
    // Only the tail of a long stderr is kept.
    assert!(reason.len() < 2200, "last_error is {} bytes", reason.len());
}

#[tokio::test]
async fn tool_invalid_json_on_stdout() {
    let dir = TempDir::new().unwrap();
    python_tool(
        dir.path(),
        "notjson.py",
        "import json, sys\njson.load(sys.stdin)\nprint('this is {not json')\nsys.stderr.write('warning: sloppy tool')\n",
    );
    let reason = tool_failure_both_ways(dir.path(), r#"["python3", "notjson.py"]"#, 10_000).await;
    assert!(reason.contains("stdout is not one JSON value"), "{reason}");
    assert!(reason.contains("warning: sloppy tool"), "{reason}");
}

#[tokio::test]
async fn tool_spawn_failure() {
    let dir = TempDir::new().unwrap();
    let reason = tool_failure_both_ways(
        dir.path(),
        r#"["/nonexistent/lar-test-tool", "--flag"]"#,
        10_000,
    )
    .await;
    assert!(
        reason.contains("cannot start '/nonexistent/lar-test-tool'"),
        "{reason}"
    );
}

#[tokio::test]
async fn tool_timeout_without_error_path_fails_the_run() {
    let dir = TempDir::new().unwrap();
    python_tool(dir.path(), "slow.py", "import time\ntime.sleep(30)\n");
    let started = Instant::now();
    let reason = tool_failure_both_ways(dir.path(), r#"["python3", "slow.py"]"#, 300).await;
    assert!(reason.contains("timed out after 300 ms"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "two timed-out calls took {:?}",
        started.elapsed()
    );
}

/// Whether a pid is still a live process (a zombie counts as gone: it has exited).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

#[tokio::test]
async fn tool_timeout_kills_the_whole_process_group() {
    /// Room for two python3 start-ups on two busy cores before the kill.
    const TIMEOUT_MS: u64 = 5000;
    let dir = TempDir::new().unwrap();
    let pidfile = dir.path().join("pids.txt");
    let tool = python_tool(
        dir.path(),
        "spawner.py",
        r#"import json, os, subprocess, sys, time
json.load(sys.stdin)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(tmp, sys.argv[1])
time.sleep(60)
"#,
    );
    let reg = registry();
    let toml = format!(
        r#"
entry = "call"
[[nodes]]
id = "call"
type = "tool"
tool = "spawner"
error = "handle"
[[nodes]]
id = "handle"
type = "clear_error"
[tools.spawner]
command = ["python3", '{}', '{}']
timeout_ms = {TIMEOUT_MS}
"#,
        tool.display(),
        pidfile.display()
    );
    let g = graph(dir.path(), &toml, &reg);
    let mut run = new_run(&g, json!({}));
    let env = StepEnv { registry: &reg };

    // While the step runs, the tool and its child are alive. The watch lasts as long as the
    // step, not a fixed time: two python3 start-ups on two busy cores take what they take, and
    // the timeout leaves them seconds for it.
    let step_over = std::sync::atomic::AtomicBool::new(false);
    let step = async {
        let rec = run.step(&env).await;
        step_over.store(true, std::sync::atomic::Ordering::SeqCst);
        rec
    };
    let watch = async {
        loop {
            // Read before the file, so a file seen means "seen while the step still ran".
            let over = step_over.load(std::sync::atomic::Ordering::SeqCst);
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                let pids: Vec<u32> = text
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect();
                assert_eq!(pids.len(), 2);
                return Some((pids[0], pids[1], alive(pids[0]) && alive(pids[1]), over));
            }
            if over {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let started = Instant::now();
    let (rec, seen) = tokio::join!(step, watch);
    let elapsed = started.elapsed();
    let rec = rec.unwrap();
    let (tool_pid, child_pid, were_alive, seen_after) =
        seen.expect("the tool started and wrote its pids within the timeout");
    assert!(
        !seen_after,
        "the pids appeared only as the step ended: the tool started too late to check it"
    );
    assert!(were_alive, "tool and child were running before the timeout");
    // The timeout is the bound the code promises: not before it, and promptly after it.
    assert!(elapsed >= Duration::from_millis(TIMEOUT_MS), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(TIMEOUT_MS + 6000),
        "{elapsed:?}"
    );
    assert_eq!(rec.outcome(), "error");
    let reason = last_error(&rec);
    assert!(
        reason.contains(&format!(
            "timed out after {TIMEOUT_MS} ms (process group killed)"
        )),
        "{reason}"
    );

    // Soon after, neither the tool nor the child it spawned exists.
    let deadline = Instant::now() + Duration::from_secs(3);
    while (alive(tool_pid) || alive(child_pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(child_pid),
        "the tool's child {child_pid} survived the timeout"
    );
    assert!(!alive(tool_pid), "the tool {tool_pid} survived the timeout");

    // The error path runs next and clears the error.
    let rec = run.step(&env).await.unwrap();
    assert_eq!(rec.node_id(), "handle");
    assert_eq!(rec.outcome(), "success");
    assert!(run.step(&env).await.is_none());
    assert_eq!(run.status(), &RunStatus::Completed);
}

#[tokio::test]
async fn last_error_is_sticky_until_clear_error() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(
        dir.path(),
        r#"
entry = "fail"
[[nodes]]
id = "fail"
type = "tool"
tool = "fail"
inputs = ["reason"]
next = "unreached"
error = "after"
[[nodes]]
id = "unreached"
type = "set"
key = "status"
value = "unreached"
[[nodes]]
id = "after"
type = "set"
key = "seen"
value = 1
next = "again"
[[nodes]]
id = "again"
type = "set"
key = "seen"
value = 2
next = "clear"
[[nodes]]
id = "clear"
type = "clear_error"
next = "final"
[[nodes]]
id = "final"
type = "set"
key = "status"
value = "done"
"#,
        &reg,
    );
    let mut run = new_run(&g, json!({"reason": "the upstream said no"}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(
        node_ids(&recs),
        ["fail", "after", "again", "clear", "final"]
    );
    assert_indices(&recs);
    let outcomes: Vec<&str> = recs.iter().map(StepRecord::outcome).collect();
    assert_eq!(outcomes, ["error", "error", "error", "success", "success"]);
    for r in &recs[..3] {
        assert_eq!(r.error(), Some("the upstream said no"));
    }
    assert_eq!(recs[3].get("node"), Some(&json!("ClearErrorNode")));
    assert_eq!(
        diff(&recs[3]),
        &json!({"added": {}, "removed": {}, "updated": {"last_error": null}})
    );
    assert!(recs[4].error().is_none());
    assert_eq!(run.status(), &RunStatus::Completed);
}

const LOOP_GRAPH: &str = r#"
entry = "inc"
max_node_fatigue = 3
[[nodes]]
id = "inc"
type = "set"
key = "x"
value = "loop"
next = "route"
[[nodes]]
id = "route"
type = "router"
on = "x"
routes = { loop = "inc" }
"#;

#[tokio::test]
async fn max_node_fatigue_ends_the_run_with_an_error_step() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(dir.path(), LOOP_GRAPH, &reg);
    assert_eq!(g.max_node_fatigue, 3);
    let mut run = new_run(&g, json!({}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(
        node_ids(&recs),
        ["inc", "route", "inc", "route", "inc", "route", "inc"]
    );
    assert_indices(&recs);
    let last = recs.last().unwrap();
    assert_eq!(last.outcome(), "error");
    let err = last.error().unwrap();
    assert!(
        err.contains("max_node_fatigue (3) exceeded: node 'inc' visited 4 times"),
        "{err}"
    );
    assert_eq!(failed_reason(&run), err);
    assert_eq!(run.state()["__node_counts"], json!({"inc": 4, "route": 3}));
    assert!(run.step(&StepEnv { registry: &reg }).await.is_none());
}

#[tokio::test]
async fn max_steps_ends_the_run_with_an_error_step() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let toml = LOOP_GRAPH.replace("max_node_fatigue = 3", "max_steps = 5");
    let g = graph(dir.path(), &toml, &reg);
    let mut run = new_run(&g, json!({}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(recs.len(), 6, "five steps, then the error step");
    assert_indices(&recs);
    assert!(recs[..5].iter().all(|r| r.outcome() == "success"));
    let err = recs[5].error().unwrap();
    assert!(err.contains("max_steps (5) reached"), "{err}");
    assert_eq!(recs[5].outcome(), "error");
    assert_eq!(failed_reason(&run), err);
    assert_eq!(run.steps_taken(), 6);

    // Lár's defaults apply when the graph does not say: 100 steps.
    let g = graph(
        dir.path(),
        &LOOP_GRAPH.replace("max_node_fatigue = 3", "max_node_fatigue = 1000"),
        &reg,
    );
    let mut run = new_run(&g, json!({}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(recs.len(), 101);
    assert!(recs[100].error().unwrap().contains("max_steps (100)"));
}

const JURY_GRAPH: &str = r#"
entry = "prep"
[[nodes]]
id = "prep"
type = "set"
key = "amount"
value = 5000
next = "jury"
[[nodes]]
id = "jury"
type = "human_jury"
prompt = "Approve this SME loan?"
choices = ["approve", "reject"]
output = "decision"
context = ["amount", "risk", "absent"]
next = "after"
[[nodes]]
id = "after"
type = "router"
on = "decision"
routes = { approve = "yes", reject = "no" }
[[nodes]]
id = "yes"
type = "set"
key = "status"
value = "approved"
[[nodes]]
id = "no"
type = "set"
key = "status"
value = "rejected"
"#;

#[tokio::test]
async fn human_jury_halts_and_a_valid_decision_continues() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(dir.path(), JURY_GRAPH, &reg);
    let mut run = new_run(&g, json!({"risk": 0.82}));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["prep", "jury"]);
    assert_eq!(run.status(), &RunStatus::Halted);
    assert_eq!(run.waiting_node().map(|n| n.id.as_str()), Some("jury"));
    assert_eq!(run.position().next.as_deref(), Some("jury"));
    let halt = recs[1].get("halt").expect("the jury step carries the halt");
    assert_eq!(
        halt,
        &json!({
            "prompt": "Approve this SME loan?",
            "choices": ["approve", "reject"],
            "output": "decision",
            "context": {"amount": 5000, "risk": 0.82, "absent": null},
        })
    );
    assert_eq!(recs[1].get("node"), Some(&json!("HumanJuryNode")));
    // A halted run does not step on its own.
    assert!(run.step(&StepEnv { registry: &reg }).await.is_none());

    // A choice that is not offered is refused and changes nothing.
    let bad = Decision {
        choice: "maybe".into(),
        rationale: String::new(),
        decided_by: "mallory".into(),
        role: None,
        step: None,
        signature: None,
    };
    let before = run.position();
    match run.decide(&bad) {
        Err(DecisionError::InvalidChoice { choice, allowed }) => {
            assert_eq!(choice, "maybe");
            assert_eq!(allowed, "approve, reject");
        }
        other => panic!("expected InvalidChoice, got {other:?}"),
    }
    assert_eq!(run.position(), before);

    let good = Decision {
        choice: "approve".into(),
        rationale: "Within policy limits.".into(),
        decided_by: "reviewer@example.com".into(),
        role: Some("CFO".into()),
        step: None,
        signature: None,
    };
    let rec = run.decide(&good).unwrap();
    assert_eq!(rec.step(), 2);
    assert_eq!(rec.node_id(), "jury");
    assert_eq!(rec.outcome(), "success");
    assert_eq!(
        diff(&rec),
        &json!({"added": {"decision": "approve", "decision_rationale": "Within policy limits."}, "removed": {}, "updated": {}})
    );
    assert_eq!(
        rec.get("decision"),
        Some(
            &json!({"choice": "approve", "rationale": "Within policy limits.", "decided_by": "reviewer@example.com", "role": "CFO"})
        )
    );
    assert_eq!(run.status(), &RunStatus::Running);
    // Deciding twice is refused.
    assert!(matches!(
        run.decide(&good),
        Err(DecisionError::NotHalted(_))
    ));

    let rest = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&rest), ["after", "yes"]);
    // The step after the decision starts from the decided state.
    let mut before = rest[0].get("state_before").unwrap().clone();
    let mut decided = state(&rec);
    before.as_object_mut().unwrap().remove("__node_counts");
    decided.as_object_mut().unwrap().remove("__node_counts");
    assert_eq!(before, decided);
    assert_eq!(rest[0].step(), 3);
    assert_eq!(rest[1].step(), 4);
    assert_eq!(run.status(), &RunStatus::Completed);
    assert_eq!(run.state()["status"], json!("approved"));
}

#[tokio::test]
async fn a_halted_run_resumes_from_its_position() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let g = graph(dir.path(), JURY_GRAPH, &reg);
    let mut run = new_run(&g, json!({"risk": 0.5}));
    run_to_end(&mut run, &reg).await;
    // What a checkpoint stores, through JSON and back, into a fresh Run.
    let pos = serde_json::to_string(&run.position()).unwrap();
    let mut resumed =
        Run::from_position(Arc::clone(&g), serde_json::from_str(&pos).unwrap()).unwrap();
    assert_eq!(resumed.status(), &RunStatus::Halted);
    let rec = resumed
        .decide(&Decision {
            choice: "reject".into(),
            rationale: "too risky".into(),
            decided_by: "bob".into(),
            role: None,
            step: None,
            signature: None,
        })
        .unwrap();
    assert_eq!(rec.step(), 2);
    let rest = run_to_end(&mut resumed, &reg).await;
    assert_eq!(node_ids(&rest), ["after", "no"]);
    assert_eq!(resumed.state()["status"], json!("rejected"));
    assert_eq!(resumed.run_id(), run.run_id());
}

#[tokio::test]
async fn tools_get_the_idempotency_key_of_their_step() {
    let dir = TempDir::new().unwrap();
    let reg = registry();
    let tool = python_tool(
        dir.path(),
        "env.py",
        "import json, os, sys\njson.load(sys.stdin)\njson.dump({k: os.environ.get(k) for k in ['LAR_IDEMPOTENCY_KEY', 'LAR_JOB_ID', 'LAR_RUN_ID', 'LAR_STEP', 'GRAPH_ENV']}, sys.stdout)\n",
    );
    let toml = format!(
        r#"
entry = "first"
[[nodes]]
id = "first"
type = "set"
key = "x"
value = 1
next = "env1"
[[nodes]]
id = "env1"
type = "tool"
tool = "env"
output = "seen1"
next = "env2"
[[nodes]]
id = "env2"
type = "tool"
tool = "env"
output = "seen2"
[tools.env]
command = ["python3", '{}']
timeout_ms = 10000
env = {{ GRAPH_ENV = "from-the-graph" }}
"#,
        tool.display()
    );
    let g = graph(dir.path(), &toml, &reg);
    let mut run = Run::new(Arc::clone(&g), "job-7", "run-abc", obj(json!({})));
    let recs = run_to_end(&mut run, &reg).await;
    assert_eq!(node_ids(&recs), ["first", "env1", "env2"]);
    assert_eq!(
        run.state()["seen1"],
        json!({"LAR_IDEMPOTENCY_KEY": "job-7:1", "LAR_JOB_ID": "job-7", "LAR_RUN_ID": "run-abc", "LAR_STEP": "1", "GRAPH_ENV": "from-the-graph"})
    );
    assert_eq!(
        run.state()["seen2"]["LAR_IDEMPOTENCY_KEY"],
        json!("job-7:2")
    );
}

/// Runs `graph` with `run-once` (input `{}`) in an environment with `env` added; returns the
/// final state, stdout and stderr, after checking it exited 0.
fn run_once_with_env(
    graph: &Path,
    logs: &Path,
    job_id: &str,
    env: &[(&str, &str)],
) -> (Value, String, String) {
    let mut cmd = bin();
    cmd.envs(env.iter().copied())
        .args(["run-once", "--job-id", job_id, "--input", "{}", "--graph"])
        .arg(graph)
        .arg("--log-dir")
        .arg(logs);
    let (code, stdout, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let state = serde_json::from_str(stdout.trim()).unwrap();
    (state, stdout, stderr)
}

#[test]
fn tools_never_see_the_hmac_secret() {
    // Through the real binary, which holds the secret in its own environment.
    let dir = TempDir::new().unwrap();
    let secret = "s3cr3t-marker-9f1c0e";
    let tool = python_tool(
        dir.path(),
        "spy.py",
        &format!(
            "import json, os, sys\njson.load(sys.stdin)\nmarker = '{}'\njson.dump({{'has_hmac_secret': 'HMAC_SECRET' in os.environ, 'has_worker_secret': 'LAR_WORKER_SECRET' in os.environ, 'value_seen': any(marker in v for v in os.environ.values()), 'in_argv': any(marker in a for a in sys.argv), 'key': os.environ.get('LAR_IDEMPOTENCY_KEY'), 'path_set': 'PATH' in os.environ}}, sys.stdout)\n",
            &secret[..14]
        ),
    );
    let graph_path = common::write(
        dir.path(),
        "spy.toml",
        &format!(
            r#"
entry = "spy"
[[nodes]]
id = "spy"
type = "tool"
tool = "spy"
output = "spy"
[tools.spy]
command = ["python3", '{}']
timeout_ms = 10000
"#,
            tool.display()
        ),
    );
    let logs = dir.path().join("logs");
    let (state, stdout, stderr) = run_once_with_env(
        &graph_path,
        &logs,
        "job-spy",
        &[("HMAC_SECRET", secret), ("LAR_WORKER_SECRET", secret)],
    );
    assert_eq!(
        state["spy"],
        json!({"has_hmac_secret": false, "has_worker_secret": false, "value_seen": false, "in_argv": false, "key": "job-spy:0", "path_set": true})
    );
    // Nor does the secret leak into the output or the log.
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    let log = std::fs::read_to_string(common::only_log(&logs)).unwrap();
    assert!(!log.contains(secret));
    // The log is signed with it, though.
    let (code, out, _) = run(bin().env("HMAC_SECRET", secret).arg("verify").arg(&logs));
    assert_eq!(code, 0, "{out}");
    let (code, _, _) = run(bin().env("HMAC_SECRET", SECRET).arg("verify").arg(&logs));
    assert_eq!(code, 3);
}

/// The variables the loaded graphs read secrets from (an http tool's `env:` header here; an
/// LLM provider's `api_key_env` the same) are not inherited by command tools: a tool gets one
/// only when its `env` table grants it by name (`env:VAR`), or from a file (`file:PATH`).
#[test]
fn tools_see_graph_secrets_only_when_granted() {
    let dir = TempDir::new().unwrap();
    let tool = python_tool(
        dir.path(),
        "peek.py",
        "import json, os, sys\njson.load(sys.stdin)\njson.dump({'token': os.environ.get('PEEK_TOKEN'), 'granted': os.environ.get('GRANTED'), 'from_file': os.environ.get('FROM_FILE'), 'plain': os.environ.get('PLAIN'), 'unrelated': os.environ.get('UNRELATED_VAR')}, sys.stdout)\n",
    );
    common::write(dir.path(), "token.txt", "file-token-42\n");
    let graph_path = common::write(
        dir.path(),
        "peek.toml",
        &format!(
            r#"
entry = "plain"
[[nodes]]
id = "plain"
type = "tool"
tool = "peek"
output = "plain"
next = "granted"
[[nodes]]
id = "granted"
type = "tool"
tool = "peek_granted"
output = "granted"
next = "call"
[[nodes]]
id = "call"
type = "tool"
tool = "api"
output = "api"
error = "end"
next = "end"
[[nodes]]
id = "end"
type = "clear_error"
[tools.peek]
command = ["python3", '{tool}']
timeout_ms = 10000
[tools.peek_granted]
command = ["python3", '{tool}']
timeout_ms = 10000
env = {{ GRANTED = "env:PEEK_TOKEN", FROM_FILE = "file:token.txt", PLAIN = "env-less" }}
[tools.api.http]
url = "http://127.0.0.1:9/never-called"
headers = {{ Authorization = "env:PEEK_TOKEN" }}
"#,
            tool = tool.display()
        ),
    );
    let (state, _, _) = run_once_with_env(
        &graph_path,
        &dir.path().join("logs"),
        "job-peek",
        &[
            ("HMAC_SECRET", "peek-secret-0123456789"),
            ("PEEK_TOKEN", "tok-5e1f9a"),
            ("UNRELATED_VAR", "still-inherited"),
        ],
    );
    assert_eq!(
        state["plain"],
        json!({"token": null, "granted": null, "from_file": null, "plain": null, "unrelated": "still-inherited"})
    );
    assert_eq!(
        state["granted"],
        json!({"token": null, "granted": "tok-5e1f9a", "from_file": "file-token-42", "plain": "env-less", "unrelated": "still-inherited"})
    );
    // The compliance inventory names each secret a tool is handed, by its source only.
    let (code, out, err) = run(bin().arg("manifest").arg(&graph_path));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("GRANTED <env:PEEK_TOKEN>") && out.contains("token.txt>"),
        "{out}"
    );
    assert!(!out.contains("tok-5e1f9a") && !out.contains("file-token-42"));
}

/// A decision's signature covers the job, the halt it answers and every recorded field: a
/// change to any of them, or another secret, makes it invalid.
#[test]
fn a_decision_signature_covers_every_field_and_the_job() {
    let secret = lar_worker::audit::Secret::new(SECRET).unwrap();
    let mut d = Decision {
        choice: "approve".into(),
        rationale: "Within policy limits.".into(),
        decided_by: "cfo@example.com".into(),
        role: Some("CFO".into()),
        step: Some(2),
        signature: None,
    };
    assert!(!d.verify("job-1", &secret), "unsigned is invalid");
    d.sign("job-1", &secret);
    assert!(d.verify("job-1", &secret));
    // It travels as JSON (a header, a wrapped message) and still verifies.
    let back: Decision = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert!(back.verify("job-1", &secret));
    assert!(!d.verify("job-2", &secret), "another job");
    let other = lar_worker::audit::Secret::new("another-secret").unwrap();
    assert!(!d.verify("job-1", &other), "another secret");
    let changes: [fn(&mut Decision); 5] = [
        |d| d.choice = "reject".into(),
        |d| d.rationale.push('!'),
        |d| d.decided_by = "mallory".into(),
        |d| d.role = None,
        |d| d.step = Some(3),
    ];
    for change in changes {
        let mut altered = d.clone();
        change(&mut altered);
        assert!(!altered.verify("job-1", &secret), "{altered:?}");
    }
}

/// A command tool's exit ends the call, not its pipes: a tool with chatty stderr, one that
/// leaves a background child holding stdout, and one that floods stdout each get their true
/// outcome at once instead of a timeout (they used to block on a full pipe or wait for an end
/// of file that never came, until the step's timeout).
#[tokio::test]
async fn command_tools_end_with_the_tool_not_with_its_pipes() {
    use lar_worker::tools::command::{run_command, CommandCall};
    use lar_worker::tools::ToolContext;
    let ctx = ToolContext {
        job_id: "j".into(),
        run_id: "r".into(),
        step: 0,
        scope: None,
    };
    let env = std::collections::BTreeMap::new();
    let (env, ctx) = (&env, &ctx);
    let call = |script: &'static str| async move {
        let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let started = Instant::now();
        let out = run_command(
            CommandCall {
                tool: "t",
                argv: &argv,
                timeout: Duration::from_secs(20),
                env,
                cwd: None,
            },
            &serde_json::Map::new(),
            ctx,
        )
        .await;
        (out, started.elapsed())
    };
    let (chatty, took) =
        call("head -c 6000000 /dev/zero | tr '\\0' x >&2; echo '{\"ok\":1}'").await;
    assert_eq!(chatty.map_err(|e| e.0), Ok(json!({"ok": 1})));
    assert!(took < Duration::from_secs(10), "{took:?}");

    let (background, took) = call("(sleep 100 &); echo '{\"ok\":2}'").await;
    assert_eq!(background.map_err(|e| e.0), Ok(json!({"ok": 2})));
    assert!(took < Duration::from_secs(10), "{took:?}");

    let (flood, took) = call("head -c 20000000 /dev/zero | tr '\\0' 1").await;
    let err = flood.expect_err("too much stdout").0;
    assert!(err.contains("wrote more than"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// A failing command tool's stderr goes into `last_error`, the step record and the result:
/// the value of every secret a loaded graph uses (here an `env:` header) is redacted from it,
/// for a tool granted that secret in its `env` table (or one that reads it some other way).
#[tokio::test]
async fn a_failing_tool_cannot_put_a_graph_secret_into_the_evidence() {
    use lar_worker::net::secret::HeaderSpec;
    use lar_worker::tools::command::{run_command, CommandCall};
    use lar_worker::tools::ToolContext;
    let var = format!("LAR_TEST_TOOL_KEY_{}", std::process::id());
    let value = "sk-test-0123456789abcdef";
    std::env::set_var(&var, value);
    HeaderSpec::parse("Authorization", &format!("env:{var}"), Path::new("/")).unwrap();
    let ctx = ToolContext {
        job_id: "j".into(),
        run_id: "r".into(),
        step: 0,
        scope: None,
    };
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("echo \"key is ${var}\" >&2; exit 3"),
    ];
    let granted = std::collections::BTreeMap::from([(
        var.clone(),
        lar_worker::net::secret::ValueSpec::parse("env", &format!("env:{var}"), Path::new("/"))
            .unwrap(),
    )]);
    let err = run_command(
        CommandCall {
            tool: "t",
            argv: &argv,
            timeout: Duration::from_secs(10),
            env: &granted,
            cwd: None,
        },
        &serde_json::Map::new(),
        &ctx,
    )
    .await
    .expect_err("the tool fails")
    .0;
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("key is [redacted]"), "{err}");
    assert!(!err.contains(value), "{err}");
}
