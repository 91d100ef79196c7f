//! Tools shipped with the binary: the benchmark graph's (`sum_numbers`, `upper_text`, `digest`,
//! as in `shared/bench/agentgraph.py`) and small helpers for examples and tests.

use super::{Registry, ToolFailure};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub fn register(r: &mut Registry) {
    r.register_fn("sum_numbers", sum_numbers);
    r.register_fn("upper_text", upper_text);
    r.register_fn("digest", digest);
    r.register_fn("echo", |inputs| Ok(Value::Object(inputs.clone())));
    r.register_fn("fail", |inputs| {
        let why = inputs
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("the 'fail' tool always fails");
        Err(ToolFailure(why.to_string()))
    });
}

fn first_input<'a>(inputs: &'a Map<String, Value>, tool: &str) -> Result<&'a Value, ToolFailure> {
    inputs
        .values()
        .next()
        .ok_or_else(|| ToolFailure(format!("{tool}: needs one input")))
}

fn sum_numbers(inputs: &Map<String, Value>) -> Result<Value, ToolFailure> {
    let Value::Array(items) = first_input(inputs, "sum_numbers")? else {
        return Err(ToolFailure(
            "sum_numbers: the input must be a list of numbers".into(),
        ));
    };
    let mut int_sum: i64 = 0;
    let mut float_sum: f64 = 0.0;
    let mut any_float = false;
    for item in items {
        let Value::Number(n) = item else {
            return Err(ToolFailure(format!("sum_numbers: not a number: {item}")));
        };
        match n.as_i64() {
            Some(i) if !any_float => {
                int_sum = int_sum
                    .checked_add(i)
                    .ok_or_else(|| ToolFailure("sum_numbers: integer overflow".into()))?;
            }
            _ => {
                any_float = true;
                float_sum += n.as_f64().unwrap_or(f64::NAN);
            }
        }
    }
    if any_float {
        Ok(Value::from(float_sum + int_sum as f64))
    } else {
        Ok(Value::from(int_sum))
    }
}

fn upper_text(inputs: &Map<String, Value>) -> Result<Value, ToolFailure> {
    match first_input(inputs, "upper_text")? {
        Value::String(s) => Ok(Value::String(s.to_uppercase())),
        other => Err(ToolFailure(format!("upper_text: not a string: {other}"))),
    }
}

/// First 16 hex chars of SHA-256 of the input's text, like Python's `str(result)`.
fn digest(inputs: &Map<String, Value>) -> Result<Value, ToolFailure> {
    let text = match first_input(inputs, "digest")? {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let hex = hex::encode(Sha256::digest(text.as_bytes()));
    Ok(Value::String(hex[..16].to_string()))
}
