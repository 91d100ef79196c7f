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
    /// The stored form: `{"signature":"<hex>","checkpoint":<body>}`, the signature an HMAC over
    /// the body's exact bytes. Signing the bytes as stored (instead of a canonical re-encoding)
    /// costs one serialization per step; any changed byte still fails verification.
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
    #[error("the journal's last record has no state_after to resume from")]
    NoState,
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

    /// Checks the journal read back beside the checkpoint and takes the run's state from its
    /// last record (`state_after`). The caller verifies the journal's chain first, so the state
    /// is as authentic as the chain head this signed checkpoint names.
    pub fn restore_from(
        &mut self,
        journal: &[serde_json::Map<String, Value>],
    ) -> Result<(), CheckpointError> {
        self.check_journal(journal)?;
        match journal.last().and_then(|r| r.get("state_after")) {
            Some(Value::Object(state)) => {
                self.position.state = state.clone();
                Ok(())
            }
            _ => Err(CheckpointError::NoState),
        }
    }

    fn check_journal(
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
            // Unsigned runs carry no chain: their head stays the run id.
            None if self.chain_head == self.run_id => Ok(()),
            _ => Err(CheckpointError::ChainMismatch),
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
    use serde_json::{json, Map};

    fn checkpoint() -> Checkpoint {
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
                state: Map::new(),
                status: RunStatus::Running,
            },
        }
    }

    fn encode(c: &Checkpoint, status: &RunStatus, secret: Option<&Secret>) -> Vec<u8> {
        let p = &c.position;
        CheckpointRef {
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
                status,
            },
        }
        .encode(secret)
    }

    fn record(chain: &str, amount: i64) -> Map<String, Value> {
        match json!({"step": 0, "chain": chain, "state_after": {"amount": amount}}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn signed_round_trip_and_tampering() {
        let secret = Secret::new("s").unwrap();
        let stored = encode(&checkpoint(), &RunStatus::Running, Some(&secret));
        assert!(
            serde_json::from_slice::<Value>(&stored).is_ok(),
            "stored form is JSON"
        );
        assert_eq!(Checkpoint::decode(&stored, Some(&secret)), Ok(checkpoint()));
        let text = String::from_utf8(stored.clone()).unwrap();
        let tampered = text.replacen("\"step\":2", "\"step\":1", 1);
        assert_ne!(text, tampered);
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
    fn the_state_is_not_stored_twice_and_comes_back_from_the_journal() {
        let secret = Secret::new("s").unwrap();
        let failed = RunStatus::Failed {
            reason: "boom".into(),
        };
        let stored = encode(&checkpoint(), &failed, Some(&secret));
        assert!(!String::from_utf8_lossy(&stored).contains("state"));
        let mut back = Checkpoint::decode(&stored, Some(&secret)).unwrap();
        assert_eq!(back.position.status, failed);
        let journal = [record("a", 1), record("c", 5000)];
        back.restore_from(&journal).unwrap();
        assert_eq!(back.position.state["amount"], 5000);
    }

    #[test]
    fn a_journal_that_does_not_match_is_refused() {
        let mut c = checkpoint();
        assert_eq!(
            c.restore_from(&[record("a", 1)]),
            Err(CheckpointError::JournalLength {
                journal: 1,
                expected: 2
            })
        );
        assert_eq!(
            c.restore_from(&[record("a", 1), record("x", 1)]),
            Err(CheckpointError::ChainMismatch)
        );
        let mut unchained = record("c", 1);
        unchained.shift_remove("chain");
        assert_eq!(
            c.restore_from(&[record("a", 1), unchained]),
            Err(CheckpointError::ChainMismatch),
            "a signed run's journal must carry its chain"
        );
        let mut stateless = record("c", 1);
        stateless.shift_remove("state_after");
        assert_eq!(
            c.restore_from(&[record("a", 1), stateless]),
            Err(CheckpointError::NoState)
        );
    }

    #[test]
    fn unsigned_is_refused_when_a_secret_is_configured() {
        let stored = encode(&checkpoint(), &RunStatus::Running, None);
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
