//! Rust tools registered by name, so a program embedding the crate can open the node set.

use super::ToolFailure;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A tool implemented in Rust. It receives the node's named inputs as an object.
pub trait NativeTool: Send + Sync {
    fn call(&self, inputs: &Map<String, Value>) -> Result<Value, ToolFailure>;
}

/// Adapts a closure into a [`NativeTool`].
pub struct FnTool<F>(pub F);

impl<F> NativeTool for FnTool<F>
where
    F: Fn(&Map<String, Value>) -> Result<Value, ToolFailure> + Send + Sync,
{
    fn call(&self, inputs: &Map<String, Value>) -> Result<Value, ToolFailure> {
        (self.0)(inputs)
    }
}

/// Named Rust tools. Cheap to clone (shared entries).
#[derive(Clone, Default)]
pub struct Registry {
    tools: BTreeMap<String, Arc<dyn NativeTool>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry with the tools that ship with the binary (see [`super::builtin`]).
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        super::builtin::register(&mut r);
        r
    }

    pub fn register(&mut self, name: impl Into<String>, tool: impl NativeTool + 'static) {
        self.tools.insert(name.into(), Arc::new(tool));
    }

    /// Registers a closure as a tool.
    pub fn register_fn<F>(&mut self, name: impl Into<String>, f: F)
    where
        F: Fn(&Map<String, Value>) -> Result<Value, ToolFailure> + Send + Sync + 'static,
    {
        self.register(name, FnTool(f));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn NativeTool>> {
        self.tools.get(name)
    }

    /// Calls the tool registered as `name`. A tool that panics fails like any other tool (its
    /// message becomes `last_error`) instead of taking the job's task down with it.
    pub fn call(&self, name: &str, inputs: &Map<String, Value>) -> Result<Value, ToolFailure> {
        let tool = self.get(name).ok_or_else(|| {
            ToolFailure(format!("tool '{name}' is not registered in this worker"))
        })?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tool.call(inputs))).unwrap_or_else(
            |panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_string());
                Err(ToolFailure(format!("tool '{name}' panicked: {why}")))
            },
        )
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }
}

/// Graph loading checks `tool` names against the registry.
impl crate::graph::load::KnownTools for Registry {
    fn contains(&self, name: &str) -> bool {
        Registry::contains(self, name)
    }
    fn names(&self) -> Vec<&str> {
        Registry::names(self)
    }
}
