//! Tools: what a `tool` node calls. External programs ([`command`]) and Rust functions
//! registered by the embedding program ([`Registry`]) share one outcome type.

pub mod builtin;
pub mod command;
pub mod registry;

pub use registry::{FnTool, NativeTool, Registry};

/// Identifies the step a tool runs in, so tools can make side effects idempotent.
#[derive(Debug, Clone)]
pub struct ToolContext {
    pub job_id: String,
    pub run_id: String,
    pub step: u64,
}

impl ToolContext {
    /// Stable across a crash and resume of the same step: job id + step index.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.job_id, self.step)
    }
}

/// Why a tool call failed; the text becomes `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolFailure(pub String);
