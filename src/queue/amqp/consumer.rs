//! Consuming: one channel per consumed work queue (`basic.qos(prefetch)`), the task that
//! pumps its deliveries into the queue's buffer, and the buffers themselves, which outlive
//! connections so that `claim` reads one queue whatever the connection.

use super::connection::{io, Live};
use super::{lock, Shared};
use crate::queue::{QueueError, QueueNames};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

/// A delivery as the consumer received it, waiting to be claimed.
pub(super) struct Pending {
    pub(super) generation: u64,
    pub(super) channel: Channel,
    pub(super) delivery: lapin::message::Delivery,
}

/// One queue's deliveries, filled by the consumer task, drained by `claim`. It outlives
/// connections: a reconnect's consumer feeds the same buffer.
pub(super) struct Buffer {
    pub(super) tx: mpsc::UnboundedSender<Pending>,
    pub(super) rx: Mutex<mpsc::UnboundedReceiver<Pending>>,
    pub(super) len: AtomicUsize,
}

pub(super) struct Consuming {
    pub(super) channel: Channel,
    pub(super) tag: String,
    /// Set before a deliberate cancel, so the consumer task does not report a failure.
    pub(super) stopping: Arc<AtomicBool>,
}

/// Forwards a consumer's deliveries into its queue's buffer; reports the connection when the
/// stream ends without a deliberate cancel.
async fn pump(
    mut consumer: lapin::Consumer,
    channel: Channel,
    generation: u64,
    buffer: Arc<Buffer>,
    stopping: Arc<AtomicBool>,
    broken: mpsc::UnboundedSender<u64>,
    queue: String,
) {
    while let Some(item) = consumer.next().await {
        match item {
            Ok(delivery) => {
                buffer.len.fetch_add(1, Ordering::SeqCst);
                let pending = Pending {
                    generation,
                    channel: channel.clone(),
                    delivery,
                };
                if buffer.tx.send(pending).is_err() {
                    buffer.len.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    warn!(queue = %queue, error = %e, "amqp consumer failed");
                }
                break;
            }
        }
    }
    if !stopping.load(Ordering::SeqCst) {
        debug!(queue = %queue, generation, "amqp consumer ended");
        let _ = broken.send(generation);
    }
}

impl Shared {
    pub(super) fn buffer(&self, queue: &str) -> Arc<Buffer> {
        let mut b = lock(&self.buffers);
        Arc::clone(b.entry(queue.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Arc::new(Buffer {
                tx,
                rx: Mutex::new(rx),
                len: AtomicUsize::new(0),
            })
        }))
    }

    /// Starts consuming `q` on `live` (its own channel, `basic.qos(prefetch)`).
    pub(super) async fn start_consumer(
        &self,
        live: &Live,
        q: &QueueNames,
    ) -> Result<(), QueueError> {
        if lock(&live.consumers).contains_key(&q.jobs) {
            return Ok(());
        }
        self.ensure_topology(live, q).await?;
        let ch = io("open a consumer channel", live.conn.create_channel()).await?;
        io(
            "basic.qos",
            ch.basic_qos(self.opts.prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let tag = format!(
            "lar-worker-{}-{}-{}",
            self.worker_id,
            live.generation,
            crate::ids::new_id()
        );
        let consumer = io(
            &format!("consume '{}'", q.jobs),
            ch.basic_consume(
                &q.jobs,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let stopping = Arc::new(AtomicBool::new(false));
        tokio::spawn(pump(
            consumer,
            ch.clone(),
            live.generation,
            self.buffer(&q.jobs),
            Arc::clone(&stopping),
            self.broken.clone(),
            q.jobs.clone(),
        ));
        lock(&live.consumers).insert(
            q.jobs.clone(),
            Consuming {
                channel: ch,
                tag,
                stopping,
            },
        );
        info!(queue = %q.jobs, prefetch = self.opts.prefetch, generation = live.generation, "amqp consuming");
        Ok(())
    }

    /// Makes sure `q` is consumed on the current connection (or will be after a reconnect).
    pub(super) async fn ensure_consumer(&self, q: &QueueNames) -> Result<(), QueueError> {
        lock(&self.wanted)
            .entry(q.jobs.clone())
            .or_insert_with(|| q.clone());
        let consuming = |live: &Live| lock(&live.consumers).contains_key(&q.jobs);
        match lock(&self.live).clone() {
            None => return Ok(()), // the reconnect starts it
            Some(live) if consuming(&live) => return Ok(()),
            Some(_) => {}
        }
        let _setup = self.setup.lock().await;
        let Some(live) = lock(&self.live).clone() else {
            return Ok(());
        };
        if consuming(&live) {
            return Ok(());
        }
        self.start_consumer(&live, q).await
    }
}
