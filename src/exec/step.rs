//! One step's record, in Lár's key order, plus our own fields (node id and type, UTC times,
//! duration, halt and decision markers). Extra keys do not disturb Lár's verifier.

use serde_json::{Map, Value};
use std::sync::OnceLock;

/// Parts of a record already in canonical JSON, by key.
pub(crate) type SerializedParts = Vec<(&'static str, Vec<u8>)>;

/// A step record: a JSON object whose first keys are Lár's, in Lár's order.
///
/// The two states and their diff arrive already serialized (canonical bytes, see
/// [`super::snapshot`]), which is how the log and the journal store them; the other fields are
/// values. Reading a state back ([`StepRecord::get`], [`StepRecord::state_after`]) parses it once.
#[derive(Debug, Clone, Default)]
pub struct StepRecord {
    fields: Map<String, Value>,
    /// Canonical JSON of `state_before`, `state_diff` and `state_after`, by key.
    serialized: SerializedParts,
    /// The serialized parts as values, parsed on first read.
    parsed: OnceLock<Map<String, Value>>,
}

impl StepRecord {
    /// A record whose every field is a value (a test's, a tool's).
    pub fn new(fields: Map<String, Value>) -> Self {
        StepRecord {
            fields,
            ..StepRecord::default()
        }
    }

    /// A record with parts already in canonical JSON; `serialized` must be valid JSON.
    pub(crate) fn with_serialized(fields: Map<String, Value>, serialized: SerializedParts) -> Self {
        StepRecord {
            fields,
            serialized,
            parsed: OnceLock::new(),
        }
    }

    pub fn step(&self) -> u64 {
        self.fields.get("step").and_then(Value::as_u64).unwrap_or(0)
    }
    pub fn node_id(&self) -> &str {
        self.fields
            .get("node_id")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn outcome(&self) -> &str {
        self.fields
            .get("outcome")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn error(&self) -> Option<&str> {
        self.fields.get("error").and_then(Value::as_str)
    }
    pub fn state_after(&self) -> Option<&Map<String, Value>> {
        self.get("state_after").and_then(Value::as_object)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).or_else(|| self.parsed().get(key))
    }

    /// Adds a field (a marker, our own keys after Lár's).
    pub fn insert(&mut self, key: String, value: Value) {
        self.fields.insert(key, value);
    }

    pub(crate) fn extend(&mut self, more: Map<String, Value>) {
        self.fields.extend(more);
    }

    /// The value fields and the serialized parts, for the log.
    pub(crate) fn into_parts(self) -> (Map<String, Value>, SerializedParts) {
        (self.fields, self.serialized)
    }

    fn parsed(&self) -> &Map<String, Value> {
        self.parsed.get_or_init(|| {
            self.serialized
                .iter()
                .filter_map(|(k, bytes)| {
                    crate::json::parse_written(bytes)
                        .ok()
                        .map(|v| ((*k).to_string(), v))
                })
                .collect()
        })
    }
}
