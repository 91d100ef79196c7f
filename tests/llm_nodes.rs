//! `llm` nodes against a real local OpenAI-compatible server: answers and accounting, retries,
//! timeouts, malformed answers, missing placeholders, budgets, fallbacks, JSON answers, and
//! secrets kept out of the log.

mod llm_common;

use llm_common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A provider + one llm node + a final set node, with `extra` lines added to the provider and
/// `node` lines added to the llm node.
fn graph_toml(env: &Env, server: &Server, provider_extra: &str, node_extra: &str) -> String {
    format!(
        r#"
name  = "llm_test"
entry = "classify"

[providers.local]
base_url     = "{url}/v1"
api_key_file = "{key}"
timeout_ms   = 5000
retry_backoff_ms = 10
{provider_extra}

[[nodes]]
id       = "classify"
type     = "llm"
provider = "local"
model    = "m1"
system   = "You triage tickets for team {{team}}."
prompt   = "Classify this ticket: {{text}}"
output   = "category"
next     = "done"
{node_extra}

[[nodes]]
id    = "done"
type  = "set"
key   = "finished"
value = true
"#,
        url = server.url(),
        key = env.key_file().display(),
    )
}

fn input() -> Value {
    json!({"text": "I was charged twice", "team": "support"})
}

#[tokio::test]
async fn success_records_usage_prompt_and_summary() {
    let server = Server::start(|_, _| chat("billing", "m1-2024", 12, 3)).await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(
        &env,
        &server,
        "",
        "temperature = 0.2\nmax_tokens = 50",
    ));
    let (report, log) = env.run(graph, input()).await;

    assert_eq!(report.status_name(), "completed");
    assert_eq!(report.state["category"], "billing");

    let step = &steps(&log)[0];
    assert_eq!(step["node"], "LLMNode");
    assert_eq!(step["outcome"], "success");
    let meta = &step["run_metadata"];
    assert_eq!(meta["prompt_tokens"], 12);
    assert_eq!(meta["output_tokens"], 3);
    assert_eq!(meta["total_tokens"], 15);
    assert_eq!(meta["model"], "m1");
    assert_eq!(meta["response_model"], "m1-2024");
    assert_eq!(meta["attempts"], 1);
    assert_eq!(step["prompt"], "Classify this ticket: I was charged twice");
    assert_eq!(
        step["system_instruction"],
        "You triage tickets for team support."
    );
    // Lár's order: ... outcome, prompt, system_instruction, state_after.
    assert_eq!(
        &keys(step)[..9],
        &[
            "step",
            "node",
            "state_before",
            "state_diff",
            "run_metadata",
            "outcome",
            "prompt",
            "system_instruction",
            "state_after"
        ]
    );

    let summary = &log["summary"];
    assert_eq!(summary["total_prompt_tokens"], 12);
    assert_eq!(summary["total_completion_tokens"], 3);
    assert_eq!(summary["total_tokens"], 15);
    assert_eq!(summary["tokens_by_model"], json!({"m1": 15}));

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    let body = r.json();
    assert_eq!(body["model"], "m1");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(body["temperature"].as_f64(), Some(0.2));
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(r.user_prompt(), "Classify this ticket: I was charged twice");
}

#[tokio::test]
async fn reasoning_goes_to_metadata_not_the_answer() {
    let server = Server::start(|_, n| {
        if n == 0 {
            chat(
                "<think>charged twice means billing</think>\nbilling",
                "m1",
                5,
                9,
            )
        } else {
            Resp::json(
                200,
                json!({"choices": [{"message": {"content": "urgent",
                        "reasoning_content": "customer is angry"}}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}),
            )
        }
    })
    .await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "", "")
        .replace("next     = \"done\"", "next     = \"urgency\"")
        + r#"
[[nodes]]
id       = "urgency"
type     = "llm"
provider = "local"
model    = "m1"
prompt   = "How urgent? {text}"
output   = "urgency"
next     = "done"
"#;
    let (report, log) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(report.state["category"], "billing");
    assert_eq!(report.state["urgency"], "urgent");
    let s = steps(&log);
    assert_eq!(
        s[0]["run_metadata"]["reasoning_content"],
        "charged twice means billing"
    );
    assert_eq!(
        s[1]["run_metadata"]["reasoning_content"],
        "customer is angry"
    );
    assert_eq!(log["summary"]["total_tokens"], 20);
}

#[tokio::test]
async fn retries_429_honouring_retry_after() {
    let server = Server::start(|_, n| {
        if n == 0 {
            Resp::text(429, "rate limited, slow down").header("Retry-After", "1")
        } else {
            chat("billing", "m1", 10, 2)
        }
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "max_attempts = 3", ""));
    let started = Instant::now();
    let (report, log) = env.run(graph, input()).await;
    let took = started.elapsed();

    assert_eq!(report.status_name(), "completed");
    assert_eq!(server.count(), 2);
    // The backoff is 10 ms: the second of waiting came from Retry-After.
    assert!(took >= Duration::from_millis(950), "waited only {took:?}");
    assert_eq!(steps(&log)[0]["run_metadata"]["attempts"], 2);
}

#[tokio::test]
async fn retries_429_honouring_a_retry_after_date() {
    // 3 s after the current second when the 429 is sent: 2–3 s of wait.
    let server = Server::start(|_, n| {
        if n == 0 {
            Resp::text(429, "rate limited").header("Retry-After", &http_date_in(3))
        } else {
            chat("billing", "m1", 10, 2)
        }
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "max_attempts = 3", ""));
    let started = Instant::now();
    let (report, log) = env.run(graph, input()).await;
    let took = started.elapsed();

    assert_eq!(report.status_name(), "completed");
    assert_eq!(report.state["category"], "billing");
    assert_eq!(server.count(), 2);
    // The backoff is 10 ms: the wait came from the date.
    assert!(took >= Duration::from_millis(1_800), "waited only {took:?}");
    assert_eq!(steps(&log)[0]["run_metadata"]["attempts"], 2);
}

#[tokio::test]
async fn server_errors_until_attempts_run_out_take_the_error_path() {
    let server = Server::start(|_, _| Resp::text(500, "upstream exploded")).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "max_attempts = 3", "error = \"recover\"")
        + r#"
[[nodes]]
id   = "recover"
type = "clear_error"
next = "done"
"#;
    let (report, log) = env.run(env.graph(&toml), input()).await;

    assert_eq!(server.count(), 3);
    assert_eq!(report.status_name(), "completed");
    let s = steps(&log);
    assert_eq!(s[0]["outcome"], "error");
    let err = s[0]["error"].as_str().unwrap();
    assert!(err.contains("HTTP 500"), "{err}");
    assert!(err.contains("after 3 attempt(s)"), "{err}");
    assert!(err.contains("upstream exploded"), "{err}");
    assert!(err.contains("model 'm1'"), "{err}");
    assert_eq!(s[0]["state_after"]["last_error"], err);
    assert_eq!(s[1]["node"], "ClearErrorNode");
    assert_eq!(s[0]["run_metadata"]["attempts"], 3);
}

#[tokio::test]
async fn without_error_path_a_failure_ends_the_run_failed() {
    let server = Server::start(|_, _| Resp::text(503, "overloaded")).await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "max_attempts = 2", ""));
    let (report, log) = env.run(graph, input()).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 2);
    assert_eq!(steps(&log).len(), 1);
    assert_eq!(log["outcome"]["status"], "failed");
}

#[tokio::test]
async fn a_slow_answer_times_out() {
    let server = Server::start(|_, _| chat("late", "m1", 1, 1).after(Duration::from_secs(3))).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "max_attempts = 2", "")
        .replace("timeout_ms   = 5000", "timeout_ms   = 200");
    let started = Instant::now();
    let (report, log) = env.run(env.graph(&toml), input()).await;

    assert_eq!(report.status_name(), "failed");
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(server.count(), 2);
    let err = steps(&log)[0]["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("timed out after 200 ms (2 attempt(s))"),
        "{err}"
    );
}

#[tokio::test]
async fn a_malformed_answer_is_a_step_error_and_not_retried() {
    let server = Server::start(|_, _| Resp::text(200, "<html>gateway says hi</html>")).await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "max_attempts = 3", ""));
    let (report, log) = env.run(graph, input()).await;

    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 1);
    let err = steps(&log)[0]["error"].as_str().unwrap().to_string();
    assert!(err.contains("malformed answer"), "{err}");
    assert!(err.contains("gateway says hi"), "{err}");
}

#[tokio::test]
async fn a_missing_placeholder_sends_nothing() {
    let server = Server::start(|_, _| chat("billing", "m1", 1, 1)).await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "", ""));
    let (report, log) = env.run(graph, json!({"text": "hello"})).await; // no "team"

    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 0, "no request may be sent");
    let step = &steps(&log)[0];
    let err = step["error"].as_str().unwrap();
    assert!(err.contains("{team}"), "{err}");
    assert!(step.get("prompt").is_none());
}

#[tokio::test]
async fn the_token_budget_runs_out() {
    let server = Server::start(|_, _| chat("ok", "m1", 10, 5)).await;
    let env = Env::new();
    let toml = format!(
        r#"
entry = "a"
[providers.local]
base_url     = "{url}/v1"
api_key_file = "{key}"
[[nodes]]
id = "a"
type = "llm"
provider = "local"
model = "m1"
prompt = "one {{text}}"
output = "a_out"
next = "b"
[[nodes]]
id = "b"
type = "llm"
provider = "local"
model = "m1"
prompt = "two {{text}}"
output = "b_out"
next = "c"
[[nodes]]
id = "c"
type = "llm"
provider = "local"
model = "m1"
prompt = "three {{text}}"
output = "c_out"
"#,
        url = server.url(),
        key = env.key_file().display()
    );
    let (report, log) = env
        .run(env.graph(&toml), json!({"text": "x", "token_budget": 20}))
        .await;

    // 20 -> 5 -> -10, then the third call is refused before it is made.
    assert_eq!(server.count(), 2);
    assert_eq!(report.status_name(), "failed");
    assert_eq!(report.state["token_budget"], -10);
    let s = steps(&log);
    assert_eq!(s[0]["state_after"]["token_budget"], 5);
    let err = s[2]["error"].as_str().unwrap();
    assert!(err.contains("token budget exhausted"), "{err}");
    assert!(report.state.get("c_out").is_none());
    assert_eq!(log["summary"]["total_tokens"], 30);
}

#[tokio::test]
async fn fallbacks_answer_when_the_primary_fails() {
    let server = Server::start(|req, _| match req.model().as_str() {
        "primary" => Resp::text(503, "primary is down"),
        "backup" => chat("billing", "backup", 8, 2),
        _ => Resp::text(404, "no such model"),
    })
    .await;
    let env = Env::new();
    let toml = graph_toml(
        &env,
        &server,
        "max_attempts = 2",
        "fallbacks = [\"backup\"]",
    )
    .replace("model    = \"m1\"", "model    = \"primary\"");
    let (report, log) = env.run(env.graph(&toml), input()).await;

    assert_eq!(report.status_name(), "completed");
    let models: Vec<String> = server.requests().iter().map(|r| r.model()).collect();
    assert_eq!(models, ["primary", "primary", "backup"]);
    let meta = &steps(&log)[0]["run_metadata"];
    assert_eq!(meta["model"], "backup");
    assert_eq!(meta["attempts"], 3);
    let from = meta["fallback_from"][0].as_str().unwrap();
    assert!(
        from.contains("model 'primary'") && from.contains("HTTP 503"),
        "{from}"
    );
    assert_eq!(log["summary"]["tokens_by_model"], json!({"backup": 10}));
}

#[tokio::test]
async fn json_answers_are_parsed_into_state() {
    let server = Server::start(|req, _| {
        if req.user_prompt().contains("broken") {
            chat("{\"category\": \"billing\", ", "m1", 3, 3)
        } else {
            chat(
                "```json\n{\"category\": \"billing\", \"priority\": 2}\n```",
                "m1",
                3,
                3,
            )
        }
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "", "response_format = \"json\""));
    let (report, _) = env.run(graph.clone(), input()).await;
    assert_eq!(report.status_name(), "completed");
    assert_eq!(
        report.state["category"],
        json!({"category": "billing", "priority": 2})
    );
    assert_eq!(
        server.requests()[0].json()["response_format"],
        json!({"type": "json_object"})
    );

    let (report, log) = env
        .run(graph, json!({"text": "broken", "team": "support"}))
        .await;
    assert_eq!(report.status_name(), "failed");
    let step = &steps(&log)[0];
    assert!(step["error"].as_str().unwrap().contains("not valid JSON"));
    // The tokens were spent all the same.
    assert_eq!(step["run_metadata"]["total_tokens"], 6);
    // error, then prompt and system_instruction, then state_after.
    let k = keys(step);
    let pos = |name: &str| k.iter().position(|x| *x == name).unwrap();
    assert!(pos("outcome") < pos("error"));
    assert!(pos("error") < pos("prompt"));
    assert!(pos("prompt") < pos("system_instruction"));
    assert!(pos("system_instruction") < pos("state_after"));
}

#[tokio::test]
async fn an_echoed_api_key_is_redacted() {
    // A server that quotes the credential back in its error (some do).
    let server = Server::start(|req, _| {
        let auth = req.header("authorization").unwrap_or("").to_string();
        Resp::text(401, &format!("invalid credential: {auth}"))
    })
    .await;
    let env = Env::new();
    let graph = env.graph(&graph_toml(&env, &server, "", ""));
    let (report, log) = env.run(graph, input()).await; // check_log asserts the key is absent
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 1, "401 is not retried");
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("Bearer [redacted]"), "{err}");
    assert!(!report.state["last_error"].to_string().contains(API_KEY));
}

#[tokio::test]
async fn an_unset_key_variable_is_named_and_nothing_is_sent() {
    let server = Server::start(|_, _| chat("billing", "m1", 1, 1)).await;
    let env = Env::new();
    let toml = graph_toml(&env, &server, "", "").replace(
        &format!("api_key_file = \"{}\"", env.key_file().display()),
        "api_key_env  = \"LAR_TEST_SURELY_UNSET_API_KEY\"",
    );
    let (report, log) = env.run(env.graph(&toml), input()).await;
    assert_eq!(report.status_name(), "failed");
    assert_eq!(server.count(), 0);
    let err = steps(&log)[0]["error"].as_str().unwrap();
    assert!(
        err.contains("LAR_TEST_SURELY_UNSET_API_KEY is not set"),
        "{err}"
    );
}

#[test]
fn validation_names_node_and_field() {
    let env = Env::new();
    let errors = env.graph_errors(
        r#"
entry = "a"
[providers.local]
base_url = "http://user:pw@localhost:1/v1"
api_key_env = "K"
api_key_file = "k.txt"
[[nodes]]
id = "a"
type = "llm"
provider = "nowhere"
model = "m"
prompt = "unclosed {brace"
response_format = "xml"
output = "o"
"#,
    );
    for expected in [
        "field 'base_url': credentials in the URL",
        "field 'api_key_env': give either",
        "node 'a': field 'provider': unknown provider 'nowhere'",
        "node 'a': field 'prompt': the placeholder that starts at character 9 is not closed",
        "node 'a': field 'response_format': 'xml' is not a response format",
    ] {
        assert!(
            errors.contains(expected),
            "missing '{expected}' in:\n{errors}"
        );
    }
}

/// The shipped example, pointed at the stub server instead of Ollama.
fn shipped_triage(env: &Env, server: &Server) -> std::sync::Arc<lar_worker::graph::Graph> {
    let text = std::fs::read_to_string("graphs/support_triage_llm.toml").unwrap();
    let text = text
        .replace(
            "base_url     = \"http://localhost:11434/v1\"",
            &format!("base_url = \"{}/v1\"", server.url()),
        )
        .replace(
            "api_key_env  = \"LLM_API_KEY\"",
            &format!("api_key_file = \"{}\"", env.key_file().display()),
        );
    assert!(text.contains(&server.url()) && text.contains("api_key_file"));
    env.graph(&text)
}

#[tokio::test]
async fn the_shipped_triage_graph_runs() {
    let server = Server::start(|req, _| {
        if req.json().get("response_format").is_some() {
            if req.user_prompt().contains("login") {
                chat("{\"priority\": 1}", "llama3.2", 50, 10) // no category: the router's default
            } else {
                chat(
                    "{\"category\": \"billing\", \"priority\": 3, \"summary\": \"double charge\"}",
                    "llama3.2",
                    60,
                    20,
                )
            }
        } else {
            chat(
                "Hello, sorry about that - we are on it.",
                "llama3.2",
                80,
                15,
            )
        }
    })
    .await;
    let env = Env::new();
    let graph = shipped_triage(&env, &server);
    let (report, log) = env
        .run(
            graph.clone(),
            json!({"ticket_id": "T-1", "customer": "c-42",
                   "text": "I was charged twice this month", "token_budget": 4000}),
        )
        .await;
    assert_eq!(report.status_name(), "completed", "{:?}", report.status);
    assert_eq!(report.state["queue"], "billing");
    assert_eq!(report.state["triage"]["priority"], 3);
    assert_eq!(report.state["account"]["plan"], "pro");
    assert_eq!(
        report.state["draft_reply"],
        "Hello, sorry about that - we are on it."
    );
    assert_eq!(report.state["token_budget"], 4000 - 80 - 95);
    assert_eq!(log["summary"]["tokens_by_model"], json!({"llama3.2": 175}));
    let draft = server.requests()[1].user_prompt();
    assert!(draft.contains("Queue: billing"), "{draft}");

    let (report, _) = env
        .run(
            graph,
            json!({"ticket_id": "T-2", "customer": "c-7", "text": "error at login"}),
        )
        .await;
    assert_eq!(report.status_name(), "completed", "{:?}", report.status);
    assert_eq!(report.state["queue"], "general");
}

#[test]
fn the_manifest_lists_models_hosts_endpoints_and_risks() {
    let env = Env::new();
    let graph = env.graph(
        r#"
entry = "classify"

[[nodes]]
id = "classify"
type = "llm"
provider = "cloud"
model = "gpt-4o-mini"
fallbacks = ["gpt-4o"]
prompt = "{text}"
output = "category"
next = "fan"

[[nodes]]
id = "fan"
type = "batch"
branches = [["notify"], ["summarise"]]
next = "review"
error = "review"

[[nodes]]
id = "notify"
type = "tool"
tool = "webhook"
inputs = ["category"]

[[nodes]]
id = "summarise"
type = "reduce"
provider = "cloud"
model = "gpt-4o-mini"
keys = ["text"]
output = "summary"

[[nodes]]
id = "review"
type = "human_jury"
prompt = "Close the ticket?"
choices = ["yes", "no"]
next = "close"

[[nodes]]
id = "close"
type = "tool"
tool = "closer"
inputs = ["summary"]
error = "review"

[providers.cloud]
base_url = "http://llm.example.com/v1"
api_key_env = "CLOUD_KEY"

[tools.webhook]
http = { url = "https://hooks.example.com/notify", headers = { Authorization = "env:HOOK_TOKEN" } }
timeout_ms = 2000

[tools.closer]
http = { url = "https://crm.example.com/close", method = "PUT" }
"#,
    );
    let m = lar_worker::graph::manifest::manifest(&graph);
    assert_eq!(m["models"][0]["model"], "gpt-4o-mini");
    assert_eq!(m["models"][0]["fallbacks"], json!(["gpt-4o"]));
    assert_eq!(m["models"][0]["host"], "llm.example.com");
    assert_eq!(m["models"][1]["type"], "reduce");
    assert_eq!(m["models"][1]["removes"], json!(["text"]));
    assert_eq!(m["providers"][0]["api_key"], "env:CLOUD_KEY");
    let endpoints = m["http_endpoints"].as_array().unwrap();
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| e["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["crm.example.com", "hooks.example.com"]);
    assert_eq!(endpoints[0]["idempotent"], true); // PUT
    assert_eq!(endpoints[1]["idempotent"], false); // POST
    assert_eq!(
        endpoints[1]["headers"],
        json!(["Authorization: <env:HOOK_TOKEN>"])
    );
    let fan = m["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "fan")
        .unwrap();
    assert_eq!(fan["branches"], json!([["notify"], ["summarise"]]));

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
    let has = |node: &str, risk: &str| risks.iter().any(|(n, r)| n == node && r == risk);
    // The classification reaches the webhook inside the batch without review ...
    assert!(has(
        "classify",
        "llm_output_reaches_external_action_without_human_review"
    ));
    let detail = m["risks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["node"] == "classify"
                && r["risk"] == "llm_output_reaches_external_action_without_human_review"
        })
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("tool 'webhook'"), "{detail}");
    // ... but 'closer' sits behind the human_jury.
    assert!(!detail.contains("closer"), "{detail}");
    assert!(has("classify", "llm_failure_ends_run"));
    assert!(has("providers.cloud", "secret_over_cleartext_http"));
    assert!(has("providers.cloud", "llm_without_timeout"));
    assert!(has("closer", "tool_without_timeout") || has("close", "tool_without_timeout"));
    // Branch nodes' failures go to the batch's error path: not flagged on their own.
    assert!(!has("notify", "tool_failure_ends_run"));
    assert!(!has("fan", "batch_failure_ends_run"));
}
