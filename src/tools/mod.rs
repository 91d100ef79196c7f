//! Tools: what a `tool` node calls. External programs ([`command`]) and Rust functions
//! registered by the embedding program ([`Registry`]) share one outcome type.

pub mod builtin;
pub mod command;
pub mod http;
pub mod registry;

pub use registry::{FnTool, NativeTool, Registry};

/// Identifies the step a tool runs in, so tools can make side effects idempotent.
#[derive(Debug, Clone)]
pub struct ToolContext {
    pub job_id: String,
    pub run_id: String,
    pub step: u64,
    /// Inside a batch: `b<branch>.<position>` (0-based), so each branch node has its own key.
    pub scope: Option<String>,
}

impl ToolContext {
    /// Stable across a crash and resume of the same step: job id + step index (+ the position
    /// inside a batch).
    pub fn idempotency_key(&self) -> String {
        match &self.scope {
            Some(scope) => format!("{}:{}:{scope}", self.job_id, self.step),
            None => format!("{}:{}", self.job_id, self.step),
        }
    }
}

/// Why a tool call failed; the text becomes `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolFailure(pub String);
