//! Prometheus text exposition (format 0.0.4): job counters per queue, step duration histograms
//! per node kind, LLM tokens per model, queue gauges read at scrape time, build info.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Step duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Per-step observations, shared by every job task.
#[derive(Debug, Default)]
pub struct StepMetrics {
    by_kind: Mutex<BTreeMap<String, Histogram>>,
    tokens: Mutex<BTreeMap<String, u64>>,
}

impl StepMetrics {
    /// Records one step record (its `node_type`, `duration_us` and LLM usage).
    pub fn observe(&self, step: &serde_json::Map<String, serde_json::Value>) {
        let kind = step
            .get("node_type")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        let secs = step
            .get("duration_us")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as f64
            / 1e6;
        if let Ok(mut m) = self.by_kind.lock() {
            let h = m.entry(kind.to_string()).or_default();
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
        if let Some(meta) = step.get("run_metadata").and_then(|v| v.as_object()) {
            if let (Some(model), Some(total)) = (
                meta.get("model").and_then(|v| v.as_str()),
                meta.get("total_tokens").and_then(|v| v.as_u64()),
            ) {
                if let Ok(mut t) = self.tokens.lock() {
                    let sum = t.entry(model.to_string()).or_default();
                    *sum = sum.saturating_add(total);
                }
            }
        }
    }
}

/// One queue's numbers for a scrape.
pub struct QueueSample {
    pub queue: String,
    pub counters: Vec<(&'static str, u64)>,
    /// Finishes given up: the store kept failing or refused them.
    pub finishes_abandoned: u64,
    pub ready: Option<u64>,
    pub claimed: Option<u64>,
    pub delayed: Option<u64>,
    pub dead: Option<u64>,
    pub pending: Option<u64>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(queues: &[QueueSample], in_flight: u64, steps: &StepMetrics) -> String {
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP lar_worker_jobs_total Jobs by queue and outcome since start."
    );
    let _ = writeln!(out, "# TYPE lar_worker_jobs_total counter");
    for q in queues {
        for (outcome, n) in &q.counters {
            let _ = writeln!(
                out,
                "lar_worker_jobs_total{{queue=\"{}\",outcome=\"{outcome}\"}} {n}",
                esc(&q.queue)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP lar_worker_finishes_abandoned_total Finishes given up because the queue store kept failing or refused them; the claim was dead-lettered, handed back or left to lease expiry."
    );
    let _ = writeln!(out, "# TYPE lar_worker_finishes_abandoned_total counter");
    for q in queues {
        let _ = writeln!(
            out,
            "lar_worker_finishes_abandoned_total{{queue=\"{}\"}} {}",
            esc(&q.queue),
            q.finishes_abandoned
        );
    }
    let _ = writeln!(
        out,
        "# HELP lar_worker_in_flight Jobs running in this process."
    );
    let _ = writeln!(out, "# TYPE lar_worker_in_flight gauge");
    let _ = writeln!(out, "lar_worker_in_flight {in_flight}");
    type Gauge = (&'static str, &'static str, fn(&QueueSample) -> Option<u64>);
    let gauges: [Gauge; 5] = [
        (
            "lar_worker_queue_ready",
            "Jobs waiting to be claimed.",
            |q| q.ready,
        ),
        (
            "lar_worker_queue_claimed",
            "Jobs claimed by some worker.",
            |q| q.claimed,
        ),
        (
            "lar_worker_queue_delayed",
            "Jobs waiting for a retry.",
            |q| q.delayed,
        ),
        (
            "lar_worker_dead_letters",
            "Dead letters awaiting an operator.",
            |q| q.dead,
        ),
        (
            "lar_worker_pending_decisions",
            "Jobs waiting for a human decision.",
            |q| q.pending,
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for q in queues {
            if let Some(v) = get(q) {
                let _ = writeln!(out, "{name}{{queue=\"{}\"}} {v}", esc(&q.queue));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP lar_worker_step_duration_seconds Step durations by node kind."
    );
    let _ = writeln!(out, "# TYPE lar_worker_step_duration_seconds histogram");
    if let Ok(m) = steps.by_kind.lock() {
        for (kind, h) in m.iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "lar_worker_step_duration_seconds_bucket{{kind=\"{}\",le=\"{b}\"}} {}",
                    esc(kind),
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "lar_worker_step_duration_seconds_bucket{{kind=\"{}\",le=\"+Inf\"}} {}",
                esc(kind),
                h.count
            );
            let _ = writeln!(
                out,
                "lar_worker_step_duration_seconds_sum{{kind=\"{}\"}} {}",
                esc(kind),
                h.sum
            );
            let _ = writeln!(
                out,
                "lar_worker_step_duration_seconds_count{{kind=\"{}\"}} {}",
                esc(kind),
                h.count
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP lar_worker_llm_tokens_total LLM tokens spent, by model."
    );
    let _ = writeln!(out, "# TYPE lar_worker_llm_tokens_total counter");
    if let Ok(t) = steps.tokens.lock() {
        for (model, n) in t.iter() {
            let _ = writeln!(
                out,
                "lar_worker_llm_tokens_total{{model=\"{}\"}} {n}",
                esc(model)
            );
        }
    }
    let _ = writeln!(out, "# HELP lar_worker_build_info Build information.");
    let _ = writeln!(out, "# TYPE lar_worker_build_info gauge");
    let _ = writeln!(
        out,
        "lar_worker_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    out
}
