//! A job waiting for a human: what is asked, of whom, and how to answer.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The pending record kept while a job waits (one per job).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub job_id: String,
    pub run_id: String,
    pub queue: String,
    pub node: String,
    pub step: u64,
    pub request: DecisionRequest,
    pub awaiting_since: String,
    /// The producer's message, kept so the resumed job parses exactly as the original.
    pub payload: String,
}

/// What the human sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionRequest {
    pub prompt: String,
    pub choices: Vec<String>,
    pub context: Map<String, Value>,
    pub output: String,
}

impl DecisionRequest {
    /// From a halt step's `halt` marker.
    pub fn from_halt(halt: &Value) -> Option<DecisionRequest> {
        serde_json::from_value(halt.clone()).ok()
    }
}

/// How to answer, for the awaiting_decision result and `pending`.
pub fn how_to_answer(job_id: &str, choices: &[String]) -> String {
    format!(
        "lar-worker decide {job_id} --choice <{}> --rationale \"...\" --by <you@example.com>",
        choices.join("|")
    )
}
