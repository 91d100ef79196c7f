//! Publishing: the confirm-mode publish channels, one publish, and awaiting the broker's
//! confirms (all at once, or per message).
//!
//! One bad publish must not cost the others their confirms. The broker refuses some publishes
//! one by one (an unroutable mandatory message comes back with a `basic.return`, a full quorum
//! queue nacks it) but others by closing the channel they came on (a missing exchange: 404; a
//! forbidden one: 403; a body over `max_message_size`: 406), and then every other publish on
//! that channel whose confirm had not arrived has an unknown outcome: its finish would be
//! retried and might publish a second copy. So publishes go out on three kinds of channel:
//!
//! * the shared channel: the default exchange (results, replies, retries into the delay
//!   buckets, jobs, decisions), bodies up to [`OWN_CHANNEL_ABOVE`]. The default exchange
//!   always exists and is routed per message, so the broker refuses these one by one;
//! * a channel per named exchange (the dead-letter exchanges), kept open and re-opened when it
//!   closes: a missing or forbidden exchange closes only the channel of publishes that would
//!   all be refused the same way;
//! * a channel of its own for a body above [`OWN_CHANNEL_ABOVE`] (opened, used, closed), which
//!   a broker with a low `max_message_size` refuses by closing it.
//!
//! A channel of either of the last two kinds that closes before its confirm fails only its own
//! publishes, as refused; the shared channel closing still leaves all of its publishes unknown.

use super::connection::{amqp_err, io, while_open, Live};
use super::{lock, Shared};
use crate::queue::QueueError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::{BasicProperties, Channel};
use std::sync::Arc;

/// Bodies larger than this go out on a channel of their own. A MiB: `worker.max_message_bytes`
/// by default, so jobs and ordinary results stay on the shared channel, and far below the
/// `max_message_size` of RabbitMQ's defaults (16 MiB in 4.x, 128 MiB in 3.x).
pub(super) const OWN_CHANNEL_ABOVE: usize = 1 << 20;

/// The channels a finish publishes on: the connection's shared confirm channel, and through
/// the connection the others (see the module doc).
pub(super) struct Publisher {
    live: Arc<Live>,
    shared: Channel,
}

/// Which channel a publish went out on.
enum Lane {
    Shared,
    /// The channel of one named exchange.
    Exchange(Channel),
    /// A channel of its own, closed once its confirm is in.
    Own(Channel),
}

/// A publish and the confirm to await for it.
pub(super) struct Confirm {
    what: String,
    confirm: PublisherConfirm,
    lane: Lane,
}

/// A result's confirm and, when the job has a `reply_to`, its reply's.
pub(super) type Confirms = (Confirm, Option<Confirm>);

/// Opens a channel in confirm mode on `live`.
async fn confirm_channel(live: &Live, what: &str) -> Result<Channel, QueueError> {
    let ch = io(&format!("open {what}"), live.conn.create_channel()).await?;
    io(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(ch)
}

/// A publish whose own channel (of its exchange, or of it alone) closed before its confirm:
/// the broker refused it (or the connection went); the shared channel's publishes are unharmed.
fn refused(what: &str, e: QueueError) -> QueueError {
    QueueError::Amqp(format!(
        "the {what} was refused, its channel closed (a missing or forbidden exchange, a message \
         over max_message_size, or a lost connection): {e}"
    ))
}

impl Shared {
    /// The publish channels of the current connection; the shared one re-opened if it closed.
    pub(super) async fn publisher(&self) -> Result<Publisher, QueueError> {
        let live = self.current()?;
        let shared = {
            let mut slot = live.publish.lock().await;
            match slot.as_ref() {
                Some(ch) if ch.status().connected() => ch.clone(),
                _ => {
                    let ch = confirm_channel(&live, "the publish channel").await?;
                    *slot = Some(ch.clone());
                    ch
                }
            }
        };
        Ok(Publisher { live, shared })
    }

    /// Publishes one message on the channel its kind goes on (see the module doc); returns
    /// its confirm to await with the others.
    pub(super) async fn publish(
        p: &Publisher,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
        what: String,
    ) -> Result<Confirm, QueueError> {
        let lane = if body.len() > OWN_CHANNEL_ABOVE {
            Lane::Own(confirm_channel(&p.live, &format!("a channel for the {what}")).await?)
        } else if !exchange.is_empty() {
            Lane::Exchange(Self::exchange_channel(&p.live, exchange).await?)
        } else {
            Lane::Shared
        };
        let ch = match &lane {
            Lane::Shared => &p.shared,
            Lane::Exchange(ch) | Lane::Own(ch) => ch,
        };
        let confirm = while_open(
            ch,
            &format!("publish the {what}"),
            ch.basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                props,
            ),
        )
        .await;
        let confirm = match confirm {
            Ok(c) => c,
            Err(e) => {
                if let Lane::Own(ch) = &lane {
                    close_own(ch).await;
                }
                return Err(e);
            }
        };
        Ok(Confirm {
            what,
            confirm,
            lane,
        })
    }

    /// The confirm channel of publishes to `exchange` on `live`, re-opened if it closed.
    async fn exchange_channel(live: &Live, exchange: &str) -> Result<Channel, QueueError> {
        let open = lock(&live.by_exchange)
            .get(exchange)
            .filter(|ch| ch.status().connected())
            .cloned();
        if let Some(ch) = open {
            return Ok(ch);
        }
        let ch = confirm_channel(live, &format!("the channel of exchange '{exchange}'")).await?;
        // Two finishes may open one at once: the later one's replaces the other, which stays
        // open until its own confirms are in and the connection closes it.
        lock(&live.by_exchange).insert(exchange.to_string(), ch.clone());
        Ok(ch)
    }

    /// Awaits every confirm at once. A nack, a return (unroutable mandatory message) or a
    /// channel failure is an error: the delivery is not acked.
    pub(super) async fn confirmed(p: &Publisher, pending: Vec<Confirm>) -> Result<(), QueueError> {
        Self::confirm_each(p, pending).await?.into_iter().collect()
    }

    /// Awaits every confirm at once and says, per message, whether the broker took it. Only
    /// the shared channel closing first fails the whole: then nothing is known of any of them.
    /// A channel of one exchange, or of one message, that closes fails only its own.
    pub(super) async fn confirm_each(
        p: &Publisher,
        pending: Vec<Confirm>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let mut whats = Vec::with_capacity(pending.len());
        let mut on_shared = Vec::new();
        let mut on_own = Vec::new();
        for (i, c) in pending.into_iter().enumerate() {
            whats.push(c.what.clone());
            match c.lane {
                Lane::Shared => on_shared.push((i, c.confirm)),
                Lane::Exchange(ch) => on_own.push((i, c.what, c.confirm, ch, false)),
                Lane::Own(ch) => on_own.push((i, c.what, c.confirm, ch, true)),
            }
        }
        let (shared_idx, shared_confirms): (Vec<usize>, Vec<PublisherConfirm>) =
            on_shared.into_iter().unzip();
        let shared_whats: Vec<&str> = shared_idx.iter().map(|i| whats[*i].as_str()).collect();
        let shared = async {
            if shared_confirms.is_empty() {
                return Ok(Vec::new());
            }
            while_open(
                &p.shared,
                &format!("publisher confirms (for: {})", shared_whats.join(", ")),
                async { Ok(futures::future::join_all(shared_confirms).await) },
            )
            .await
        };
        let own = futures::future::join_all(on_own.into_iter().map(
            |(i, what, confirm, ch, close)| async move {
                let outcome =
                    match while_open(&ch, &format!("confirm of the {what}"), confirm).await {
                        Ok(c) => Ok(c),
                        Err(e) => Err(refused(&what, e)),
                    };
                if close {
                    close_own(&ch).await;
                }
                (i, outcome)
            },
        ));
        let (shared, own) = futures::join!(shared, own);
        let shared = shared?;
        let mut outcomes: Vec<Option<Result<Confirmation, QueueError>>> =
            (0..whats.len()).map(|_| None).collect();
        for (i, c) in shared_idx.into_iter().zip(shared) {
            outcomes[i] = Some(c.map_err(|e| amqp_err(&format!("confirm of the {}", whats[i]), e)));
        }
        for (i, c) in own {
            outcomes[i] = Some(c);
        }
        Ok(whats
            .iter()
            .zip(outcomes)
            .map(|(what, outcome)| match outcome {
                Some(Ok(Confirmation::Ack(None))) => Ok(()),
                Some(Ok(Confirmation::Ack(Some(ret))))
                | Some(Ok(Confirmation::Nack(Some(ret)))) => Err(QueueError::Amqp(format!(
                    "the {what} was returned unroutable ({} {}): does its queue exist?",
                    ret.reply_code, ret.reply_text
                ))),
                Some(Ok(Confirmation::Nack(None))) => Err(QueueError::Amqp(format!(
                    "the broker refused the {what} (publisher nack)"
                ))),
                Some(Ok(Confirmation::NotRequested)) => Err(QueueError::Amqp(format!(
                    "the {what} went out on a channel without confirms"
                ))),
                Some(Err(e)) => Err(e),
                None => Err(QueueError::Amqp(format!("no confirm of the {what}"))),
            })
            .collect())
    }
}

/// Closes a channel opened for one publish (best effort: the broker may have closed it).
async fn close_own(ch: &Channel) {
    if ch.status().connected() {
        let _ = io("close a publish channel", ch.close(200, "published")).await;
    }
}
