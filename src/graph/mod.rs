//! Graphs: the user's file format (`shared/GRAPH_FORMAT.md`), loaded into a typed, validated
//! [`Graph`] that the executor can run without any further checks.

pub mod error;
pub mod expr;
pub mod load;
pub mod manifest;
pub mod model;
mod reader;
pub mod template;

pub use error::{GraphError, GraphErrors};
pub use load::{load_graph_file, parse_graph};
pub use model::{
    BranchPos, Graph, HttpToolSpec, JuryExpiry, LlmSpec, Node, NodeKind, ProviderSpec,
    RouteSelector, ToolBinding, ToolSpec,
};
pub use template::Template;
