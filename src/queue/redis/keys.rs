//! The names of a queue's Redis keys (the module doc of `redis` lists what each holds). The run
//! keys (`Q:run:<job>`, `Q:epochs`, `Q:epoch_seq`) are named by the run store, which shares them.

use crate::queue::run_store::redis::{epoch_seq_key, epochs_key};
use crate::queue::QueueNames;

pub(super) fn keys(q: &QueueNames, worker: &str) -> Keys {
    let p = &q.jobs;
    Keys {
        queue: p.clone(),
        processing: format!("{p}:processing:{worker}"),
        processing_prefix: format!("{p}:processing:"),
        leases: format!("{p}:leases"),
        claims: format!("{p}:claims"),
        owners: format!("{p}:owners"),
        epochs: epochs_key(q),
        epoch_seq: epoch_seq_key(q),
        delayed: format!("{p}:delayed"),
        dead: format!("{p}:dead"),
        workers: format!("{p}:workers"),
        heartbeat_prefix: format!("{p}:hb:"),
        pending: format!("{p}:pending"),
        decided: format!("{p}:decided"),
        recoveries: format!("{p}:recoveries"),
        results: q.results.clone(),
    }
}

pub(super) struct Keys {
    pub(super) queue: String,
    pub(super) processing: String,
    pub(super) processing_prefix: String,
    pub(super) leases: String,
    pub(super) claims: String,
    pub(super) owners: String,
    pub(super) epoch_seq: String,
    pub(super) epochs: String,
    pub(super) delayed: String,
    pub(super) dead: String,
    pub(super) workers: String,
    pub(super) heartbeat_prefix: String,
    pub(super) pending: String,
    pub(super) decided: String,
    /// id → how many of the job's claims the reaper took back from a holder that did not end
    /// them (see `Claim::recoveries`); the entry goes when the job's life ends.
    pub(super) recoveries: String,
    pub(super) results: String,
}
