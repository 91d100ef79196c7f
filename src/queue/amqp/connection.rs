//! The broker connection: connecting, the supervisor that reconnects after a reported
//! failure, the event watcher that reports one, and the helpers every broker call goes through
//! (a deadline, the wait while a channel is open, error hints, urls with their passwords
//! masked).

use super::consumer::Consuming;
use super::{lock, Shared};
use crate::backoff::Backoff;
use crate::queue::{QueueError, QueueNames};
use futures::StreamExt;
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest any one broker operation may take before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::net::mask::{mask_credentials, redact};

pub(super) fn amqp_err(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Amqp(format!("{what}: {e}"))
}

/// Runs one broker operation with a deadline, mapping its error.
pub(super) async fn io<T>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(explain(what, e)),
        Err(_) => Err(QueueError::Amqp(format!(
            "{what}: no answer from the broker within {IO_TIMEOUT:?}"
        ))),
    }
}

/// Waits for a publish or its confirms for as long as `ch` is open, with no deadline. A publish
/// given up on while its channel lives still goes out once the broker reads it (after a memory
/// or disk alarm, say): its outcome is unknown, and publishing again would add a copy on every
/// try. A channel that closes (the broker closed it, or the connection died, which heartbeats
/// detect) ends the wait: then each message went out at most once.
pub(super) async fn while_open<T>(
    ch: &Channel,
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    tokio::pin!(fut);
    let mut check = tokio::time::interval(Duration::from_millis(500));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut fut => return r.map_err(|e| explain(what, e)),
            _ = check.tick() => {
                if !ch.status().connected() {
                    return Err(QueueError::Amqp(format!(
                        "{what}: the channel closed before the broker answered"
                    )));
                }
            }
        }
    }
}

/// Adds a hint to the errors operators meet when the topology does not match the config.
fn explain(what: &str, e: lapin::Error) -> QueueError {
    let text = e.to_string();
    let hint = if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
        match p.get_id() {
            404 => " (it does not exist; with declare = false the operators must create it)",
            406 => {
                " (it exists with other arguments: was it declared with another queue_type or \
                 delivery_limit? delete it or match the config)"
            }
            403 => " (the broker user lacks the permission)",
            _ => "",
        }
    } else {
        ""
    };
    QueueError::Amqp(format!("{what}: {text}{hint}"))
}

/// One live connection and its channels.
pub(super) struct Live {
    pub(super) generation: u64,
    /// Ends the connection's event watcher.
    pub(super) stop: CancellationToken,
    pub(super) conn: Connection,
    /// The confirm-mode channel every publish goes out on (re-opened if it closes).
    pub(super) publish: Mutex<Option<Channel>>,
    /// The confirm channel of each named exchange published to (see `publish.rs`).
    pub(super) by_exchange: StdMutex<HashMap<String, Channel>>,
    pub(super) consumers: StdMutex<HashMap<String, Consuming>>,
    /// Work queues whose topology was declared (or checked) on this connection.
    pub(super) declared: StdMutex<HashSet<String>>,
}

/// Reconnects after a reported failure of the current connection, with backoff, until it
/// works or the backend closes.
pub(super) async fn supervise(shared: Weak<Shared>, mut reports: mpsc::UnboundedReceiver<u64>) {
    while let Some(generation) = reports.recv().await {
        let Some(s) = shared.upgrade() else { return };
        if s.closing.load(Ordering::SeqCst) {
            return;
        }
        if generation != s.generation.load(Ordering::SeqCst) {
            continue; // a late report about a connection already replaced
        }
        let old = lock(&s.live).take();
        if let Some(old) = old {
            old.stop.cancel();
            warn!(
                generation,
                "amqp connection lost: in-flight deliveries return to the queue; reconnecting"
            );
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    old.conn.close(200, "reconnecting"),
                )
                .await;
            });
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            tokio::time::sleep(Backoff::reconnect().delay(attempt)).await;
            if s.closing.load(Ordering::SeqCst) {
                return;
            }
            match s.connect_once().await {
                Ok(()) => {
                    info!(
                        attempts = attempt,
                        generation = s.generation.load(Ordering::SeqCst),
                        "amqp reconnected"
                    );
                    break;
                }
                Err(e) => warn!(attempt, error = %e, "amqp reconnect failed"),
            }
        }
    }
}

/// Reports the connection's first error to the supervisor; warns while the broker blocks
/// publishing (a resource alarm: confirms, and so finishes, stall until it clears).
async fn watch_events(
    events: impl futures::Stream<Item = lapin::Event> + Send + 'static,
    status: lapin::ConnectionStatus,
    generation: u64,
    broken: mpsc::UnboundedSender<u64>,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            // Channel-level closes (a 404 from a passive declare, say) come here too; only a
            // connection that is no longer connected is worth a reconnect.
            Some(lapin::Event::Error(e)) if status.connected() => {
                debug!(generation, error = %e, "amqp channel error");
            }
            Some(lapin::Event::Error(e)) => {
                debug!(generation, error = %e, "amqp connection error");
                let _ = broken.send(generation);
                return;
            }
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                warn!(%reason, "the broker blocked publishing on this connection");
            }
            Some(lapin::Event::ConnectionUnblocked) => info!("the broker unblocked publishing"),
            Some(_) => {}
        }
    }
}

impl Shared {
    pub(super) fn current(&self) -> Result<Arc<Live>, QueueError> {
        lock(&self.live)
            .clone()
            .ok_or_else(|| QueueError::Amqp("not connected to the broker (reconnecting)".into()))
    }

    pub(super) async fn connect_once(self: &Arc<Self>) -> Result<(), QueueError> {
        let _setup = self.setup.lock().await;
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("lar-worker {}", self.worker_id).into_bytes(),
        ));
        let url = redact(&self.opts.url);
        let conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.opts.url, props))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(amqp_err(&format!("cannot connect to {url}"), e)),
                Err(_) => {
                    return Err(QueueError::Amqp(format!(
                        "cannot connect to {url}: no answer within {CONNECT_TIMEOUT:?}"
                    )))
                }
            };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let stop = CancellationToken::new();
        tokio::spawn(watch_events(
            conn.events_listener(),
            conn.status().clone(),
            generation,
            self.broken.clone(),
            stop.clone(),
        ));
        let live = Arc::new(Live {
            generation,
            stop,
            conn,
            publish: Mutex::new(None),
            by_exchange: StdMutex::new(HashMap::new()),
            consumers: StdMutex::new(HashMap::new()),
            declared: StdMutex::new(HashSet::new()),
        });
        *lock(&self.live) = Some(Arc::clone(&live));
        let wanted: Vec<QueueNames> = lock(&self.wanted).values().cloned().collect();
        for q in &wanted {
            if let Err(e) = self.start_consumer(&live, q).await {
                *lock(&self.live) = None;
                live.stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), live.conn.close(200, "retry"))
                    .await;
                return Err(e);
            }
        }
        Ok(())
    }
}
