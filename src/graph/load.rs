//! Parsing and validation of graph files (TOML or JSON) into a [`Graph`].

use super::error::{GraphError, GraphErrors};
use super::expr::Expr;
use super::model::*;
use super::reader::{kind, FieldReader};
use crate::tools::Registry;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};
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
    let tools_table = r.opt_table("tools");
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
        match parse_node(file, id, raw, &index, &tools, registry) {
            Ok(node) => nodes.push(node),
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
    _base_dir: &Path,
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
    let timeout_ms = r.opt_u64("timeout_ms");
    let cwd = r.opt_str("cwd").map(PathBuf::from);
    let _description = r.opt_str("description");
    let mut env = BTreeMap::new();
    if let Some(table) = r.opt_table("env") {
        for (k, v) in table {
            match v {
                Value::String(s) => {
                    env.insert(k.clone(), s.clone());
                }
                other => r.error(
                    Some("env"),
                    format!("'{k}' must be a string, found {}", kind(other)),
                ),
            }
        }
    }
    let spec = match (command, builtin) {
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                r.error(
                    Some("command"),
                    "must name a program: [\"program\", \"arg\", ...]",
                );
            }
            if timeout_ms == Some(0) {
                r.error(Some("timeout_ms"), "must be more than 0");
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
        (None, Some(builtin)) => {
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
        (Some(_), Some(_)) => {
            r.error(None, "give either 'command' or 'builtin', not both");
            None
        }
        (None, None) => {
            r.error(
                None,
                "needs 'command' (an external program) or 'builtin' (a registered Rust tool)",
            );
            None
        }
    };
    let errors = r.finish("a tool");
    match spec {
        Some(spec) if errors.is_empty() => Ok(spec),
        _ => Err(errors),
    }
}

const NODE_TYPES: &str = "set, router, tool, clear_error, human_jury";

fn parse_node(
    file: &str,
    id: &str,
    raw: &Value,
    index: &HashMap<String, usize>,
    tools: &BTreeMap<String, ToolSpec>,
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
        Some(other) => {
            r.error(
                Some("type"),
                format!("unknown node type '{other}' (known: {NODE_TYPES})"),
            );
            None
        }
        None => None,
    };
    let next = match &kind {
        Some(NodeKind::Router { .. }) | None => None,
        Some(_) => {
            let n = next_name(&mut r);
            target(&mut r, "next", n)
        }
    };
    let what = format!("a {} node", type_name.as_deref().unwrap_or("typeless"));
    let errors = r.finish(&what);
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
        NodeKind::Tool { error, .. } => out.extend(error.iter().copied()),
        _ => {}
    }
    out
}

fn unreachable_nodes(nodes: &[Node], entry: usize) -> Vec<usize> {
    let mut seen = vec![false; nodes.len()];
    let mut queue = VecDeque::from([entry]);
    seen[entry] = true;
    while let Some(i) = queue.pop_front() {
        for s in successors(&nodes[i]) {
            if !seen[s] {
                seen[s] = true;
                queue.push_back(s);
            }
        }
    }
    (0..nodes.len()).filter(|i| !seen[*i]).collect()
}
