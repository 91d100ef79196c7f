//! The typed, validated graph. Node targets are indices, so a run can never reach an unknown
//! node: everything that could be wrong was rejected at load time.

use super::expr::Expr;
use super::template::Template;
use crate::net::{HeaderSpec, RetrySpec, SecretRef};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// Lár's defaults.
pub const DEFAULT_MAX_STEPS: u64 = 100;
pub const DEFAULT_MAX_NODE_FATIGUE: u64 = 20;
/// The most `max_steps` (and `max_node_fatigue`) a graph may ask for: a run keeps every step
/// record in memory and in its log, so an unbounded limit is unbounded memory.
pub const MAX_STEPS_LIMIT: u64 = 100_000;
/// A tool without `timeout_ms` still gets one (and the manifest flags it).
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// An LLM call without `timeout_ms` (per attempt).
pub const DEFAULT_LLM_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts of an LLM call (and of an idempotent HTTP tool) without `max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The first retry waits this long, doubling up to the max (both overridable per provider/tool).
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 500;
pub const DEFAULT_RETRY_BACKOFF_MAX_MS: u64 = 20_000;

#[derive(Debug)]
pub struct Graph {
    pub name: String,
    /// SHA-256 (hex) of the graph file's bytes: `sha256sum graph.toml` gives the same value.
    pub digest: String,
    pub source: PathBuf,
    pub entry: usize,
    pub nodes: Vec<Node>,
    pub index: HashMap<String, usize>,
    pub tools: BTreeMap<String, ToolSpec>,
    /// LLM endpoints, `[providers.NAME]`.
    pub providers: BTreeMap<String, ProviderSpec>,
    /// Nodes that run inside a batch branch (and only there), by node index.
    pub branch_of: HashMap<usize, BranchPos>,
    pub max_steps: u64,
    pub max_node_fatigue: u64,
}

impl Graph {
    pub fn node(&self, idx: usize) -> &Node {
        &self.nodes[idx]
    }

    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    /// Where the run goes after this node; `None` ends the run. Routers use their routes.
    pub next: Option<usize>,
}

#[derive(Debug)]
pub enum NodeKind {
    /// Lár's AddValueNode: `state[key] = value`; a value `"{other}"` copies `state[other]`.
    Set { key: String, value: Value },
    /// Lár's RouterNode: picks the next node from a route key; stores it in `_router_decision`.
    Router {
        selector: RouteSelector,
        routes: Vec<(String, usize)>,
        default: Option<usize>,
    },
    /// Lár's ToolNode.
    Tool {
        tool: String,
        inputs: Vec<String>,
        output: Option<String>,
        error: Option<usize>,
    },
    /// Lár's ClearErrorNode: `last_error = null`.
    ClearError,
    /// A human decision; the run halts here until a decision arrives.
    HumanJury {
        prompt: String,
        choices: Vec<String>,
        output: String,
        context: Vec<String>,
        /// After this long without a decision, `on_expiry` is decided by the system.
        expiry: Option<JuryExpiry>,
    },
    /// Lár's LLMNode: renders the prompt, calls the model, stores the answer in `output`.
    Llm {
        llm: LlmSpec,
        output: String,
        error: Option<usize>,
    },
    /// Lár's BatchNode: runs each branch (a chain of nodes) on its own copy of the state, all
    /// branches at once, then merges (first writer wins, conflicts in `_batch_conflicts`).
    Batch {
        branches: Vec<Vec<usize>>,
        error: Option<usize>,
    },
    /// Lár's ReduceNode: an LLM summary of `keys` into `output`, then the keys are removed.
    Reduce {
        llm: LlmSpec,
        keys: Vec<String>,
        output: String,
        error: Option<usize>,
    },
}

/// A jury's default path when nobody decides in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JuryExpiry {
    pub after_ms: u64,
    pub choice: String,
}

impl NodeKind {
    /// The type name users write in graph files.
    pub fn type_name(&self) -> &'static str {
        match self {
            NodeKind::Set { .. } => "set",
            NodeKind::Router { .. } => "router",
            NodeKind::Tool { .. } => "tool",
            NodeKind::ClearError => "clear_error",
            NodeKind::HumanJury { .. } => "human_jury",
            NodeKind::Llm { .. } => "llm",
            NodeKind::Batch { .. } => "batch",
            NodeKind::Reduce { .. } => "reduce",
        }
    }

    /// The Lár class name, which Lár logs put in each step's `node` field.
    pub fn lar_class(&self) -> &'static str {
        match self {
            NodeKind::Set { .. } => "AddValueNode",
            NodeKind::Router { .. } => "RouterNode",
            NodeKind::Tool { .. } => "ToolNode",
            NodeKind::ClearError => "ClearErrorNode",
            NodeKind::HumanJury { .. } => "HumanJuryNode",
            NodeKind::Llm { .. } => "LLMNode",
            NodeKind::Batch { .. } => "BatchNode",
            NodeKind::Reduce { .. } => "ReduceNode",
        }
    }

    /// Where a failure of this node goes (tools, LLM calls, batches, reductions).
    pub fn error_target(&self) -> Option<usize> {
        match self {
            NodeKind::Tool { error, .. }
            | NodeKind::Llm { error, .. }
            | NodeKind::Batch { error, .. }
            | NodeKind::Reduce { error, .. } => *error,
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum RouteSelector {
    /// Route on the value of a state key (strings as they are, other scalars as JSON text).
    Key(String),
    /// Route on a CEL expression over the state.
    Expr(Expr),
}

/// How a tool is reached.
#[derive(Debug, Clone)]
pub enum ToolSpec {
    /// An external program: argv (never a shell), JSON object on stdin, a JSON value on stdout.
    Command {
        argv: Vec<String>,
        timeout: Duration,
        timeout_explicit: bool,
        /// Set for the program on top of the worker's environment (minus the variables the
        /// graphs read secrets from); `env:`/`file:` values are read at each call.
        env: BTreeMap<String, crate::net::secret::ValueSpec>,
        cwd: Option<PathBuf>,
    },
    /// A Rust function registered by the program that embeds the crate.
    Registered { name: String },
    /// An HTTP endpoint: the inputs as a JSON body, the JSON answer as the result.
    Http(HttpToolSpec),
}

/// `[tools.NAME] http = { url, method, headers }`.
#[derive(Debug, Clone)]
pub struct HttpToolSpec {
    pub url: String,
    /// Upper-case method name (GET sends the inputs as query parameters, others as JSON).
    pub method: String,
    pub headers: Vec<HeaderSpec>,
    pub timeout: Duration,
    pub timeout_explicit: bool,
    /// Whether repeating the call is harmless; only idempotent calls are retried.
    pub idempotent: bool,
    pub retry: RetrySpec,
}

/// `[providers.NAME]`: an OpenAI-compatible endpoint (`{base_url}/chat/completions`).
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub base_url: String,
    /// An environment variable that, when set, replaces `base_url` at call time.
    pub base_url_env: Option<String>,
    /// An environment variable that, when set, replaces the primary model of this provider's
    /// nodes at call time (fallbacks stay as written).
    pub model_env: Option<String>,
    /// Sent as `Authorization: Bearer <key>`; absent = no Authorization header (local servers).
    pub api_key: Option<SecretRef>,
    pub headers: Vec<HeaderSpec>,
    pub timeout: Duration,
    pub timeout_explicit: bool,
    pub retry: RetrySpec,
}

/// One model call, shared by `llm` and `reduce` nodes.
#[derive(Debug, Clone)]
pub struct LlmSpec {
    pub provider: String,
    pub model: String,
    /// Tried in order, each with the provider's attempts, after the primary model fails.
    pub fallbacks: Vec<String>,
    pub prompt: Template,
    pub system: Option<Template>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
    /// `response_format = "json"`: the answer is parsed as JSON into the state.
    pub json: bool,
}

/// Where a node runs inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchPos {
    pub batch: usize,
    pub branch: usize,
    pub position: usize,
}

/// A node's tool, resolved at load time.
#[derive(Debug, Clone)]
pub struct ToolBinding {
    pub name: String,
    pub spec: ToolSpec,
}
