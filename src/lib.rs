//! lar-worker: runs Lár agent graphs as a durable queue service.
//!
//! The layers, bottom up:
//! - [`json`]: Python-compatible canonical JSON (the bytes Lár signs).
//! - [`audit`]: the HMAC secret, run logs, the authority ledger, verification.
//! - [`graph`]: the graph file format, loaded into a validated typed graph.
//! - [`net`]: outbound HTTP (LLM providers, `http` tools): retries, timeouts, secrets.
//! - [`tools`]: external-program, HTTP and registered Rust tools.
//! - [`exec`]: the step-by-step executor.
//! - [`job`]: one job from input to signed log.
//! - [`cli`]: the `lar-worker` command.

pub mod attempt;
pub mod audit;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decide;
pub mod durable;
pub mod exec;
pub mod graph;
pub mod ids;
pub mod job;
pub mod json;
pub mod llm;
pub mod net;
pub mod ops;
pub mod queue;
pub mod signing;
pub mod telemetry;
pub mod tools;
pub mod wiring;
pub mod worker;
