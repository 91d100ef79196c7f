//! The compliance action inventory (Lár's ComplianceManifestGenerator, done right): every node,
//! every external action, every human-approval point reachable from the entry, and risk flags.

use super::load::successors;
use super::model::{Graph, NodeKind, RouteSelector, ToolSpec};
use serde_json::{json, Value};

pub fn manifest(graph: &Graph) -> Value {
    let mut nodes = Vec::new();
    let mut actions = Vec::new();
    let mut approvals = Vec::new();
    let mut risks = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let targets: Vec<&str> = successors(node)
            .iter()
            .map(|t| graph.nodes[*t].id.as_str())
            .collect();
        nodes.push(json!({
            "id": node.id,
            "type": node.kind.type_name(),
            "lar_class": node.kind.lar_class(),
            "next": targets,
        }));
        match &node.kind {
            NodeKind::Tool {
                tool,
                inputs,
                output,
                error,
            } => {
                let (transport, detail) = match graph.tools.get(tool) {
                    Some(ToolSpec::Command {
                        argv,
                        timeout,
                        timeout_explicit,
                        ..
                    }) => {
                        if !timeout_explicit {
                            risks.push(risk(
                                &node.id,
                                "tool_without_timeout",
                                format!(
                                    "tool '{tool}' has no timeout_ms; the default of {} ms applies",
                                    timeout.as_millis()
                                ),
                            ));
                        }
                        (
                            "command",
                            json!({"argv": argv, "timeout_ms": timeout.as_millis() as u64, "timeout_explicit": timeout_explicit}),
                        )
                    }
                    Some(ToolSpec::Registered { name }) => {
                        ("registered", json!({"function": name}))
                    }
                    None => ("registered", json!({"function": tool})),
                };
                actions.push(json!({
                    "node": node.id, "tool": tool, "transport": transport, "detail": detail,
                    "inputs": inputs, "output": output,
                }));
                if error.is_none() {
                    risks.push(risk(
                        &node.id,
                        "tool_failure_ends_run",
                        format!(
                            "tool '{tool}' has no 'error' path: a failure ends the run as failed"
                        ),
                    ));
                }
                if transport == "command" && reaches_end_without_review(graph, i) {
                    risks.push(risk(&node.id, "external_action_without_human_review", format!(
                        "after tool '{tool}' a path reaches the end of the run without a human_jury")));
                }
            }
            NodeKind::HumanJury {
                prompt,
                choices,
                output,
                context,
            } => {
                approvals.push(json!({
                    "node": node.id, "prompt": prompt, "choices": choices,
                    "output": output, "context": context,
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
                    if let Some(n) = nodes.last_mut() {
                        n["expression"] = json!(e.source());
                    }
                }
            }
            _ => {}
        }
    }
    json!({
        "graph": graph.name,
        "graph_digest": graph.digest,
        "source": graph.source.display().to_string(),
        "entry": graph.nodes[graph.entry].id,
        "limits": {"max_steps": graph.max_steps, "max_node_fatigue": graph.max_node_fatigue},
        "nodes": nodes,
        "external_actions": actions,
        "human_approval_points": approvals,
        "risks": risks,
    })
}

fn risk(node: &str, kind: &str, detail: String) -> Value {
    json!({"node": node, "risk": kind, "detail": detail})
}

/// Whether some path from `from` reaches an end of the run without passing a human_jury node.
fn reaches_end_without_review(graph: &Graph, from: usize) -> bool {
    let mut seen = vec![false; graph.nodes.len()];
    let mut stack = vec![from];
    while let Some(i) = stack.pop() {
        let node = &graph.nodes[i];
        let can_end = match &node.kind {
            NodeKind::Router { default, .. } => default.is_none(),
            NodeKind::Tool { error, .. } => node.next.is_none() || error.is_none(),
            _ => node.next.is_none(),
        };
        if can_end {
            return true;
        }
        for s in successors(node) {
            if !seen[s] && !matches!(graph.nodes[s].kind, NodeKind::HumanJury { .. }) {
                seen[s] = true;
                stack.push(s);
            }
        }
    }
    false
}
