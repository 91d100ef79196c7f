//! Lár's `state_diff`: keys added, removed (with their old values) and updated (new values).

use serde_json::{Map, Value};

pub fn state_diff(before: &Map<String, Value>, after: &Map<String, Value>) -> Value {
    let mut added = Map::new();
    let mut updated = Map::new();
    let mut removed = Map::new();
    for (k, new) in after {
        match before.get(k) {
            None => {
                added.insert(k.clone(), new.clone());
            }
            Some(old) if old != new => {
                updated.insert(k.clone(), new.clone());
            }
            Some(_) => {}
        }
    }
    for (k, old) in before {
        if !after.contains_key(k) {
            removed.insert(k.clone(), old.clone());
        }
    }
    let mut diff = Map::with_capacity(3);
    diff.insert("added".into(), Value::Object(added));
    diff.insert("removed".into(), Value::Object(removed));
    diff.insert("updated".into(), Value::Object(updated));
    Value::Object(diff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn added_removed_updated() {
        let before = json!({"a": 1, "b": 2, "c": 3});
        let after = json!({"a": 1, "b": 5, "d": 4});
        let d = state_diff(before.as_object().unwrap(), after.as_object().unwrap());
        assert_eq!(
            d,
            json!({"added": {"d": 4}, "removed": {"c": 3}, "updated": {"b": 5}})
        );
    }
}
