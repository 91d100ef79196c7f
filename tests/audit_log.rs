//! Signed run logs written by the `run-once` binary: Python's standard-library HMAC recipe
//! accepts them, `lar-worker verify` rejects every kind of tampering, and the per-step chain
//! names the step that was removed, moved or altered.

mod common;

use common::{bin, only_log, python, run, write, SECRET};
use lar_worker::audit::Secret;
use lar_worker::json::{to_canonical_vec, to_python_json_vec};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

const GRAPH: &str = r#"
name  = "audit_demo"
entry = "greet"

[[nodes]]
id    = "greet"
type  = "set"
key   = "greeting"
value = "hello wörld 😀"
next  = "ratio"

[[nodes]]
id    = "ratio"
type  = "set"
key   = "ratio"
value = 0.00001
next  = "copy"

[[nodes]]
id    = "copy"
type  = "set"
key   = "big_copy"
value = "{big}"
next  = "route"

[[nodes]]
id      = "route"
type    = "router"
on      = "kind"
routes  = { sum = "sum" }

[[nodes]]
id     = "sum"
type   = "tool"
tool   = "sum_numbers"
inputs = ["numbers"]
output = "total"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "status"
value = "done"
"#;

const INPUT: &str = r#"{"kind":"sum","numbers":[1,2.5,1e-7],"big":123456789012345678901234567890,"note":"caf\u00e9 \u20ac \ud83d\ude00 \u0000\u007f\u2028","neg":-0.0,"huge":1e300,"whole":5000.0,"nested":{"b":[true,null,{"z":1e16}],"a":"x"}}"#;

/// Runs the demo graph with `run-once` and returns (tempdir, log path).
fn signed_log() -> (TempDir, PathBuf) {
    signed_log_with(INPUT)
}

fn signed_log_with(input: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let graph = write(dir.path(), "audit_demo.toml", GRAPH);
    let logs = dir.path().join("logs");
    let (code, stdout, stderr) = run(bin()
        .env("HMAC_SECRET", SECRET)
        .arg("run-once")
        .arg("--graph")
        .arg(&graph)
        .arg("--input")
        .arg(input)
        .arg("--log-dir")
        .arg(&logs)
        .arg("--job-id")
        .arg("job-audit"));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let log = only_log(&logs);
    (dir, log)
}

/// Python's standard library: json.load, pop the signature, json.dumps(sort_keys, compact),
/// HMAC-SHA256 hexdigest. Also recomputes every chain link and checks the file's key order.
const PY_VERIFY: &str = r#"
import hashlib, hmac, json, sys
path, secret = sys.argv[1], sys.argv[2].encode("utf-8")
with open(path, encoding="utf-8") as f:
    doc = json.load(f)
keys = list(doc)
assert keys[:5] == ["run_id", "user_id", "timestamp", "steps", "summary"], keys
assert keys[-1] == "signature", keys
sig = doc.pop("signature")
msg = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
calc = hmac.new(secret, msg, hashlib.sha256).hexdigest()
if not hmac.compare_digest(calc, sig):
    print("MISMATCH", calc, sig)
    sys.exit(1)
prev = doc["run_id"]
for i, s in enumerate(doc["steps"]):
    k = list(s)
    assert s["step"] == i, (i, s["step"])
    assert k[:6] == ["step", "node", "state_before", "state_diff", "run_metadata", "outcome"], k
    assert k.index("state_after") > k.index("outcome"), k
    if "error" in k:
        assert k.index("error") < k.index("state_after"), k
    body = {key: v for key, v in s.items() if key != "chain"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    link = hmac.new(secret, prev.encode("utf-8") + b"\n" + canon, hashlib.sha256).hexdigest()
    if link != s["chain"]:
        print("CHAIN", i)
        sys.exit(1)
    prev = link
summ = doc["summary"]
assert summ["total_steps"] == len(doc["steps"]), summ
assert set(summ) == {"total_steps", "total_prompt_tokens", "total_completion_tokens", "total_tokens", "tokens_by_model"}, summ
print("OK", len(doc["steps"]))
"#;

#[test]
fn run_once_log_verifies_with_pythons_hmac_recipe() {
    let (_dir, log) = signed_log();
    let (code, out, err) = python(PY_VERIFY, &[log.to_str().unwrap(), SECRET]);
    assert_eq!(code, 0, "python verifier: {out}{err}");
    assert_eq!(out.trim(), "OK 6");

    // The wrong secret fails the same recipe.
    let (code, out, _) = python(PY_VERIFY, &[log.to_str().unwrap(), "another-secret"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("MISMATCH"), "{out}");

    // And our own verifier agrees.
    let (code, out, err) = run(bin().env("HMAC_SECRET", SECRET).arg("verify").arg(&log));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("valid (run log, 6 steps, chain intact)"),
        "{out}"
    );

    // The values went through the file unchanged: ints stay ints, floats stay floats.
    let doc = read(&log);
    let state = &doc["steps"][5]["state_after"];
    let text = String::from_utf8(to_canonical_vec(state)).unwrap();
    for frag in [
        r#""big":123456789012345678901234567890"#,
        r#""big_copy":123456789012345678901234567890"#,
        r#""huge":1e+300"#,
        r#""neg":-0.0"#,
        r#""whole":5000.0"#,
        r#""ratio":1e-05"#,
        r#""numbers":[1,2.5,1e-07]"#,
        r#""total":3.5000001"#,
        r#""note":"caf\u00e9 \u20ac \ud83d\ude00 \u0000\u007f\u2028""#,
        r#""greeting":"hello w\u00f6rld \ud83d\ude00""#,
    ] {
        assert!(text.contains(frag), "{frag} not in {text}");
    }
    assert_eq!(doc["job_id"], "job-audit");
    assert_eq!(doc["outcome"]["status"], "completed");
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn verify_cli(path: &Path) -> (i32, String) {
    let (code, out, err) = run(bin().env("HMAC_SECRET", SECRET).arg("verify").arg(path));
    (code, format!("{out}{err}"))
}

/// Writes `doc` re-signed with the secret, as someone holding the key could.
fn write_resigned(path: &Path, mut doc: Map<String, Value>) {
    doc.shift_remove("signature");
    let sig = Secret::new(SECRET)
        .unwrap()
        .sign(&to_canonical_vec(&Value::Object(doc.clone())));
    doc.insert("signature".into(), Value::String(sig));
    std::fs::write(path, to_python_json_vec(&Value::Object(doc))).unwrap();
}

fn steps_mut(doc: &mut Map<String, Value>) -> &mut Vec<Value> {
    doc.get_mut("steps").unwrap().as_array_mut().unwrap()
}

#[test]
fn flipped_byte_in_a_state_value_is_invalid() {
    let (_dir, log) = signed_log();
    let mut bytes = std::fs::read(&log).unwrap();
    let needle = br#""status":"done""#;
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("the final state is in the file");
    let i = at + needle.len() - 2; // the 'n' of "done"
    bytes[i] ^= 0x01; // one bit of one byte: "done" becomes "dooe"
    std::fs::write(&log, &bytes).unwrap();
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID"), "{out}");
    assert!(out.contains("signature mismatch"), "{out}");
    // The chain pins it to the step whose record holds the byte.
    assert!(out.contains("step 5"), "{out}");
    // Python's recipe rejects it too.
    let (code, pout, _) = python(PY_VERIFY, &[log.to_str().unwrap(), SECRET]);
    assert_eq!(code, 1, "{pout}");
}

/// A key written twice in one object reads two ways: Python (so Lár's verifier) keeps the last
/// value, other readers the first. Lár's recipe still accepts such a log; `verify` refuses it
/// and names where.
#[test]
fn a_duplicate_key_is_refused_though_lars_recipe_accepts_it() {
    let (_dir, log) = signed_log();
    let text = std::fs::read_to_string(&log).unwrap();
    let forged = text.replacen(r#""node_id":""#, r#""node_id":"forged","node_id":""#, 1);
    assert_ne!(forged, text);
    std::fs::write(&log, forged).unwrap();
    let (code, out, err) = python(PY_VERIFY, &[log.to_str().unwrap(), SECRET]);
    assert_eq!((code, out.trim()), (0, "OK 6"), "{err}");
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("ambiguous: the key 'node_id' at steps[0].node_id appears twice"),
        "{out}"
    );
}

#[test]
fn missing_signature_and_unreadable_files_are_invalid() {
    let (dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    doc.shift_remove("signature");
    let unsigned = dir.path().join("unsigned.json");
    std::fs::write(&unsigned, to_python_json_vec(&Value::Object(doc))).unwrap();
    let (code, out) = verify_cli(&unsigned);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID: missing signature"), "{out}");

    let garbage = write(
        dir.path(),
        "garbage.json",
        "{\"run_id\": \"x\", \"steps\": [",
    );
    let (code, out) = verify_cli(&garbage);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID: unreadable"), "{out}");

    let not_object = write(dir.path(), "list.json", "[1, 2, 3]");
    let (code, out) = verify_cli(&not_object);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID: unreadable"), "{out}");

    let missing = dir.path().join("does_not_exist.json");
    let (code, out) = verify_cli(&missing);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID: unreadable"), "{out}");

    // A directory: every file is checked, and one bad file makes the whole run fail.
    let logs = log.parent().unwrap();
    let (code, out) = verify_cli(logs);
    assert_eq!(code, 0, "{out}");
    std::fs::copy(&garbage, logs.join("zz_garbage.json")).unwrap();
    let (code, out) = verify_cli(logs);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("valid (run log"), "{out}");
    assert!(out.contains("zz_garbage.json: INVALID"), "{out}");
}

#[test]
fn resigning_an_untouched_log_keeps_it_valid() {
    // The control for the chain tests below: re-signing alone changes nothing.
    let (_dir, log) = signed_log();
    let doc = read(&log).as_object().unwrap().clone();
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn chain_detects_a_removed_step() {
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    steps_mut(&mut doc).remove(2);
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID"), "{out}");
    assert!(out.contains("step 2 is missing"), "{out}");
}

#[test]
fn a_dropped_last_step_is_caught_by_the_summary_count() {
    // The chain links backwards, so a log cut short is still a valid chain: the count says no.
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    steps_mut(&mut doc).pop();
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("the summary counts 6 steps, the log has 5"),
        "{out}"
    );
}

#[test]
fn chain_detects_a_removed_step_even_when_the_rest_is_renumbered() {
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    let steps = steps_mut(&mut doc);
    steps.remove(2);
    for (i, s) in steps.iter_mut().enumerate() {
        s["step"] = Value::from(i as u64);
    }
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("chain broken at step 2"), "{out}");
}

#[test]
fn chain_detects_swapped_steps() {
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    steps_mut(&mut doc).swap(1, 2);
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID"), "{out}");
    assert!(
        out.contains("reordered"),
        "a swap is reported as a reorder: {out}"
    );
    assert!(out.contains("position 1 holds step 2"), "{out}");
}

#[test]
fn chain_detects_swapped_steps_even_when_renumbered() {
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    let steps = steps_mut(&mut doc);
    steps.swap(1, 2);
    for (i, s) in steps.iter_mut().enumerate() {
        s["step"] = Value::from(i as u64);
    }
    write_resigned(&log, doc);
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("chain broken at step 1"), "{out}");
}

#[test]
fn chain_detects_an_edited_step_after_resigning() {
    let (_dir, log) = signed_log();
    let mut doc = read(&log).as_object().unwrap().clone();
    let steps = steps_mut(&mut doc);
    steps[3]["state_after"]["kind"] = Value::String("text".into());
    write_resigned(&log, doc);
    // The document signature is fine again: only the chain can tell.
    let (code, out, _) = python(PY_VERIFY, &[log.to_str().unwrap(), SECRET]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.trim(), "CHAIN 3");
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("INVALID"), "{out}");
    assert!(out.contains("chain broken at step 3"), "{out}");
    assert!(!out.contains("signature mismatch"), "{out}");
}

#[test]
fn overflowing_floats_are_written_as_python_does_and_still_verify() {
    // 1e400 is valid JSON that Python reads as inf and writes as a bare `Infinity`.
    let (_dir, log) = signed_log_with(
        r#"{"kind":"sum","numbers":[1],"inf":1e400,"ninf":-1e400,"text":"Infinity \" Infinity"}"#,
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(r#""inf":Infinity,"#) && text.contains(r#""ninf":-Infinity,"#),
        "{text}"
    );
    let (code, out, err) = python(PY_VERIFY, &[log.to_str().unwrap(), SECRET]);
    assert_eq!(code, 0, "python verifier: {out}{err}");
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "our verifier must read what Python reads: {out}");
    // The string that spells Infinity is not touched; changing it is still caught.
    let tampered = text.replacen(r#"Infinity \" Infinity"#, r#"Infinity \" Infinitz"#, 1);
    assert_ne!(tampered, text);
    std::fs::write(&log, tampered).unwrap();
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("signature mismatch"), "{out}");
}

/// An input nested 126 levels deep (serde_json's reader takes it) makes a log whose state sits
/// deeper than serde_json's default limit of 128: `verify` still reads it, and so does Python.
#[test]
fn a_deeply_nested_state_still_verifies() {
    let deep = format!("{}1{}", "[".repeat(126), "]".repeat(126));
    let (_dir, log) = signed_log_with(&format!(r#"{{"deep":{deep}}}"#));
    let (code, out) = verify_cli(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid"), "{out}");
}

/// A signature says who signed, not what: a signed document that is not a run log (no
/// `run_id`, or `steps` that is not a list) is refused even with a good signature.
#[test]
fn a_signed_document_that_is_not_a_run_log_is_invalid() {
    let (_dir, log) = signed_log();
    let mut no_steps = read(&log).as_object().unwrap().clone();
    no_steps.insert("steps".into(), serde_json::json!({"0": "x"}));
    write_resigned(&log, no_steps);
    let (code, out) = verify_cli(&log);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("'steps' is missing or not a list"), "{out}");
    // A signed decision, re-wrapped as a file: no run, no steps.
    let decision = serde_json::json!({"job_id": "j", "choice": "approve", "decided_by": "a@b"});
    write_resigned(&log, decision.as_object().unwrap().clone());
    let (code, out) = verify_cli(&log);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not a run log: no 'run_id'"), "{out}");
}
