//! `http` tools against a real local server: JSON in and out, secret headers, idempotent
//! retries versus a single attempt, non-2xx failures, timeouts, malformed answers.

mod llm_common;

use llm_common::*;
use serde_json::json;
use std::time::Duration;

/// One tool node calling `[tools.crm]`, then a set node; `tool_extra` goes into the tool table,
/// `http_extra` into its `http` table.
fn graph_toml(env: &Env, server: &Server, tool_extra: &str, http_extra: &str) -> String {
    format!(
        r#"
name  = "http_test"
entry = "lookup"

[[nodes]]
id     = "lookup"
type   = "tool"
tool   = "crm"
inputs = ["customer", "amount"]
output = "account"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "finished"
value = true

[tools.crm]
http = {{ url = "{url}/accounts/lookup", headers = {{ "X-Api-Key" = "file:{key}", "X-Team" = "support" }} {http_extra} }}
timeout_ms = 3000
retry_backoff_ms = 10
{tool_extra}
"#,
        url = server.url(),
        key = env.key_file().display(),
    )
}

fn input() -> serde_json::Value {
    json!({"customer": "c-42", "amount": 12.5})
}

#[tokio::test]
async fn inputs_go_as_json_and_the_json_answer_is_the_result() {
    let server = Server::start(|_, _| Resp::json(200, json!({"plan": "pro", "balance": 3}))).await;
    let env = Env::new();
    let (report, log) = env
        .run(env.graph(&graph_toml(&env, &server, "", "")), input())
        .await;

    assert_eq!(report.status_name(), "completed");
    assert_eq!(
        report.state["account"],
        json!({"plan": "pro", "balance": 3})
    );
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/accounts/lookup");
    assert_eq!(r.json(), json!({"customer": "c-42", "amount": 12.5}));
    assert_eq!(r.header("x-api-key"), Some(API_KEY));
    assert_eq!(r.header("x-team"), Some("support"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotency-key"), Some("job-1:0"));
    assert_eq!(steps(&log)[0]["node"], "ToolNode");
}

#[tokio::test]
async fn get_sends_inputs_as_query_parameters() {
    let server = Server::start(|req, _| Resp::json(200, json!({"path": req.path}))).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "", ", method = \"GET\"");
    let (report, _) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(
        report.state["account"]["path"],
        "/accounts/lookup?customer=c-42&amount=12.5"
    );
    assert_eq!(server.requests()[0].body, "");
}

#[tokio::test]
async fn idempotent_tools_are_retried() {
    let server = Server::start(|_, n| {
        if n < 2 {
            Resp::text(503, "busy")
        } else {
            Resp::json(200, json!({"plan": "pro"}))
        }
    })
    .await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "idempotent = true\nmax_attempts = 3", "");
    let (report, _) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(server.count(), 3);
    // The same key on every attempt: the server can tell a repeat.
    let keys: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or("").to_string())
        .collect();
    assert_eq!(keys, ["job-1:0", "job-1:0", "job-1:0"]);
}

#[tokio::test]
async fn a_retry_after_date_is_waited_for() {
    // The date is made when the 503 is sent: 3 s after the current second, so 2–3 s of wait.
    let server = Server::start(|_, n| {
        if n == 0 {
            Resp::text(503, "down for a moment").header("Retry-After", &http_date_in(3))
        } else {
            Resp::json(200, json!({"plan": "pro"}))
        }
    })
    .await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "idempotent = true\nmax_attempts = 3", "");
    let started = std::time::Instant::now();
    let (report, _) = env.run(env.graph(&toml), input()).await;
    let took = started.elapsed();
    assert_eq!(report.status_name(), "completed");
    assert_eq!(report.state["account"], json!({"plan": "pro"}));
    assert_eq!(server.count(), 2);
    // The backoff is 10 ms: the wait came from the date.
    assert!(took >= Duration::from_millis(1_800), "waited only {took:?}");
}

#[tokio::test]
async fn non_idempotent_tools_make_one_attempt() {
    let server = Server::start(|_, _| Resp::text(503, "busy, try later")).await;
    let env = Env::new();
    let (report, log) = env
        .run(env.graph(&graph_toml(&env, &server, "", "")), input())
        .await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 1);
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(
        err.starts_with("tool 'crm': POST http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("/accounts/lookup: HTTP 503 after 1 attempt(s): busy, try later"),
        "{err}"
    );
}

#[tokio::test]
async fn a_non_2xx_answer_fails_with_status_and_body_excerpt() {
    let server = Server::start(|_, _| Resp::json(404, json!({"error": "no customer c-42"}))).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "idempotent = true\nmax_attempts = 3", "");
    let (report, log) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 1, "a 404 is not retried");
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(err.contains("no customer c-42"), "{err}");
}

#[tokio::test]
async fn a_slow_endpoint_times_out_per_attempt() {
    let server =
        Server::start(|_, _| Resp::json(200, json!({})).after(Duration::from_secs(3))).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "idempotent = true\nmax_attempts = 2", "")
        .replace("timeout_ms = 3000", "timeout_ms = 200");
    let (report, log) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 2);
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(
        err.contains("timed out after 200 ms (2 attempt(s))"),
        "{err}"
    );
}

#[tokio::test]
async fn a_non_json_answer_is_a_tool_failure() {
    let server = Server::start(|_, _| Resp::text(200, "OK, done!")).await;
    let env = Env::new();
    let (report, log) = env
        .run(env.graph(&graph_toml(&env, &server, "", "")), input())
        .await;
    assert_eq!(report.status_name(), "failed");
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(err.contains("the answer is not JSON"), "{err}");
    assert!(err.contains("OK, done!"), "{err}");
}

#[tokio::test]
async fn secret_headers_stay_out_of_the_log_even_when_echoed() {
    let server = Server::start(|req, _| {
        let key = req.header("x-api-key").unwrap_or("").to_string();
        Resp::text(403, &format!("key {key} is not allowed here"))
    })
    .await;
    let env = Env::new();
    let (report, log) = env
        .run(env.graph(&graph_toml(&env, &server, "", "")), input())
        .await; // check_log asserts the key is absent
    assert_eq!(report.status_name(), "failed");
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(err.contains("key [redacted] is not allowed"), "{err}");
}

#[tokio::test]
async fn an_unset_env_header_is_named_and_nothing_is_sent() {
    let server = Server::start(|_, _| Resp::json(200, json!({}))).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "", "").replace(
        &format!("file:{}", env.key_file().display()),
        "env:LAR_TEST_SURELY_UNSET_HEADER",
    );
    let (report, log) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 0);
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(
        err.contains("environment variable LAR_TEST_SURELY_UNSET_HEADER is not set"),
        "{err}"
    );
}

#[test]
fn validation() {
    let env = Env::new();
    let errors = env.graph_errors(
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "tool"
tool = "post"
[tools.post]
http = { url = "ftp://example.com/x", method = "BREW", headers = { "bad header" = "x" }, extra = 1 }
max_attempts = 3
cwd = "/tmp"
"#,
    );
    for expected in [
        "node 'tools.post.http': field 'url': 'ftp' is not an http(s) URL",
        "node 'tools.post.http': field 'method': 'BREW' is not supported",
        "node 'tools.post.http': field 'headers': 'bad header' is not a valid HTTP header name",
        "node 'tools.post.http': field 'extra': unknown field",
        "node 'tools.post': field 'max_attempts': a non-idempotent HTTP tool is never retried",
        "node 'tools.post': field 'cwd': only applies to 'command' tools",
    ] {
        assert!(
            errors.contains(expected),
            "missing '{expected}' in:\n{errors}"
        );
    }
}
