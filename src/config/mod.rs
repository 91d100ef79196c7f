//! `workers.toml`: loaded once, fully validated at start (graphs included), unknown fields
//! rejected. A few environment variables override deployment-specific values so one file can
//! serve every host (see [`Config::apply_env`]).
//!
//! This module holds the file as a whole (loading, environment overrides, paths, the order of
//! the checks) and the small `[admin]` section; each other section lives in its own file with
//! its checks: `worker` (`[worker]`, `[worker.retry]`), `backend` and `queues` (with the loaded
//! queues). Their types are re-exported here, as `crate::config::*`.

mod backend;
mod queues;
mod worker;

pub use backend::{AmqpQueueType, BackendSection};
pub use queues::{load_queues, LoadedQueue, PayloadFormat, QueueSection};
pub use worker::{RetrySection, WorkerSection};

use queues::validate_queues;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{0}")]
    Graph(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub worker: WorkerSection,
    pub backend: BackendSection,
    pub queues: Vec<QueueSection>,
    #[serde(default)]
    pub admin: AdminSection,
}

/// The admin HTTP port: `/live`, `/ready`, `/metrics`. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// e.g. "127.0.0.1:9464"; keep it on loopback (or behind a firewall).
    pub listen: Option<String>,
}

/// `text` with the password of every `scheme://user:password@host` in it masked, as
/// [`crate::net::mask::redact`] does for one url.
fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ','))
            .unwrap_or(tail.len());
        let (token, after) = tail.split_at(end);
        out.push_str(&crate::net::mask::mask_credentials(token));
        rest = after;
    }
    out.push_str(rest);
    out
}

impl Config {
    /// Reads, parses, applies environment overrides and checks the values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // The parser quotes the line it stopped at: a url's password is masked in it.
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: redact_urls_in(&e.to_string()),
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())
            .map_err(|message| ConfigError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve_paths(&base);
        cfg.check().map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok(cfg)
    }

    /// Deployment overrides: `LAR_BACKEND_URL` (redis or amqp url), `LAR_DB_PATH`, `LAR_LOG_DIR`,
    /// `LAR_SECRET_FILE`, `LAR_CONCURRENCY`. Takes a lookup so tests need not touch the
    /// process environment.
    /// A value that cannot be used (a `LAR_CONCURRENCY` that is not a number) is an error, not
    /// silently ignored.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(url) = get("LAR_BACKEND_URL") {
            match &mut self.backend {
                BackendSection::Redis { url: u } | BackendSection::Amqp { url: u, .. } => *u = url,
                BackendSection::Embedded { .. } => {}
            }
        }
        if let Some(p) = get("LAR_DB_PATH") {
            if let BackendSection::Embedded { path } = &mut self.backend {
                *path = PathBuf::from(p);
            }
        }
        if let Some(d) = get("LAR_LOG_DIR") {
            self.worker.log_dir = PathBuf::from(d);
        }
        if let Some(f) = get("LAR_SECRET_FILE") {
            self.worker.secret_file = Some(PathBuf::from(f));
        }
        if let Some(a) = get("LAR_ADMIN_LISTEN") {
            self.admin.listen = Some(a);
        }
        if let Some(n) = get("LAR_CONCURRENCY") {
            self.worker.concurrency = n
                .trim()
                .parse()
                .map_err(|_| format!("LAR_CONCURRENCY: '{n}' is not a whole number of jobs"))?;
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.worker.log_dir);
        if let Some(f) = &mut self.worker.secret_file {
            fix(f);
        }
        match &mut self.backend {
            BackendSection::Embedded { path } => fix(path),
            BackendSection::Amqp {
                checkpoint_store: Some(spec),
                ..
            } => {
                if let Some(p) = spec.strip_prefix("sqlite:") {
                    let mut p = PathBuf::from(p);
                    fix(&mut p);
                    *spec = format!("sqlite:{}", p.display());
                }
            }
            _ => {}
        }
        for q in &mut self.queues {
            if let Some(g) = &mut q.graph {
                fix(g);
            }
            for g in q.graphs.values_mut() {
                fix(g);
            }
        }
    }

    /// Checks every section and returns the first problem. The order of the checks decides
    /// which problem a config with several gets, and is kept as it always was: an AMQP
    /// backend's checkpoint store first, then the worker section, the rest of the backend, the
    /// queues.
    fn check(&self) -> Result<(), String> {
        self.backend.validate_checkpoint_store()?;
        self.worker.validate()?;
        self.backend.validate()?;
        validate_queues(&self.queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(backend: &str) -> Result<Config, String> {
        let text =
            format!("{backend}\n[[queues]]\nname = \"q\"\nresults = \"r\"\ngraph = \"g.toml\"\n");
        let cfg: Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    #[test]
    fn amqp_section_with_defaults() {
        let cfg = parse("[backend]\nkind = \"amqp\"\n").unwrap();
        match cfg.backend {
            BackendSection::Amqp {
                url,
                prefetch,
                queue_type,
                delivery_limit,
                declare,
                dedupe_redis_url,
                checkpoint_store,
            } => {
                assert_eq!(checkpoint_store, None);
                assert_eq!(url, "amqp://guest:guest@127.0.0.1:5672/%2f");
                assert_eq!(prefetch, None);
                assert_eq!(queue_type, AmqpQueueType::Classic);
                assert_eq!(delivery_limit, None);
                assert!(declare);
                assert_eq!(dedupe_redis_url, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn amqp_section_in_full_and_env_override() {
        let mut cfg = parse(
            "[backend]\nkind = \"amqp\"\nurl = \"amqps://u:p@h:5671/v\"\nprefetch = 8\n\
             queue_type = \"quorum\"\ndelivery_limit = 3\ndeclare = false\n\
             dedupe_redis_url = \"redis://r/0\"\ncheckpoint_store = \"redis://s/1\"\n",
        )
        .unwrap();
        cfg.apply_env(|k| (k == "LAR_BACKEND_URL").then(|| "amqp://other/%2f".to_string()))
            .unwrap();
        let mut bad = cfg.clone();
        let err = bad
            .apply_env(|k| (k == "LAR_CONCURRENCY").then(|| "sixteen".to_string()))
            .unwrap_err();
        assert!(err.contains("LAR_CONCURRENCY"), "{err}");
        match cfg.backend {
            BackendSection::Amqp {
                url,
                prefetch,
                queue_type,
                delivery_limit,
                declare,
                checkpoint_store,
                ..
            } => {
                assert_eq!(checkpoint_store.as_deref(), Some("redis://s/1"));
                assert_eq!(url, "amqp://other/%2f");
                assert_eq!(prefetch, Some(8));
                assert_eq!(queue_type, AmqpQueueType::Quorum);
                assert_eq!(delivery_limit, Some(3));
                assert!(!declare);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn amqp_section_is_checked() {
        let err = |b: &str| parse(b).unwrap_err();
        assert!(err("[backend]\nkind = \"amqp\"\nurl = \"redis://x\"\n").contains("amqp://"));
        assert!(err("[backend]\nkind = \"amqp\"\nprefetch = 0\n").contains("prefetch"));
        assert!(err("[backend]\nkind = \"amqp\"\ndelivery_limit = 2\n").contains("quorum"));
        assert!(
            err("[backend]\nkind = \"amqp\"\nqueue_type = \"quorum\"\ndelivery_limit = 0\n")
                .contains("at least 1")
        );
        assert!(err("[backend]\nkind = \"amqp\"\nqueue_type = \"stream\"\n").contains("stream"));
        assert!(err("[backend]\nkind = \"amqp\"\nprefetch_count = 3\n").contains("unknown field"));
        assert!(err(
            "[backend]\nkind = \"amqp\"\ncheckpoint_store = \"postgres://u:secret@h/db\"\n"
        )
        .contains("must start with redis://, rediss:// or sqlite:"));
    }

    #[test]
    fn a_parse_error_never_shows_a_url_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.toml");
        // The closing quote is missing: the parser quotes the line in its error.
        std::fs::write(
            &path,
            "[backend]\nkind = \"amqp\"\nurl = \"amqp://u:hunter2secret@h:5672/%2f\n",
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(!err.contains("hunter2secret"), "{err}");
        assert!(
            err.contains("amqp://u:***@h:5672"),
            "the line is still shown: {err}"
        );
        assert_eq!(
            redact_urls_in("a redis://:pw@r:6379/0, b 'amqps://x:y@h' c https://h/p d"),
            "a redis://:***@r:6379/0, b 'amqps://x:***@h' c https://h/p d"
        );
    }

    #[test]
    fn values_out_of_range_are_refused() {
        let embedded = "[backend]\nkind = \"embedded\"\n";
        let worker = |w: &str| parse(&format!("[worker]\n{w}\n{embedded}")).unwrap_err();
        assert!(worker("concurrency = 70000").contains("worker.concurrency"));
        assert!(worker("lease_ms = 100000000000").contains("worker.lease_ms"));
        assert!(worker("drain_timeout_ms = 100000000000").contains("worker.drain_timeout_ms"));
        let retry = |r: &str| parse(&format!("[worker.retry]\n{r}\n{embedded}")).unwrap_err();
        assert!(retry("max_backoff_ms = 5000000000").contains("worker.retry"));
        assert!(retry("multiplier = nan").contains("worker.retry.multiplier"));
        assert!(retry("multiplier = inf").contains("worker.retry.multiplier"));
        assert!(parse(&format!(
            "[worker]\nconcurrency = 65536\nlease_ms = 86400000\n{embedded}"
        ))
        .is_ok());
    }

    #[test]
    fn a_sqlite_checkpoint_store_is_relative_to_the_config_file() {
        let mut cfg =
            parse("[backend]\nkind = \"amqp\"\ncheckpoint_store = \"sqlite:state/runs.db\"\n")
                .unwrap();
        cfg.resolve_paths(Path::new("/etc/lar-worker"));
        match cfg.backend {
            BackendSection::Amqp {
                checkpoint_store, ..
            } => assert_eq!(
                checkpoint_store.as_deref(),
                Some("sqlite:/etc/lar-worker/state/runs.db")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_sections_are_checked_in_their_historical_order() {
        let amqp = "[backend]\nkind = \"amqp\"\nurl = \"redis://x\"\n";
        // An AMQP checkpoint store before the worker section...
        let e = parse(&format!(
            "[worker]\nconcurrency = 0\n{amqp}checkpoint_store = \"pg://h\"\n"
        ))
        .unwrap_err();
        assert!(e.starts_with("backend.checkpoint_store:"), "{e}");
        // ... the worker section before the rest of the backend ...
        let e = parse(&format!("[worker]\nconcurrency = 0\n{amqp}")).unwrap_err();
        assert!(e.starts_with("worker.concurrency:"), "{e}");
        // ... and the backend before the queues.
        let check = |text: &str| toml::from_str::<Config>(text).unwrap().check().unwrap_err();
        let bad_queue = "[[queues]]\nname = \"q\"\nresults = \"q\"\ngraph = \"g.toml\"\n";
        let e = check(&format!("{amqp}{bad_queue}"));
        assert_eq!(
            e,
            "backend.url: an amqp backend needs an amqp:// or amqps:// url"
        );
        let e = check(&format!("[backend]\nkind = \"embedded\"\n{bad_queue}"));
        assert_eq!(e, "queues[0] (q): 'results' must differ from 'name'");
    }
}
