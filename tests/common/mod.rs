//! Helpers shared by the integration tests: paths, the binary, temp graphs, running a graph
//! step by step in-process.
#![allow(dead_code)]

use lar_worker::exec::{Run, StepEnv, StepRecord};
use lar_worker::graph::{load_graph_file, Graph, GraphErrors};
use lar_worker::tools::Registry;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// The secret the tests sign with (also the reference logs' secret).
pub const SECRET: &str = "reference-secret";

/// The crate root (the worktree).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `shared/` lives beside the repository (CI clones the repo into a sibling folder of it).
pub fn shared_dir() -> PathBuf {
    manifest_dir().join("..").join("shared")
}

pub fn reference_logs_dir() -> PathBuf {
    shared_dir().join("lar").join("reference_logs")
}

/// The `lar-worker` binary built for this test run.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lar-worker"));
    cmd.current_dir(manifest_dir())
        .env_remove("HMAC_SECRET")
        .env_remove("LAR_WORKER_SECRET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("LAR_LOG_DIR")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the binary and returns (exit code, stdout, stderr); a signal death is a test failure.
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out: Output = cmd.output().expect("the lar-worker binary starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal; stderr: {stderr}"));
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked:\n{stderr}"
    );
    (code, stdout, stderr)
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a test file");
    p
}

/// A python3 script; returns its absolute path.
pub fn python_tool(dir: &Path, name: &str, body: &str) -> PathBuf {
    write(dir, name, body)
}

/// Loads a TOML graph written to `dir/name`.
pub fn try_graph(
    dir: &Path,
    name: &str,
    toml: &str,
    registry: &Registry,
) -> Result<Graph, GraphErrors> {
    let path = write(dir, name, toml);
    load_graph_file(&path, registry)
}

/// Loads a TOML graph that must be valid.
pub fn graph(dir: &Path, toml: &str, registry: &Registry) -> Arc<Graph> {
    match try_graph(dir, "graph.toml", toml, registry) {
        Ok(g) => Arc::new(g),
        Err(e) => panic!("test graph is invalid:\n{e}"),
    }
}

pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Steps a run until it stops; returns every record.
pub async fn run_to_end(run: &mut Run, registry: &Registry) -> Vec<StepRecord> {
    let env = StepEnv { registry };
    let mut out = Vec::new();
    while let Some(rec) = run.step(&env).await {
        out.push(rec);
        assert!(out.len() < 10_000, "runaway run");
    }
    out
}

/// A new run with a fixed job and run id.
pub fn new_run(graph: &Arc<Graph>, input: Value) -> Run {
    Run::new(
        Arc::clone(graph),
        "job-1",
        "00000000-0000-4000-8000-000000000001",
        obj(input),
    )
}

/// The node ids of the records, in order.
pub fn node_ids(recs: &[StepRecord]) -> Vec<String> {
    recs.iter().map(|r| r.node_id().to_string()).collect()
}

/// The single `run_*.json` in a log directory.
pub fn only_log(dir: &Path) -> PathBuf {
    let logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("log dir exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run_") && n.ends_with(".json"))
        })
        .collect();
    assert_eq!(
        logs.len(),
        1,
        "expected one run log in {}: {logs:?}",
        dir.display()
    );
    logs.into_iter().next().expect("one log")
}

/// Runs `python3 -c code args...` and returns (exit code, stdout, stderr).
pub fn python(code: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3 runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Deletes every key of the Redis at `url` that starts with `prefix` (a test's queue names).
pub async fn delete_redis_keys(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
