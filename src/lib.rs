//! lar-worker: runs Lár agent graphs as a durable queue service.
//!
//! A job's path, and where each part lives (`docs/architecture.md` walks it in full and keeps
//! the glossary of the words the comments use):
//!
//! ```text
//! claim ──► process ──► execute ──► save each step ──► write the signed log ──► finish
//! worker/   worker/     exec/,      worker/process.rs  audit/write.rs           worker/outcome.rs
//! lease.rs  process.rs  job.rs      → queue::Runs                               → queue/finish.rs
//! ```
//!
//! # Layout, bottom up
//!
//! Leaves, used by everything above:
//! - [`json`]: Python-compatible canonical JSON (the bytes Lár signs).
//! - [`clock`], [`signing`] (the HMAC key), [`attempt`] (a job's attempt history),
//!   [`backoff`] (the one backoff policy), [`ids`], [`telemetry`].
//!
//! The run:
//! - [`net`]: outbound HTTP (LLM providers, `http` tools): retries, timeouts, secrets, url
//!   masking.
//! - [`graph`]: the graph file format, loaded by node kind into a validated typed graph.
//! - [`tools`], [`llm`]: external programs, HTTP and registered Rust tools; LLM providers.
//! - [`exec`]: the step-by-step executor and Lár's step records.
//! - [`audit`]: run logs, the authority ledger, atomic writes, the verifier.
//! - [`job`]: one job from input to signed log.
//! - [`durable`]: the signed checkpoint and the pending record of a paused job.
//!
//! The service:
//! - [`queue`]: the backend roles (consumer, admin, runs, pauses), the finish rules, and the
//!   backends: `embedded` (SQLite), `redis`, `amqp`, with the run stores they share.
//! - [`decide`]: recording a human decision, the one path every door takes.
//! - [`config`]: `workers.toml`; [`wiring`]: a config turned into a live backend.
//! - [`ops`]: sd_notify, `/live`, `/ready`, `/metrics`.
//! - [`worker`]: the daemon: claim loops, leases, liveness, outcomes, drain.
//! - [`cli`]: the `lar-worker` command.
//!
//! No two of these modules import each other, directly or around a circle.

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
