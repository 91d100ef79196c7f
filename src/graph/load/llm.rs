//! The `llm` node (Lár's LLMNode), and the fields it shares with `reduce` nodes: a declared
//! `provider`, a `model` with its `fallbacks`, the `prompt` and `system` templates and the
//! call's settings.

use super::NodeContext;
use crate::graph::model::{LlmSpec, NodeKind};
use crate::graph::reader::FieldReader;
use crate::graph::template::Template;
use std::collections::BTreeSet;

/// An `llm` node: the shared LLM fields, `output` (required) and `error`.
pub(super) fn llm_node(r: &mut FieldReader, ctx: &NodeContext) -> Option<NodeKind> {
    let llm = read_llm_spec(r, ctx.providers, None);
    let output = r.req_str("output");
    let error = ctx.error_target(r);
    llm.zip(output)
        .map(|(llm, output)| NodeKind::Llm { llm, output, error })
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
pub(super) fn read_llm_spec(
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

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::NodeKind;

    /// A graph with the provider `p` whose entry is an llm node `l` with the given fields.
    fn llm(fields: &str) -> String {
        format!(
            "entry = \"l\"\n[providers.p]\nbase_url = \"https://llm.example/v1\"\n\
             [[nodes]]\nid = \"l\"\ntype = \"llm\"\n{fields}\n"
        )
    }

    const OK: &str = "provider = \"p\"\nmodel = \"m\"\nprompt = \"Hi {name}\"\noutput = \"answer\"";

    /// The one error of an llm node with `OK`'s fields plus (or overridden by) `extra`.
    fn with(extra: &str) -> crate::graph::GraphError {
        only_error(&llm(&format!("{extra}\n{OK}")))
    }

    #[test]
    fn an_llm_node_loads() {
        let g = load(&llm(&format!(
            "{OK}\nfallbacks = [\"m2\"]\nsystem = \"Be brief\"\ntemperature = 0.5\n\
             max_tokens = 100\nresponse_format = \"json\""
        )))
        .unwrap();
        match &g.nodes[0].kind {
            NodeKind::Llm { llm, output, error } => {
                assert_eq!(llm.provider, "p");
                assert_eq!(llm.model, "m");
                assert_eq!(llm.fallbacks, ["m2"]);
                assert_eq!(llm.temperature, Some(0.5));
                assert_eq!(llm.max_tokens, Some(100));
                assert!(llm.json);
                assert_eq!(output, "answer");
                assert_eq!(*error, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_required_field_is_reported() {
        let all = errors(&llm(""));
        let fields: Vec<_> = all.iter().map(|e| e.field.as_deref().unwrap()).collect();
        assert_eq!(fields, ["provider", "model", "prompt", "output"]);
        assert!(all.iter().all(|e| e.message == "is required"), "{all:?}");
    }

    #[test]
    fn an_undeclared_provider() {
        let e = only_error(&llm(&OK.replace("\"p\"", "\"q\"")));
        assert_eq!(e.node.as_deref(), Some("l"));
        assert_eq!(e.field.as_deref(), Some("provider"));
        assert_eq!(
            e.message,
            "unknown provider 'q': declare it under [providers.q] (declared: p)"
        );
        let no_providers = format!("entry = \"l\"\n[[nodes]]\nid = \"l\"\ntype = \"llm\"\n{OK}\n");
        assert_eq!(
            only_error(&no_providers).message,
            "unknown provider 'p': declare it under [providers.p] (declared: none)"
        );
    }

    #[test]
    fn a_broken_provider_is_not_reported_again_on_the_node() {
        let all = errors(
            "entry = \"l\"\n[providers.p]\n[[nodes]]\nid = \"l\"\ntype = \"llm\"\n\
             provider = \"p\"\nmodel = \"m\"\nprompt = \"Hi\"\noutput = \"answer\"\n",
        );
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].node.as_deref(), Some("providers.p"));
        assert_eq!(all[0].field.as_deref(), Some("base_url"));
    }

    #[test]
    fn model_names_must_not_be_empty() {
        let e = only_error(&llm(&OK.replace("model = \"m\"", "model = \"\"")));
        assert_eq!(e.field.as_deref(), Some("model"));
        assert_eq!(e.message, "must not be empty");
        let e = with("fallbacks = [\"m2\", \"\"]");
        assert_eq!(e.field.as_deref(), Some("fallbacks"));
        assert_eq!(e.message, "model names must not be empty");
    }

    #[test]
    fn templates_must_parse() {
        let e = only_error(&llm(&OK.replace("Hi {name}", "Hi {name")));
        assert_eq!(e.field.as_deref(), Some("prompt"));
        assert_eq!(
            e.message,
            "the placeholder that starts at character 3 is not closed (write '{{' for a literal brace)"
        );
        let e = with("system = \"{}\"");
        assert_eq!(e.field.as_deref(), Some("system"));
        assert_eq!(
            e.message,
            "empty placeholder '{}' at character 0: name a state key"
        );
    }

    #[test]
    fn call_settings_are_checked() {
        let e = with("temperature = -0.1");
        assert_eq!(e.field.as_deref(), Some("temperature"));
        assert_eq!(e.message, "must not be negative");
        let e = with("temperature = \"hot\"");
        assert_eq!(e.message, "must be a number, found a string");
        let e = with("max_tokens = 0");
        assert_eq!(e.field.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "must be more than 0");
        let e = with("response_format = \"xml\"");
        assert_eq!(e.field.as_deref(), Some("response_format"));
        assert_eq!(e.message, "'xml' is not a response format (text, json)");
    }

    #[test]
    fn an_error_target_that_does_not_exist() {
        let e = with("error = \"nowhere\"");
        assert_eq!(e.field.as_deref(), Some("error"));
        assert_eq!(e.message, "no node has id 'nowhere'");
    }

    #[test]
    fn an_llm_node_rejects_unknown_fields() {
        let e = with("keys = [\"a\"]");
        assert_eq!(e.field.as_deref(), Some("keys"));
        assert_eq!(
            e.message,
            "unknown field for a llm node (known: description, error, fallbacks, id, max_tokens, model, next, output, prompt, provider, response_format, system, temperature, type)"
        );
    }
}
