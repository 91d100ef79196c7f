//! Producer and operator commands on the configured backend: enqueue, results, dead-letters,
//! inspect.

use super::daemon::{load, runtime};
use super::exit;
use crate::config::LoadedQueue;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Args)]
pub struct QueueArgs {
    /// The worker configuration.
    #[arg(long, short, value_name = "FILE", default_value = "workers.toml")]
    pub config: PathBuf,
    /// The queue (its `name` in workers.toml); default: the first one.
    #[arg(long, short)]
    pub queue: Option<String>,
    /// How long to wait for the backend (to connect, and for each operation; `enqueue`: for
    /// each job's confirmation) before giving up with an error; 0 waits for ever. A frozen or
    /// unreachable server, or a broker blocking publishers (a memory or disk alarm), otherwise
    /// hangs the command.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

impl QueueArgs {
    fn frame(&self) -> Frame {
        Frame {
            config: self.config.clone(),
            timeout: self.timeout,
        }
    }
}

/// What [`with_all`] needs of a command's arguments (owned: the command's closure takes them).
struct Frame {
    config: PathBuf,
    timeout: u64,
}

impl Frame {
    fn limit(&self) -> Option<std::time::Duration> {
        (self.timeout > 0).then(|| std::time::Duration::from_secs(self.timeout))
    }
}

/// `fut`, given up on after `limit` (none: waits for ever).
async fn within<T>(
    limit: Option<std::time::Duration>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    match limit {
        Some(l) => tokio::time::timeout(l, fut).await,
        None => Ok(fut.await),
    }
}

/// What a command says when the backend did not answer in time: its outcome is unknown.
fn no_answer(a: &Frame) -> u8 {
    eprintln!(
        "error: no answer from the backend within {} s (--timeout): the server is unreachable, frozen or blocking clients; what this command asked for may or may not have happened",
        a.timeout
    );
    exit::ERROR
}

#[derive(Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub q: QueueArgs,
    /// Jobs: JSON objects, @FILE (one JSON per line), or - for stdin (one JSON per line).
    #[arg(required = true, value_name = "JSON|@FILE|-")]
    pub jobs: Vec<String>,
}

#[derive(Args)]
pub struct ResultsArgs {
    #[command(flatten)]
    pub q: QueueArgs,
    /// How many results at most.
    #[arg(long, default_value_t = 100)]
    pub max: usize,
    /// Remove the results it prints (consume them).
    #[arg(long)]
    pub take: bool,
}

#[derive(Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters with their reasons.
    List {
        #[command(flatten)]
        q: QueueArgs,
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Show one dead letter in full.
    Show {
        #[command(flatten)]
        q: QueueArgs,
        job_id: String,
    },
    /// Put a dead letter's payload back on its queue, byte for byte, after review.
    Redrive {
        #[command(flatten)]
        q: QueueArgs,
        job_id: String,
    },
}

fn pick<'a>(queues: &'a [LoadedQueue], name: Option<&str>) -> Result<&'a LoadedQueue, String> {
    match name {
        None => queues
            .first()
            .ok_or_else(|| "no queue configured".to_string()),
        Some(n) => queues.iter().find(|q| q.names.jobs == n).ok_or_else(|| {
            let names: Vec<&str> = queues.iter().map(|q| q.names.jobs.as_str()).collect();
            format!(
                "no queue '{n}' in the configuration (configured: {})",
                names.join(", ")
            )
        }),
    }
}

/// Collects and checks the jobs to push: each must be JSON (producers may push anything, but
/// this command refuses to push what it can already tell is broken).
fn collect_jobs(args: &[String]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut push_line = |line: &str, origin: &str| -> Result<(), String> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        serde_json::from_str::<Value>(line)
            .map_err(|e| format!("{origin}: not valid JSON: {e}"))?;
        out.push(line.as_bytes().to_vec());
        Ok(())
    };
    for a in args {
        if a == "-" {
            for (i, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.map_err(|e| format!("stdin: {e}"))?;
                push_line(&line, &format!("stdin line {}", i + 1))?;
            }
        } else if let Some(path) = a.strip_prefix('@') {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read '{path}': {e}"))?;
            for (i, line) in text.lines().enumerate() {
                push_line(line, &format!("{path} line {}", i + 1))?;
            }
        } else {
            push_line(a, "argument")?;
        }
    }
    Ok(out)
}

pub fn enqueue(a: EnqueueArgs) -> u8 {
    let jobs = match collect_jobs(&a.jobs) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let (limit, secs) = (a.q.frame().limit(), a.q.timeout);
    with_backend(&a.q, Scope::PerOperation, |backend, q| async move {
        let mut n = 0;
        for job in &jobs {
            match within(limit, backend.enqueue(&q.names, job)).await {
                Ok(Ok(Some(id))) => println!("{id}"),
                Ok(Ok(None)) => println!("queued"),
                Ok(Err(e)) => {
                    eprintln!("error: enqueue failed after {n} jobs: {e}");
                    return exit::ERROR;
                }
                Err(_) => {
                    eprintln!(
                        "error: job {} not confirmed within {secs} s (--timeout; is the server frozen, or the broker blocking publishers?): it may still be queued; the {n} jobs before it were",
                        n + 1
                    );
                    return exit::ERROR;
                }
            }
            n += 1;
        }
        eprintln!("{n} jobs queued on '{}'", q.names.jobs);
        exit::OK
    })
}

pub fn results(a: ResultsArgs) -> u8 {
    // Taking removes the results on the server: giving up before its answer arrives would lose
    // them, so `--take` waits for it (the connection is still bounded by `--timeout`).
    let scope = if a.take {
        Scope::PerOperation
    } else {
        Scope::Whole
    };
    with_backend(&a.q, scope, |backend, q| async move {
        match backend.results(&q.names, a.max, a.take).await {
            Ok(items) => {
                for r in items {
                    println!("{}", String::from_utf8_lossy(&r));
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::ERROR
            }
        }
    })
}

pub fn dead_letters(cmd: DeadLetterCommand) -> u8 {
    match cmd {
        DeadLetterCommand::Show { q, job_id } => {
            with_backend(&q, Scope::Whole, |backend, q| async move {
                match backend.dead_letters(&q.names, usize::MAX / 2).await {
                    Ok(items) => match items
                        .iter()
                        .find(|d| d.get("job_id").and_then(Value::as_str) == Some(&job_id))
                    {
                        Some(d) => {
                            println!("{}", serde_json::to_string_pretty(d).unwrap_or_default());
                            exit::OK
                        }
                        None => {
                            eprintln!(
                                "error: no dead letter with job id {job_id} on '{}'",
                                q.names.jobs
                            );
                            exit::USAGE
                        }
                    },
                    Err(e) => {
                        eprintln!("error: {e}");
                        exit::ERROR
                    }
                }
            })
        }
        DeadLetterCommand::Redrive { q, job_id } => {
            with_backend(&q, Scope::Whole, |backend, q| async move {
                match backend.redrive_dead_letter(&q.names, &job_id).await {
                    Ok(true) => {
                        println!(
                            "dead letter {job_id} is back on '{}' with its original payload",
                            q.names.jobs
                        );
                        exit::OK
                    }
                    Ok(false) => {
                        eprintln!(
                            "error: no dead letter with job id {job_id} on '{}'",
                            q.names.jobs
                        );
                        exit::USAGE
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        exit::ERROR
                    }
                }
            })
        }
        DeadLetterCommand::List { q, max } => {
            with_backend(&q, Scope::Whole, |backend, q| async move {
                match backend.dead_letters(&q.names, max).await {
                    Ok(items) => {
                        for d in items {
                            println!("{d}");
                        }
                        exit::OK
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        exit::ERROR
                    }
                }
            })
        }
    }
}

pub fn inspect(a: QueueArgs) -> u8 {
    with_all(a.frame(), Scope::Whole, |backend, queues| async move {
        let mut out = serde_json::Map::new();
        for q in &queues {
            if a.queue.as_deref().is_some_and(|n| n != q.names.jobs) {
                continue;
            }
            match backend.depth(&q.names).await {
                Ok(d) => {
                    out.insert(
                        q.names.jobs.clone(),
                        serde_json::to_value(d).unwrap_or(Value::Null),
                    );
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", q.names.jobs);
                    return exit::ERROR;
                }
            }
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(out)).unwrap_or_default()
        );
        exit::OK
    })
}

/// Where `--timeout` applies besides the connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// To the whole command (one or a few backend calls).
    Whole,
    /// The command applies it to each of its operations itself (`enqueue` of many jobs).
    PerOperation,
}

fn with_backend<F, Fut>(a: &QueueArgs, scope: Scope, f: F) -> u8
where
    F: FnOnce(std::sync::Arc<dyn crate::queue::Backend>, LoadedQueue) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    let name = a.queue.clone();
    with_all(a.frame(), scope, |backend, queues| async move {
        match pick(&queues, name.as_deref()) {
            Ok(q) => f(backend, q.clone()).await,
            Err(e) => {
                eprintln!("error: {e}");
                exit::USAGE
            }
        }
    })
}

/// The frame of every admin command: load and check the config, open its backend, run `f`,
/// each within `--timeout`.
fn with_all<F, Fut>(a: Frame, scope: Scope, f: F) -> u8
where
    F: FnOnce(std::sync::Arc<dyn crate::queue::Backend>, Vec<LoadedQueue>) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    let limit = a.limit();
    let loaded = match load(&a.config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let code = rt.block_on(async move {
        let connect =
            crate::wiring::connect_backend(&loaded.config, crate::telemetry::worker_identity());
        let backend = match within(limit, connect).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                eprintln!("error: cannot open the backend: {e}");
                return exit::ERROR;
            }
            Err(_) => return no_answer(&a),
        };
        let run = f(backend, loaded.queues);
        match scope {
            Scope::Whole => within(limit, run).await.unwrap_or_else(|_| no_answer(&a)),
            Scope::PerOperation => run.await,
        }
    });
    // A call given up on may still hold a blocking thread (SQLite): do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

#[derive(Args)]
pub struct DecideArgs {
    #[command(flatten)]
    pub q: QueueArgs,
    /// The job waiting for a decision (see `lar-worker pending`).
    pub job_id: String,
    /// One of the choices the jury node allows.
    #[arg(long)]
    pub choice: String,
    /// Why: recorded in the run log and the authority ledger.
    #[arg(long, default_value = "")]
    pub rationale: String,
    /// Who decides (recorded as the stakeholder id).
    #[arg(long, value_name = "ID")]
    pub by: String,
    /// The decider's role (recorded as the stakeholder role).
    #[arg(long)]
    pub role: Option<String>,
    /// The workers' secret signs the decision: workers with a secret apply only signed ones.
    #[command(flatten)]
    pub secret: super::secret::SecretArgs,
}

/// Records a human decision: checks the job waits and the choice is allowed, then queues the
/// job to resume (any replica picks it up), atomically with removing the pending record.
pub fn decide(a: DecideArgs) -> u8 {
    // The config alone (its secret settings); `with_all` below loads the graphs.
    let secret = match crate::config::Config::load(&a.q.config)
        .map_err(|e| e.to_string())
        .and_then(|c| a.secret.resolve_for(&c).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    with_all(a.q.frame(), Scope::Whole, |backend, queues| async move {
        use crate::decide::{pending_of, submit_for, Refusal};
        let decision = crate::exec::Decision {
            choice: a.choice.clone(),
            rationale: a.rationale.clone(),
            decided_by: a.by.clone(),
            role: a.role.clone(),
            step: None,
            signature: None,
        };
        // Every queue the job waits on first: one id pending on two queues (two producers
        // chose the same envelope id) must be named, not decided on whichever comes first.
        let mut waiting = Vec::new();
        for q in &queues {
            if a.q.queue.as_deref().is_some_and(|n| n != q.names.jobs) {
                continue;
            }
            match pending_of(backend.as_ref(), &q.names, &a.job_id).await {
                Ok(None) => {}
                Ok(Some(p)) => waiting.push((q, p)),
                Err(Refusal::Store(e)) => {
                    eprintln!("error: {e}");
                    return exit::ERROR;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::USAGE;
                }
            }
        }
        if waiting.len() > 1 {
            let names: Vec<&str> = waiting.iter().map(|(q, _)| q.names.jobs.as_str()).collect();
            eprintln!(
                "error: job {} waits for a decision on several queues ({}): name one with --queue",
                a.job_id,
                names.join(", ")
            );
            return exit::USAGE;
        }
        if let Some((q, p)) = waiting.pop() {
            let result =
                submit_for(backend.as_ref(), &q.names, &p, &decision, secret.as_ref()).await;
            return match result {
                Ok(()) => {
                    println!(
                        "decision '{}' recorded for job {}: it resumes at the next free worker",
                        a.choice, a.job_id
                    );
                    exit::OK
                }
                Err(Refusal::Store(e)) => {
                    eprintln!("error: {e}");
                    exit::ERROR
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::USAGE
                }
            };
        }
        eprintln!(
            "error: no pending decision for job {}: unknown job, or already decided",
            a.job_id
        );
        exit::USAGE
    })
}

/// Lists what waits for a human, one JSON object per line.
pub fn pending(a: QueueArgs) -> u8 {
    with_all(a.frame(), Scope::Whole, |backend, queues| async move {
        for q in &queues {
            if a.queue.as_deref().is_some_and(|n| n != q.names.jobs) {
                continue;
            }
            let Some(pauses) = backend.pauses() else {
                continue;
            };
            match pauses.list_pending(&q.names).await {
                Ok(items) => {
                    for raw in items {
                        match serde_json::from_slice::<crate::durable::Pending>(&raw) {
                            Ok(p) => println!(
                                "{}",
                                serde_json::json!({
                                    "job_id": p.job_id, "queue": p.queue, "run_id": p.run_id, "node": p.node,
                                    "prompt": p.request.prompt, "choices": p.request.choices,
                                    "context": p.request.context, "awaiting_since": p.awaiting_since,
                                    "how_to_answer": crate::durable::pending::how_to_answer(&p.job_id, &p.request.choices),
                                })
                            ),
                            Err(e) => eprintln!("warning: unreadable pending record: {e}"),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", q.names.jobs);
                    return exit::ERROR;
                }
            }
        }
        exit::OK
    })
}
