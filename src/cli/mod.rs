//! The `lar-worker` command line. Each subcommand lives in its own file; this one parses the
//! arguments and maps outcomes to exit codes.

mod daemon;
mod oneshot;
mod queue_admin;
mod secret;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit codes shared by the subcommands (documented in the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// An I/O or internal error: a log could not be written, the broker is unreachable.
    pub const ERROR: u8 = 1;
    /// Bad usage, bad input or an invalid graph/config: nothing ran.
    pub const USAGE: u8 = 2;
    /// The run ended as failed (its signed log says why).
    pub const RUN_FAILED: u8 = 3;
    /// The run halted at a human_jury node and waits for a decision.
    pub const RUN_HALTED: u8 = 4;
}

#[derive(Parser)]
#[command(
    name = "lar-worker",
    version,
    about = "Runs Lár agent graphs step by step with signed, Lár-verifiable audit logs",
    long_about = "Runs Lár agent graphs step by step with signed, Lár-verifiable audit logs.\n\n\
        The HMAC secret comes from HMAC_SECRET, from --secret-file, or from the systemd credential \
        'hmac_secret' ($CREDENTIALS_DIRECTORY). It is never printed.\n\n\
        Exit codes: 0 ok/completed, 1 I/O or internal error, 2 bad usage, input, graph or config, \
        3 the run failed, 4 the run halted waiting for a human decision."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job directly and print its final state as JSON (the cron pattern).
    RunOnce(oneshot::RunOnceArgs),
    /// Verify run logs and authority ledgers against the secret (files or directories).
    Verify(oneshot::VerifyArgs),
    /// Check graph files: entry, node targets, types, fields, tools, expressions, reachability.
    Validate(oneshot::ValidateArgs),
    /// Print the compliance action inventory of a graph as JSON.
    Manifest(oneshot::ManifestArgs),
    /// Run the worker daemon: claim jobs, run their graphs, publish results and signed logs.
    Run(daemon::RunArgs),
    /// Push jobs onto a configured queue (arguments, @FILE or - for stdin, one JSON per line).
    Enqueue(queue_admin::EnqueueArgs),
    /// Print published results (and consume them with --take).
    Results(queue_admin::ResultsArgs),
    /// Operate on dead letters.
    #[command(subcommand)]
    DeadLetters(queue_admin::DeadLetterCommand),
    /// Record a human decision for a job waiting at a human_jury node; the job resumes.
    Decide(queue_admin::DecideArgs),
    /// List the jobs waiting for a human decision.
    Pending(queue_admin::QueueArgs),
    /// Show queue depth, claims, delayed retries, dead letters and results per queue.
    Inspect(queue_admin::QueueArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::RunOnce(a) => oneshot::run_once(a),
        Command::Verify(a) => oneshot::verify(a),
        Command::Validate(a) => oneshot::validate(a),
        Command::Manifest(a) => oneshot::manifest(a),
        Command::Run(a) => daemon::run(a),
        Command::Enqueue(a) => queue_admin::enqueue(a),
        Command::Results(a) => queue_admin::results(a),
        Command::DeadLetters(c) => queue_admin::dead_letters(c),
        Command::Inspect(a) => queue_admin::inspect(a),
        Command::Decide(a) => queue_admin::decide(a),
        Command::Pending(a) => queue_admin::pending(a),
    };
    ExitCode::from(code)
}
