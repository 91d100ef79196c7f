//! The `reduce` node (Lár's ReduceNode): an LLM summary of some state `keys` into `output`,
//! after which the keys are removed. It reads the LLM fields of an `llm` node (see `llm`), with
//! a default prompt that names every key.

use super::llm::read_llm_spec;
use super::NodeContext;
use crate::graph::model::NodeKind;
use crate::graph::reader::FieldReader;

/// A `reduce` node: `keys` (required, non-empty), the LLM fields (`prompt` optional), `output`
/// (required, not one of the keys) and `error`.
pub(super) fn reduce_node(r: &mut FieldReader, ctx: &NodeContext) -> Option<NodeKind> {
    let keys = r.str_list("keys").unwrap_or_default();
    if keys.is_empty() {
        r.error(
            Some("keys"),
            "is required: the non-empty list of state keys to summarise (and remove)",
        );
    }
    let default_prompt = default_reduce_prompt(&keys);
    let llm = read_llm_spec(r, ctx.providers, Some(default_prompt));
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
    let error = ctx.error_target(r);
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

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::NodeKind;

    /// A graph with the provider `p` whose entry is a reduce node `r` with the given fields.
    fn reduce(fields: &str) -> String {
        format!(
            "entry = \"r\"\n[providers.p]\nbase_url = \"https://llm.example/v1\"\n\
             [[nodes]]\nid = \"r\"\ntype = \"reduce\"\nprovider = \"p\"\nmodel = \"m\"\n{fields}\n"
        )
    }

    #[test]
    fn a_reduce_node_loads_with_the_default_prompt() {
        let g = load(&reduce("keys = [\"a\", \"b\"]\noutput = \"summary\"")).unwrap();
        match &g.nodes[0].kind {
            NodeKind::Reduce {
                llm, keys, output, ..
            } => {
                assert_eq!(keys, &["a", "b"]);
                assert_eq!(output, "summary");
                assert_eq!(llm.prompt.keys(), ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reduce_node_needs_keys() {
        let message = "is required: the non-empty list of state keys to summarise (and remove)";
        let e = only_error(&reduce("output = \"summary\""));
        assert_eq!(e.node.as_deref(), Some("r"));
        assert_eq!(e.field.as_deref(), Some("keys"));
        assert_eq!(e.message, message);
        let e = only_error(&reduce("keys = []\noutput = \"summary\""));
        assert_eq!(e.message, message);
        let all = errors(&reduce("keys = \"a\"\noutput = \"summary\""));
        let messages: Vec<_> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            ["must be a list of strings, found a string", message]
        );
    }

    #[test]
    fn keys_the_default_prompt_cannot_name() {
        let e = only_error(&reduce("keys = [\" \"]\noutput = \"summary\""));
        assert_eq!(e.field.as_deref(), Some("keys"));
        assert!(
            e.message.starts_with(
                "the default prompt cannot name these keys (empty placeholder '{}' at character "
            ) && e.message.ends_with("): give the node its own 'prompt'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_prompt_must_use_a_key_it_reduces() {
        let e = only_error(&reduce(
            "keys = [\"a\", \"b\"]\nprompt = \"Sum up {c}\"\noutput = \"summary\"",
        ));
        assert_eq!(e.field.as_deref(), Some("prompt"));
        assert_eq!(
            e.message,
            "uses none of the keys it reduces (a, b): add placeholders such as {a}, or drop 'prompt' for the default"
        );
    }

    #[test]
    fn a_reduce_node_needs_an_output_outside_its_keys() {
        let e = only_error(&reduce("keys = [\"a\"]"));
        assert_eq!(e.field.as_deref(), Some("output"));
        assert_eq!(e.message, "is required");
        let e = only_error(&reduce("keys = [\"a\", \"b\"]\noutput = \"b\""));
        assert_eq!(e.field.as_deref(), Some("output"));
        assert_eq!(
            e.message,
            "'b' is also in 'keys': the summary would be removed"
        );
    }

    #[test]
    fn the_llm_fields_are_checked_as_on_an_llm_node() {
        let e = only_error(&reduce(
            "keys = [\"a\"]\noutput = \"summary\"\nmax_tokens = 0",
        ));
        assert_eq!(e.field.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "must be more than 0");
    }

    #[test]
    fn an_error_target_that_does_not_exist() {
        let e = only_error(&reduce(
            "keys = [\"a\"]\noutput = \"summary\"\nerror = \"nowhere\"",
        ));
        assert_eq!(e.field.as_deref(), Some("error"));
        assert_eq!(e.message, "no node has id 'nowhere'");
    }

    #[test]
    fn a_reduce_node_rejects_unknown_fields() {
        let e = only_error(&reduce("keys = [\"a\"]\noutput = \"summary\"\nkey = \"a\""));
        assert_eq!(e.field.as_deref(), Some("key"));
        assert_eq!(
            e.message,
            "unknown field for a reduce node (known: description, error, fallbacks, id, keys, max_tokens, model, next, output, prompt, provider, response_format, system, temperature, type)"
        );
    }
}
