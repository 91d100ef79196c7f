//! Verifies run logs and authority ledgers (ours and Lár's): the document signature with Lár's
//! recipe, and, where steps carry a `chain`, the chain, naming the first step that is missing,
//! reordered or altered.

use super::runlog::chain_link;
use super::secret::Secret;
use crate::json::canonical::canonical_without;
use serde_json::{Map, Value};
use std::path::Path;

/// The result of checking one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid { what: String },
    Invalid { reason: String },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid { .. })
    }
    fn invalid(reason: impl Into<String>) -> Verdict {
        Verdict::Invalid {
            reason: reason.into(),
        }
    }
}

pub fn verify_file(path: &Path, secret: &Secret) -> Verdict {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Verdict::invalid(format!("unreadable: {e}")),
    };
    let parsed = crate::json::parse_written_keeping(&bytes);
    match parsed {
        Ok((doc, fixed)) => match crate::json::first_duplicate_key(fixed.as_deref().unwrap_or(&bytes)) {
            // The signature covers the last value of a repeated key (as Python reads it);
            // a reader keeping the first would show something else.
            Some(dup) => Verdict::invalid(format!(
                "ambiguous: the key {dup} appears twice in one object (JSON readers disagree on which value counts)"
            )),
            None => verify_value(&doc, secret),
        },
        Err(e) => Verdict::invalid(format!("unreadable: not JSON ({e})")),
    }
}

pub fn verify_value(doc: &Value, secret: &Secret) -> Verdict {
    let Value::Object(map) = doc else {
        return Verdict::invalid("unreadable: not a JSON object");
    };
    let what = describe(map);
    let Some(sig) = map.get("signature") else {
        return Verdict::invalid("missing signature");
    };
    let Value::String(sig) = sig else {
        return Verdict::invalid("signature is not a string");
    };
    let chain_problem = map
        .get("steps")
        .and_then(Value::as_array)
        .and_then(|steps| {
            let run_id = map.get("run_id").and_then(Value::as_str).unwrap_or("");
            check_chain(steps, run_id, secret).or_else(|| check_count(map, steps.len()))
        });
    let canonical = canonical_without(map, "signature");
    if !secret.verify_hex(&canonical, sig) {
        let mut reason = "signature mismatch: the content was changed after signing, or it was signed with another secret".to_string();
        if let Some(p) = chain_problem {
            reason.push_str("; ");
            reason.push_str(&p);
        }
        return Verdict::invalid(reason);
    }
    if let Some(p) = chain_problem {
        return Verdict::invalid(p);
    }
    if let Some(p) = shape_problem(map) {
        return Verdict::invalid(p);
    }
    Verdict::Valid { what }
}

/// A signature only says who signed: what was signed must also be a run log (`run_id`, a
/// `steps` array) or an authority ledger (a `records` array). A signed decision message or a
/// log whose `steps` is not a list is not evidence of a run.
fn shape_problem(map: &Map<String, Value>) -> Option<String> {
    if map.contains_key("ledger_type") {
        return (!map.get("records").is_some_and(Value::is_array)).then(|| {
            "signed, but not an authority ledger: 'records' is missing or not a list".to_string()
        });
    }
    if !map.get("run_id").is_some_and(Value::is_string) {
        return Some("signed, but not a run log: no 'run_id'".into());
    }
    if !map.get("steps").is_some_and(Value::is_array) {
        return Some("signed, but not a run log: 'steps' is missing or not a list".into());
    }
    None
}

fn describe(map: &Map<String, Value>) -> String {
    if map.get("ledger_type").is_some() {
        let n = map
            .get("records")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        format!("authority ledger, {n} records")
    } else {
        let n = map
            .get("steps")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let chained = map
            .get("steps")
            .and_then(Value::as_array)
            .is_some_and(|s| !s.is_empty() && s.iter().all(|x| x.get("chain").is_some()));
        format!(
            "run log, {n} steps{}",
            if chained { ", chain intact" } else { "" }
        )
    }
}

/// Lár's summary counts the steps it wrote; a log whose count disagrees lost or gained steps
/// after the summary was made (a chain only links backwards, so it cannot see the last steps go).
fn check_count(map: &Map<String, Value>, steps: usize) -> Option<String> {
    let counted = map.get("summary")?.get("total_steps")?.as_u64()?;
    (counted != steps as u64)
        .then(|| format!("the summary counts {counted} steps, the log has {steps}"))
}

/// Checks step numbering and, for chained logs, every link; names the first bad step.
pub(crate) fn check_chain(steps: &[Value], run_id: &str, secret: &Secret) -> Option<String> {
    let chained = steps.iter().any(|s| s.get("chain").is_some());
    let mut prev = run_id.to_string();
    for (pos, s) in steps.iter().enumerate() {
        let idx = s.get("step").and_then(Value::as_u64);
        match idx {
            Some(i) if i == pos as u64 => {}
            Some(i) if i > pos as u64 => {
                // Step `pos` further down means the records were moved, not dropped.
                let later = steps[pos + 1..]
                    .iter()
                    .position(|s| s.get("step").and_then(Value::as_u64) == Some(pos as u64));
                return Some(match later {
                    Some(off) => format!(
                        "steps reordered: position {pos} holds step {i}, step {pos} is at position {}",
                        pos + 1 + off
                    ),
                    None => format!("step {pos} is missing (position {pos} holds step {i})"),
                });
            }
            Some(i) => return Some(format!("steps reordered: position {pos} holds step {i}")),
            None => return Some(format!("the record at position {pos} has no step index")),
        }
        if !chained {
            continue;
        }
        let Value::Object(rec) = s else {
            return Some(format!("step {pos} is not an object"));
        };
        let Some(Value::String(link)) = rec.get("chain") else {
            return Some(format!("step {pos} has no chain link"));
        };
        let expect = chain_link(secret, &prev, &canonical_without(rec, "chain"));
        if &expect != link {
            return Some(format!(
                "chain broken at step {pos}: the record was altered, or the step before it is missing"
            ));
        }
        prev = link.clone();
    }
    None
}
