//! The outcome decisions, branch by branch: plain values in, the finish and verdict out.

use super::{
    count, finish_for, fit_result, refused, request_expiry, retry_or_dead, too_many_recoveries,
    Policy, Verdict,
};
use crate::backoff::Backoff;
use crate::config::{PayloadFormat, RetrySection};
use crate::exec::RunStatus;
use crate::job::JobReport;
use crate::queue::{AttemptRecord, Claim, ClaimHandle, DeadLetter, Finish};
use crate::worker::payload::{ParsedJob, META_KEY};
use crate::worker::stats::Stats;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// The worker's side of [`Policy`]: three attempts, failed runs retried, no jitter (so a
/// retry's delay is the initial backoff, 1 s).
struct Setup {
    retry: RetrySection,
    backoff: Backoff,
    durable: bool,
    pauses: bool,
    max_result_bytes: usize,
}

impl Setup {
    fn new() -> Self {
        let retry = RetrySection {
            attempts: 3,
            jitter: 0.0,
            retry_failed_runs: true,
            ..RetrySection::default()
        };
        Setup {
            backoff: Backoff::from(&retry),
            retry,
            durable: true,
            pauses: true,
            max_result_bytes: 4096,
        }
    }

    /// How a run that ended with `status` finishes the claim of attempt `attempt`.
    fn end(&self, attempt: u32, status: RunStatus, last_step: Option<Value>) -> (Finish, Verdict) {
        finish_for(
            &self.rules(),
            &claim(attempt),
            &job(),
            &report(status, last_step),
        )
    }

    fn not_durable(self) -> Self {
        Setup {
            durable: false,
            ..self
        }
    }

    fn rules(&self) -> Policy<'_> {
        Policy {
            retry: &self.retry,
            backoff: &self.backoff,
            durable: self.durable,
            pauses: self.pauses,
            format: PayloadFormat::State,
            queue: "jobs-q",
            max_result_bytes: self.max_result_bytes,
            max_recoveries: 3,
        }
    }
}

fn failed() -> RunStatus {
    RunStatus::Failed {
        reason: "boom".into(),
    }
}

fn claim(attempt: u32) -> Claim {
    Claim {
        job_id: "job-1".into(),
        payload: br#"{"a":1}"#.to_vec(),
        attempt,
        epoch: 7,
        history: Vec::new(),
        decision: None,
        fresh: false,
        recoveries: 0,
        handle: ClaimHandle::default(),
    }
}

fn job() -> ParsedJob {
    ParsedJob {
        graph: std::sync::Arc::new(crate::graph::Graph {
            name: "g".into(),
            digest: "d".into(),
            source: "g.toml".into(),
            entry: 0,
            nodes: Vec::new(),
            index: Default::default(),
            tools: Default::default(),
            providers: Default::default(),
            branch_of: Default::default(),
            max_steps: 100,
            max_node_fatigue: 10,
        }),
        input: Map::new(),
        user_id: None,
        producer_id: None,
    }
}

fn report(status: RunStatus, last_step: Option<Value>) -> JobReport {
    JobReport {
        job_id: "job-1".into(),
        run_id: "run-1".into(),
        status,
        state: json!({"answer": 42})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        log_path: "/audit/run-1.json".into(),
        signature: None,
        steps: 4,
        last_step: last_step.and_then(|v| v.as_object().cloned()),
    }
}

/// A jury's halt step, with a default path after a minute.
fn halt_step() -> Value {
    json!({"node_id": "jury", "started_at": "2026-01-01T00:00:00Z",
           "halt": {"prompt": "ok?", "choices": ["yes", "no"], "context": {},
                    "output": "decision", "expires_after_ms": 60000}})
}

fn parse(b: &[u8]) -> Value {
    serde_json::from_slice(b).expect("JSON")
}

/// The published result and dead letter of a `Finish::Publish`.
fn published(finish: Finish) -> (Value, Option<DeadLetter>) {
    match finish {
        Finish::Publish {
            result,
            dead_letter,
        } => (parse(&result), dead_letter),
        other => panic!("expected a publish, got {other:?}"),
    }
}

fn dead(finish: Finish) -> DeadLetter {
    match finish {
        Finish::DeadLetter(d) => d,
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

#[test]
fn a_completed_run_publishes_its_result() {
    let s = Setup::new();
    let (finish, verdict) = s.end(1, RunStatus::Completed, None);
    assert_eq!(verdict, Verdict::Completed);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "completed");
    assert_eq!(result["answer"], 42);
    assert!(dead_letter.is_none());
}

#[test]
fn a_halted_run_pauses_for_a_human_when_the_worker_pauses() {
    let s = Setup::new();
    let (finish, verdict) = s.end(2, RunStatus::Halted, Some(halt_step()));
    assert_eq!(verdict, Verdict::Halted);
    let Finish::Pause { result, pending } = finish else {
        panic!("expected a pause, got {finish:?}");
    };
    assert_eq!(parse(&result)[META_KEY]["status"], "awaiting_decision");
    let pending = parse(&pending);
    assert_eq!(pending["queue"], "jobs-q");
    assert_eq!(pending["node"], "jury");
    assert_eq!(pending["step"], 4);
    assert_eq!(pending["awaiting_since"], "2026-01-01T00:00:00Z");
    assert_eq!(pending["expires_at_ms"], 1_767_225_600_000_i64 + 60_000);
    assert_eq!(pending["payload"], r#"{"a":1}"#);
    assert_eq!(
        pending["attempt"], 1,
        "the failed attempts before the pause"
    );
}

#[test]
fn a_halt_without_a_decision_request_is_published() {
    let s = Setup::new();
    let (finish, verdict) = s.end(1, RunStatus::Halted, Some(json!({"node_id": "end"})));
    assert_eq!(verdict, Verdict::Halted);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "halted");
    assert!(dead_letter.is_none());
}

#[test]
fn a_halt_is_the_final_result_when_the_worker_does_not_pause() {
    let s = Setup {
        pauses: false,
        ..Setup::new()
    };
    let (finish, verdict) = s.end(1, RunStatus::Halted, Some(halt_step()));
    assert_eq!(verdict, Verdict::Halted);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "halted");
    assert!(dead_letter.is_none());
}

#[test]
fn a_run_still_running_is_published_as_halted() {
    let s = Setup::new();
    let (finish, verdict) = s.end(1, RunStatus::Running, None);
    assert_eq!(verdict, Verdict::Halted);
    assert!(published(finish).1.is_none());
}

#[test]
fn a_failed_run_is_retried_from_its_start_while_attempts_remain() {
    let s = Setup::new();
    let (finish, verdict) = s.end(2, failed(), None);
    assert_eq!(verdict, Verdict::Retry);
    let Finish::Retry {
        delay,
        error,
        keep_run,
    } = finish
    else {
        panic!("expected a retry, got {finish:?}");
    };
    assert_eq!(error, "run run-1 failed: boom");
    assert_eq!(delay, Duration::from_secs(2), "the second retry's backoff");
    assert!(!keep_run, "a failed run starts again from its first step");
}

#[test]
fn a_failed_run_after_the_last_attempt_is_published_with_a_dead_letter() {
    let s = Setup::new();
    let (finish, verdict) = s.end(3, failed(), None);
    assert_eq!(verdict, Verdict::Failed);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "failed");
    assert_eq!(result[META_KEY]["error"], "boom");
    let d = dead_letter.expect("a dead letter");
    assert_eq!(d.reason, "run run-1 failed: boom");
    assert!(!d.keep_run);
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].attempt, 3);
}

#[test]
fn a_failed_run_is_final_at_once_without_retries_of_failed_runs() {
    let mut s = Setup::new();
    s.retry.retry_failed_runs = false;
    let (finish, verdict) = s.end(1, failed(), None);
    assert_eq!(verdict, Verdict::Failed);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "failed");
    assert!(
        dead_letter.is_none(),
        "a final failure is a result, not a dead letter"
    );
}

#[test]
fn an_infrastructure_failure_is_retried_keeping_the_run() {
    let s = Setup::new();
    let (finish, verdict) = retry_or_dead(&s.rules(), &claim(1), "store down".into(), true);
    assert_eq!(verdict, Verdict::Retry);
    let Finish::Retry {
        delay,
        error,
        keep_run,
    } = finish
    else {
        panic!("expected a retry, got {finish:?}");
    };
    assert_eq!(delay, Duration::from_secs(1));
    assert_eq!(error, "store down");
    assert!(keep_run);
}

#[test]
fn without_checkpoints_a_retry_keeps_no_run() {
    let s = Setup::new().not_durable();
    let (finish, _) = retry_or_dead(&s.rules(), &claim(1), "store down".into(), true);
    assert!(matches!(
        finish,
        Finish::Retry {
            keep_run: false,
            ..
        }
    ));
}

#[test]
fn the_last_attempt_goes_to_the_dead_letters_with_its_history() {
    let s = Setup::new();
    let mut c = claim(3);
    c.history = vec![AttemptRecord {
        attempt: 1,
        at: "2026-01-01T00:00:00Z".into(),
        error: "first".into(),
    }];
    let (finish, verdict) = retry_or_dead(&s.rules(), &c, "store down".into(), true);
    assert_eq!(verdict, Verdict::DeadLetter);
    let d = dead(finish);
    assert_eq!(d.job_id, "job-1");
    assert_eq!(d.reason, "gave up after 3 attempts: store down");
    assert!(
        d.keep_run,
        "infrastructure gave out: a redrive resumes the run"
    );
    let attempts: Vec<(u32, &str)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.error.as_str()))
        .collect();
    assert_eq!(
        attempts,
        vec![(1, "first"), (3, "gave up after 3 attempts: store down")]
    );
}

#[test]
fn a_dead_letter_keeps_the_run_only_for_infrastructure_failures_with_checkpoints() {
    let s = Setup::new();
    let (finish, _) = retry_or_dead(&s.rules(), &claim(3), "boom".into(), false);
    assert!(!dead(finish).keep_run);
    let s = Setup::new().not_durable();
    let (finish, _) = retry_or_dead(&s.rules(), &claim(3), "store down".into(), true);
    assert!(!dead(finish).keep_run);
}

#[test]
fn a_refused_message_is_dead_lettered_at_once_keeping_its_run() {
    let s = Setup::new();
    let (finish, verdict) = refused(&s.rules(), &claim(1), "checkpoint refused: bad");
    assert_eq!(verdict, Verdict::DeadLetter);
    let d = dead(finish);
    assert_eq!(d.reason, "checkpoint refused: bad");
    assert!(d.keep_run);
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].error, "checkpoint refused: bad");
}

#[test]
fn a_refused_message_keeps_no_run_without_checkpoints() {
    let s = Setup::new().not_durable();
    let (finish, verdict) = refused(&s.rules(), &claim(3), "invalid JSON");
    assert_eq!(verdict, Verdict::DeadLetter);
    assert!(!dead(finish).keep_run);
}

#[test]
fn a_job_is_run_while_its_recoveries_stay_under_the_limit() {
    let s = Setup::new();
    for recoveries in 0..3 {
        let c = Claim {
            recoveries,
            ..claim(1)
        };
        assert!(too_many_recoveries(&s.rules(), &c, "in step 2, node 'x'").is_none());
    }
}

#[test]
fn a_job_whose_worker_died_max_recoveries_times_is_dead_lettered_keeping_its_run() {
    let s = Setup::new();
    let c = Claim {
        recoveries: 3,
        ..claim(1)
    };
    let (finish, verdict) = too_many_recoveries(&s.rules(), &c, "in step 2, node 'x'").unwrap();
    assert_eq!(verdict, Verdict::DeadLetter);
    let d = dead(finish);
    assert_eq!(
        d.reason,
        "its worker died 3 times while running it (in step 2, node 'x'); worker.max_recoveries is 3"
    );
    assert!(d.keep_run, "a redrive after the fix resumes");
    assert_eq!(
        d.attempts.last().map(|a| a.error.as_str()),
        Some(d.reason.as_str())
    );
}

/// A completed result over the setup's 4096 bytes.
fn big_result() -> Finish {
    Finish::Publish {
        result: serde_json::to_vec(&json!({"text": "x".repeat(9000),
            META_KEY: {"job_id": "job-1", "status": "completed", "error": null}}))
        .expect("JSON"),
        dead_letter: None,
    }
}

#[test]
fn a_result_within_the_limit_is_untouched() {
    let s = Setup::new();
    let small = Finish::Publish {
        result: b"{}".to_vec(),
        dead_letter: None,
    };
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (small, Verdict::Completed));
    assert_eq!(verdict, Verdict::Completed);
    let (result, dead_letter) = published(finish);
    assert_eq!(result, json!({}));
    assert!(dead_letter.is_none());
}

#[test]
fn only_results_are_measured() {
    let s = Setup::new();
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (Finish::Release, Verdict::Release));
    assert_eq!(verdict, Verdict::Release);
    assert!(matches!(finish, Finish::Release));
}

#[test]
fn an_oversized_result_becomes_a_failure_without_its_state() {
    let s = Setup::new();
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (big_result(), Verdict::Completed));
    assert_eq!(verdict, Verdict::Failed);
    let (result, dead_letter) = published(finish);
    assert_eq!(
        result.as_object().map(|o| o.len()),
        Some(1),
        "only the metadata"
    );
    assert_eq!(result[META_KEY]["status"], "failed");
    assert_eq!(result[META_KEY]["state_omitted"], true);
    let reason = result[META_KEY]["error"]
        .as_str()
        .expect("a reason")
        .to_string();
    assert!(reason.starts_with("the result is "), "{reason}");
    assert!(
        reason.contains("over worker.max_result_bytes (4096)"),
        "{reason}"
    );
    let d = dead_letter.expect("an operator sees it");
    assert_eq!(d.reason, reason);
    assert!(!d.keep_run);
}

#[test]
fn an_oversized_failure_keeps_its_own_dead_letter() {
    let s = Setup::new();
    let Finish::Publish { result, .. } = big_result() else {
        unreachable!()
    };
    let own = DeadLetter {
        job_id: "job-1".into(),
        reason: "run run-1 failed: boom".into(),
        attempts: Vec::new(),
        keep_run: false,
    };
    let failed = Finish::Publish {
        result,
        dead_letter: Some(own),
    };
    let (finish, verdict) = fit_result(&s.rules(), &claim(3), (failed, Verdict::Failed));
    assert_eq!(verdict, Verdict::Failed);
    let d = published(finish).1.expect("a dead letter");
    assert_eq!(d.reason, "run run-1 failed: boom");
}

#[test]
fn an_oversized_pause_still_pauses_without_its_state() {
    let s = Setup::new();
    let pause = Finish::Pause {
        result: serde_json::to_vec(&json!({"text": "x".repeat(9000),
            META_KEY: {"status": "awaiting_decision", "error": null,
                       "decision_request": {"prompt": "ok?", "context": {}}}}))
        .expect("JSON"),
        pending: b"the pending record".to_vec(),
    };
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (pause, Verdict::Halted));
    assert_eq!(verdict, Verdict::Halted);
    let Finish::Pause { result, pending } = finish else {
        panic!("expected a pause, got {finish:?}");
    };
    assert_eq!(pending, b"the pending record");
    let result = parse(&result);
    assert_eq!(result[META_KEY]["status"], "awaiting_decision");
    assert_eq!(result[META_KEY]["state_omitted"], true);
    assert_eq!(result[META_KEY]["decision_request"]["prompt"], "ok?");
}

#[test]
fn a_pause_that_cannot_fit_fails_with_a_bare_result() {
    let s = Setup::new();
    let pause = Finish::Pause {
        result: serde_json::to_vec(&json!({META_KEY: {"status": "awaiting_decision",
            "decision_request": {"prompt": "p".repeat(9000)}}}))
        .expect("JSON"),
        pending: Vec::new(),
    };
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (pause, Verdict::Halted));
    assert_eq!(verdict, Verdict::Failed);
    let (result, dead_letter) = published(finish);
    let reason = dead_letter.expect("a dead letter").reason;
    assert_eq!(
        result,
        json!({META_KEY: {"job_id": "job-1", "status": "failed", "error": reason}})
    );
}

#[test]
fn an_oversized_result_that_is_not_an_object_fails_with_a_bare_result() {
    let s = Setup::new();
    let odd = Finish::Publish {
        result: serde_json::to_vec(&json!(["x".repeat(9000)])).expect("JSON"),
        dead_letter: None,
    };
    let (finish, verdict) = fit_result(&s.rules(), &claim(1), (odd, Verdict::Completed));
    assert_eq!(verdict, Verdict::Failed);
    let (result, dead_letter) = published(finish);
    assert_eq!(result[META_KEY]["status"], "failed");
    assert!(dead_letter.is_some());
}

#[test]
fn each_verdict_moves_its_counter() {
    let plain = Finish::Publish {
        result: Vec::new(),
        dead_letter: None,
    };
    for (verdict, name) in [
        (Verdict::Completed, "completed"),
        (Verdict::Failed, "failed"),
        (Verdict::Halted, "halted"),
        (Verdict::Retry, "retried"),
        (Verdict::DeadLetter, "dead_lettered"),
        (Verdict::Release, "released"),
    ] {
        let s = Stats::default();
        count(&s, verdict, &plain);
        let moved: Vec<_> = s.counters().into_iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(moved, vec![(name, 1)], "{verdict:?}");
    }
}

#[test]
fn a_failure_with_a_dead_letter_counts_both() {
    let s = Stats::default();
    let with_dead_letter = Finish::Publish {
        result: Vec::new(),
        dead_letter: Some(DeadLetter {
            job_id: "job-1".into(),
            reason: "r".into(),
            attempts: Vec::new(),
            keep_run: false,
        }),
    };
    count(&s, Verdict::Failed, &with_dead_letter);
    let moved: Vec<_> = s.counters().into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(moved, vec![("failed", 1), ("dead_lettered", 1)]);
}

#[test]
fn the_expiry_counts_from_the_halt_step_not_from_each_pause() {
    let halt = json!({"started_at": "2026-01-01T00:00:00.000000Z",
                      "halt": {"expires_after_ms": 60000}});
    let step = halt.as_object().cloned();
    // 2026-01-01T00:00:00Z is 1767225600000 ms since the epoch.
    assert_eq!(request_expiry(&step), Some(1_767_225_600_000 + 60_000));
    // A later pause at the same halt reads the same deadline: it does not move with the clock.
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(
        request_expiry(&step),
        Some(1_767_225_600_000 + 60_000),
        "the same at every pause"
    );
    let no_expiry = json!({"started_at": "2026-01-01T00:00:00Z", "halt": {}});
    assert_eq!(request_expiry(&no_expiry.as_object().cloned()), None);
}

/// The expiry of `step` must fall `after_ms` from the clock read around the call.
fn expires_from_now(step: serde_json::Value, after_ms: i64) {
    let step = step.as_object().cloned();
    let before = crate::clock::now_ms();
    let expiry = request_expiry(&step).expect("an expiry");
    let after = crate::clock::now_ms();
    assert!(
        (before + after_ms..=after + after_ms).contains(&expiry),
        "{expiry} counts from now ({before}..={after}) plus {after_ms} ms"
    );
}

#[test]
fn without_a_started_at_the_expiry_counts_from_now() {
    expires_from_now(json!({"halt": {"expires_after_ms": 60000}}), 60_000);
}

#[test]
fn a_garbled_started_at_counts_from_now() {
    expires_from_now(
        json!({"started_at": "yesterday-ish", "halt": {"expires_after_ms": 60000}}),
        60_000,
    );
    expires_from_now(
        json!({"started_at": 1767225600, "halt": {"expires_after_ms": 60000}}),
        60_000,
    );
}

#[test]
fn an_expiry_too_large_saturates() {
    let step = json!({"started_at": "2026-01-01T00:00:00Z",
                      "halt": {"expires_after_ms": u64::MAX}});
    assert_eq!(request_expiry(&step.as_object().cloned()), Some(i64::MAX));
}
