//! `workers.toml`: loaded once, fully validated at start (graphs included), unknown fields
//! rejected. A few environment variables override deployment-specific values so one file can
//! serve every host (see [`Config::apply_env`]).

use crate::graph::{load_graph_file, Graph};
use crate::tools::Registry;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// Jobs run at once by one process.
    pub concurrency: usize,
    /// Where `run_<uuid>.json` audit logs go.
    pub log_dir: PathBuf,
    /// The HMAC secret file (else HMAC_SECRET or the systemd credential `hmac_secret`).
    pub secret_file: Option<PathBuf>,
    /// Write logs unsigned when no secret is configured (refused otherwise).
    pub unsigned: bool,
    /// How long a claim is held without renewal before another replica may take the job.
    pub lease_ms: u64,
    /// On SIGTERM, how long in-flight jobs get before they are handed back.
    pub drain_timeout_ms: u64,
    /// Larger messages are dead-lettered unread.
    pub max_message_bytes: usize,
    /// A result larger than this goes out without its state (which stays in the signed audit
    /// log), as a failure with a dead letter: a broker refuses oversized messages (RabbitMQ 4:
    /// 16 MiB by default) by closing the channel, and a retry would meet the same refusal.
    pub max_result_bytes: usize,
    /// fsync audit logs (and their directory) before a job counts as done.
    pub fsync: bool,
    /// Checkpoint after every step (resume after a crash, human pauses). Needs a backend that
    /// stores checkpoints; without, a redelivered job runs from the start and juries cannot pause.
    pub checkpoints: bool,
    pub retry: RetrySection,
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            concurrency: 16,
            log_dir: PathBuf::from("lar_logs"),
            secret_file: None,
            unsigned: false,
            lease_ms: 30_000,
            drain_timeout_ms: 20_000,
            max_message_bytes: 1024 * 1024,
            max_result_bytes: 8 * 1024 * 1024,
            fsync: true,
            checkpoints: true,
            retry: RetrySection::default(),
        }
    }
}

impl WorkerSection {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    /// Attempts in all, the first included; after the last, the job is dead-lettered.
    pub attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// Random spread, as a fraction of the delay (0.2 = ±20 %).
    pub jitter: f64,
    /// Whether a run that ends `failed` is retried (else its failed result is final at once).
    pub retry_failed_runs: bool,
}

impl Default for RetrySection {
    fn default() -> Self {
        RetrySection {
            attempts: 3,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
            retry_failed_runs: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSection {
    /// A SQLite file on this machine; several worker processes may share it.
    Embedded {
        #[serde(default = "default_db_path")]
        path: PathBuf,
    },
    Redis {
        #[serde(default = "default_redis_url")]
        url: String,
    },
    /// RabbitMQ (AMQP 0-9-1): manual acks after the result is confirmed, a TTL delay queue for
    /// retries, a dead-letter exchange and queue. See `src/queue/amqp.rs`.
    Amqp {
        /// `amqp://` or `amqps://` (TLS with rustls and the system's root certificates).
        /// Query parameters such as `?heartbeat=10` are passed to the client.
        #[serde(default = "default_amqp_url")]
        url: String,
        /// Unacknowledged deliveries per queue consumer (default: `worker.concurrency`).
        #[serde(default)]
        prefetch: Option<u16>,
        #[serde(default)]
        queue_type: AmqpQueueType,
        /// Quorum queues only: `x-delivery-limit` (a message returned more often than this
        /// is dead-lettered by the broker).
        #[serde(default)]
        delivery_limit: Option<u32>,
        /// Declare the topology (idempotently); `false` only checks it exists (passive
        /// declares): operators own the queues and exchanges.
        #[serde(default = "default_true")]
        declare: bool,
        /// A Redis for the one-result-per-job marker (`SET <queue>:done:<job_id> 1 EX 86400
        /// NX`); without it the marker lives in this process only.
        #[serde(default)]
        dedupe_redis_url: Option<String>,
        /// Where each run's checkpoint and journal live, so a redelivered job resumes after its
        /// last finished step and a `human_jury` halt waits for a decision: a Redis
        /// (`redis://…`, replicas on any hosts) or a SQLite file (`sqlite:<path>`, relative to
        /// this file; the replicas of one host). Without it a redelivered job runs from its
        /// first step and a halt is the job's final result.
        #[serde(default)]
        checkpoint_store: Option<String>,
    },
}

/// The kind of the queues the AMQP backend declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmqpQueueType {
    #[default]
    Classic,
    Quorum,
}

fn default_db_path() -> PathBuf {
    PathBuf::from("var/lar-worker.db")
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".to_string()
}
fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()
}
fn default_true() -> bool {
    true
}

/// How messages on a queue are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The message is the initial state; the result is the final state (the seed's format).
    #[default]
    State,
    /// `{"id", "graph", "input", "user_id"}` in, `{"job_id", "run_id", "status", ...}` out.
    Envelope,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// The list/queue producers push to, e.g. `agent:jobs`.
    pub name: String,
    /// Where results go, e.g. `agent:results`.
    pub results: String,
    #[serde(default)]
    pub payload: PayloadFormat,
    /// The graph for state payloads, and for envelopes that name none.
    pub graph: Option<PathBuf>,
    /// Graphs an envelope may name: `{ loan_review = "graphs/loan_review.toml" }`.
    #[serde(default)]
    pub graphs: BTreeMap<String, PathBuf>,
    /// Where human decisions arrive as messages `{"job_id", "choice", "rationale", "by",
    /// "role"}`; replies (accepted/rejected) go to `<decisions>:replies`.
    pub decisions: Option<String>,
}

/// The most jobs in flight in one process (a semaphore's permits; far above what one process
/// serves).
const MAX_CONCURRENCY: usize = 65_536;
/// The longest lease and drain: a day. A longer lease leaves a crashed replica's jobs out of
/// reach for longer, and systemd cannot be asked to wait longer than that for a drain.
const MAX_DURATION_MS: u64 = 86_400_000;
/// The longest retry delay: a week (an AMQP message expiry is a 32-bit number of ms).
const MAX_BACKOFF_MS: u64 = 7 * 86_400_000;

/// `text` with the password of every `scheme://user:password@host` in it masked, as
/// [`crate::queue::amqp::redact`] does for one url.
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
        out.push_str(&crate::queue::amqp::mask_credentials(token));
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

    fn check(&self) -> Result<(), String> {
        if let BackendSection::Amqp {
            checkpoint_store: Some(spec),
            ..
        } = &self.backend
        {
            let known = ["redis://", "rediss://", "sqlite:"];
            if !known.iter().any(|k| spec.starts_with(k)) {
                return Err(format!(
                    "backend.checkpoint_store: must start with redis://, rediss:// or sqlite: (got '{}')",
                    crate::queue::amqp::redact(spec)
                ));
            }
        }
        let w = &self.worker;
        if !(1..=MAX_CONCURRENCY).contains(&w.concurrency) {
            return Err(format!(
                "worker.concurrency: must be between 1 and {MAX_CONCURRENCY}"
            ));
        }
        if !(1000..=MAX_DURATION_MS).contains(&w.lease_ms) {
            return Err(format!(
                "worker.lease_ms: must be between 1000 and {MAX_DURATION_MS} (a day)"
            ));
        }
        if w.drain_timeout_ms > MAX_DURATION_MS {
            return Err(format!(
                "worker.drain_timeout_ms: must be at most {MAX_DURATION_MS} (a day)"
            ));
        }
        if w.retry.initial_backoff_ms > MAX_BACKOFF_MS || w.retry.max_backoff_ms > MAX_BACKOFF_MS {
            return Err(format!(
                "worker.retry: backoffs must be at most {MAX_BACKOFF_MS} ms (a week; an AMQP \
                 message's expiry must fit in 32 bits)"
            ));
        }
        if w.max_message_bytes == 0 {
            return Err("worker.max_message_bytes: must be more than 0".into());
        }
        if w.max_result_bytes < 4096 {
            return Err("worker.max_result_bytes: must be at least 4096".into());
        }
        if w.retry.attempts == 0 {
            return Err(
                "worker.retry.attempts: must be at least 1 (the first attempt counts)".into(),
            );
        }
        if !(0.0..=1.0).contains(&w.retry.jitter) {
            return Err("worker.retry.jitter: must be between 0 and 1".into());
        }
        if !w.retry.multiplier.is_finite() || w.retry.multiplier < 1.0 {
            return Err("worker.retry.multiplier: must be a number of at least 1".into());
        }
        if let BackendSection::Amqp {
            url,
            prefetch,
            queue_type,
            delivery_limit,
            ..
        } = &self.backend
        {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err("backend.url: an amqp backend needs an amqp:// or amqps:// url".into());
            }
            if *prefetch == Some(0) {
                return Err("backend.prefetch: must be at least 1 (0 would mean unlimited)".into());
            }
            match (queue_type, delivery_limit) {
                (AmqpQueueType::Classic, Some(_)) => {
                    return Err(
                        "backend.delivery_limit: only quorum queues have a delivery limit (set queue_type = \"quorum\")"
                            .into(),
                    )
                }
                (_, Some(0)) => {
                    return Err("backend.delivery_limit: must be at least 1".into());
                }
                _ => {}
            }
        }
        if self.queues.is_empty() {
            return Err("queues: at least one [[queues]] entry is required".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, q) in self.queues.iter().enumerate() {
            if q.name.is_empty() || q.results.is_empty() {
                return Err(format!(
                    "queues[{i}]: 'name' and 'results' must not be empty"
                ));
            }
            if q.name == q.results {
                return Err(format!(
                    "queues[{i}] ({}): 'results' must differ from 'name'",
                    q.name
                ));
            }
            if !names.insert(q.name.clone()) {
                return Err(format!(
                    "queues[{i}]: the queue '{}' is configured twice",
                    q.name
                ));
            }
            if q.graph.is_none() && q.graphs.is_empty() {
                return Err(format!(
                    "queues[{i}] ({}): needs 'graph' or 'graphs'",
                    q.name
                ));
            }
            if q.payload == PayloadFormat::State && q.graph.is_none() {
                return Err(format!(
                    "queues[{i}] ({}): a 'state' payload queue needs 'graph' (the message carries no graph name)",
                    q.name
                ));
            }
        }
        Ok(())
    }
}

/// A queue with its graphs loaded and validated.
#[derive(Debug, Clone)]
pub struct LoadedQueue {
    pub names: crate::queue::QueueNames,
    pub payload: PayloadFormat,
    pub default_graph: Option<Arc<Graph>>,
    pub graphs: HashMap<String, Arc<Graph>>,
    /// The decisions queue and its replies, when configured.
    pub decisions: Option<crate::queue::QueueNames>,
}

impl LoadedQueue {
    /// The graph an envelope names (by its config key or the graph's own name).
    pub fn graph_named(&self, name: &str) -> Option<&Arc<Graph>> {
        self.graphs
            .get(name)
            .or_else(|| self.default_graph.as_ref().filter(|g| g.name == name))
    }
}

/// Loads every graph the queues name, collecting all errors.
pub fn load_queues(cfg: &Config, registry: &Registry) -> Result<Vec<LoadedQueue>, ConfigError> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut load = |p: &Path| match load_graph_file(p, registry) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    for q in &cfg.queues {
        let default_graph = q.graph.as_deref().and_then(&mut load);
        let mut graphs = HashMap::new();
        for (name, path) in &q.graphs {
            if let Some(g) = load(path) {
                graphs.insert(name.clone(), g);
            }
        }
        out.push(LoadedQueue {
            names: crate::queue::QueueNames {
                jobs: q.name.clone(),
                results: q.results.clone(),
            },
            payload: q.payload,
            default_graph,
            graphs,
            decisions: q.decisions.as_ref().map(|d| crate::queue::QueueNames {
                jobs: d.clone(),
                results: format!("{d}:replies"),
            }),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError::Graph(errors.join("\n")))
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
}
