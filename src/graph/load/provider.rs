//! LLM provider declarations, `[providers.NAME]`: an OpenAI-compatible endpoint, its key and
//! its call settings. `llm` and `reduce` nodes refer to them by name, so they are read before
//! the nodes.

use super::http::{check_url, read_headers, read_retry};
use crate::graph::error::GraphError;
use crate::graph::model::{ProviderSpec, DEFAULT_LLM_TIMEOUT, DEFAULT_MAX_ATTEMPTS};
use crate::graph::reader::{kind, FieldReader};
use crate::net::SecretRef;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// One `[providers.NAME]` table: `base_url` (required), `api_key_env` or `api_key_file`,
/// `headers`, `timeout_ms` and the retry fields.
pub(super) fn parse_provider(
    file: &str,
    name: &str,
    spec: &Value,
    base_dir: &Path,
) -> Result<ProviderSpec, Vec<GraphError>> {
    let Value::Object(map) = spec else {
        return Err(vec![GraphError {
            file: file.to_string(),
            node: None,
            field: Some(format!("providers.{name}")),
            message: format!("must be a table, found {}", kind(spec)),
        }]);
    };
    let mut r = FieldReader::new(file, Some(format!("providers.{name}")), map);
    let _description = r.opt_str("description");
    let base_url = r.req_str("base_url");
    if let Some(u) = &base_url {
        check_url(&mut r, "base_url", u);
    }
    let base_url_env = r.opt_str("base_url_env");
    let model_env = r.opt_str("model_env");
    let key_env = r.opt_str("api_key_env");
    let key_file = r.opt_str("api_key_file");
    let api_key = match (key_env, key_file) {
        (Some(v), None) if !v.is_empty() => Some(SecretRef::Env(v)),
        (None, Some(p)) if !p.is_empty() => Some(SecretRef::File(base_dir.join(p))),
        (None, None) => None,
        (Some(_), Some(_)) => {
            r.error(
                Some("api_key_env"),
                "give either 'api_key_env' or 'api_key_file', not both",
            );
            None
        }
        (Some(_), None) | (None, Some(_)) => {
            r.error(
                Some("api_key_env"),
                "must name an environment variable (api_key_env) or a file (api_key_file)",
            );
            None
        }
    };
    if let Some(key) = &api_key {
        crate::net::secret::register_graph_secret(key);
    }
    let headers = read_headers(&mut r, base_dir);
    let timeout_ms = r.opt_u64("timeout_ms");
    if timeout_ms == Some(0) {
        r.error(Some("timeout_ms"), "must be more than 0");
    }
    let retry = read_retry(&mut r).build(DEFAULT_MAX_ATTEMPTS);
    let errors = r.finish("a provider");
    match base_url {
        Some(base_url) if errors.is_empty() => Ok(ProviderSpec {
            base_url,
            base_url_env,
            model_env,
            api_key,
            headers,
            timeout: timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_LLM_TIMEOUT),
            timeout_explicit: timeout_ms.is_some(),
            retry,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::error::GraphError;

    /// A graph with the provider `p` declared with the given fields (no node uses it).
    fn provider(fields: &str) -> String {
        format!(
            "entry = \"a\"\n[providers.p]\n{fields}\n\
             [[nodes]]\nid = \"a\"\ntype = \"clear_error\"\n"
        )
    }

    const URL: &str = "base_url = \"https://llm.example/v1\"";

    /// The one error of the provider `p` declared with `URL` and the given fields.
    fn provider_error(fields: &str) -> GraphError {
        let e = only_error(&provider(&format!("{URL}\n{fields}")));
        assert_eq!(e.node.as_deref(), Some("providers.p"), "{e:?}");
        e
    }

    #[test]
    fn a_provider_loads_with_its_defaults() {
        let g = load(&provider(URL)).unwrap();
        let p = &g.providers["p"];
        assert_eq!(p.base_url, "https://llm.example/v1");
        assert!(p.api_key.is_none());
        assert!(!p.timeout_explicit);
        assert_eq!(p.retry.max_attempts, 3);
    }

    #[test]
    fn a_provider_must_be_a_table() {
        let e = only_error(&provider("").replace("[providers.p]\n", "providers = { p = 1 }\n"));
        assert_eq!(e.node, None);
        assert_eq!(e.field.as_deref(), Some("providers.p"));
        assert_eq!(e.message, "must be a table, found a number");
    }

    #[test]
    fn a_provider_needs_a_usable_base_url() {
        let e = only_error(&provider("timeout_ms = 5"));
        assert_eq!(e.field.as_deref(), Some("base_url"));
        assert_eq!(e.message, "is required");
        let e = only_error(&provider("base_url = \"http://k:secret@h/v1\""));
        assert_eq!(e.field.as_deref(), Some("base_url"));
        assert_eq!(
            e.message,
            "credentials in the URL would end up in logs: use headers with env:/file: values"
        );
    }

    #[test]
    fn one_api_key_source() {
        let e = provider_error("api_key_env = \"K\"\napi_key_file = \"k.txt\"");
        assert_eq!(e.field.as_deref(), Some("api_key_env"));
        assert_eq!(
            e.message,
            "give either 'api_key_env' or 'api_key_file', not both"
        );
        for empty in ["api_key_env = \"\"", "api_key_file = \"\""] {
            let e = provider_error(empty);
            assert_eq!(e.field.as_deref(), Some("api_key_env"));
            assert_eq!(
                e.message,
                "must name an environment variable (api_key_env) or a file (api_key_file)"
            );
        }
    }

    #[test]
    fn call_settings_are_checked() {
        let e = provider_error("timeout_ms = 0");
        assert_eq!(e.field.as_deref(), Some("timeout_ms"));
        assert_eq!(e.message, "must be more than 0");
        let e = provider_error("max_attempts = 0");
        assert_eq!(e.field.as_deref(), Some("max_attempts"));
        assert_eq!(e.message, "must be between 1 and 20");
        let e = provider_error("headers = { \"a b\" = \"x\" }");
        assert_eq!(e.field.as_deref(), Some("headers"));
        assert_eq!(e.message, "'a b' is not a valid HTTP header name");
    }

    #[test]
    fn a_provider_rejects_unknown_fields() {
        let all = errors(&provider(&format!("{URL}\nmodel = \"m\"")));
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].field.as_deref(), Some("model"));
        assert_eq!(
            all[0].message,
            "unknown field for a provider (known: api_key_env, api_key_file, base_url, base_url_env, description, headers, max_attempts, model_env, retry_backoff_max_ms, retry_backoff_ms, timeout_ms)"
        );
    }
}
