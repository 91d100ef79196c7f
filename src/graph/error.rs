//! Validation errors that name the file, the node and the field, as a user needs to fix them.

use std::fmt;

/// One problem found in a graph file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    pub file: String,
    pub node: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(node) = &self.node {
            write!(f, ": node '{node}'")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field '{field}'")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one graph file (validation does not stop at the first).
#[derive(Debug, Clone, thiserror::Error)]
pub struct GraphErrors(pub Vec<GraphError>);

impl fmt::Display for GraphErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
