//! The `[worker]` section and its `[worker.retry]` table: how one process runs jobs (how many
//! at once, leases, drain, message limits, audit logs) and how failed jobs are retried, with
//! the bounds each value is checked against.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The most jobs in flight in one process (a semaphore's permits; far above what one process
/// serves).
const MAX_CONCURRENCY: usize = 65_536;
/// The longest lease and drain: a day. A longer lease leaves a crashed replica's jobs out of
/// reach for longer, and systemd cannot be asked to wait longer than that for a drain.
const MAX_DURATION_MS: u64 = 86_400_000;
/// The longest retry delay: a week (an AMQP message expiry is a 32-bit number of ms).
const MAX_BACKOFF_MS: u64 = 7 * 86_400_000;

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
    /// A job whose worker died (or stopped renewing its lease) this many times while running it
    /// is dead-lettered with the reason instead of being run again: one poison message must not
    /// take down every replica in turn, for ever. Its checkpoint stays, so a redrive resumes.
    pub max_recoveries: u32,
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
            max_recoveries: 3,
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

    /// Checks the section's values, `[worker.retry]` included, and returns the first problem.
    /// The retry backoffs are checked before the message limits and the other retry values
    /// after them, as they always were: that order decides which problem is reported.
    pub(super) fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!(
                "worker.concurrency: must be between 1 and {MAX_CONCURRENCY}"
            ));
        }
        if !(1000..=MAX_DURATION_MS).contains(&self.lease_ms) {
            return Err(format!(
                "worker.lease_ms: must be between 1000 and {MAX_DURATION_MS} (a day)"
            ));
        }
        if self.drain_timeout_ms > MAX_DURATION_MS {
            return Err(format!(
                "worker.drain_timeout_ms: must be at most {MAX_DURATION_MS} (a day)"
            ));
        }
        self.retry.validate_backoffs()?;
        if self.max_message_bytes == 0 {
            return Err("worker.max_message_bytes: must be more than 0".into());
        }
        if self.max_result_bytes < 4096 {
            return Err("worker.max_result_bytes: must be at least 4096".into());
        }
        if !(1..=1000).contains(&self.max_recoveries) {
            return Err("worker.max_recoveries: must be between 1 and 1000".into());
        }
        self.retry.validate_policy()
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

/// The one backoff policy, with this section's numbers.
impl From<&RetrySection> for crate::backoff::Backoff {
    fn from(r: &RetrySection) -> Self {
        crate::backoff::Backoff {
            initial: std::time::Duration::from_millis(r.initial_backoff_ms),
            max: std::time::Duration::from_millis(r.max_backoff_ms),
            multiplier: r.multiplier,
            jitter: r.jitter,
        }
    }
}

impl RetrySection {
    /// The bounds of the two backoffs (see [`WorkerSection::validate`] for when they are
    /// checked).
    fn validate_backoffs(&self) -> Result<(), String> {
        if self.initial_backoff_ms > MAX_BACKOFF_MS || self.max_backoff_ms > MAX_BACKOFF_MS {
            return Err(format!(
                "worker.retry: backoffs must be at most {MAX_BACKOFF_MS} ms (a week; an AMQP \
                 message's expiry must fit in 32 bits)"
            ));
        }
        Ok(())
    }

    /// The number of attempts, the jitter and the multiplier.
    fn validate_policy(&self) -> Result<(), String> {
        if self.attempts == 0 {
            return Err(
                "worker.retry.attempts: must be at least 1 (the first attempt counts)".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("worker.retry.jitter: must be between 0 and 1".into());
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err("worker.retry.multiplier: must be a number of at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of the default section changed by `change`.
    fn error(change: impl FnOnce(&mut WorkerSection)) -> String {
        let mut w = WorkerSection::default();
        change(&mut w);
        w.validate().unwrap_err()
    }

    #[test]
    fn the_defaults_and_the_bounds_are_valid() {
        assert_eq!(WorkerSection::default().validate(), Ok(()));
        let mut w = WorkerSection {
            concurrency: MAX_CONCURRENCY,
            lease_ms: MAX_DURATION_MS,
            drain_timeout_ms: MAX_DURATION_MS,
            max_message_bytes: 1,
            max_result_bytes: 4096,
            ..WorkerSection::default()
        };
        w.retry.initial_backoff_ms = MAX_BACKOFF_MS;
        w.retry.max_backoff_ms = MAX_BACKOFF_MS;
        w.retry.attempts = 1;
        w.retry.jitter = 1.0;
        w.retry.multiplier = 1.0;
        assert_eq!(w.validate(), Ok(()));
        w.lease_ms = 1000;
        w.retry.jitter = 0.0;
        assert_eq!(w.validate(), Ok(()));
    }

    #[test]
    fn concurrency_lease_and_drain_are_bounded() {
        for n in [0, MAX_CONCURRENCY + 1] {
            assert_eq!(
                error(|w| w.concurrency = n),
                "worker.concurrency: must be between 1 and 65536"
            );
        }
        for ms in [999, MAX_DURATION_MS + 1] {
            assert_eq!(
                error(|w| w.lease_ms = ms),
                "worker.lease_ms: must be between 1000 and 86400000 (a day)"
            );
        }
        assert_eq!(
            error(|w| w.drain_timeout_ms = MAX_DURATION_MS + 1),
            "worker.drain_timeout_ms: must be at most 86400000 (a day)"
        );
    }

    #[test]
    fn message_limits() {
        assert_eq!(
            error(|w| w.max_message_bytes = 0),
            "worker.max_message_bytes: must be more than 0"
        );
        assert_eq!(
            error(|w| w.max_result_bytes = 4095),
            "worker.max_result_bytes: must be at least 4096"
        );
    }

    #[test]
    fn retry_values() {
        let backoffs = "worker.retry: backoffs must be at most 604800000 ms (a week; an AMQP \
                        message's expiry must fit in 32 bits)";
        assert_eq!(
            error(|w| w.retry.initial_backoff_ms = MAX_BACKOFF_MS + 1),
            backoffs
        );
        assert_eq!(
            error(|w| w.retry.max_backoff_ms = MAX_BACKOFF_MS + 1),
            backoffs
        );
        assert_eq!(
            error(|w| w.retry.attempts = 0),
            "worker.retry.attempts: must be at least 1 (the first attempt counts)"
        );
        for jitter in [-0.1, 1.1, f64::NAN] {
            assert_eq!(
                error(|w| w.retry.jitter = jitter),
                "worker.retry.jitter: must be between 0 and 1"
            );
        }
        for multiplier in [0.5, f64::NAN, f64::INFINITY] {
            assert_eq!(
                error(|w| w.retry.multiplier = multiplier),
                "worker.retry.multiplier: must be a number of at least 1"
            );
        }
    }

    #[test]
    fn the_first_problem_in_the_historical_order_is_reported() {
        let e = error(|w| {
            w.drain_timeout_ms = MAX_DURATION_MS + 1;
            w.concurrency = 0;
        });
        assert!(e.starts_with("worker.concurrency"), "{e}");
        // The backoffs come before the message limits, the other retry values after them.
        let e = error(|w| {
            w.max_message_bytes = 0;
            w.retry.max_backoff_ms = MAX_BACKOFF_MS + 1;
        });
        assert!(e.starts_with("worker.retry: backoffs"), "{e}");
        let e = error(|w| {
            w.max_result_bytes = 0;
            w.retry.attempts = 0;
        });
        assert!(e.starts_with("worker.max_result_bytes"), "{e}");
        let e = error(|w| {
            w.retry.multiplier = 0.0;
            w.retry.jitter = 2.0;
            w.retry.attempts = 0;
        });
        assert!(e.starts_with("worker.retry.attempts"), "{e}");
    }
}
