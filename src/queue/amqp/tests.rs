//! Unit tests of the pieces that need no broker: url masking, result metadata, envelope
//! ids, header values, the headers a copy carries, the done-marker memo, the delay buckets.

use super::dedupe::{Memo, MEMO_CAP};
use super::headers::{carried_headers, result_meta, text, value_int, value_text};
use super::redact;
use crate::queue::envelope_id;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

#[test]
fn redacts_the_password() {
    assert_eq!(
        redact("amqp://guest:secret@host:5672/%2f"),
        "amqp://guest:***@host:5672/%2f"
    );
    assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
}

#[test]
fn reads_result_meta_in_both_formats() {
    let env = br#"{"job_id":"j","run_id":"r1","status":"completed","signature":"s"}"#;
    assert_eq!(
        result_meta(env),
        (
            Some("r1".into()),
            Some("completed".into()),
            Some("s".into())
        )
    );
    let state = br#"{"x":1,"__lar_worker":{"run_id":"r2","status":"failed","signature":null}}"#;
    assert_eq!(
        result_meta(state),
        (Some("r2".into()), Some("failed".into()), None)
    );
    assert_eq!(result_meta(b"not json"), (None, None, None));
}

#[test]
fn envelope_ids() {
    assert_eq!(envelope_id(br#"{"id":"a-1"}"#), Some("a-1".into()));
    assert_eq!(envelope_id(br#"{"id":42}"#), Some("42".into()));
    assert_eq!(envelope_id(br#"{"id":""}"#), None);
    assert_eq!(envelope_id(b"[1]"), None);
}

#[test]
fn header_values() {
    assert_eq!(value_int(&AMQPValue::LongLongInt(3)), Some(3));
    assert_eq!(value_int(&AMQPValue::ShortShortUInt(2)), Some(2));
    assert_eq!(value_int(&text(" 7 ")), Some(7));
    assert_eq!(value_text(&text("x")), Some("x".into()));
}

#[test]
fn broker_bookkeeping_is_not_carried() {
    let mut h = FieldTable::default();
    h.insert("x-death".into(), AMQPValue::Void);
    h.insert("x-first-death-reason".into(), text("expired"));
    h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
    h.insert("tenant".into(), text("acme"));
    let props = BasicProperties::default().with_headers(h);
    let out = carried_headers(&props);
    assert_eq!(out.inner().len(), 1);
    assert!(out.contains_key("tenant"));
}

#[test]
fn memo_forgets_the_oldest() {
    let mut m = Memo::default();
    for i in 0..(MEMO_CAP + 5) {
        m.insert(i.to_string());
    }
    assert_eq!(m.set.len(), MEMO_CAP);
    assert!(!m.set.contains("0"));
    assert!(m.set.contains(&(MEMO_CAP + 4).to_string()));
}

#[test]
fn delays_round_up_to_their_bucket() {
    use super::Topology;
    use crate::queue::QueueNames;
    use std::time::Duration;
    let t = Topology::of(&QueueNames {
        jobs: "jobs".into(),
        results: "results".into(),
    });
    let at = |ms: u64| {
        let b = t.delay_for(Duration::from_millis(ms));
        (b.after.as_secs(), b.queue.as_str())
    };
    assert_eq!(at(0), (1, "jobs.delay.1s"));
    assert_eq!(at(1_000), (1, "jobs.delay.1s"));
    assert_eq!(at(1_001), (3, "jobs.delay.3s"));
    assert_eq!(at(40_000), (60, "jobs.delay.1m"));
    assert_eq!(at(7 * 86_400_000), (7 * 86_400, "jobs.delay.7d"));
    assert_eq!(
        at(u64::MAX / 2),
        (7 * 86_400, "jobs.delay.7d"),
        "the longest"
    );
    // Shortest first, each longer than the last, no two queues of one name.
    assert!(t.delays.windows(2).all(|w| w[0].after < w[1].after));
    assert_eq!(t.legacy_delay, "jobs.delay");
}
