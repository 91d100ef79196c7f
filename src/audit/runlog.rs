//! The run log: every step of one run, chained step by step (each record's `chain` is an HMAC
//! over the previous record's chain and this record), and signed as a whole with Lár's recipe.

use super::secret::Secret;
use crate::exec::StepRecord;
use crate::json::canonical::{write_json, write_object, write_str};
use serde_json::{Map, Value};

/// How the run ended, recorded at the top of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// completed | failed | halted
    pub status: String,
    pub reason: Option<String>,
}

/// Identity of a run's log, fixed at the start.
#[derive(Debug, Clone)]
pub struct RunLogHeader {
    pub run_id: String,
    pub user_id: Option<String>,
    pub timestamp: String,
    pub job_id: String,
    pub graph_name: String,
    pub graph_digest: String,
}

/// Step records accumulated for one run (in memory; the daemon also journals each one).
#[derive(Debug, Clone)]
pub struct RunLog {
    pub header: RunLogHeader,
    steps: Vec<Map<String, Value>>,
    /// Canonical bytes of each step as signed (chain included), reused for the final signature.
    canonical: Vec<Vec<u8>>,
    chain_head: String,
}

/// A finished log: the bytes to write and the signature they carry.
pub struct SignedLog {
    pub file_bytes: Vec<u8>,
    pub signature: Option<String>,
}

impl RunLog {
    pub fn new(header: RunLogHeader) -> Self {
        let chain_head = header.run_id.clone();
        RunLog {
            header,
            steps: Vec::new(),
            canonical: Vec::new(),
            chain_head,
        }
    }

    /// The chain value the next record links to (the run id before the first step).
    pub fn chain_head(&self) -> &str {
        &self.chain_head
    }

    /// The last record's canonical bytes as signed (its `chain` included).
    pub fn last_canonical(&self) -> Option<&[u8]> {
        self.canonical.last().map(Vec::as_slice)
    }

    pub fn steps(&self) -> &[Map<String, Value>] {
        &self.steps
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Adds a step; with a secret, links it into the chain first. Returns the stored record.
    pub fn append(&mut self, step: StepRecord, secret: Option<&Secret>) -> &Map<String, Value> {
        let mut rec = step.0;
        rec.shift_remove("chain");
        let mut bytes = Vec::with_capacity(1024);
        write_object(&mut bytes, &rec, true);
        if let Some(secret) = secret {
            let link = chain_link(secret, &self.chain_head, &bytes);
            rec.insert("chain".into(), Value::String(link.clone()));
            if rec.keys().all(|k| k.as_str() >= "chain") {
                // "chain" sorts first, so the signed form is a prefix away.
                let mut signed = Vec::with_capacity(bytes.len() + 80);
                signed.extend_from_slice(b"{\"chain\":\"");
                signed.extend_from_slice(link.as_bytes());
                signed.extend_from_slice(b"\"");
                if bytes.len() > 2 {
                    signed.push(b',');
                }
                signed.extend_from_slice(&bytes[1..]);
                bytes = signed;
            } else {
                // A key that sorts before "chain" (a batch's "batch_steps"): serialize again.
                bytes.clear();
                write_object(&mut bytes, &rec, true);
            }
            self.chain_head = link;
        }
        self.canonical.push(bytes);
        self.steps.push(rec);
        let last = self.steps.len() - 1;
        &self.steps[last]
    }

    /// Re-adds records read back from a journal (already chained) without recomputing links.
    pub fn restore(&mut self, rec: Map<String, Value>) {
        if let Some(Value::String(link)) = rec.get("chain") {
            self.chain_head = link.clone();
        }
        let bytes = crate::json::to_canonical_vec(&Value::Object(rec.clone()));
        self.canonical.push(bytes);
        self.steps.push(rec);
    }

    /// Lár's summary: step count and token totals from each step's `run_metadata`.
    pub fn summary(&self) -> Map<String, Value> {
        let (mut prompt, mut completion, mut total) = (0u64, 0u64, 0u64);
        let mut by_model: Map<String, Value> = Map::new();
        for s in &self.steps {
            let Some(Value::Object(meta)) = s.get("run_metadata") else {
                continue;
            };
            let p = meta
                .get("prompt_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let c = meta
                .get("output_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let t = meta
                .get("total_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(p + c);
            prompt += p;
            completion += c;
            total += t;
            let mut add = |model: &str, n: u64| {
                let prev = by_model.get(model).and_then(Value::as_u64).unwrap_or(0);
                by_model.insert(model.to_string(), Value::from(prev + n));
            };
            // A batch step sums several calls, possibly of several models.
            if let Some(Value::Object(models)) = meta.get("tokens_by_model") {
                for (model, n) in models {
                    add(model, n.as_u64().unwrap_or(0));
                }
            } else if let Some(model) = meta.get("model").and_then(Value::as_str) {
                add(model, t);
            }
        }
        let mut m = Map::new();
        m.insert("total_steps".into(), Value::from(self.steps.len() as u64));
        m.insert("total_prompt_tokens".into(), Value::from(prompt));
        m.insert("total_completion_tokens".into(), Value::from(completion));
        m.insert("total_tokens".into(), Value::from(total));
        m.insert("tokens_by_model".into(), Value::Object(by_model));
        m
    }

    /// The top-level fields other than `steps`, in Lár's order then ours.
    fn top_fields(&self, outcome: &RunOutcome) -> Vec<(&'static str, Value)> {
        let h = &self.header;
        let mut out_obj = Map::new();
        out_obj.insert("status".into(), Value::String(outcome.status.clone()));
        if let Some(r) = &outcome.reason {
            out_obj.insert("reason".into(), Value::String(r.clone()));
        }
        vec![
            ("run_id", Value::String(h.run_id.clone())),
            (
                "user_id",
                h.user_id.clone().map(Value::String).unwrap_or(Value::Null),
            ),
            ("timestamp", Value::String(h.timestamp.clone())),
            ("summary", Value::Object(self.summary())),
            ("job_id", Value::String(h.job_id.clone())),
            ("graph_name", Value::String(h.graph_name.clone())),
            ("graph_digest", Value::String(h.graph_digest.clone())),
            ("outcome", Value::Object(out_obj)),
        ]
    }

    /// Canonical bytes of the whole document without `signature`, reusing each step's bytes.
    pub fn canonical_bytes(&self, outcome: &RunOutcome) -> Vec<u8> {
        let mut fields = self.top_fields(outcome);
        fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let total: usize = self.canonical.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(total + 1024);
        out.push(b'{');
        let mut first = true;
        let mut steps_written = false;
        let write_steps = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"\"steps\":[");
            for (i, s) in self.canonical.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(s);
            }
            out.push(b']');
        };
        for (k, v) in &fields {
            if !steps_written && *k > "steps" {
                if !first {
                    out.push(b',');
                }
                write_steps(&mut out);
                steps_written = true;
                first = false;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_str(&mut out, k);
            out.push(b':');
            write_json(&mut out, v, true);
        }
        if !steps_written {
            if !first {
                out.push(b',');
            }
            write_steps(&mut out);
        }
        out.push(b'}');
        out
    }

    /// Signs and lays out the file: Lár's key order, signature last.
    pub fn sign(&self, outcome: &RunOutcome, secret: Option<&Secret>) -> SignedLog {
        let signature = secret.map(|s| s.sign(&self.canonical_bytes(outcome)));
        let fields = self.top_fields(outcome);
        let total: usize = self.canonical.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(total + 1024);
        out.push(b'{');
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if *k == "summary" {
                out.extend_from_slice(b"\"steps\":[");
                for (j, s) in self.steps.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    write_object(&mut out, s, false);
                }
                out.extend_from_slice(b"],");
            }
            write_str(&mut out, k);
            out.push(b':');
            write_json(&mut out, v, false);
        }
        if let Some(sig) = &signature {
            out.extend_from_slice(b",\"signature\":");
            write_str(&mut out, sig);
        }
        out.extend_from_slice(b"}\n");
        SignedLog {
            file_bytes: out,
            signature,
        }
    }
}

/// `chain_k = HMAC(secret, chain_{k-1} || "\n" || canonical(step_k without chain))`.
pub fn chain_link(secret: &Secret, prev: &str, canonical_step: &[u8]) -> String {
    hex::encode(secret.mac_parts(&[prev.as_bytes(), b"\n", canonical_step]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify::verify_value;

    #[test]
    fn keys_sorting_before_chain_still_sign_and_verify() {
        let secret = Secret::new("s").unwrap();
        let mut log = RunLog::new(RunLogHeader {
            run_id: "00000000-0000-4000-8000-000000000000".into(),
            user_id: None,
            timestamp: "t".into(),
            job_id: "j".into(),
            graph_name: "g".into(),
            graph_digest: "d".into(),
        });
        for (i, extra) in ["batch_steps", "zzz"].iter().enumerate() {
            let mut rec = Map::new();
            rec.insert("step".into(), Value::from(i as u64));
            rec.insert((*extra).into(), Value::Array(vec![Value::from(1)]));
            log.append(StepRecord(rec), Some(&secret));
        }
        let outcome = RunOutcome {
            status: "completed".into(),
            reason: None,
        };
        let signed = log.sign(&outcome, Some(&secret));
        let doc: Value = serde_json::from_slice(&signed.file_bytes).unwrap();
        assert!(verify_value(&doc, &secret).is_valid());
    }
}
