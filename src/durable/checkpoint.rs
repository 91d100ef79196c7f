//! The checkpoint: everything needed to continue a run, HMAC-signed so a tampered checkpoint
//! is never resumed.

use crate::audit::runlog::RunLogHeader;
use crate::audit::Secret;
use crate::exec::RunPosition;
use crate::json::to_canonical_vec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub job_id: String,
    pub run_id: String,
    pub graph_name: String,
    pub graph_digest: String,
    pub user_id: Option<String>,
    /// When the run started (the log header's timestamp).
    pub started_at: String,
    pub attempt: u32,
    pub epoch: u64,
    /// The chain value of the last journaled record (the run id before the first).
    pub chain_head: String,
    pub position: RunPosition,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint is not valid JSON: {0}")]
    Unreadable(String),
    #[error("checkpoint has no signature but a secret is configured")]
    Unsigned,
    #[error("checkpoint signature mismatch: it was altered or signed with another secret")]
    BadSignature,
    #[error("checkpoint is for graph '{found}' ({found_digest}), the job runs '{expected}' ({expected_digest}): the graph changed since the run started")]
    GraphChanged {
        found: String,
        found_digest: String,
        expected: String,
        expected_digest: String,
    },
    #[error("journal has {journal} step records, the checkpoint expects {expected}")]
    JournalLength { journal: usize, expected: u64 },
    #[error("journal's last chain link does not match the checkpoint's chain head")]
    ChainMismatch,
}

impl Checkpoint {
    pub fn header(&self) -> RunLogHeader {
        RunLogHeader {
            run_id: self.run_id.clone(),
            user_id: self.user_id.clone(),
            timestamp: self.started_at.clone(),
            job_id: self.job_id.clone(),
            graph_name: self.graph_name.clone(),
            graph_digest: self.graph_digest.clone(),
        }
    }

    /// The stored form: the checkpoint's JSON with a `signature` over its canonical bytes.
    pub fn encode(&self, secret: Option<&Secret>) -> Vec<u8> {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let (Some(secret), Value::Object(m)) = (secret, &mut v) {
            let sig = secret.sign(&to_canonical_vec(&Value::Object(m.clone())));
            m.insert("signature".into(), Value::String(sig));
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Parses and verifies a stored checkpoint.
    pub fn decode(bytes: &[u8], secret: Option<&Secret>) -> Result<Checkpoint, CheckpointError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CheckpointError::Unreadable(e.to_string()))?;
        let Value::Object(mut m) = v else {
            return Err(CheckpointError::Unreadable("not an object".into()));
        };
        let sig = m.shift_remove("signature");
        if let Some(secret) = secret {
            let Some(Value::String(sig)) = sig else {
                return Err(CheckpointError::Unsigned);
            };
            if !secret.verify_hex(&to_canonical_vec(&Value::Object(m.clone())), &sig) {
                return Err(CheckpointError::BadSignature);
            }
        }
        serde_json::from_value(Value::Object(m))
            .map_err(|e| CheckpointError::Unreadable(e.to_string()))
    }

    /// Checks the journal read back beside the checkpoint.
    pub fn check_journal(
        &self,
        journal: &[serde_json::Map<String, Value>],
    ) -> Result<(), CheckpointError> {
        if journal.len() as u64 != self.position.step {
            return Err(CheckpointError::JournalLength {
                journal: journal.len(),
                expected: self.position.step,
            });
        }
        let last = journal
            .last()
            .and_then(|r| r.get("chain"))
            .and_then(Value::as_str);
        match last {
            Some(link) if link == self.chain_head => Ok(()),
            None if journal.is_empty() || self.chain_head == self.run_id => Ok(()),
            // Unsigned runs carry no chain: nothing to compare.
            None => Ok(()),
            Some(_) => Err(CheckpointError::ChainMismatch),
        }
    }
}
