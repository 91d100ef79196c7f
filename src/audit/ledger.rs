//! The authority ledger: every human decision, in Lár's record shape plus the job, run and step
//! it belongs to (Lár's ledger cannot tie a decision to a run), signed with the same recipe.

use super::secret::Secret;
use super::write::write_atomic;
use crate::json::{to_canonical_vec, to_python_json_vec};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub const LEDGER_TYPE: &str = "AUTHORITY_EXERCISE_LEDGER";

/// One decision, as recorded.
#[derive(Debug, Clone)]
pub struct AuthorityRecord {
    pub timestamp: String,
    pub action_description: String,
    pub stakeholder_id: String,
    pub stakeholder_role: Option<String>,
    pub decision: String,
    pub rationale: String,
    pub risk_score_at_decision: Value,
    pub context_snapshot_keys: Vec<String>,
    pub job_id: String,
    pub run_id: String,
    pub step: u64,
}

impl AuthorityRecord {
    pub fn to_value(&self) -> Value {
        json!({
            "record_type": "AUTHORITY_EXERCISE",
            "eu_ai_act_article": "Art. 12, 14",
            "timestamp": self.timestamp,
            "action_description": self.action_description,
            "stakeholder_id": self.stakeholder_id,
            "stakeholder_role": self.stakeholder_role,
            "decision": self.decision,
            "rationale": self.rationale,
            "risk_score_at_decision": self.risk_score_at_decision,
            "context_snapshot_keys": self.context_snapshot_keys,
            "job_id": self.job_id,
            "run_id": self.run_id,
            "step": self.step,
        })
    }
}

/// A signed ledger document holding `records`.
pub fn ledger_document(records: &[Value], secret: Option<&Secret>) -> Value {
    let mut doc = Map::new();
    doc.insert("ledger_type".into(), Value::String(LEDGER_TYPE.into()));
    doc.insert(
        "eu_ai_act_reference".into(),
        Value::String("Articles 12\u{2013}14: Human Oversight Evidence Chain".into()),
    );
    doc.insert("total_records".into(), Value::from(records.len() as u64));
    doc.insert("records".into(), Value::Array(records.to_vec()));
    if let Some(secret) = secret {
        let sig = secret.sign(&to_canonical_vec(&Value::Object(doc.clone())));
        doc.insert("signature".into(), Value::String(sig));
    }
    Value::Object(doc)
}

/// Writes one decision's ledger file, `authority_<run_id>_<step>.json`, atomically. The same
/// decision written again (a retry after a crash) rewrites its file. A different decision for
/// the same step (the first was never applied: its step could not be saved, and a human
/// decided again after a redrive) goes to `authority_<run_id>_<step>_<n>.json`, so no
/// recorded decision is ever overwritten; the run log shows which one was applied.
pub fn write_ledger_record(
    dir: &Path,
    record: &AuthorityRecord,
    secret: Option<&Secret>,
    durable: bool,
) -> std::io::Result<PathBuf> {
    let doc = ledger_document(&[record.to_value()], secret);
    let mut bytes = to_python_json_vec(&doc);
    bytes.push(b'\n');
    let base = format!("authority_{}_{}", record.run_id, record.step);
    let mut name = format!("{base}.json");
    let mut n = 1;
    while let Ok(existing) = std::fs::read(dir.join(&name)) {
        if records_same_decision(&existing, record) {
            break;
        }
        n += 1;
        name = format!("{base}_{n}.json");
    }
    write_atomic(dir, &name, &bytes, durable)
}

/// Whether a ledger file holds this very decision (who, what, why); an unreadable one does
/// not, so it is never overwritten.
fn records_same_decision(file: &[u8], record: &AuthorityRecord) -> bool {
    let Ok(doc) = serde_json::from_slice::<Value>(file) else {
        return false;
    };
    let Some(first) = doc.get("records").and_then(|r| r.get(0)) else {
        return false;
    };
    let text = |k: &str| first.get(k).and_then(Value::as_str);
    text("decision") == Some(record.decision.as_str())
        && text("stakeholder_id") == Some(record.stakeholder_id.as_str())
        && text("rationale") == Some(record.rationale.as_str())
        && text("stakeholder_role") == record.stakeholder_role.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(decision: &str) -> AuthorityRecord {
        AuthorityRecord {
            timestamp: "2026-01-01T00:00:00Z".into(),
            action_description: "Approve payout?".into(),
            stakeholder_id: "cfo@example.com".into(),
            stakeholder_role: Some("CFO".into()),
            decision: decision.into(),
            rationale: "ok".into(),
            risk_score_at_decision: Value::Null,
            context_snapshot_keys: vec![],
            job_id: "j".into(),
            run_id: "r".into(),
            step: 2,
        }
    }

    #[test]
    fn a_different_decision_for_the_same_step_never_overwrites_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_ledger_record(dir.path(), &record("approve"), None, false).unwrap();
        let again = write_ledger_record(dir.path(), &record("approve"), None, false).unwrap();
        assert_eq!(first, again, "the same decision rewrites its file");
        let other = write_ledger_record(dir.path(), &record("reject"), None, false).unwrap();
        assert_ne!(first, other);
        assert!(
            other.ends_with("authority_r_2_2.json"),
            "{}",
            other.display()
        );
        let kept = std::fs::read_to_string(&first).unwrap();
        assert!(kept.contains("\"decision\":\"approve\""), "{kept}");
        let third = write_ledger_record(dir.path(), &record("reject"), None, false).unwrap();
        assert_eq!(third, other);
    }
}
