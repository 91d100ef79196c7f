//! The OpenAI-compatible chat protocol (`POST {base_url}/chat/completions`): building the
//! request, reading the answer (content, reasoning, usage), and calling a provider through
//! [`crate::net`]. Works with OpenAI, Ollama's `/v1`, vLLM, LiteLLM and the like.

use crate::graph::ProviderSpec;
use crate::net::secret::{add_headers, secret_header_value};
use crate::net::{self, CallError, Outgoing, Redactor, SecretRefError};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde_json::{json, Map, Value};

/// Where and how to reach a provider, resolved once per step (secrets read now).
pub struct Endpoint {
    pub url: Url,
    headers: HeaderMap,
    pub redactor: Redactor,
}

/// What the model is asked.
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub prompt: &'a str,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
    pub json: bool,
}

/// Token counts from the answer's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The answer text, reasoning removed.
    pub content: String,
    /// `<think>…</think>` text and/or the message's `reasoning_content` / `reasoning`.
    pub reasoning: Option<String>,
    pub usage: Option<Usage>,
    /// The model name the server reports (may differ from the one asked for).
    pub response_model: Option<String>,
    pub finish_reason: Option<String>,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    #[error("API key: {0}")]
    Key(SecretRefError),
    #[error("header: {0}")]
    Header(SecretRefError),
    #[error("base_url{}: {detail}", .from_env.as_ref().map(|v| format!(" (from {v})")).unwrap_or_default())]
    BadUrl {
        from_env: Option<String>,
        detail: String,
    },
    #[error(transparent)]
    Call(CallError),
    #[error("{target}: malformed answer ({why}){}", if .excerpt.is_empty() { String::new() } else { format!(": {}", .excerpt) })]
    Malformed {
        target: String,
        why: String,
        excerpt: String,
        attempts: u32,
    },
}

impl LlmError {
    pub fn attempts(&self) -> u32 {
        match self {
            LlmError::Call(e) => e.attempts(),
            LlmError::Malformed { attempts, .. } => *attempts,
            _ => 0,
        }
    }
}

/// Resolves the provider's URL (with its env override) and headers (with its secrets).
pub fn endpoint(provider: &ProviderSpec) -> Result<Endpoint, LlmError> {
    let (base, from_env) = match provider.base_url_env.as_ref().and_then(|var| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (v, var))
    }) {
        Some((v, var)) => (v, Some(var.clone())),
        None => (provider.base_url.clone(), None),
    };
    let bad = |detail: String| LlmError::BadUrl {
        from_env: from_env.clone(),
        detail,
    };
    let url = Url::parse(&format!("{}/chat/completions", base.trim_end_matches('/')))
        .map_err(|e| bad(format!("not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("'{}' is not an http(s) URL", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials in the URL are refused".into()));
    }
    let mut redactor = Redactor::default();
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(key) = &provider.api_key {
        let text = key.resolve().map_err(LlmError::Key)?;
        redactor.add(&text);
        let value = secret_header_value(&format!("Bearer {text}"), &key.describe())
            .map_err(LlmError::Key)?;
        headers.insert(AUTHORIZATION, value);
    }
    add_headers(&mut headers, &provider.headers, &mut redactor).map_err(LlmError::Header)?;
    Ok(Endpoint {
        url,
        headers,
        redactor,
    })
}

/// The request body.
pub fn request_body(req: &ChatRequest<'_>) -> Value {
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = req.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": req.prompt}));
    let mut body = Map::new();
    body.insert("model".into(), Value::String(req.model.to_string()));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), Value::Bool(false));
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), Value::from(t));
    }
    if let Some(n) = req.max_tokens {
        body.insert("max_tokens".into(), Value::from(n));
    }
    if req.json {
        body.insert("response_format".into(), json!({"type": "json_object"}));
    }
    Value::Object(body)
}

/// One model, with the provider's retries.
pub async fn chat(
    ep: &Endpoint,
    provider: &ProviderSpec,
    req: &ChatRequest<'_>,
) -> Result<ChatAnswer, LlmError> {
    let body = serde_json::to_vec(&request_body(req)).map_err(|e| LlmError::Malformed {
        target: ep.url.to_string(),
        why: format!("cannot encode the request: {e}"),
        excerpt: String::new(),
        attempts: 0,
    })?;
    let out = Outgoing {
        method: Method::POST,
        url: ep.url.clone(),
        headers: ep.headers.clone(),
        body: Some(body),
        timeout: provider.timeout,
        retry: &provider.retry,
        retry_allowed: true,
    };
    let reply = net::send(&out, &ep.redactor)
        .await
        .map_err(LlmError::Call)?;
    parse_answer(&reply.body, reply.attempts).map_err(|why| LlmError::Malformed {
        target: net::display_target(&Method::POST, &ep.url),
        why,
        excerpt: net::excerpt(&reply.body),
        attempts: reply.attempts,
    })
}

/// Reads a chat-completions answer.
pub fn parse_answer(body: &[u8], attempts: u32) -> Result<ChatAnswer, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let choice = doc
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("no choices[0]")?;
    let message = choice
        .get("message")
        .and_then(Value::as_object)
        .ok_or("choices[0] has no message")?;
    let raw = match message.get("content") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Null) | None => "",
        Some(_) => return Err("message.content is not a string".into()),
    };
    let (content, think) = split_reasoning(raw);
    let field = ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|k| message.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let reasoning = match (field, think) {
        (Some(f), Some(t)) => Some(format!("{f}\n{t}")),
        (Some(f), None) => Some(f.to_string()),
        (None, t) => t,
    };
    if content.is_empty() {
        let has_tool_calls = message.get("tool_calls").is_some_and(|t| !t.is_null());
        return Err(if has_tool_calls {
            "the answer is a tool call, not text".into()
        } else {
            "the answer has no text content".into()
        });
    }
    let usage = doc.get("usage").and_then(Value::as_object).map(|u| {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (p, c) = (n("prompt_tokens"), n("completion_tokens"));
        Usage {
            prompt: p,
            completion: c,
            total: u
                .get("total_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(p.saturating_add(c)),
        }
    });
    Ok(ChatAnswer {
        content,
        reasoning,
        usage,
        response_model: doc.get("model").and_then(Value::as_str).map(str::to_string),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        attempts,
    })
}

/// Separates `<think>…</think>` reasoning from the answer. An unclosed `<think>` makes the
/// rest reasoning; a lone `</think>` (the opening tag was in the chat template) makes what
/// precedes it reasoning.
pub fn split_reasoning(raw: &str) -> (String, Option<String>) {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let mut answer = String::new();
    let mut thoughts: Vec<String> = Vec::new();
    let mut rest = raw;
    if let Some(close) = rest.find(CLOSE) {
        if !rest[..close].contains(OPEN) {
            thoughts.push(rest[..close].trim().to_string());
            rest = &rest[close + CLOSE.len()..];
        }
    }
    while let Some(open) = rest.find(OPEN) {
        answer.push_str(&rest[..open]);
        let inner = &rest[open + OPEN.len()..];
        match inner.find(CLOSE) {
            Some(close) => {
                thoughts.push(inner[..close].trim().to_string());
                rest = &inner[close + CLOSE.len()..];
            }
            None => {
                thoughts.push(inner.trim().to_string());
                rest = "";
            }
        }
    }
    answer.push_str(rest);
    thoughts.retain(|t| !t.is_empty());
    let reasoning = (!thoughts.is_empty()).then(|| thoughts.join("\n"));
    (answer.trim().to_string(), reasoning)
}

/// Parses an answer that should be JSON; a surrounding Markdown code fence is tolerated.
pub fn parse_json_answer(text: &str) -> Result<Value, String> {
    let mut t = text.trim();
    if let Some(inner) = t.strip_prefix("```") {
        let inner = inner
            .strip_prefix("json")
            .or_else(|| inner.strip_prefix("JSON"))
            .unwrap_or(inner);
        if let Some(body) = inner.trim_end().strip_suffix("```") {
            t = body.trim();
        }
    }
    serde_json::from_str(t).map_err(|e| {
        format!(
            "the answer is not valid JSON ({e}): {}",
            net::excerpt(text.as_bytes())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_is_split_off() {
        assert_eq!(
            split_reasoning("<think>hmm, billing</think>\n\nbilling"),
            ("billing".to_string(), Some("hmm, billing".to_string()))
        );
        assert_eq!(
            split_reasoning("step one</think>answer"),
            ("answer".to_string(), Some("step one".to_string()))
        );
        assert_eq!(
            split_reasoning("answer <think>cut off"),
            ("answer".to_string(), Some("cut off".to_string()))
        );
        assert_eq!(split_reasoning(" plain "), ("plain".to_string(), None));
    }

    #[test]
    fn answer_with_usage_and_reasoning_field() {
        let body = br#"{"model":"m-2024","choices":[{"message":{"role":"assistant","content":"hi","reasoning_content":"because"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let a = parse_answer(body, 1).unwrap();
        assert_eq!(a.content, "hi");
        assert_eq!(a.reasoning.as_deref(), Some("because"));
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt: 7,
                completion: 3,
                total: 10
            })
        );
        assert_eq!(a.response_model.as_deref(), Some("m-2024"));
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn malformed_answers() {
        assert!(parse_answer(b"not json", 1).is_err());
        assert!(parse_answer(br#"{"choices":[]}"#, 1).is_err());
        assert!(parse_answer(br#"{"choices":[{"message":{"content":null}}]}"#, 1).is_err());
    }

    #[test]
    fn json_answers() {
        assert_eq!(
            parse_json_answer("```json\n{\"a\": 1}\n```").unwrap(),
            serde_json::json!({"a": 1})
        );
        assert!(parse_json_answer("{\"a\": ").is_err());
    }

    #[test]
    fn body_has_what_was_asked() {
        let b = request_body(&ChatRequest {
            model: "m",
            system: Some("be brief"),
            prompt: "hello",
            temperature: Some(0.5),
            max_tokens: Some(20),
            json: true,
        });
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "hello");
        assert_eq!(b["max_tokens"], 20);
        assert_eq!(b["response_format"]["type"], "json_object");
    }
}
