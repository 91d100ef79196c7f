//! HTTP tools: `[tools.NAME] http = { url, method, headers }`. The node's inputs go as a JSON
//! body (as query parameters for GET), the JSON answer is the result. Only idempotent tools are
//! retried; every call carries an `Idempotency-Key` (job id + step) so a server can drop a
//! repeat after a crash and resume. A non-2xx answer is a tool failure naming the status and
//! the start of the body; secret header values never appear in either.

use super::{ToolContext, ToolFailure};
use crate::graph::HttpToolSpec;
use crate::net::secret::add_headers;
use crate::net::{self, Outgoing, Redactor};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde_json::{Map, Value};

pub async fn call_http(
    tool: &str,
    spec: &HttpToolSpec,
    inputs: &Map<String, Value>,
    ctx: &ToolContext,
) -> Result<Value, ToolFailure> {
    let fail = |why: String| ToolFailure(format!("tool '{tool}': {why}"));
    let method = Method::from_bytes(spec.method.as_bytes())
        .map_err(|_| fail(format!("'{}' is not an HTTP method", spec.method)))?;
    let mut url = Url::parse(&spec.url).map_err(|e| fail(format!("bad url: {e}")))?;

    let mut redactor = Redactor::default();
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    if let Ok(key) = HeaderValue::from_str(&ctx.idempotency_key()) {
        headers.insert(HeaderName::from_static("idempotency-key"), key);
    }
    add_headers(&mut headers, &spec.headers, &mut redactor).map_err(|e| fail(e.to_string()))?;

    let body = if method == Method::GET {
        if !inputs.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in inputs {
                match v {
                    Value::String(s) => q.append_pair(k, s),
                    other => q.append_pair(k, &other.to_string()),
                };
            }
        }
        None
    } else {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Some(
            serde_json::to_vec(inputs)
                .map_err(|e| fail(format!("cannot encode the inputs: {e}")))?,
        )
    };

    let out = Outgoing {
        method,
        url,
        headers,
        body,
        timeout: spec.timeout,
        retry: &spec.retry,
        retry_allowed: spec.idempotent,
    };
    let reply = net::send(&out, &redactor)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if reply.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&reply.body).map_err(|e| {
        fail(format!(
            "HTTP {}: the answer is not JSON ({e}): {}",
            reply.status,
            net::excerpt(&reply.body)
        ))
    })
}
