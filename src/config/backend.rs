//! The `[backend]` section: where the queues live (an embedded SQLite file, Redis or RabbitMQ),
//! with the AMQP backend's settings and their checks.

use serde::Deserialize;
use std::path::PathBuf;

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

/// The kind of the queues the AMQP backend declares (the backend's own type).
pub use crate::queue::amqp::AmqpQueueType;

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

impl BackendSection {
    /// An AMQP backend's `checkpoint_store` names a store this worker knows. Checked before
    /// every other section (see [`super::Config`]'s `check`), the rest of the backend after the
    /// worker section.
    pub(super) fn validate_checkpoint_store(&self) -> Result<(), String> {
        if let BackendSection::Amqp {
            checkpoint_store: Some(spec),
            ..
        } = self
        {
            let known = ["redis://", "rediss://", "sqlite:"];
            if !known.iter().any(|k| spec.starts_with(k)) {
                return Err(format!(
                    "backend.checkpoint_store: must start with redis://, rediss:// or sqlite: (got '{}')",
                    crate::net::mask::redact(spec)
                ));
            }
        }
        Ok(())
    }

    /// An AMQP backend's url, prefetch and delivery limit (the other backends have nothing to
    /// check).
    pub(super) fn validate(&self) -> Result<(), String> {
        if let BackendSection::Amqp {
            url,
            prefetch,
            queue_type,
            delivery_limit,
            ..
        } = self
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amqp() -> BackendSection {
        BackendSection::Amqp {
            url: default_amqp_url(),
            prefetch: None,
            queue_type: AmqpQueueType::Classic,
            delivery_limit: None,
            declare: true,
            dedupe_redis_url: None,
            checkpoint_store: None,
        }
    }

    /// The default AMQP backend changed by `change`.
    fn amqp_with(change: impl FnOnce(&mut BackendSection)) -> BackendSection {
        let mut b = amqp();
        change(&mut b);
        b
    }

    fn set_store(b: &mut BackendSection, store: &str) {
        if let BackendSection::Amqp {
            checkpoint_store, ..
        } = b
        {
            *checkpoint_store = Some(store.to_string());
        }
    }

    #[test]
    fn the_checkpoint_store_is_a_known_kind_and_its_password_is_masked() {
        for store in ["redis://r/0", "rediss://r/0", "sqlite:runs.db"] {
            let b = amqp_with(|b| set_store(b, store));
            assert_eq!(b.validate_checkpoint_store(), Ok(()), "{store}");
        }
        let b = amqp_with(|b| set_store(b, "postgres://u:secret@h/db"));
        assert_eq!(
            b.validate_checkpoint_store().unwrap_err(),
            "backend.checkpoint_store: must start with redis://, rediss:// or sqlite: (got 'postgres://u:***@h/db')"
        );
        assert_eq!(amqp().validate_checkpoint_store(), Ok(()));
    }

    #[test]
    fn an_amqp_backend_needs_an_amqp_url() {
        assert_eq!(amqp().validate(), Ok(()));
        let with_url = |u: &str| {
            amqp_with(|b| {
                if let BackendSection::Amqp { url, .. } = b {
                    *url = u.to_string();
                }
            })
        };
        assert_eq!(with_url("amqps://h/v").validate(), Ok(()));
        assert_eq!(
            with_url("redis://h/0").validate().unwrap_err(),
            "backend.url: an amqp backend needs an amqp:// or amqps:// url"
        );
    }

    #[test]
    fn prefetch_and_delivery_limit() {
        let b = amqp_with(|b| {
            if let BackendSection::Amqp { prefetch, .. } = b {
                *prefetch = Some(0);
            }
        });
        assert_eq!(
            b.validate().unwrap_err(),
            "backend.prefetch: must be at least 1 (0 would mean unlimited)"
        );
        let limited = |kind: AmqpQueueType, limit: u32| {
            amqp_with(|b| {
                if let BackendSection::Amqp {
                    queue_type,
                    delivery_limit,
                    ..
                } = b
                {
                    *queue_type = kind;
                    *delivery_limit = Some(limit);
                }
            })
        };
        assert_eq!(
            limited(AmqpQueueType::Classic, 3).validate().unwrap_err(),
            "backend.delivery_limit: only quorum queues have a delivery limit (set queue_type = \"quorum\")"
        );
        assert_eq!(
            limited(AmqpQueueType::Classic, 0).validate().unwrap_err(),
            "backend.delivery_limit: only quorum queues have a delivery limit (set queue_type = \"quorum\")"
        );
        assert_eq!(
            limited(AmqpQueueType::Quorum, 0).validate().unwrap_err(),
            "backend.delivery_limit: must be at least 1"
        );
        assert_eq!(limited(AmqpQueueType::Quorum, 3).validate(), Ok(()));
    }

    #[test]
    fn the_other_backends_have_nothing_to_check() {
        let backends = [
            BackendSection::Embedded {
                path: default_db_path(),
            },
            BackendSection::Redis {
                url: "not a url".into(),
            },
        ];
        for b in backends {
            assert_eq!(b.validate_checkpoint_store(), Ok(()));
            assert_eq!(b.validate(), Ok(()));
        }
    }
}
