//! Wiring: the one place that turns a loaded configuration into live parts (today, the queue
//! backend). It sits above both `config` and `queue`, so neither has to know the other: the
//! backends take plain options, and the config never opens a connection.

/// Opens the backend a config names.
pub async fn connect_backend(
    cfg: &crate::config::Config,
    worker_id: String,
) -> Result<std::sync::Arc<dyn crate::queue::Backend>, crate::queue::QueueError> {
    use crate::config::{BackendSection, PayloadFormat};
    use std::sync::Arc;
    // Queues whose messages are envelopes: every backend takes their `id` as the job id.
    let envelope_queues: Vec<String> = cfg
        .queues
        .iter()
        .filter(|q| q.payload == PayloadFormat::Envelope)
        .map(|q| q.name.clone())
        .collect();
    match &cfg.backend {
        BackendSection::Redis { url } => Ok(Arc::new(
            crate::queue::redis::RedisBackend::connect(url, worker_id, envelope_queues).await?,
        )),
        BackendSection::Embedded { path } => Ok(Arc::new(
            crate::queue::embedded::EmbeddedBackend::open(path, worker_id)?
                .with_envelope_queues(envelope_queues.into_iter().collect()),
        )),
        BackendSection::Amqp {
            url,
            prefetch,
            queue_type,
            delivery_limit,
            declare,
            dedupe_redis_url,
            checkpoint_store,
        } => {
            let opts = crate::queue::amqp::AmqpOptions {
                url: url.clone(),
                prefetch: prefetch
                    .unwrap_or_else(|| cfg.worker.concurrency.min(u16::MAX as usize) as u16),
                queue_type: *queue_type,
                delivery_limit: *delivery_limit,
                declare: *declare,
                dedupe_redis_url: dedupe_redis_url.clone(),
                checkpoint_store: checkpoint_store.clone(),
                envelope_queues,
            };
            let backend = crate::queue::amqp::AmqpBackend::connect(opts, worker_id).await?;
            // Declare (or check) every configured queue now: a wrong topology fails the start.
            for q in &cfg.queues {
                backend
                    .ensure_topology(&crate::queue::QueueNames {
                        jobs: q.name.clone(),
                        results: q.results.clone(),
                    })
                    .await?;
            }
            Ok(Arc::new(backend))
        }
    }
}
