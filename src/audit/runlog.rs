//! The run log: every step of one run, chained step by step (each record's `chain` is an HMAC
//! over the previous record's chain and this record), and signed as a whole with Lár's recipe.

use super::secret::Secret;
use crate::exec::StepRecord;
use crate::json::canonical::{write_json, write_str};
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
///
/// Each record is kept as its canonical bytes only (what the chain and the signature cover,
/// and what the file holds), plus the last record itself and running token totals: a run's
/// log costs one serialization per step and no copies of old states.
#[derive(Debug, Clone)]
pub struct RunLog {
    pub header: RunLogHeader,
    /// Canonical bytes of each step as signed (chain included), reused for the final signature.
    canonical: Vec<Vec<u8>>,
    /// The same records laid out for the file, Lár's step keys first in Lár's order.
    file: Vec<Vec<u8>>,
    last: Option<Map<String, Value>>,
    /// The newest `halt` marker (what a decision answers).
    last_halt: Option<Value>,
    /// The newest `decision` marker (what a human answered).
    last_decision: Option<Value>,
    tokens: TokenTotals,
    chain_head: String,
}

/// Lár's summary counters, summed from each step's `run_metadata` as steps are added.
#[derive(Debug, Clone, Default)]
struct TokenTotals {
    prompt: u64,
    completion: u64,
    total: u64,
    by_model: Map<String, Value>,
}

impl TokenTotals {
    fn add(&mut self, rec: &Map<String, Value>) {
        let Some(Value::Object(meta)) = rec.get("run_metadata") else {
            return;
        };
        let count = |k: &str| meta.get(k).and_then(Value::as_u64);
        let p = count("prompt_tokens").unwrap_or(0);
        let c = count("output_tokens").unwrap_or(0);
        let t = count("total_tokens").unwrap_or(p.saturating_add(c));
        // Saturating: the counts come from a provider's reply (and a stored journal).
        self.prompt = self.prompt.saturating_add(p);
        self.completion = self.completion.saturating_add(c);
        self.total = self.total.saturating_add(t);
        let by_model = &mut self.by_model;
        let mut add = |model: &str, n: u64| {
            let prev = by_model.get(model).and_then(Value::as_u64).unwrap_or(0);
            by_model.insert(model.to_string(), Value::from(prev.saturating_add(n)));
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
            canonical: Vec::new(),
            file: Vec::new(),
            last: None,
            last_halt: None,
            last_decision: None,
            tokens: TokenTotals::default(),
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

    /// The newest record.
    pub fn last_step(&self) -> Option<&Map<String, Value>> {
        self.last.as_ref()
    }

    /// Takes the newest record out of a log that is done with (a run's report keeps it).
    pub fn take_last_step(&mut self) -> Option<Map<String, Value>> {
        self.last.take()
    }

    /// The newest `halt` marker, from the jury step a decision answers.
    pub fn last_halt(&self) -> Option<&Value> {
        self.last_halt.as_ref()
    }

    /// The newest `decision` marker, from the step that applied a human decision.
    pub fn last_decision(&self) -> Option<&Value> {
        self.last_decision.as_ref()
    }

    pub fn len(&self) -> usize {
        self.canonical.len()
    }

    pub fn is_empty(&self) -> bool {
        self.canonical.is_empty()
    }

    /// Adds a step; with a secret, links it into the chain first. Returns the stored record.
    /// The record kept as the newest ([`RunLog::last_step`]) has its value fields only: the
    /// states stay in the serialized record.
    pub fn append(&mut self, step: StepRecord, secret: Option<&Secret>) -> &Map<String, Value> {
        let (mut rec, serialized) = step.into_parts();
        rec.shift_remove("chain");
        let mut link = None;
        let (canonical, file) = {
            let mut seg = Segments::of(&rec);
            for (key, bytes) in &serialized {
                seg.push_raw(key, bytes);
            }
            if let Some(secret) = secret {
                let l = chain_link(secret, &self.chain_head, &seg.canonical());
                seg.push_str("chain", &l);
                link = Some(l);
            }
            (seg.canonical(), seg.lar_layout())
        };
        if let Some(link) = link {
            rec.insert("chain".into(), Value::String(link.clone()));
            self.chain_head = link;
        }
        self.canonical.push(canonical);
        self.file.push(file);
        self.keep_last(rec)
    }

    fn keep_last(&mut self, rec: Map<String, Value>) -> &Map<String, Value> {
        self.tokens.add(&rec);
        if let Some(halt) = rec.get("halt") {
            self.last_halt = Some(halt.clone());
        }
        if let Some(decision) = rec.get("decision") {
            self.last_decision = Some(decision.clone());
        }
        self.last.insert(rec)
    }

    /// Re-adds records read back from a journal (already chained) without recomputing links.
    pub fn restore(&mut self, rec: Map<String, Value>) {
        if let Some(Value::String(link)) = rec.get("chain") {
            self.chain_head = link.clone();
        }
        let seg = Segments::of(&rec);
        self.canonical.push(seg.canonical());
        self.file.push(seg.lar_layout());
        self.keep_last(rec);
    }

    /// Lár's summary: step count and token totals from each step's `run_metadata`.
    pub fn summary(&self) -> Map<String, Value> {
        let t = &self.tokens;
        let mut m = Map::new();
        m.insert("total_steps".into(), Value::from(self.len() as u64));
        m.insert("total_prompt_tokens".into(), Value::from(t.prompt));
        m.insert("total_completion_tokens".into(), Value::from(t.completion));
        m.insert("total_tokens".into(), Value::from(t.total));
        m.insert("tokens_by_model".into(), Value::Object(t.by_model.clone()));
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
                for (j, s) in self.file.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(s);
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

/// Lár's step keys, in the order its files have them (COMPAT.md); other keys follow.
const LAR_STEP_ORDER: [&str; 10] = [
    "step",
    "node",
    "state_before",
    "state_diff",
    "run_metadata",
    "outcome",
    "error",
    "prompt",
    "system_instruction",
    "state_after",
];

/// A record serialized once: each top-level value's canonical bytes, then laid out by key
/// order, sorted for the signatures and in Lár's order for the file, by copying bytes.
struct Segments<'a> {
    buf: Vec<u8>,
    spans: Vec<(&'a str, std::ops::Range<usize>)>,
}

impl<'a> Segments<'a> {
    fn of(rec: &'a Map<String, Value>) -> Self {
        let mut buf = Vec::with_capacity(2048);
        let mut spans = Vec::with_capacity(rec.len() + 4);
        for (k, v) in rec {
            let start = buf.len();
            write_json(&mut buf, v, true);
            spans.push((k.as_str(), start..buf.len()));
        }
        Segments { buf, spans }
    }

    fn push_str(&mut self, key: &'a str, value: &str) {
        let start = self.buf.len();
        write_str(&mut self.buf, value);
        self.spans.push((key, start..self.buf.len()));
    }

    /// Adds a value that is already canonical JSON.
    fn push_raw(&mut self, key: &'a str, json: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(json);
        self.spans.push((key, start..self.buf.len()));
    }

    fn layout(&self, order: &[usize]) -> Vec<u8> {
        let len: usize =
            self.buf.len() + self.spans.iter().map(|(k, _)| k.len() + 4).sum::<usize>();
        let mut out = Vec::with_capacity(len + 2);
        out.push(b'{');
        for (n, &i) in order.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let (k, range) = &self.spans[i];
            write_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(&self.buf[range.clone()]);
        }
        out.push(b'}');
        out
    }

    /// Keys sorted by code point: Python's `sort_keys=True`.
    fn canonical(&self) -> Vec<u8> {
        let mut order: Vec<usize> = (0..self.spans.len()).collect();
        order.sort_unstable_by(|&a, &b| self.spans[a].0.cmp(self.spans[b].0));
        self.layout(&order)
    }

    /// Lár's keys in Lár's order, then the others as the record has them.
    fn lar_layout(&self) -> Vec<u8> {
        let rank = |k: &str| LAR_STEP_ORDER.iter().position(|l| *l == k);
        let mut order: Vec<usize> = (0..self.spans.len()).collect();
        // Stable: keys Lár does not know keep their order, after Lár's.
        order.sort_by_key(|&i| rank(self.spans[i].0).unwrap_or(LAR_STEP_ORDER.len()));
        self.layout(&order)
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
            log.append(StepRecord::new(rec), Some(&secret));
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
