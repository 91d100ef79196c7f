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
    /// When the default path runs (ms since the epoch), if the node has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// Failed attempts before the pause, and their history: the resumed job carries them on,
    /// so `worker.retry.attempts` bounds a job's whole life (a decision does not reset it).
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<crate::attempt::AttemptRecord>,
}

impl Pending {
    /// The system's decision once the pending job expired, if it has a default path.
    pub fn expiry_decision(&self, now_ms: i64) -> Option<crate::exec::Decision> {
        let at = self.expires_at_ms?;
        let choice = self.request.on_expiry.clone()?;
        (now_ms >= at).then(|| crate::exec::Decision {
            choice,
            rationale: format!(
                "no decision within {} ms: the configured default path runs",
                self.request.expires_after_ms.unwrap_or(0)
            ),
            decided_by: "system:expiry".to_string(),
            role: Some("system".to_string()),
            step: None,
            signature: None,
        })
    }
}

/// Whether a stored pending record (JSON) waits at the halt `step` (a decision's `step`; `None`
/// answers any). A decision is validated against the record read first; the backend then
/// takes it only if the record is still that one, so a decision read for one halt never
/// consumes the pause of a later halt of the same job.
pub fn waits_at(record: &[u8], step: Option<u64>) -> bool {
    match step {
        None => true,
        Some(s) => step_of(record) == Some(s),
    }
}

/// The halt step a stored pending record (JSON) waits at.
pub fn step_of(record: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Step {
        step: u64,
    }
    serde_json::from_slice::<Step>(record).ok().map(|r| r.step)
}

/// What the human sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionRequest {
    pub prompt: String,
    pub choices: Vec<String>,
    pub context: Map<String, Value>,
    pub output: String,
    /// The node's default path when nobody decides in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_expiry: Option<String>,
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
