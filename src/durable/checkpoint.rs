//! The checkpoint: everything needed to continue a run, HMAC-signed so a tampered checkpoint
//! is never resumed.

use crate::audit::runlog::RunLogHeader;
use crate::audit::Secret;
use crate::exec::run::PositionRef;
use crate::exec::RunPosition;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const SIGNED_PREFIX: &[u8] = b"{\"signature\":\"";
const SIGNED_MIDDLE: &[u8] = b"\",\"checkpoint\":";
const UNSIGNED_PREFIX: &[u8] = b"{\"checkpoint\":";

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

/// A checkpoint as written after a step: [`Checkpoint`]'s fields borrowed from the live run, so
/// each step costs one serialization and no copy of the state.
#[derive(Debug, Serialize)]
pub struct CheckpointRef<'a> {
    pub job_id: &'a str,
    pub run_id: &'a str,
    pub graph_name: &'a str,
    pub graph_digest: &'a str,
    pub user_id: Option<&'a str>,
    pub started_at: &'a str,
    pub attempt: u32,
    pub epoch: u64,
    pub chain_head: &'a str,
    pub position: PositionRef<'a>,
}

impl CheckpointRef<'_> {
    /// The stored form, as [`Checkpoint::encode`].
    pub fn encode(&self, secret: Option<&Secret>) -> Vec<u8> {
        seal(serde_json::to_vec(self).unwrap_or_default(), secret)
    }
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

    /// The stored form: `{"signature":"<hex>","checkpoint":<body>}`, the signature an HMAC over
    /// the body's exact bytes. Signing the bytes as stored (instead of a canonical re-encoding)
    /// costs one serialization per step; any changed byte still fails verification.
    pub fn encode(&self, secret: Option<&Secret>) -> Vec<u8> {
        seal(serde_json::to_vec(self).unwrap_or_default(), secret)
    }

    /// Parses and verifies a stored checkpoint.
    pub fn decode(bytes: &[u8], secret: Option<&Secret>) -> Result<Checkpoint, CheckpointError> {
        let unreadable = || CheckpointError::Unreadable("not a stored checkpoint".into());
        let inner = bytes.strip_suffix(b"}").ok_or_else(unreadable)?;
        let (signature, body) = if let Some(rest) = inner.strip_prefix(SIGNED_PREFIX) {
            if rest.len() < 64 {
                return Err(unreadable());
            }
            let (sig, rest) = rest.split_at(64);
            let body = rest.strip_prefix(SIGNED_MIDDLE).ok_or_else(unreadable)?;
            (Some(sig), body)
        } else {
            (
                None,
                inner.strip_prefix(UNSIGNED_PREFIX).ok_or_else(unreadable)?,
            )
        };
        if let Some(secret) = secret {
            let sig = signature.ok_or(CheckpointError::Unsigned)?;
            let sig = std::str::from_utf8(sig).map_err(|_| CheckpointError::BadSignature)?;
            if !secret.verify_hex(body, sig) {
                return Err(CheckpointError::BadSignature);
            }
        }
        serde_json::from_slice(body).map_err(|e| CheckpointError::Unreadable(e.to_string()))
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

/// `{"signature":"<hex>","checkpoint":<body>}`, the signature an HMAC over the body's bytes.
fn seal(body: Vec<u8>, secret: Option<&Secret>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 100);
    match secret {
        Some(secret) => {
            out.extend_from_slice(SIGNED_PREFIX);
            out.extend_from_slice(secret.sign(&body).as_bytes());
            out.extend_from_slice(SIGNED_MIDDLE);
        }
        None => out.extend_from_slice(UNSIGNED_PREFIX),
    }
    out.extend_from_slice(&body);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{RunPosition, RunStatus};

    fn checkpoint() -> Checkpoint {
        let mut state = serde_json::Map::new();
        state.insert("amount".into(), Value::from(5000));
        Checkpoint {
            job_id: "job-1".into(),
            run_id: "run-1".into(),
            graph_name: "g".into(),
            graph_digest: "d".into(),
            user_id: None,
            started_at: "2026-01-01T00:00:00.000000Z".into(),
            attempt: 1,
            epoch: 3,
            chain_head: "c".into(),
            position: RunPosition {
                run_id: "run-1".into(),
                job_id: "job-1".into(),
                next: Some("n".into()),
                step: 2,
                state,
                status: RunStatus::Running,
            },
        }
    }

    #[test]
    fn signed_round_trip_and_tampering() {
        let secret = Secret::new("s").unwrap();
        let stored = checkpoint().encode(Some(&secret));
        assert!(
            serde_json::from_slice::<Value>(&stored).is_ok(),
            "stored form is JSON"
        );
        assert_eq!(Checkpoint::decode(&stored, Some(&secret)), Ok(checkpoint()));
        let text = String::from_utf8(stored.clone()).unwrap();
        let tampered = text.replacen("5000", "9000", 1);
        assert_eq!(
            Checkpoint::decode(tampered.as_bytes(), Some(&secret)),
            Err(CheckpointError::BadSignature)
        );
        let other = Secret::new("other").unwrap();
        assert_eq!(
            Checkpoint::decode(&stored, Some(&other)),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn the_borrowed_form_decodes_to_the_owned_one() {
        let c = checkpoint();
        let p = &c.position;
        let borrowed = CheckpointRef {
            job_id: &c.job_id,
            run_id: &c.run_id,
            graph_name: &c.graph_name,
            graph_digest: &c.graph_digest,
            user_id: c.user_id.as_deref(),
            started_at: &c.started_at,
            attempt: c.attempt,
            epoch: c.epoch,
            chain_head: &c.chain_head,
            position: PositionRef {
                run_id: &p.run_id,
                job_id: &p.job_id,
                next: p.next.as_deref(),
                step: p.step,
                state: &p.state,
                status: &p.status,
            },
        };
        let secret = Secret::new("s").unwrap();
        assert_eq!(borrowed.encode(Some(&secret)), c.encode(Some(&secret)));
        let halted = RunStatus::Failed {
            reason: "boom".into(),
        };
        let failed = CheckpointRef {
            position: PositionRef {
                status: &halted,
                ..borrowed.position
            },
            ..borrowed
        };
        let back = Checkpoint::decode(&failed.encode(Some(&secret)), Some(&secret)).unwrap();
        assert_eq!(back.position.status, halted);
    }

    #[test]
    fn unsigned_is_refused_when_a_secret_is_configured() {
        let stored = checkpoint().encode(None);
        assert_eq!(Checkpoint::decode(&stored, None), Ok(checkpoint()));
        let secret = Secret::new("s").unwrap();
        assert_eq!(
            Checkpoint::decode(&stored, Some(&secret)),
            Err(CheckpointError::Unsigned)
        );
    }

    #[test]
    fn garbage_is_unreadable() {
        for bad in [&b""[..], b"{}", b"{\"signature\":\"ab\"}", b"not json"] {
            assert!(matches!(
                Checkpoint::decode(bad, None),
                Err(CheckpointError::Unreadable(_))
            ));
        }
    }
}
