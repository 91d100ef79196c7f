//! End-to-end daemon benchmark on the local Redis: preloads N jobs of the 5-step bench graph
//! (`graphs/bench.toml`, the same work as shared/bench/agentgraph.py), runs ONE worker process
//! with signed, fsynced audit logs, and reports jobs/s (first to last result), start-up time,
//! CPU ms per job, peak RSS, then p50/p99 latency with one job in flight.
//!
//! `cargo bench --bench e2e` (env: BENCH_N=20000, BENCH_CONCURRENCY=256, BENCH_FSYNC=1,
//! BENCH_LAT_M=200, REDIS_URL=redis://127.0.0.1:6379/0). Uses unique key names; cleans up.

use redis::Commands;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Current RSS (kB) and open file descriptors of a live process, for the soak report.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e: benchmark");
        return Ok(());
    }
    // `cargo test --all-targets` runs bench binaries without --bench: build-check only.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: skipped outside `cargo bench --bench e2e`");
        return Ok(());
    }
    let n: u64 = env_or("BENCH_N", 20_000);
    let conc: usize = env_or("BENCH_CONCURRENCY", 256); // as benches/harness/workers.toml
    let fsync: u8 = env_or("BENCH_FSYNC", 1);
    let lat_m: usize = env_or("BENCH_LAT_M", 200);
    let checkpoints: u8 = env_or("BENCH_CHECKPOINTS", 1);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let client = redis::Client::open(url.as_str())?;
    let mut r = client.get_connection()?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (jobs, results) = (format!("bench-{tag}:jobs"), format!("bench-{tag}:results"));
    let dir = tempfile::tempdir()?;
    let log_dir = dir.path().join("audit");
    let graph = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml");
    let cfg = dir.path().join("workers.toml");
    std::fs::write(
        &cfg,
        format!(
            "[worker]\nconcurrency = {conc}\nlog_dir = {log:?}\nfsync = {fs}\ncheckpoints = {ck}\n\n[backend]\nkind = \"redis\"\nurl = {url:?}\n\n\
             [[queues]]\nname = {jobs:?}\nresults = {results:?}\ngraph = {graph:?}\n",
            log = log_dir.display().to_string(),
            fs = fsync == 1,
            ck = checkpoints == 1,
            graph = graph.display().to_string()
        ),
    )?;

    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.rpush(&jobs, job(i)).ignore();
    }
    let () = pipe.query(&mut r)?;

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lar-worker"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("HMAC_SECRET", "bench-secret")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut first = None;
    let mut peak_rss = 0;
    let mut soak_start = None;
    loop {
        let len: u64 = r.llen(&results)?;
        if len > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        // Soak samples: once 5 % of the jobs are done (warm), and at the end.
        if soak_start.is_none() && len >= n / 20 {
            soak_start = Some(rss_and_fds(pid));
        }
        if len >= n {
            break;
        }
        peak_rss = peak_rss.max(proc_usage(pid).1);
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("timed out with {len}/{n} results").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let done = Instant::now();
    let soak_end = rss_and_fds(pid);
    let (cpu_ms, hwm) = proc_usage(pid);
    peak_rss = peak_rss.max(hwm);
    let first = first.unwrap_or(done);
    let startup = first.duration_since(started);
    let secs = done.duration_since(first).as_secs_f64().max(1e-9);
    let logs = std::fs::read_dir(&log_dir)?.count();

    // Latency, one job in flight.
    let _: () = r.del(&results)?;
    let mut lat = Vec::with_capacity(lat_m);
    for i in 0..lat_m as u64 {
        let t = Instant::now();
        let _: () = r.rpush(&jobs, job(n + i))?;
        let _: Option<(String, String)> = r.blpop(&results, 10.0)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };

    send_sigterm(pid);
    let status = child.wait()?;
    if let Some((rss0, fd0)) = soak_start {
        println!(
            "soak: RSS {:.1} MB at 5 % of the jobs -> {:.1} MB at the end; open fds {fd0} -> {}",
            rss0 as f64 / 1024.0,
            soak_end.0 as f64 / 1024.0,
            soak_end.1
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&jobs)
        .arg(&results)
        .arg(format!("{jobs}:dead"))
        .arg(format!("{jobs}:epochs"))
        .arg(format!("{jobs}:workers"))
        .arg(format!("{jobs}:leases"))
        .arg(format!("{jobs}:claims"))
        .arg(format!("{jobs}:owners"))
        .query(&mut r)?;
    println!(
        "e2e redis: N={n} concurrency={conc} fsync={} checkpoints={} | {:.0} jobs/s | start-up {:.0} ms | CPU {:.3} ms/job | peak RSS {:.1} MB | \
         latency p50 {:.2} ms p99 {:.2} ms | {logs} audit logs | worker exit {status}",
        fsync == 1,
        checkpoints == 1,
        n as f64 / secs,
        startup.as_secs_f64() * 1000.0,
        cpu_ms / n as f64,
        peak_rss as f64 / 1024.0,
        pct(0.5),
        pct(0.99),
    );
    Ok(())
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
