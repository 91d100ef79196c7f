//! Logging: `tracing` to stderr, JSON when stderr is not a terminal (journald, files), human
//! text otherwise. `RUST_LOG` sets the filter (default `info`). State values and secrets are
//! never logged: log lines carry ids, statuses and reasons only.

use std::io::IsTerminal;
use tracing_subscriber::{fmt, EnvFilter};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written (journald restarted, the reader of our stderr gone) is
    // dropped quietly: the default reports it with `eprintln!`, which panics on the same broken
    // pipe and would take down whichever task was logging (a job, or the SIGTERM handler).
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
}

/// A process identity unique across hosts and restarts: host, pid, boot nonce.
pub fn worker_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string());
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &nonce[..8])
}
