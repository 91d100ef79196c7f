//! Tool declarations, `[tools.NAME]`: an external program (`command`), a Rust function
//! registered in the worker (`builtin`) or an endpoint (`http`, read in `http`). `tool` nodes
//! refer to them by name, so they are read before the nodes.

use super::http;
use super::KnownTools;
use crate::graph::error::GraphError;
use crate::graph::model::{ToolSpec, DEFAULT_TOOL_TIMEOUT};
use crate::graph::reader::{kind, FieldReader};
use crate::net::secret::ValueSpec;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One `[tools.NAME]` table: exactly one of `command`, `builtin` and `http`, with the settings
/// that apply to it (`timeout_ms`, `cwd`, `env`, and for `http` the retry fields).
pub(super) fn parse_tool(
    file: &str,
    name: &str,
    spec: &Value,
    registry: &dyn KnownTools,
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
            let (spec, errors) = http::http_tool(&mut r, file, name, http, base_dir, timeout_ms);
            http_errors = errors;
            spec.map(ToolSpec::Http)
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

#[cfg(test)]
mod tests {
    use super::super::tests::{load, only_error, REGISTERED};
    use crate::graph::error::GraphError;
    use crate::graph::ToolSpec;

    /// A graph declaring the tool `t` with the given fields (no node calls it: a broken tool
    /// would also be unknown to the node).
    fn declared(fields: &str) -> String {
        format!(
            "entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"clear_error\"\n\
             [tools.t]\n{fields}\n"
        )
    }

    /// The one error of the tool `t` declared with the given fields.
    fn tool_error(fields: &str) -> GraphError {
        let e = only_error(&declared(fields));
        assert_eq!(e.node.as_deref(), Some("tools.t"), "{e:?}");
        e
    }

    #[test]
    fn a_command_tool_loads() {
        let g = load(&declared(
            "command = [\"python3\", \"t.py\"]\ntimeout_ms = 5000\ncwd = \"tools\"\nenv = { A = \"1\" }",
        ))
        .unwrap();
        match &g.tools["t"] {
            ToolSpec::Command {
                argv,
                timeout,
                timeout_explicit,
                ..
            } => {
                assert_eq!(argv, &["python3", "t.py"]);
                assert_eq!(timeout.as_millis(), 5000);
                assert!(timeout_explicit);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tool_must_be_a_table() {
        let e = only_error(
            "entry = \"n\"\ntools = { t = \"x\" }\n[[nodes]]\nid = \"n\"\ntype = \"clear_error\"\n",
        );
        assert_eq!(e.node, None);
        assert_eq!(e.field.as_deref(), Some("tools.t"));
        assert_eq!(e.message, "must be a table, found a string");
    }

    #[test]
    fn a_tool_needs_exactly_one_transport() {
        let e = tool_error("timeout_ms = 10");
        assert_eq!(e.field, None);
        assert_eq!(
            e.message,
            "needs 'command' (an external program), 'http' (an endpoint) or 'builtin' (a registered Rust tool)"
        );
        let e = tool_error("command = [\"x\"]\nbuiltin = \"echo\"");
        assert_eq!(e.field, None);
        assert_eq!(
            e.message,
            "give exactly one of 'command', 'http' and 'builtin'"
        );
    }

    #[test]
    fn a_command_names_a_program() {
        let message = "must name a program: [\"program\", \"arg\", ...]";
        for command in ["[]", "[\"\", \"x\"]"] {
            let e = tool_error(&format!("command = {command}"));
            assert_eq!(e.field.as_deref(), Some("command"));
            assert_eq!(e.message, message);
        }
        let all = super::super::tests::errors(&declared("command = \"python3 t.py\""));
        assert_eq!(all[0].field.as_deref(), Some("command"));
        assert_eq!(all[0].message, "must be a list of strings, found a string");
    }

    #[test]
    fn a_zero_timeout() {
        let e = tool_error("command = [\"x\"]\ntimeout_ms = 0");
        assert_eq!(e.field.as_deref(), Some("timeout_ms"));
        assert_eq!(e.message, "must be more than 0");
    }

    #[test]
    fn env_values_are_strings_with_a_source() {
        let e = tool_error("command = [\"x\"]\nenv = { A = 1 }");
        assert_eq!(e.field.as_deref(), Some("env"));
        assert_eq!(e.message, "'A' must be a string, found a number");
        let e = tool_error("command = [\"x\"]\nenv = { A = \"env:\" }");
        assert_eq!(e.field.as_deref(), Some("env"));
        assert_eq!(e.message, "env A: 'env:' needs a variable name");
        let e = tool_error("command = [\"x\"]\ncwd = 1");
        assert_eq!(e.field.as_deref(), Some("cwd"));
        assert_eq!(e.message, "must be a string, found a number");
    }

    #[test]
    fn a_builtin_must_be_registered() {
        let e = tool_error("builtin = \"nope\"");
        assert_eq!(e.field.as_deref(), Some("builtin"));
        assert_eq!(
            e.message,
            format!("no registered tool 'nope' (registered: {REGISTERED})")
        );
    }

    #[test]
    fn a_builtin_takes_no_process_settings() {
        let e = tool_error("builtin = \"echo\"\ntimeout_ms = 100");
        assert_eq!(e.field.as_deref(), Some("timeout_ms"));
        assert_eq!(
            e.message,
            "only applies to 'command' and 'http' tools: a 'builtin' tool runs in the worker's process and cannot be cut off"
        );
        let e = tool_error("builtin = \"echo\"\ncwd = \"d\"\nenv = { A = \"1\" }");
        assert_eq!(e.field.as_deref(), Some("cwd"));
        assert_eq!(e.message, "only applies to 'command' tools");
        let e = tool_error("builtin = \"echo\"\nenv = { A = \"1\" }");
        assert_eq!(e.field.as_deref(), Some("env"));
        assert_eq!(e.message, "only applies to 'command' tools");
    }

    #[test]
    fn a_tool_rejects_unknown_fields() {
        let e = tool_error("command = [\"x\"]\ntimeout = 1");
        assert_eq!(e.field.as_deref(), Some("timeout"));
        assert_eq!(
            e.message,
            "unknown field for a tool (known: builtin, command, cwd, description, env, http, timeout_ms)"
        );
    }
}
