//! One run of a graph. The run owns its state and advances one node per [`Run::step`]; between
//! steps its [`RunPosition`] is a complete description, so a checkpoint can store it and a later
//! process (after a crash or a human decision) can continue exactly where it stopped.

use super::node::{
    bump_visit, elapsed_us, exec_node, insert_outcome, Ctx, NodeOutcome, PromptTexts, LAST_ERROR,
    NODE_COUNTS,
};
use super::snapshot::{self, Snapshot};
use super::step::StepRecord;
use crate::graph::{Graph, NodeKind};
use crate::json::truthy;
use crate::tools::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed {
        reason: String,
    },
    /// Waiting at a `human_jury` node (the position's `next`) for a decision.
    Halted,
}

impl RunStatus {
    pub fn name(&self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed { .. } => "failed",
            RunStatus::Halted => "halted",
        }
    }
}

/// Everything needed to continue a run: what a checkpoint stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPosition {
    pub run_id: String,
    pub job_id: String,
    /// The id of the node that runs next (for a halted run: the jury node that waits).
    pub next: Option<String>,
    /// The index the next step record will have.
    pub step: u64,
    /// Absent from checkpoints, which take it from the journal's last `state_after`.
    #[serde(default)]
    pub state: Map<String, Value>,
    #[serde(flatten)]
    pub status: RunStatus,
}

/// [`RunPosition`] borrowed from a live run, without the state: what a checkpoint serializes
/// after every step. The state is already in the step's record (`state_after`), which the
/// chain covers, so storing it twice would double every step's write for nothing.
#[derive(Debug, Serialize)]
pub struct PositionRef<'a> {
    pub run_id: &'a str,
    pub job_id: &'a str,
    pub next: Option<&'a str>,
    pub step: u64,
    #[serde(flatten)]
    pub status: &'a RunStatus,
}

/// What a step needs from its surroundings.
pub struct StepEnv<'a> {
    pub registry: &'a Registry,
}

/// A human's answer to a `human_jury` node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub choice: String,
    #[serde(default)]
    pub rationale: String,
    pub decided_by: String,
    #[serde(default)]
    pub role: Option<String>,
    /// The index the decision's step takes: the step count when the run halted (the pending
    /// record's `step`). Set when a decision is submitted, so a copy of it delivered later
    /// is never applied to a later halt of the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// HMAC of the decision for its job (see [`Decision::sign`]), set where decisions are
    /// submitted. A worker with a secret applies only decisions that carry a valid one, so a
    /// message that merely claims a decision (anyone who can publish to the work queue could
    /// write the header) never becomes an approval in the evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Decision {
    /// What the signature covers: the job, the halt it answers, and every recorded field.
    fn signed_bytes(&self, job_id: &str) -> Vec<u8> {
        crate::json::to_canonical_vec(&serde_json::json!({
            "job_id": job_id,
            "step": self.step,
            "choice": self.choice,
            "rationale": self.rationale,
            "decided_by": self.decided_by,
            "role": self.role,
        }))
    }

    /// Signs the decision for `job_id` (after `step` is set).
    pub fn sign(&mut self, job_id: &str, secret: &crate::signing::Secret) {
        self.signature = Some(secret.sign(&self.signed_bytes(job_id)));
    }

    /// Whether the decision carries a valid signature for `job_id`.
    pub fn verify(&self, job_id: &str, secret: &crate::signing::Secret) -> bool {
        self.signature
            .as_deref()
            .is_some_and(|sig| secret.verify_hex(&self.signed_bytes(job_id), sig))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("the run is not waiting for a decision (it is {0})")]
    NotHalted(&'static str),
    #[error("'{choice}' is not an allowed choice (allowed: {allowed})")]
    InvalidChoice { choice: String, allowed: String },
}

pub struct Run {
    graph: Arc<Graph>,
    run_id: String,
    job_id: String,
    state: Map<String, Value>,
    next: Option<usize>,
    step: u64,
    status: RunStatus,
    /// The snapshot of `state` as it is now, kept from the last step's `state_after`: the next
    /// step's `state_before` is taken from it (see [`Snapshot::with_entry`]).
    snapshot: Option<Snapshot>,
}

impl Run {
    /// A new run at the graph's entry with `input` as its initial state.
    pub fn new(
        graph: Arc<Graph>,
        job_id: impl Into<String>,
        run_id: impl Into<String>,
        input: Map<String, Value>,
    ) -> Self {
        let next = Some(graph.entry);
        Run {
            graph,
            run_id: run_id.into(),
            job_id: job_id.into(),
            state: input,
            next,
            step: 0,
            status: RunStatus::Running,
            snapshot: None,
        }
    }

    /// Continues a run from a checkpointed position; fails if the graph has no such node.
    pub fn from_position(graph: Arc<Graph>, pos: RunPosition) -> Result<Self, String> {
        let next = match &pos.next {
            Some(id) => Some(graph.node_index(id).ok_or_else(|| {
                format!(
                    "checkpoint names node '{id}', which graph '{}' does not have",
                    graph.name
                )
            })?),
            None => None,
        };
        Ok(Run {
            graph,
            run_id: pos.run_id,
            job_id: pos.job_id,
            state: pos.state,
            next,
            step: pos.step,
            status: pos.status,
            snapshot: None,
        })
    }

    pub fn position(&self) -> RunPosition {
        RunPosition {
            run_id: self.run_id.clone(),
            job_id: self.job_id.clone(),
            next: self.next.map(|i| self.graph.node(i).id.clone()),
            step: self.step,
            state: self.state.clone(),
            status: self.status.clone(),
        }
    }

    pub fn position_ref(&self) -> PositionRef<'_> {
        PositionRef {
            run_id: &self.run_id,
            job_id: &self.job_id,
            next: self.next.map(|i| self.graph.node(i).id.as_str()),
            step: self.step,
            status: &self.status,
        }
    }

    pub fn graph(&self) -> &Arc<Graph> {
        &self.graph
    }
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    pub fn job_id(&self) -> &str {
        &self.job_id
    }
    pub fn status(&self) -> &RunStatus {
        &self.status
    }
    pub fn state(&self) -> &Map<String, Value> {
        &self.state
    }
    pub fn into_state(self) -> Map<String, Value> {
        self.state
    }
    pub fn steps_taken(&self) -> u64 {
        self.step
    }
    pub fn is_running(&self) -> bool {
        self.status == RunStatus::Running
    }

    /// The node the run takes next (or, halted, waits at); `None` once it has ended.
    pub fn next_node(&self) -> Option<&crate::graph::Node> {
        self.next.map(|i| self.graph.node(i))
    }

    /// The jury node a halted run waits at.
    pub fn waiting_node(&self) -> Option<&crate::graph::Node> {
        match self.status {
            RunStatus::Halted => self.next.map(|i| self.graph.node(i)),
            _ => None,
        }
    }

    /// Runs the next node; `None` once the run has ended (completed, failed or halted).
    pub async fn step(&mut self, env: &StepEnv<'_>) -> Option<StepRecord> {
        if self.status != RunStatus::Running {
            return None;
        }
        let Some(idx) = self.next else {
            self.status = self.end_status(None);
            return None;
        };
        let graph = Arc::clone(&self.graph);
        let node = graph.node(idx);
        let started_at = crate::clock::now_utc();
        let clock = Instant::now();
        let known = self.snapshot.take();

        if self.step >= graph.max_steps {
            let msg = format!(
                "max_steps ({}) reached: the run stops before node '{}'",
                graph.max_steps, node.id
            );
            return Some(self.fatal_step(idx, msg, &started_at, clock));
        }
        let visits = self.count_visit(&node.id);
        if visits > graph.max_node_fatigue {
            let msg = format!(
                "max_node_fatigue ({}) exceeded: node '{}' visited {} times",
                graph.max_node_fatigue, node.id, visits
            );
            return Some(self.fatal_step(idx, msg, &started_at, clock));
        }

        // Only `__node_counts` changed since the last step's snapshot.
        let before = match (known, self.state.get(NODE_COUNTS)) {
            (Some(known), Some(counts)) => known.with_entry(NODE_COUNTS, counts),
            _ => Snapshot::of(&self.state),
        };
        let outcome = self.execute(idx, env).await;
        let after = Snapshot::of(&self.state);
        let diff = snapshot::diff(&before, &after);
        let after_bytes = after.as_bytes().to_vec();
        self.snapshot = Some(after);

        let mut error = outcome.fatal.clone();
        if error.is_none() {
            if let Some(e) = self.state.get(LAST_ERROR).filter(|v| truthy(v)) {
                error = Some(match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        let mut rec = self.record(
            idx,
            [before.into_bytes(), diff, after_bytes],
            outcome.metadata,
            error,
            outcome.texts,
            &started_at,
            clock,
        );
        rec.extend(outcome.extra);
        self.step += 1;
        if let Some(halt) = outcome.halt {
            rec.insert("halt".into(), halt);
            self.status = RunStatus::Halted;
            // `next` stays on the jury node: that is where the decision continues.
        } else if let Some(fatal) = outcome.fatal {
            self.next = None;
            self.status = RunStatus::Failed { reason: fatal };
        } else {
            self.next = outcome.next;
            if self.next.is_none() {
                self.status = self.end_status(None);
            }
        }
        Some(rec)
    }

    /// Applies a human decision to a halted run and records it as a step of the same run.
    pub fn decide(&mut self, decision: &Decision) -> Result<StepRecord, DecisionError> {
        if self.status != RunStatus::Halted {
            return Err(DecisionError::NotHalted(self.status.name()));
        }
        let graph = Arc::clone(&self.graph);
        let Some(idx) = self.next else {
            return Err(DecisionError::NotHalted("halted without a jury node"));
        };
        let node = graph.node(idx);
        let NodeKind::HumanJury {
            choices, output, ..
        } = &node.kind
        else {
            return Err(DecisionError::NotHalted(
                "halted on a node that is not a jury",
            ));
        };
        if !choices.iter().any(|c| c == &decision.choice) {
            return Err(DecisionError::InvalidChoice {
                choice: decision.choice.clone(),
                allowed: choices.join(", "),
            });
        }
        let started_at = crate::clock::now_utc();
        let clock = Instant::now();
        let before = match self.snapshot.take() {
            Some(known) => known,
            None => Snapshot::of(&self.state),
        };
        self.state
            .insert(output.clone(), Value::String(decision.choice.clone()));
        self.state.insert(
            format!("{output}_rationale"),
            Value::String(decision.rationale.clone()),
        );
        let after = Snapshot::of(&self.state);
        let diff = snapshot::diff(&before, &after);
        let after_bytes = after.as_bytes().to_vec();
        self.snapshot = Some(after);
        let mut rec = self.record(
            idx,
            [before.into_bytes(), diff, after_bytes],
            Map::new(),
            None,
            PromptTexts::default(),
            &started_at,
            clock,
        );
        let mut marker = Map::new();
        marker.insert("choice".into(), Value::String(decision.choice.clone()));
        marker.insert(
            "rationale".into(),
            Value::String(decision.rationale.clone()),
        );
        marker.insert(
            "decided_by".into(),
            Value::String(decision.decided_by.clone()),
        );
        marker.insert(
            "role".into(),
            decision
                .role
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        rec.insert("decision".into(), Value::Object(marker));
        self.step += 1;
        self.next = node.next;
        self.status = RunStatus::Running;
        if self.next.is_none() {
            self.status = self.end_status(None);
        }
        Ok(rec)
    }

    fn end_status(&self, fatal: Option<String>) -> RunStatus {
        if let Some(reason) = fatal {
            return RunStatus::Failed { reason };
        }
        match self.state.get(LAST_ERROR).filter(|v| truthy(v)) {
            Some(Value::String(s)) => RunStatus::Failed { reason: s.clone() },
            Some(other) => RunStatus::Failed {
                reason: other.to_string(),
            },
            None => RunStatus::Completed,
        }
    }

    fn count_visit(&mut self, node_id: &str) -> u64 {
        bump_visit(&mut self.state, node_id)
    }

    fn fatal_step(
        &mut self,
        idx: usize,
        msg: String,
        started_at: &str,
        clock: Instant,
    ) -> StepRecord {
        // The state is not touched: before and after are the same bytes.
        let state = Snapshot::of(&self.state).into_bytes();
        let rec = self.record(
            idx,
            [state.clone(), snapshot::EMPTY_DIFF.to_vec(), state],
            Map::new(),
            Some(msg.clone()),
            PromptTexts::default(),
            started_at,
            clock,
        );
        self.step += 1;
        self.next = None;
        self.status = RunStatus::Failed { reason: msg };
        rec
    }

    /// `[state_before, state_diff, state_after]`: canonical JSON from [`Snapshot`].
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        idx: usize,
        [before, diff, after]: [Vec<u8>; 3],
        metadata: Map<String, Value>,
        error: Option<String>,
        texts: PromptTexts,
        started_at: &str,
        clock: Instant,
    ) -> StepRecord {
        let node = self.graph.node(idx);
        let mut rec = Map::with_capacity(12);
        rec.insert("step".into(), Value::from(self.step));
        rec.insert("node".into(), Value::String(node.kind.lar_class().into()));
        rec.insert("run_metadata".into(), Value::Object(metadata));
        insert_outcome(&mut rec, error, texts);
        rec.insert("node_id".into(), Value::String(node.id.clone()));
        rec.insert(
            "node_type".into(),
            Value::String(node.kind.type_name().into()),
        );
        rec.insert("started_at".into(), Value::String(started_at.to_string()));
        rec.insert("duration_us".into(), Value::from(elapsed_us(clock)));
        StepRecord::with_serialized(
            rec,
            vec![
                ("state_before", before),
                ("state_diff", diff),
                ("state_after", after),
            ],
        )
    }

    async fn execute(&mut self, idx: usize, env: &StepEnv<'_>) -> NodeOutcome {
        let graph = Arc::clone(&self.graph);
        let ctx = Ctx {
            graph: &graph,
            registry: env.registry,
            job_id: &self.job_id,
            run_id: &self.run_id,
            step: self.step,
            scope: None,
            budget: None,
        };
        exec_node(&ctx, idx, &mut self.state).await
    }
}
