//! Reads one table of a graph file field by field, remembering which fields were used so the
//! unknown ones can be reported by name.

use super::error::GraphError;
use serde_json::{Map, Value};

pub(crate) struct FieldReader<'a> {
    file: &'a str,
    node: Option<String>,
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
    pub errors: Vec<GraphError>,
}

impl<'a> FieldReader<'a> {
    pub fn new(file: &'a str, node: Option<String>, map: &'a Map<String, Value>) -> Self {
        FieldReader {
            file,
            node,
            map,
            used: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn error(&mut self, field: Option<&str>, message: impl Into<String>) {
        self.errors.push(GraphError {
            file: self.file.to_string(),
            node: self.node.clone(),
            field: field.map(str::to_string),
            message: message.into(),
        });
    }

    pub fn value(&mut self, field: &'static str) -> Option<&'a Value> {
        self.used.push(field);
        self.map.get(field)
    }

    /// Whether the table has the field (which counts as known).
    pub fn has(&mut self, field: &'static str) -> bool {
        self.used.push(field);
        self.map.contains_key(field)
    }

    pub fn opt_str(&mut self, field: &'static str) -> Option<String> {
        match self.value(field) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be a string, found {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn req_str(&mut self, field: &'static str) -> Option<String> {
        if !self.map.contains_key(field) {
            self.used.push(field);
            self.error(Some(field), "is required");
            return None;
        }
        self.opt_str(field)
    }

    pub fn str_list(&mut self, field: &'static str) -> Option<Vec<String>> {
        match self.value(field) {
            None => None,
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            self.error(
                                Some(field),
                                format!("must be a list of strings, found a {}", kind(other)),
                            );
                            return None;
                        }
                    }
                }
                Some(out)
            }
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be a list of strings, found {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn opt_u64(&mut self, field: &'static str) -> Option<u64> {
        match self.value(field) {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be a whole number >= 0, found {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn opt_bool(&mut self, field: &'static str) -> Option<bool> {
        match self.value(field) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be true or false, found {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn opt_f64(&mut self, field: &'static str) -> Option<f64> {
        match self.value(field) {
            None => None,
            Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => n.as_f64(),
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be a number, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// A table whose values must all be strings (headers, env).
    pub fn opt_str_table(&mut self, field: &'static str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(table) = self.opt_table(field) {
            for (k, v) in table {
                match v {
                    Value::String(s) => out.push((k.clone(), s.clone())),
                    other => self.error(
                        Some(field),
                        format!("'{k}' must be a string, found {}", kind(other)),
                    ),
                }
            }
        }
        out
    }

    pub fn opt_table(&mut self, field: &'static str) -> Option<&'a Map<String, Value>> {
        match self.value(field) {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => {
                self.error(
                    Some(field),
                    format!("must be a table, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// Reports every field of the table that no reader call asked for.
    pub fn finish(mut self, what: &str) -> Vec<GraphError> {
        let unknown: Vec<String> = self
            .map
            .keys()
            .filter(|k| !self.used.contains(&k.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            let mut known = self.used.clone();
            known.sort_unstable();
            known.dedup();
            for k in unknown {
                self.error(
                    Some(&k),
                    format!("unknown field for {what} (known: {})", known.join(", ")),
                );
            }
        }
        self.errors
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}
