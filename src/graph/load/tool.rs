//! The `tool` node (Lár's ToolNode): calls a tool declared under `[tools.NAME]` (see
//! `tool_spec`) or registered in the worker, with some state keys as its inputs.

use super::NodeContext;
use crate::graph::model::NodeKind;
use crate::graph::reader::FieldReader;

/// A `tool` node: `tool` (required, declared or registered), `inputs`, `output` and `error`.
pub(super) fn tool_node(r: &mut FieldReader, ctx: &NodeContext) -> Option<NodeKind> {
    let tool = r.req_str("tool");
    let inputs = r.str_list("inputs").unwrap_or_default();
    let output = r.opt_str("output");
    let error = ctx.error_target(r);
    if let Some(t) = &tool {
        if !ctx.tools.contains_key(t) && !ctx.registry.contains(t) {
            let declared: Vec<&str> = ctx.tools.keys().map(String::as_str).collect();
            r.error(
                Some("tool"),
                format!(
                    "unknown tool '{t}': declare it under [tools.{t}] (declared: {}; registered: {})",
                    if declared.is_empty() { "none".to_string() } else { declared.join(", ") },
                    ctx.registry.names().join(", ")
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

#[cfg(test)]
mod tests {
    use super::super::tests::{load, only_error, REGISTERED};
    use crate::graph::NodeKind;

    /// A graph whose entry is a tool node `t` with the given fields.
    fn tool_node(fields: &str) -> String {
        format!("entry = \"t\"\n[[nodes]]\nid = \"t\"\ntype = \"tool\"\n{fields}\n")
    }

    #[test]
    fn a_tool_node_loads() {
        let g = load(&tool_node(
            "tool = \"echo\"\ninputs = [\"a\"]\noutput = \"o\"\nerror = \"t\"",
        ))
        .unwrap();
        match &g.nodes[0].kind {
            NodeKind::Tool {
                tool,
                inputs,
                output,
                error,
            } => {
                assert_eq!(tool, "echo");
                assert_eq!(inputs, &["a"]);
                assert_eq!(output.as_deref(), Some("o"));
                assert_eq!(*error, Some(0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tool_node_needs_a_tool() {
        let e = only_error(&tool_node("inputs = [\"a\"]"));
        assert_eq!(e.node.as_deref(), Some("t"));
        assert_eq!(e.field.as_deref(), Some("tool"));
        assert_eq!(e.message, "is required");
    }

    #[test]
    fn an_undeclared_tool() {
        let e = only_error(&tool_node("tool = \"nope\""));
        assert_eq!(e.field.as_deref(), Some("tool"));
        assert_eq!(
            e.message,
            format!("unknown tool 'nope': declare it under [tools.nope] (declared: none; registered: {REGISTERED})")
        );
    }

    #[test]
    fn an_undeclared_tool_lists_the_declared_ones() {
        let e = only_error(&tool_node(
            "tool = \"nope\"\n[tools.mine]\ncommand = [\"true\"]",
        ));
        assert_eq!(
            e.message,
            format!("unknown tool 'nope': declare it under [tools.nope] (declared: mine; registered: {REGISTERED})")
        );
    }

    #[test]
    fn inputs_must_be_a_list_of_strings() {
        let e = only_error(&tool_node("tool = \"echo\"\ninputs = \"a\""));
        assert_eq!(e.field.as_deref(), Some("inputs"));
        assert_eq!(e.message, "must be a list of strings, found a string");
        let e = only_error(&tool_node("tool = \"echo\"\ninputs = [\"a\", 1]"));
        assert_eq!(e.message, "must be a list of strings, found a a number");
    }

    #[test]
    fn output_must_be_a_string() {
        let e = only_error(&tool_node("tool = \"echo\"\noutput = true"));
        assert_eq!(e.field.as_deref(), Some("output"));
        assert_eq!(e.message, "must be a string, found a boolean");
    }

    #[test]
    fn an_error_target_that_does_not_exist() {
        let e = only_error(&tool_node("tool = \"echo\"\nerror = \"nowhere\""));
        assert_eq!(e.field.as_deref(), Some("error"));
        assert_eq!(e.message, "no node has id 'nowhere'");
    }

    #[test]
    fn a_tool_node_rejects_unknown_fields() {
        let e = only_error(&tool_node("tool = \"echo\"\ninput = [\"a\"]"));
        assert_eq!(e.field.as_deref(), Some("input"));
        assert_eq!(
            e.message,
            "unknown field for a tool node (known: description, error, id, inputs, next, output, tool, type)"
        );
    }
}
