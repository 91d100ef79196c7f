//! Recording a human decision, the one path shared by `lar-worker decide`, the decisions queue
//! and expiry: the job must be pending and the choice allowed; then the pending record goes and
//! the job is queued to resume, atomically.

use crate::audit::Secret;
use crate::durable::Pending;
use crate::exec::Decision;
use crate::queue::{Backend, QueueError, QueueNames};

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no pending decision for job {0}: unknown job, or already decided")]
    NotPending(String),
    #[error("'{choice}' is not an allowed choice for job {job_id} (allowed: {allowed}); the job stays pending")]
    InvalidChoice {
        job_id: String,
        choice: String,
        allowed: String,
    },
    #[error("the pending record of job {job_id} is unreadable: {reason}")]
    Unreadable { job_id: String, reason: String },
    #[error(transparent)]
    Store(#[from] QueueError),
}

/// Reads a job's pending record, if any.
pub async fn pending_of(
    backend: &dyn Backend,
    q: &QueueNames,
    job_id: &str,
) -> Result<Option<Pending>, Refusal> {
    // A backend that cannot pause has no job waiting.
    let Some(pauses) = backend.pauses() else {
        return Ok(None);
    };
    match pauses.get_pending(q, job_id).await? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| Refusal::Unreadable {
                job_id: job_id.to_string(),
                reason: e.to_string(),
            }),
    }
}

/// Validates and submits `decision` for `job_id` on queue `q`, signed with `secret` (the
/// workers' secret: with one, they apply only decisions signed with it).
pub async fn submit(
    backend: &dyn Backend,
    q: &QueueNames,
    job_id: &str,
    decision: &Decision,
    secret: Option<&Secret>,
) -> Result<(), Refusal> {
    let pending = pending_of(backend, q, job_id)
        .await?
        .ok_or_else(|| Refusal::NotPending(job_id.to_string()))?;
    submit_for(backend, q, &pending, decision, secret).await
}

/// As [`submit`], with the pending record already read.
pub async fn submit_for(
    backend: &dyn Backend,
    q: &QueueNames,
    pending: &Pending,
    decision: &Decision,
    secret: Option<&Secret>,
) -> Result<(), Refusal> {
    if !pending.request.choices.contains(&decision.choice) {
        return Err(Refusal::InvalidChoice {
            job_id: pending.job_id.clone(),
            choice: decision.choice.clone(),
            allowed: pending.request.choices.join(", "),
        });
    }
    let mut decision = Decision {
        step: Some(pending.step),
        ..decision.clone()
    };
    if let Some(secret) = secret {
        decision.sign(&pending.job_id, secret);
    }
    let pauses = backend.pauses().ok_or_else(|| {
        QueueError::Unsupported(format!("the {} backend cannot pause jobs", backend.kind()))
    })?;
    if pauses.submit_decision(q, pending, &decision).await? {
        Ok(())
    } else {
        Err(Refusal::NotPending(pending.job_id.clone()))
    }
}
