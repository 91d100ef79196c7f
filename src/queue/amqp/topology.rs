//! The topology of a work queue (its dead-letter exchange, dead-letter, delay and results
//! queues): the names, declaring it (or only checking it, with `declare = false`) once per
//! connection, and deleting it.
//!
//! Delays go through buckets: one delay queue per delay class ([`DELAY_LADDER`]), each with its
//! own `x-message-ttl`, dead-lettering back into the work queue. RabbitMQ expires messages only
//! at the head of a queue, so one delay queue for every delay would hold a 1 s retry behind a
//! 60 s one queued before it; in a bucket every message has the same TTL, so the head is always
//! the first one due and nothing waits behind a longer delay. A retry's delay is rounded **up**
//! to its bucket ([`Topology::delay_for`]): it never comes back early, and at most one step of
//! the ladder late (a 1.5 s delay waits 3 s; a 40 s one a minute).

use super::connection::{amqp_err, io, redact, Live, CONNECT_TIMEOUT};
use super::headers::text;
use super::{lock, Shared};
use crate::queue::{QueueError, QueueNames};
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;

/// The kind of the queues the AMQP backend declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmqpQueueType {
    #[default]
    Classic,
    Quorum,
}

/// The delay classes, shortest first, with the suffix of their queue's name: steps of about
/// 3x from a second to a week (the longest backoff `worker.retry` allows). A delay is rounded
/// up to the first bucket at least as long; a longer one (impossible with a valid config) goes
/// to the last.
pub const DELAY_LADDER: [(u64, &str); 14] = [
    (1, "1s"),
    (3, "3s"),
    (10, "10s"),
    (30, "30s"),
    (60, "1m"),
    (3 * 60, "3m"),
    (10 * 60, "10m"),
    (30 * 60, "30m"),
    (3600, "1h"),
    (3 * 3600, "3h"),
    (10 * 3600, "10h"),
    (86_400, "1d"),
    (3 * 86_400, "3d"),
    (7 * 86_400, "7d"),
];

/// One delay queue: messages wait in it `after`, then the broker moves them to the work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayBucket {
    pub after: Duration,
    /// `<queue>.delay.<class>`, e.g. `jobs.delay.30s`.
    pub queue: String,
}

/// The names of one work queue's topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub results: String,
    /// The delay buckets, shortest first (see [`DELAY_LADDER`]).
    pub delays: Vec<DelayBucket>,
    /// The single delay queue of earlier versions (`<queue>.delay`). No longer declared nor
    /// published to; retries already in it still expire back to the work queue (its own
    /// arguments say where), and [`delete_topology`] removes it.
    pub legacy_delay: String,
    pub dead: String,
    pub dlx: String,
}

impl Topology {
    pub fn of(q: &QueueNames) -> Self {
        Topology {
            jobs: q.jobs.clone(),
            results: q.results.clone(),
            delays: DELAY_LADDER
                .iter()
                .map(|(secs, class)| DelayBucket {
                    after: Duration::from_secs(*secs),
                    queue: format!("{}.delay.{class}", q.jobs),
                })
                .collect(),
            legacy_delay: format!("{}.delay", q.jobs),
            dead: format!("{}.dead", q.jobs),
            dlx: format!("{}.dlx", q.jobs),
        }
    }

    /// The bucket a retry delayed by `delay` waits in: the shortest at least as long (the delay
    /// rounded up), or the longest.
    pub fn delay_for(&self, delay: Duration) -> &DelayBucket {
        self.delays
            .iter()
            .find(|b| b.after >= delay)
            .or_else(|| self.delays.last())
            .expect("the ladder is not empty")
    }
}

impl Shared {
    /// Declares (or checks) the topology of `q` once per connection.
    pub(super) async fn ensure_topology(
        &self,
        live: &Live,
        q: &QueueNames,
    ) -> Result<(), QueueError> {
        if lock(&live.declared).contains(&q.jobs) {
            return Ok(());
        }
        let ch = io("open a channel", live.conn.create_channel()).await?;
        let res = self.declare_on(&ch, q).await;
        if ch.status().connected() {
            let _ = io("close a channel", ch.close(200, "declared")).await;
        }
        res?;
        lock(&live.declared).insert(q.jobs.clone());
        Ok(())
    }

    async fn declare_on(&self, ch: &Channel, q: &QueueNames) -> Result<(), QueueError> {
        let t = Topology::of(q);
        let quorum = self.opts.queue_type == AmqpQueueType::Quorum;
        let passive = !self.opts.declare;
        let qopts = QueueDeclareOptions {
            passive,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let typed = |extra: &[(&str, AMQPValue)]| {
            let mut a = FieldTable::default();
            if quorum {
                a.insert("x-queue-type".into(), text("quorum"));
            }
            for (k, v) in extra {
                a.insert(ShortString::from(*k), v.clone());
            }
            a
        };
        let at_least_once: Vec<(&str, AMQPValue)> = if quorum {
            vec![
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ]
        } else {
            Vec::new()
        };
        if passive {
            io(
                &format!("check exchange '{}'", t.dlx),
                ch.exchange_declare(
                    &t.dlx,
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            let buckets = t.delays.iter().map(|b| &b.queue);
            for name in [&t.jobs, &t.results, &t.dead].into_iter().chain(buckets) {
                io(
                    &format!("check queue '{name}'"),
                    ch.queue_declare(name, qopts, FieldTable::default()),
                )
                .await?;
            }
            return Ok(());
        }
        io(
            &format!("declare exchange '{}'", t.dlx),
            ch.exchange_declare(
                &t.dlx,
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        io(
            &format!("declare queue '{}'", t.dead),
            ch.queue_declare(&t.dead, qopts, typed(&[])),
        )
        .await?;
        io(
            &format!("bind queue '{}'", t.dead),
            ch.queue_bind(
                &t.dead,
                &t.dlx,
                &t.jobs,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let mut work: Vec<(&str, AMQPValue)> = vec![
            ("x-dead-letter-exchange", text(&t.dlx)),
            ("x-dead-letter-routing-key", text(&t.jobs)),
        ];
        if let Some(limit) = self.opts.delivery_limit.filter(|_| quorum) {
            work.push(("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit))));
        }
        work.extend(at_least_once.iter().cloned());
        io(
            &format!("declare queue '{}'", t.jobs),
            ch.queue_declare(&t.jobs, qopts, typed(&work)),
        )
        .await?;
        for bucket in &t.delays {
            let ttl = i64::try_from(bucket.after.as_millis()).unwrap_or(i64::MAX);
            let mut delay: Vec<(&str, AMQPValue)> = vec![
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&t.jobs)),
                ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
            ];
            delay.extend(at_least_once.iter().cloned());
            io(
                &format!("declare queue '{}'", bucket.queue),
                ch.queue_declare(&bucket.queue, qopts, typed(&delay)),
            )
            .await?;
        }
        io(
            &format!("declare queue '{}'", t.results),
            ch.queue_declare(&t.results, qopts, typed(&[])),
        )
        .await?;
        Ok(())
    }
}

/// Deletes a work queue's whole topology (tests, benchmarks, operators' cleanup).
pub async fn delete_topology(url: &str, q: &QueueNames) -> Result<(), QueueError> {
    let conn = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(amqp_err(&format!("cannot connect to {}", redact(url)), e)),
        Err(_) => return Err(QueueError::Amqp("connect timed out".into())),
    };
    let t = Topology::of(q);
    let mut first_err = None;
    let buckets = t.delays.iter().map(|b| &b.queue);
    let queues = [&t.jobs, &t.results, &t.dead, &t.legacy_delay];
    for name in queues.into_iter().chain(buckets) {
        // A channel per delete: an error closes the channel.
        let ch = io("open a channel", conn.create_channel()).await?;
        match io(
            &format!("delete queue '{name}'"),
            ch.queue_delete(name, QueueDeleteOptions::default()),
        )
        .await
        {
            Ok(_) => {
                let _ = io("close a channel", ch.close(200, "ok")).await;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let ch = io("open a channel", conn.create_channel()).await?;
    if let Err(e) = io(
        &format!("delete exchange '{}'", t.dlx),
        ch.exchange_delete(&t.dlx, lapin::options::ExchangeDeleteOptions::default()),
    )
    .await
    {
        first_err.get_or_insert(e);
    }
    let _ = io("close the connection", conn.close(200, "cleanup")).await;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
