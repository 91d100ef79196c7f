//! The envelope the Redis backend keeps around a producer's message while it is claimed,
//! delayed or recovered: a stable job id, the attempt count and history, and the producer's
//! bytes untouched. Producers never see it; results and dead letters carry the original bytes.

use crate::queue::AttemptRecord;
use serde::{Deserialize, Serialize};

/// Every wrapped message starts with these bytes (the Lua scripts test for them).
pub const PREFIX: &str = "{\"lar_worker\":1,";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wrapped {
    pub lar_worker: u8,
    pub id: String,
    /// Failed attempts so far.
    pub attempt: u32,
    #[serde(default)]
    pub history: Vec<AttemptRecord>,
    /// The producer's message (text; invalid UTF-8 is recovered by [`unwrap_bytes`]).
    pub raw: String,
    /// A human decision for a paused job (set by `lar-worker decide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<crate::exec::Decision>,
}

impl Wrapped {
    pub fn encode(&self) -> Vec<u8> {
        // Field order matters: PREFIX must come first.
        let mut out = Vec::with_capacity(self.raw.len() + 128);
        out.extend_from_slice(PREFIX.as_bytes());
        let mut rest = serde_json::json!({
            "id": self.id, "attempt": self.attempt, "history": self.history, "raw": self.raw,
        });
        if let Some(d) = &self.decision {
            rest["decision"] = serde_json::to_value(d).unwrap_or(serde_json::Value::Null);
        }
        let body = serde_json::to_vec(&rest).unwrap_or_default();
        out.extend_from_slice(body.get(1..).unwrap_or_default());
        out
    }
}

/// Decodes a stored message: the wrapper and the producer's exact bytes. Handles messages
/// whose raw bytes are not UTF-8 (the Lua wrapper copies them verbatim) by unescaping the
/// `raw` string byte-wise.
pub fn unwrap_bytes(stored: &[u8]) -> Option<(Wrapped, Vec<u8>)> {
    if let Ok(w) = serde_json::from_slice::<Wrapped>(stored) {
        let raw = w.raw.as_bytes().to_vec();
        return Some((w, raw));
    }
    // Invalid UTF-8 inside raw: parse the metadata from a lossy copy, the bytes from the source.
    let lossy = String::from_utf8_lossy(stored);
    let meta: Wrapped = serde_json::from_str(&lossy).ok()?;
    let key = b"\"raw\":\"";
    let start = find(stored, key)? + key.len();
    let raw = unescape_json_string(stored.get(start..)?)?;
    Some((meta, raw))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Unescapes a JSON string body up to its closing quote, keeping non-ASCII bytes as they are.
fn unescape_json_string(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(out),
            b'\\' => {
                let c = *s.get(i + 1)?;
                i += 2;
                match c {
                    b'"' => out.push(b'"'),
                    b'\\' => out.push(b'\\'),
                    b'/' => out.push(b'/'),
                    b'b' => out.push(0x08),
                    b'f' => out.push(0x0c),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'u' => {
                        let hex = std::str::from_utf8(s.get(i..i + 4)?).ok()?;
                        let code = u32::from_str_radix(hex, 16).ok()?;
                        i += 4;
                        let ch = char::from_u32(code).unwrap_or('\u{fffd}');
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => return None,
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_the_bytes() {
        let w = Wrapped {
            lar_worker: 1,
            id: "j1".into(),
            attempt: 2,
            history: vec![],
            raw: "{\"a\":\"\\u00e9\\n\"}".into(),
            decision: None,
        };
        let enc = w.encode();
        assert!(enc.starts_with(PREFIX.as_bytes()));
        let (back, raw) = unwrap_bytes(&enc).unwrap();
        assert_eq!(back.id, "j1");
        assert_eq!(raw, w.raw.as_bytes());
    }

    #[test]
    fn invalid_utf8_raw_is_recovered_exactly() {
        let mut stored =
            br#"{"lar_worker":1,"id":"x","attempt":0,"history":[],"raw":"ab\"c"#.to_vec();
        stored.extend_from_slice(&[0xff, 0xfe]);
        stored.extend_from_slice(b"\\n\"}");
        let (w, raw) = unwrap_bytes(&stored).unwrap();
        assert_eq!(w.id, "x");
        assert_eq!(raw, [b'a', b'b', b'"', b'c', 0xff, 0xfe, b'\n']);
    }
}
