//! Finds an object key that appears twice in one object. JSON leaves duplicate keys undefined:
//! Python's `json` (and so Lár's verifier, and serde_json) keeps the last value, other readers
//! keep the first. A signed log with a duplicate key therefore verifies over one value while a
//! reader may show the other: evidence that reads two ways is refused.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;

/// Where a value sits, built only when a duplicate is reported.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, k) => write!(f, "{k}"),
            Path::Key(parent, k) => write!(f, "{parent}.{k}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// The marker the scan's error starts with, to tell a duplicate from a syntax error.
const DUPLICATE: &str = "duplicate key ";

struct Scan<'a>(&'a Path<'a>);

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(Scan(&Path::Index(self.0, i)))?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if seen.contains(key.as_ref()) {
                let at = Path::Key(self.0, &key);
                return Err(de::Error::custom(format!("{DUPLICATE}'{key}' at {at}")));
            }
            map.next_value_seed(Scan(&Path::Key(self.0, &key)))?;
            seen.insert(key);
        }
        Ok(())
    }
}

/// The first duplicate key of `bytes` (JSON), as `'key' at path.to.key`; `None` when every
/// object's keys are distinct or the bytes are not JSON (the parser reports that). Call it on
/// bytes [`super::parse_deep`] accepted: it recurses as deep as they nest.
pub fn first_duplicate_key(bytes: &[u8]) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    match Scan(&Path::Root).deserialize(&mut de) {
        Ok(()) => None,
        Err(e) => {
            let text = e.to_string();
            let found = text.strip_prefix(DUPLICATE)?;
            // serde_json appends " at line L column C".
            Some(match found.rfind(" at line ") {
                Some(cut) => found[..cut].to_string(),
                None => found.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_duplicate_key;

    #[test]
    fn names_the_first_duplicate_with_its_path() {
        assert_eq!(
            first_duplicate_key(br#"{"a":1,"b":[{"c":1},{"c":2}]}"#),
            None
        );
        assert_eq!(
            first_duplicate_key(br#"{"a":1,"a":2}"#).as_deref(),
            Some("'a' at a")
        );
        assert_eq!(
            first_duplicate_key(
                br#"{"steps":[{"x":1},{"outcome":"ok","y":{},"outcome":"error"}]}"#
            )
            .as_deref(),
            Some("'outcome' at steps[1].outcome")
        );
        // Escapes are compared decoded: "\u0061" is "a".
        assert_eq!(
            first_duplicate_key(br#"{"a":1,"\u0061":2}"#).as_deref(),
            Some("'a' at a")
        );
        // Numbers of any size and precision scan as values.
        assert_eq!(
            first_duplicate_key(br#"{"n":1e400,"m":123456789012345678901234567890}"#),
            None
        );
        assert_eq!(first_duplicate_key(b"not json"), None);
    }
}
