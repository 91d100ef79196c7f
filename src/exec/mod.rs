//! The executor: runs a graph one node at a time and yields a Lár step record per step
//! (Lár's `run_step_by_step`). A [`Run`] owns its state; its [`RunPosition`] is everything a
//! checkpoint needs to resume it after a crash or a human pause.

mod batch;
mod budget;
pub mod diff;
mod llm;
mod node;
pub mod run;
pub mod snapshot;
pub mod step;

pub use run::{Decision, DecisionError, Run, RunPosition, RunStatus, StepEnv};
pub use step::StepRecord;
