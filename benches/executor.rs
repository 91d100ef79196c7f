//! The execution spine per step: a 10-node graph of set, router and registered Rust tool nodes
//! (every node runs once per run), built in-process.
//!
//! - `in_memory`: the run with its step records, no file.
//! - `chained`: plus every record chained into the run's log and the log signed, no file
//!   (what a daemon's job does per step besides its checkpoint and the file write).
//! - `signed_log/fsync_off`: plus the chained records, the signed log, written atomically.
//! - `signed_log/fsync_on`: the same with the file and its directory fsynced.
//!
//! Throughput is in steps (10 per run): criterion's time is per run, divide by 10 for a step.
//! Reference (Lár 2.1.0): ~22 µs/step without a file, ~110 µs/step with its signed log.
//!
//! Group `executor` measures wall-clock time. Group `executor_cpu` measures the same runs in
//! CPU time of the (only) thread, which stays meaningful on a loaded machine; it leaves out the
//! time spent waiting for the disk, so read `fsync_on` from the wall-clock group.
//! `cargo bench --bench executor -- --quick executor/` runs the wall-clock group only.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use lar_worker::audit::{RunLog, Secret};
use lar_worker::exec::{Run, StepEnv};
use lar_worker::graph::load::{parse_graph, Syntax};
use lar_worker::graph::Graph;
use lar_worker::job::{log_header, outcome_of, write_run_log, AuditSettings};
use lar_worker::tools::Registry;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const GRAPH: &str = r#"
name  = "bench10"
entry = "received"

[[nodes]]
id    = "received"
type  = "set"
key   = "status"
value = "received"
next  = "copy"

[[nodes]]
id    = "copy"
type  = "set"
key   = "label"
value = "{text}"
next  = "route"

[[nodes]]
id      = "route"
type    = "router"
on      = "kind"
routes  = { sum = "sum" }
default = "sum"

[[nodes]]
id     = "sum"
type   = "tool"
tool   = "sum_numbers"
inputs = ["numbers"]
output = "total"
next   = "upper"

[[nodes]]
id     = "upper"
type   = "tool"
tool   = "upper_text"
inputs = ["text"]
output = "shout"
next   = "digest_total"

[[nodes]]
id     = "digest_total"
type   = "tool"
tool   = "digest"
inputs = ["total"]
output = "d1"
next   = "check"

[[nodes]]
id     = "check"
type   = "router"
on     = "status"
routes = { received = "merge" }

[[nodes]]
id     = "merge"
type   = "tool"
tool   = "echo"
inputs = ["d1", "shout"]
next   = "digest_text"

[[nodes]]
id     = "digest_text"
type   = "tool"
tool   = "digest"
inputs = ["shout"]
output = "d2"
next   = "done"

[[nodes]]
id    = "done"
type  = "set"
key   = "status"
value = "done"
"#;

const STEPS: u64 = 10;
const RUN_ID: &str = "00000000-0000-4000-8000-00000000be9c";

fn graph(registry: &Registry) -> Arc<Graph> {
    let g = parse_graph(
        GRAPH.as_bytes(),
        Syntax::Toml,
        Path::new("bench10.toml"),
        "bench10",
        registry,
    )
    .unwrap_or_else(|e| panic!("bench graph: {e}"));
    assert_eq!(g.nodes.len(), STEPS as usize);
    Arc::new(g)
}

fn input() -> Map<String, Value> {
    match json!({"kind": "sum", "numbers": [1, 2, 3, 4.5], "text": "hello lár", "job": {"id": 7}})
    {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// One run, records kept in memory.
async fn run_in_memory(
    graph: &Arc<Graph>,
    registry: &Registry,
    input: Map<String, Value>,
) -> usize {
    let mut run = Run::new(Arc::clone(graph), "job-bench", RUN_ID, input);
    let env = StepEnv { registry };
    let mut records = Vec::with_capacity(STEPS as usize);
    while let Some(rec) = run.step(&env).await {
        records.push(rec);
    }
    records.len()
}

/// One run with every record chained into its log.
async fn chained_run(
    graph: &Arc<Graph>,
    registry: &Registry,
    input: Map<String, Value>,
    secret: Option<&Secret>,
) -> (Run, RunLog) {
    let mut run = Run::new(Arc::clone(graph), "job-bench", RUN_ID, input);
    let mut log = RunLog::new(log_header(&run, None));
    let env = StepEnv { registry };
    while let Some(rec) = run.step(&env).await {
        log.append(rec, secret);
    }
    (run, log)
}

/// One run, every record chained into the log and the log signed, in memory.
async fn run_chained(
    graph: &Arc<Graph>,
    registry: &Registry,
    input: Map<String, Value>,
    secret: &Secret,
) -> usize {
    let (run, log) = chained_run(graph, registry, input, Some(secret)).await;
    let signed = log.sign(&outcome_of(run.status()), Some(secret));
    black_box(signed.file_bytes.len());
    log.len()
}

/// One run, every record chained into the log, then the signed log written.
async fn run_with_log(
    graph: &Arc<Graph>,
    registry: &Registry,
    input: Map<String, Value>,
    audit: &AuditSettings,
) -> usize {
    let (run, log) = chained_run(graph, registry, input, audit.secret.as_ref()).await;
    write_run_log(&log, run.status(), audit).unwrap_or_else(|e| panic!("write log: {e}"));
    log.len()
}

/// CPU time of the calling thread (the current-thread runtime runs everything on it).
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID is always
    // available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WallTime.formatter()
    }
}

fn bench_wall(c: &mut Criterion) {
    bench(c, "executor");
}

fn bench_cpu(c: &mut Criterion<ThreadCpuTime>) {
    bench(c, "executor_cpu");
}

fn bench<M: Measurement<Value = Duration> + 'static>(c: &mut Criterion<M>, group_name: &str) {
    let registry = Registry::with_builtins();
    let graph = graph(&registry);
    let input = input();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));

    // Sanity: every node runs, the run completes.
    assert_eq!(
        rt.block_on(run_in_memory(&graph, &registry, input.clone())),
        STEPS as usize
    );

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(STEPS));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));

    group.bench_function("in_memory", |b| {
        b.iter_batched(
            || input.clone(),
            |input| black_box(rt.block_on(run_in_memory(&graph, &registry, input))),
            BatchSize::SmallInput,
        )
    });

    let dir = tempfile::TempDir::new().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let secret = Secret::new("bench-secret").unwrap_or_else(|e| panic!("{e}"));
    group.bench_function("chained", |b| {
        b.iter_batched(
            || input.clone(),
            |input| black_box(rt.block_on(run_chained(&graph, &registry, input, &secret))),
            BatchSize::SmallInput,
        )
    });
    for durable in [false, true] {
        let audit = AuditSettings {
            log_dir: dir.path().to_path_buf(),
            secret: Some(secret.clone()),
            durable,
            writer: None,
        };
        assert_eq!(
            rt.block_on(run_with_log(&graph, &registry, input.clone(), &audit)),
            STEPS as usize
        );
        let name = if durable { "fsync_on" } else { "fsync_off" };
        // An fsynced run takes milliseconds: fewer samples keep the bench short.
        group.sample_size(if durable { 20 } else { 100 });
        let log_path = dir.path().join(format!("run_{RUN_ID}.json"));
        group.bench_function(BenchmarkId::new("signed_log", name), |b| {
            // Every run writes a new file, as in production: the previous one is removed
            // outside the measurement (ext4 flushes data on a rename over an existing file,
            // which a fresh run id never does).
            b.iter_batched(
                || {
                    let _ = std::fs::remove_file(&log_path);
                    input.clone()
                },
                |input| black_box(rt.block_on(run_with_log(&graph, &registry, input, &audit))),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    // The written log verifies.
    let log = dir.path().join(format!("run_{RUN_ID}.json"));
    let verdict = lar_worker::audit::verify_file(&log, &secret);
    assert!(verdict.is_valid(), "{verdict:?}");
}

criterion_group!(wall, bench_wall);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_cpu
}
criterion_main!(wall, cpu);
