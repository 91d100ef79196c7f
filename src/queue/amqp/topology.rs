//! The topology of a work queue (its dead-letter exchange, dead-letter, delay and results
//! queues): the names, declaring it (or only checking it, with `declare = false`) once per
//! connection, and deleting it.

use super::connection::{amqp_err, io, redact, Live, CONNECT_TIMEOUT};
use super::headers::text;
use super::{lock, Shared};
use crate::queue::{QueueError, QueueNames};
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// The kind of the queues the AMQP backend declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmqpQueueType {
    #[default]
    Classic,
    Quorum,
}

/// The names of one work queue's topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub results: String,
    pub delay: String,
    pub dead: String,
    pub dlx: String,
}

impl Topology {
    pub fn of(q: &QueueNames) -> Self {
        Topology {
            jobs: q.jobs.clone(),
            results: q.results.clone(),
            delay: format!("{}.delay", q.jobs),
            dead: format!("{}.dead", q.jobs),
            dlx: format!("{}.dlx", q.jobs),
        }
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
            for name in [&t.jobs, &t.results, &t.delay, &t.dead] {
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
        let mut delay: Vec<(&str, AMQPValue)> = vec![
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&t.jobs)),
        ];
        delay.extend(at_least_once.iter().cloned());
        io(
            &format!("declare queue '{}'", t.delay),
            ch.queue_declare(&t.delay, qopts, typed(&delay)),
        )
        .await?;
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
    for name in [&t.jobs, &t.results, &t.delay, &t.dead] {
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
