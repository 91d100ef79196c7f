//! Durable runs: a signed checkpoint after every step (with the step's chained audit record
//! journaled beside it in the same write), resume after a crash without replaying a completed
//! step, and the human-approval pause that acks the message and waits as data, not as a
//! blocked thread.

pub mod checkpoint;
pub mod pending;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointRef};
pub use pending::{DecisionRequest, Pending};
