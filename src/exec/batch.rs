//! Lár's BatchNode: every branch (a chain of nodes) runs at once on its own copy of the state;
//! then the copies are merged into the run's state in branch order, first writer wins, and the
//! keys that later branches wrote differently are listed in `_batch_conflicts`.
//!
//! The branches share the batch's `token_budget` (`super::budget`): each LLM call reserves from
//! one counter before it starts and settles after with the tokens it used, so concurrent
//! branches cannot together spend a budget each of them saw whole.
//!
//! The whole batch is ONE step of the run log: its record carries `batch_steps`, one sub-record
//! per branch node run (branch, position, node, state_diff, run_metadata, outcome, error,
//! prompt, system_instruction). Step numbers stay contiguous and each record is chained as any
//! other, so `verify` and Lár's verifier see an ordinary log.

use super::budget::SharedBudget;
use super::diff::state_diff;
use super::llm::{spend_budget, TOKEN_BUDGET};
use super::node::{
    bump_visit, elapsed_us, exec_leaf, insert_outcome, Ctx, NodeOutcome, LAST_ERROR, NODE_COUNTS,
};
use crate::clock::now_utc;
use crate::graph::Node;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Instant;

pub(super) const BATCH_CONFLICTS: &str = "_batch_conflicts";

/// What one branch did.
struct BranchRun {
    state: Map<String, Value>,
    records: Vec<Value>,
    /// Node indices that ran, in order.
    ran: Vec<usize>,
    failed: Option<String>,
    fatal: Option<String>,
}

pub(super) async fn run_batch(
    ctx: &Ctx<'_>,
    node: &Node,
    branches: &[Vec<usize>],
    error: Option<usize>,
    state: &mut Map<String, Value>,
) -> NodeOutcome {
    let base = state.clone();
    // A numeric budget is shared; anything else (none, null, not a number) is left to each
    // call's own check of its copy, which reports it.
    let budget = match base.get(TOKEN_BUDGET) {
        Some(Value::Number(n)) => Some(SharedBudget::new(
            n.as_f64().unwrap_or(0.0),
            n.as_i64().is_some(),
        )),
        _ => None,
    };
    let mut runs = futures::future::join_all(
        branches
            .iter()
            .enumerate()
            .map(|(b, chain)| run_branch(ctx, budget.as_ref(), b, chain, base.clone())),
    )
    .await;

    // Merge, first writer wins.
    let mut written: HashMap<&str, usize> = HashMap::new();
    let mut conflicts: Vec<(String, usize, Vec<usize>)> = Vec::new();
    let mut conflict = |key: &str, first: usize, later: usize| match conflicts
        .iter_mut()
        .find(|(k, _, _)| k == key)
    {
        Some((_, _, others)) => others.push(later),
        None => conflicts.push((key.to_string(), first, vec![later])),
    };
    let merged_separately = |k: &str| matches!(k, NODE_COUNTS | TOKEN_BUDGET | BATCH_CONFLICTS);
    for (b, run) in runs.iter().enumerate() {
        for (k, v) in &run.state {
            if merged_separately(k) || base.get(k) == Some(v) {
                continue;
            }
            match written.get(k.as_str()) {
                None => {
                    state.insert(k.clone(), v.clone());
                    written.insert(k, b);
                }
                Some(&first) if state.get(k) != Some(v) => conflict(k, first, b),
                Some(_) => {}
            }
        }
        for k in base.keys() {
            if merged_separately(k) || run.state.contains_key(k) {
                continue;
            }
            match written.get(k.as_str()) {
                None => {
                    state.shift_remove(k);
                    written.insert(k, b);
                }
                Some(&first) if state.contains_key(k) => conflict(k, first, b),
                Some(_) => {}
            }
        }
    }
    state.insert(
        BATCH_CONFLICTS.into(),
        Value::Array(
            conflicts
                .iter()
                .map(|(k, _, _)| Value::String(k.clone()))
                .collect(),
        ),
    );

    // Visit counts and the token budget add up over the branches (the tokens spent are those
    // the shared budget settled: each call's reported `total_tokens`).
    let mut records = Vec::new();
    let mut tokens = Tokens::default();
    for run in &runs {
        for &idx in &run.ran {
            bump_visit(state, &ctx.graph.node(idx).id);
        }
        for r in &run.records {
            tokens.add(r.get("run_metadata"));
        }
    }
    if tokens.any {
        spend_budget(state, tokens.total);
    }
    for run in &mut runs {
        records.append(&mut run.records);
    }

    let mut meta = tokens.into_metadata();
    meta.insert("branches".into(), Value::from(branches.len() as u64));
    if !conflicts.is_empty() {
        meta.insert(
            "conflicts".into(),
            Value::Array(
                conflicts
                    .iter()
                    .map(|(k, first, later)| {
                        let mut c = Map::new();
                        c.insert("key".into(), Value::String(k.clone()));
                        c.insert("kept_branch".into(), Value::from(*first as u64));
                        c.insert(
                            "dropped_branches".into(),
                            Value::Array(later.iter().map(|b| Value::from(*b as u64)).collect()),
                        );
                        Value::Object(c)
                    })
                    .collect(),
            ),
        );
    }
    let failures: Vec<(usize, &String)> = runs
        .iter()
        .enumerate()
        .filter_map(|(b, r)| r.failed.as_ref().or(r.fatal.as_ref()).map(|e| (b, e)))
        .collect();
    if !failures.is_empty() {
        meta.insert(
            "branch_errors".into(),
            Value::Array(
                failures
                    .iter()
                    .map(|(b, e)| Value::String(format!("branch {b}: {e}")))
                    .collect(),
            ),
        );
    }

    let mut out = NodeOutcome::go(node.next);
    out.metadata = meta;
    out.extra
        .insert("batch_steps".into(), Value::Array(records));
    if let Some(fatal) = runs.iter().find_map(|r| r.fatal.clone()) {
        out.fatal = Some(fatal);
        out.next = None;
    } else if let Some((_, first)) = failures.first() {
        // A failed branch set last_error in its copy; make sure the merged state shows one.
        if !state.get(LAST_ERROR).is_some_and(crate::json::truthy) {
            state.insert(LAST_ERROR.into(), Value::String((*first).clone()));
        }
        out.failed = Some((*first).clone());
        out.next = error;
    }
    out
}

async fn run_branch(
    ctx: &Ctx<'_>,
    budget: Option<&SharedBudget>,
    branch: usize,
    chain: &[usize],
    mut state: Map<String, Value>,
) -> BranchRun {
    let mut run = BranchRun {
        state: Map::new(),
        records: Vec::with_capacity(chain.len()),
        ran: Vec::with_capacity(chain.len()),
        failed: None,
        fatal: None,
    };
    for (position, &idx) in chain.iter().enumerate() {
        let node = ctx.graph.node(idx);
        let sub = Ctx {
            graph: ctx.graph,
            registry: ctx.registry,
            job_id: ctx.job_id,
            run_id: ctx.run_id,
            step: ctx.step,
            scope: Some(format!("b{branch}.{position}")),
            budget,
        };
        let started_at = now_utc();
        let clock = Instant::now();
        let before = state.clone();
        let out = exec_leaf(&sub, idx, &mut state).await;
        let diff = state_diff(&before, &state);
        let error = out.fatal.clone().or_else(|| out.failed.clone());

        let mut rec = Map::with_capacity(14);
        rec.insert("branch".into(), Value::from(branch as u64));
        rec.insert("position".into(), Value::from(position as u64));
        rec.insert("node".into(), Value::String(node.kind.lar_class().into()));
        rec.insert("node_id".into(), Value::String(node.id.clone()));
        rec.insert(
            "node_type".into(),
            Value::String(node.kind.type_name().into()),
        );
        rec.insert("state_diff".into(), diff);
        rec.insert("run_metadata".into(), Value::Object(out.metadata));
        insert_outcome(&mut rec, error, out.texts);
        rec.insert("started_at".into(), Value::String(started_at));
        rec.insert("duration_us".into(), Value::from(elapsed_us(clock)));
        run.records.push(Value::Object(rec));
        run.ran.push(idx);

        if out.fatal.is_some() {
            run.fatal = out.fatal;
            break;
        }
        if out.failed.is_some() {
            // The branch stops at its first failure; the batch's `error` takes over.
            run.failed = out.failed;
            break;
        }
    }
    run.state = state;
    run
}

/// Token totals over a batch's sub-steps, for the batch step's `run_metadata`.
#[derive(Default)]
struct Tokens {
    any: bool,
    prompt: u64,
    output: u64,
    total: u64,
    by_model: Map<String, Value>,
}

impl Tokens {
    fn add(&mut self, meta: Option<&Value>) {
        let Some(Value::Object(m)) = meta else {
            return;
        };
        let n = |k: &str| m.get(k).and_then(Value::as_u64);
        let (Some(p), Some(o)) = (n("prompt_tokens"), n("output_tokens")) else {
            return;
        };
        let t = n("total_tokens").unwrap_or(p.saturating_add(o));
        self.any = true;
        // Saturating throughout: the counts come from the provider's reply.
        self.prompt = self.prompt.saturating_add(p);
        self.output = self.output.saturating_add(o);
        self.total = self.total.saturating_add(t);
        if let Some(model) = m.get("model").and_then(Value::as_str) {
            let prev = self
                .by_model
                .get(model)
                .and_then(Value::as_u64)
                .unwrap_or(0);
            self.by_model
                .insert(model.to_string(), Value::from(prev.saturating_add(t)));
        }
    }

    /// Lár's field names; `tokens_by_model` because branches may use several models.
    fn into_metadata(self) -> Map<String, Value> {
        let mut m = Map::new();
        if self.any {
            m.insert("prompt_tokens".into(), Value::from(self.prompt));
            m.insert("output_tokens".into(), Value::from(self.output));
            m.insert("total_tokens".into(), Value::from(self.total));
            if self.by_model.len() == 1 {
                if let Some(model) = self.by_model.keys().next() {
                    m.insert("model".into(), Value::String(model.clone()));
                }
            }
            m.insert("tokens_by_model".into(), Value::Object(self.by_model));
        }
        m
    }
}
