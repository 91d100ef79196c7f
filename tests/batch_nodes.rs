//! `batch` and `reduce` nodes: branches run concurrently on copies of the state, merge first
//! writer wins with conflicts listed, every branch step is in the (verifiable) log, tokens and
//! budgets add up, the branches share one budget; a reduction summarises keys and removes them.

mod llm_common;

use llm_common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn provider(env: &Env, server: &Server) -> String {
    format!(
        r#"
[providers.local]
base_url     = "{url}/v1"
api_key_file = "{key}"
max_attempts = 1
timeout_ms   = 5000
"#,
        url = server.url(),
        key = env.key_file().display()
    )
}

/// Branch 0: an llm call then a set of `shared`; branch 1: a set of `shared`; branch 2: an llm
/// call on another model. The calls have `max_tokens`, so under a budget large enough for both
/// reservations they run together.
fn three_branches(env: &Env, server: &Server) -> String {
    r#"
entry = "fan_out"

[[nodes]]
id       = "fan_out"
type     = "batch"
branches = [["sentiment", "mark_a"], ["mark_b"], ["language"]]
next     = "done"
error    = "recover"

[[nodes]]
id       = "sentiment"
type     = "llm"
provider = "local"
model    = "model-a"
prompt   = "Sentiment of: {text}"
output   = "sentiment"
max_tokens = 20

[[nodes]]
id    = "mark_a"
type  = "set"
key   = "shared"
value = "from-a"

[[nodes]]
id    = "mark_b"
type  = "set"
key   = "shared"
value = "from-b"

[[nodes]]
id       = "language"
type     = "llm"
provider = "local"
model    = "model-c"
prompt   = "Language of: {text}"
output   = "language"
max_tokens = 20

[[nodes]]
id   = "recover"
type = "clear_error"
next = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "finished"
value = true
"#
    .to_string()
        + &provider(env, server)
}

#[tokio::test]
async fn three_branches_merge_first_writer_wins_and_every_step_is_logged() {
    let server = Server::start(|req, _| {
        let d = Duration::from_millis(500);
        match req.model().as_str() {
            "model-a" => chat("negative", "model-a", 10, 2).after(d),
            _ => chat("en", "model-c", 7, 1).after(d),
        }
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&three_branches(&env, &server));
    let (report, log) = env
        .run(
            graph,
            json!({"text": "this is awful", "token_budget": 1000}),
        )
        .await;

    assert_eq!(report.status_name(), "completed");
    let st = &report.state;
    assert_eq!(st["sentiment"], "negative");
    assert_eq!(st["language"], "en");
    assert_eq!(st["shared"], "from-a", "branch 0 wrote first");
    assert_eq!(st["_batch_conflicts"], json!(["shared"]));
    // Budget: 1000 - 12 - 8, spent by both branches.
    assert_eq!(st["token_budget"], 980);
    for n in [
        "fan_out",
        "sentiment",
        "mark_a",
        "mark_b",
        "language",
        "done",
    ] {
        assert_eq!(st["__node_counts"][n], 1, "{n}");
    }
    // The two calls overlapped.
    assert_eq!(server.count(), 2);
    assert!(
        server.max_in_flight() >= 2,
        "branches did not run concurrently"
    );

    let s = steps(&log);
    assert_eq!(s.len(), 2, "the batch is one step, then 'done'");
    assert_eq!(s[0]["step"], 0);
    assert_eq!(s[1]["step"], 1);
    let batch = &s[0];
    assert_eq!(batch["node"], "BatchNode");
    assert_eq!(batch["outcome"], "success");
    let subs = batch["batch_steps"].as_array().unwrap();
    let seen: Vec<(u64, &str)> = subs
        .iter()
        .map(|r| {
            (
                r["branch"].as_u64().unwrap(),
                r["node_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (0, "sentiment"),
            (0, "mark_a"),
            (1, "mark_b"),
            (2, "language")
        ]
    );
    assert_eq!(subs[0]["node"], "LLMNode");
    assert_eq!(subs[0]["prompt"], "Sentiment of: this is awful");
    assert_eq!(subs[0]["run_metadata"]["total_tokens"], 12);
    assert_eq!(subs[2]["state_diff"]["added"]["shared"], "from-b");
    for r in subs {
        assert_eq!(r["outcome"], "success");
    }
    let meta = &batch["run_metadata"];
    assert_eq!(meta["prompt_tokens"], 17);
    assert_eq!(meta["output_tokens"], 3);
    assert_eq!(meta["total_tokens"], 20);
    assert_eq!(
        meta["tokens_by_model"],
        json!({"model-a": 12, "model-c": 8})
    );
    assert_eq!(
        meta["conflicts"],
        json!([{"key": "shared", "kept_branch": 0, "dropped_branches": [1]}])
    );
    assert_eq!(log["summary"]["total_tokens"], 20);
    assert_eq!(
        log["summary"]["tokens_by_model"],
        json!({"model-a": 12, "model-c": 8})
    );
}

#[tokio::test]
async fn a_failing_branch_takes_the_batch_error_path() {
    let server = Server::start(|req, _| match req.model().as_str() {
        "model-a" => Resp::text(500, "model-a crashed"),
        _ => chat("en", "model-c", 7, 1),
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&three_branches(&env, &server));
    let (report, log) = env.run(graph, json!({"text": "hello"})).await;

    // recover (clear_error) then done.
    assert_eq!(report.status_name(), "completed");
    let s = steps(&log);
    assert_eq!(s[0]["outcome"], "error");
    let err = s[0]["error"].as_str().unwrap();
    assert!(
        err.contains("HTTP 500") && err.contains("model-a crashed"),
        "{err}"
    );
    assert_eq!(s[1]["node"], "ClearErrorNode");
    let subs = s[0]["batch_steps"].as_array().unwrap();
    // Branch 0 stopped at its failed call: mark_a never ran.
    let ids: Vec<&str> = subs
        .iter()
        .map(|r| r["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sentiment", "mark_b", "language"]);
    assert_eq!(subs[0]["outcome"], "error");
    assert_eq!(report.state["shared"], "from-b");
    assert_eq!(report.state["language"], "en");
    assert!(s[0]["run_metadata"]["branch_errors"][0]
        .as_str()
        .unwrap()
        .starts_with("branch 0: "));
}

/// A batch of four branches, each one `llm` call (`max_tokens`, when given, on each node).
fn four_calls(env: &Env, server: &Server, max_tokens: Option<u64>) -> String {
    let mut toml = String::from(
        r#"
entry = "fan_out"

[[nodes]]
id       = "fan_out"
type     = "batch"
branches = [["c0"], ["c1"], ["c2"], ["c3"]]
"#,
    );
    for b in 0..4 {
        toml += &format!(
            r#"
[[nodes]]
id       = "c{b}"
type     = "llm"
provider = "local"
model    = "m1"
prompt   = "{b} {{text}}"
output   = "out{b}"
"#
        );
        if let Some(m) = max_tokens {
            toml += &format!("max_tokens = {m}\n");
        }
    }
    toml + &provider(env, server)
}

#[tokio::test]
async fn branches_share_the_budget_and_those_over_it_fail() {
    // Every call uses 30 tokens (25 + 5) and takes 300 ms.
    let server =
        Server::start(|_, _| chat("ok", "m1", 25, 5).after(Duration::from_millis(300))).await;
    let env = Env::new();
    // Each call reserves max_tokens 5 + 3 bytes of prompt + 32 = 40. With 90: two calls run
    // together (80), the others wait; once both settled 30 are left, one more runs alone and
    // spends them; the last finds 0 left.
    let graph = env.graph(&four_calls(&env, &server, Some(5)));
    let (report, log) = env
        .run(graph, json!({"text": "x", "token_budget": 90}))
        .await;

    assert_eq!(server.count(), 3, "one call was refused before it was sent");
    assert_eq!(server.max_in_flight(), 2, "the calls that fit ran together");
    assert_eq!(report.status_name(), "failed");
    assert_eq!(report.state["token_budget"], 0);
    let s = steps(&log);
    let batch = &s[0];
    let spent = batch["run_metadata"]["total_tokens"].as_u64().unwrap();
    assert!(spent <= 90, "spent {spent} of a budget of 90");
    assert_eq!(spent, 90);
    assert_eq!(log["summary"]["total_tokens"], 90);
    let subs = batch["batch_steps"].as_array().unwrap();
    let refused: Vec<&Value> = subs.iter().filter(|r| r["outcome"] == "error").collect();
    assert_eq!(refused.len(), 1);
    let err = refused[0]["error"].as_str().unwrap();
    assert!(
        err.ends_with("token budget exhausted (token_budget = 0)"),
        "{err}"
    );
    assert!(
        refused[0]["run_metadata"].get("total_tokens").is_none(),
        "the refused call spent nothing"
    );
    // The first two branches started at once and were never refused.
    let b = refused[0]["branch"].as_u64().unwrap();
    assert!(b >= 2, "branch {b} was refused");
    assert!(batch["error"]
        .as_str()
        .unwrap()
        .contains("token budget exhausted"));
    assert_eq!(
        batch["run_metadata"]["branch_errors"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn without_max_tokens_budgeted_calls_run_one_at_a_time() {
    let server =
        Server::start(|_, _| chat("ok", "m1", 25, 5).after(Duration::from_millis(100))).await;
    let env = Env::new();
    let graph = env.graph(&four_calls(&env, &server, None));
    let (report, log) = env
        .run(graph, json!({"text": "x", "token_budget": 1000}))
        .await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(server.count(), 4);
    // No bound on a call: each runs alone, so none can overspend beside another.
    assert_eq!(server.max_in_flight(), 1);
    assert_eq!(report.state["token_budget"], 1000 - 4 * 30);
    assert_eq!(log["summary"]["total_tokens"], 120);

    // Without a budget they run together as before.
    let server =
        Server::start(|_, _| chat("ok", "m1", 25, 5).after(Duration::from_millis(300))).await;
    let graph = env.graph(&four_calls(&env, &server, None));
    let (report, _) = env.run(graph, json!({"text": "x"})).await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(server.max_in_flight(), 4);
}

#[tokio::test]
async fn reduce_summarises_keys_and_removes_them() {
    let server =
        Server::start(|_, _| chat("Customer is billed twice; wants refund.", "m1", 40, 9)).await;
    let env = Env::new();
    let toml = r#"
entry = "compress"

[[nodes]]
id       = "compress"
type     = "reduce"
provider = "local"
model    = "m1"
keys     = ["email_thread", "crm_notes"]
output   = "case_summary"
system   = "You write short case summaries."
max_tokens = 100
"#
    .to_string()
        + &provider(&env, &server);
    let (report, log) = env
        .run(
            env.graph(&toml),
            json!({"email_thread": "I was charged twice!", "crm_notes": {"plan": "pro"}, "keep": 1}),
        )
        .await;

    assert_eq!(report.status_name(), "completed");
    assert_eq!(
        report.state["case_summary"],
        "Customer is billed twice; wants refund."
    );
    assert!(report.state.get("email_thread").is_none());
    assert!(report.state.get("crm_notes").is_none());
    assert_eq!(report.state["keep"], 1);

    let prompt = server.requests()[0].user_prompt();
    assert!(
        prompt.contains("email_thread:\nI was charged twice!"),
        "{prompt}"
    );
    assert!(
        prompt.contains("crm_notes:\n{\"plan\":\"pro\"}"),
        "{prompt}"
    );
    let step = &steps(&log)[0];
    assert_eq!(step["node"], "ReduceNode");
    assert_eq!(step["prompt"], prompt);
    assert_eq!(
        step["system_instruction"],
        "You write short case summaries."
    );
    assert_eq!(step["run_metadata"]["total_tokens"], 49);
    let removed = step["state_diff"]["removed"].as_object().unwrap();
    assert!(removed.contains_key("email_thread") && removed.contains_key("crm_notes"));
}

#[tokio::test]
async fn a_reduce_with_a_missing_key_sends_nothing_and_removes_nothing() {
    let server = Server::start(|_, _| chat("x", "m1", 1, 1)).await;
    let env = Env::new();
    let toml = r#"
entry = "compress"
[[nodes]]
id       = "compress"
type     = "reduce"
provider = "local"
model    = "m1"
keys     = ["a", "b"]
prompt   = "Summarise {a} and {b}"
output   = "summary"
"#
    .to_string()
        + &provider(&env, &server);
    let (report, _) = env.run(env.graph(&toml), json!({"a": "only a"})).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 0);
    assert_eq!(report.state["a"], "only a");
    assert!(report.state["last_error"].as_str().unwrap().contains("{b}"));
}

#[test]
fn branch_nodes_are_validated() {
    let env = Env::new();
    let errors = env.graph_errors(
        r#"
entry = "start"
[[nodes]]
id = "start"
type = "set"
key = "k"
value = 1
next = "b"
[[nodes]]
id = "fan"
type = "batch"
branches = [["a", "b"], ["r"], ["a"], ["ghost"]]
[[nodes]]
id = "a"
type = "set"
key = "x"
value = 1
[[nodes]]
id = "b"
type = "set"
key = "y"
value = 2
next = "a"
[[nodes]]
id = "r"
type = "router"
on = "x"
routes = {}
"#,
    );
    let expected = "node 'fan': field 'branches': branch 4: no node has id 'ghost'";
    assert!(
        errors.contains(expected),
        "missing '{expected}' in:\n{errors}"
    );

    let errors = env.graph_errors(
        r#"
entry = "start"
[[nodes]]
id = "start"
type = "set"
key = "k"
value = 1
next = "fan"
[[nodes]]
id = "fan"
type = "batch"
branches = [["a", "b"], ["r"], ["a"]]
next = "b"
[[nodes]]
id = "a"
type = "set"
key = "x"
value = 1
[[nodes]]
id = "b"
type = "set"
key = "y"
value = 2
next = "a"
[[nodes]]
id = "r"
type = "router"
on = "x"
routes = {}
"#,
    );
    for expected in [
        "node 'fan': field 'branches': branch 3: 'a' already runs in batch 'fan' branch 1",
        "node 'r': field 'type': a router node cannot run inside batch 'fan'",
        "node 'b': field 'next': runs inside batch 'fan' (branch 1)",
        "node 'fan': leads to 'b', which runs only inside batch 'fan' (branch 1)",
    ] {
        assert!(
            errors.contains(expected),
            "missing '{expected}' in:\n{errors}"
        );
    }
}
