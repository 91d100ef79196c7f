//! How a claim ends, and the rules every backend applies when it does.
//!
//! The outcome set ([`Finish`], [`DeadLetter`], [`AttemptRecord`]) and one pure function,
//! [`rules`], that says for each outcome what happens to the job's message, to its stored run
//! (checkpoint and journal), to a human decision the claim carried and to the job's count of
//! recoveries; plus the redrive rule
//! ([`redrive_decision`]) and how a failed attempt is appended ([`failed_attempt`]). Backends
//! translate a [`Rules`] into their own transaction (embedded), script mode (Redis) or broker
//! calls (AMQP); none of them decides these things for itself.

use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use crate::attempt::AttemptRecord;

/// How a claim ends.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Publish `result` to the results destination (and optionally record a dead letter too).
    Publish {
        result: Vec<u8>,
        dead_letter: Option<DeadLetter>,
    },
    /// Retry later with the attempt recorded.
    Retry {
        delay: Duration,
        error: String,
        /// The attempt failed for want of infrastructure (the store, the audit disk), not in
        /// the graph: the checkpoint and journal stay, so the next attempt resumes after the
        /// last completed step. Without it the run is forgotten and starts from its first step
        /// (a failed run retried on purpose).
        keep_run: bool,
    },
    /// Move to the dead letters without a result.
    DeadLetter(DeadLetter),
    /// Give the job back untouched (shutdown): not a failed attempt. Its checkpoint stays, so
    /// the next claim resumes after the last completed step.
    Release,
    /// Pause for a human: publish the `awaiting_decision` result, store the pending record,
    /// and let go of the message. The checkpoint stays.
    Pause { result: Vec<u8>, pending: Vec<u8> },
}

/// What an operator finds in the dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job_id: String,
    pub reason: String,
    pub attempts: Vec<AttemptRecord>,
    /// Keep the run's checkpoint and journal: the job gave up on infrastructure (the store or
    /// the audit disk), not on its own steps, so a redrive resumes after its last finished step
    /// instead of running the finished ones again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_run: bool,
}

/// Whether the finish took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// This worker still held the claim; the finish happened.
    Done,
    /// The lease expired and the job was taken over (or finished) elsewhere: nothing was done.
    Lost,
}

/// Where the job's message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Removed; the result is published (and a dead letter too, when the finish carries one).
    Published,
    /// Back on the queue after a delay, as a new attempt.
    Delayed,
    /// Removed into the dead letters.
    DeadLettered,
    /// Back on the queue at once, in its place, as the same attempt.
    HandedBack,
    /// Removed; the `awaiting_decision` result is published and the pending record stored.
    Paused,
}

/// What happens to the job's stored run (its checkpoint and journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunFate {
    /// The run stays: the job's next claim (a retry, a redrive, a decision) resumes it.
    Kept,
    /// The run is removed: the job is over, or starts again from its first step.
    Forgotten,
}

/// What happens to a human decision the claim carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionFate {
    /// It stays on the job's message: the next claim resumes the same run and applies it.
    StaysWithJob,
    /// It is kept in the dead-letter entry, so a redrive applies it instead of asking again.
    KeptForRedrive,
    /// Gone: the run it answers is over or forgotten, so a later run asks its human again.
    /// Backends that mark a decision "on its way" clear the mark.
    Dropped,
    /// The run paused again: the carried decision was applied (or refused) on the way, and the
    /// new pending record asks for the next one. The pause settles any decision on its way.
    SettledByPause,
}

/// What one finish does: the verdict a backend carries out atomically (where it can).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub message: Message,
    pub run: RunFate,
    pub decision: DecisionFate,
    /// Whether the finish counts as a failed attempt (appended to the job's history).
    pub counts_attempt: bool,
    /// Whether the finish sets the job's count of recoveries ([`crate::queue::Claim::recoveries`])
    /// back to 0: a finish that ends the job's life (published, dead-lettered, paused for a
    /// human) does; a retry and a hand-back do not, so a job that kills its worker on its
    /// second attempt still counts the deaths of its first. A finish never adds a recovery:
    /// only a claim taken back from a holder that did not end it does (an expired lease, a
    /// dead worker's claims), in the backend's `recover`.
    pub resets_recoveries: bool,
}

impl Rules {
    /// The Redis `finish.lua` mode this verdict is carried out by: where the message goes
    /// (the run and the decision travel as arguments of their own).
    pub fn script_mode(&self) -> &'static str {
        match self.message {
            Message::Published => "publish",
            Message::Delayed => "retry",
            Message::DeadLettered => "dead",
            Message::HandedBack => "release",
            Message::Paused => "pause",
        }
    }

    /// Whether the decision the claim carried is no longer on its way once this finish is
    /// done (a backend that marks decisions on their way drops the mark).
    pub fn drops_decision_on_its_way(&self) -> bool {
        matches!(self.message, Message::DeadLettered)
            || (self.message == Message::Delayed && self.run == RunFate::Forgotten)
    }
}

/// The rules for one finish. Pure: every backend's finish is this table carried out.
pub fn rules(how: &Finish) -> Rules {
    use DecisionFate::*;
    let (message, run, decision, counts_attempt) = match how {
        Finish::Publish { .. } => (Message::Published, RunFate::Forgotten, Dropped, false),
        // A retry that keeps its run resumes it and applies the decision again; a retry from
        // the first step asks its human again (a decision kept would answer a run that is gone).
        Finish::Retry { keep_run: true, .. } => {
            (Message::Delayed, RunFate::Kept, StaysWithJob, true)
        }
        Finish::Retry {
            keep_run: false, ..
        } => (Message::Delayed, RunFate::Forgotten, Dropped, true),
        Finish::DeadLetter(dl) if dl.keep_run => {
            (Message::DeadLettered, RunFate::Kept, KeptForRedrive, false)
        }
        Finish::DeadLetter(_) => (Message::DeadLettered, RunFate::Forgotten, Dropped, false),
        // A hand-back is not an attempt: the job comes back as it was.
        Finish::Release => (Message::HandedBack, RunFate::Kept, StaysWithJob, false),
        Finish::Pause { .. } => (Message::Paused, RunFate::Kept, SettledByPause, false),
    };
    let resets_recoveries = matches!(
        message,
        Message::Published | Message::DeadLettered | Message::Paused
    );
    Rules {
        message,
        run,
        decision,
        counts_attempt,
        resets_recoveries,
    }
}

/// The history after a failed attempt: the claim's `attempt` (1 for the first) recorded with
/// its error and time. The job's stored count of failed attempts becomes `attempt`.
pub fn failed_attempt(
    history: &[AttemptRecord],
    attempt: u32,
    error: String,
    at: String,
) -> Vec<AttemptRecord> {
    let mut out = Vec::with_capacity(history.len() + 1);
    out.extend_from_slice(history);
    out.push(AttemptRecord { attempt, at, error });
    out
}

/// The redrive rule: a dead letter's kept decision goes back on the job only when the job's
/// run is there to resume. A job whose run is gone starts over, and a decision without its run
/// would only be refused again.
pub fn redrive_decision<T>(kept: Option<T>, run_stored: bool) -> Option<T> {
    kept.filter(|_| run_stored)
}

/// Whether a dead-letter entry keeps the decision the claim carried (see [`DecisionFate`]).
pub fn dead_letter_keeps_decision(dl: &DeadLetter) -> bool {
    rules(&Finish::DeadLetter(dl.clone())).decision == DecisionFate::KeptForRedrive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dl(keep_run: bool) -> DeadLetter {
        DeadLetter {
            job_id: "j".into(),
            reason: "r".into(),
            attempts: Vec::new(),
            keep_run,
        }
    }

    fn every_outcome() -> Vec<(&'static str, Finish)> {
        let retry = |keep_run| Finish::Retry {
            delay: Duration::from_millis(5),
            error: "e".into(),
            keep_run,
        };
        vec![
            (
                "publish",
                Finish::Publish {
                    result: b"{}".to_vec(),
                    dead_letter: None,
                },
            ),
            (
                "publish+dead",
                Finish::Publish {
                    result: b"{}".to_vec(),
                    dead_letter: Some(dl(false)),
                },
            ),
            ("retry_keep", retry(true)),
            ("retry", retry(false)),
            ("dead_keep", Finish::DeadLetter(dl(true))),
            ("dead", Finish::DeadLetter(dl(false))),
            ("release", Finish::Release),
            (
                "pause",
                Finish::Pause {
                    result: b"{}".to_vec(),
                    pending: b"{}".to_vec(),
                },
            ),
        ]
    }

    /// The whole table, one row per outcome: message, run, decision, attempt, script mode,
    /// whether a decision on its way is dropped, and whether the recoveries reset.
    #[test]
    fn the_finish_table() {
        use DecisionFate::*;
        use Message::*;
        use RunFate::*;
        let expected = [
            (
                "publish", Published, Forgotten, Dropped, false, "publish", false, true,
            ),
            (
                "publish+dead",
                Published,
                Forgotten,
                Dropped,
                false,
                "publish",
                false,
                true,
            ),
            (
                "retry_keep",
                Delayed,
                Kept,
                StaysWithJob,
                true,
                "retry",
                false,
                false,
            ),
            (
                "retry", Delayed, Forgotten, Dropped, true, "retry", true, false,
            ),
            (
                "dead_keep",
                DeadLettered,
                Kept,
                KeptForRedrive,
                false,
                "dead",
                true,
                true,
            ),
            (
                "dead",
                DeadLettered,
                Forgotten,
                Dropped,
                false,
                "dead",
                true,
                true,
            ),
            (
                "release",
                HandedBack,
                Kept,
                StaysWithJob,
                false,
                "release",
                false,
                false,
            ),
            (
                "pause",
                Paused,
                Kept,
                SettledByPause,
                false,
                "pause",
                false,
                true,
            ),
        ];
        let outcomes = every_outcome();
        assert_eq!(outcomes.len(), expected.len());
        for ((name, how), row) in outcomes.iter().zip(expected) {
            assert_eq!(*name, row.0);
            let r = rules(how);
            assert_eq!(
                (r.message, r.run, r.decision, r.counts_attempt),
                (row.1, row.2, row.3, row.4),
                "{name}"
            );
            assert_eq!(r.script_mode(), row.5, "{name}");
            assert_eq!(r.drops_decision_on_its_way(), row.6, "{name}");
            assert_eq!(r.resets_recoveries, row.7, "{name}");
        }
    }

    #[test]
    fn only_a_retry_counts_an_attempt_and_a_hand_back_never_does() {
        for (name, how) in every_outcome() {
            assert_eq!(
                rules(&how).counts_attempt,
                matches!(how, Finish::Retry { .. }),
                "{name}"
            );
        }
        assert!(!rules(&Finish::Release).counts_attempt);
    }

    #[test]
    fn recoveries_reset_exactly_when_the_jobs_life_ends() {
        for (name, how) in every_outcome() {
            let ends_life = matches!(
                how,
                Finish::Publish { .. } | Finish::DeadLetter(_) | Finish::Pause { .. }
            );
            assert_eq!(rules(&how).resets_recoveries, ends_life, "{name}");
        }
        // A retry keeps the count (a job that kills its worker on attempt 2 still counts), and
        // a hand-back neither counts nor resets.
        for keep_run in [true, false] {
            let retry = Finish::Retry {
                delay: Duration::ZERO,
                error: "e".into(),
                keep_run,
            };
            assert!(!rules(&retry).resets_recoveries);
        }
        assert!(!rules(&Finish::Release).resets_recoveries);
    }

    #[test]
    fn a_run_is_kept_exactly_when_the_job_can_come_back_to_it() {
        for (name, how) in every_outcome() {
            let kept = rules(&how).run == RunFate::Kept;
            let comes_back = match &how {
                Finish::Retry { keep_run, .. } => *keep_run,
                Finish::DeadLetter(dl) => dl.keep_run,
                Finish::Release | Finish::Pause { .. } => true,
                Finish::Publish { .. } => false,
            };
            assert_eq!(kept, comes_back, "{name}");
        }
    }

    #[test]
    fn a_decision_outlives_its_claim_only_with_its_run() {
        for (name, how) in every_outcome() {
            let r = rules(&how);
            if matches!(
                r.decision,
                DecisionFate::StaysWithJob | DecisionFate::KeptForRedrive
            ) {
                assert_eq!(r.run, RunFate::Kept, "{name}");
            }
        }
        assert!(dead_letter_keeps_decision(&dl(true)));
        assert!(!dead_letter_keeps_decision(&dl(false)));
    }

    #[test]
    fn a_failed_attempt_is_appended_with_the_claims_number() {
        let first = failed_attempt(&[], 1, "boom".into(), "t1".into());
        assert_eq!(
            first,
            vec![AttemptRecord {
                attempt: 1,
                at: "t1".into(),
                error: "boom".into()
            }]
        );
        let second = failed_attempt(&first, 2, "again".into(), "t2".into());
        assert_eq!(second.len(), 2);
        assert_eq!(second[0], first[0]);
        assert_eq!((second[1].attempt, second[1].error.as_str()), (2, "again"));
    }

    #[test]
    fn a_redrive_restores_a_decision_only_to_a_stored_run() {
        assert_eq!(redrive_decision(Some("approve"), true), Some("approve"));
        assert_eq!(redrive_decision(Some("approve"), false), None);
        assert_eq!(redrive_decision::<&str>(None, true), None);
    }
}
