//! The four roles of the embedded backend (consumer, admin, runs, pauses): each method hands
//! over to the part of this backend that does the work (claim.rs, finish.rs, runs.rs, admin.rs).

use super::finish::{finish_once, sqlite_seq};
use super::runs::save_step_once;
use super::EmbeddedBackend;
use crate::queue::{
    Admin, Backend, Claim, Consumer, Fenced, Finish, Pauses, QueueDepth, QueueError, QueueNames,
    Runs, StepWrite,
};
use async_trait::async_trait;
use std::time::Duration;

#[async_trait]
impl Consumer for EmbeddedBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn claim(
        &self,
        q: &QueueNames,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        self.claim_jobs(q, max, lease, wait).await
    }

    async fn extend(
        &self,
        q: &QueueNames,
        claims: &[(String, u64)],
        lease: Duration,
    ) -> Result<Vec<bool>, QueueError> {
        self.extend_leases(q, claims, lease).await
    }

    async fn finish(
        &self,
        q: &QueueNames,
        claim: &Claim,
        how: Finish,
    ) -> Result<Fenced, QueueError> {
        let seq = sqlite_seq(claim)?;
        let q = q.clone();
        let job_id = claim.job_id.clone();
        let epoch = claim.epoch;
        let readies = matches!(how, Finish::Retry { .. } | Finish::Release);
        self.with_conn_readying(
            move |conn, worker| finish_once(conn, worker, &q, seq, &job_id, epoch, how),
            move |fenced| readies && *fenced == Fenced::Done,
        )
        .await
    }

    async fn recover(&self, q: &QueueNames) -> Result<u64, QueueError> {
        self.recover_expired(q).await
    }
}

#[async_trait]
impl Admin for EmbeddedBackend {
    async fn redrive_dead_letter(&self, q: &QueueNames, job_id: &str) -> Result<bool, QueueError> {
        self.redrive_job(q, job_id).await
    }

    async fn enqueue(&self, q: &QueueNames, payload: &[u8]) -> Result<Option<String>, QueueError> {
        self.enqueue_job(q, payload).await
    }

    async fn depth(&self, q: &QueueNames) -> Result<QueueDepth, QueueError> {
        self.queue_depth(q).await
    }

    async fn results(
        &self,
        q: &QueueNames,
        max: usize,
        take: bool,
    ) -> Result<Vec<Vec<u8>>, QueueError> {
        self.read_results(q, max, take).await
    }

    async fn dead_letters(
        &self,
        q: &QueueNames,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, QueueError> {
        self.read_dead_letters(q, max).await
    }
}

#[async_trait]
impl Runs for EmbeddedBackend {
    async fn load_run(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<crate::queue::StoredRun>, QueueError> {
        let (queue, job_id) = (q.jobs.clone(), job_id.to_string());
        self.with_conn(move |conn, _| {
            crate::queue::run_store::sqlite::read_run(&conn.transaction()?, &queue, &job_id)
        })
        .await
    }

    async fn save_step(
        &self,
        q: &QueueNames,
        claim: &Claim,
        step: StepWrite<'_>,
    ) -> Result<Fenced, QueueError> {
        let (queue, job_id, epoch) = (q.jobs.clone(), claim.job_id.clone(), claim.epoch);
        let (index, record, checkpoint) =
            (step.index, step.record.to_vec(), step.checkpoint.to_vec());
        self.with_conn(move |conn, worker| {
            let step = StepWrite {
                index,
                record: &record,
                checkpoint: &checkpoint,
            };
            save_step_once(conn, worker, (&queue, &job_id, epoch), step)
        })
        .await
    }
}

#[async_trait]
impl Pauses for EmbeddedBackend {
    async fn list_pending(&self, q: &QueueNames) -> Result<Vec<Vec<u8>>, QueueError> {
        self.pending_records(q).await
    }

    async fn get_pending(
        &self,
        q: &QueueNames,
        job_id: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        self.pending_record(q, job_id).await
    }

    async fn submit_decision(
        &self,
        q: &QueueNames,
        pending: &crate::durable::Pending,
        decision: &crate::exec::Decision,
    ) -> Result<bool, QueueError> {
        self.resume_with_decision(q, pending, decision).await
    }
}

impl Backend for EmbeddedBackend {
    fn runs(&self) -> Option<&dyn Runs> {
        Some(self)
    }

    fn pauses(&self) -> Option<&dyn Pauses> {
        Some(self)
    }
}
