//! Signed audit evidence: Lár-compatible run logs, the authority ledger, and their verifier.
//!
//! The byte-exact contract is `shared/lar/COMPAT.md`: HMAC-SHA256 (hex) over the canonical
//! serialization of the document without its `signature` key.

pub mod ledger;
pub mod runlog;
/// The HMAC key, kept under its old name: it lives in [`crate::signing`], below every layer that signs.
pub use crate::signing as secret;
pub mod verify;
pub mod write;

pub use runlog::{RunLog, RunOutcome};
pub use secret::{Secret, SecretError};
pub use verify::{verify_file, verify_value, Verdict};
