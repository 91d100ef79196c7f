//! End-to-end daemon benchmark on the local RabbitMQ: preloads N jobs of the 5-step bench graph
//! (`graphs/bench.toml`) with pipelined publisher confirms, runs ONE worker process (manual
//! acks after confirmed results, signed and fsynced audit logs), and reports jobs/s (first to
//! last result), start-up time, CPU ms per job and peak RSS, then p50/p99 latency with one job
//! in flight (a `reply_to` round trip). Once per queue type: classic, then quorum.
//!
//! `cargo bench --bench e2e_amqp` (env: BENCH_N=10000, BENCH_CONCURRENCY=256, BENCH_FSYNC=1,
//! BENCH_LAT_M=200, BENCH_QUEUE_TYPES=classic,quorum, AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f,
//! BENCH_CHECKPOINT_STORE=redis://127.0.0.1:6379/0 to checkpoint every step there).
//! Uses unique queue names; deletes them at the end.

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use lar_worker::queue::amqp::delete_topology;
use lar_worker::queue::QueueNames;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn job(i: u64) -> String {
    let kind = if i.is_multiple_of(2) { "sum" } else { "text" };
    let start = i % 7;
    let numbers: Vec<u64> = (start..start + 10).collect();
    serde_json::json!({"job_id": i, "kind": kind, "numbers": numbers, "text": format!("hello agent job {i}")}).to_string()
}

/// utime+stime in ms and VmHWM in kB of a live process.
fn proc_usage(pid: u32) -> (f64, u64) {
    let tick = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let u: f64 = rest.get(11)?.parse().ok()?;
            let st: f64 = rest.get(12)?.parse().ok()?;
            Some((u + st) / tick * 1000.0)
        })
        .unwrap_or(0.0);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    (cpu, hwm)
}

async fn count(conn: &Connection, queue: &str) -> Res<u64> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = ch.close(200, "ok").await;
    Ok(u64::from(q.message_count()))
}

/// Returns the run's temporary directory: it is deleted only after every queue type ran, since
/// on ext4 without a journal, creating files right after deleting thousands slows every create
/// (`recently_deleted`) and would bill the next run for this one's clean-up.
async fn bench_one(url: &str, queue_type: &str) -> Res<tempfile::TempDir> {
    let n: u64 = env_or("BENCH_N", 10_000);
    // A job here waits on three disk flushes it cannot skip (its log's bytes, its log's name,
    // the broker's copy of the result) while its CPU work takes a fraction of a millisecond:
    // with 64 in flight the worker idles half the time (4.5k jobs/s on a quorum queue); with
    // 256 the flushes are shared by more jobs and the machine's two cores are the limit.
    let conc: usize = env_or("BENCH_CONCURRENCY", 256);
    let fsync: u8 = env_or("BENCH_FSYNC", 1);
    let lat_m: usize = env_or("BENCH_LAT_M", 200);
    let store = std::env::var("BENCH_CHECKPOINT_STORE")
        .map(|u| format!("checkpoint_store = {u:?}\n"))
        .unwrap_or_default();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let names = QueueNames {
        jobs: format!("bench-{tag}:jobs"),
        results: format!("bench-{tag}:results"),
    };
    let dir = tempfile::tempdir()?;
    let log_dir = dir.path().join("audit");
    let graph = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml");
    let cfg = dir.path().join("workers.toml");
    std::fs::write(
        &cfg,
        format!(
            "[worker]\nconcurrency = {conc}\nlog_dir = {log:?}\nfsync = {fs}\n\n[backend]\nkind = \"amqp\"\nurl = {url:?}\n\
             queue_type = {queue_type:?}\n{store}\n[[queues]]\nname = {jobs:?}\nresults = {results:?}\ngraph = {graph:?}\n",
            log = log_dir.display().to_string(),
            fs = fsync == 1,
            jobs = names.jobs,
            results = names.results,
            graph = graph.display().to_string()
        ),
    )?;

    // The topology exactly as the worker declares it, then the jobs, confirms pipelined.
    {
        let cfg = lar_worker::config::Config::load(&cfg)?;
        let backend = lar_worker::wiring::connect_backend(&cfg, "bench-producer".into()).await?;
        drop(backend);
    }
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for i in chunk {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("{tag}-{i}").into());
            confirms.push(
                ch.basic_publish(
                    "",
                    &names.jobs,
                    BasicPublishOptions::default(),
                    job(*i).as_bytes(),
                    props,
                )
                .await?,
            );
        }
        for c in futures::future::join_all(confirms).await {
            if !c?.is_ack() {
                return Err("a job publish was nacked".into());
            }
        }
    }
    let publish_secs = t.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lar-worker"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("HMAC_SECRET", "bench-secret")
        .env("RUST_LOG", "warn")
        .env_remove("LAR_BACKEND_URL")
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut first = None;
    let mut peak_rss = 0;
    loop {
        let len = count(&conn, &names.results).await?;
        if len > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if len >= n {
            break;
        }
        peak_rss = peak_rss.max(proc_usage(pid).1);
        if started.elapsed() > Duration::from_secs(900) {
            return Err(format!("timed out with {len}/{n} results").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now();
    let (cpu_ms, hwm) = proc_usage(pid);
    peak_rss = peak_rss.max(hwm);
    let first = first.unwrap_or(done);
    let startup = first.duration_since(started);
    let secs = done.duration_since(first).as_secs_f64().max(1e-9);
    let logs = std::fs::read_dir(&log_dir)?.count();

    // Latency, one job in flight: reply_to round trips.
    let reply = ch
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut replies = ch
        .basic_consume(
            reply.name().as_str(),
            "bench-latency",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut lat = Vec::with_capacity(lat_m);
    for i in 0..lat_m as u64 {
        let t = Instant::now();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to(reply.name().clone())
            .with_correlation_id(format!("lat-{i}").into())
            .with_message_id(format!("{tag}-lat-{i}").into());
        ch.basic_publish(
            "",
            &names.jobs,
            BasicPublishOptions::default(),
            job(n + i).as_bytes(),
            props,
        )
        .await?
        .await?;
        let d = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await?
            .ok_or("the reply consumer ended")??;
        d.ack(BasicAckOptions::default()).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = child.wait()?;
    let _ = conn.close(200, "bench done").await;
    delete_topology(url, &names).await?;
    println!(
        "e2e amqp {queue_type}{}: N={n} concurrency={conc} fsync={} | {:.0} jobs/s | preload {:.0} msg/s | start-up {:.0} ms | \
         CPU {:.3} ms/job | peak RSS {:.1} MB | latency p50 {:.2} ms p99 {:.2} ms | {logs} audit logs | worker exit {status}",
        if store.is_empty() { "" } else { " + checkpoints" },
        fsync == 1,
        n as f64 / secs,
        n as f64 / publish_secs,
        startup.as_secs_f64() * 1000.0,
        cpu_ms / n as f64,
        peak_rss as f64 / 1024.0,
        pct(0.5),
        pct(0.99),
    );
    Ok(dir)
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e_amqp: benchmark");
        return Ok(());
    }
    // `cargo test --all-targets` runs bench binaries without --bench: build-check only.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e_amqp: skipped outside `cargo bench --bench e2e_amqp`");
        return Ok(());
    }
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let types = std::env::var("BENCH_QUEUE_TYPES").unwrap_or_else(|_| "classic,quorum".into());
    let mut dirs = Vec::new();
    for t in types.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        dirs.push(bench_one(&url, t).await?);
    }
    drop(dirs);
    Ok(())
}
