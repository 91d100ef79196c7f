//! An `llm` or `reduce` step: render the prompt, check the token budget (in a batch: reserve
//! from the budget the branches share, `super::budget`), call the primary model then each
//! fallback, account tokens in Lár's `run_metadata` fields, spend the budget, and parse the
//! answer. Every failure is a step error with a reason; nothing here panics on what a
//! server sends.

use super::budget::reservation;
use super::node::{Ctx, PromptTexts};
use crate::graph::LlmSpec;
use crate::llm::{self, ChatAnswer, ChatRequest};
use serde_json::{Map, Value};

pub(super) const TOKEN_BUDGET: &str = "token_budget";

/// What a model call produced for the step.
pub(super) struct LlmResult {
    /// The value for `output`, or the step error.
    pub answer: Result<Value, String>,
    pub metadata: Map<String, Value>,
    pub texts: PromptTexts,
}

impl LlmResult {
    fn failed(reason: String, metadata: Map<String, Value>, texts: PromptTexts) -> Self {
        LlmResult {
            answer: Err(reason),
            metadata,
            texts,
        }
    }
}

pub(super) async fn call_llm(
    ctx: &Ctx<'_>,
    node_id: &str,
    spec: &LlmSpec,
    state: &mut Map<String, Value>,
) -> LlmResult {
    let who = format!("node '{node_id}'");
    let mut texts = PromptTexts::default();
    let mut meta = Map::new();

    // 1. The texts, fully rendered, or no call at all.
    if let Some(system) = &spec.system {
        match system.render(state) {
            Ok(s) => texts.system_instruction = Some(s),
            Err(missing) => {
                return LlmResult::failed(format!("{who}: system: {missing}"), meta, texts)
            }
        }
    }
    let prompt = match spec.prompt.render(state) {
        Ok(p) => p,
        Err(missing) => {
            return LlmResult::failed(
                format!("{who}: prompt: {missing}"),
                meta,
                PromptTexts::default(),
            )
        }
    };
    texts.prompt = Some(prompt.clone());

    // 2. The budget, before spending anything. In a batch, the shared one: this may wait for
    // other branches' calls to settle. The reservation is released on every return below.
    let reserved = match ctx.budget {
        Some(shared) => {
            let tokens = reservation(
                spec.max_tokens,
                texts.system_instruction.as_deref(),
                &prompt,
            );
            match shared.reserve(tokens).await {
                Ok(r) => Some(r),
                Err(why) => return LlmResult::failed(format!("{who}: {why}"), meta, texts),
            }
        }
        None => {
            if let Err(why) = check_budget(state) {
                return LlmResult::failed(format!("{who}: {why}"), meta, texts);
            }
            None
        }
    };

    // 3. The provider, its secrets read now.
    let Some(provider) = ctx.graph.providers.get(&spec.provider) else {
        return LlmResult::failed(
            format!("{who}: provider '{}' is not declared", spec.provider),
            meta,
            texts,
        );
    };
    meta.insert("provider".into(), Value::String(spec.provider.clone()));
    let ep = match llm::endpoint(provider) {
        Ok(ep) => ep,
        Err(e) => {
            return LlmResult::failed(
                format!("{who}: provider '{}': {e}", spec.provider),
                meta,
                texts,
            )
        }
    };

    // 4. The primary model, then each fallback.
    let primary = provider
        .model_env
        .as_ref()
        .and_then(|var| std::env::var(var).ok())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| spec.model.clone());
    let models = std::iter::once(primary.as_str()).chain(spec.fallbacks.iter().map(String::as_str));
    let mut failures: Vec<String> = Vec::new();
    let mut attempts = 0u32;
    let mut answered: Option<(String, ChatAnswer)> = None;
    for model in models {
        let req = ChatRequest {
            model,
            system: texts.system_instruction.as_deref(),
            prompt: &prompt,
            temperature: spec.temperature,
            max_tokens: spec.max_tokens,
            json: spec.json,
        };
        match llm::chat(&ep, provider, &req).await {
            Ok(a) => {
                attempts += a.attempts;
                answered = Some((model.to_string(), a));
                break;
            }
            Err(e) => {
                attempts += e.attempts();
                failures.push(format!("model '{model}': {e}"));
            }
        }
    }
    meta.insert("attempts".into(), Value::from(attempts));
    let Some((model, answer)) = answered else {
        meta.insert("model".into(), Value::String(primary));
        meta.insert("failures".into(), strings(&failures));
        return LlmResult::failed(format!("{who}: {}", failures.join("; ")), meta, texts);
    };

    // 5. Accounting, in Lár's field names first.
    let mut m = Map::new();
    if let Some(u) = answer.usage {
        m.insert("prompt_tokens".into(), Value::from(u.prompt));
        m.insert("output_tokens".into(), Value::from(u.completion));
        m.insert("total_tokens".into(), Value::from(u.total));
        spend_budget(state, u.total);
        if let Some(r) = reserved {
            r.settle(u.total);
        }
    }
    m.insert("model".into(), Value::String(model));
    m.extend(meta);
    let mut meta = m;
    if answer.usage.is_none() {
        meta.insert("usage_reported".into(), Value::Bool(false));
    }
    if let Some(rm) = &answer.response_model {
        meta.insert("response_model".into(), Value::String(rm.clone()));
    }
    if let Some(fr) = &answer.finish_reason {
        meta.insert("finish_reason".into(), Value::String(fr.clone()));
    }
    if let Some(r) = &answer.reasoning {
        meta.insert("reasoning_content".into(), Value::String(r.clone()));
    }
    if !failures.is_empty() {
        meta.insert("fallback_from".into(), strings(&failures));
    }

    // 6. The value.
    let value = if spec.json {
        llm::parse_json_answer(&answer.content).map_err(|why| format!("{who}: {why}"))
    } else {
        Ok(Value::String(answer.content))
    };
    LlmResult {
        answer: value,
        metadata: meta,
        texts,
    }
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

/// A budget of 0 or less stops the call; no `token_budget` (or null) means no budget.
fn check_budget(state: &Map<String, Value>) -> Result<(), String> {
    match state.get(TOKEN_BUDGET) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(left) if left > 0.0 => Ok(()),
            _ => Err(format!("token budget exhausted ({TOKEN_BUDGET} = {n})")),
        },
        Some(other) => Err(format!(
            "{TOKEN_BUDGET} must be a number, found {}",
            match other {
                Value::String(_) => "a string",
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "a list",
                _ => "an object",
            }
        )),
    }
}

/// Decreases a numeric `token_budget` by `tokens`, keeping integers integers.
pub(super) fn spend_budget(state: &mut Map<String, Value>, tokens: u64) {
    let Some(Value::Number(n)) = state.get(TOKEN_BUDGET) else {
        return;
    };
    let left = match (n.as_i64(), i64::try_from(tokens)) {
        (Some(i), Ok(t)) => Value::from(i.saturating_sub(t)),
        _ => Value::from(n.as_f64().unwrap_or(0.0) - tokens as f64),
    };
    state.insert(TOKEN_BUDGET.into(), left);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn budget() {
        let mut s = json!({"token_budget": 100}).as_object().cloned().unwrap();
        assert!(check_budget(&s).is_ok());
        spend_budget(&mut s, 130);
        assert_eq!(s["token_budget"], json!(-30));
        assert_eq!(
            check_budget(&s).unwrap_err(),
            "token budget exhausted (token_budget = -30)"
        );
        let mut f = json!({"token_budget": 50.5}).as_object().cloned().unwrap();
        spend_budget(&mut f, 10);
        assert_eq!(f["token_budget"].as_f64(), Some(40.5));
        assert!(check_budget(&json!({}).as_object().cloned().unwrap()).is_ok());
        assert!(check_budget(&json!({"token_budget": "x"}).as_object().cloned().unwrap()).is_err());
    }
}
