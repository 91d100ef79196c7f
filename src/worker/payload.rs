//! Message formats. `state`: the message is the initial state and the result is the final state
//! with job metadata in one reserved key (the seed's Python producer works unchanged).
//! `envelope`: `{"id", "graph", "input", "user_id"}` in, `{"job_id", "run_id", "status",
//! "state", "audit_log", "signature", "error"}` out.

use crate::config::{LoadedQueue, PayloadFormat};
use crate::graph::Graph;
use crate::job::JobReport;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The reserved key of a state-format result that carries the job's metadata.
pub const META_KEY: &str = crate::queue::RESULT_META_KEY;

/// A message that passed every check and can run.
#[derive(Debug)]
pub struct ParsedJob {
    pub graph: Arc<Graph>,
    pub input: Map<String, Value>,
    pub user_id: Option<String>,
    /// The producer's own id (envelopes), echoed in the result.
    pub producer_id: Option<Value>,
}

/// A message over `max_message_bytes`, refused unread: the dead-letter reason.
pub fn within_size(payload: &[u8], max_bytes: usize) -> Result<(), String> {
    if payload.len() > max_bytes {
        return Err(format!(
            "message too large: {} bytes (max_message_bytes = {max_bytes})",
            payload.len()
        ));
    }
    Ok(())
}

/// Checks a message; the error is the dead-letter reason.
pub fn parse(queue: &LoadedQueue, payload: &[u8], max_bytes: usize) -> Result<ParsedJob, String> {
    within_size(payload, max_bytes)?;
    let text = std::str::from_utf8(payload)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err(format!(
            "the message must be a JSON object, found {}",
            kind(&value)
        ));
    };
    match queue.payload {
        PayloadFormat::State => {
            let graph = queue
                .default_graph
                .clone()
                .ok_or_else(|| "this queue has no graph configured".to_string())?;
            obj.shift_remove(META_KEY);
            Ok(ParsedJob {
                graph,
                input: obj,
                user_id: None,
                producer_id: None,
            })
        }
        PayloadFormat::Envelope => {
            let graph = match obj.get("graph") {
                Some(Value::String(name)) => queue.graph_named(name).cloned().ok_or_else(|| {
                    let mut known: Vec<&str> = queue.graphs.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    format!(
                        "unknown graph '{name}' (this queue runs: {})",
                        known.join(", ")
                    )
                })?,
                Some(other) => {
                    return Err(format!("'graph' must be a string, found {}", kind(other)))
                }
                None => queue.default_graph.clone().ok_or_else(|| {
                    "the envelope names no 'graph' and the queue has no default".to_string()
                })?,
            };
            let input = match obj.shift_remove("input") {
                Some(Value::Object(m)) => m,
                None => Map::new(),
                Some(other) => {
                    return Err(format!(
                        "'input' must be a JSON object, found {}",
                        kind(&other)
                    ))
                }
            };
            let user_id = match obj.get("user_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            Ok(ParsedJob {
                graph,
                input,
                user_id,
                producer_id: obj.get("id").cloned(),
            })
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The result message for a finished (or halted) run.
pub fn result_message(
    format: PayloadFormat,
    job: &ParsedJob,
    report: &JobReport,
    attempt: u32,
) -> Vec<u8> {
    let error = match &report.status {
        crate::exec::RunStatus::Failed { reason } => Value::String(reason.clone()),
        _ => Value::Null,
    };
    let job_id = job
        .producer_id
        .clone()
        .unwrap_or_else(|| Value::String(report.job_id.clone()));
    let audit_log = Value::String(report.log_path.display().to_string());
    let signature = report
        .signature
        .clone()
        .map(Value::String)
        .unwrap_or(Value::Null);
    let v = match format {
        PayloadFormat::State => {
            let mut state = report.state.clone();
            state.insert(
                META_KEY.into(),
                json!({
                    "job_id": job_id, "run_id": report.run_id, "status": report.status_name(),
                    "audit_log": audit_log, "signature": signature, "error": error, "attempt": attempt,
                }),
            );
            Value::Object(state)
        }
        PayloadFormat::Envelope => json!({
            "job_id": job_id, "run_id": report.run_id, "status": report.status_name(),
            "state": report.state, "audit_log": audit_log, "signature": signature, "error": error,
            "attempt": attempt,
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The `awaiting_decision` result: what is asked, the context, and how to answer.
pub fn awaiting_message(
    format: PayloadFormat,
    job: &ParsedJob,
    report: &JobReport,
    pending: &crate::durable::Pending,
) -> Vec<u8> {
    let job_id_shown = job
        .producer_id
        .clone()
        .unwrap_or_else(|| Value::String(report.job_id.clone()));
    let request = json!({
        "job_id": report.job_id,
        "node": pending.node,
        "prompt": pending.request.prompt,
        "choices": pending.request.choices,
        "context": pending.request.context,
        "how_to_answer": crate::durable::pending::how_to_answer(&report.job_id, &pending.request.choices),
    });
    let audit_log = Value::String(report.log_path.display().to_string());
    let v = match format {
        PayloadFormat::State => {
            let mut state = report.state.clone();
            state.insert(
                META_KEY.into(),
                json!({
                    "job_id": job_id_shown, "run_id": report.run_id, "status": "awaiting_decision",
                    "audit_log": audit_log, "signature": report.signature, "error": null,
                    "decision_request": request,
                }),
            );
            Value::Object(state)
        }
        PayloadFormat::Envelope => json!({
            "job_id": job_id_shown, "run_id": report.run_id, "status": "awaiting_decision",
            "state": report.state, "audit_log": audit_log, "signature": report.signature,
            "error": null, "decision_request": request,
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// A result (final or `awaiting_decision`) cut down to fit `max` bytes: the state goes (the
/// signed audit log keeps it), then the decision request's context; `reason` becomes its
/// `error`, and `status` replaces its status when given. `None` when even that does not fit.
pub fn without_state(
    format: PayloadFormat,
    result: &[u8],
    status: Option<&str>,
    reason: &str,
    max: usize,
) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(result) else {
        return None;
    };
    match format {
        PayloadFormat::State => v.retain(|k, _| k == META_KEY),
        PayloadFormat::Envelope => {
            v.insert("state".into(), Value::Null);
        }
    }
    let meta = metadata(format, &mut v)?;
    meta.insert("error".into(), Value::String(reason.to_string()));
    meta.insert("state_omitted".into(), Value::Bool(true));
    if let Some(s) = status {
        meta.insert("status".into(), Value::String(s.to_string()));
    }
    let fits =
        |v: &serde_json::Map<String, Value>| serde_json::to_vec(v).ok().filter(|b| b.len() <= max);
    if let Some(b) = fits(&v) {
        return Some(b);
    }
    if let Some(Value::Object(request)) = metadata(format, &mut v)?.get_mut("decision_request") {
        request.insert("context".into(), Value::Null);
    }
    fits(&v)
}

/// Where a result keeps its status, error and decision request: under `__lar_worker` in a
/// state result, at the top of an envelope one.
fn metadata(format: PayloadFormat, v: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    match format {
        PayloadFormat::State => v.get_mut(META_KEY)?.as_object_mut(),
        PayloadFormat::Envelope => Some(v),
    }
}

#[cfg(test)]
mod tests {
    use super::{without_state, PayloadFormat, META_KEY};
    use serde_json::{json, Value};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("JSON")
    }

    #[test]
    fn a_state_result_keeps_only_its_metadata() {
        let r = json!({"text": "x".repeat(9000), META_KEY: {"status": "completed", "error": null}});
        let out = without_state(
            PayloadFormat::State,
            r.to_string().as_bytes(),
            Some("failed"),
            "too big",
            4096,
        )
        .expect("fits");
        assert_eq!(
            parse(&out),
            json!({META_KEY: {"status": "failed", "error": "too big", "state_omitted": true}})
        );
    }

    #[test]
    fn an_envelope_pause_drops_the_state_then_the_context() {
        let r = json!({"status": "awaiting_decision", "state": {"a": "x".repeat(3000)},
                       "decision_request": {"prompt": "ok?", "context": {"b": "y".repeat(5000)}}});
        let out = without_state(
            PayloadFormat::Envelope,
            r.to_string().as_bytes(),
            None,
            "too big",
            4096,
        )
        .expect("fits");
        let v = parse(&out);
        assert_eq!(v["status"], "awaiting_decision");
        assert_eq!(v["state"], Value::Null);
        assert_eq!(v["decision_request"]["context"], Value::Null);
        assert_eq!(v["decision_request"]["prompt"], "ok?");
        assert_eq!(v["state_omitted"], true);
    }

    #[test]
    fn what_cannot_fit_says_so() {
        let r = json!({"status": "awaiting_decision", "state": {},
                       "decision_request": {"prompt": "p".repeat(9000)}});
        let out = without_state(
            PayloadFormat::Envelope,
            r.to_string().as_bytes(),
            None,
            "too big",
            4096,
        );
        assert_eq!(out, None);
    }
}
