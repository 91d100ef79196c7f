//! Parsing and validation of graph files (TOML or JSON) into a [`Graph`].

use super::error::{GraphError, GraphErrors};
use super::expr::Expr;
use super::model::*;
use super::reader::{kind, FieldReader};
use super::template::Template;
use crate::net::secret::ValueSpec;
use crate::net::{HeaderSpec, RetrySpec, SecretRef};
use crate::tools::Registry;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The two syntaxes of the same structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Toml,
    Json,
}

impl Syntax {
    pub fn from_path(path: &Path) -> Syntax {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Syntax::Json,
            _ => Syntax::Toml,
        }
    }
}

/// Reads, parses and validates a graph file.
pub fn load_graph_file(path: &Path, registry: &Registry) -> Result<Graph, GraphErrors> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        GraphErrors(vec![GraphError {
            file: file.clone(),
            node: None,
            field: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("graph")
        .to_string();
    parse_graph(&bytes, Syntax::from_path(path), path, &stem, registry)
}

/// Parses and validates graph source text; `default_name` is used when the file has no `name`.
pub fn parse_graph(
    bytes: &[u8],
    syntax: Syntax,
    path: &Path,
    default_name: &str,
    registry: &Registry,
) -> Result<Graph, GraphErrors> {
    let file = path.display().to_string();
    let top_error = |message: String| {
        GraphErrors(vec![GraphError {
            file: file.clone(),
            node: None,
            field: None,
            message,
        }])
    };
    let text = std::str::from_utf8(bytes).map_err(|e| top_error(format!("not UTF-8: {e}")))?;
    let doc: Value = match syntax {
        Syntax::Toml => {
            toml::from_str(text).map_err(|e| top_error(format!("invalid TOML: {e}")))?
        }
        Syntax::Json => {
            serde_json::from_str(text).map_err(|e| top_error(format!("invalid JSON: {e}")))?
        }
    };
    let Value::Object(top) = doc else {
        return Err(top_error(format!(
            "the graph must be a table/object, found {}",
            kind(&doc)
        )));
    };
    let digest = hex::encode(Sha256::digest(bytes));
    build(&top, &file, path, default_name, digest, registry)
}

fn build(
    top: &Map<String, Value>,
    file: &str,
    path: &Path,
    default_name: &str,
    digest: String,
    registry: &Registry,
) -> Result<Graph, GraphErrors> {
    let mut r = FieldReader::new(file, None, top);
    let name = r
        .opt_str("name")
        .unwrap_or_else(|| default_name.to_string());
    let _description = r.opt_str("description");
    let entry = match (r.opt_str("entry"), r.opt_str("entry_point")) {
        (Some(e), None) | (None, Some(e)) => Some(e),
        (Some(_), Some(_)) => {
            r.error(
                Some("entry"),
                "give either 'entry' or 'entry_point', not both",
            );
            None
        }
        (None, None) => {
            r.error(Some("entry"), "is required (the id of the first node)");
            None
        }
    };
    let max_steps = r.opt_u64("max_steps").unwrap_or(DEFAULT_MAX_STEPS);
    let max_node_fatigue = r
        .opt_u64("max_node_fatigue")
        .unwrap_or(DEFAULT_MAX_NODE_FATIGUE);
    for (field, v) in [
        ("max_steps", max_steps),
        ("max_node_fatigue", max_node_fatigue),
    ] {
        if v > MAX_STEPS_LIMIT {
            r.error(
                Some(field),
                format!("{v} is more than {MAX_STEPS_LIMIT} (a run keeps every step in memory and in its log)"),
            );
        }
    }
    let tools_table = r.opt_table("tools");
    let providers_table = r.opt_table("providers");
    let nodes_raw = match r.value("nodes") {
        Some(Value::Array(items)) => items.as_slice(),
        Some(other) => {
            r.error(
                Some("nodes"),
                format!("must be a list of node tables, found {}", kind(other)),
            );
            &[]
        }
        None => {
            r.error(Some("nodes"), "is required (a list of node tables)");
            &[]
        }
    };
    let mut errors = r.finish("a graph");

    // Tools first: nodes refer to them.
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut tools = BTreeMap::new();
    if let Some(table) = tools_table {
        for (tool_name, spec) in table {
            match parse_tool(file, tool_name, spec, registry, &base_dir) {
                Ok(spec) => {
                    tools.insert(tool_name.clone(), spec);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
    }

    let mut providers = BTreeMap::new();
    if let Some(table) = providers_table {
        for (provider_name, spec) in table {
            match parse_provider(file, provider_name, spec, &base_dir) {
                Ok(spec) => {
                    providers.insert(provider_name.clone(), spec);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
    }
    // Declared, valid or not: a node naming a broken provider gets no second error.
    let declared_providers: BTreeSet<String> = providers_table
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();

    // Pass 1: ids.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut ids: Vec<String> = Vec::with_capacity(nodes_raw.len());
    for (i, raw) in nodes_raw.iter().enumerate() {
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("#{}", i + 1));
        if index.insert(id.clone(), i).is_some() {
            errors.push(GraphError {
                file: file.to_string(),
                node: Some(id.clone()),
                field: Some("id".into()),
                message: "duplicate id".into(),
            });
        }
        ids.push(id);
    }

    // Pass 2: each node's fields.
    let mut nodes = Vec::with_capacity(nodes_raw.len());
    for (raw, id) in nodes_raw.iter().zip(&ids) {
        match parse_node(file, id, raw, &index, &tools, &declared_providers, registry) {
            Ok(node) => nodes.push(node),
            // Never drop a node without saying why: the indexes of the nodes after it would
            // shift, and the graph would run (or fail) as another one.
            Err(e) if e.is_empty() => errors.push(GraphError {
                file: file.to_string(),
                node: Some(id.clone()),
                field: None,
                message: "this node could not be read".into(),
            }),
            Err(mut e) => errors.append(&mut e),
        }
    }

    let entry_idx = entry.as_ref().and_then(|e| {
        let found = index.get(e).copied();
        if found.is_none() {
            errors.push(GraphError {
                file: file.to_string(),
                node: None,
                field: Some("entry".into()),
                message: format!("no node has id '{e}'"),
            });
        }
        found
    });

    let mut branch_of = HashMap::new();
    if errors.is_empty() {
        branch_of = check_batches(file, &nodes, entry_idx, &mut errors);
    }
    if errors.is_empty() {
        if let Some(entry_idx) = entry_idx {
            for unreachable in unreachable_nodes(&nodes, entry_idx) {
                errors.push(GraphError {
                    file: file.to_string(),
                    node: Some(nodes[unreachable].id.clone()),
                    field: None,
                    message: format!(
                        "can never be reached from the entry '{}'",
                        nodes[entry_idx].id
                    ),
                });
            }
        }
    }
    match entry_idx {
        Some(entry) if errors.is_empty() => Ok(Graph {
            name,
            digest,
            source: path.to_path_buf(),
            entry,
            nodes,
            index,
            tools,
            providers,
            branch_of,
            max_steps,
            max_node_fatigue,
        }),
        _ => Err(GraphErrors(errors)),
    }
}

fn parse_tool(
    file: &str,
    name: &str,
    spec: &Value,
    registry: &Registry,
    base_dir: &Path,
) -> Result<ToolSpec, Vec<GraphError>> {
    let Value::Object(map) = spec else {
        return Err(vec![GraphError {
            file: file.to_string(),
            node: None,
            field: Some(format!("tools.{name}")),
            message: format!("must be a table, found {}", kind(spec)),
        }]);
    };
    let mut r = FieldReader::new(file, Some(format!("tools.{name}")), map);
    let command = r.str_list("command");
    let builtin = r.opt_str("builtin");
    let http = r.opt_table("http");
    let timeout_ms = r.opt_u64("timeout_ms");
    let cwd = r.opt_str("cwd").map(PathBuf::from);
    let _description = r.opt_str("description");
    let mut env = BTreeMap::new();
    for (var, value) in r.opt_str_table("env") {
        match ValueSpec::parse(&format!("env {var}"), &value, base_dir) {
            Ok(v) => {
                env.insert(var, v);
            }
            Err(msg) => r.error(Some("env"), msg),
        }
    }
    if timeout_ms == Some(0) {
        r.error(Some("timeout_ms"), "must be more than 0");
    }
    let mut http_errors = Vec::new();
    let spec = match (command, builtin, http) {
        (Some(argv), None, None) => {
            if argv.is_empty() || argv[0].is_empty() {
                r.error(
                    Some("command"),
                    "must name a program: [\"program\", \"arg\", ...]",
                );
            }
            Some(ToolSpec::Command {
                argv,
                timeout: timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_TOOL_TIMEOUT),
                timeout_explicit: timeout_ms.is_some(),
                env,
                cwd,
            })
        }
        (None, Some(builtin), None) => {
            // A registered tool is a Rust function called in the worker's process: nothing
            // can cut it off, and it has no program to start. A setting it would ignore is an
            // error, not a promise the worker does not keep.
            if timeout_ms.is_some() {
                r.error(
                    Some("timeout_ms"),
                    "only applies to 'command' and 'http' tools: a 'builtin' tool runs in the worker's process and cannot be cut off",
                );
            }
            if cwd.is_some() || !env.is_empty() {
                r.error(
                    Some(if cwd.is_some() { "cwd" } else { "env" }),
                    "only applies to 'command' tools",
                );
            }
            if !registry.contains(&builtin) {
                r.error(
                    Some("builtin"),
                    format!(
                        "no registered tool '{builtin}' (registered: {})",
                        registry.names().join(", ")
                    ),
                );
            }
            Some(ToolSpec::Registered { name: builtin })
        }
        (None, None, Some(http)) => {
            if cwd.is_some() || !env.is_empty() {
                r.error(
                    Some(if cwd.is_some() { "cwd" } else { "env" }),
                    "only applies to 'command' tools",
                );
            }
            let idempotent = r.opt_bool("idempotent");
            let retry_fields = read_retry(&mut r);
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
            http_errors = h.finish("an http tool's 'http' table");
            // RFC 9110: GET, PUT and DELETE are idempotent; POST and PATCH are not.
            let idempotent =
                idempotent.unwrap_or(matches!(method.as_str(), "GET" | "PUT" | "DELETE"));
            let default_attempts = if idempotent { DEFAULT_MAX_ATTEMPTS } else { 1 };
            let retry = retry_fields.build(default_attempts);
            if !idempotent && retry.max_attempts > 1 {
                r.error(
                    Some("max_attempts"),
                    "a non-idempotent HTTP tool is never retried: set idempotent = true if repeating the call is harmless, or drop max_attempts",
                );
            }
            url.map(|url| {
                ToolSpec::Http(HttpToolSpec {
                    url,
                    method,
                    headers,
                    timeout: timeout_ms
                        .map(Duration::from_millis)
                        .unwrap_or(DEFAULT_TOOL_TIMEOUT),
                    timeout_explicit: timeout_ms.is_some(),
                    idempotent,
                    retry,
                })
            })
        }
        (None, None, None) => {
            r.error(
                None,
                "needs 'command' (an external program), 'http' (an endpoint) or 'builtin' (a registered Rust tool)",
            );
            None
        }
        _ => {
            r.error(None, "give exactly one of 'command', 'http' and 'builtin'");
            None
        }
    };
    let mut errors = r.finish("a tool");
    errors.append(&mut http_errors);
    match spec {
        Some(spec) if errors.is_empty() => Ok(spec),
        _ => Err(errors),
    }
}

/// `max_attempts`, `retry_backoff_ms`, `retry_backoff_max_ms`, read before the default is known.
struct RetryFields {
    max_attempts: Option<u64>,
    backoff_ms: u64,
    backoff_max_ms: u64,
}

impl RetryFields {
    fn build(&self, default_attempts: u32) -> RetrySpec {
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

fn read_retry(r: &mut FieldReader) -> RetryFields {
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
fn check_url(r: &mut FieldReader, field: &'static str, url: &str) {
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

fn read_headers(r: &mut FieldReader, base_dir: &Path) -> Vec<HeaderSpec> {
    let mut out = Vec::new();
    for (name, value) in r.opt_str_table("headers") {
        match HeaderSpec::parse(&name, &value, base_dir) {
            Ok(h) => out.push(h),
            Err(msg) => r.error(Some("headers"), msg),
        }
    }
    out
}

fn parse_provider(
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

fn read_template(r: &mut FieldReader, field: &'static str, required: bool) -> Option<Template> {
    let src = if required {
        r.req_str(field)
    } else {
        r.opt_str(field)
    }?;
    match Template::parse(&src) {
        Ok(t) => Some(t),
        Err(msg) => {
            r.error(Some(field), msg);
            None
        }
    }
}

/// The fields `llm` and `reduce` nodes share. `default_prompt` is used when `prompt` is absent
/// (only reductions have one).
fn read_llm_spec(
    r: &mut FieldReader,
    providers: &BTreeSet<String>,
    default_prompt: Option<String>,
) -> Option<LlmSpec> {
    let provider = r.req_str("provider");
    if let Some(p) = &provider {
        if !providers.contains(p) {
            let declared: Vec<&str> = providers.iter().map(String::as_str).collect();
            r.error(
                Some("provider"),
                format!(
                    "unknown provider '{p}': declare it under [providers.{p}] (declared: {})",
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.join(", ")
                    }
                ),
            );
        }
    }
    let model = r.req_str("model");
    if model.as_deref() == Some("") {
        r.error(Some("model"), "must not be empty");
    }
    let fallbacks = r.str_list("fallbacks").unwrap_or_default();
    if fallbacks.iter().any(String::is_empty) {
        r.error(Some("fallbacks"), "model names must not be empty");
    }
    let prompt = match default_prompt {
        Some(default) if !r.has("prompt") => match Template::parse(&default) {
            Ok(t) => Some(t),
            Err(e) => {
                r.error(
                    Some("keys"),
                    format!("the default prompt cannot name these keys ({e}): give the node its own 'prompt'"),
                );
                None
            }
        },
        _ => read_template(r, "prompt", true),
    };
    let system = read_template(r, "system", false);
    let temperature = r.opt_f64("temperature");
    if temperature.is_some_and(|t| t < 0.0) {
        r.error(Some("temperature"), "must not be negative");
    }
    let max_tokens = r.opt_u64("max_tokens");
    if max_tokens == Some(0) {
        r.error(Some("max_tokens"), "must be more than 0");
    }
    let json = match r.opt_str("response_format").as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            r.error(
                Some("response_format"),
                format!("'{other}' is not a response format (text, json)"),
            );
            false
        }
    };
    Some(LlmSpec {
        provider: provider?,
        model: model?,
        fallbacks,
        prompt: prompt?,
        system,
        temperature,
        max_tokens,
        json,
    })
}

const NODE_TYPES: &str = "set, router, tool, clear_error, human_jury, llm, batch, reduce";

fn parse_node(
    file: &str,
    id: &str,
    raw: &Value,
    index: &HashMap<String, usize>,
    tools: &BTreeMap<String, ToolSpec>,
    providers: &BTreeSet<String>,
    registry: &Registry,
) -> Result<Node, Vec<GraphError>> {
    let Value::Object(map) = raw else {
        return Err(vec![GraphError {
            file: file.to_string(),
            node: Some(id.to_string()),
            field: None,
            message: format!("a node must be a table, found {}", kind(raw)),
        }]);
    };
    let mut r = FieldReader::new(file, Some(id.to_string()), map);
    let _ = r.req_str("id");
    let _ = r.opt_str("description");
    let type_name = r.req_str("type");
    let target =
        |r: &mut FieldReader, field: &'static str, value: Option<String>| -> Option<usize> {
            let v = value?;
            match index.get(&v) {
                Some(i) => Some(*i),
                None => {
                    r.error(Some(field), format!("no node has id '{v}'"));
                    None
                }
            }
        };
    let next_name = |r: &mut FieldReader| r.opt_str("next");
    let kind = match type_name.as_deref() {
        Some("set") => {
            let key = r.req_str("key");
            let value = r.value("value").cloned();
            if value.is_none() {
                r.error(Some("value"), "is required");
            }
            key.zip(value)
                .map(|(key, value)| NodeKind::Set { key, value })
        }
        Some("router") => {
            let on = r.opt_str("on");
            let when = r.opt_str("when");
            let selector = match (on, when) {
                (Some(k), None) => Some(RouteSelector::Key(k)),
                (None, Some(src)) => match Expr::compile(&src) {
                    Ok(e) => Some(RouteSelector::Expr(e)),
                    Err(msg) => {
                        r.error(
                            Some("when"),
                            format!("the expression does not parse: {msg}"),
                        );
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    r.error(
                        Some("on"),
                        "give either 'on' (a state key) or 'when' (an expression), not both",
                    );
                    None
                }
                (None, None) => {
                    r.error(
                        Some("on"),
                        "a router needs 'on' (a state key) or 'when' (a CEL expression)",
                    );
                    None
                }
            };
            let mut routes = Vec::new();
            match r.opt_table("routes") {
                Some(table) => {
                    for (key, dest) in table {
                        match dest.as_str() {
                            Some(d) => match index.get(d) {
                                Some(i) => routes.push((key.clone(), *i)),
                                None => r.error(
                                    Some("routes"),
                                    format!("route '{key}' goes to '{d}': no node has that id"),
                                ),
                            },
                            None => r.error(
                                Some("routes"),
                                format!("route '{key}' must name a node id"),
                            ),
                        }
                    }
                }
                None => r.error(Some("routes"), "is required (route key = node id)"),
            }
            let default = r.opt_str("default");
            let default = target(&mut r, "default", default);
            selector.map(|selector| NodeKind::Router {
                selector,
                routes,
                default,
            })
        }
        Some("tool") => {
            let tool = r.req_str("tool");
            let inputs = r.str_list("inputs").unwrap_or_default();
            let output = r.opt_str("output");
            let error = r.opt_str("error");
            let error = target(&mut r, "error", error);
            if let Some(t) = &tool {
                if !tools.contains_key(t) && !registry.contains(t) {
                    let declared: Vec<&str> = tools.keys().map(String::as_str).collect();
                    r.error(
                        Some("tool"),
                        format!(
                            "unknown tool '{t}': declare it under [tools.{t}] (declared: {}; registered: {})",
                            if declared.is_empty() { "none".to_string() } else { declared.join(", ") },
                            registry.names().join(", ")
                        ),
                    );
                }
            }
            tool.map(|tool| NodeKind::Tool {
                tool,
                inputs,
                output,
                error,
            })
        }
        Some("clear_error") => Some(NodeKind::ClearError),
        Some("human_jury") => {
            let prompt = r.req_str("prompt");
            let choices = r.str_list("choices");
            if choices.as_ref().is_none_or(|c| c.is_empty()) {
                r.error(
                    Some("choices"),
                    "is required: a non-empty list of allowed decisions",
                );
            }
            let output = r
                .opt_str("output")
                .unwrap_or_else(|| "jury_decision".to_string());
            let context = r.str_list("context").unwrap_or_default();
            let expiry = match (r.opt_u64("expires_after_ms"), r.opt_str("on_expiry")) {
                (Some(after_ms), Some(choice)) => {
                    if !choices.as_ref().is_some_and(|c| c.contains(&choice)) {
                        r.error(
                            Some("on_expiry"),
                            format!("'{choice}' is not one of the node's choices"),
                        );
                    }
                    Some(JuryExpiry { after_ms, choice })
                }
                (None, None) => None,
                _ => {
                    r.error(Some("expires_after_ms"), "give both 'expires_after_ms' and 'on_expiry' (the default choice), or neither");
                    None
                }
            };
            prompt
                .zip(choices)
                .map(|(prompt, choices)| NodeKind::HumanJury {
                    prompt,
                    choices,
                    output,
                    context,
                    expiry,
                })
        }
        Some("llm") => {
            let llm = read_llm_spec(&mut r, providers, None);
            let output = r.req_str("output");
            let error = r.opt_str("error");
            let error = target(&mut r, "error", error);
            llm.zip(output)
                .map(|(llm, output)| NodeKind::Llm { llm, output, error })
        }
        Some("reduce") => {
            let keys = r.str_list("keys").unwrap_or_default();
            if keys.is_empty() {
                r.error(
                    Some("keys"),
                    "is required: the non-empty list of state keys to summarise (and remove)",
                );
            }
            let default_prompt = default_reduce_prompt(&keys);
            let llm = read_llm_spec(&mut r, providers, Some(default_prompt));
            if let Some(llm) = &llm {
                let used = llm.prompt.keys();
                if !keys.is_empty() && !keys.iter().any(|k| used.contains(&k.as_str())) {
                    r.error(
                        Some("prompt"),
                        format!(
                            "uses none of the keys it reduces ({}): add placeholders such as {{{}}}, or drop 'prompt' for the default",
                            keys.join(", "),
                            keys[0]
                        ),
                    );
                }
            }
            let output = r.req_str("output");
            if let Some(o) = &output {
                if keys.contains(o) {
                    r.error(
                        Some("output"),
                        format!("'{o}' is also in 'keys': the summary would be removed"),
                    );
                }
            }
            let error = r.opt_str("error");
            let error = target(&mut r, "error", error);
            match (llm, output) {
                (Some(llm), Some(output)) if !keys.is_empty() => Some(NodeKind::Reduce {
                    llm,
                    keys,
                    output,
                    error,
                }),
                _ => None,
            }
        }
        Some("batch") => {
            let mut branches = Vec::new();
            match r.value("branches") {
                Some(Value::Array(items)) if !items.is_empty() => {
                    for (b, item) in items.iter().enumerate() {
                        let ids = match item {
                            Value::Array(ids) if !ids.is_empty() => ids,
                            _ => {
                                r.error(
                                    Some("branches"),
                                    format!("branch {} must be a non-empty list of node ids", b + 1),
                                );
                                continue;
                            }
                        };
                        let mut chain = Vec::with_capacity(ids.len());
                        for v in ids {
                            match v.as_str().map(|s| (s, index.get(s))) {
                                Some((_, Some(i))) => chain.push(*i),
                                Some((s, None)) => r.error(
                                    Some("branches"),
                                    format!("branch {}: no node has id '{s}'", b + 1),
                                ),
                                None => r.error(
                                    Some("branches"),
                                    format!("branch {}: node ids must be strings", b + 1),
                                ),
                            }
                        }
                        branches.push(chain);
                    }
                }
                _ => r.error(
                    Some("branches"),
                    "is required: a non-empty list of branches, each a list of node ids ([[\"a\", \"b\"], [\"c\"]])",
                ),
            }
            let error = r.opt_str("error");
            let error = target(&mut r, "error", error);
            Some(NodeKind::Batch { branches, error })
        }
        Some(other) => {
            r.error(
                Some("type"),
                format!("unknown node type '{other}' (known: {NODE_TYPES})"),
            );
            None
        }
        None => None,
    };
    // By the type, not by whether the node parsed: a set node missing its `value` still has a
    // valid `next` (and a wrong target in it is worth reporting).
    let known_type = type_name
        .as_deref()
        .is_some_and(|t| NODE_TYPES.split(", ").any(|k| k == t));
    let next = match type_name.as_deref() {
        Some("router") => None,
        _ if known_type => {
            let n = next_name(&mut r);
            target(&mut r, "next", n)
        }
        _ => None,
    };
    let what = format!("a {} node", type_name.as_deref().unwrap_or("typeless"));
    // Without a known type nobody knows which fields belong: report the type alone.
    let errors = if known_type {
        r.finish(&what)
    } else {
        r.errors
    };
    match kind {
        Some(kind) if errors.is_empty() => Ok(Node {
            id: id.to_string(),
            kind,
            next,
        }),
        _ => Err(errors),
    }
}

/// Successors of a node, for reachability and the manifest.
pub fn successors(node: &Node) -> Vec<usize> {
    let mut out: Vec<usize> = node.next.into_iter().collect();
    match &node.kind {
        NodeKind::Router {
            routes, default, ..
        } => {
            out.extend(routes.iter().map(|(_, i)| *i));
            out.extend(default.iter().copied());
        }
        other => out.extend(other.error_target()),
    }
    out
}

fn unreachable_nodes(nodes: &[Node], entry: usize) -> Vec<usize> {
    let mut seen = vec![false; nodes.len()];
    let mut queue = VecDeque::from([entry]);
    seen[entry] = true;
    while let Some(i) = queue.pop_front() {
        let mut next = successors(&nodes[i]);
        if let NodeKind::Batch { branches, .. } = &nodes[i].kind {
            next.extend(branches.iter().flatten().copied());
        }
        for s in next {
            if !seen[s] {
                seen[s] = true;
                queue.push_back(s);
            }
        }
    }
    (0..nodes.len()).filter(|i| !seen[*i]).collect()
}

/// The default prompt of a `reduce` node without one.
fn default_reduce_prompt(keys: &[String]) -> String {
    let mut p = String::from(
        "Summarise the following information concisely, keeping every fact needed later.\n",
    );
    for k in keys {
        let escaped = k.replace('{', "{{").replace('}', "}}");
        p.push_str(&format!("\n{escaped}:\n{{{k}}}\n"));
    }
    p
}

/// Checks batch branches: each branch node exists once in one branch, is of a kind that can run
/// there, has no `next`/`error` of its own (the branch order decides), and nothing else leads
/// to it. Returns where every branch node runs.
fn check_batches(
    file: &str,
    nodes: &[Node],
    entry: Option<usize>,
    errors: &mut Vec<GraphError>,
) -> HashMap<usize, BranchPos> {
    let mut branch_of: HashMap<usize, BranchPos> = HashMap::new();
    let mut err = |node: &str, field: Option<&str>, message: String| {
        errors.push(GraphError {
            file: file.to_string(),
            node: Some(node.to_string()),
            field: field.map(str::to_string),
            message,
        })
    };
    for (b_idx, batch) in nodes.iter().enumerate() {
        let NodeKind::Batch { branches, .. } = &batch.kind else {
            continue;
        };
        for (branch, chain) in branches.iter().enumerate() {
            for (position, &n) in chain.iter().enumerate() {
                let node = &nodes[n];
                let here = format!("branch {}", branch + 1);
                if n == b_idx {
                    err(
                        &batch.id,
                        Some("branches"),
                        format!("{here}: a batch cannot run itself"),
                    );
                    continue;
                }
                if let Some(prev) = branch_of.get(&n) {
                    err(
                        &batch.id,
                        Some("branches"),
                        format!(
                            "{here}: '{}' already runs in batch '{}' branch {}; a node can be in one branch only",
                            node.id,
                            nodes[prev.batch].id,
                            prev.branch + 1
                        ),
                    );
                    continue;
                }
                branch_of.insert(
                    n,
                    BranchPos {
                        batch: b_idx,
                        branch,
                        position,
                    },
                );
                match &node.kind {
                    NodeKind::Set { .. }
                    | NodeKind::Tool { .. }
                    | NodeKind::ClearError
                    | NodeKind::Llm { .. }
                    | NodeKind::Reduce { .. } => {}
                    other => err(
                        &node.id,
                        Some("type"),
                        format!(
                            "a {} node cannot run inside batch '{}' (branches may hold set, tool, clear_error, llm and reduce nodes)",
                            other.type_name(),
                            batch.id
                        ),
                    ),
                }
                if node.next.is_some() {
                    err(
                        &node.id,
                        Some("next"),
                        format!(
                            "runs inside batch '{}' ({here}), where the branch list decides the order: remove 'next'",
                            batch.id
                        ),
                    );
                }
                if node.kind.error_target().is_some() {
                    err(
                        &node.id,
                        Some("error"),
                        format!(
                            "runs inside batch '{}' ({here}): a failure stops the branch and the batch's own 'error' handles it; remove 'error'",
                            batch.id
                        ),
                    );
                }
            }
        }
    }
    for node in nodes {
        for s in successors(node) {
            if let Some(pos) = branch_of.get(&s) {
                err(
                    &node.id,
                    None,
                    format!(
                        "leads to '{}', which runs only inside batch '{}' (branch {}); branch nodes cannot be reached otherwise",
                        nodes[s].id,
                        nodes[pos.batch].id,
                        pos.branch + 1
                    ),
                );
            }
        }
    }
    if let Some(e) = entry.filter(|e| branch_of.contains_key(e)) {
        errors.push(GraphError {
            file: file.to_string(),
            node: None,
            field: Some("entry".into()),
            message: format!(
                "'{}' runs inside a batch branch and cannot be the entry",
                nodes[e].id
            ),
        });
    }
    branch_of
}
