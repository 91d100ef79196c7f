//! A state's canonical bytes, taken once before and once after each step: what the step
//! record's `state_before` and `state_after` hold, written without copying the state, and
//! compared entry by entry for its `state_diff`.
//!
//! Before this, a step cloned the state twice, built its diff from the clones, and serialized
//! both clones into the record: the clones and their drops were a fifth of the daemon's CPU
//! with checkpoints on (perf). Values compare by their canonical bytes, so the diff needs no
//! values at all. That is Python's equality, which Lár's diff uses, for every value but two
//! pairs it writes differently yet calls equal: `1` and `1.0`, and `-0.0` and `0.0`; a change
//! between those is reported as an update. Numbers whose source texts differ but which Python
//! reads as one (`1.50` and `1.5`) are equal, as in [`super::diff::state_diff`].

use crate::json::canonical::{write_json, write_str};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

/// The canonical bytes of a state (keys sorted, as Lár signs them), with each entry's span.
#[derive(Debug, Clone)]
pub struct Snapshot {
    buf: Vec<u8>,
    /// In key order.
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The key as written, quotes included.
    key: Range<usize>,
    value: Range<usize>,
    /// Written without escapes: the bytes between the quotes are the key itself.
    plain: bool,
}

/// The diff of a step that changed nothing.
pub const EMPTY_DIFF: &[u8] = br#"{"added":{},"removed":{},"updated":{}}"#;

impl Snapshot {
    pub fn of(state: &Map<String, Value>) -> Self {
        let mut sorted: Vec<(&String, &Value)> = state.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut buf = Vec::with_capacity(64 * sorted.len() + 2);
        let mut entries = Vec::with_capacity(sorted.len());
        buf.push(b'{');
        for (i, (k, v)) in sorted.into_iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            let start = buf.len();
            write_str(&mut buf, k);
            let key = start..buf.len();
            buf.push(b':');
            let value_start = buf.len();
            write_json(&mut buf, v, true);
            // Every escape is longer than what it stands for.
            let plain = key.len() == k.len() + 2;
            entries.push(Entry {
                key,
                value: value_start..buf.len(),
                plain,
            });
        }
        buf.push(b'}');
        Snapshot { buf, entries }
    }

    /// This snapshot with one top-level entry set to `value` (replaced, or added in key order).
    /// A step's `state_before` is the previous step's `state_after` with `__node_counts` bumped:
    /// a copy and one small serialization instead of the whole state's.
    pub fn with_entry(&self, key: &str, value: &Value) -> Snapshot {
        let at = self
            .entries
            .partition_point(|e| self.raw_key(e).as_ref() < key.as_bytes());
        let replaces = self
            .entries
            .get(at)
            .is_some_and(|e| self.raw_key(e).as_ref() == key.as_bytes());
        let mut out = Snapshot {
            buf: Vec::with_capacity(self.buf.len() + 64),
            entries: Vec::with_capacity(self.entries.len() + 1),
        };
        out.buf.push(b'{');
        for (i, e) in self.entries.iter().enumerate() {
            if i == at {
                out.push_new(key, value);
                if replaces {
                    continue;
                }
            }
            out.push_copy(self, e);
        }
        if at == self.entries.len() {
            out.push_new(key, value);
        }
        out.buf.push(b'}');
        out
    }

    fn push_new(&mut self, key: &str, value: &Value) {
        if !self.entries.is_empty() {
            self.buf.push(b',');
        }
        let start = self.buf.len();
        write_str(&mut self.buf, key);
        let key_range = start..self.buf.len();
        self.buf.push(b':');
        let value_start = self.buf.len();
        write_json(&mut self.buf, value, true);
        self.entries.push(Entry {
            plain: key_range.len() == key.len() + 2,
            key: key_range,
            value: value_start..self.buf.len(),
        });
    }

    fn push_copy(&mut self, from: &Snapshot, e: &Entry) {
        if !self.entries.is_empty() {
            self.buf.push(b',');
        }
        let shift = self.buf.len() as isize - e.key.start as isize;
        let moved = |r: &Range<usize>| {
            (r.start as isize + shift) as usize..(r.end as isize + shift) as usize
        };
        self.buf
            .extend_from_slice(&from.buf[e.key.start..e.value.end]);
        self.entries.push(Entry {
            key: moved(&e.key),
            value: moved(&e.value),
            plain: e.plain,
        });
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn value(&self, e: &Entry) -> &[u8] {
        &self.buf[e.value.clone()]
    }

    /// The key's own UTF-8 bytes: byte order is code point order, the order `of` sorted by.
    fn raw_key(&self, e: &Entry) -> Cow<'_, [u8]> {
        let written = &self.buf[e.key.clone()];
        if e.plain {
            return Cow::Borrowed(&written[1..written.len() - 1]);
        }
        // Only keys with escapes (quotes, controls, non-ASCII) are decoded.
        match serde_json::from_slice::<String>(written) {
            Ok(s) => Cow::Owned(s.into_bytes()),
            Err(_) => Cow::Borrowed(written),
        }
    }

    fn cmp_keys(&self, a: &Entry, other: &Snapshot, b: &Entry) -> Ordering {
        self.raw_key(a).cmp(&other.raw_key(b))
    }

    /// Appends `"key":value` of `e` to an object being written (`out` starts as `{`).
    fn put(&self, out: &mut Vec<u8>, e: &Entry) {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(&self.buf[e.key.start..e.value.end]);
    }
}

/// Lár's `state_diff` of two snapshots, as canonical bytes: keys added (new values), removed
/// (old values) and updated (new values). One merge pass over the two sorted entry lists.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<u8> {
    let mut added = vec![b'{'];
    let mut removed = vec![b'{'];
    let mut updated = vec![b'{'];
    let (mut i, mut j) = (0, 0);
    loop {
        let order = match (before.entries.get(i), after.entries.get(j)) {
            (Some(b), Some(a)) => before.cmp_keys(b, after, a),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        match order {
            Ordering::Less => {
                before.put(&mut removed, &before.entries[i]);
                i += 1;
            }
            Ordering::Greater => {
                after.put(&mut added, &after.entries[j]);
                j += 1;
            }
            Ordering::Equal => {
                let (b, a) = (&before.entries[i], &after.entries[j]);
                if before.value(b) != after.value(a) {
                    after.put(&mut updated, a);
                }
                i += 1;
                j += 1;
            }
        }
    }
    let mut out = Vec::with_capacity(added.len() + removed.len() + updated.len() + 32);
    out.extend_from_slice(b"{\"added\":");
    out.extend_from_slice(&added);
    out.extend_from_slice(b"},\"removed\":");
    out.extend_from_slice(&removed);
    out.extend_from_slice(b"},\"updated\":");
    out.extend_from_slice(&updated);
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::diff::state_diff;
    use crate::json::to_canonical_vec;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    /// The byte diff must equal the canonical bytes of the value diff.
    fn same_as_value_diff(before: Value, after: Value) {
        let (b, a) = (map(before), map(after));
        let bytes = diff(&Snapshot::of(&b), &Snapshot::of(&a));
        let expected = to_canonical_vec(&state_diff(&b, &a));
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(
            Snapshot::of(&a).as_bytes(),
            to_canonical_vec(&Value::Object(a))
        );
    }

    #[test]
    fn added_removed_updated_and_unchanged() {
        same_as_value_diff(
            json!({"a": 1, "b": 2, "c": 3, "z": [1, {"y": 1, "x": 2}]}),
            json!({"a": 1, "b": 5, "d": 4, "z": [1, {"x": 2, "y": 1}]}),
        );
        same_as_value_diff(json!({}), json!({"only": "after"}));
        same_as_value_diff(json!({"only": "before"}), json!({}));
        same_as_value_diff(json!({}), json!({}));
        same_as_value_diff(json!({"n": {"a": [1, 2]}}), json!({"n": {"a": [1, 3]}}));
    }

    #[test]
    fn keys_that_need_escapes_keep_their_order() {
        // A key and the same key plus a space, and keys whose escaped form sorts differently
        // from the key itself (`\` and `\u` sort below lowercase letters).
        same_as_value_diff(
            json!({"ab": 1, "ab ": 2, "é": 3, "z": 4, "q\"uote": 5, "tab\t": 6, "😀": 7}),
            json!({"ab": 1, "ab ": 9, "é": 3, "e": 0, "z": 4, "q\"uote": 6, "😀": 8, "ü": 1}),
        );
        same_as_value_diff(json!({"é": 1, "f": 1}), json!({"e": 1, "é": 2}));
    }

    #[test]
    fn numbers_compare_as_python_reads_them() {
        let parse = |t: &str| -> Value { serde_json::from_str(t).unwrap() };
        same_as_value_diff(
            parse(r#"{"a":1.50,"b":-0,"c":1,"d":1e2,"e":{"f":2.50},"g":-0.0}"#),
            parse(r#"{"a":1.5,"b":0,"c":1.0,"d":100.0,"e":{"f":2.5},"g":0.0}"#),
        );
    }

    #[test]
    fn an_entry_set_on_a_snapshot_is_the_snapshot_of_the_state_with_it() {
        let base = map(json!({"b": 1, "d": [1, {"z": 2}], "é": "x", "ab ": 0}));
        for (key, value) in [
            ("b", json!({"n": 2})),
            ("a", json!(1)),
            ("c", json!("mid")),
            ("zz", json!(null)),
            ("é", json!(3)),
            ("ab", json!(true)),
            ("q\"uote", json!([])),
        ] {
            let mut expected = base.clone();
            expected.insert(key.to_string(), value.clone());
            let patched = Snapshot::of(&base).with_entry(key, &value);
            assert_eq!(
                String::from_utf8_lossy(patched.as_bytes()),
                String::from_utf8_lossy(Snapshot::of(&expected).as_bytes()),
                "{key}"
            );
            // Its entries are right too: the diff against the state it stands for is empty.
            assert_eq!(
                diff(&patched, &Snapshot::of(&expected)),
                EMPTY_DIFF,
                "{key}"
            );
        }
        let empty = Snapshot::of(&Map::new()).with_entry("k", &json!(1));
        assert_eq!(empty.as_bytes(), br#"{"k":1}"#);
    }

    #[test]
    fn an_unchanged_state_has_the_empty_diff() {
        let s = map(json!({"a": 1, "b": {"c": [true, null]}}));
        assert_eq!(diff(&Snapshot::of(&s), &Snapshot::of(&s)), EMPTY_DIFF);
    }
}
