//! The scenarios, each a function of the backend kind. Every scenario starts real worker
//! processes, and asserts on what a producer and an operator can see: results, dead letters,
//! depth, audit logs and exit codes.

use super::*;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

/// Generous: the suite runs two scenarios at once on two cores, next to other work.
const LONG: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(60);

/// A graph whose tool always fails (the built-in `fail` tool, failing with the job's `reason`).
const FAIL_GRAPH: &str = r#"
name  = "always_fails"
entry = "start"

[[nodes]]
id    = "start"
type  = "set"
key   = "status"
value = "started"
next  = "boom"

[[nodes]]
id     = "boom"
type   = "tool"
tool   = "fail"
inputs = ["reason"]
output = "never"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "status"
value = "done"
"#;

/// A graph with a slow python3 tool (sleeps `{dir}/sleep_seconds`, default 2 s).
const SLOW_GRAPH: &str = r#"
name  = "slow"
entry = "start"

[[nodes]]
id    = "start"
type  = "set"
key   = "status"
value = "started"
next  = "work"

[[nodes]]
id     = "work"
type   = "tool"
tool   = "slow_tool"
inputs = ["seq"]
output = "work"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "status"
value = "done"

[tools.slow_tool]
command    = ["python3", "{dir}/slow_tool.py"]
timeout_ms = 60000
"#;

const SLOW_TOOL: &str = r#"import json, os, sys, time
job = json.load(sys.stdin)
try:
    with open(os.path.join("{dir}", "sleep_seconds")) as f:
        secs = float(f.read())
except OSError:
    secs = 2.0
time.sleep(secs)
json.dump({"seq": job.get("seq"), "slept": secs}, sys.stdout)
"#;

/// A graph with a ~50 ms command tool.
const TICK_GRAPH: &str = r#"
name  = "tick"
entry = "start"

[[nodes]]
id    = "start"
type  = "set"
key   = "status"
value = "started"
next  = "tick"

[[nodes]]
id     = "tick"
type   = "tool"
tool   = "tick"
inputs = ["seq"]
output = "tick"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "status"
value = "done"

[tools.tick]
command    = ["/bin/sh", "-c", "cat >/dev/null; sleep 0.05; echo '{\"ticked\": true}'"]
timeout_ms = 20000
"#;

/// A bench job: even `seq` sums numbers, odd `seq` upper-cases text.
fn bench_job(seq: usize) -> Value {
    if seq.is_multiple_of(2) {
        json!({"kind": "sum", "numbers": [seq, 2, 3], "seq": seq})
    } else {
        json!({"kind": "text", "text": format!("hello-{seq}"), "seq": seq})
    }
}

/// What the bench graph must produce for `bench_job(seq)`: (result, digest).
fn bench_expected(seq: usize) -> (Value, String) {
    if seq.is_multiple_of(2) {
        let sum = seq as i64 + 5;
        (json!(sum), bench_digest(&sum.to_string()))
    } else {
        let up = format!("HELLO-{seq}");
        (json!(up), bench_digest(&up))
    }
}

/// Checks a bench graph final state against its job.
fn assert_bench_state(state: &Value, seq: usize) {
    let (result, digest) = bench_expected(seq);
    assert_eq!(state["status"], "done", "job {seq}: final state {state}");
    assert_eq!(state["result"], result, "job {seq}: final state {state}");
    assert_eq!(
        state["digest"],
        digest.as_str(),
        "job {seq}: final state {state}"
    );
    assert_eq!(state["seq"], json!(seq), "job {seq}: the input is kept");
}

fn seq_of(state: &Value) -> usize {
    state["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("a result without its job's seq: {state}")) as usize
}

/// Asserts the results are exactly one per `0..n` (by the unique `seq` of each input), all
/// completed; returns them ordered by seq.
fn assert_exactly_once(results: &[Value], n: usize, state_of: impl Fn(&Value) -> &Value) {
    let mut seen = BTreeSet::new();
    let mut dupes = Vec::new();
    for r in results {
        let s = seq_of(state_of(r));
        if !seen.insert(s) {
            dupes.push(s);
        }
    }
    assert!(
        dupes.is_empty(),
        "jobs with more than one result: {dupes:?}"
    );
    let missing: Vec<usize> = (0..n).filter(|s| !seen.contains(s)).collect();
    assert!(missing.is_empty(), "jobs without a result: {missing:?}");
    assert_eq!(results.len(), n, "results published");
}

fn meta(result: &Value) -> &Value {
    let m = &result["__lar_worker"];
    assert!(
        m.is_object(),
        "a state result without its __lar_worker metadata: {result}"
    );
    m
}

/// Asserts the metadata of a state result: status, attempt, a verifying audit log whose
/// job and run ids match. Returns the job id.
fn assert_state_meta(result: &Value, status: &str, attempt: u64) -> String {
    let m = meta(result);
    assert_eq!(m["status"], status, "metadata: {m}");
    assert_eq!(m["attempt"], json!(attempt), "metadata: {m}");
    let job_id = m["job_id"].as_str().expect("a job_id").to_string();
    assert!(!job_id.is_empty());
    let log_path = PathBuf::from(m["audit_log"].as_str().expect("an audit_log path"));
    assert_log_verifies(&log_path);
    let log = read_json(&log_path);
    assert_eq!(log["run_id"], m["run_id"], "the log is the result's run");
    assert_eq!(log["job_id"], m["job_id"], "the log is the result's job");
    assert_eq!(log["outcome"]["status"], status, "the log's outcome");
    assert_eq!(
        log["signature"], m["signature"],
        "the result carries the log's signature"
    );
    job_id
}

// ---- 1 ----------------------------------------------------------------------------------

/// N state jobs → N results, each final state right, completed, with a verifying audit log.
pub async fn happy_path_state_payload(kind: Kind) {
    let fx = Fixture::new(kind, Setup::state(bench_graph())).await;
    let n = 20;
    fx.push_all(
        (0..n)
            .map(|i| bench_job(i).to_string().into_bytes())
            .collect(),
    )
    .await;
    let w = fx.start_worker(false);
    let results = fx.wait_results(n, SHORT).await;
    let depth = fx.wait_drained(SHORT).await;
    assert_exactly_once(&results, n, |r| r);
    let mut job_ids = HashSet::new();
    for r in &results {
        let seq = seq_of(r);
        assert_bench_state(r, seq);
        assert_eq!(r["kind"], bench_job(seq)["kind"], "the input is kept");
        let m = meta(r);
        assert!(m["error"].is_null(), "a completed job has no error: {m}");
        assert!(m["signature"].is_string(), "signed: {m}");
        let job_id = assert_state_meta(r, "completed", 1);
        assert!(job_ids.insert(job_id.clone()), "job id {job_id} twice");
    }
    assert_eq!(
        depth.dead,
        0,
        "no dead letters: {:?}",
        fx.dead_letters().await
    );
    assert_eq!(fx.audit_logs().len(), n, "one audit log per job");
    assert_eq!(fx.results().await.len(), n, "no late extra result");
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}

// ---- 2 ----------------------------------------------------------------------------------

/// Envelopes in, envelope results out (same job id); an unknown graph is a dead letter.
pub async fn envelope_payload(kind: Kind) {
    let fx = Fixture::new(kind, Setup::envelope(&[("bench", bench_graph())])).await;
    let n = 10;
    let id = |i: usize| format!("{}-job-{i}", fx.prefix);
    let unknown = json!({
        "id": format!("{}-unknown", fx.prefix), "graph": "no_such_graph",
        "input": {"kind": "sum", "numbers": [1]}, "user_id": "u1",
    })
    .to_string();
    for i in 0..n {
        if i == n / 2 {
            fx.push(unknown.as_bytes()).await;
        }
        fx.push_json(
            &json!({"id": id(i), "graph": "bench", "input": bench_job(i), "user_id": "u1"}),
        )
        .await;
    }
    let w = fx.start_worker(false);
    let results = fx.wait_results(n, SHORT).await;
    let dead = fx.wait_dead_letters(1, SHORT).await;
    let depth = fx.wait_drained(SHORT).await;

    assert_exactly_once(&results, n, |r| &r["state"]);
    for r in &results {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = [
            "job_id",
            "run_id",
            "status",
            "state",
            "audit_log",
            "signature",
            "error",
            "attempt",
        ]
        .into();
        assert_eq!(keys, want, "envelope result fields: {r}");
        let seq = seq_of(&r["state"]);
        assert_eq!(
            r["job_id"],
            id(seq).as_str(),
            "the producer's id comes back"
        );
        assert_eq!(r["status"], "completed", "{r}");
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["attempt"], 1, "{r}");
        assert_bench_state(&r["state"], seq);
        assert!(
            r["state"].get("__lar_worker").is_none(),
            "envelope states carry no metadata key: {r}"
        );
        let log_path = PathBuf::from(r["audit_log"].as_str().expect("audit_log"));
        assert_log_verifies(&log_path);
        let log = read_json(&log_path);
        assert_eq!(log["run_id"], r["run_id"]);
        assert_eq!(log["user_id"], "u1", "the envelope's user_id is in the log");
        assert_eq!(log["signature"], r["signature"]);
    }

    assert_eq!(
        dead.len(),
        1,
        "exactly the unknown-graph envelope: {dead:?}"
    );
    assert_eq!(depth.dead, 1);
    let d = &dead[0];
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unknown graph 'no_such_graph'"),
        "the reason names the graph: {d}"
    );
    assert_eq!(
        d["payload"],
        unknown.as_str(),
        "the message is kept exactly: {d}"
    );
    assert_eq!(fx.results().await.len(), n, "no result for the dead letter");
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}

// ---- 3 ----------------------------------------------------------------------------------

/// Every kind of bad input is a dead letter with its reason; good jobs around them complete
/// and the daemon keeps consuming.
pub async fn bad_input_is_dead_lettered(kind: Kind) {
    let max = 4096;
    let fx = Fixture::new(
        kind,
        Setup::envelope(&[("bench", bench_graph())]).worker(|w| {
            w.max_message_bytes = max;
            w.concurrency = 2;
        }),
    )
    .await;
    let p = fx.prefix.clone();
    let big = json!({"id": format!("{p}-big"), "graph": "bench",
                     "input": {"kind": "text", "text": "x".repeat(max)}})
    .to_string()
    .into_bytes();
    let big_reason = format!(
        "message too large: {} bytes (max_message_bytes = {max})",
        big.len()
    );
    let mut not_utf8 =
        format!(r#"{{"id":"{p}-utf8","graph":"bench","input":{{"kind":"text","text":"ab"#)
            .into_bytes();
    let bad_at = not_utf8.len();
    not_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    not_utf8.extend_from_slice(br#""}}"#);
    let mut lookalike_bad_id = format!(r#"{{"lar_worker":1,"id":"{p}-"#).into_bytes();
    let lookalike_at = lookalike_bad_id.len();
    lookalike_bad_id.push(0xff);
    lookalike_bad_id.extend_from_slice(br#"","attempt":0,"raw":"x"}"#);
    let mut envelope_bad_id = format!(r#"{{"id":"{p}-"#).into_bytes();
    let envelope_at = envelope_bad_id.len();
    envelope_bad_id.push(0xff);
    envelope_bad_id.extend_from_slice(br#"","graph":"bench","input":{}}"#);
    // (bytes, what the reason must contain)
    let bad: Vec<(Vec<u8>, String)> = vec![
        (
            format!(r#"{{"id": "{p}-trunc", "graph": "bench", "input": "#).into_bytes(),
            "invalid JSON".into(),
        ),
        (b"".to_vec(), "invalid JSON".into()),
        (
            b"[1, 2, 3]".to_vec(),
            "the message must be a JSON object, found an array".into(),
        ),
        (
            b"\"just a string\"".to_vec(),
            "the message must be a JSON object, found a string".into(),
        ),
        (
            b"42".to_vec(),
            "the message must be a JSON object, found a number".into(),
        ),
        (
            json!({"id": format!("{p}-ghost"), "graph": "ghost_graph", "input": {}})
                .to_string()
                .into_bytes(),
            "unknown graph 'ghost_graph'".into(),
        ),
        (
            // Looks like a message the Redis backend wrapped itself, but is not one.
            format!(r#"{{"lar_worker":1,"id":"{p}-lookalike","attempt":-1,"raw":5,"graph":7}}"#)
                .into_bytes(),
            "'graph' must be a string".into(),
        ),
        (big, big_reason),
        (not_utf8, format!("invalid UTF-8 at byte {bad_at}")),
        // Lookalikes Redis's Lua JSON decoder reads and serde does not: each must still end as
        // one dead letter, not loop through lease expiry.
        (
            format!(r#"{{"lar_worker":1,"id":"{p}-hex","attempt":0,"raw":"x","n":0x10}}"#)
                .into_bytes(),
            "invalid JSON".into(),
        ),
        (
            format!(
                r#"{{"lar_worker":1,"id":"{p}-deep","attempt":0,"raw":5,"d":{}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            )
            .into_bytes(),
            "invalid JSON".into(),
        ),
        (
            lookalike_bad_id,
            format!("invalid UTF-8 at byte {lookalike_at}"),
        ),
        (
            envelope_bad_id,
            format!("invalid UTF-8 at byte {envelope_at}"),
        ),
    ];
    let good = |i: usize| {
        json!({"id": format!("{p}-good-{i}"), "graph": "bench", "input": bench_job(i)})
            .to_string()
            .into_bytes()
    };
    let mut messages = Vec::new();
    for (i, (b, _)) in bad.iter().enumerate() {
        messages.push(good(i));
        messages.push(b.clone());
    }
    let goods = bad.len() + 1;
    messages.push(good(bad.len()));
    for m in &messages {
        fx.push(m).await; // in order: each bad message sits between two good ones
    }
    let w = fx.start_worker(false);
    let results = fx.wait_results(goods, SHORT).await;
    let dead = fx.wait_dead_letters(bad.len(), SHORT).await;
    let depth = fx.wait_drained(SHORT).await;

    assert_exactly_once(&results, goods, |r| &r["state"]);
    for r in &results {
        assert_eq!(r["status"], "completed", "{r}");
        assert_bench_state(&r["state"], seq_of(&r["state"]));
    }
    assert_eq!(
        dead.len(),
        bad.len(),
        "one dead letter per bad message: {dead:#?}"
    );
    assert_eq!(
        depth.dead as usize,
        bad.len(),
        "the dead letters are counted"
    );
    for (bytes, want) in &bad {
        let hex = hex::encode(bytes);
        let matching: Vec<&Value> = dead
            .iter()
            .filter(|d| match std::str::from_utf8(bytes) {
                Ok(text) => d["payload"] == text,
                Err(_) => d["payload_hex"] == hex.as_str(),
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "exactly one dead letter keeps the message {:?} exactly; dead letters: {dead:#?}",
            String::from_utf8_lossy(bytes)
        );
        let d = matching[0];
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(want.as_str()),
            "dead letter reason {reason:?} should contain {want:?}"
        );
        let attempts = d["attempts"].as_array().expect("an attempts history");
        assert_eq!(attempts.len(), 1, "bad input is not retried: {d}");
        assert!(d["job_id"].is_string(), "{d}");
    }
    fx.assert_running(w);
    // Still consuming after all that.
    fx.push(&good(goods)).await;
    let results = fx.wait_results(goods + 1, SHORT).await;
    assert_exactly_once(&results, goods + 1, |r| &r["state"]);
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}

/// A result over `max_result_bytes` goes out without its state, as a failure with a dead
/// letter (a broker would refuse it, and a retry would meet the same refusal); the signed audit
/// log keeps the completed run. Jobs beside it are untouched.
pub async fn an_oversized_result_goes_out_without_its_state(kind: Kind) {
    let max = 4096;
    let fx = Fixture::new(
        kind,
        Setup::state(bench_graph()).worker(|w| {
            w.max_result_bytes = max;
            w.concurrency = 2;
        }),
    )
    .await;
    let big = json!({"kind": "text", "text": "x".repeat(3000), "seq": 1000});
    fx.push(big.to_string().as_bytes()).await;
    fx.push(bench_job(1).to_string().as_bytes()).await;
    let w = fx.start_worker(false);
    let results = fx.wait_results(2, SHORT).await;
    let dead = fx.wait_dead_letters(1, SHORT).await;
    fx.wait_drained(SHORT).await;
    let (small, large): (Vec<&Value>, Vec<&Value>) =
        results.iter().partition(|r| r.get("seq").is_some());
    assert_eq!((small.len(), large.len()), (1, 1), "{results:#?}");
    assert_bench_state(small[0], 1);
    assert_state_meta(small[0], "completed", 1);

    let r = large[0];
    assert!(
        serde_json::to_vec(r).unwrap().len() <= max,
        "the result fits: {r}"
    );
    let keys: Vec<&String> = r.as_object().expect("an object").keys().collect();
    assert_eq!(keys, ["__lar_worker"], "only the metadata is left: {r}");
    let m = meta(r);
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["state_omitted"], true, "{m}");
    let error = m["error"].as_str().expect("an error");
    assert!(error.contains("max_result_bytes (4096)"), "{error}");
    let log_path = PathBuf::from(m["audit_log"].as_str().expect("an audit_log path"));
    assert_log_verifies(&log_path);
    let log = read_json(&log_path);
    assert_eq!(
        log["outcome"]["status"], "completed",
        "the run itself completed"
    );
    assert_eq!(log["signature"], m["signature"]);
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["job_id"], m["job_id"], "{dead:#?}");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("max_result_bytes"),
        "{dead:#?}"
    );
    assert_eq!(
        dead[0]["payload"],
        big.to_string(),
        "the message is kept exactly"
    );
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}

// ---- 4 ----------------------------------------------------------------------------------

fn parse_ts(ts: &Value) -> chrono::NaiveDateTime {
    let s = ts
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {ts}"));
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.fZ")
        .unwrap_or_else(|e| panic!("bad timestamp {s}: {e}"))
}

/// A run that always fails is attempted `attempts` times with backoff between, then one
/// failed result and one dead letter with the whole history.
pub async fn retry_with_backoff_then_dead_letter(kind: Kind) {
    let fx = Fixture::new(
        kind,
        Setup::state("always_fails.toml")
            .file("always_fails.toml", FAIL_GRAPH)
            .worker(|w| {
                w.attempts = 3;
                w.initial_backoff_ms = 300;
                w.multiplier = 2.0;
                w.max_backoff_ms = 2_000;
                w.jitter = 0.0;
                w.retry_failed_runs = true;
            }),
    )
    .await;
    let why = format!("conformance: the service is down ({})", fx.prefix);
    fx.push_json(&json!({"reason": why, "seq": 0})).await;
    let w = fx.start_worker(false);
    let dead = fx.wait_dead_letters(1, SHORT).await;
    let results = fx.wait_results(1, SHORT).await;
    let depth = fx.wait_drained(SHORT).await;

    assert_eq!(results.len(), 1, "exactly one failed result: {results:#?}");
    assert_eq!(depth.results, 1);
    let r = &results[0];
    let m = meta(r);
    assert!(
        m["error"].as_str().unwrap_or_default().contains(&why),
        "the result says why: {m}"
    );
    let job_id = assert_state_meta(r, "failed", 3);
    assert!(
        r["last_error"].as_str().unwrap_or_default().contains(&why),
        "{r}"
    );

    assert_eq!(dead.len(), 1, "exactly one dead letter: {dead:#?}");
    assert_eq!(depth.dead, 1);
    let d = &dead[0];
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("failed") && reason.contains(&why), "{d}");
    assert_eq!(d["job_id"], job_id.as_str(), "the dead letter is the job's");
    let attempts = d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "three attempts recorded: {d}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], json!(i + 1), "{d}");
        assert!(
            a["error"].as_str().unwrap_or_default().contains(&why),
            "{d}"
        );
    }
    // The backoff was waited out: 300 ms, then 600 ms (no jitter), at least.
    let at: Vec<_> = attempts.iter().map(|a| parse_ts(&a["at"])).collect();
    let gap1 = (at[1] - at[0]).num_milliseconds();
    let gap2 = (at[2] - at[1]).num_milliseconds();
    assert!(gap1 >= 300, "retry 1 came {gap1} ms after attempt 1");
    assert!(gap2 >= 600, "retry 2 came {gap2} ms after attempt 2");

    // One signed log per attempt, all failed, all this job's.
    let logs = fx.audit_logs();
    assert_eq!(logs.len(), 3, "one audit log per attempt: {logs:?}");
    for l in &logs {
        assert_log_verifies(l);
        let log = read_json(l);
        assert_eq!(log["outcome"]["status"], "failed");
        assert_eq!(log["job_id"], job_id.as_str());
    }
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}

// ---- 5 ----------------------------------------------------------------------------------

/// Three worker processes share one queue of 3,000 jobs: each job exactly one result.
pub async fn three_workers_3000_jobs(kind: Kind) {
    let n = 3000;
    let fx = Fixture::new(
        kind,
        Setup::state(bench_graph()).worker(|w| w.concurrency = 8),
    )
    .await;
    fx.push_all(
        (0..n)
            .map(|i| bench_job(i).to_string().into_bytes())
            .collect(),
    )
    .await;
    assert_eq!(fx.depth().await.ready as usize, n, "all jobs queued");
    let workers: Vec<WorkerId> = (0..3).map(|_| fx.start_worker(true)).collect();
    for w in &workers {
        let status = fx.wait_exit(*w, LONG).await;
        assert!(
            status.success(),
            "worker exited with {status}\n{}",
            fx.worker_logs()
        );
    }
    let depth = fx.depth().await;
    assert_eq!(
        (depth.ready, depth.claimed, depth.delayed, depth.dead),
        (0, 0, 0, 0),
        "nothing left behind: {depth:?}"
    );
    let results = fx.results().await;
    assert_exactly_once(&results, n, |r| r);
    let mut job_ids = HashSet::new();
    for r in &results {
        let m = meta(r);
        assert_eq!(m["status"], "completed", "{r}");
        assert_bench_state(r, seq_of(r));
        assert!(job_ids.insert(m["job_id"].clone()), "job id twice: {m}");
    }
    assert_eq!(fx.audit_logs().len(), n, "every job ran exactly once");
    fx.assert_no_job_state_left().await;
}

// ---- 6 ----------------------------------------------------------------------------------

/// A worker holding jobs is SIGKILLed; a second worker recovers and finishes every job, each
/// with exactly one result.
pub async fn kill_9_holder_jobs_are_recovered(kind: Kind) {
    let n = 8;
    let fx = Fixture::new(
        kind,
        Setup::state("slow.toml")
            .file("slow.toml", SLOW_GRAPH)
            .file("slow_tool.py", SLOW_TOOL)
            .worker(|w| {
                w.concurrency = 4;
                w.lease_ms = 2000;
            }),
    )
    .await;
    fx.push_all(
        (0..n)
            .map(|i| json!({"seq": i}).to_string().into_bytes())
            .collect(),
    )
    .await;
    let a = fx.start_worker(false);
    fx.eventually("worker A to hold 4 claims", SHORT, || async {
        (fx.depth().await.claimed >= 4).then_some(())
    })
    .await;
    fx.kill_9(a);
    let at_kill = fx.depth().await;
    assert!(
        at_kill.claimed >= 1,
        "the dead worker's claims are still held: {at_kill:?}"
    );
    let b = fx.start_worker(true);
    let status = fx.wait_exit(b, LONG).await;
    assert!(status.success(), "worker B: {status}\n{}", fx.worker_logs());
    let depth = fx.depth().await;
    assert_eq!(
        (depth.ready, depth.claimed, depth.delayed, depth.dead),
        (0, 0, 0, 0),
        "nothing left behind: {depth:?}"
    );
    let results = fx.results().await;
    assert_exactly_once(&results, n, |r| r);
    for r in &results {
        assert_eq!(r["status"], "done", "{r}");
        assert_eq!(r["work"]["seq"], r["seq"], "{r}");
        assert_state_meta(r, "completed", 1);
    }
    fx.assert_no_job_state_left().await;
}

/// A worker frozen (SIGSTOP) while holding jobs loses its leases; another worker takes the jobs
/// over and completes them. When the zombie wakes and completes them too, its late completions
/// are refused: exactly one result per job.
pub async fn stopped_zombie_worker_is_fenced(kind: Kind) {
    let n = 8;
    let fx = Fixture::new(
        kind,
        Setup::state("slow.toml")
            .file("slow.toml", SLOW_GRAPH)
            .file("slow_tool.py", SLOW_TOOL)
            .file("sleep_seconds", "2")
            .worker(|w| {
                w.concurrency = 4;
                w.lease_ms = 1500;
            }),
    )
    .await;
    fx.push_all(
        (0..n)
            .map(|i| json!({"seq": i}).to_string().into_bytes())
            .collect(),
    )
    .await;
    let a = fx.start_worker(false);
    let held = fx
        .eventually("worker A to hold 4 claims", SHORT, || async {
            let c = fx.depth().await.claimed;
            (c >= 4).then_some(c as usize)
        })
        .await;
    fx.signal(a, libc::SIGSTOP);
    assert_eq!(
        fx.depth().await.results,
        0,
        "A finished nothing before it froze"
    );
    let b = fx.start_worker(false);
    let results = fx.wait_results(n, LONG).await;
    assert_exactly_once(&results, n, |r| r);
    // Wake the zombie: its tools finished long ago, so its runs end and it tries to publish.
    fx.signal(a, libc::SIGCONT);
    fx.sigterm(a);
    let status = fx.wait_exit(a, LONG).await;
    assert_eq!(
        status.code(),
        Some(0),
        "zombie A: {status}\n{}",
        fx.worker_logs()
    );
    // The zombie is refused at its next fenced write: a step checkpoint (then it writes no log)
    // or the publish (then its log exists but no result does). Never more than one log a run.
    let logs = fx.audit_logs().len();
    assert!(
        (n..=n + held).contains(&logs),
        "{logs} audit logs for {n} jobs of which the zombie held {held}"
    );
    let depth = fx.wait_drained(SHORT).await;
    assert_eq!(depth.dead, 0, "{depth:?}");
    let results = fx.results().await;
    assert_exactly_once(&results, n, |r| r);
    for r in &results {
        assert_state_meta(r, "completed", 1);
    }
    fx.assert_running(b);
    fx.assert_no_job_state_left().await;
}

// ---- 7 ----------------------------------------------------------------------------------

/// SIGTERM mid-load: exit 0 within the drain deadline, nothing lost; a second worker finishes
/// the rest without duplicates.
pub async fn sigterm_under_load_drains_and_loses_nothing(kind: Kind) {
    let n = 500;
    let drain_ms = 5_000;
    let fx = Fixture::new(
        kind,
        Setup::state("tick.toml")
            .file("tick.toml", TICK_GRAPH)
            .worker(|w| {
                w.concurrency = 8;
                w.drain_timeout_ms = drain_ms;
            }),
    )
    .await;
    fx.push_all(
        (0..n)
            .map(|i| json!({"seq": i}).to_string().into_bytes())
            .collect(),
    )
    .await;
    let a = fx.start_worker(false);
    fx.eventually("100 results before SIGTERM", LONG, || async {
        (fx.depth().await.results >= 100).then_some(())
    })
    .await;
    fx.assert_running(a);
    let t = Instant::now();
    fx.sigterm(a);
    let status = fx
        .wait_exit(a, Duration::from_millis(drain_ms) + SHORT)
        .await;
    let took = t.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0\n{}",
        fx.worker_logs()
    );
    assert!(
        took <= Duration::from_millis(drain_ms) + Duration::from_secs(5),
        "the drain took {took:?} (drain_timeout_ms = {drain_ms})"
    );
    let depth = fx.depth().await;
    assert_eq!(
        depth.claimed, 0,
        "no claim left held after a clean exit: {depth:?}"
    );
    assert_eq!(depth.delayed, 0, "{depth:?}");
    assert_eq!(
        depth.ready + depth.results + depth.dead,
        n as u64,
        "queued + results + dead letters == pushed: {depth:?}"
    );
    assert!(
        depth.ready > 0,
        "SIGTERM should have come mid-way (all {n} done already): {depth:?}"
    );
    let b = fx.start_worker(true);
    let status = fx.wait_exit(b, LONG).await;
    assert!(status.success(), "worker B: {status}\n{}", fx.worker_logs());
    let depth = fx.depth().await;
    assert_eq!(
        (depth.ready, depth.claimed, depth.delayed, depth.dead),
        (0, 0, 0, 0),
        "{depth:?}"
    );
    let results = fx.results().await;
    assert_exactly_once(&results, n, |r| r);
    for r in &results {
        assert_eq!(meta(r)["status"], "completed", "{r}");
        assert_eq!(r["tick"]["ticked"], true, "{r}");
    }
    fx.assert_no_job_state_left().await;
}

/// SIGTERM while jobs run longer than the drain deadline: the worker exits 0 soon after the
/// deadline and hands the jobs back (not as failed attempts); another worker finishes them.
pub async fn sigterm_past_drain_deadline_hands_jobs_back(kind: Kind) {
    let n = 6;
    let drain_ms = 1_000;
    let fx = Fixture::new(
        kind,
        Setup::state("slow.toml")
            .file("slow.toml", SLOW_GRAPH)
            .file("slow_tool.py", SLOW_TOOL)
            .file("sleep_seconds", "30")
            .worker(|w| {
                w.concurrency = 4;
                w.drain_timeout_ms = drain_ms;
                w.lease_ms = 30_000;
            }),
    )
    .await;
    fx.push_all(
        (0..n)
            .map(|i| json!({"seq": i}).to_string().into_bytes())
            .collect(),
    )
    .await;
    let a = fx.start_worker(false);
    fx.eventually("worker A to hold 4 claims", SHORT, || async {
        (fx.depth().await.claimed >= 4).then_some(())
    })
    .await;
    let t = Instant::now();
    fx.sigterm(a);
    let status = fx.wait_exit(a, SHORT).await;
    let took = t.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0\n{}",
        fx.worker_logs()
    );
    assert!(
        took <= Duration::from_millis(drain_ms) + Duration::from_secs(8),
        "the drain took {took:?} (drain_timeout_ms = {drain_ms})"
    );
    let depth = fx.depth().await;
    assert_eq!(
        (
            depth.ready,
            depth.claimed,
            depth.delayed,
            depth.dead,
            depth.results
        ),
        (n as u64, 0, 0, 0, 0),
        "every job handed back at once, none left to lease expiry: {depth:?}"
    );
    std::fs::write(fx.path("sleep_seconds"), "0.1").unwrap();
    let b = fx.start_worker(true);
    let status = fx.wait_exit(b, LONG).await;
    assert!(status.success(), "worker B: {status}\n{}", fx.worker_logs());
    let results = fx.results().await;
    assert_exactly_once(&results, n, |r| r);
    for r in &results {
        // A hand-back is not a failed attempt.
        assert_state_meta(r, "completed", 1);
    }
    fx.assert_no_job_state_left().await;
}

// ---- 8 (redis only) ---------------------------------------------------------------------

const SEED_PRODUCER: &str = r#"
import hashlib, json, sys
import redis

url, queue, results, tag = sys.argv[1:5]
r = redis.Redis.from_url(url)
jobs = {
    "sum": {"kind": "sum", "numbers": [1, 2, 3], "ticket": tag + "-sum"},
    "text": {"kind": "text", "text": "héllo seed", "ticket": tag + "-text"},
}
for payload in jobs.values():
    r.rpush(queue, json.dumps(payload))

expected = {
    tag + "-sum": 6,
    tag + "-text": "HÉLLO SEED",
}
problems = []
for _ in jobs:
    item = r.blpop(results, timeout=60)
    if item is None:
        print("no result within 60 s")
        sys.exit(1)
    state = json.loads(item[1])
    ticket = state.get("ticket")
    if ticket not in expected:
        problems.append("unexpected result: %r" % (state,))
        continue
    want = expected.pop(ticket)
    digest = hashlib.sha256(str(want).encode()).hexdigest()[:16]
    if state.get("status") != "done":
        problems.append("%s: status %r" % (ticket, state.get("status")))
    if state.get("result") != want:
        problems.append("%s: result %r, want %r" % (ticket, state.get("result"), want))
    if state.get("digest") != digest:
        problems.append("%s: digest %r, want %r" % (ticket, state.get("digest"), digest))
    meta = state.get("__lar_worker") or {}
    if meta.get("status") != "completed":
        problems.append("%s: __lar_worker %r" % (ticket, meta))
if expected:
    problems.append("no result for %r" % sorted(expected))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("ok")
"#;

/// The seed's Python producer, unchanged: `rpush` a JSON state, `blpop` the final state.
pub async fn seed_python_interop(kind: Kind) {
    assert_eq!(kind, Kind::Redis, "the seed's producer speaks Redis");
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import redis"])
        .output()
        .await;
    if !probe.as_ref().is_ok_and(|o| o.status.success())
        && super::skip::skip_or_fail(
            "seed_python_interop",
            "python3 with the 'redis' package is not available here (pip install redis)",
        )
    {
        return;
    }
    let fx = Fixture::new(
        kind,
        Setup::state(bench_graph()).file("seed.py", SEED_PRODUCER),
    )
    .await;
    let w = fx.start_worker(false);
    let out = tokio::time::timeout(
        LONG,
        tokio::process::Command::new("python3")
            .arg(fx.path("seed.py"))
            .args([&redis_url(), &fx.names.jobs, &fx.names.results, &fx.prefix])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the python producer finished in time")
    .expect("python3 ran");
    assert!(
        out.status.success(),
        "the python producer failed: {}\nstdout: {}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fx.worker_logs()
    );
    let depth = fx.wait_drained(SHORT).await;
    assert_eq!((depth.results, depth.dead), (0, 0), "{depth:?}");
    fx.assert_running(w);
    fx.assert_no_job_state_left().await;
}
