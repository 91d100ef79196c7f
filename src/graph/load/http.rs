//! HTTP tools (`[tools.NAME]` with an `http` table), and the pieces they share with LLM
//! providers: the retry fields, the URL check and the headers.

use crate::graph::error::GraphError;
use crate::graph::model::{
    HttpToolSpec, DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BACKOFF_MAX_MS, DEFAULT_RETRY_BACKOFF_MS,
    DEFAULT_TOOL_TIMEOUT,
};
use crate::graph::reader::FieldReader;
use crate::net::{HeaderSpec, RetrySpec};
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

/// The `http` part of the tool `name`: `idempotent` and the retry fields from the tool's table
/// (`r`), `url`, `method` and `headers` from its `http` table. Returns the spec (none without a
/// usable `url`) and the errors of the `http` table, which are reported after the tool's own.
pub(super) fn http_tool(
    r: &mut FieldReader,
    file: &str,
    name: &str,
    http: &Map<String, Value>,
    base_dir: &Path,
    timeout_ms: Option<u64>,
) -> (Option<HttpToolSpec>, Vec<GraphError>) {
    let idempotent = r.opt_bool("idempotent");
    let retry_fields = read_retry(r);
    let mut h = FieldReader::new(file, Some(format!("tools.{name}.http")), http);
    let url = h.req_str("url");
    if let Some(u) = &url {
        check_url(&mut h, "url", u);
    }
    let method = h
        .opt_str("method")
        .unwrap_or_else(|| "POST".to_string())
        .to_ascii_uppercase();
    if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
        h.error(
            Some("method"),
            format!("'{method}' is not supported (GET, POST, PUT, PATCH, DELETE)"),
        );
    }
    let headers = read_headers(&mut h, base_dir);
    let http_errors = h.finish("an http tool's 'http' table");
    // RFC 9110: GET, PUT and DELETE are idempotent; POST and PATCH are not.
    let idempotent = idempotent.unwrap_or(matches!(method.as_str(), "GET" | "PUT" | "DELETE"));
    let default_attempts = if idempotent { DEFAULT_MAX_ATTEMPTS } else { 1 };
    let retry = retry_fields.build(default_attempts);
    if !idempotent && retry.max_attempts > 1 {
        r.error(
            Some("max_attempts"),
            "a non-idempotent HTTP tool is never retried: set idempotent = true if repeating the call is harmless, or drop max_attempts",
        );
    }
    let spec = url.map(|url| HttpToolSpec {
        url,
        method,
        headers,
        timeout: timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_TOOL_TIMEOUT),
        timeout_explicit: timeout_ms.is_some(),
        idempotent,
        retry,
    });
    (spec, http_errors)
}

/// `max_attempts`, `retry_backoff_ms`, `retry_backoff_max_ms`, read before the default is known.
pub(super) struct RetryFields {
    max_attempts: Option<u64>,
    backoff_ms: u64,
    backoff_max_ms: u64,
}

impl RetryFields {
    pub(super) fn build(&self, default_attempts: u32) -> RetrySpec {
        let attempts = self
            .max_attempts
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .unwrap_or(default_attempts);
        RetrySpec::new(attempts, self.backoff_ms, self.backoff_max_ms)
    }
}

/// Upper bound on `max_attempts`: retries are for transient trouble, not for waiting out an
/// outage inside one step.
const MAX_ATTEMPTS_LIMIT: u64 = 20;

pub(super) fn read_retry(r: &mut FieldReader) -> RetryFields {
    let max_attempts = r.opt_u64("max_attempts");
    if let Some(n) = max_attempts {
        if n == 0 || n > MAX_ATTEMPTS_LIMIT {
            r.error(
                Some("max_attempts"),
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            );
        }
    }
    let backoff_ms = r
        .opt_u64("retry_backoff_ms")
        .unwrap_or(DEFAULT_RETRY_BACKOFF_MS);
    let backoff_max_ms = r
        .opt_u64("retry_backoff_max_ms")
        .unwrap_or(DEFAULT_RETRY_BACKOFF_MAX_MS.max(backoff_ms));
    if backoff_max_ms < backoff_ms {
        r.error(
            Some("retry_backoff_max_ms"),
            "must not be less than retry_backoff_ms",
        );
    }
    RetryFields {
        max_attempts,
        backoff_ms,
        backoff_max_ms,
    }
}

/// An absolute http(s) URL with a host and no credentials (those belong in headers or
/// `api_key_*`, where they are kept out of logs).
pub(super) fn check_url(r: &mut FieldReader, field: &'static str, url: &str) {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            if !matches!(u.scheme(), "http" | "https") {
                r.error(
                    Some(field),
                    format!("'{}' is not an http(s) URL", u.scheme()),
                );
            } else if u.host_str().is_none_or(str::is_empty) {
                r.error(Some(field), "the URL has no host");
            } else if !u.username().is_empty() || u.password().is_some() {
                r.error(
                    Some(field),
                    "credentials in the URL would end up in logs: use headers with env:/file: values",
                );
            }
        }
        Err(e) => r.error(Some(field), format!("not a valid URL: {e}")),
    }
}

pub(super) fn read_headers(r: &mut FieldReader, base_dir: &Path) -> Vec<HeaderSpec> {
    let mut out = Vec::new();
    for (name, value) in r.opt_str_table("headers") {
        match HeaderSpec::parse(&name, &value, base_dir) {
            Ok(h) => out.push(h),
            Err(msg) => r.error(Some("headers"), msg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::error::GraphError;
    use crate::graph::ToolSpec;

    /// A graph declaring the http tool `t`: `tool` fields, then its `http` table's (no node
    /// calls it: a broken tool would also be unknown to the node).
    fn http_tool(tool: &str, http: &str) -> String {
        format!(
            "entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"clear_error\"\n\
             [tools.t]\n{tool}\n[tools.t.http]\n{http}\n"
        )
    }

    const URL: &str = "url = \"https://api.example/score\"";

    /// The one error of the tool `t`, reported on its `http` table.
    fn http_error(http: &str) -> GraphError {
        let e = only_error(&http_tool("", http));
        assert_eq!(e.node.as_deref(), Some("tools.t.http"), "{e:?}");
        e
    }

    #[test]
    fn an_http_tool_loads_with_its_defaults() {
        let g = load(&http_tool("", URL)).unwrap();
        match &g.tools["t"] {
            ToolSpec::Http(h) => {
                assert_eq!(h.method, "POST");
                assert!(!h.idempotent);
                assert_eq!(h.retry.max_attempts, 1);
                assert!(!h.timeout_explicit);
            }
            other => panic!("{other:?}"),
        }
        let g = load(&http_tool("", &format!("{URL}\nmethod = \"put\""))).unwrap();
        match &g.tools["t"] {
            ToolSpec::Http(h) => {
                assert_eq!(h.method, "PUT");
                assert!(h.idempotent);
                assert_eq!(h.retry.max_attempts, 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_http_tool_needs_a_url() {
        let e = http_error("method = \"GET\"");
        assert_eq!(e.field.as_deref(), Some("url"));
        assert_eq!(e.message, "is required");
    }

    #[test]
    fn the_url_is_checked() {
        let e = http_error("url = \"ftp://h/x\"");
        assert_eq!(e.field.as_deref(), Some("url"));
        assert_eq!(e.message, "'ftp' is not an http(s) URL");
        let e = http_error("url = \"https://u:pw@h/x\"");
        assert_eq!(
            e.message,
            "credentials in the URL would end up in logs: use headers with env:/file: values"
        );
        let e = http_error("url = \"api.example/score\"");
        assert_eq!(e.message, "not a valid URL: relative URL without a base");
    }

    #[test]
    fn an_unsupported_method() {
        let e = http_error(&format!("{URL}\nmethod = \"trace\""));
        assert_eq!(e.field.as_deref(), Some("method"));
        assert_eq!(
            e.message,
            "'TRACE' is not supported (GET, POST, PUT, PATCH, DELETE)"
        );
    }

    #[test]
    fn headers_are_checked() {
        let e = http_error(&format!("{URL}\nheaders = {{ \"a b\" = \"x\" }}"));
        assert_eq!(e.field.as_deref(), Some("headers"));
        assert_eq!(e.message, "'a b' is not a valid HTTP header name");
        let e = http_error(&format!("{URL}\nheaders = {{ Authorization = \"file:\" }}"));
        assert_eq!(e.message, "header 'Authorization': 'file:' needs a path");
        let e = http_error(&format!("{URL}\nheaders = {{ X = 1 }}"));
        assert_eq!(e.message, "'X' must be a string, found a number");
    }

    #[test]
    fn the_http_table_rejects_unknown_fields() {
        let e = http_error(&format!("{URL}\ntimeout_ms = 5"));
        assert_eq!(e.field.as_deref(), Some("timeout_ms"));
        assert_eq!(
            e.message,
            "unknown field for an http tool's 'http' table (known: headers, method, url)"
        );
    }

    #[test]
    fn a_non_idempotent_call_is_never_retried() {
        let e = only_error(&http_tool("max_attempts = 2", URL));
        assert_eq!(e.node.as_deref(), Some("tools.t"));
        assert_eq!(e.field.as_deref(), Some("max_attempts"));
        assert_eq!(
            e.message,
            "a non-idempotent HTTP tool is never retried: set idempotent = true if repeating the call is harmless, or drop max_attempts"
        );
        assert!(load(&http_tool("max_attempts = 2\nidempotent = true", URL)).is_ok());
        let e = only_error(&http_tool("idempotent = \"yes\"", URL));
        assert_eq!(e.field.as_deref(), Some("idempotent"));
        assert_eq!(e.message, "must be true or false, found a string");
    }

    #[test]
    fn retry_fields_are_bounded() {
        for n in [0, 21] {
            let e = only_error(&http_tool(
                &format!("idempotent = true\nmax_attempts = {n}"),
                URL,
            ));
            assert_eq!(e.field.as_deref(), Some("max_attempts"));
            assert_eq!(e.message, "must be between 1 and 20");
        }
        let e = only_error(&http_tool(
            "retry_backoff_ms = 1000\nretry_backoff_max_ms = 10",
            URL,
        ));
        assert_eq!(e.field.as_deref(), Some("retry_backoff_max_ms"));
        assert_eq!(e.message, "must not be less than retry_backoff_ms");
    }

    #[test]
    fn an_http_tool_takes_no_cwd_or_env() {
        let e = only_error(&http_tool("cwd = \"d\"", URL));
        assert_eq!(e.field.as_deref(), Some("cwd"));
        assert_eq!(e.message, "only applies to 'command' tools");
    }

    #[test]
    fn the_tool_errors_come_before_the_http_table_errors() {
        let all = errors(&http_tool("timeout_ms = 0\ncolour = 1", "method = \"GET\""));
        let at: Vec<_> = all
            .iter()
            .map(|e| (e.node.as_deref().unwrap(), e.field.as_deref().unwrap()))
            .collect();
        assert_eq!(
            at,
            [
                ("tools.t", "timeout_ms"),
                ("tools.t", "colour"),
                ("tools.t.http", "url")
            ]
        );
        assert_eq!(
            all[1].message,
            "unknown field for a tool (known: builtin, command, cwd, description, env, http, idempotent, max_attempts, retry_backoff_max_ms, retry_backoff_ms, timeout_ms)"
        );
    }
}
