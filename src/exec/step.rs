//! One step's record, in Lár's key order, plus our own fields (node id and type, UTC times,
//! duration, halt and decision markers). Extra keys do not disturb Lár's verifier.

use serde_json::{Map, Value};

/// A step record: a JSON object whose first keys are Lár's, in Lár's order.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord(pub Map<String, Value>);

impl StepRecord {
    pub fn step(&self) -> u64 {
        self.0.get("step").and_then(Value::as_u64).unwrap_or(0)
    }
    pub fn node_id(&self) -> &str {
        self.0.get("node_id").and_then(Value::as_str).unwrap_or("")
    }
    pub fn outcome(&self) -> &str {
        self.0.get("outcome").and_then(Value::as_str).unwrap_or("")
    }
    pub fn error(&self) -> Option<&str> {
        self.0.get("error").and_then(Value::as_str)
    }
    pub fn state_after(&self) -> Option<&Map<String, Value>> {
        self.0.get("state_after").and_then(Value::as_object)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}
