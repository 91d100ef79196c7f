//! The token budget a batch's branches share. Outside a batch one call runs at a time and the
//! `token_budget` state key is enough (a call starts while it is above 0, then it is decreased
//! by the call's `total_tokens`). Inside a batch every branch has its own copy of the state, so
//! the branches reserve from one [`SharedBudget`] instead, made from the batch's starting state.
//!
//! # The guarantee
//!
//! Before an LLM call a branch reserves [`reservation`] tokens: the node's `max_tokens`, plus
//! the UTF-8 length of its system and user messages (a byte-level BPE token covers at least one
//! byte), plus [`CALL_OVERHEAD_TOKENS`] for the chat template. A node without `max_tokens` has
//! no bound: its reservation is everything that is left. Then:
//!
//! - calls in flight together always fit: a call joins others only when the reservations of
//!   all of them, its own included, are at most what is left;
//! - a call that does not fit waits until the calls in flight have settled, then runs alone if
//!   anything (more than 0) is left, or fails with "token budget exhausted";
//! - after the call, the reservation is released and the provider's reported `total_tokens`
//!   (0 when it reports none, as outside a batch) is what is spent.
//!
//! So the total a batch spends exceeds its budget by at most what ONE call that ran alone used
//! beyond what was left when it started, the same bound as a chain of `llm` nodes, provided
//! each call uses no more than it reserved. A provider reporting more than the reservation
//! (an unusual tokenizer, a template larger than the allowance) is settled as reported, and the
//! excess of calls that ran together adds to that bound. Branches without `max_tokens` make
//! their calls one at a time while a budget is set.

use std::sync::Mutex;
use tokio::sync::Notify;

/// Tokens a reservation allows for the chat template around the messages (role headers,
/// special tokens, a server's default system prompt).
pub(super) const CALL_OVERHEAD_TOKENS: u64 = 32;

/// What one call reserves: `None` when it has no bound (no `max_tokens`).
pub(super) fn reservation(
    max_tokens: Option<u64>,
    system: Option<&str>,
    prompt: &str,
) -> Option<u64> {
    let bytes = prompt.len() as u64 + system.map_or(0, |s| s.len() as u64);
    max_tokens.map(|m| m.saturating_add(bytes).saturating_add(CALL_OVERHEAD_TOKENS))
}

/// A budget shared by concurrent calls: see the module documentation for what it guarantees.
pub(super) struct SharedBudget {
    inner: Mutex<Ledger>,
    settled: Notify,
    /// The state held an integer: messages show integers.
    integer: bool,
}

struct Ledger {
    /// The budget minus what settled calls spent.
    left: f64,
    /// The sum of the reservations of the calls in flight (excluding one running alone).
    reserved: f64,
    in_flight: usize,
    /// A call is running alone: nobody joins until it settles.
    alone: bool,
}

impl SharedBudget {
    /// A budget of `left` tokens (the `token_budget` of the batch's starting state).
    pub(super) fn new(left: f64, integer: bool) -> Self {
        SharedBudget {
            inner: Mutex::new(Ledger {
                left,
                reserved: 0.0,
                in_flight: 0,
                alone: false,
            }),
            settled: Notify::new(),
            integer,
        }
    }

    /// Waits until a call reserving `tokens` (`None`: unbounded) may start, or fails when
    /// nothing is left. The reservation is released when the returned guard is settled or
    /// dropped.
    pub(super) async fn reserve(&self, tokens: Option<u64>) -> Result<Reservation<'_>, String> {
        loop {
            // Registered before looking, so a settlement between the look and the wait is seen.
            let settled = self.settled.notified();
            {
                let mut l = self.lock();
                if l.in_flight == 0 {
                    if l.left <= 0.0 {
                        return Err(format!(
                            "token budget exhausted (token_budget = {})",
                            self.show(l.left)
                        ));
                    }
                    l.in_flight = 1;
                    return Ok(match tokens {
                        Some(t) if t as f64 <= l.left => {
                            l.reserved = t as f64;
                            self.guard(Some(t))
                        }
                        _ => {
                            l.alone = true;
                            self.guard(None)
                        }
                    });
                }
                if let Some(t) = tokens {
                    if !l.alone && l.reserved + t as f64 <= l.left {
                        l.in_flight += 1;
                        l.reserved += t as f64;
                        return Ok(self.guard(Some(t)));
                    }
                }
            }
            settled.await;
        }
    }

    /// Tokens left after the calls settled so far.
    #[cfg(test)]
    fn left(&self) -> f64 {
        self.lock().left
    }

    fn guard(&self, reserved: Option<u64>) -> Reservation<'_> {
        Reservation {
            budget: self,
            reserved,
            done: false,
        }
    }

    fn release(&self, reserved: Option<u64>, spent: u64) {
        {
            let mut l = self.lock();
            l.in_flight = l.in_flight.saturating_sub(1);
            match reserved {
                Some(t) => l.reserved = (l.reserved - t as f64).max(0.0),
                None => l.alone = false,
            }
            if l.in_flight == 0 {
                l.reserved = 0.0; // no float dust left behind
            }
            l.left -= spent as f64;
        }
        self.settled.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger is a few numbers updated in one go: a panic elsewhere cannot leave it torn.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn show(&self, left: f64) -> String {
        if self.integer && left.fract() == 0.0 {
            format!("{}", left as i64)
        } else {
            format!("{left}")
        }
    }
}

/// A call's claim on a [`SharedBudget`]; dropped unsettled (the call failed, or its step was
/// cancelled), it spends nothing.
pub(super) struct Reservation<'a> {
    budget: &'a SharedBudget,
    reserved: Option<u64>,
    done: bool,
}

impl Reservation<'_> {
    /// The call is over and used `spent` tokens.
    pub(super) fn settle(mut self, spent: u64) {
        self.done = true;
        self.budget.release(self.reserved, spent);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.budget.release(self.reserved, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Polls once: whether the future is ready now.
    fn ready<F: Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        match f.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[test]
    fn reservation_counts_max_tokens_messages_and_overhead() {
        assert_eq!(
            reservation(Some(100), Some("sys"), "hello"),
            Some(100 + 8 + CALL_OVERHEAD_TOKENS)
        );
        assert_eq!(reservation(None, None, "hello"), None);
    }

    #[test]
    fn calls_that_fit_run_together_and_one_that_does_not_waits() {
        let b = SharedBudget::new(100.0, true);
        let first = ready(pin!(b.reserve(Some(40)))).unwrap().unwrap();
        let second = ready(pin!(b.reserve(Some(40)))).unwrap().unwrap();
        let mut third = pin!(b.reserve(Some(40)));
        assert!(ready(third.as_mut()).is_none(), "120 reserved > 100 left");
        first.settle(30);
        // 70 left, 40 reserved: 40 more do not fit yet.
        assert!(ready(third.as_mut()).is_none());
        second.settle(30);
        // Nothing in flight, 40 left: the third runs (40 fits).
        let third = ready(third.as_mut()).unwrap().unwrap();
        assert_eq!(b.left(), 40.0);
        third.settle(40);
        let err = ready(pin!(b.reserve(Some(1)))).unwrap().err().unwrap();
        assert_eq!(err, "token budget exhausted (token_budget = 0)");
    }

    #[test]
    fn a_call_that_does_not_fit_runs_alone_while_anything_is_left() {
        let b = SharedBudget::new(50.0, true);
        // Bigger than the budget, nothing in flight: runs, alone.
        let big = ready(pin!(b.reserve(Some(80)))).unwrap().unwrap();
        assert!(ready(pin!(b.reserve(Some(1)))).is_none(), "nobody joins");
        big.settle(70);
        let err = ready(pin!(b.reserve(Some(1)))).unwrap().err().unwrap();
        assert_eq!(err, "token budget exhausted (token_budget = -20)");
    }

    #[test]
    fn an_unbounded_call_runs_alone_and_a_dropped_reservation_spends_nothing() {
        let b = SharedBudget::new(10.5, false);
        let unbounded = ready(pin!(b.reserve(None))).unwrap().unwrap();
        let mut next = pin!(b.reserve(Some(1)));
        assert!(ready(next.as_mut()).is_none());
        drop(unbounded);
        let next = ready(next.as_mut()).unwrap().unwrap();
        assert_eq!(b.left(), 10.5);
        next.settle(11);
        let err = ready(pin!(b.reserve(None))).unwrap().err().unwrap();
        assert_eq!(err, "token budget exhausted (token_budget = -0.5)");
    }
}
