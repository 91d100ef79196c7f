//! One job from input to signed log: drives a [`Run`] step by step, appending every record to
//! the [`RunLog`], and writes the signed `run_<uuid>.json` however the run ends.

use crate::audit::runlog::{RunLogHeader, RunOutcome};
use crate::audit::write::write_atomic;
use crate::audit::{RunLog, Secret};
use crate::exec::{Run, RunStatus, StepEnv};
use crate::graph::Graph;
use crate::tools::Registry;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where and how run logs are written.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub log_dir: PathBuf,
    pub secret: Option<Secret>,
    /// fsync the log and its directory before the job counts as done.
    pub durable: bool,
    /// The daemon's group-commit writer; `None` writes each log directly (run-once).
    pub writer: Option<crate::audit::write::LogWriter>,
}

/// What a finished (or halted) job left behind.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub job_id: String,
    pub run_id: String,
    pub status: RunStatus,
    pub state: Map<String, Value>,
    pub log_path: PathBuf,
    pub signature: Option<String>,
    pub steps: usize,
    /// The last step record (a halted run's carries the `halt` marker).
    pub last_step: Option<Map<String, Value>>,
}

impl JobReport {
    pub fn status_name(&self) -> &'static str {
        self.status.name()
    }
}

/// A new log header for a run of `graph`.
pub fn log_header(run: &Run, user_id: Option<String>) -> RunLogHeader {
    RunLogHeader {
        run_id: run.run_id().to_string(),
        user_id,
        timestamp: crate::clock::now_utc(),
        job_id: run.job_id().to_string(),
        graph_name: run.graph().name.clone(),
        graph_digest: run.graph().digest.clone(),
    }
}

pub fn outcome_of(status: &RunStatus) -> RunOutcome {
    RunOutcome {
        status: status.name().to_string(),
        reason: match status {
            RunStatus::Failed { reason } => Some(reason.clone()),
            _ => None,
        },
    }
}

/// Signs and writes the log file for the run's current status.
pub fn write_run_log(
    log: &RunLog,
    status: &RunStatus,
    audit: &AuditSettings,
) -> std::io::Result<(PathBuf, Option<String>)> {
    let signed = log.sign(&outcome_of(status), audit.secret.as_ref());
    let name = format!("run_{}.json", log.header.run_id);
    let path = write_atomic(&audit.log_dir, &name, &signed.file_bytes, audit.durable)?;
    Ok((path, signed.signature))
}

/// How a drive ended.
pub enum Driven {
    /// The run reached an end (completed, failed or halted) and its log is written.
    Ended(Box<JobReport>),
    /// Cancelled between or during steps (shutdown): hand the job back; it resumes from its
    /// last checkpoint.
    Interrupted,
    /// The claim moved to another worker: stop, publish nothing.
    Fenced,
    /// A step's checkpoint could not be stored (a retry may help).
    StoreFailed(String),
    /// The store refused the step for good (corrupt data, a conflict): trying again would
    /// meet the same answer.
    StoreRefused(String),
}

/// When a drive stops early.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// Stop before the next step (shutdown with checkpoints: the job resumes elsewhere).
    pub at_boundary: tokio_util::sync::CancellationToken,
    /// Stop now, even mid-step (the drain deadline passed).
    pub abort: tokio_util::sync::CancellationToken,
}

/// Makes each step durable before the run moves on (the daemon's checkpoint + journal).
#[async_trait::async_trait]
pub trait StepSink: Send + Sync {
    async fn persist(&self, run: &Run, log: &RunLog) -> Result<(), PersistError>;
}

#[derive(Debug, Clone)]
pub enum PersistError {
    /// This worker no longer holds the job.
    Fenced,
    /// The store failed; a retry may help.
    Failed(String),
    /// The store refused the write for good (see [`crate::queue::QueueError::is_retryable`]).
    Refused(String),
}

impl PersistError {
    pub fn into_driven(self) -> Driven {
        match self {
            PersistError::Fenced => Driven::Fenced,
            PersistError::Failed(m) => Driven::StoreFailed(m),
            PersistError::Refused(m) => Driven::StoreRefused(m),
        }
    }
}

/// Runs `run` to its end, stopping early when `cancel` fires, then writes the signed log
/// (off the async threads: it may fsync).
pub async fn drive(
    mut run: Run,
    mut log: RunLog,
    registry: &Registry,
    audit: &AuditSettings,
    stops: &Stops,
    sink: Option<&dyn StepSink>,
) -> std::io::Result<Driven> {
    let env = StepEnv { registry };
    let cancel = &stops.abort;
    loop {
        if cancel.is_cancelled() || stops.at_boundary.is_cancelled() {
            return Ok(Driven::Interrupted);
        }
        let step = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(Driven::Interrupted),
            step = run.step(&env) => step,
        };
        match step {
            Some(step) => {
                log.append(step, audit.secret.as_ref());
                if let Some(sink) = sink {
                    if let Err(e) = sink.persist(&run, &log).await {
                        return Ok(e.into_driven());
                    }
                }
            }
            None => break,
        }
    }
    let status = run.status().clone();
    let (log_path, signature) = match &audit.writer {
        Some(writer) => {
            let signed = log.sign(&outcome_of(&status), audit.secret.as_ref());
            let name = format!("run_{}.json", log.header.run_id);
            let path = writer
                .write(
                    &audit.log_dir,
                    name,
                    signed.file_bytes,
                    log.len(),
                    audit.durable,
                )
                .await?;
            (path, signed.signature)
        }
        None => {
            let audit_owned = audit.clone();
            let log_ref = log.clone();
            tokio::task::spawn_blocking(move || write_run_log(&log_ref, &status, &audit_owned))
                .await
                .map_err(|e| std::io::Error::other(format!("log writer task failed: {e}")))??
        }
    };
    Ok(Driven::Ended(Box::new(JobReport {
        job_id: run.job_id().to_string(),
        run_id: run.run_id().to_string(),
        status: run.status().clone(),
        steps: log.len(),
        last_step: log.take_last_step(),
        state: run.into_state(),
        log_path,
        signature,
    })))
}

/// Runs a whole job in memory (the `run-once` pattern): every step, then the signed log.
pub async fn run_job(
    graph: Arc<Graph>,
    registry: &Registry,
    job_id: &str,
    input: Map<String, Value>,
    user_id: Option<String>,
    audit: &AuditSettings,
) -> std::io::Result<JobReport> {
    let run_id = crate::ids::new_id();
    let mut run = Run::new(graph, job_id, run_id, input);
    let mut log = RunLog::new(log_header(&run, user_id));
    let env = StepEnv { registry };
    while let Some(step) = run.step(&env).await {
        log.append(step, audit.secret.as_ref());
    }
    let (log_path, signature) = write_run_log(&log, run.status(), audit)?;
    Ok(JobReport {
        job_id: job_id.to_string(),
        run_id: run.run_id().to_string(),
        status: run.status().clone(),
        steps: log.len(),
        last_step: log.take_last_step(),
        state: run.into_state(),
        log_path,
        signature,
    })
}

/// Log files live under `dir`; used by tests and the CLI to find one by run id.
pub fn log_path(dir: &Path, run_id: &str) -> PathBuf {
    dir.join(format!("run_{run_id}.json"))
}
