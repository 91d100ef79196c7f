//! Lár's `state_diff`: keys added, removed (with their old values) and updated (new values).
//!
//! `after` is `before` with a node's writes applied, so the two maps almost always hold the
//! same keys in the same order: keys are compared position by position first, and looked up
//! by hash only where the orders part (a key removed or added). The step's diff is on every
//! step's path, so this matters (a fifth of a step's time with lookups everywhere).

use serde_json::{Map, Value};

pub fn state_diff(before: &Map<String, Value>, after: &Map<String, Value>) -> Value {
    let mut added = Map::new();
    let mut updated = Map::new();
    let mut removed = Map::new();
    let mut before_iter = before.iter();
    let mut aligned = true;
    let mut found = 0usize;
    for (k, new) in after {
        let old = match aligned.then(|| before_iter.next()).flatten() {
            Some((bk, bv)) if bk == k => Some(bv),
            _ => {
                aligned = false;
                before.get(k)
            }
        };
        match old {
            None => {
                added.insert(k.clone(), new.clone());
            }
            Some(old) => {
                found += 1;
                if !same(old, new) {
                    updated.insert(k.clone(), new.clone());
                }
            }
        }
    }
    // Keys are unique: when every key of `before` was found in `after`, none was removed.
    if found < before.len() {
        for (k, old) in before {
            if !after.contains_key(k) {
                removed.insert(k.clone(), old.clone());
            }
        }
    }
    let mut diff = Map::with_capacity(3);
    diff.insert("added".into(), Value::Object(added));
    diff.insert("removed".into(), Value::Object(removed));
    diff.insert("updated".into(), Value::Object(updated));
    Value::Object(diff)
}

/// `a == b`, comparing objects position by position while their keys line up (the common
/// case for a copy of a copy), and by lookup only past the first difference in order.
/// Numbers compare by their canonical text, as the step's own diff does ([`super::snapshot`]):
/// `1.50` and `1.5` are one float to Python, though `serde_json` keeps their texts apart.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y
                || crate::json::canonical::number_bytes(x)
                    == crate::json::canonical::number_bytes(y)
        }
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return false;
            }
            let mut pairs = x.iter().zip(y.iter());
            for ((xk, xv), (yk, yv)) in pairs.by_ref() {
                if xk != yk {
                    // Out of order from here: the plain map comparison decides.
                    return x == y;
                }
                if !same(xv, yv) {
                    return false;
                }
            }
            true
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diff(before: Value, after: Value) -> Value {
        state_diff(before.as_object().unwrap(), after.as_object().unwrap())
    }

    #[test]
    fn added_removed_updated() {
        let d = diff(
            json!({"a": 1, "b": 2, "c": 3}),
            json!({"a": 1, "b": 5, "d": 4}),
        );
        assert_eq!(
            d,
            json!({"added": {"d": 4}, "removed": {"c": 3}, "updated": {"b": 5}})
        );
    }

    #[test]
    fn keys_in_another_order_are_matched_by_name() {
        let d = diff(
            json!({"a": 1, "b": {"x": 1, "y": 2}, "c": 3}),
            json!({"c": 3, "b": {"y": 2, "x": 1}, "a": 2}),
        );
        assert_eq!(d, json!({"added": {}, "removed": {}, "updated": {"a": 2}}));
    }

    #[test]
    fn nested_changes_are_updates_and_removed_keys_are_found_after_additions() {
        let d = diff(
            json!({"n": {"a": [1, 2]}, "gone": true, "same": "s"}),
            json!({"n": {"a": [1, 3]}, "same": "s", "new": null}),
        );
        assert_eq!(
            d,
            json!({"added": {"new": null}, "removed": {"gone": true}, "updated": {"n": {"a": [1, 3]}}})
        );
    }

    #[test]
    fn same_matches_plain_equality() {
        let cases = [
            (json!({"a": 1, "b": 2}), json!({"b": 2, "a": 1})),
            (json!({"a": 1, "b": 2}), json!({"a": 1, "c": 2})),
            (json!({"a": [1, {"x": 1}]}), json!({"a": [1, {"x": 2}]})),
            (json!([1, 2]), json!([1, 2, 3])),
            (json!(1.5), json!(1.5)),
            (json!("1"), json!(1)),
        ];
        for (a, b) in cases {
            assert_eq!(same(&a, &b), a == b, "{a} vs {b}");
        }
    }

    #[test]
    fn numbers_python_reads_as_one_are_the_same() {
        let parse = |t: &str| -> Value { serde_json::from_str(t).unwrap() };
        for (a, b) in [
            ("1.50", "1.5"),
            ("-0", "0"),
            ("1e2", "100.0"),
            ("{\"y\":1.50}", "{\"y\":1.5}"),
        ] {
            assert!(same(&parse(a), &parse(b)), "{a} vs {b}");
        }
        for (a, b) in [("1", "1.0"), ("1.5", "1.25"), ("-0.0", "0.0")] {
            assert!(
                !same(&parse(a), &parse(b)),
                "{a} vs {b}: written differently, reported"
            );
        }
    }
}
