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

/// Writes one decision's ledger file, `authority_<run_id>_<step>.json`, atomically.
pub fn write_ledger_record(
    dir: &Path,
    record: &AuthorityRecord,
    secret: Option<&Secret>,
    durable: bool,
) -> std::io::Result<PathBuf> {
    let doc = ledger_document(&[record.to_value()], secret);
    let mut bytes = to_python_json_vec(&doc);
    bytes.push(b'\n');
    let name = format!("authority_{}_{}.json", record.run_id, record.step);
    write_atomic(dir, &name, &bytes, durable)
}
