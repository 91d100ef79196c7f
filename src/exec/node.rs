//! What one node does to a state. Shared by the run's own steps and by batch branches, which
//! run nodes on copies of the state.

use super::batch::run_batch;
use super::budget::SharedBudget;
use super::llm::{call_llm, LlmResult};
use crate::graph::{Graph, NodeKind, RouteSelector, ToolSpec};
use crate::tools::command::{run_command, CommandCall};
use crate::tools::http::call_http;
use crate::tools::{Registry, ToolContext, ToolFailure};
use serde_json::{Map, Value};

pub(super) const NODE_COUNTS: &str = "__node_counts";
pub(super) const LAST_ERROR: &str = "last_error";
pub(super) const ROUTER_DECISION: &str = "_router_decision";

/// Where a node runs.
pub(super) struct Ctx<'a> {
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub job_id: &'a str,
    pub run_id: &'a str,
    /// The index of the step record this execution belongs to.
    pub step: u64,
    /// Inside a batch: `b<branch>.<position>`.
    pub scope: Option<String>,
    /// Inside a batch whose state has a numeric `token_budget`: the budget its branches share
    /// (LLM calls reserve from it instead of checking their copy of the state).
    pub budget: Option<&'a SharedBudget>,
}

/// The LLM texts Lár logs in a step, between `error` and `state_after`.
#[derive(Debug, Default, Clone)]
pub(super) struct PromptTexts {
    pub prompt: Option<String>,
    pub system_instruction: Option<String>,
}

/// Writes Lár's `outcome`, then `error`, `prompt` and `system_instruction` when present: the
/// part of a step record between `run_metadata` and `state_after`.
pub(super) fn insert_outcome(
    rec: &mut Map<String, Value>,
    error: Option<String>,
    texts: PromptTexts,
) {
    let outcome = if error.is_some() { "error" } else { "success" };
    rec.insert("outcome".into(), Value::String(outcome.into()));
    if let Some(e) = error {
        rec.insert("error".into(), Value::String(e));
    }
    if let Some(p) = texts.prompt {
        rec.insert("prompt".into(), Value::String(p));
    }
    if let Some(s) = texts.system_instruction {
        rec.insert("system_instruction".into(), Value::String(s));
    }
}

/// Microseconds since `clock`, for `duration_us`.
pub(super) fn elapsed_us(clock: std::time::Instant) -> u64 {
    u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What executing one node produced.
#[derive(Default)]
pub(super) struct NodeOutcome {
    pub next: Option<usize>,
    pub fatal: Option<String>,
    pub halt: Option<Value>,
    pub metadata: Map<String, Value>,
    /// A step error (a tool, model or branch failed): `last_error` holds it.
    pub failed: Option<String>,
    pub texts: PromptTexts,
    /// Our own record keys, written after Lár's (`batch_steps`).
    pub extra: Map<String, Value>,
}

impl NodeOutcome {
    pub fn go(next: Option<usize>) -> Self {
        NodeOutcome {
            next,
            ..NodeOutcome::default()
        }
    }

    /// A step error: `last_error` is set and the run takes `error` (or ends failed).
    fn step_error(state: &mut Map<String, Value>, reason: String, error: Option<usize>) -> Self {
        state.insert(LAST_ERROR.into(), Value::String(reason.clone()));
        NodeOutcome {
            failed: Some(reason),
            ..NodeOutcome::go(error)
        }
    }
}

/// Adds one to `__node_counts[node_id]`; returns the new count.
pub(super) fn bump_visit(state: &mut Map<String, Value>, node_id: &str) -> u64 {
    let counts = state
        .entry(NODE_COUNTS)
        .or_insert_with(|| Value::Object(Map::new()));
    if !counts.is_object() {
        *counts = Value::Object(Map::new());
    }
    let Value::Object(counts) = counts else {
        return 1;
    };
    // Saturating: the count can come from the job's own input.
    let n = counts
        .get(node_id)
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_add(1);
    counts.insert(node_id.to_string(), Value::from(n));
    n
}

/// Runs node `idx` on `state`.
pub(super) async fn exec_node(
    ctx: &Ctx<'_>,
    idx: usize,
    state: &mut Map<String, Value>,
) -> NodeOutcome {
    let node = ctx.graph.node(idx);
    match &node.kind {
        NodeKind::Batch { branches, error } => run_batch(ctx, node, branches, *error, state).await,
        _ => exec_leaf(ctx, idx, state).await,
    }
}

/// Runs any node but a batch (batches do not nest: the loader refuses it).
pub(super) async fn exec_leaf(
    ctx: &Ctx<'_>,
    idx: usize,
    state: &mut Map<String, Value>,
) -> NodeOutcome {
    let graph = ctx.graph;
    let node = graph.node(idx);
    match &node.kind {
        NodeKind::Set { key, value } => {
            let v = match value {
                Value::String(s) if s.len() > 2 && s.starts_with('{') && s.ends_with('}') => state
                    .get(&s[1..s.len() - 1])
                    .cloned()
                    .unwrap_or(Value::Null),
                other => other.clone(),
            };
            state.insert(key.clone(), v);
            NodeOutcome::go(node.next)
        }
        NodeKind::Router {
            selector,
            routes,
            default,
        } => {
            let key = match selector {
                RouteSelector::Key(k) => Ok(match state.get(k) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => "null".to_string(),
                    Some(other) => other.to_string(),
                }),
                RouteSelector::Expr(e) => e.route_key(state).await,
            };
            let key = match key {
                Ok(k) => k,
                Err(msg) => {
                    return NodeOutcome {
                        fatal: Some(msg),
                        ..NodeOutcome::go(None)
                    }
                }
            };
            let target = routes
                .iter()
                .find(|(route, _)| *route == key)
                .map(|(_, i)| *i)
                .or(*default);
            state.insert(ROUTER_DECISION.into(), Value::String(key.clone()));
            let mut out = NodeOutcome::go(target);
            if target.is_none() {
                out.metadata.insert(
                    "note".into(),
                    Value::String(format!("no route for '{key}' and no default: the run ends")),
                );
            }
            out
        }
        NodeKind::Tool {
            tool,
            inputs,
            output,
            error,
        } => {
            let mut args = Map::with_capacity(inputs.len());
            for k in inputs {
                args.insert(k.clone(), state.get(k).cloned().unwrap_or(Value::Null));
            }
            let tctx = ToolContext {
                job_id: ctx.job_id.to_string(),
                run_id: ctx.run_id.to_string(),
                step: ctx.step,
                scope: ctx.scope.clone(),
            };
            match call_tool(graph, ctx.registry, tool, &args, &tctx).await {
                Ok(result) => {
                    match (output, result) {
                        (Some(key), v) => {
                            state.insert(key.clone(), v);
                        }
                        (None, Value::Object(obj)) => state.extend(obj),
                        (None, _) => {}
                    }
                    NodeOutcome::go(node.next)
                }
                Err(ToolFailure(reason)) => NodeOutcome::step_error(state, reason, *error),
            }
        }
        NodeKind::ClearError => {
            state.insert(LAST_ERROR.into(), Value::Null);
            NodeOutcome::go(node.next)
        }
        NodeKind::HumanJury {
            prompt,
            choices,
            output,
            context,
            expiry,
        } => {
            let mut shown = Map::new();
            for k in context {
                shown.insert(k.clone(), state.get(k).cloned().unwrap_or(Value::Null));
            }
            let mut halt = Map::new();
            halt.insert("prompt".into(), Value::String(prompt.clone()));
            halt.insert(
                "choices".into(),
                Value::Array(choices.iter().cloned().map(Value::String).collect()),
            );
            halt.insert("output".into(), Value::String(output.clone()));
            halt.insert("context".into(), Value::Object(shown));
            if let Some(e) = expiry {
                halt.insert("expires_after_ms".into(), Value::from(e.after_ms));
                halt.insert("on_expiry".into(), Value::String(e.choice.clone()));
            }
            NodeOutcome {
                halt: Some(Value::Object(halt)),
                ..NodeOutcome::go(Some(idx))
            }
        }
        NodeKind::Llm { llm, output, error } => {
            let LlmResult {
                answer,
                metadata,
                texts,
            } = call_llm(ctx, &node.id, llm, state).await;
            let mut out = match answer {
                Ok(v) => {
                    state.insert(output.clone(), v);
                    NodeOutcome::go(node.next)
                }
                Err(reason) => NodeOutcome::step_error(state, reason, *error),
            };
            out.metadata = metadata;
            out.texts = texts;
            out
        }
        NodeKind::Reduce {
            llm,
            keys,
            output,
            error,
        } => {
            let LlmResult {
                answer,
                metadata,
                texts,
            } = call_llm(ctx, &node.id, llm, state).await;
            let mut out = match answer {
                Ok(v) => {
                    for k in keys {
                        state.shift_remove(k);
                    }
                    state.insert(output.clone(), v);
                    NodeOutcome::go(node.next)
                }
                Err(reason) => NodeOutcome::step_error(state, reason, *error),
            };
            out.metadata = metadata;
            out.texts = texts;
            out
        }
        NodeKind::Batch { .. } => NodeOutcome {
            fatal: Some(format!(
                "batch '{}' cannot run inside another batch",
                node.id
            )),
            ..NodeOutcome::go(None)
        },
    }
}

async fn call_tool(
    graph: &Graph,
    registry: &Registry,
    name: &str,
    args: &Map<String, Value>,
    ctx: &ToolContext,
) -> Result<Value, ToolFailure> {
    match graph.tools.get(name) {
        Some(ToolSpec::Command {
            argv,
            timeout,
            env,
            cwd,
            ..
        }) => {
            run_command(
                CommandCall {
                    tool: name,
                    argv,
                    timeout: *timeout,
                    env,
                    cwd: cwd.as_ref(),
                },
                args,
                ctx,
            )
            .await
        }
        Some(ToolSpec::Http(spec)) => call_http(name, spec, args, ctx).await,
        Some(ToolSpec::Registered { name: builtin }) => registry.call(builtin, args),
        None => registry.call(name, args),
    }
}
