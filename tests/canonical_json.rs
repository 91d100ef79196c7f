//! The canonical serializer against Python's `json.dumps(obj, sort_keys=True,
//! separators=(',', ':'))`: the COMPAT.md vectors, Lár's own reference logs, and random values
//! compared with a real python3.
// Some float literals spell the exact binary value on purpose (halfway cases).
#![allow(clippy::excessive_precision)]

mod common;

use common::{reference_logs_dir, SECRET};
use lar_worker::audit::{verify_file, Secret, Verdict};
use lar_worker::json::to_canonical_vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Number, Value};
use std::io::Write;
use std::process::{Command, Stdio};

fn canon(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap();
    String::from_utf8(to_canonical_vec(&v)).unwrap()
}

#[test]
fn compat_encoder_vector_floats() {
    let t = "[0.1,1e-05,0.0001,1e+16,1000000000000000.0,123456789.123,5e-324,1.7976931348623157e+308,-0.0,100.0,2.5e-07,1.0000000000000002]";
    assert_eq!(canon(t), t);
}

#[test]
fn compat_encoder_vector_strings() {
    let t = r#"["\u0000\u001f\u007f\"\\/\n\t\b\f\r","\u00e9\u20ac\ud83d\ude00"]"#;
    assert_eq!(canon(t), t);
    // The same characters given raw (not escaped) in the input give the same bytes.
    let raw = Value::Array(vec![
        Value::String("\u{0}\u{1f}\u{7f}\"\\/\n\t\u{8}\u{c}\r".into()),
        Value::String("é€😀".into()),
    ]);
    assert_eq!(to_canonical_vec(&raw), t.as_bytes());
}

#[test]
fn compat_encoder_vector_key_order() {
    let t = r#"{"B":2,"_":3,"a":4,"b":1,"\u00e9":5,"\uffff":6,"\ud83d\ude00":7}"#;
    assert_eq!(canon(t), t);
    // Input order must not matter.
    let shuffled = r#"{"\ud83d\ude00":7,"b":1,"\uffff":6,"a":4,"_":3,"\u00e9":5,"B":2}"#;
    assert_eq!(canon(shuffled), t);
}

#[test]
fn compat_signature_test_vector() {
    let canonical = r#"{"run_id":"00000000-0000-4000-8000-000000000000","steps":[{"node":"AddValueNode","outcome":"success","run_metadata":{},"state_after":{"__node_counts":{"AddValueNode":1},"note":"caf\u00e9 \u20ac \ud83d\ude00","x":1.0,"y":1e-05,"z":1e+16},"state_before":{"__node_counts":{"AddValueNode":1},"note":"caf\u00e9 \u20ac \ud83d\ude00","x":1.0,"y":1e-05},"state_diff":{"added":{"z":1e+16},"removed":{},"updated":{}},"step":0}],"summary":{"tokens_by_model":{},"total_completion_tokens":0,"total_prompt_tokens":0,"total_steps":1,"total_tokens":0},"timestamp":"2026-01-01T00:00:00.000001","user_id":null}"#;
    let expected = "43a40f4ad8a3f1721f5297c572f94e2eb78443ad9ff0afd4f503c3c70651f59e";
    let secret = Secret::new(SECRET).unwrap();
    assert_eq!(secret.sign(canonical.as_bytes()), expected);

    // Parse it as a log file would be parsed, in another key order and with serde-style
    // numbers: the canonical bytes and the signature come out the same.
    let mut v: Value = serde_json::from_str(canonical).unwrap();
    assert_eq!(to_canonical_vec(&v), canonical.as_bytes());
    let pretty = serde_json::to_string_pretty(&v).unwrap();
    let reparsed: Value = serde_json::from_str(&pretty).unwrap();
    assert_eq!(secret.sign(&to_canonical_vec(&reparsed)), expected);

    // Any change to the content changes the signature.
    v["steps"][0]["state_after"]["x"] = serde_json::from_str("1").unwrap();
    assert_ne!(secret.sign(&to_canonical_vec(&v)), expected);
}

#[test]
fn float_ties_round_to_even_like_python() {
    // Each value lies exactly halfway between two 16/17-digit candidates; Python's repr picks the
    // even last digit (Rust's `{:e}` picks the upper one).
    let t = "[698040783168879.2,199652635774374.62,280293350666501.12,149249627881015.12,636132260499520.2]";
    assert_eq!(canon(t), t);
    let from_f64 = Value::Array(
        [
            698040783168879.25f64,
            199652635774374.625,
            280293350666501.125,
        ]
        .iter()
        .map(|f| Value::Number(Number::from_f64(*f).unwrap()))
        .collect(),
    );
    assert_eq!(
        String::from_utf8(to_canonical_vec(&from_f64)).unwrap(),
        "[698040783168879.2,199652635774374.62,280293350666501.12]"
    );
}

fn reference_files() -> Vec<std::path::PathBuf> {
    let dir = reference_logs_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 5, "reference logs: {files:?}");
    files
}

#[test]
fn reference_logs_verify_with_the_reference_secret() {
    let secret = Secret::new(SECRET).unwrap();
    let wrong = Secret::new("not-the-reference-secret").unwrap();
    for f in reference_files() {
        let verdict = verify_file(&f, &secret);
        assert!(verdict.is_valid(), "{}: {verdict:?}", f.display());
        assert!(
            matches!(verify_file(&f, &wrong), Verdict::Invalid { .. }),
            "{} verified with the wrong secret",
            f.display()
        );
    }
}

#[test]
fn reference_logs_reserialize_to_their_signature() {
    let secret = Secret::new(SECRET).unwrap();
    let mut ours = Vec::new();
    for f in reference_files() {
        let doc: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let Value::Object(mut map) = doc else {
            panic!("{} is not an object", f.display())
        };
        let Some(Value::String(stored)) = map.shift_remove("signature") else {
            panic!("{} has no signature", f.display())
        };
        let bytes = to_canonical_vec(&Value::Object(map));
        assert_eq!(secret.sign(&bytes), stored, "{}", f.display());
        ours.push(bytes);
    }

    // The same bytes as Python's own encoder produces for these files.
    let script = r#"
import json, sys
for p in sys.argv[1:]:
    with open(p, encoding="utf-8") as f:
        d = json.load(f)
    d.pop("signature")
    sys.stdout.write(json.dumps(d, sort_keys=True, separators=(",", ":")) + "\n")
"#;
    let files: Vec<String> = reference_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let (code, out, err) = common::python(script, &args);
    assert_eq!(code, 0, "{err}");
    let py: Vec<&str> = out.lines().collect();
    assert_eq!(py.len(), ours.len());
    for (i, (p, o)) in py.iter().zip(&ours).enumerate() {
        assert_eq!(p.as_bytes(), o.as_slice(), "{}", files[i]);
    }
}

// ---- random values against python3 ----

fn any_char() -> impl Strategy<Value = char> {
    let from = |lo: u32, hi: u32| (lo..hi).prop_map(|c| char::from_u32(c).unwrap());
    prop_oneof![
        6 => from(0x20, 0x7f),
        2 => from(0, 0x20),
        1 => Just('\u{7f}'),
        2 => prop::sample::select(vec![
            '"', '\\', '/', '\u{80}', '\u{85}', '\u{a0}', '\u{2028}', '\u{2029}', '\u{feff}',
            '\u{fffd}', '\u{ffff}', '\u{10000}', '\u{1f600}', '\u{10ffff}', 'é', '€', 'ß',
        ]),
        2 => from(0x80, 0xd800),
        1 => from(0xe000, 0x1_0000),
        3 => from(0x1_0000, 0x11_0000),
    ]
}

fn any_string() -> impl Strategy<Value = String> {
    prop::collection::vec(any_char(), 0..12).prop_map(String::from_iter)
}

/// Floats chosen where formatting goes wrong: notation boundaries, subnormals, extremes.
const SPECIAL_FLOATS: &[f64] = &[
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.225073858507201e-308, // largest subnormal
    f64::MIN_POSITIVE,
    f64::MAX,
    f64::MIN,
    f64::EPSILON,
    1e-5,
    9.999999999999999e-6,
    1.0000000000000001e-5,
    1e-4,
    9.999999999999999e-5,
    0.00010000000000000002,
    1e15,
    999999999999999.9,
    1e16,
    9999999999999998.0,
    1.0000000000000002e16,
    1e17,
    1e21,
    1e22,
    1e23,
    0.1,
    0.2,
    0.30000000000000004,
    1.0,
    100.0,
    5000.0,
    123456789.123,
    1.0000000000000002,
    2.5e-7,
    1.2345678901234567e19,
    -1.5e-7,
    // Exact halfway between two shortest candidates: Python keeps the even digit.
    698040783168879.2,
    199652635774374.62,
    280293350666501.12,
];

fn any_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        // Every bit pattern: all exponents, subnormals included.
        3 => any::<u64>()
            .prop_map(f64::from_bits)
            .prop_filter("finite", |f| f.is_finite()),
        // Subnormals only.
        1 => (1u64..(1u64 << 52), any::<bool>())
            .prop_map(|(m, neg)| f64::from_bits(m | if neg { 1 << 63 } else { 0 })),
        // Decimal-looking values around the fixed/scientific switch.
        3 => (1i64..100_000_000_000_000_000, -30i32..30, any::<bool>()).prop_map(|(m, e, neg)| {
            let f = m as f64 * 10f64.powi(e);
            if neg { -f } else { f }
        }),
        // Whole numbers as floats ("5000.0", never "5000").
        1 => (-100_000_000_000_000_000i64..100_000_000_000_000_000).prop_map(|i| i as f64),
        // The special values and their neighbours.
        2 => (prop::sample::select(SPECIAL_FLOATS), -2i64..=2)
            .prop_map(|(f, k)| f64::from_bits((f.to_bits() as i64).wrapping_add(k) as u64))
            .prop_filter("finite", |f| f.is_finite()),
    ]
}

fn big_int() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        1u8..10,
        prop::collection::vec(0u8..10, 19..60),
    )
        .prop_map(|(neg, first, rest)| {
            let mut s = String::new();
            if neg {
                s.push('-');
            }
            s.push(char::from(b'0' + first));
            s.extend(rest.iter().map(|d| char::from(b'0' + d)));
            serde_json::from_str(&s).unwrap()
        })
}

/// Number texts as a JSON document can hold them: ints, fractions, exponents (also ones that
/// overflow or underflow a double).
fn raw_number() -> impl Strategy<Value = Value> {
    let digits = |n: std::ops::Range<usize>| {
        prop::collection::vec(0u8..10, n)
            .prop_map(|d| d.iter().map(|x| char::from(b'0' + x)).collect::<String>())
    };
    (
        any::<bool>(),
        prop_oneof![
            Just("0".to_string()),
            (1u8..10, digits(0..22)).prop_map(|(f, r)| format!("{f}{r}"))
        ],
        prop::option::of(digits(1..22)),
        prop::option::of((
            prop::sample::select(vec!["e", "E", "e+", "e-", "E-"]),
            0u16..400,
        )),
    )
        .prop_map(|(neg, int, frac, exp)| {
            let mut s = String::new();
            if neg {
                s.push('-');
            }
            s.push_str(&int);
            if let Some(f) = frac {
                s.push('.');
                s.push_str(&f);
            }
            if let Some((e, n)) = exp {
                s.push_str(e);
                s.push_str(&n.to_string());
            }
            serde_json::from_str(&s).unwrap()
        })
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(serde_json::from_str::<Value>("-0").unwrap()),
        2 => big_int(),
        5 => any_float().prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        2 => raw_number(),
        4 => any_string().prop_map(Value::String),
    ]
}

fn nested() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(8, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((any_string(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A leaf wrapped in up to 200 levels of arrays and single-key objects.
fn deep() -> impl Strategy<Value = Value> {
    (
        leaf(),
        prop::collection::vec(any::<bool>(), 50..200),
        any_string(),
    )
        .prop_map(|(mut v, levels, key)| {
            for as_array in levels {
                v = if as_array {
                    Value::Array(vec![v, Value::Null])
                } else {
                    let mut m = Map::new();
                    m.insert(key.clone(), v);
                    m.insert("~".into(), Value::Bool(true));
                    Value::Object(m)
                };
            }
            v
        })
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![6 => nested(), 1 => deep(), 1 => leaf()]
}

const CASES: usize = 300;

/// Reproduce a failure with `CANON_SEED=<seed> cargo test --test canonical_json`.
fn seed() -> u64 {
    match std::env::var("CANON_SEED") {
        Ok(s) => s.parse().expect("CANON_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

#[test]
fn random_values_match_python_json_dumps() {
    let seed = seed();
    let mut seed_bytes = [0u8; 32];
    for (i, b) in seed.to_le_bytes().iter().enumerate() {
        seed_bytes[i] = *b;
        seed_bytes[i + 8] = b.wrapping_mul(31);
    }
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = json_value();
    let mut values: Vec<Value> = (0..CASES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    // The special floats always go in, not only when drawn.
    values.push(Value::Array(
        SPECIAL_FLOATS
            .iter()
            .map(|f| Value::Number(Number::from_f64(*f).unwrap()))
            .collect(),
    ));

    let mut input = Vec::new();
    for v in &values {
        let line = serde_json::to_string(v).unwrap();
        assert!(!line.contains('\n'));
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }

    let script = r#"
import json, sys
out = []
for raw in sys.stdin.buffer:
    line = raw.decode("utf-8")[:-1]
    out.append(json.dumps(json.loads(line), sort_keys=True, separators=(",", ":")))
sys.stdout.write("\n".join(out) + "\n")
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "python3 failed (seed {seed}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("python's ensure_ascii output is ASCII");
    let expected: Vec<&str> = text.lines().collect();
    assert_eq!(expected.len(), values.len(), "seed {seed}");

    for (i, (v, py)) in values.iter().zip(&expected).enumerate() {
        let ours = String::from_utf8(to_canonical_vec(v)).expect("our output is ASCII");
        assert!(
            ours == *py,
            "case {i} differs from python (reproduce with CANON_SEED={seed})\n input: {}\n ours:   {ours}\n python: {py}",
            serde_json::to_string(v).unwrap()
        );
    }
}
