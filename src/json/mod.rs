//! JSON helpers shared by the audit log, checkpoints and payloads.
//!
//! Lár signs `json.dumps(obj, sort_keys=True, separators=(',', ':'))`; [`canonical`] reproduces
//! those bytes exactly, so our signatures verify with Lár's own verifier and theirs with ours.

pub mod canonical;

pub use canonical::{to_canonical_vec, to_python_json_vec, write_json};

use serde_json::Value;

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
