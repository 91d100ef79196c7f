//! The typed, validated graph. Node targets are indices, so a run can never reach an unknown
//! node: everything that could be wrong was rejected at load time.

use super::expr::Expr;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// Lár's defaults.
pub const DEFAULT_MAX_STEPS: u64 = 100;
pub const DEFAULT_MAX_NODE_FATIGUE: u64 = 20;
/// A tool without `timeout_ms` still gets one (and the manifest flags it).
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

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
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// A Rust function registered by the program that embeds the crate.
    Registered { name: String },
}

/// A node's tool, resolved at load time.
#[derive(Debug, Clone)]
pub struct ToolBinding {
    pub name: String,
    pub spec: ToolSpec,
}
