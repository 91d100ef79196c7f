//! The compliance action inventory (Lár's ComplianceManifestGenerator, done right): every node,
//! every external action, every model and provider host, every HTTP endpoint, every
//! human-approval point, and risk flags.

use super::load::successors;
use super::model::{Graph, LlmSpec, NodeKind, ProviderSpec, RouteSelector, ToolSpec};
use crate::net::secret::ValueSpec;
use crate::net::SecretRef;
use serde_json::{json, Value};

pub fn manifest(graph: &Graph) -> Value {
    let mut nodes = Vec::new();
    let mut actions = Vec::new();
    let mut approvals = Vec::new();
    let mut models = Vec::new();
    let mut risks = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let targets: Vec<&str> = successors(node)
            .iter()
            .map(|t| graph.nodes[*t].id.as_str())
            .collect();
        let mut entry = json!({
            "id": node.id,
            "type": node.kind.type_name(),
            "lar_class": node.kind.lar_class(),
            "next": targets,
        });
        if let Some(pos) = graph.branch_of.get(&i) {
            entry["runs_in_batch"] = json!({
                "batch": graph.nodes[pos.batch].id,
                "branch": pos.branch,
                "position": pos.position,
            });
        }
        let in_branch = graph.branch_of.contains_key(&i);
        match &node.kind {
            NodeKind::Tool {
                tool,
                inputs,
                output,
                error,
            } => {
                let (transport, detail) = tool_detail(graph, &node.id, tool, &mut risks);
                actions.push(json!({
                    "node": node.id, "tool": tool, "transport": transport, "detail": detail,
                    "inputs": inputs, "output": output,
                }));
                if error.is_none() && !in_branch {
                    risks.push(risk(
                        &node.id,
                        "tool_failure_ends_run",
                        format!(
                            "tool '{tool}' has no 'error' path: a failure ends the run as failed"
                        ),
                    ));
                }
                if transport != "registered" && reaches_end_without_review(graph, i) {
                    risks.push(risk(&node.id, "external_action_without_human_review", format!(
                        "after tool '{tool}' a path reaches the end of the run without a human_jury")));
                }
            }
            NodeKind::Llm { llm, output, error } => {
                models.push(model_entry(graph, &node.id, "llm", llm, output, None));
                llm_risks(graph, i, llm, error.is_none() && !in_branch, &mut risks);
            }
            NodeKind::Reduce {
                llm,
                keys,
                output,
                error,
            } => {
                models.push(model_entry(
                    graph,
                    &node.id,
                    "reduce",
                    llm,
                    output,
                    Some(keys),
                ));
                llm_risks(graph, i, llm, error.is_none() && !in_branch, &mut risks);
            }
            NodeKind::Batch { branches, error } => {
                entry["branches"] = Value::Array(
                    branches
                        .iter()
                        .map(|chain| {
                            json!(chain
                                .iter()
                                .map(|n| graph.nodes[*n].id.as_str())
                                .collect::<Vec<_>>())
                        })
                        .collect(),
                );
                if error.is_none() {
                    risks.push(risk(
                        &node.id,
                        "batch_failure_ends_run",
                        "batch has no 'error' path: a failing branch ends the run as failed"
                            .to_string(),
                    ));
                }
            }
            NodeKind::HumanJury {
                prompt,
                choices,
                output,
                context,
                expiry,
            } => {
                approvals.push(json!({
                    "node": node.id, "prompt": prompt, "choices": choices,
                    "output": output, "context": context,
                    "expiry": expiry.as_ref().map(|e| json!({"after_ms": e.after_ms, "default_choice": e.choice})),
                }));
            }
            NodeKind::Router {
                selector, default, ..
            } => {
                if default.is_none() {
                    risks.push(risk(
                        &node.id,
                        "router_without_default",
                        "an unmatched route key ends the run".to_string(),
                    ));
                }
                if let RouteSelector::Expr(e) = selector {
                    entry["expression"] = json!(e.source());
                }
            }
            _ => {}
        }
        nodes.push(entry);
    }
    let providers: Vec<Value> = graph
        .providers
        .iter()
        .map(|(name, p)| provider_entry(graph, name, p, &mut risks))
        .collect();
    let endpoints: Vec<Value> = graph
        .tools
        .iter()
        .filter_map(|(name, spec)| match spec {
            ToolSpec::Http(h) => Some(json!({
                "tool": name,
                "method": h.method,
                "url": h.url,
                "host": host_of(&h.url),
                "idempotent": h.idempotent,
                "max_attempts": h.retry.max_attempts,
                "timeout_ms": h.timeout.as_millis() as u64,
                "headers": h.headers.iter().map(|x| x.describe()).collect::<Vec<_>>(),
                "used_by": users(graph, |k| matches!(k, NodeKind::Tool { tool, .. } if tool == name)),
            })),
            _ => None,
        })
        .collect();
    json!({
        "graph": graph.name,
        "graph_digest": graph.digest,
        "source": graph.source.display().to_string(),
        "entry": graph.nodes[graph.entry].id,
        "limits": {"max_steps": graph.max_steps, "max_node_fatigue": graph.max_node_fatigue},
        "nodes": nodes,
        "external_actions": actions,
        "models": models,
        "providers": providers,
        "http_endpoints": endpoints,
        "human_approval_points": approvals,
        "risks": risks,
    })
}

fn risk(node: &str, kind: &str, detail: String) -> Value {
    json!({"node": node, "risk": kind, "detail": detail})
}

fn host_of(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.to_string();
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// Whether secrets would cross the network in clear text (http:// to a host that is not this
/// machine).
fn cleartext_off_host(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| {
        u.scheme() == "http"
            && !matches!(
                u.host_str(),
                Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
            )
    })
}

fn users(graph: &Graph, pred: impl Fn(&NodeKind) -> bool) -> Vec<&str> {
    graph
        .nodes
        .iter()
        .filter(|n| pred(&n.kind))
        .map(|n| n.id.as_str())
        .collect()
}

fn tool_detail(
    graph: &Graph,
    node: &str,
    tool: &str,
    risks: &mut Vec<Value>,
) -> (&'static str, Value) {
    let no_timeout = |risks: &mut Vec<Value>, ms: u128| {
        risks.push(risk(
            node,
            "tool_without_timeout",
            format!("tool '{tool}' has no timeout_ms; the default of {ms} ms applies"),
        ))
    };
    match graph.tools.get(tool) {
        Some(ToolSpec::Command {
            argv,
            timeout,
            timeout_explicit,
            env,
            ..
        }) => {
            if !timeout_explicit {
                no_timeout(risks, timeout.as_millis());
            }
            // The secrets the program is handed (by source), for the inventory.
            let secrets: Vec<String> = env
                .iter()
                .filter_map(|(var, v)| match v {
                    ValueSpec::Secret(s) => Some(format!("{var} <{}>", s.describe())),
                    ValueSpec::Plain(_) => None,
                })
                .collect();
            (
                "command",
                json!({"argv": argv, "timeout_ms": timeout.as_millis() as u64, "timeout_explicit": timeout_explicit, "secrets": secrets}),
            )
        }
        Some(ToolSpec::Http(h)) => {
            if !h.timeout_explicit {
                no_timeout(risks, h.timeout.as_millis());
            }
            let sends_secret = h
                .headers
                .iter()
                .any(|x| matches!(x.value, crate::net::ValueSpec::Secret(_)));
            if sends_secret && cleartext_off_host(&h.url) {
                risks.push(risk(
                    node,
                    "secret_over_cleartext_http",
                    format!(
                        "tool '{tool}' sends a secret header to {} over plain http",
                        h.url
                    ),
                ));
            }
            (
                "http",
                json!({"method": h.method, "url": h.url, "host": host_of(&h.url),
                       "idempotent": h.idempotent, "max_attempts": h.retry.max_attempts,
                       "timeout_ms": h.timeout.as_millis() as u64, "timeout_explicit": h.timeout_explicit}),
            )
        }
        Some(ToolSpec::Registered { name }) => ("registered", json!({"function": name})),
        None => ("registered", json!({"function": tool})),
    }
}

fn model_entry(
    graph: &Graph,
    node: &str,
    kind: &str,
    llm: &LlmSpec,
    output: &str,
    keys: Option<&Vec<String>>,
) -> Value {
    let provider = graph.providers.get(&llm.provider);
    let mut m = json!({
        "node": node,
        "type": kind,
        "provider": llm.provider,
        "host": provider.and_then(|p| host_of(&p.base_url)),
        "model": llm.model,
        "fallbacks": llm.fallbacks,
        "model_env": provider.and_then(|p| p.model_env.clone()),
        "response_format": if llm.json { "json" } else { "text" },
        "max_tokens": llm.max_tokens,
        "reads": llm.prompt.keys(),
        "output": output,
    });
    if let Some(keys) = keys {
        m["removes"] = json!(keys);
    }
    m
}

fn provider_entry(graph: &Graph, name: &str, p: &ProviderSpec, risks: &mut Vec<Value>) -> Value {
    let used_by = users(graph, |k| match k {
        NodeKind::Llm { llm, .. } | NodeKind::Reduce { llm, .. } => llm.provider == name,
        _ => false,
    });
    let subject = format!("providers.{name}");
    if p.base_url_env.is_some() || p.model_env.is_some() {
        let vars: Vec<&str> = [p.base_url_env.as_deref(), p.model_env.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        risks.push(risk(
            &subject,
            "endpoint_set_by_environment",
            format!(
                "{} can replace the endpoint or model at run time: the graph digest does not pin them (the run log records the model used)",
                vars.join(", ")
            ),
        ));
    }
    let sends_secret = p.api_key.is_some()
        || p.headers
            .iter()
            .any(|x| matches!(x.value, crate::net::ValueSpec::Secret(_)));
    if sends_secret && cleartext_off_host(&p.base_url) {
        risks.push(risk(
            &subject,
            "secret_over_cleartext_http",
            format!("the API key goes to {} over plain http", p.base_url),
        ));
    }
    if !p.timeout_explicit {
        risks.push(risk(
            &subject,
            "llm_without_timeout",
            format!(
                "no timeout_ms; the default of {} ms per attempt applies",
                p.timeout.as_millis()
            ),
        ));
    }
    json!({
        "name": name,
        "base_url": p.base_url,
        "host": host_of(&p.base_url),
        "base_url_env": p.base_url_env,
        "model_env": p.model_env,
        "api_key": p.api_key.as_ref().map(SecretRef::describe),
        "headers": p.headers.iter().map(|x| x.describe()).collect::<Vec<_>>(),
        "timeout_ms": p.timeout.as_millis() as u64,
        "max_attempts": p.retry.max_attempts,
        "used_by": used_by,
    })
}

fn llm_risks(graph: &Graph, i: usize, llm: &LlmSpec, no_error_path: bool, risks: &mut Vec<Value>) {
    let node = &graph.nodes[i].id;
    if no_error_path {
        risks.push(risk(
            node,
            "llm_failure_ends_run",
            "no 'error' path: a failed model call ends the run as failed".to_string(),
        ));
    }
    let reached = actions_reached_without_review(graph, i);
    if !reached.is_empty() {
        risks.push(risk(
            node,
            "llm_output_reaches_external_action_without_human_review",
            format!(
                "the answer of model '{}' can lead to {} without a human_jury in between",
                llm.model,
                reached
                    .iter()
                    .map(|(n, t)| format!("tool '{t}' (node '{n}')"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
}

/// Where the run can go after node `i`, batches included: a batch enters its branches, a
/// branch node continues along its branch and, at its end or on a failure, after its batch.
fn flow_successors(graph: &Graph, i: usize) -> Vec<usize> {
    let node = &graph.nodes[i];
    if let NodeKind::Batch { branches, .. } = &node.kind {
        return branches.iter().filter_map(|c| c.first().copied()).collect();
    }
    match graph.branch_of.get(&i) {
        Some(pos) => {
            let mut out = successors(&graph.nodes[pos.batch]);
            if let NodeKind::Batch { branches, .. } = &graph.nodes[pos.batch].kind {
                if let Some(next) = branches
                    .get(pos.branch)
                    .and_then(|c| c.get(pos.position + 1))
                {
                    out.push(*next);
                }
            }
            out
        }
        None => successors(node),
    }
}

/// Whether the run can end right after node `i`.
fn can_end(graph: &Graph, i: usize) -> bool {
    let i = graph.branch_of.get(&i).map_or(i, |pos| pos.batch);
    let node = &graph.nodes[i];
    match &node.kind {
        NodeKind::Router { default, .. } => default.is_none(),
        NodeKind::Tool { .. }
        | NodeKind::Llm { .. }
        | NodeKind::Reduce { .. }
        | NodeKind::Batch { .. } => node.next.is_none() || node.kind.error_target().is_none(),
        _ => node.next.is_none(),
    }
}

/// Nodes reachable from `from` without passing a human_jury (`from` itself excluded).
fn unreviewed_from(graph: &Graph, from: usize) -> Vec<usize> {
    let mut seen = vec![false; graph.nodes.len()];
    let mut out = Vec::new();
    let mut stack = vec![from];
    while let Some(i) = stack.pop() {
        for s in flow_successors(graph, i) {
            if !seen[s] && !matches!(graph.nodes[s].kind, NodeKind::HumanJury { .. }) {
                seen[s] = true;
                out.push(s);
                stack.push(s);
            }
        }
    }
    out
}

/// Whether some path from `from` reaches an end of the run without passing a human_jury node.
fn reaches_end_without_review(graph: &Graph, from: usize) -> bool {
    can_end(graph, from)
        || unreviewed_from(graph, from)
            .into_iter()
            .any(|i| can_end(graph, i))
}

/// External tools (command or http) reachable from `from` without a human_jury: (node, tool).
fn actions_reached_without_review(graph: &Graph, from: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = unreviewed_from(graph, from)
        .into_iter()
        .filter_map(|i| match &graph.nodes[i].kind {
            NodeKind::Tool { tool, .. }
                if matches!(
                    graph.tools.get(tool),
                    Some(ToolSpec::Command { .. } | ToolSpec::Http(_))
                ) =>
            {
                Some((graph.nodes[i].id.clone(), tool.clone()))
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}
