//! Message properties and headers: reading header values of any AMQP type, the headers a
//! republished copy carries, the properties of a job's copies, the metadata of a result, and
//! the names of the headers this backend stamps.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

pub(super) const PERSISTENT: u8 = 2;
/// The header that carries a human decision on a resumed job's message.
pub(super) const DECISION_HEADER: &str = "x-lar-decision";
/// Stamped by each dead-lettering: a redriven copy is a new life of its job (see `memo_key`).
pub(super) const FAILED_AT_HEADER: &str = "x-lar-failed-at";

pub(super) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

pub(super) fn header<'a>(h: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    h.inner().get(key)
}

pub(super) fn value_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub(super) fn value_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => value_text(v)?.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn header_text(h: &FieldTable, key: &str) -> Option<String> {
    header(h, key).and_then(value_text)
}

/// The job's headers to carry onto a republished copy: the broker's own bookkeeping
/// (`x-death`, `x-first-death-*`, `x-last-death-*`, `x-delivery-count`) stays behind.
pub(super) fn carried_headers(props: &BasicProperties) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let k_str = k.as_str();
            if k_str == "x-death"
                || k_str.starts_with("x-first-death")
                || k_str.starts_with("x-last-death")
                || k_str == "x-delivery-count"
            {
                continue;
            }
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Fresh persistent properties carrying the job's routing-relevant fields (never `user_id`,
/// which the broker checks against the connection's user, nor `expiration`).
pub(super) fn job_props(
    orig: &BasicProperties,
    job_id: &str,
    headers: FieldTable,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(job_id))
        .with_headers(headers);
    if let Some(v) = orig.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = orig.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = orig.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = orig.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = orig.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = orig.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = orig.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = orig.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

/// `run_id`, `status` and `signature` of a result message (envelope or state format).
pub(super) fn result_meta(result: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(result) else {
        return (None, None, None);
    };
    let m = match v.get(crate::queue::RESULT_META_KEY) {
        Some(m) if m.is_object() => m,
        _ => &v,
    };
    let get = |k: &str| m.get(k).and_then(|x| x.as_str()).map(str::to_string);
    (get("run_id"), get("status"), get("signature"))
}
