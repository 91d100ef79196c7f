//! The HMAC key that signs run logs, checkpoints and decisions. A leaf module, so every layer
//! that signs, or must refuse to send the key anywhere, can use it. It never appears in Debug
//! output, logs or errors.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Where a secret could not be had from.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("the secret is empty ({origin})")]
    Empty { origin: String },
    #[error(
        "no HMAC secret: set HMAC_SECRET, pass --secret-file (or a systemd credential), or run with --unsigned"
    )]
    Missing,
}

/// SHA-256 fingerprints of every HMAC key this process loaded: an outbound secret reference
/// (a header or API key named `env:HMAC_SECRET` in a graph) is checked against them and never
/// sent (see [`is_signing_key`]).
static LOADED_KEYS: std::sync::Mutex<Vec<[u8; 32]>> = std::sync::Mutex::new(Vec::new());

/// Whether `value` is an HMAC key this process signs with.
pub fn is_signing_key(value: &[u8]) -> bool {
    loaded_keys().contains(&fingerprint(value))
}

fn remember_key(key: &[u8]) {
    let fp = fingerprint(key);
    let mut keys = loaded_keys();
    if !keys.contains(&fp) {
        keys.push(fp);
    }
}

fn fingerprint(value: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(value).into()
}

fn loaded_keys() -> std::sync::MutexGuard<'static, Vec<[u8; 32]>> {
    LOADED_KEYS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The HMAC-SHA256 key used to sign run logs, checkpoints and ledgers.
#[derive(Clone)]
pub struct Secret {
    /// The MAC with the key schedule done once; cloned per message.
    keyed: HmacSha256,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A secret from its UTF-8 text, as Lár takes `hmac_secret`.
    pub fn new(text: &str) -> Result<Self, SecretError> {
        Self::from_bytes(text.as_bytes(), "given value")
    }

    fn from_bytes(key: &[u8], origin: &str) -> Result<Self, SecretError> {
        if key.is_empty() {
            return Err(SecretError::Empty {
                origin: origin.into(),
            });
        }
        // HMAC takes keys of any length; the error branch only exists in the generic API.
        let keyed = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| SecretError::Empty {
            origin: origin.into(),
        })?;
        remember_key(key);
        Ok(Secret { keyed })
    }

    /// Reads a secret file (a systemd credential, for instance); one trailing newline is dropped.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Unreadable {
            path: path.display().to_string(),
            source,
        })?;
        let mut key = raw;
        if key.last() == Some(&b'\n') {
            key.pop();
            if key.last() == Some(&b'\r') {
                key.pop();
            }
        }
        Self::from_bytes(&key, &path.display().to_string())
    }

    /// Lowercase hex HMAC-SHA256 of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.mac(message))
    }

    /// Raw HMAC-SHA256 of the concatenation of `parts`.
    pub fn mac_parts(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.hmac();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        self.mac_parts(&[message])
    }

    fn hmac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    /// Constant-time comparison of a hex signature against the MAC of `message`.
    pub fn verify_hex(&self, message: &[u8], signature_hex: &str) -> bool {
        // Lár compares `hexdigest()` strings: only lowercase hex is its signature.
        if signature_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return false;
        }
        let Ok(given) = hex::decode(signature_hex) else {
            return false;
        };
        let mut mac = self.hmac();
        mac.update(message);
        mac.verify_slice(&given).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_hex_is_a_signature() {
        let s = Secret::new("k").unwrap();
        let sig = s.sign(b"m");
        assert!(s.verify_hex(b"m", &sig));
        assert!(
            !s.verify_hex(b"m", &sig.to_uppercase()),
            "Python refuses it too"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = Secret::new("super-secret-value").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn compat_test_vector() {
        let canonical = r#"{"run_id":"00000000-0000-4000-8000-000000000000","steps":[{"node":"AddValueNode","outcome":"success","run_metadata":{},"state_after":{"__node_counts":{"AddValueNode":1},"note":"caf\u00e9 \u20ac \ud83d\ude00","x":1.0,"y":1e-05,"z":1e+16},"state_before":{"__node_counts":{"AddValueNode":1},"note":"caf\u00e9 \u20ac \ud83d\ude00","x":1.0,"y":1e-05},"state_diff":{"added":{"z":1e+16},"removed":{},"updated":{}},"step":0}],"summary":{"tokens_by_model":{},"total_completion_tokens":0,"total_prompt_tokens":0,"total_steps":1,"total_tokens":0},"timestamp":"2026-01-01T00:00:00.000001","user_id":null}"#;
        let s = Secret::new("reference-secret").unwrap();
        assert_eq!(
            s.sign(canonical.as_bytes()),
            "43a40f4ad8a3f1721f5297c572f94e2eb78443ad9ff0afd4f503c3c70651f59e"
        );
        let v: serde_json::Value = serde_json::from_str(canonical).unwrap();
        assert_eq!(crate::json::to_canonical_vec(&v), canonical.as_bytes());
    }
}
