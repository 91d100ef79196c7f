//! The `[[queues]]` sections (a jobs queue, its results, its graphs, its decisions), their
//! checks, and the queues with their graphs loaded ([`load_queues`]).

use super::{Config, ConfigError};
use crate::graph::{load_graph_file, Graph};
use crate::tools::Registry;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How messages on a queue are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The message is the initial state; the result is the final state (the seed's format).
    #[default]
    State,
    /// `{"id", "graph", "input", "user_id"}` in, `{"job_id", "run_id", "status", ...}` out.
    Envelope,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// The list/queue producers push to, e.g. `agent:jobs`.
    pub name: String,
    /// Where results go, e.g. `agent:results`.
    pub results: String,
    #[serde(default)]
    pub payload: PayloadFormat,
    /// The graph for state payloads, and for envelopes that name none.
    pub graph: Option<PathBuf>,
    /// Graphs an envelope may name: `{ loan_review = "graphs/loan_review.toml" }`.
    #[serde(default)]
    pub graphs: BTreeMap<String, PathBuf>,
    /// Where human decisions arrive as messages `{"job_id", "choice", "rationale", "by",
    /// "role"}`; replies (accepted/rejected) go to `<decisions>:replies`.
    pub decisions: Option<String>,
}

impl QueueSection {
    /// Checks the `i`th queue; `seen` holds the names of the queues before it (a name given
    /// twice is reported after the queue's own names are checked, before its graphs).
    fn validate(&self, i: usize, seen: &mut HashSet<String>) -> Result<(), String> {
        if self.name.is_empty() || self.results.is_empty() {
            return Err(format!(
                "queues[{i}]: 'name' and 'results' must not be empty"
            ));
        }
        if self.name == self.results {
            return Err(format!(
                "queues[{i}] ({}): 'results' must differ from 'name'",
                self.name
            ));
        }
        if !seen.insert(self.name.clone()) {
            return Err(format!(
                "queues[{i}]: the queue '{}' is configured twice",
                self.name
            ));
        }
        if self.graph.is_none() && self.graphs.is_empty() {
            return Err(format!(
                "queues[{i}] ({}): needs 'graph' or 'graphs'",
                self.name
            ));
        }
        if self.payload == PayloadFormat::State && self.graph.is_none() {
            return Err(format!(
                "queues[{i}] ({}): a 'state' payload queue needs 'graph' (the message carries no graph name)",
                self.name
            ));
        }
        Ok(())
    }
}

/// Checks the `[[queues]]` list: at least one queue, each valid, no name twice. Returns the
/// first problem, in the order of the list.
pub(super) fn validate_queues(queues: &[QueueSection]) -> Result<(), String> {
    if queues.is_empty() {
        return Err("queues: at least one [[queues]] entry is required".into());
    }
    let mut names = HashSet::new();
    for (i, q) in queues.iter().enumerate() {
        q.validate(i, &mut names)?;
    }
    Ok(())
}

/// A queue with its graphs loaded and validated.
#[derive(Debug, Clone)]
pub struct LoadedQueue {
    pub names: crate::queue::QueueNames,
    pub payload: PayloadFormat,
    pub default_graph: Option<Arc<Graph>>,
    pub graphs: HashMap<String, Arc<Graph>>,
    /// The decisions queue and its replies, when configured.
    pub decisions: Option<crate::queue::QueueNames>,
}

impl LoadedQueue {
    /// The graph an envelope names (by its config key or the graph's own name).
    pub fn graph_named(&self, name: &str) -> Option<&Arc<Graph>> {
        self.graphs
            .get(name)
            .or_else(|| self.default_graph.as_ref().filter(|g| g.name == name))
    }
}

/// Loads every graph the queues name, collecting all errors.
pub fn load_queues(cfg: &Config, registry: &Registry) -> Result<Vec<LoadedQueue>, ConfigError> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut load = |p: &Path| match load_graph_file(p, registry) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    for q in &cfg.queues {
        let default_graph = q.graph.as_deref().and_then(&mut load);
        let mut graphs = HashMap::new();
        for (name, path) in &q.graphs {
            if let Some(g) = load(path) {
                graphs.insert(name.clone(), g);
            }
        }
        out.push(LoadedQueue {
            names: crate::queue::QueueNames {
                jobs: q.name.clone(),
                results: q.results.clone(),
            },
            payload: q.payload,
            default_graph,
            graphs,
            decisions: q.decisions.as_ref().map(|d| crate::queue::QueueNames {
                jobs: d.clone(),
                results: format!("{d}:replies"),
            }),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError::Graph(errors.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid state-payload queue `name`.
    fn queue(name: &str) -> QueueSection {
        QueueSection {
            name: name.to_string(),
            results: format!("{name}:results"),
            payload: PayloadFormat::State,
            graph: Some(PathBuf::from("g.toml")),
            graphs: BTreeMap::new(),
            decisions: None,
        }
    }

    /// The error of the list of a valid queue `a` and `b` changed by `change`.
    fn error(change: impl FnOnce(&mut QueueSection)) -> String {
        let mut b = queue("b");
        change(&mut b);
        validate_queues(&[queue("a"), b]).unwrap_err()
    }

    #[test]
    fn valid_queues() {
        assert_eq!(validate_queues(&[queue("a"), queue("b")]), Ok(()));
        let mut envelope = queue("e");
        envelope.payload = PayloadFormat::Envelope;
        envelope.graph = None;
        envelope.graphs.insert("g".into(), PathBuf::from("g.toml"));
        assert_eq!(validate_queues(&[envelope]), Ok(()));
    }

    #[test]
    fn at_least_one_queue() {
        assert_eq!(
            validate_queues(&[]).unwrap_err(),
            "queues: at least one [[queues]] entry is required"
        );
    }

    #[test]
    fn names_are_set_distinct_and_unique() {
        let empty = "queues[1]: 'name' and 'results' must not be empty";
        assert_eq!(error(|q| q.name.clear()), empty);
        assert_eq!(error(|q| q.results.clear()), empty);
        assert_eq!(
            error(|q| q.results = "b".into()),
            "queues[1] (b): 'results' must differ from 'name'"
        );
        assert_eq!(
            error(|q| q.name = "a".into()),
            "queues[1]: the queue 'a' is configured twice"
        );
    }

    #[test]
    fn a_queue_needs_its_graphs() {
        assert_eq!(
            error(|q| q.graph = None),
            "queues[1] (b): needs 'graph' or 'graphs'"
        );
        assert_eq!(
            error(|q| {
                q.graph = None;
                q.graphs.insert("g".into(), PathBuf::from("g.toml"));
            }),
            "queues[1] (b): a 'state' payload queue needs 'graph' (the message carries no graph name)"
        );
    }

    #[test]
    fn a_name_given_twice_is_reported_before_the_graphs() {
        assert_eq!(
            error(|q| {
                q.name = "a".into();
                q.graph = None;
            }),
            "queues[1]: the queue 'a' is configured twice"
        );
        assert_eq!(
            error(|q| {
                q.results = "b".into();
                q.graph = None;
            }),
            "queues[1] (b): 'results' must differ from 'name'"
        );
    }

    #[test]
    fn an_envelope_names_its_graph_by_key_or_by_the_graphs_own_name() {
        let registry = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "name = \"loan\"\nentry = \"a\"\n[[nodes]]\nid = \"a\"\ntype = \"clear_error\"\n",
        )
        .unwrap();
        let graph = Arc::new(load_graph_file(&path, &registry).unwrap());
        let q = LoadedQueue {
            names: crate::queue::QueueNames {
                jobs: "j".into(),
                results: "r".into(),
            },
            payload: PayloadFormat::Envelope,
            default_graph: Some(graph.clone()),
            graphs: HashMap::from([("review".to_string(), graph)]),
            decisions: None,
        };
        assert!(q.graph_named("review").is_some());
        assert!(q.graph_named("loan").is_some());
        assert!(q.graph_named("other").is_none());
    }
}
