//! The `human_jury` node: a run halts on it until a human decides between its `choices` (or,
//! with `expires_after_ms` and `on_expiry`, until the system decides for them).

use crate::graph::model::{JuryExpiry, NodeKind};
use crate::graph::reader::FieldReader;

/// A `human_jury` node: `prompt` and `choices` (required), `output`, `context`, and
/// `expires_after_ms` with `on_expiry` (both or neither).
pub(super) fn human_jury_node(r: &mut FieldReader) -> Option<NodeKind> {
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
            r.error(
                Some("expires_after_ms"),
                "give both 'expires_after_ms' and 'on_expiry' (the default choice), or neither",
            );
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

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::{JuryExpiry, NodeKind};

    /// A graph whose entry is a human_jury node `j` with the given fields.
    fn jury(fields: &str) -> String {
        format!("entry = \"j\"\n[[nodes]]\nid = \"j\"\ntype = \"human_jury\"\n{fields}\n")
    }

    const OK: &str = "prompt = \"Approve?\"\nchoices = [\"approve\", \"reject\"]";

    #[test]
    fn a_jury_loads_with_its_defaults() {
        let g = load(&jury(OK)).unwrap();
        match &g.nodes[0].kind {
            NodeKind::HumanJury {
                output,
                context,
                expiry,
                ..
            } => {
                assert_eq!(output, "jury_decision");
                assert!(context.is_empty());
                assert_eq!(*expiry, None);
            }
            other => panic!("{other:?}"),
        }
        let g = load(&jury(&format!(
            "{OK}\nexpires_after_ms = 60000\non_expiry = \"reject\""
        )))
        .unwrap();
        match &g.nodes[0].kind {
            NodeKind::HumanJury { expiry, .. } => assert_eq!(
                *expiry,
                Some(JuryExpiry {
                    after_ms: 60000,
                    choice: "reject".into()
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_jury_needs_a_prompt() {
        let e = only_error(&jury("choices = [\"approve\"]"));
        assert_eq!(e.node.as_deref(), Some("j"));
        assert_eq!(e.field.as_deref(), Some("prompt"));
        assert_eq!(e.message, "is required");
    }

    #[test]
    fn a_jury_needs_choices() {
        let message = "is required: a non-empty list of allowed decisions";
        let e = only_error(&jury("prompt = \"Approve?\""));
        assert_eq!(e.field.as_deref(), Some("choices"));
        assert_eq!(e.message, message);
        let e = only_error(&jury("prompt = \"Approve?\"\nchoices = []"));
        assert_eq!(e.message, message);
    }

    #[test]
    fn choices_of_the_wrong_type_are_reported_twice() {
        let all = errors(&jury("prompt = \"Approve?\"\nchoices = \"approve\""));
        let messages: Vec<_> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "must be a list of strings, found a string",
                "is required: a non-empty list of allowed decisions"
            ]
        );
    }

    #[test]
    fn an_expiry_needs_both_fields() {
        let message =
            "give both 'expires_after_ms' and 'on_expiry' (the default choice), or neither";
        let e = only_error(&jury(&format!("{OK}\nexpires_after_ms = 1000")));
        assert_eq!(e.field.as_deref(), Some("expires_after_ms"));
        assert_eq!(e.message, message);
        let e = only_error(&jury(&format!("{OK}\non_expiry = \"reject\"")));
        assert_eq!(e.field.as_deref(), Some("expires_after_ms"));
        assert_eq!(e.message, message);
    }

    #[test]
    fn the_expiry_choice_must_be_a_choice() {
        let e = only_error(&jury(&format!(
            "{OK}\nexpires_after_ms = 1000\non_expiry = \"maybe\""
        )));
        assert_eq!(e.field.as_deref(), Some("on_expiry"));
        assert_eq!(e.message, "'maybe' is not one of the node's choices");
    }

    #[test]
    fn the_expiry_delay_must_be_a_whole_number() {
        let all = errors(&jury(&format!(
            "{OK}\nexpires_after_ms = -1\non_expiry = \"reject\""
        )));
        let messages: Vec<_> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "must be a whole number >= 0, found a number",
                "give both 'expires_after_ms' and 'on_expiry' (the default choice), or neither"
            ]
        );
    }

    #[test]
    fn context_must_be_a_list_of_strings() {
        let e = only_error(&jury(&format!("{OK}\ncontext = \"amount\"")));
        assert_eq!(e.field.as_deref(), Some("context"));
        assert_eq!(e.message, "must be a list of strings, found a string");
    }

    #[test]
    fn a_jury_rejects_unknown_fields() {
        let e = only_error(&jury(&format!("{OK}\nchoice = \"x\"")));
        assert_eq!(e.field.as_deref(), Some("choice"));
        assert_eq!(
            e.message,
            "unknown field for a human_jury node (known: choices, context, description, expires_after_ms, id, next, on_expiry, output, prompt, type)"
        );
    }
}
