//! Readiness: the checks behind READY=1 and `/ready`. Ready means the queue store answers, the
//! audit directory takes a file, and a secret is configured (or unsigned logs were chosen).

use crate::config::LoadedQueue;
use crate::queue::Backend;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

impl Readiness {
    /// Adds checks of the caller's own (the worker's claim loops): ready only if they pass too.
    pub fn add(&mut self, checks: Vec<Check>) {
        self.ready &= checks.iter().all(|c| c.ok);
        self.checks.extend(checks);
    }
}

/// How long each check may take (the queue store's answer, the audit directory's probe file).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn readiness(
    backend: &dyn Backend,
    queues: &[LoadedQueue],
    audit_dir: &Path,
    signed: bool,
) -> Readiness {
    let mut checks = Vec::new();
    for q in queues {
        let res = tokio::time::timeout(PROBE_TIMEOUT, backend.depth(&q.names)).await;
        let (ok, detail) = match res {
            Ok(Ok(_)) => (true, format!("{} answers", backend.kind())),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (
                false,
                format!(
                    "{} did not answer within {} s",
                    backend.kind(),
                    PROBE_TIMEOUT.as_secs()
                ),
            ),
        };
        checks.push(Check {
            name: format!("queue:{}", q.names.jobs),
            ok,
            detail,
        });
    }
    let dir_ok = probe_dir(audit_dir).await;
    checks.push(Check {
        name: "audit_dir".into(),
        ok: dir_ok.is_ok(),
        detail: match dir_ok {
            Ok(()) => format!("{} is writable", audit_dir.display()),
            Err(e) => format!("{} is not writable: {e}", audit_dir.display()),
        },
    });
    checks.push(Check {
        name: "secret".into(),
        ok: true,
        detail: if signed {
            "configured".into()
        } else {
            "unsigned logs (chosen explicitly)".into()
        },
    });
    Readiness {
        ready: checks.iter().all(|c| c.ok),
        checks,
    }
}

/// Writes and removes a probe file in `dir`, off the async threads and within [`PROBE_TIMEOUT`]:
/// a hung mount makes the check fail, never stalls the runtime that answers `/ready`.
async fn probe_dir(dir: &Path) -> Result<(), String> {
    let dir = dir.to_path_buf();
    // One name per probe: two `/ready` checks at once would otherwise remove each other's file
    // and one of them would report the directory unwritable.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!(".ready-probe-{}-{n}", std::process::id()));
    let write = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&probe, b"ok"))
            .and_then(|_| std::fs::remove_file(&probe))
    });
    match tokio::time::timeout(PROBE_TIMEOUT, write).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(format!("the probe task failed: {e}")),
        Err(_) => Err(format!(
            "writing a probe file took over {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::probe_dir;

    #[tokio::test]
    async fn the_probe_passes_in_a_writable_dir_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let audit = dir.path().join("audit");
        assert_eq!(probe_dir(&audit).await, Ok(()));
        let left: Vec<_> = std::fs::read_dir(&audit).expect("created").collect();
        assert!(left.is_empty(), "the probe file is removed: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_at_the_same_time_do_not_remove_each_others_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let audit = dir.path().join("audit");
        let probes: Vec<_> = (0..64)
            .map(|_| {
                let audit = audit.clone();
                tokio::spawn(async move { probe_dir(&audit).await })
            })
            .collect();
        for p in probes {
            assert_eq!(p.await.expect("the probe task"), Ok(()));
        }
        let left: Vec<_> = std::fs::read_dir(&audit).expect("created").collect();
        assert!(left.is_empty(), "every probe file is removed: {left:?}");
    }

    #[tokio::test]
    async fn the_probe_fails_where_no_dir_can_be() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        let err = probe_dir(&file.join("audit")).await.expect_err("not a dir");
        assert!(!err.is_empty());
    }
}
