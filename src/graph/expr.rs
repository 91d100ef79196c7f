//! Router expressions in CEL (the `cel` crate), evaluated over the run's state.

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// How long one evaluation may take. CEL has no step budget of its own, and an expression
/// that is fine on small input (`items.exists(a, items.exists(b, ...))`) is quadratic in a
/// producer's list: past this the route fails instead of holding up the run.
pub const EVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most evaluations running at once, process-wide. A thread cannot be cancelled, so one
/// past its budget runs on to its end holding its slot: a flood of hostile jobs fills these
/// slots, and then routes wait for one (see [`SLOT_WAIT`]), instead of filling tokio's
/// blocking pool (512 threads, shared with log writes and SQLite) and starving them.
pub const EVAL_SLOTS: usize = 32;

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(EVAL_SLOTS);

/// How long an evaluation waits for a slot (apart from its own budget): ordinary evaluations
/// free theirs in microseconds, so only a flood of runaways makes a route wait, and fail past
/// this.
pub const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A compiled CEL expression; every top-level state key is a variable.
pub struct Expr {
    source: String,
    program: Arc<cel::Program>,
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
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a route key: strings as they are, booleans and numbers as their text. The
    /// evaluation runs on a blocking thread (a long one must not stall the async threads that
    /// renew leases) within [`EVAL_TIMEOUT`]; one past it keeps its thread until it ends, but
    /// the run goes on without it.
    pub async fn route_key(&self, state: &Map<String, Value>) -> Result<String, String> {
        self.route_key_within(state, &SLOTS, SLOT_WAIT, EVAL_TIMEOUT)
            .await
    }

    /// [`Expr::route_key`] with its slots, slot wait and budget given (tests use small ones).
    async fn route_key_within(
        &self,
        state: &Map<String, Value>,
        slots: &'static tokio::sync::Semaphore,
        slot_wait: std::time::Duration,
        budget: std::time::Duration,
    ) -> Result<String, String> {
        let Ok(Ok(slot)) = tokio::time::timeout(slot_wait, slots.acquire()).await else {
            return Err(format!(
                "expression `{}` not evaluated: no evaluation slot came free within {} s (each held by an expression running past its budget)",
                self.source,
                slot_wait.as_secs_f64()
            ));
        };
        let deadline = tokio::time::Instant::now() + budget;
        let vars: Vec<(String, cel::Value)> =
            state.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
        let program = Arc::clone(&self.program);
        let eval = tokio::task::spawn_blocking(move || {
            // The slot is freed when the evaluation ends, not when the run stops waiting.
            let _slot = slot;
            let mut ctx = cel::Context::default();
            for (k, v) in vars {
                ctx.add_variable_from_value(k, v);
            }
            program.execute(&ctx).map_err(|e| e.to_string())
        });
        let value = match tokio::time::timeout_at(deadline, eval).await {
            Ok(Ok(Ok(v))) => v,
            Ok(Ok(Err(e))) => return Err(format!("expression `{}` failed: {e}", self.source)),
            Ok(Err(e)) => return Err(format!("expression `{}` failed: {e}", self.source)),
            Err(_) => {
                return Err(format!(
                    "expression `{}` took more than {} s",
                    self.source,
                    budget.as_secs_f64()
                ))
            }
        };
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

#[cfg(test)]
mod tests {
    use super::Expr;
    use serde_json::{json, Map, Value};
    use std::time::{Duration, Instant};

    fn state(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// A runaway holds its slot past its budget; the next evaluation waits for a slot, fails
    /// past its slot wait instead of starting another thread; once the runaway ends, its slot
    /// serves again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runaway_holds_its_slot_and_the_next_evaluation_is_refused_as_busy() {
        static ONE_SLOT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let budget = Duration::from_millis(100);
        let items: Vec<u32> = (0..700).collect();
        let big = state(json!({ "items": items }));
        let quadratic =
            Expr::compile(r#"items.exists(a, items.exists(b, a + b == -1)) ? "a" : "b""#).unwrap();
        let err = quadratic
            .route_key_within(&big, &ONE_SLOT, budget, budget)
            .await
            .unwrap_err();
        assert!(err.contains("took more than 0.1 s"), "{err}");

        let simple = Expr::compile(r#"kind == "x" ? "yes" : "no""#).unwrap();
        let small = state(json!({"kind": "x"}));
        let err = simple
            .route_key_within(&small, &ONE_SLOT, budget, budget)
            .await
            .unwrap_err();
        assert!(
            err.contains("no evaluation slot came free within 0.1 s"),
            "{err}"
        );

        let started = Instant::now();
        while ONE_SLOT.available_permits() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the runaway never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            simple
                .route_key_within(&small, &ONE_SLOT, budget, budget)
                .await,
            Ok("yes".to_string())
        );
    }
}
