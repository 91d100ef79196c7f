//! A job's attempt history: each failed attempt's number, time and error. Kept in the queue's
//! store with the job, carried by pending records, and shown in dead letters, so an operator
//! sees why a job gave up. A leaf module: the queue and the durable records both hold it.

use serde::{Deserialize, Serialize};

/// One earlier attempt, kept with the job so a dead letter carries its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub at: String,
    pub error: String,
}
