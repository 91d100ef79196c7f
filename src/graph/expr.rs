//! Router expressions in CEL (the `cel` crate), evaluated over the run's state.

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// A compiled CEL expression; every top-level state key is a variable.
pub struct Expr {
    source: String,
    program: cel::Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    /// Parses `source`; the error text is the parser's, for the validation message.
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
        Ok(Expr {
            source: source.to_string(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a route key: strings as they are, booleans and numbers as their text.
    pub fn route_key(&self, state: &Map<String, Value>) -> Result<String, String> {
        let mut ctx = cel::Context::default();
        for (k, v) in state {
            ctx.add_variable_from_value(k.as_str(), to_cel(v));
        }
        let value = self
            .program
            .execute(&ctx)
            .map_err(|e| format!("expression `{}` failed: {e}", self.source))?;
        match value {
            cel::Value::String(s) => Ok(s.to_string()),
            cel::Value::Bool(b) => Ok(b.to_string()),
            cel::Value::Int(i) => Ok(i.to_string()),
            cel::Value::UInt(u) => Ok(u.to_string()),
            cel::Value::Float(f) => Ok(f.to_string()),
            cel::Value::Null => Ok("null".to_string()),
            other => Err(format!(
                "expression `{}` gave {other:?}, not a string, number or boolean route key",
                self.source
            )),
        }
    }
}

/// JSON to CEL by hand: serde_json's `arbitrary_precision` numbers do not serialize as numbers.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let m: HashMap<cel::objects::Key, cel::Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(m) })
        }
    }
}
