//! `lar-worker run`: the daemon.

use super::exit;
use super::secret::SecretArgs;
use crate::config::{load_queues, Config};
use crate::job::AuditSettings;
use crate::tools::Registry;
use crate::worker::{RunOptions, Worker};
use clap::Args;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Args)]
pub struct RunArgs {
    /// The worker configuration.
    #[arg(long, short, value_name = "FILE", default_value = "workers.toml")]
    pub config: PathBuf,
    /// Stop once every queue is empty and nothing is in flight.
    #[arg(long)]
    pub exit_when_idle: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// Everything the daemon and the admin commands share: config, graphs, secret.
pub struct Loaded {
    pub config: Config,
    pub queues: Vec<crate::config::LoadedQueue>,
    pub registry: Registry,
}

pub fn load(config: &std::path::Path) -> Result<Loaded, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let registry = Registry::with_builtins();
    let queues = load_queues(&config, &registry).map_err(|e| e.to_string())?;
    Ok(Loaded {
        config,
        queues,
        registry,
    })
}

pub fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            exit::ERROR
        })
}

pub fn run(a: RunArgs) -> u8 {
    crate::telemetry::init();
    let loaded = match load(&a.config) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let secret = match a.secret.resolve_for(&loaded.config) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "no secret");
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = rt.block_on(async move {
        let worker_id = crate::telemetry::worker_identity();
        let shutdown = CancellationToken::new();
        let stop_now = CancellationToken::new();
        spawn_signal_handler(shutdown.clone(), stop_now.clone());
        // The broker may come up after us: keep trying (not READY meanwhile) until SIGTERM.
        let mut attempt = 0;
        let backend = loop {
            match crate::wiring::connect_backend(&loaded.config, worker_id.clone()).await {
                Ok(b) => break b,
                Err(e) => {
                    attempt += 1;
                    let pause = crate::backoff::Backoff::reconnect().delay(attempt);
                    error!(error = %e, retry_in_ms = pause.as_millis() as u64, "queue backend unreachable: not ready");
                    tokio::select! {
                        _ = shutdown.cancelled() => return exit::OK,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        };
        let audit = AuditSettings {
            log_dir: loaded.config.worker.log_dir.clone(),
            secret,
            durable: loaded.config.worker.fsync,
            writer: match crate::audit::write::LogWriter::start() {
                Ok(w) => Some(w),
                Err(e) => {
                    error!(error = %e, "cannot start the audit writer thread");
                    return exit::ERROR;
                }
            },
        };
        if let Err(e) = std::fs::create_dir_all(&audit.log_dir) {
            error!(dir = %audit.log_dir.display(), error = %e, "the audit directory is not writable");
            return exit::ERROR;
        }
        info!(worker = %worker_id, backend = backend.kind(), queues = loaded.queues.len(),
              concurrency = loaded.config.worker.concurrency, "worker started");
        let worker = Worker::new(backend, loaded.queues, loaded.registry, audit, loaded.config.worker.clone());
        if let Some(addr) = &loaded.config.admin.listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(%addr, "admin port: /live /ready /metrics");
                    tokio::spawn(crate::ops::admin::serve(listener, worker.clone(), shutdown.clone()));
                }
                Err(e) => {
                    error!(%addr, error = %e, "cannot bind the admin port");
                    return exit::ERROR;
                }
            }
        }
        worker
            .run(
                shutdown,
                RunOptions {
                    exit_when_idle: a.exit_when_idle,
                    stop_now,
                },
            )
            .await;
        exit::OK
    });
    // Everything the worker awaited is done; a blocking thread still busy (a router expression
    // past its timeout) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// SIGTERM and SIGINT start the drain; a second one ends it at once (`stop_now`): jobs still
/// running are handed back mid-step, as at the drain deadline.
fn spawn_signal_handler(shutdown: CancellationToken, stop_now: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        shutdown.cancel();
        info!("{name}: draining (send it again to stop now)");
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        stop_now.cancel();
        warn!("second {name}: stopping now");
    });
}
