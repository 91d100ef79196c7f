//! README promises about the signing secret, held end to end against the daemon (`lar-worker
//! run` on the embedded backend, jobs in and results out through the CLI): the secret never
//! shows in the daemon's debug log, in results or in dead letters, and a graph cannot send it.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lar-worker");

/// The daemon's secret in these tests: long and unlikely, so any text holding it is a leak.
const THE_SECRET: &str = "promise-hmac-7c41e9d2b0a5f318";

/// A canary that tools do inherit: shows an environment dump reached where it is looked for.
const CANARY: &str = "canary-inherited-3f9a";

/// A test directory with a workers.toml (embedded backend, one envelope queue `p:jobs` whose
/// graphs are `graphs`, each `name = file`) and the given extra files.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(graphs: &[(&str, &str)], files: &[(&str, &str)]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut table = Vec::new();
        for (name, text) in graphs {
            let file = format!("{name}.toml");
            std::fs::write(
                dir.path().join(&file),
                text.replace("$DIR", &dir.path().display().to_string()),
            )
            .unwrap();
            table.push(format!("{name} = \"{file}\""));
        }
        let config = dir.path().join("workers.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nconcurrency = 2\nlog_dir = \"audit\"\nfsync = false\n\
                 [worker.retry]\nattempts = 2\ninitial_backoff_ms = 50\nretry_failed_runs = true\n\
                 [backend]\nkind = \"embedded\"\npath = \"queue.db\"\n\
                 [[queues]]\nname = \"p:jobs\"\nresults = \"p:results\"\npayload = \"envelope\"\n\
                 graphs = {{ {} }}\n",
                table.join(", ")
            ),
        )
        .unwrap();
        Setup { dir, config }
    }

    /// The command with only the environment given here (and PATH, for python3), so what a
    /// tool inherits is small enough to be seen whole wherever it is printed.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HMAC_SECRET", THE_SECRET)
            .env("PROMISE_CANARY", CANARY)
            .current_dir(self.dir.path())
            .args(args)
            .arg("--config")
            .arg(&self.config);
        cmd
    }

    /// A CLI command that must succeed; its stdout and stderr together.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "`{}`: {text}", args.join(" "));
        text
    }

    /// `lar-worker run --exit-when-idle` at `RUST_LOG=debug`: runs every queued job (retries
    /// included) and exits; returns its stdout and stderr.
    fn run_daemon(&self) -> (String, String) {
        let (out_path, err_path) = (
            self.dir.path().join("daemon.out"),
            self.dir.path().join("daemon.err"),
        );
        let mut child = self
            .command(&["run", "--exit-when-idle"])
            .env("RUST_LOG", "debug")
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(90) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not go idle: {}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (out, err) = (
            std::fs::read_to_string(&out_path).unwrap(),
            std::fs::read_to_string(&err_path).unwrap(),
        );
        assert!(status.success(), "{status:?}: {err}");
        (out, err)
    }

    /// Every file the daemon wrote under the audit directory, as text.
    fn audit_texts(&self) -> Vec<(PathBuf, String)> {
        std::fs::read_dir(self.dir.path().join("audit"))
            .unwrap()
            .flatten()
            .map(|e| {
                let p = e.path();
                let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
                (p, text)
            })
            .collect()
    }
}

/// A local TCP listener that counts every connection made to it, reading what was sent and
/// closing it without an answer.
struct Recorder {
    port: u16,
    seen: Arc<AtomicUsize>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (Arc::clone(&seen), Arc::clone(&bytes));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                s.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf) {
                    b.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        });
        Recorder { port, seen, bytes }
    }

    fn connections(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }
}

/// Prints the tool's whole environment on stdout (the job completes with it in its state).
const ENV_TO_STDOUT: &str = r#"import json, os, sys
json.load(sys.stdin)
print(json.dumps({"env": dict(os.environ)}))
"#;

/// Prints the tool's whole environment on stderr between markers and fails (the run fails,
/// is retried, and is dead-lettered with the tool's stderr in its reason).
const ENV_TO_STDERR_AND_FAIL: &str = r#"import json, os, sys
json.load(sys.stdin)
sys.stderr.write("ENV-BEGIN " + json.dumps(dict(os.environ)) + " ENV-END")
sys.exit(1)
"#;

fn tool_graph(name: &str, script: &str) -> String {
    format!(
        "name = \"{name}\"\nentry = \"call\"\n\
         [[nodes]]\nid = \"call\"\ntype = \"tool\"\ntool = \"dump\"\noutput = \"out\"\n\
         [tools.dump]\ncommand = [\"python3\", \"$DIR/{script}\"]\ntimeout_ms = 20000\n"
    )
}

/// The HMAC secret reaches neither the daemon's log at `RUST_LOG=debug`, nor a result, nor a
/// dead letter, nor an audit file, nor what the CLI prints, even from tools that print their
/// whole environment, on stdout into a result and on stderr into a dead letter.
#[test]
fn the_secret_is_in_no_log_result_or_dead_letter() {
    let s = Setup::new(
        &[
            ("prints", &tool_graph("prints", "env_out.py")),
            ("fails", &tool_graph("fails", "env_err.py")),
        ],
        &[
            ("env_out.py", ENV_TO_STDOUT),
            ("env_err.py", ENV_TO_STDERR_AND_FAIL),
        ],
    );
    let mut seen = Vec::new();
    seen.push((
        "enqueue".to_string(),
        s.cli(&[
            "enqueue",
            r#"{"id":"prints-1","graph":"prints","input":{}}"#,
            r#"{"id":"fails-1","graph":"fails","input":{}}"#,
            r#"[1,2,3]"#,
        ]),
    ));
    let (out, err) = s.run_daemon();
    assert!(
        err.contains("DEBUG"),
        "the daemon logged at debug level:\n{err}"
    );
    seen.push(("daemon stdout".into(), out));
    seen.push(("daemon stderr".into(), err));
    let results = s.cli(&["results"]);
    let dead = s.cli(&["dead-letters", "list"]);
    let dead_one = s.cli(&["dead-letters", "show", "fails-1"]);
    let inspect = s.cli(&["inspect"]);

    // The dumps arrived whole where this test looks for the secret: the completed job's
    // result holds the tool's environment, and the dead letter its stderr, markers included.
    assert!(results.contains("\"completed\""), "{results}");
    assert!(
        results.contains(CANARY) && results.contains("LAR_IDEMPOTENCY_KEY"),
        "{results}"
    );
    assert!(results.contains("\"failed\""), "{results}");
    assert!(
        dead_one.contains("ENV-BEGIN") && dead_one.contains("ENV-END"),
        "the dead letter holds the tool's stderr whole: {dead_one}"
    );
    assert!(dead_one.contains(CANARY), "{dead_one}");
    assert_eq!(
        dead.lines().count(),
        2,
        "the failed run and the non-object message: {dead}"
    );

    seen.push(("results".into(), results));
    seen.push(("dead-letters list".into(), dead));
    seen.push(("dead-letters show".into(), dead_one));
    seen.push(("inspect".into(), inspect));
    for (path, text) in s.audit_texts() {
        seen.push((path.display().to_string(), text));
    }
    for (what, text) in &seen {
        assert!(
            !text.contains(THE_SECRET),
            "the HMAC secret is in {what}:\n{text}"
        );
    }
}

/// A graph whose http headers or LLM API keys resolve to the signing secret (`env:HMAC_SECRET`,
/// or a file holding the same key, as a credential file does) is refused when each call is
/// made, with the reason in `last_error`, and no request is sent: the listener they point at
/// sees no connection. A control call with another key, to another listener, is sent: the
/// daemon does make calls, and a listener does see them.
#[test]
fn a_graph_cannot_send_the_signing_secret() {
    let target = Recorder::start();
    let control = Recorder::start();
    let (t, c) = (target.port, control.port);
    let graph = format!(
        r#"
name = "leak"
entry = "h_env"

[providers.by_env]
base_url = "http://127.0.0.1:{t}/v1"
api_key_env = "HMAC_SECRET"
max_attempts = 1
timeout_ms = 3000

[providers.by_file]
base_url = "http://127.0.0.1:{t}/v1"
api_key_file = "hmac_copy"
max_attempts = 1
timeout_ms = 3000

[[nodes]]
id = "h_env"
type = "tool"
tool = "header_env"
output = "r1"
error = "e1"
next = "e1"
[[nodes]]
id = "e1"
type = "set"
key = "err_header_env"
value = "{{last_error}}"
next = "c1"
[[nodes]]
id = "c1"
type = "clear_error"
next = "h_file"

[[nodes]]
id = "h_file"
type = "tool"
tool = "header_file"
output = "r2"
error = "e2"
next = "e2"
[[nodes]]
id = "e2"
type = "set"
key = "err_header_file"
value = "{{last_error}}"
next = "c2"
[[nodes]]
id = "c2"
type = "clear_error"
next = "llm_env"

[[nodes]]
id = "llm_env"
type = "llm"
provider = "by_env"
model = "m"
prompt = "hello"
output = "a1"
error = "e3"
next = "e3"
[[nodes]]
id = "e3"
type = "set"
key = "err_llm_env"
value = "{{last_error}}"
next = "c3"
[[nodes]]
id = "c3"
type = "clear_error"
next = "llm_file"

[[nodes]]
id = "llm_file"
type = "llm"
provider = "by_file"
model = "m"
prompt = "hello"
output = "a2"
error = "e4"
next = "e4"
[[nodes]]
id = "e4"
type = "set"
key = "err_llm_file"
value = "{{last_error}}"
next = "c4"
[[nodes]]
id = "c4"
type = "clear_error"
next = "ctl"

[[nodes]]
id = "ctl"
type = "tool"
tool = "control"
output = "r5"
error = "e5"
next = "e5"
[[nodes]]
id = "e5"
type = "set"
key = "err_control"
value = "{{last_error}}"
next = "c5"
[[nodes]]
id = "c5"
type = "clear_error"

[tools.header_env]
http = {{ url = "http://127.0.0.1:{t}/a", headers = {{ Authorization = "env:HMAC_SECRET" }} }}
timeout_ms = 3000
[tools.header_file]
http = {{ url = "http://127.0.0.1:{t}/b", headers = {{ "X-Key" = "file:hmac_copy" }} }}
timeout_ms = 3000
[tools.control]
http = {{ url = "http://127.0.0.1:{c}/c", headers = {{ "X-Key" = "env:PROMISE_CANARY" }} }}
timeout_ms = 3000
"#
    );
    // `hmac_copy` holds the daemon's key, as the credential file would.
    let s = Setup::new(
        &[("leak", &graph)],
        &[("hmac_copy", &format!("{THE_SECRET}\n"))],
    );
    s.cli(&["enqueue", r#"{"id":"leak-1","graph":"leak","input":{}}"#]);
    let (_, err) = s.run_daemon();
    let results = s.cli(&["results"]);
    let result: serde_json::Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    let state = &result["state"];
    assert_eq!(result["status"], "completed", "{result}");

    assert_eq!(
        target.connections(),
        0,
        "a request went out with the secret: {:?}",
        target.received()
    );
    let refused = "holds the workers' HMAC secret, which is never sent anywhere";
    for (key, source) in [
        ("err_header_env", "env:HMAC_SECRET".to_string()),
        (
            "err_header_file",
            format!("file:{}", s.dir.path().join("hmac_copy").display()),
        ),
        ("err_llm_env", "env:HMAC_SECRET".to_string()),
        (
            "err_llm_file",
            format!("file:{}", s.dir.path().join("hmac_copy").display()),
        ),
    ] {
        let why = state[key].as_str().unwrap_or_default();
        assert!(
            why.contains(&format!("{source} {refused}")),
            "{key}: {why}\n{result}"
        );
    }
    // The control was sent (and failed on the listener's silence), with its own key.
    assert!(control.connections() >= 1, "{result}\n{err}");
    assert!(
        control.received().contains(CANARY),
        "{}",
        control.received()
    );
    assert!(state["err_control"].is_string(), "{result}");
    assert!(!results.contains(THE_SECRET) && !err.contains(THE_SECRET));
}
