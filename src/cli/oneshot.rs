//! The commands that need no queue: run-once, verify, validate, manifest.

use super::exit;
use super::secret::SecretArgs;
use crate::audit::verify_file;
use crate::exec::RunStatus;
use crate::graph::{load_graph_file, manifest::manifest as build_manifest};
use crate::job::{run_job, AuditSettings};
use crate::tools::Registry;
use clap::Args;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args)]
pub struct RunOnceArgs {
    /// The graph file (TOML or JSON).
    #[arg(long, value_name = "FILE")]
    graph: PathBuf,
    /// The initial state: a JSON object, or @FILE to read it from a file.
    #[arg(long, value_name = "JSON|@FILE")]
    input: String,
    /// Directory for run_<uuid>.json audit logs.
    #[arg(
        long,
        value_name = "DIR",
        env = "LAR_LOG_DIR",
        default_value = "lar_logs"
    )]
    log_dir: PathBuf,
    /// The job id recorded in the log (default: a new UUID).
    #[arg(long)]
    job_id: Option<String>,
    /// The user id recorded in the log.
    #[arg(long)]
    user_id: Option<String>,
    /// Skip fsync of the log (faster, not crash-safe).
    #[arg(long)]
    no_fsync: bool,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Run logs, authority ledgers, or directories of them.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args)]
pub struct ValidateArgs {
    /// Graph files to check.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ManifestArgs {
    /// The graph file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Parses `--input`: inline JSON or `@FILE`; it must be a JSON object.
pub fn parse_input(arg: &str) -> Result<Map<String, Value>, String> {
    let (text, origin) = match arg.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read input file '{path}': {e}"))?,
            format!("input file '{path}'"),
        ),
        None => (arg.to_string(), "--input".to_string()),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "{origin} must be a JSON object (the initial state), found {}",
            json_kind(&other)
        )),
        Err(e) => Err(format!("{origin} is not valid JSON: {e}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn run_once(a: RunOnceArgs) -> u8 {
    let secret = match a.secret.resolve() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let input = match parse_input(&a.input) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let registry = Registry::with_builtins();
    let graph = match load_graph_file(&a.graph, &registry) {
        Ok(g) => Arc::new(g),
        Err(errors) => {
            eprintln!("error: the graph is invalid:\n{errors}");
            return exit::USAGE;
        }
    };
    let audit = AuditSettings {
        log_dir: a.log_dir,
        secret,
        durable: !a.no_fsync,
        writer: None,
    };
    let job_id = a.job_id.unwrap_or_else(crate::ids::new_id);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::ERROR;
        }
    };
    let report = rt.block_on(run_job(graph, &registry, &job_id, input, a.user_id, &audit));
    // A blocking thread still busy (a router expression past its timeout) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: cannot write the audit log in '{}': {e}",
                audit.log_dir.display()
            );
            return exit::ERROR;
        }
    };
    println!("{}", Value::Object(report.state.clone()));
    eprintln!(
        "run {} {} after {} steps; audit log {}",
        report.run_id,
        report.status_name(),
        report.steps,
        report.log_path.display()
    );
    match &report.status {
        RunStatus::Completed => exit::OK,
        RunStatus::Failed { reason } => {
            eprintln!("the run failed: {reason}");
            exit::RUN_FAILED
        }
        RunStatus::Halted => {
            eprintln!("the run halted at a human_jury node and waits for a decision");
            exit::RUN_HALTED
        }
        RunStatus::Running => exit::ERROR,
    }
}

/// Files to verify: each argument, or the `.json` files inside a directory argument.
fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|e| e == "json"))
                .collect();
            inside.sort();
            out.extend(inside);
        } else {
            out.push(p.clone());
        }
    }
    out
}

pub fn verify(a: VerifyArgs) -> u8 {
    let secret = match a.secret.require() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let files = expand(&a.files);
    let mut all_valid = !files.is_empty();
    for f in &files {
        match verify_file(f, &secret) {
            crate::audit::Verdict::Valid { what } => println!("{}: valid ({what})", f.display()),
            crate::audit::Verdict::Invalid { reason } => {
                all_valid = false;
                println!("{}: INVALID: {reason}", f.display());
            }
        }
    }
    if all_valid {
        exit::OK
    } else {
        exit::RUN_FAILED
    }
}

pub fn validate(a: ValidateArgs) -> u8 {
    let registry = Registry::with_builtins();
    let mut ok = true;
    for f in &a.files {
        match load_graph_file(f, &registry) {
            Ok(g) => println!(
                "{}: ok (graph '{}', {} nodes)",
                f.display(),
                g.name,
                g.nodes.len()
            ),
            Err(errors) => {
                ok = false;
                for e in &errors.0 {
                    println!("{e}");
                }
            }
        }
    }
    if ok {
        exit::OK
    } else {
        exit::USAGE
    }
}

pub fn manifest(a: ManifestArgs) -> u8 {
    let registry = Registry::with_builtins();
    match load_graph_file(Path::new(&a.file), &registry) {
        Ok(g) => {
            let m = build_manifest(&g);
            match serde_json::to_string_pretty(&m) {
                Ok(text) => {
                    println!("{text}");
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::ERROR
                }
            }
        }
        Err(errors) => {
            eprintln!("error: the graph is invalid:\n{errors}");
            exit::USAGE
        }
    }
}
