//! Graph validation: every bad-graph case of GRAPH_FORMAT.md is rejected with a message that
//! names the file, the node and the field, both from the library and as `lar-worker validate`
//! prints it; the example graphs are valid.

mod common;

use common::{bin, manifest_dir, run, write};
use lar_worker::graph::{load_graph_file, GraphErrors};
use lar_worker::tools::Registry;
use tempfile::TempDir;

/// Loads `toml` as `<name>.toml`, expects an error on `node`/`field` whose message contains
/// `contains`, checks the printed line names file, node and field, and that `validate` prints
/// the same line and exits 2. Returns every error for further checks.
fn expect_error(
    name: &str,
    toml: &str,
    node: Option<&str>,
    field: Option<&str>,
    contains: &str,
) -> GraphErrors {
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), &format!("{name}.toml"), toml);
    expect_error_at(&path, node, field, contains)
}

fn expect_error_at(
    path: &std::path::Path,
    node: Option<&str>,
    field: Option<&str>,
    contains: &str,
) -> GraphErrors {
    let errors = match load_graph_file(path, &Registry::with_builtins()) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e,
    };
    let hit = errors
        .0
        .iter()
        .find(|e| {
            e.node.as_deref() == node && e.field.as_deref() == field && e.message.contains(contains)
        })
        .unwrap_or_else(|| {
            panic!(
                "no error on node {node:?} field {field:?} containing {contains:?}; got:\n{errors}"
            )
        });
    let line = hit.to_string();
    let file = path.display().to_string();
    assert!(line.starts_with(&format!("{file}: ")), "{line}");
    if let Some(n) = node {
        assert!(line.contains(&format!("node '{n}'")), "{line}");
    }
    if let Some(f) = field {
        assert!(line.contains(&format!("field '{f}'")), "{line}");
    }
    assert!(line.contains(contains), "{line}");

    let (code, out, err) = run(bin().arg("validate").arg(path));
    assert_eq!(code, 2, "validate must exit 2:\n{out}{err}");
    assert!(
        out.lines().any(|l| l == line) || out.contains(&format!("{line}\n")),
        "validate does not print `{line}`:\n{out}"
    );
    errors
}

fn only_one(errors: &GraphErrors) {
    assert_eq!(errors.0.len(), 1, "expected exactly one error:\n{errors}");
}

const TAIL: &str = r#"
[[nodes]]
id = "end"
type = "set"
key = "status"
value = "done"
"#;

#[test]
fn missing_entry() {
    let e = expect_error(
        "missing_entry",
        &format!("name = \"g\"\n{TAIL}"),
        None,
        Some("entry"),
        "is required",
    );
    only_one(&e);
}

#[test]
fn entry_names_no_node() {
    let e = expect_error(
        "bad_entry",
        &format!("entry = \"start\"\n{TAIL}"),
        None,
        Some("entry"),
        "no node has id 'start'",
    );
    only_one(&e);
}

#[test]
fn entry_and_entry_point_together() {
    expect_error(
        "two_entries",
        &format!("entry = \"end\"\nentry_point = \"end\"\n{TAIL}"),
        None,
        Some("entry"),
        "not both",
    );
}

#[test]
fn next_target_missing() {
    let e = expect_error(
        "bad_next",
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 1
next = "ghost"
"#,
        Some("a"),
        Some("next"),
        "no node has id 'ghost'",
    );
    only_one(&e);
}

#[test]
fn next_target_missing_is_reported_even_when_another_field_is_wrong() {
    // The set node lacks its value; its `next` is still a known field, checked for its target.
    let e = expect_error(
        "bad_next_and_value",
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
next = "ghost"
"#,
        Some("a"),
        Some("next"),
        "no node has id 'ghost'",
    );
    assert_eq!(e.0.len(), 2, "{e}");
    assert!(e.0.iter().any(|x| x.field.as_deref() == Some("value")));
    assert!(!e.to_string().contains("unknown field"), "{e}");
}

#[test]
fn error_target_missing() {
    let e = expect_error(
        "bad_error",
        &format!(
            r#"
entry = "t"
[[nodes]]
id = "t"
type = "tool"
tool = "sum_numbers"
inputs = ["numbers"]
next = "end"
error = "ghost"
{TAIL}"#
        ),
        Some("t"),
        Some("error"),
        "no node has id 'ghost'",
    );
    only_one(&e);
}

#[test]
fn route_target_missing() {
    let e = expect_error(
        "bad_route",
        &format!(
            r#"
entry = "r"
[[nodes]]
id = "r"
type = "router"
on = "kind"
routes = {{ done = "end", review = "ghost" }}
{TAIL}"#
        ),
        Some("r"),
        Some("routes"),
        "route 'review' goes to 'ghost'",
    );
    only_one(&e);
}

#[test]
fn default_target_missing() {
    let e = expect_error(
        "bad_default",
        &format!(
            r#"
entry = "r"
[[nodes]]
id = "r"
type = "router"
on = "kind"
routes = {{ done = "end" }}
default = "ghost"
{TAIL}"#
        ),
        Some("r"),
        Some("default"),
        "no node has id 'ghost'",
    );
    only_one(&e);
}

#[test]
fn unknown_node_type() {
    let e = expect_error(
        "bad_type",
        &format!(
            r#"
entry = "a"
[[nodes]]
id = "a"
type = "llm_magic"
model = "x"
next = "end"
{TAIL}"#
        ),
        Some("a"),
        Some("type"),
        "unknown node type 'llm_magic' (known: set, router, tool, clear_error, human_jury, llm, batch, reduce)",
    );
    // Only the type is reported: which other fields belong is unknown.
    only_one(&e);
}

#[test]
fn missing_node_type() {
    let e = expect_error(
        "no_type",
        &format!("entry = \"a\"\n[[nodes]]\nid = \"a\"\nnext = \"end\"\n{TAIL}"),
        Some("a"),
        Some("type"),
        "is required",
    );
    only_one(&e);
}

#[test]
fn unknown_field() {
    let e = expect_error(
        "bad_field",
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 1
colour = "blue"
"#,
        Some("a"),
        Some("colour"),
        "unknown field for a set node (known: description, id, key, next, type, value)",
    );
    only_one(&e);
}

#[test]
fn unknown_top_level_field() {
    expect_error(
        "bad_top_field",
        &format!("entry = \"end\"\nmax_step = 5\n{TAIL}"),
        None,
        Some("max_step"),
        "unknown field for a graph",
    );
}

#[test]
fn next_on_a_router_is_an_unknown_field() {
    expect_error(
        "router_next",
        &format!(
            r#"
entry = "r"
[[nodes]]
id = "r"
type = "router"
on = "kind"
routes = {{ done = "end" }}
next = "end"
{TAIL}"#
        ),
        Some("r"),
        Some("next"),
        "unknown field for a router node",
    );
}

#[test]
fn duplicate_id() {
    let e = expect_error(
        "dup",
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 1
next = "b"
[[nodes]]
id = "b"
type = "set"
key = "k"
value = 2
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 3
"#,
        Some("a"),
        Some("id"),
        "duplicate id",
    );
    only_one(&e);
}

#[test]
fn unknown_tool() {
    let e = expect_error(
        "bad_tool",
        &format!(
            r#"
entry = "t"
[[nodes]]
id = "t"
type = "tool"
tool = "risk_scorer"
next = "end"
[tools.risk_score]
command = ["python3", "tools/risk_score.py"]
timeout_ms = 5000
{TAIL}"#
        ),
        Some("t"),
        Some("tool"),
        "unknown tool 'risk_scorer': declare it under [tools.risk_scorer] (declared: risk_score; registered: digest, echo, fail, sum_numbers, upper_text)",
    );
    only_one(&e);
}

#[test]
fn expression_that_does_not_parse() {
    let e = expect_error(
        "bad_cel",
        &format!(
            r#"
entry = "r"
[[nodes]]
id = "r"
type = "router"
when = "amount > ? 'a' : 'b'"
routes = {{ a = "end", b = "end" }}
{TAIL}"#
        ),
        Some("r"),
        Some("when"),
        "the expression does not parse",
    );
    only_one(&e);
}

#[test]
fn router_needs_exactly_one_selector() {
    for (name, sel) in [("both", "on = \"kind\"\nwhen = \"kind\""), ("neither", "")] {
        let e = expect_error(
            name,
            &format!(
                "entry = \"r\"\n[[nodes]]\nid = \"r\"\ntype = \"router\"\n{sel}\nroutes = {{ a = \"end\" }}\n{TAIL}"
            ),
            Some("r"),
            Some("on"),
            "'on'",
        );
        only_one(&e);
    }
}

#[test]
fn unreachable_node() {
    let e = expect_error(
        "orphan",
        &format!(
            r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 1
next = "end"
[[nodes]]
id = "orphan"
type = "set"
key = "k"
value = 2
next = "end"
{TAIL}"#
        ),
        Some("orphan"),
        None,
        "can never be reached from the entry 'a'",
    );
    only_one(&e);
}

#[test]
fn field_value_types_are_checked() {
    expect_error(
        "neg_steps",
        &format!("entry = \"end\"\nmax_steps = -1\n{TAIL}"),
        None,
        Some("max_steps"),
        "must be a whole number >= 0",
    );
    expect_error(
        "inputs_string",
        &format!(
            "entry = \"t\"\n[[nodes]]\nid = \"t\"\ntype = \"tool\"\ntool = \"digest\"\ninputs = \"amount\"\nnext = \"end\"\n{TAIL}"
        ),
        Some("t"),
        Some("inputs"),
        "must be a list of strings",
    );
    expect_error(
        "jury_no_choices",
        &format!(
            "entry = \"j\"\n[[nodes]]\nid = \"j\"\ntype = \"human_jury\"\nprompt = \"ok?\"\nchoices = []\nnext = \"end\"\n{TAIL}"
        ),
        Some("j"),
        Some("choices"),
        "non-empty list",
    );
    expect_error(
        "node_not_table",
        "entry = \"a\"\nnodes = [1]\n",
        Some("#1"),
        None,
        "a node must be a table",
    );
}

// ---- the tool table ----

/// A graph whose single tool node uses tool `x`, declared as `spec`.
fn with_tool(spec: &str) -> String {
    format!(
        "entry = \"t\"\n[[nodes]]\nid = \"t\"\ntype = \"tool\"\ntool = \"x\"\nnext = \"end\"\n{TAIL}\n{spec}\n"
    )
}

#[test]
fn tool_without_command_or_builtin() {
    expect_error(
        "tool_empty",
        &with_tool("[tools.x]\ntimeout_ms = 100"),
        Some("tools.x"),
        None,
        "needs 'command' (an external program), 'http' (an endpoint) or 'builtin'",
    );
}

/// A setting a registered (in-process) tool would ignore is refused, not silently dropped.
#[test]
fn builtin_tool_with_a_timeout_or_env() {
    expect_error(
        "builtin_timeout",
        &with_tool("[tools.x]\nbuiltin = \"digest\"\ntimeout_ms = 100"),
        Some("tools.x"),
        Some("timeout_ms"),
        "only applies to 'command' and 'http' tools: a 'builtin' tool runs in the worker's process",
    );
    expect_error(
        "builtin_env",
        &with_tool("[tools.x]\nbuiltin = \"digest\"\nenv = { A = \"b\" }"),
        Some("tools.x"),
        Some("env"),
        "only applies to 'command' tools",
    );
}

#[test]
fn tool_env_secret_without_a_source() {
    expect_error(
        "tool_env_empty_ref",
        &with_tool("[tools.x]\ncommand = [\"python3\", \"x.py\"]\nenv = { TOKEN = \"env:\" }"),
        Some("tools.x"),
        Some("env"),
        "env TOKEN: 'env:' needs a variable name",
    );
}

#[test]
fn tool_with_command_and_builtin() {
    expect_error(
        "tool_both",
        &with_tool("[tools.x]\ncommand = [\"python3\", \"x.py\"]\nbuiltin = \"digest\""),
        Some("tools.x"),
        None,
        "give exactly one of 'command', 'http' and 'builtin'",
    );
}

#[test]
fn tool_with_empty_command() {
    expect_error(
        "tool_empty_argv",
        &with_tool("[tools.x]\ncommand = []\ntimeout_ms = 100"),
        Some("tools.x"),
        Some("command"),
        "must name a program",
    );
}

#[test]
fn tool_command_as_a_string() {
    expect_error(
        "tool_shell_string",
        &with_tool("[tools.x]\ncommand = \"python3 x.py\""),
        Some("tools.x"),
        Some("command"),
        "must be a list of strings",
    );
}

#[test]
fn tool_with_zero_timeout() {
    expect_error(
        "tool_zero_timeout",
        &with_tool("[tools.x]\ncommand = [\"python3\", \"x.py\"]\ntimeout_ms = 0"),
        Some("tools.x"),
        Some("timeout_ms"),
        "must be more than 0",
    );
}

#[test]
fn tool_with_unknown_field() {
    expect_error(
        "tool_unknown_field",
        &with_tool("[tools.x]\ncommand = [\"python3\", \"x.py\"]\nshell = true"),
        Some("tools.x"),
        Some("shell"),
        "unknown field for a tool",
    );
}

#[test]
fn tool_with_unregistered_builtin() {
    expect_error(
        "tool_bad_builtin",
        &with_tool("[tools.x]\nbuiltin = \"nope\""),
        Some("tools.x"),
        Some("builtin"),
        "no registered tool 'nope'",
    );
}

#[test]
fn tool_env_values_must_be_strings() {
    expect_error(
        "tool_env",
        &with_tool("[tools.x]\ncommand = [\"python3\", \"x.py\"]\nenv = { DEBUG = 1 }"),
        Some("tools.x"),
        Some("env"),
        "'DEBUG' must be a string",
    );
}

#[test]
fn tool_declared_as_a_string() {
    expect_error(
        "tool_string",
        &with_tool("[tools]\nx = \"python3 x.py\""),
        None,
        Some("tools.x"),
        "must be a table",
    );
}

#[test]
fn syntax_errors_name_the_file() {
    let e = expect_error(
        "broken",
        "entry = \"a\"\n[[nodes]\nid = 1\n",
        None,
        None,
        "invalid TOML",
    );
    only_one(&e);
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), "broken.json", "{\"entry_point\": \"a\", ");
    expect_error_at(&path, None, None, "invalid JSON");
}

#[test]
fn json_graphs_use_the_same_checks() {
    let dir = TempDir::new().unwrap();
    let good = write(
        dir.path(),
        "lar_style.json",
        r#"{"entry_point": "a", "nodes": [{"id": "a", "type": "set", "key": "k", "value": 1.5}]}"#,
    );
    let g = load_graph_file(&good, &Registry::with_builtins()).unwrap();
    assert_eq!(g.name, "lar_style");
    let bad = write(
        dir.path(),
        "lar_bad.json",
        r#"{"entry_point": "a", "nodes": [{"id": "a", "type": "set", "key": "k", "value": 1, "next": "nowhere"}]}"#,
    );
    expect_error_at(&bad, Some("a"), Some("next"), "no node has id 'nowhere'");
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = TempDir::new().unwrap();
    let path = write(
        dir.path(),
        "many.toml",
        r#"
entry = "a"
[[nodes]]
id = "a"
type = "set"
key = "k"
value = 1
next = "ghost"
[[nodes]]
id = "b"
type = "wat"
[[nodes]]
id = "c"
type = "tool"
tool = "nope"
"#,
    );
    let errors = expect_error_at(&path, Some("a"), Some("next"), "ghost");
    let fields: Vec<(Option<&str>, Option<&str>)> = errors
        .0
        .iter()
        .map(|e| (e.node.as_deref(), e.field.as_deref()))
        .collect();
    assert_eq!(
        fields,
        [
            (Some("a"), Some("next")),
            (Some("b"), Some("type")),
            (Some("c"), Some("tool"))
        ]
    );
}

#[test]
fn example_graphs_validate() {
    let dir = manifest_dir().join("graphs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml" || e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let (code, out, err) = run(bin().arg("validate").args(&files));
    assert_eq!(code, 0, "{out}{err}");
    for f in &files {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", f.display())))
            .unwrap_or_else(|| panic!("no line for {}:\n{out}", f.display()));
        assert!(line.contains(": ok (graph '"), "{line}");
    }

    // One bad file among good ones fails the whole command, and the good ones still say ok.
    let tmp = TempDir::new().unwrap();
    let bad = write(tmp.path(), "bad.toml", "entry = \"x\"\nnodes = []\n");
    let (code, out, _) = run(bin().arg("validate").args(&files).arg(&bad));
    assert_eq!(code, 2, "{out}");
    assert_eq!(out.matches(": ok (graph '").count(), files.len(), "{out}");
    assert!(
        out.contains(&format!(
            "{}: field 'entry': no node has id 'x'",
            bad.display()
        )),
        "{out}"
    );
}

/// A reduce node whose key has a brace cannot use the default prompt (it names each key in a
/// placeholder): an error on `keys`, never a node silently dropped (the nodes after it would
/// shift) or a panic.
#[test]
fn reduce_key_with_a_brace_needs_its_own_prompt() {
    let errors = expect_error(
        "reduce_brace",
        r#"
name = "rb"
entry = "r"
[providers.p]
base_url = "http://127.0.0.1:9/v1"
[[nodes]]
id = "r"
type = "reduce"
provider = "p"
model = "m"
keys = ["a}b"]
output = "summary"
next = "done"
[[nodes]]
id = "done"
type = "set"
key = "status"
value = "done"
"#,
        Some("r"),
        Some("keys"),
        "give the node its own 'prompt'",
    );
    only_one(&errors);
}

/// A run keeps every step: limits past 100,000 are refused instead of growing without bound.
#[test]
fn step_limits_are_bounded() {
    let errors = expect_error(
        "huge_limits",
        r#"
name = "h"
entry = "a"
max_steps = 9223372036854775807
[[nodes]]
id = "a"
type = "set"
key = "k"
value = "v"
"#,
        None,
        Some("max_steps"),
        "is more than 100000",
    );
    only_one(&errors);
}
