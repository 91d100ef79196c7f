//! JSON helpers shared by the audit log, checkpoints and payloads.
//!
//! Lár signs `json.dumps(obj, sort_keys=True, separators=(',', ':'))`; [`canonical`] reproduces
//! those bytes exactly, so our signatures verify with Lár's own verifier and theirs with ours.

pub mod canonical;
mod duplicates;

pub use canonical::{to_canonical_vec, to_python_json_vec, write_json};
pub use duplicates::first_duplicate_key;

use serde::Deserialize;
use serde_json::Value;

/// How deep [`parse_deep`] reads: twice serde_json's default, so every log this worker writes
/// (a state nested at most 127 levels, as serde_json reads inputs and tool answers, held a few
/// levels down) verifies, while the recursive parser stays well inside a 2 MiB thread stack.
/// Python's `json` reads to about 1,000 levels: a Lár log nested deeper than this is refused.
pub const MAX_DEPTH: usize = 256;

/// Parses JSON nested up to [`MAX_DEPTH`] levels. serde_json alone stops at 128, but a run's
/// log holds its state a few levels down: a job input or tool answer nested 125 deep (which
/// serde_json reads) makes a log only a deeper reader can check. The depth is measured on the
/// bytes first, so a hostile file never reaches the recursive parser.
pub fn parse_deep(bytes: &[u8]) -> Result<Value, String> {
    let depth = nesting_depth(bytes);
    if depth > MAX_DEPTH {
        return Err(format!("nested {depth} levels deep, more than {MAX_DEPTH}"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

/// Parses JSON that Lár or this worker wrote (a log, a journal record): [`parse_deep`], and
/// where that fails on a bare `Infinity` (how Python, and our canonical writer to match its
/// bytes, print a float that overflowed, such as an input's `1e400`), again with each read as
/// `1e400`: the same float, which canonicalizes back to `Infinity`, so signatures still check.
pub fn parse_written(bytes: &[u8]) -> Result<Value, String> {
    parse_written_keeping(bytes).map(|(v, _)| v)
}

/// [`parse_written`], with the rewritten bytes when `Infinity` was read as `1e400`.
pub fn parse_written_keeping(bytes: &[u8]) -> Result<(Value, Option<Vec<u8>>), String> {
    match parse_deep(bytes) {
        Ok(v) => Ok((v, None)),
        Err(e) => match infinity_as_number(bytes) {
            Some(fixed) => parse_deep(&fixed).map(|v| (v, Some(fixed))).map_err(|_| e),
            None => Err(e),
        },
    }
}

/// `bytes` with every `Infinity` outside a string replaced by `1e400` (`-Infinity` becomes
/// `-1e400`); `None` when there is none.
fn infinity_as_number(bytes: &[u8]) -> Option<Vec<u8>> {
    const INF: &[u8] = b"Infinity";
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let (mut in_string, mut escaped, mut changed) = (false, false, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if bytes[i..].starts_with(INF) {
            out.extend_from_slice(b"1e400");
            i += INF.len();
            changed = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// The deepest nesting of `[` and `{` outside strings (an upper bound for malformed input).
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Python truthiness of a JSON value (`None`, `False`, `0`, `""`, `[]`, `{}` are falsy), as Lár
/// uses it for `last_error`.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_deep, MAX_DEPTH};

    #[test]
    fn reads_past_serde_default_and_stops_at_the_limit() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<serde_json::Value>(&deep(200)).is_err());
        assert!(parse_deep(deep(200).as_bytes()).is_ok());
        assert!(parse_deep(deep(MAX_DEPTH).as_bytes()).is_ok());
        let err = parse_deep(deep(100_000).as_bytes()).unwrap_err();
        assert!(err.contains("more than 256"), "{err}");
        // Brackets inside strings do not count; trailing garbage is refused.
        assert!(parse_deep(br#"{"a":"[[[[[[[[[[\"]]"}"#).is_ok());
        assert!(parse_deep(b"[1] x").is_err());
    }
}
