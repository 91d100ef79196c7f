//! Three ways the AMQP backend failed in production, each against a real RabbitMQ and real
//! worker processes (see `tests/amqp_common` for the broker, the names and the daemon):
//!
//! * a poison job that kills every worker running it is dead-lettered after
//!   `worker.max_recoveries`, and the other jobs and the replicas are unharmed;
//! * rolling restarts of the only replica during a long job on a quorum queue with a
//!   `delivery_limit` cost the job no delivery: it completes once, nothing dead-lettered;
//! * a job longer than the broker's `consumer_timeout` is neither cut off nor run twice.

mod amqp_common;

use amqp_common::*;
use lar_worker::config::AmqpQueueType;
use lar_worker::queue::prelude::*;
use lar_worker::queue::QueueNames;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A graph of `steps` tool steps; each step runs `tool.py` once (it appends `<seq> <step>` to
/// `steps.log` in `files`, sleeps `secs`, and, for a job with `"poison": true`, kills the
/// worker that runs it with `kill -9 $PPID`, as `os.kill(os.getppid(), SIGKILL)`).
fn steps_graph(files: &Path, steps: usize, secs: f64) -> PathBuf {
    let tool = files.join("tool.py");
    std::fs::write(
        &tool,
        format!(
            "import json, os, signal, sys, time\njob = json.load(sys.stdin)\n\
             if job.get(\"poison\"):\n    os.kill(os.getppid(), signal.SIGKILL)\n    time.sleep(30)\n\
             with open({log:?}, \"a\") as f:\n    f.write(\"%s %s\\n\" % (job.get(\"seq\"), sys.argv[1]))\n\
             time.sleep({secs})\njson.dump({{\"ok\": True}}, sys.stdout)\n",
            log = files.join("steps.log").display().to_string(),
        ),
    )
    .expect("write the tool");
    let mut toml = String::from("name = \"steps\"\nentry = \"s0\"\n\n");
    for i in 0..steps {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"s{i}\"\ntype = \"tool\"\ntool = \"t{i}\"\ninputs = [\"seq\", \"poison\"]\n\
             output = \"out{i}\"\n{next}\n",
            next = if i + 1 < steps {
                format!("next = \"s{}\"\n", i + 1)
            } else {
                String::new()
            }
        ));
    }
    for i in 0..steps {
        toml.push_str(&format!(
            "[tools.t{i}]\ncommand = [\"python3\", {tool}, \"{i}\"]\ntimeout_ms = 60000\n\n",
            tool = toml_str(&tool.display().to_string())
        ));
    }
    let graph = files.join("steps.toml");
    std::fs::write(&graph, toml).expect("write the graph");
    graph
}

/// The lines of `steps.log`: one per step run.
fn step_lines(files: &Path) -> Vec<String> {
    std::fs::read_to_string(files.join("steps.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn job(seq: usize, poison: bool) -> Vec<u8> {
    json!({"seq": seq, "poison": poison})
        .to_string()
        .into_bytes()
}

/// The final results of `q`, by `seq`; panics on a second result for a job.
async fn results_by_seq(b: &impl Admin, q: &QueueNames) -> std::collections::BTreeMap<u64, Value> {
    let mut seen = std::collections::BTreeMap::new();
    for r in b.results(q, 1000, false).await.expect("results") {
        let v: Value = serde_json::from_slice(&r).expect("JSON");
        let seq = v["seq"].as_u64().expect("seq");
        assert!(seen.insert(seq, v).is_none(), "job {seq} has two results");
    }
    seen
}

/// Keeps `n` replicas running, starting again each one that exits, until dropped.
struct Supervisor {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicUsize>,
    replicas: Arc<Mutex<Vec<Daemon>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn start(n: usize, spawn: impl Fn() -> Daemon + Send + 'static) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicUsize::new(0));
        let replicas = Arc::new(Mutex::new((0..n).map(|_| spawn()).collect::<Vec<_>>()));
        let thread = {
            let (stop, restarts, replicas) = (stop.clone(), restarts.clone(), replicas.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    {
                        let mut rs = replicas.lock().unwrap();
                        for r in rs.iter_mut() {
                            if r.child.try_wait().expect("wait").is_some() {
                                eprintln!("--- replica exited; its log ---\n{}", r.log());
                                *r = spawn();
                                restarts.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Supervisor {
            stop,
            restarts,
            replicas,
            thread: Some(thread),
        }
    }

    /// Whether every replica is running now.
    fn all_up(&self) -> bool {
        self.replicas
            .lock()
            .unwrap()
            .iter_mut()
            .all(|r| r.child.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Dropping the daemons kills them.
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A job whose tool kills its worker (`kill -9 $PPID`, as `os.kill(os.getppid(), SIGKILL)`), against two replicas a supervisor
/// starts again: every delivery of it after a death is a recovery, counted in the checkpoint
/// store (SQLite, shared by the replicas), and after `max_recoveries` (3) it is dead-lettered
/// with the reason instead of killing a fourth worker. The 20 other jobs complete once each,
/// and the replicas are up at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_lettered_after_max_recoveries() {
    let _shared = BROKER.read().await;
    let names = Names::new("poison");
    let q = names.q.clone();
    let files = tempfile::tempdir().expect("a temp dir");
    let graph = steps_graph(files.path(), 2, 0.05);
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    b.ensure_topology(&q).await.expect("topology");
    b.enqueue(&q, &job(999, true)).await.expect("enqueue");
    for i in 0..20 {
        b.enqueue(&q, &job(i, false)).await.expect("enqueue");
    }
    let store = format!(
        "checkpoint_store = {}",
        toml_str(&format!(
            "sqlite:{}",
            files.path().join("runs.db").display()
        ))
    );
    let spawn = {
        let (q, graph, store) = (q.clone(), graph.clone(), store.clone());
        move || {
            start(
                &q,
                Run {
                    graph: graph.clone(),
                    backend_extra: &store,
                    worker_extra: "drain_timeout_ms = 5000\nmax_recoveries = 3",
                    ..Run::bench(2, false)
                },
            )
        }
    };
    let sup = Supervisor::start(2, spawn);
    let dead = eventually(
        "the poison job's dead letter",
        Duration::from_secs(120),
        || async {
            let d = b.dead_letters(&q, 10).await.ok()?;
            (!d.is_empty()).then_some(d)
        },
    )
    .await;
    let start_wait = std::time::Instant::now();
    loop {
        let d = b.depth(&q).await.expect("depth");
        if d.results >= 20 {
            break;
        }
        assert!(
            start_wait.elapsed() < Duration::from_secs(120),
            "20 results: {d:?}, dead letters {:?}",
            b.dead_letters(&q, 30).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("died 3 times") && reason.contains("max_recoveries is 3"),
        "{reason}"
    );
    assert!(
        dead[0]["payload"]
            .as_str()
            .unwrap_or_default()
            .contains("999"),
        "{dead:?}"
    );
    let results = results_by_seq(&b, &q).await;
    assert_eq!(
        results.keys().copied().collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    for v in results.values() {
        assert_eq!(v["__lar_worker"]["status"], "completed", "{v}");
    }
    assert_eq!(
        sup.restarts.load(Ordering::SeqCst),
        3,
        "the poison job killed one worker per delivery, three times"
    );
    // Nothing is left to kill a replica: both stay up (the supervisor would count a fourth).
    let d = b.depth(&q).await.expect("depth");
    assert_eq!((d.ready, d.dead), (0, 1), "{d:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(sup.all_up(), "a replica died after the dead letter");
    assert_eq!(sup.restarts.load(Ordering::SeqCst), 3);
}

/// Five rolling restarts (SIGTERM, start again) of the only replica while a 20-step job
/// (~300 ms a step) runs on a quorum queue with `delivery_limit = 3`: each shutdown hands the
/// job back at a step boundary, which must not count as a delivery, so the job completes
/// exactly once, every step run once, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_do_not_dead_letter_a_healthy_job_on_a_quorum_queue() {
    let _shared = BROKER.read().await;
    let names = Names::new("rolling");
    let q = names.q.clone();
    let files = tempfile::tempdir().expect("a temp dir");
    let steps = 20;
    let graph = steps_graph(files.path(), steps, 0.3);
    let b = backend(
        lar_worker::queue::amqp::AmqpOptions {
            delivery_limit: Some(3),
            ..opts(AmqpQueueType::Quorum)
        },
        "observer",
    )
    .await;
    b.ensure_topology(&q).await.expect("topology");
    b.enqueue(&q, &job(7, false)).await.expect("enqueue");
    let backend_extra = format!(
        "queue_type = \"quorum\"\ndelivery_limit = 3\ncheckpoint_store = {}",
        toml_str(&format!(
            "sqlite:{}",
            files.path().join("runs.db").display()
        ))
    );
    let run = || Run {
        graph: graph.clone(),
        backend_extra: &backend_extra,
        worker_extra: "drain_timeout_ms = 10000",
        ..Run::bench(1, false)
    };
    let mut w = start(&q, run());
    for restart in 0..5 {
        let before = step_lines(files.path()).len();
        eventually(
            "the job to make progress",
            Duration::from_secs(60),
            || async { (step_lines(files.path()).len() >= before + 2).then_some(()) },
        )
        .await;
        w.sigterm();
        let status = w.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "restart {restart}: {}", w.log());
        eprintln!("--- worker log before restart {restart} ---\n{}", w.log());
        let d = b.depth(&q).await.expect("depth");
        assert_eq!(d.dead, 0, "restart {restart}: dead-lettered\n{}", w.log());
        w = start(&q, run());
    }
    eventually("the result", Duration::from_secs(120), || async {
        (b.depth(&q).await.ok()?.results >= 1).then_some(())
    })
    .await;
    let results = results_by_seq(&b, &q).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[&7]["__lar_worker"]["status"], "completed");
    let d = b.depth(&q).await.expect("depth");
    assert_eq!((d.ready, d.dead, d.results), (0, 0, 1), "{d:?}");
    let mut lines = step_lines(files.path());
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), steps, "every step ran: {lines:?}");
    assert_eq!(
        step_lines(files.path()).len(),
        steps,
        "a step ran twice: {:?}",
        step_lines(files.path())
    );
}

/// RabbitMQ settings for the length of a test, put back on drop (on a panic too). Only
/// channels opened meanwhile take them (a channel reads them when it opens), so the guard is
/// dropped as soon as the worker consumes: the broker is shared with other tests.
struct BrokerEnv {
    previous: Vec<(&'static str, String)>,
}

fn rabbit_eval(expr: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", expr])
        .output()
        .expect("rabbitmqctl eval");
    assert!(out.status.success(), "rabbitmqctl eval {expr}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl BrokerEnv {
    fn set(settings: &[(&'static str, u64)]) -> BrokerEnv {
        let mut env = BrokerEnv {
            previous: Vec::new(),
        };
        for (key, value) in settings {
            let got = rabbit_eval(&format!("application:get_env(rabbit, {key})."));
            env.previous.push((key, got));
            rabbit_eval(&format!("application:set_env(rabbit, {key}, {value})."));
        }
        env
    }
}

impl Drop for BrokerEnv {
    fn drop(&mut self) {
        for (key, got) in self.previous.drain(..).rev() {
            // `{ok,V}` or `undefined`.
            let expr = match got.strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')) {
                Some(v) => format!("application:set_env(rabbit, {key}, {v})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            let ok = Command::new("rabbitmqctl")
                .args(["-q", "eval", &expr])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("could not restore rabbit {key}: run `rabbitmqctl eval '{expr}'`");
            }
        }
    }
}

/// A job of three ~4 s steps, on a broker whose `consumer_timeout` is 3 s (checked every
/// second): without a way around it the broker closes the channel under the run ~3 s in and
/// redelivers the job, which runs a step again beside the first run. With a checkpoint store
/// the worker takes the claim into the store after `detach_after_ms` (1 s) and acks the
/// delivery, so the job completes once and every step runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_consumer_timeout_completes_once() {
    if let Err(why) = local_rabbitmqctl() {
        if skip::skip_or_fail(
            "a_job_longer_than_the_consumer_timeout_completes_once",
            &why,
        ) {
            return;
        }
    }
    let _exclusive = BROKER.write().await;
    let names = Names::new("timeout");
    let q = names.q.clone();
    let files = tempfile::tempdir().expect("a temp dir");
    let steps = 2;
    let graph = steps_graph(files.path(), steps, 3.5);
    let b = backend(opts(AmqpQueueType::Classic), "observer").await;
    b.ensure_topology(&q).await.expect("topology");
    let backend_extra = format!(
        "checkpoint_store = {}\ndetach_after_ms = 1000",
        toml_str(&format!(
            "sqlite:{}",
            files.path().join("runs.db").display()
        ))
    );
    let env = BrokerEnv::set(&[("consumer_timeout", 3000), ("channel_tick_interval", 1000)]);
    let w = start(
        &q,
        Run {
            graph: graph.clone(),
            backend_extra: &backend_extra,
            worker_extra: "drain_timeout_ms = 5000\nlease_ms = 3000",
            ..Run::bench(1, false)
        },
    );
    eventually("the worker to consume", Duration::from_secs(30), || async {
        w.log().contains("amqp consuming").then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    b.enqueue(&q, &job(1, false)).await.expect("enqueue");
    eventually("the result", Duration::from_secs(30), || async {
        (b.depth(&q).await.ok()?.results >= 1).then_some(())
    })
    .await;
    let took = started.elapsed();
    drop(env);
    let results = results_by_seq(&b, &q).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[&1]["__lar_worker"]["status"], "completed");
    assert!(took > Duration::from_secs(7), "the job ran {took:?}");
    let lines = step_lines(files.path());
    assert_eq!(
        lines,
        (0..steps).map(|i| format!("1 {i}")).collect::<Vec<_>>(),
        "each step ran once\n{}",
        w.log()
    );
    let d = b.depth(&q).await.expect("depth");
    assert_eq!((d.ready, d.dead), (0, 0), "{d:?}");
    eprintln!(
        "a {took:?} job past a 3 s consumer_timeout: one run\n{}",
        w.log()
    );
}
