//! The `batch` node (Lár's BatchNode): runs its `branches`, each a chain of nodes, at once on
//! copies of the state. Its fields are read with the other nodes'; which nodes may run in a
//! branch is checked once every node is read ([`check_batches`]).

use super::{successors, NodeContext};
use crate::graph::error::GraphError;
use crate::graph::model::{BranchPos, Node, NodeKind};
use crate::graph::reader::FieldReader;
use serde_json::Value;
use std::collections::HashMap;

/// A `batch` node: `branches` (required: a non-empty list of non-empty lists of node ids) and
/// `error`.
pub(super) fn batch_node(r: &mut FieldReader, ctx: &NodeContext) -> Option<NodeKind> {
    let mut branches = Vec::new();
    match r.value("branches") {
        Some(Value::Array(items)) if !items.is_empty() => {
            for (b, item) in items.iter().enumerate() {
                let ids = match item {
                    Value::Array(ids) if !ids.is_empty() => ids,
                    _ => {
                        r.error(
                            Some("branches"),
                            format!("branch {} must be a non-empty list of node ids", b + 1),
                        );
                        continue;
                    }
                };
                let mut chain = Vec::with_capacity(ids.len());
                for v in ids {
                    match v.as_str().map(|s| (s, ctx.index.get(s))) {
                        Some((_, Some(i))) => chain.push(*i),
                        Some((s, None)) => r.error(
                            Some("branches"),
                            format!("branch {}: no node has id '{s}'", b + 1),
                        ),
                        None => r.error(
                            Some("branches"),
                            format!("branch {}: node ids must be strings", b + 1),
                        ),
                    }
                }
                branches.push(chain);
            }
        }
        _ => r.error(
            Some("branches"),
            "is required: a non-empty list of branches, each a list of node ids ([[\"a\", \"b\"], [\"c\"]])",
        ),
    }
    let error = ctx.error_target(r);
    Some(NodeKind::Batch { branches, error })
}

/// Checks batch branches: each branch node exists once in one branch, is of a kind that can run
/// there, has no `next`/`error` of its own (the branch order decides), and nothing else leads
/// to it. Returns where every branch node runs.
pub(super) fn check_batches(
    file: &str,
    nodes: &[Node],
    entry: Option<usize>,
    errors: &mut Vec<GraphError>,
) -> HashMap<usize, BranchPos> {
    let mut branch_of: HashMap<usize, BranchPos> = HashMap::new();
    let mut err = |node: &str, field: Option<&str>, message: String| {
        errors.push(GraphError {
            file: file.to_string(),
            node: Some(node.to_string()),
            field: field.map(str::to_string),
            message,
        })
    };
    for (b_idx, batch) in nodes.iter().enumerate() {
        let NodeKind::Batch { branches, .. } = &batch.kind else {
            continue;
        };
        for (branch, chain) in branches.iter().enumerate() {
            for (position, &n) in chain.iter().enumerate() {
                let node = &nodes[n];
                let here = format!("branch {}", branch + 1);
                if n == b_idx {
                    err(
                        &batch.id,
                        Some("branches"),
                        format!("{here}: a batch cannot run itself"),
                    );
                    continue;
                }
                if let Some(prev) = branch_of.get(&n) {
                    err(
                        &batch.id,
                        Some("branches"),
                        format!(
                            "{here}: '{}' already runs in batch '{}' branch {}; a node can be in one branch only",
                            node.id,
                            nodes[prev.batch].id,
                            prev.branch + 1
                        ),
                    );
                    continue;
                }
                branch_of.insert(
                    n,
                    BranchPos {
                        batch: b_idx,
                        branch,
                        position,
                    },
                );
                match &node.kind {
                    NodeKind::Set { .. }
                    | NodeKind::Tool { .. }
                    | NodeKind::ClearError
                    | NodeKind::Llm { .. }
                    | NodeKind::Reduce { .. } => {}
                    other => err(
                        &node.id,
                        Some("type"),
                        format!(
                            "a {} node cannot run inside batch '{}' (branches may hold set, tool, clear_error, llm and reduce nodes)",
                            other.type_name(),
                            batch.id
                        ),
                    ),
                }
                if node.next.is_some() {
                    err(
                        &node.id,
                        Some("next"),
                        format!(
                            "runs inside batch '{}' ({here}), where the branch list decides the order: remove 'next'",
                            batch.id
                        ),
                    );
                }
                if node.kind.error_target().is_some() {
                    err(
                        &node.id,
                        Some("error"),
                        format!(
                            "runs inside batch '{}' ({here}): a failure stops the branch and the batch's own 'error' handles it; remove 'error'",
                            batch.id
                        ),
                    );
                }
            }
        }
    }
    for node in nodes {
        for s in successors(node) {
            if let Some(pos) = branch_of.get(&s) {
                err(
                    &node.id,
                    None,
                    format!(
                        "leads to '{}', which runs only inside batch '{}' (branch {}); branch nodes cannot be reached otherwise",
                        nodes[s].id,
                        nodes[pos.batch].id,
                        pos.branch + 1
                    ),
                );
            }
        }
    }
    if let Some(e) = entry.filter(|e| branch_of.contains_key(e)) {
        errors.push(GraphError {
            file: file.to_string(),
            node: None,
            field: Some("entry".into()),
            message: format!(
                "'{}' runs inside a batch branch and cannot be the entry",
                nodes[e].id
            ),
        });
    }
    branch_of
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load, only_error};
    use crate::graph::NodeKind;

    /// The two set nodes `x` and `y` a batch can run.
    const SETS: &str = "[[nodes]]\nid = \"x\"\ntype = \"set\"\nkey = \"x\"\nvalue = 1\n\
                        [[nodes]]\nid = \"y\"\ntype = \"set\"\nkey = \"y\"\nvalue = 2\n";

    /// A graph whose entry is a batch node `b` with the given fields, then `more` nodes.
    fn batch(fields: &str, more: &str) -> String {
        format!("entry = \"b\"\n[[nodes]]\nid = \"b\"\ntype = \"batch\"\n{fields}\n{more}")
    }

    #[test]
    fn a_batch_loads_and_its_branch_nodes_are_placed() {
        let g = load(&batch("branches = [[\"x\", \"y\"]]", SETS)).unwrap();
        match &g.nodes[0].kind {
            NodeKind::Batch { branches, error } => {
                assert_eq!(branches, &[vec![1, 2]]);
                assert_eq!(*error, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(g.branch_of[&2].position, 1);
    }

    #[test]
    fn a_batch_needs_branches() {
        let message = "is required: a non-empty list of branches, each a list of node ids ([[\"a\", \"b\"], [\"c\"]])";
        for fields in ["", "branches = []", "branches = \"x\""] {
            let e = only_error(&batch(fields, SETS));
            assert_eq!(e.node.as_deref(), Some("b"));
            assert_eq!(e.field.as_deref(), Some("branches"));
            assert_eq!(e.message, message, "{fields}");
        }
    }

    #[test]
    fn each_branch_is_a_non_empty_list_of_known_ids() {
        let e = only_error(&batch("branches = [[\"x\"], []]", SETS));
        assert_eq!(e.message, "branch 2 must be a non-empty list of node ids");
        let e = only_error(&batch("branches = [\"x\"]", SETS));
        assert_eq!(e.message, "branch 1 must be a non-empty list of node ids");
        let e = only_error(&batch("branches = [[\"x\", \"z\"]]", SETS));
        assert_eq!(e.field.as_deref(), Some("branches"));
        assert_eq!(e.message, "branch 1: no node has id 'z'");
        let e = only_error(&batch("branches = [[\"x\"], [\"y\", 3]]", SETS));
        assert_eq!(e.message, "branch 2: node ids must be strings");
    }

    #[test]
    fn an_error_target_that_does_not_exist() {
        let e = only_error(&batch("branches = [[\"x\"]]\nerror = \"nowhere\"", SETS));
        assert_eq!(e.field.as_deref(), Some("error"));
        assert_eq!(e.message, "no node has id 'nowhere'");
    }

    #[test]
    fn a_batch_rejects_unknown_fields() {
        let e = only_error(&batch("branches = [[\"x\"]]\nbranch = 1", SETS));
        assert_eq!(e.field.as_deref(), Some("branch"));
        assert_eq!(
            e.message,
            "unknown field for a batch node (known: branches, description, error, id, next, type)"
        );
    }

    #[test]
    fn a_batch_cannot_run_itself() {
        let e = only_error(&batch("branches = [[\"b\"]]", SETS));
        assert_eq!(e.node.as_deref(), Some("b"));
        assert_eq!(e.field.as_deref(), Some("branches"));
        assert_eq!(e.message, "branch 1: a batch cannot run itself");
    }

    #[test]
    fn a_node_runs_in_one_branch_only() {
        let e = only_error(&batch("branches = [[\"x\"], [\"y\", \"x\"]]", SETS));
        assert_eq!(e.node.as_deref(), Some("b"));
        assert_eq!(e.field.as_deref(), Some("branches"));
        assert_eq!(
            e.message,
            "branch 2: 'x' already runs in batch 'b' branch 1; a node can be in one branch only"
        );
    }

    #[test]
    fn only_some_kinds_run_in_a_branch() {
        let jury =
            "[[nodes]]\nid = \"j\"\ntype = \"human_jury\"\nprompt = \"?\"\nchoices = [\"a\"]\n";
        let e = only_error(&batch("branches = [[\"j\"]]", jury));
        assert_eq!(e.node.as_deref(), Some("j"));
        assert_eq!(e.field.as_deref(), Some("type"));
        assert_eq!(
            e.message,
            "a human_jury node cannot run inside batch 'b' (branches may hold set, tool, clear_error, llm and reduce nodes)"
        );
    }

    #[test]
    fn a_branch_node_has_no_next_or_error() {
        let e = only_error(&batch(
            "branches = [[\"x\"]]",
            "[[nodes]]\nid = \"x\"\ntype = \"set\"\nkey = \"x\"\nvalue = 1\nnext = \"b\"\n",
        ));
        assert_eq!(e.node.as_deref(), Some("x"));
        assert_eq!(e.field.as_deref(), Some("next"));
        assert_eq!(
            e.message,
            "runs inside batch 'b' (branch 1), where the branch list decides the order: remove 'next'"
        );
        let e = only_error(&batch(
            "branches = [[\"t\"]]",
            "[[nodes]]\nid = \"t\"\ntype = \"tool\"\ntool = \"echo\"\nerror = \"b\"\n",
        ));
        assert_eq!(e.node.as_deref(), Some("t"));
        assert_eq!(e.field.as_deref(), Some("error"));
        assert_eq!(
            e.message,
            "runs inside batch 'b' (branch 1): a failure stops the branch and the batch's own 'error' handles it; remove 'error'"
        );
    }

    #[test]
    fn a_branch_node_cannot_be_reached_otherwise() {
        let e = only_error(&batch("branches = [[\"x\"]]\nnext = \"x\"", SETS));
        assert_eq!(e.node.as_deref(), Some("b"));
        assert_eq!(e.field, None);
        assert_eq!(
            e.message,
            "leads to 'x', which runs only inside batch 'b' (branch 1); branch nodes cannot be reached otherwise"
        );
        let all =
            errors(&batch("branches = [[\"x\"]]", SETS).replace("entry = \"b\"", "entry = \"x\""));
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].node, None);
        assert_eq!(all[0].field.as_deref(), Some("entry"));
        assert_eq!(
            all[0].message,
            "'x' runs inside a batch branch and cannot be the entry"
        );
    }
}
