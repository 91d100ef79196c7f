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

pub async fn readiness(
    backend: &dyn Backend,
    queues: &[LoadedQueue],
    audit_dir: &Path,
    signed: bool,
) -> Readiness {
    let mut checks = Vec::new();
    for q in queues {
        let res =
            tokio::time::timeout(std::time::Duration::from_secs(3), backend.depth(&q.names)).await;
        let (ok, detail) = match res {
            Ok(Ok(_)) => (true, format!("{} answers", backend.kind())),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (
                false,
                format!("{} did not answer within 3 s", backend.kind()),
            ),
        };
        checks.push(Check {
            name: format!("queue:{}", q.names.jobs),
            ok,
            detail,
        });
    }
    let probe = audit_dir.join(format!(".ready-probe-{}", std::process::id()));
    let dir_ok = std::fs::create_dir_all(audit_dir)
        .and_then(|_| std::fs::write(&probe, b"ok"))
        .and_then(|_| std::fs::remove_file(&probe));
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
