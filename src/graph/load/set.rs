//! The `set` node (Lár's AddValueNode) and the `clear_error` node (Lár's ClearErrorNode): the
//! two kinds that only write to the state, kept together because each is a few lines.

use crate::graph::model::NodeKind;
use crate::graph::reader::FieldReader;

/// A `set` node: `key` (required) and `value` (required, any value).
pub(super) fn set_node(r: &mut FieldReader) -> Option<NodeKind> {
    let key = r.req_str("key");
    let value = r.value("value").cloned();
    if value.is_none() {
        r.error(Some("value"), "is required");
    }
    key.zip(value)
        .map(|(key, value)| NodeKind::Set { key, value })
}

/// A `clear_error` node has no fields of its own.
pub(super) fn clear_error_node() -> Option<NodeKind> {
    Some(NodeKind::ClearError)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::NodeKind;

    #[test]
    fn a_set_node_needs_a_key() {
        let e = only_error("entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"set\"\nvalue = 1\n");
        assert_eq!(e.node.as_deref(), Some("n"));
        assert_eq!(e.field.as_deref(), Some("key"));
        assert_eq!(e.message, "is required");
    }

    #[test]
    fn a_set_node_needs_a_value() {
        let e = only_error("entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"set\"\nkey = \"k\"\n");
        assert_eq!(e.field.as_deref(), Some("value"));
        assert_eq!(e.message, "is required");
    }

    #[test]
    fn a_set_key_must_be_a_string() {
        let e = only_error(
            "entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"set\"\nkey = 3\nvalue = 1\n",
        );
        assert_eq!(e.field.as_deref(), Some("key"));
        assert_eq!(e.message, "must be a string, found a number");
    }

    #[test]
    fn a_set_node_with_both_fields_missing_reports_both() {
        let all = errors("entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"set\"\n");
        let fields: Vec<_> = all.iter().map(|e| e.field.as_deref()).collect();
        assert_eq!(fields, [Some("key"), Some("value")]);
    }

    #[test]
    fn a_set_node_rejects_unknown_fields() {
        let e = only_error(
            "entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"set\"\nkey = \"k\"\nvalue = 1\nvalu = 2\n",
        );
        assert_eq!(e.field.as_deref(), Some("valu"));
        assert_eq!(
            e.message,
            "unknown field for a set node (known: description, id, key, next, type, value)"
        );
    }

    #[test]
    fn a_clear_error_node_has_no_fields_of_its_own() {
        let g = load("entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"clear_error\"\n").unwrap();
        assert!(matches!(g.nodes[0].kind, NodeKind::ClearError));
        let e = only_error(
            "entry = \"n\"\n[[nodes]]\nid = \"n\"\ntype = \"clear_error\"\nkey = \"k\"\n",
        );
        assert_eq!(e.field.as_deref(), Some("key"));
        assert_eq!(
            e.message,
            "unknown field for a clear_error node (known: description, id, next, type)"
        );
    }
}
