//! External-program tools: argv (never a shell), the named inputs as one JSON object on stdin,
//! one JSON value on stdout. The process runs in its own process group so a timeout kills the
//! whole tree, and the HMAC secret is removed from its environment.

use super::{ToolContext, ToolFailure};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Stdout beyond this is refused (a runaway tool must not exhaust memory).
const MAX_STDOUT: usize = 16 * 1024 * 1024;
/// How much of stderr is kept for `last_error` (characters), and how many bytes of its end are
/// kept while it is read to its end.
const STDERR_TAIL: usize = 2000;
const STDERR_KEEP: usize = 16 * 1024;
/// How long the pipes are read after the tool exited and its group was killed.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Stdout went past [`MAX_STDOUT`].
struct Overflow;

/// Reads `r` to its end into `buf`; `true` (and stops) once `buf` holds more than `cap`.
async fn read_capped(r: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, cap: usize) -> bool {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > cap {
                    return true;
                }
            }
        }
    }
}

/// Reads `r` to its end, keeping only about its last `keep` bytes in `buf`.
async fn read_tail(r: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, keep: usize) {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * keep {
                    buf.drain(..buf.len() - keep);
                }
            }
        }
    }
}
/// Environment variables a tool must never see.
const SCRUBBED_ENV: &[&str] = &["HMAC_SECRET", "LAR_WORKER_SECRET"];

pub struct CommandCall<'a> {
    pub tool: &'a str,
    pub argv: &'a [String],
    pub timeout: Duration,
    pub env: &'a BTreeMap<String, crate::net::secret::ValueSpec>,
    pub cwd: Option<&'a PathBuf>,
}

/// Runs the program and parses its answer.
pub async fn run_command(
    call: CommandCall<'_>,
    inputs: &Map<String, Value>,
    ctx: &ToolContext,
) -> Result<Value, ToolFailure> {
    let tool = call.tool;
    let Some((program, args)) = call.argv.split_first() else {
        return Err(ToolFailure(format!("tool '{tool}': empty command")));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env("LAR_JOB_ID", &ctx.job_id)
        .env("LAR_RUN_ID", &ctx.run_id)
        .env("LAR_STEP", ctx.step.to_string())
        .env("LAR_IDEMPOTENCY_KEY", ctx.idempotency_key());
    // Neither the signing key nor the secrets the graphs read (provider API keys, header
    // tokens) reach a tool unless its own `env` table grants one by name.
    for name in SCRUBBED_ENV {
        cmd.env_remove(name);
    }
    for name in crate::net::secret::graph_secret_env_vars() {
        cmd.env_remove(name);
    }
    for (name, value) in call.env {
        let value = value
            .resolve()
            .map_err(|e| ToolFailure(format!("tool '{tool}': env {name}: {e}")))?;
        cmd.env(name, value);
    }
    if let Some(dir) = call.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ToolFailure(format!("tool '{tool}': cannot start '{program}': {e}")))?;
    let pid = child.id();

    let input_bytes = serde_json::to_vec(inputs).unwrap_or_else(|_| b"{}".to_vec());
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    // The tool's exit ends the call, not its pipes reaching their end: a child it left in the
    // background may hold them open, and stderr is read to its end (keeping the tail) so a
    // chatty tool never blocks on a full pipe.
    let finished = {
        let write = async {
            if let Some(mut s) = stdin.take() {
                // A tool that exits without reading its input is not an error by itself.
                let _ = s.write_all(&input_bytes).await;
                let _ = s.shutdown().await;
            }
        };
        let read_out = async {
            match stdout.as_mut() {
                Some(s) => read_capped(s, &mut out, MAX_STDOUT).await,
                None => false,
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                read_tail(s, &mut err, STDERR_KEEP).await;
            }
        };
        tokio::pin!(write, read_out, read_err);
        let run = async {
            let (mut wrote, mut out_done, mut err_done) = (false, false, false);
            let status = loop {
                tokio::select! {
                    status = child.wait() => break Ok(status),
                    overflow = &mut read_out, if !out_done => {
                        out_done = true;
                        if overflow {
                            break Err(Overflow);
                        }
                    }
                    () = &mut read_err, if !err_done => err_done = true,
                    () = &mut write, if !wrote => wrote = true,
                }
            };
            if status.is_ok() {
                // Children the tool left behind in its group go too; then what the pipes
                // still hold is read, briefly (one that escaped the group cannot hold us).
                kill_group(pid);
                let _ = tokio::time::timeout(DRAIN_GRACE, async {
                    if !out_done {
                        (&mut read_out).await;
                    }
                    if !err_done {
                        (&mut read_err).await;
                    }
                })
                .await;
            }
            status
        };
        tokio::time::timeout(call.timeout, run).await
    };
    let status = match finished {
        Ok(Ok(status)) => status,
        Ok(Err(Overflow)) => {
            kill_group(pid);
            return Err(ToolFailure(format!(
                "tool '{tool}': wrote more than {MAX_STDOUT} bytes to stdout (process group killed){}",
                stderr_tail(&err)
            )));
        }
        Err(_) => {
            kill_group(pid);
            return Err(ToolFailure(format!(
                "tool '{tool}': timed out after {} ms (process group killed)",
                call.timeout.as_millis()
            )));
        }
    };
    let tail = stderr_tail(&err);
    let status = status.map_err(|e| ToolFailure(format!("tool '{tool}': wait failed: {e}")))?;
    if !status.success() {
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".to_string(),
        };
        return Err(ToolFailure(format!("tool '{tool}': {how}{tail}")));
    }
    if out.len() > MAX_STDOUT {
        return Err(ToolFailure(format!(
            "tool '{tool}': wrote more than {MAX_STDOUT} bytes to stdout{tail}"
        )));
    }
    serde_json::from_slice(&out).map_err(|e| {
        ToolFailure(format!(
            "tool '{tool}': stdout is not one JSON value ({e}){tail}"
        ))
    })
}

/// The end of what the tool wrote to stderr, for `last_error`, with every graph secret value
/// redacted (a tool inherits the worker's environment, and a failing one may print it).
fn stderr_tail(err: &[u8]) -> String {
    let text = crate::net::secret::redact_graph_secrets(&String::from_utf8_lossy(err));
    let text = text.trim_end();
    if text.is_empty() {
        return String::new();
    }
    let start = text
        .char_indices()
        .rev()
        .nth(STDERR_TAIL.saturating_sub(1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    format!("; stderr: {}", &text[start..])
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group we created with
        // process_group(0); it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}
