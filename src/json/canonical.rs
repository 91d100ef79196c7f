//! A serializer byte-identical to Python's `json.dumps(obj, sort_keys=True,
//! separators=(',', ':'))` with the default `ensure_ascii=True`.
//!
//! serde_json differs from Python in three ways that break an HMAC: it does not escape
//! non-ASCII, it formats floats differently (`1e-5` vs `1e-05`, `1e16` vs `1e+16`), and it does
//! not sort keys. The crate enables serde_json's `arbitrary_precision`, so integers of any size
//! keep their digits and a float stays a float through parse and write.

use serde_json::{Map, Number, Value};
use std::fmt::Write as _;

/// The canonical (sorted-key) bytes that Lár signs.
pub fn to_canonical_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_json(&mut out, v, true);
    out
}

/// The canonical bytes of `map` without its `skip` key (a document without its `signature`,
/// a record without its `chain`), with no copy of the map: `verify` reads logs of any size.
pub fn canonical_without(map: &Map<String, Value>, skip: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    let mut entries: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| *k != skip).collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, k);
        out.push(b':');
        write_json(&mut out, v, true);
    }
    out.push(b'}');
    out
}

/// Python-compatible bytes with keys in their insertion order: what we write to files so they
/// read like Lár's (run_id first, signature last) while using the same escapes and numbers.
pub fn to_python_json_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_json(&mut out, v, false);
    out
}

/// Appends `v` to `out`; `sort_keys` chooses between the signed form and insertion order.
pub fn write_json(out: &mut Vec<u8>, v: &Value, sort_keys: bool) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(out, item, sort_keys);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map, sort_keys),
    }
}

/// Appends an object; see [`write_json`].
pub fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>, sort_keys: bool) {
    out.push(b'{');
    if sort_keys {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (i, (k, v)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            write_json(out, v, true);
        }
    } else {
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            write_json(out, v, false);
        }
    }
    out.push(b'}');
}

/// Python's `ensure_ascii` string escaping: short escapes for the usual controls, `\uXXXX`
/// (lowercase hex, surrogate pairs above U+FFFF) for everything outside 0x20..=0x7E.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            continue;
        }
        if b >= 0x80 && !s.is_char_boundary(i) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => b"",
        };
        if !esc.is_empty() {
            out.extend_from_slice(esc);
            start = i + 1;
            continue;
        }
        // A control character, DEL, or the first byte of a multi-byte character.
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        let mut units = [0u16; 2];
        for unit in ch.encode_utf16(&mut units).iter() {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[((unit >> shift) & 0xf) as usize]);
            }
        }
        start = i + ch.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A number's canonical text: equal for numbers Python reads as the same (`1.50` and `1.5`).
pub fn number_bytes(n: &Number) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    write_number(&mut out, n);
    out
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    let text = n.as_str();
    let is_float = text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if !is_float {
        // Python prints ints as plain decimal; "-0" parses to 0.
        if text == "-0" {
            out.push(b'0');
        } else {
            out.extend_from_slice(text.as_bytes());
        }
        return;
    }
    match text.parse::<f64>() {
        Ok(f) => {
            let mut s = String::with_capacity(24);
            python_float_repr(&mut s, f);
            out.extend_from_slice(s.as_bytes());
        }
        // Unreachable for numbers serde_json accepted; keep the text rather than panic.
        Err(_) => out.extend_from_slice(text.as_bytes()),
    }
}

/// Python's `repr(float)` as `json.dumps` prints it: shortest round-trip digits, scientific
/// notation when the decimal exponent is < -4 or >= 16, and `Infinity`/`NaN` as json.dumps does.
pub fn python_float_repr(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("NaN");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    if f == 0.0 {
        out.push_str(if f.is_sign_negative() { "-0.0" } else { "0.0" });
        return;
    }
    // Shortest round-trip digits. Where two shortest candidates are equally close, Python's dtoa
    // picks the even last digit, and so does zmij; Rust's `{:e}` rounds the tie up instead
    // (698040783168879.25: Python "698040783168879.2", `{:e}` "6.980407831688793e14").
    let mut buf = zmij::Buffer::new();
    let text = buf.format_finite(f);
    let (negative, text) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text),
    };
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.trim_start_matches('+').parse::<i32>().unwrap_or(0)),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = [int_part, frac_part].concat();
    let significant = all.trim_start_matches('0');
    let leading_zeros = (all.len() - significant.len()) as i32;
    let digits = significant.trim_end_matches('0');
    // The decimal exponent of the first significant digit.
    let exp = exp + int_part.len() as i32 - 1 - leading_zeros;
    if negative {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
        return;
    }
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        out.push_str("0.");
        for _ in 0..(-point) {
            out.push('0');
        }
        out.push_str(digits);
    } else {
        let point = point as usize;
        if point >= digits.len() {
            out.push_str(digits);
            for _ in digits.len()..point {
                out.push('0');
            }
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        let v: Value = serde_json::from_str(text).expect("test input is JSON");
        String::from_utf8(to_canonical_vec(&v)).expect("ascii output")
    }

    #[test]
    fn canonical_without_a_key_is_the_canonical_form_of_the_rest() {
        let text = r#"{"z":[1,{"b":2.5,"a":"é"}],"signature":"ab","a":null,"m":{"y":1,"x":0}}"#;
        let Value::Object(map) = serde_json::from_str::<Value>(text).unwrap() else {
            panic!("an object");
        };
        let mut rest = map.clone();
        rest.shift_remove("signature");
        assert_eq!(
            canonical_without(&map, "signature"),
            to_canonical_vec(&Value::Object(rest))
        );
        assert_eq!(
            canonical_without(&map, "absent"),
            to_canonical_vec(&Value::Object(map))
        );
    }

    #[test]
    fn compat_float_vector() {
        let t = "[0.1,1e-05,0.0001,1e+16,1000000000000000.0,123456789.123,5e-324,1.7976931348623157e+308,-0.0,100.0,2.5e-07,1.0000000000000002]";
        assert_eq!(canon(t), t);
    }

    #[test]
    fn compat_string_vector() {
        let t = r#"["\u0000\u001f\u007f\"\\/\n\t\b\f\r","\u00e9\u20ac\ud83d\ude00"]"#;
        assert_eq!(canon(t), t);
    }

    #[test]
    fn compat_key_order_vector() {
        let t = r#"{"B":2,"_":3,"a":4,"b":1,"\u00e9":5,"\uffff":6,"\ud83d\ude00":7}"#;
        assert_eq!(canon(t), t);
    }

    #[test]
    fn serde_style_floats_become_python_style() {
        assert_eq!(
            canon("[1e-5,1e16,5000.0,1E2,-1.5e-7,12345678901234567890123]"),
            "[1e-05,1e+16,5000.0,100.0,-1.5e-07,12345678901234567890123]"
        );
    }
}
