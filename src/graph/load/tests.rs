//! Unit tests of the graph-wide checks (syntax, top-level fields, ids, entry, reachability),
//! and the helpers the node kinds' tests load their graphs with.

use super::*;
use crate::graph::Graph;

/// The tools registered in the tests' worker.
pub(super) const REGISTERED: &str = "echo, shout";

/// Tools known by name, as the worker's registry answers.
struct Registered(&'static [&'static str]);

impl KnownTools for Registered {
    fn contains(&self, name: &str) -> bool {
        self.0.contains(&name)
    }
    fn names(&self) -> Vec<&str> {
        self.0.to_vec()
    }
}

fn registry() -> Registered {
    Registered(&["echo", "shout"])
}

/// Loads TOML graph text as the file `g.toml`.
pub(super) fn load(toml: &str) -> Result<Graph, GraphErrors> {
    parse_graph(
        toml.as_bytes(),
        Syntax::Toml,
        Path::new("g.toml"),
        "g",
        &registry(),
    )
}

/// Every error of a graph that must not load.
pub(super) fn errors(toml: &str) -> Vec<GraphError> {
    match load(toml) {
        Ok(g) => panic!("the graph loaded: {g:?}"),
        Err(e) => e.0,
    }
}

/// The one error of a graph that must not load, for one reason.
pub(super) fn only_error(toml: &str) -> GraphError {
    let mut all = errors(toml);
    assert_eq!(all.len(), 1, "expected exactly one error: {all:#?}");
    let e = all.remove(0);
    assert_eq!(e.file, "g.toml");
    e
}

/// A valid graph of one node, `a`.
const ONE: &str = "[[nodes]]\nid = \"a\"\ntype = \"clear_error\"\n";

fn top_error(e: &GraphError) -> (Option<&str>, &str) {
    assert_eq!(e.node, None, "{e:?}");
    (e.field.as_deref(), e.message.as_str())
}

#[test]
fn a_graph_loads_with_its_defaults() {
    let g = load(&format!("entry = \"a\"\n{ONE}")).unwrap();
    assert_eq!(g.name, "g");
    assert_eq!(g.entry, 0);
    assert_eq!(g.max_steps, DEFAULT_MAX_STEPS);
    assert_eq!(g.max_node_fatigue, DEFAULT_MAX_NODE_FATIGUE);
    assert_eq!(g.digest.len(), 64);
    let g = load(&format!(
        "name = \"n\"\nentry_point = \"a\"\nmax_steps = 5\n{ONE}"
    ))
    .unwrap();
    assert_eq!(g.name, "n");
    assert_eq!(g.max_steps, 5);
}

#[test]
fn text_that_does_not_parse() {
    let bad = |bytes: &[u8], syntax| {
        let e = parse_graph(bytes, syntax, Path::new("g"), "g", &registry()).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].node.clone(), e.0[0].field.clone()), (None, None));
        e.0[0].message.clone()
    };
    assert!(bad(b"\xff", Syntax::Toml).starts_with("not UTF-8: "));
    assert!(bad(b"entry = ", Syntax::Toml).starts_with("invalid TOML: "));
    assert!(bad(b"{", Syntax::Json).starts_with("invalid JSON: "));
    assert_eq!(
        bad(b"[1]", Syntax::Json),
        "the graph must be a table/object, found a list"
    );
}

#[test]
fn a_file_that_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let e = load_graph_file(&path, &registry()).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].file, path.display().to_string());
    assert!(e.0[0].message.starts_with("cannot read: "), "{e}");
}

#[test]
fn the_syntax_follows_the_extension() {
    assert_eq!(Syntax::from_path(Path::new("g.json")), Syntax::Json);
    assert_eq!(Syntax::from_path(Path::new("g.toml")), Syntax::Toml);
    assert_eq!(Syntax::from_path(Path::new("g")), Syntax::Toml);
}

#[test]
fn the_entry_is_checked() {
    let e = only_error(ONE);
    assert_eq!(
        top_error(&e),
        (Some("entry"), "is required (the id of the first node)")
    );
    let e = only_error(&format!("entry = \"a\"\nentry_point = \"a\"\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (
            Some("entry"),
            "give either 'entry' or 'entry_point', not both"
        )
    );
    let e = only_error(&format!("entry = \"b\"\n{ONE}"));
    assert_eq!(top_error(&e), (Some("entry"), "no node has id 'b'"));
    let all = errors(&format!("entry = 1\n{ONE}"));
    assert_eq!(
        top_error(&all[0]),
        (Some("entry"), "must be a string, found a number")
    );
    assert_eq!(
        top_error(&all[1]),
        (Some("entry"), "is required (the id of the first node)")
    );
    assert_eq!(all.len(), 2);
}

#[test]
fn step_limits_are_bounded() {
    let e = only_error(&format!("entry = \"a\"\nmax_steps = 100001\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (
            Some("max_steps"),
            "100001 is more than 100000 (a run keeps every step in memory and in its log)"
        )
    );
    let e = only_error(&format!("entry = \"a\"\nmax_node_fatigue = 200000\n{ONE}"));
    assert_eq!(e.field.as_deref(), Some("max_node_fatigue"));
    let e = only_error(&format!("entry = \"a\"\nmax_steps = -1\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (
            Some("max_steps"),
            "must be a whole number >= 0, found a number"
        )
    );
}

#[test]
fn nodes_are_required_as_a_list() {
    let all = errors("entry = \"a\"\n");
    assert_eq!(
        top_error(&all[0]),
        (Some("nodes"), "is required (a list of node tables)")
    );
    let all = errors("entry = \"a\"\nnodes = 1\n");
    assert_eq!(
        top_error(&all[0]),
        (
            Some("nodes"),
            "must be a list of node tables, found a number"
        )
    );
    // Without nodes the entry names none either.
    assert_eq!(top_error(&all[1]), (Some("entry"), "no node has id 'a'"));
    assert_eq!(all.len(), 2);
}

#[test]
fn tools_and_providers_are_tables() {
    let e = only_error(&format!("entry = \"a\"\ntools = 1\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (Some("tools"), "must be a table, found a number")
    );
    let e = only_error(&format!("entry = \"a\"\nproviders = \"p\"\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (Some("providers"), "must be a table, found a string")
    );
}

#[test]
fn an_unknown_top_level_field() {
    let e = only_error(&format!("entry = \"a\"\nentrypoint = \"a\"\n{ONE}"));
    assert_eq!(
        top_error(&e),
        (
            Some("entrypoint"),
            "unknown field for a graph (known: description, entry, entry_point, max_node_fatigue, max_steps, name, nodes, providers, tools)"
        )
    );
}

#[test]
fn node_ids_are_required_and_unique() {
    let e = only_error(&format!("entry = \"a\"\n{ONE}{ONE}"));
    assert_eq!(e.node.as_deref(), Some("a"));
    assert_eq!(e.field.as_deref(), Some("id"));
    assert_eq!(e.message, "duplicate id");
    let e = only_error(&format!(
        "entry = \"a\"\n{ONE}[[nodes]]\ntype = \"clear_error\"\n"
    ));
    assert_eq!(e.node.as_deref(), Some("#2"));
    assert_eq!(e.field.as_deref(), Some("id"));
    assert_eq!(e.message, "is required");
}

#[test]
fn a_node_must_be_a_table() {
    let e = parse_graph(
        br#"{"entry": "a", "nodes": [{"id": "a", "type": "clear_error"}, 7]}"#,
        Syntax::Json,
        Path::new("g.json"),
        "g",
        &registry(),
    )
    .unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].node.as_deref(), Some("#2"));
    assert_eq!(e.0[0].field, None);
    assert_eq!(e.0[0].message, "a node must be a table, found a number");
}

#[test]
fn the_node_type_is_checked_first() {
    let e = only_error("entry = \"a\"\n[[nodes]]\nid = \"a\"\n");
    assert_eq!(e.field.as_deref(), Some("type"));
    assert_eq!(e.message, "is required");
    // An unknown type: its other fields (known or not) are not judged.
    let e = only_error("entry = \"a\"\n[[nodes]]\nid = \"a\"\ntype = \"sett\"\nkey = 1\n");
    assert_eq!(e.field.as_deref(), Some("type"));
    assert_eq!(
        e.message,
        format!("unknown node type 'sett' (known: {NODE_TYPES})")
    );
}

#[test]
fn next_must_name_a_node() {
    let e = only_error(&format!(
        "entry = \"a\"\n{}",
        ONE.replace("clear_error\"", "clear_error\"\nnext = \"b\"")
    ));
    assert_eq!(e.node.as_deref(), Some("a"));
    assert_eq!(e.field.as_deref(), Some("next"));
    assert_eq!(e.message, "no node has id 'b'");
}

#[test]
fn every_node_is_reachable() {
    let e = only_error(&format!(
        "entry = \"a\"\n{ONE}[[nodes]]\nid = \"b\"\ntype = \"clear_error\"\n"
    ));
    assert_eq!(e.node.as_deref(), Some("b"));
    assert_eq!(e.field, None);
    assert_eq!(e.message, "can never be reached from the entry 'a'");
}

#[test]
fn successors_follow_next_routes_and_error() {
    let g = load(
        "entry = \"r\"\n[[nodes]]\nid = \"r\"\ntype = \"router\"\non = \"k\"\n\
         routes = { x = \"t\" }\ndefault = \"a\"\n\
         [[nodes]]\nid = \"t\"\ntype = \"tool\"\ntool = \"echo\"\nnext = \"a\"\nerror = \"r\"\n\
         [[nodes]]\nid = \"a\"\ntype = \"clear_error\"\n",
    )
    .unwrap();
    assert_eq!(successors(&g.nodes[0]), [1, 2]);
    assert_eq!(successors(&g.nodes[1]), [2, 0]);
    assert!(successors(&g.nodes[2]).is_empty());
}
