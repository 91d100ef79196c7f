//! Publishing: the confirm-mode publish channel, one publish, and awaiting the broker's
//! confirms (all at once, or per message).

use super::connection::{amqp_err, io, while_open};
use super::Shared;
use crate::queue::QueueError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::{BasicProperties, Channel};

/// A publish and the confirm to await for it.
pub(super) type Confirm = (String, PublisherConfirm);
/// A result's confirm and, when the job has a `reply_to`, its reply's.
pub(super) type Confirms = (Confirm, Option<Confirm>);

impl Shared {
    /// The confirm-mode publish channel, re-opened if it closed.
    pub(super) async fn publisher(&self) -> Result<Channel, QueueError> {
        let live = self.current()?;
        let mut slot = live.publish.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = io("open the publish channel", live.conn.create_channel()).await?;
        io(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes one message; returns its confirm to await with the others.
    pub(super) async fn publish(
        ch: &Channel,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
        what: String,
    ) -> Result<(String, PublisherConfirm), QueueError> {
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
        .await?;
        Ok((what, confirm))
    }

    /// Awaits every confirm at once. A nack, a return (unroutable mandatory message) or a
    /// channel failure is an error: the delivery is not acked.
    pub(super) async fn confirmed(
        ch: &Channel,
        pending: Vec<(String, PublisherConfirm)>,
    ) -> Result<(), QueueError> {
        Self::confirm_each(ch, pending).await?.into_iter().collect()
    }

    /// Awaits every confirm at once and says, per message, whether the broker took it. Only
    /// the channel closing first fails the whole: then nothing is known of any of them.
    pub(super) async fn confirm_each(
        ch: &Channel,
        pending: Vec<(String, PublisherConfirm)>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let (whats, confirms): (Vec<String>, Vec<PublisherConfirm>) = pending.into_iter().unzip();
        let outcomes = while_open(
            ch,
            &format!("publisher confirms (for: {})", whats.join(", ")),
            async { Ok(futures::future::join_all(confirms).await) },
        )
        .await?;
        Ok(whats
            .iter()
            .zip(outcomes)
            .map(|(what, outcome)| match outcome {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
                    Err(QueueError::Amqp(format!(
                        "the {what} was returned unroutable ({} {}): does its queue exist?",
                        ret.reply_code, ret.reply_text
                    )))
                }
                Ok(Confirmation::Nack(None)) => Err(QueueError::Amqp(format!(
                    "the broker refused the {what} (publisher nack)"
                ))),
                Ok(Confirmation::NotRequested) => Err(QueueError::Amqp(format!(
                    "the {what} went out on a channel without confirms"
                ))),
                Err(e) => Err(amqp_err(&format!("confirm of the {what}"), e)),
            })
            .collect())
    }
}
