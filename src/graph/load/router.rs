//! The `router` node (Lár's RouterNode): a selector (`on`, a state key, or `when`, a CEL
//! expression), the `routes` from its values to node ids and an optional `default`. A router has
//! no `next`: its routes are where it goes.

use super::NodeContext;
use crate::graph::expr::Expr;
use crate::graph::model::{NodeKind, RouteSelector};
use crate::graph::reader::FieldReader;

/// A `router` node: exactly one of `on` and `when`, `routes` (required) and `default`.
pub(super) fn router_node(r: &mut FieldReader, ctx: &NodeContext) -> Option<NodeKind> {
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
                    Some(d) => match ctx.index.get(d) {
                        Some(i) => routes.push((key.clone(), *i)),
                        None => r.error(
                            Some("routes"),
                            format!("route '{key}' goes to '{d}': no node has that id"),
                        ),
                    },
                    None => r.error(Some("routes"), format!("route '{key}' must name a node id")),
                }
            }
        }
        None => r.error(Some("routes"), "is required (route key = node id)"),
    }
    let default = r.opt_str("default");
    let default = ctx.target(r, "default", default);
    selector.map(|selector| NodeKind::Router {
        selector,
        routes,
        default,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::{NodeKind, RouteSelector};

    /// A router node `r` with the given fields, and the nodes `a` and `b` to route to.
    fn router(fields: &str) -> String {
        format!(
            "entry = \"r\"\n[[nodes]]\nid = \"r\"\ntype = \"router\"\n{fields}\n\
             [[nodes]]\nid = \"a\"\ntype = \"clear_error\"\n\
             [[nodes]]\nid = \"b\"\ntype = \"clear_error\"\n"
        )
    }

    #[test]
    fn a_router_on_a_key_loads() {
        let g = load(&router(
            "on = \"k\"\nroutes = { x = \"a\" }\ndefault = \"b\"",
        ))
        .unwrap();
        match &g.nodes[0].kind {
            NodeKind::Router {
                selector: RouteSelector::Key(k),
                routes,
                default,
            } => {
                assert_eq!(k, "k");
                assert_eq!(routes, &[("x".to_string(), 1)]);
                assert_eq!(*default, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_router_needs_a_selector() {
        let e = only_error(&router("routes = { x = \"a\", y = \"b\" }"));
        assert_eq!(e.node.as_deref(), Some("r"));
        assert_eq!(e.field.as_deref(), Some("on"));
        assert_eq!(
            e.message,
            "a router needs 'on' (a state key) or 'when' (a CEL expression)"
        );
    }

    #[test]
    fn a_router_takes_on_or_when_not_both() {
        let e = only_error(&router(
            "on = \"k\"\nwhen = \"true ? 'x' : 'y'\"\nroutes = { x = \"a\", y = \"b\" }",
        ));
        assert_eq!(e.field.as_deref(), Some("on"));
        assert_eq!(
            e.message,
            "give either 'on' (a state key) or 'when' (an expression), not both"
        );
    }

    #[test]
    fn a_when_that_does_not_parse() {
        let e = only_error(&router("when = \"1 +\"\nroutes = { x = \"a\", y = \"b\" }"));
        assert_eq!(e.field.as_deref(), Some("when"));
        assert!(
            e.message.starts_with("the expression does not parse: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_selector_of_the_wrong_type_is_reported_twice() {
        let all = errors(&router("on = 1\nroutes = { x = \"a\", y = \"b\" }"));
        let at: Vec<_> = all
            .iter()
            .map(|e| (e.field.as_deref().unwrap(), e.message.as_str()))
            .collect();
        assert_eq!(
            at,
            [
                ("on", "must be a string, found a number"),
                (
                    "on",
                    "a router needs 'on' (a state key) or 'when' (a CEL expression)"
                )
            ]
        );
    }

    #[test]
    fn a_router_needs_routes() {
        let e = only_error(&router("on = \"k\"\ndefault = \"a\""));
        assert_eq!(e.field.as_deref(), Some("routes"));
        assert_eq!(e.message, "is required (route key = node id)");
    }

    #[test]
    fn routes_must_be_a_table() {
        let all = errors(&router("on = \"k\"\nroutes = [\"a\"]"));
        assert_eq!(all[0].field.as_deref(), Some("routes"));
        assert_eq!(all[0].message, "must be a table, found a list");
        assert_eq!(all[1].message, "is required (route key = node id)");
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn a_route_to_an_unknown_node() {
        let e = only_error(&router(
            "on = \"k\"\nroutes = { x = \"a\", y = \"b\", z = \"nowhere\" }",
        ));
        assert_eq!(e.field.as_deref(), Some("routes"));
        assert_eq!(
            e.message,
            "route 'z' goes to 'nowhere': no node has that id"
        );
    }

    #[test]
    fn a_route_must_name_a_node_id() {
        let e = only_error(&router(
            "on = \"k\"\nroutes = { x = \"a\", y = \"b\", z = 3 }",
        ));
        assert_eq!(e.field.as_deref(), Some("routes"));
        assert_eq!(e.message, "route 'z' must name a node id");
    }

    #[test]
    fn a_default_to_an_unknown_node() {
        let e = only_error(&router(
            "on = \"k\"\nroutes = { x = \"a\", y = \"b\" }\ndefault = \"nowhere\"",
        ));
        assert_eq!(e.field.as_deref(), Some("default"));
        assert_eq!(e.message, "no node has id 'nowhere'");
    }

    #[test]
    fn a_router_has_no_next() {
        let e = only_error(&router(
            "on = \"k\"\nroutes = { x = \"a\", y = \"b\" }\nnext = \"a\"",
        ));
        assert_eq!(e.field.as_deref(), Some("next"));
        assert_eq!(
            e.message,
            "unknown field for a router node (known: default, description, id, on, routes, type, when)"
        );
    }
}
