//! Parsing and validation of graph files (TOML or JSON) into a [`Graph`].
//!
//! This module holds the entry points ([`load_graph_file`], [`parse_graph`]), the checks of the
//! graph as a whole (ids, entry, reachability) and the fields every node shares (`id`, `type`,
//! `next`). Each node kind reads its own fields in its own file (`set`, `router`, `tool`,
//! `human_jury`, `llm`, `reduce`, `batch`), and the declarations nodes refer to have theirs
//! (`tool_spec` and `http` for `[tools.NAME]`, `provider` for `[providers.NAME]`). A kind's
//! reader writes its errors into the node's [`FieldReader`], which every field of the node
//! table goes through, so that unknown fields are reported against all the fields read.

mod batch;
mod http;
mod human_jury;
mod llm;
mod provider;
mod reduce;
mod router;
mod set;
mod tool;
mod tool_spec;

use super::error::{GraphError, GraphErrors};
use super::model::*;
use super::reader::{kind, FieldReader};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;

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

/// The tools registered in the worker (Rust functions a graph may name): what loading checks a
/// graph's `tool` names against. The tool registry implements it; graph loading needs only
/// these two questions, so it does not depend on the tools themselves.
pub trait KnownTools {
    fn contains(&self, name: &str) -> bool;
    /// Every registered name, for the error that lists them.
    fn names(&self) -> Vec<&str>;
}

/// Reads, parses and validates a graph file.
pub fn load_graph_file(path: &Path, registry: &dyn KnownTools) -> Result<Graph, GraphErrors> {
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
    registry: &dyn KnownTools,
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
    registry: &dyn KnownTools,
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
            match tool_spec::parse_tool(file, tool_name, spec, registry, &base_dir) {
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
            match provider::parse_provider(file, provider_name, spec, &base_dir) {
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
        branch_of = batch::check_batches(file, &nodes, entry_idx, &mut errors);
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

/// What a node's fields may refer to: the other nodes (by id), the declared tools and
/// providers, and the tools registered in the worker.
pub(super) struct NodeContext<'a> {
    pub index: &'a HashMap<String, usize>,
    pub tools: &'a BTreeMap<String, ToolSpec>,
    pub providers: &'a BTreeSet<String>,
    pub registry: &'a dyn KnownTools,
}

impl NodeContext<'_> {
    /// The index of the node `value` names; an id no node has is reported on `field`.
    pub fn target(
        &self,
        r: &mut FieldReader,
        field: &'static str,
        value: Option<String>,
    ) -> Option<usize> {
        let v = value?;
        match self.index.get(&v) {
            Some(i) => Some(*i),
            None => {
                r.error(Some(field), format!("no node has id '{v}'"));
                None
            }
        }
    }

    /// The optional `error` field: where the run goes when the node fails.
    pub fn error_target(&self, r: &mut FieldReader) -> Option<usize> {
        let error = r.opt_str("error");
        self.target(r, "error", error)
    }
}

const NODE_TYPES: &str = "set, router, tool, clear_error, human_jury, llm, batch, reduce";

fn parse_node(
    file: &str,
    id: &str,
    raw: &Value,
    index: &HashMap<String, usize>,
    tools: &BTreeMap<String, ToolSpec>,
    providers: &BTreeSet<String>,
    registry: &dyn KnownTools,
) -> Result<Node, Vec<GraphError>> {
    let Value::Object(map) = raw else {
        return Err(vec![GraphError {
            file: file.to_string(),
            node: Some(id.to_string()),
            field: None,
            message: format!("a node must be a table, found {}", kind(raw)),
        }]);
    };
    let ctx = NodeContext {
        index,
        tools,
        providers,
        registry,
    };
    let mut r = FieldReader::new(file, Some(id.to_string()), map);
    let _ = r.req_str("id");
    let _ = r.opt_str("description");
    let type_name = r.req_str("type");
    let kind = match type_name.as_deref() {
        Some("set") => set::set_node(&mut r),
        Some("router") => router::router_node(&mut r, &ctx),
        Some("tool") => tool::tool_node(&mut r, &ctx),
        Some("clear_error") => set::clear_error_node(),
        Some("human_jury") => human_jury::human_jury_node(&mut r),
        Some("llm") => llm::llm_node(&mut r, &ctx),
        Some("reduce") => reduce::reduce_node(&mut r, &ctx),
        Some("batch") => batch::batch_node(&mut r, &ctx),
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
            let n = r.opt_str("next");
            ctx.target(&mut r, "next", n)
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

#[cfg(test)]
mod tests;
