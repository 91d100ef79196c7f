//! Operations: systemd units verify, sd_notify readiness/watchdog/stopping, /metrics counts
//! parsed by a real Prometheus parser, /ready following Redis away and back.

use redis::Commands;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lar-worker");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn graph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/bench.toml")
}

fn write_config(dir: &Path, redis_url: &str, queue: &str, admin: Option<u16>) -> PathBuf {
    let mut text = format!(
        "[worker]\nconcurrency = 4\nlog_dir = \"audit\"\nlease_ms = 5000\ndrain_timeout_ms = 3000\n\
         [backend]\nkind = \"redis\"\nurl = \"{redis_url}\"\n\
         [[queues]]\nname = \"{queue}\"\nresults = \"{queue}:out\"\ngraph = \"{}\"\n",
        graph().display()
    );
    if let Some(p) = admin {
        text.push_str(&format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n"));
    }
    let path = dir.join("workers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(config: &Path, extra: &[(&str, &str)]) -> Child {
    let mut c = Command::new(BIN);
    c.args(["run", "--config"])
        .arg(config)
        .env("HMAC_SECRET", "ops-secret")
        .env("RUST_LOG", "info");
    for (k, v) in extra {
        c.env(k, v);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn term(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    child.wait().unwrap()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // One write: the whole request in one segment, as real clients send it.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A connection to the shared local Redis.
fn local_redis() -> redis::Connection {
    redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Deletes every key of a test's queue.
fn forget_queue(r: &mut redis::Connection, queue: &str) {
    let keys: Vec<String> = r.keys(format!("{queue}*")).unwrap();
    if !keys.is_empty() {
        let _: () = r.del(keys).unwrap();
    }
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

struct Notify {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify {
            sock,
            _dir: dir,
            path,
        }
    }
    /// Messages received within `d`, each with its arrival time.
    fn collect(&self, d: Duration) -> Vec<(Instant, String)> {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < d {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        out
    }
}

#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&units).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".timer") {
            let text = std::fs::read_to_string(e.path())
                .unwrap()
                .replace("/usr/local/bin/lar-worker", BIN);
            std::fs::write(dir.path().join(&name), text).unwrap();
            names.push(name);
        }
    }
    assert!(
        names.iter().any(|n| n == "lar-worker@.service"),
        "{names:?}"
    );
    for n in &names {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(n))
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .expect("systemd-analyze (package systemd) is installed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{n}: {err}");
    }
    let unit = std::fs::read_to_string(units.join("lar-worker@.service")).unwrap();
    for needle in [
        "Type=notify",
        "LoadCredential=hmac_secret",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "WatchdogSec=",
        "TimeoutStopSec=32",
    ] {
        assert!(unit.contains(needle), "{needle}");
    }
}

#[test]
fn no_ready_while_the_broker_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("redis://127.0.0.1:{}/0", free_port()),
        "ops-down:jobs",
        None,
    );
    let n = Notify::new();
    let mut child = spawn(&config, &[("NOTIFY_SOCKET", n.path.to_str().unwrap())]);
    let msgs = n.collect(Duration::from_secs(3));
    let status = term(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(msgs.iter().all(|(_, m)| !m.contains("READY=1")), "{msgs:?}");
    assert!(
        status.success(),
        "a stop while waiting for the broker is clean"
    );
    assert!(
        err.contains("queue backend unreachable: not ready"),
        "{err}"
    );
}

#[test]
fn ready_watchdog_wedge_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("ops-{}:jobs", uuid::Uuid::new_v4().simple());
    let config = write_config(dir.path(), "redis://127.0.0.1:6379/0", &queue, None);

    // Healthy: READY after the checks, watchdog pings keep coming, STOPPING on SIGTERM.
    const WATCHDOG: Duration = Duration::from_millis(1500);
    let n = Notify::new();
    let usec = WATCHDOG.as_micros().to_string();
    let mut child = spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", n.path.to_str().unwrap()),
            ("WATCHDOG_USEC", &usec),
        ],
    );
    let msgs = n.collect(Duration::from_secs(4));
    let end = Instant::now();
    let ready = msgs
        .iter()
        .position(|(_, m)| m.contains("READY=1"))
        .expect("READY=1");
    assert!(msgs[ready].1.contains("STATUS="), "{msgs:?}");
    let pings: Vec<Instant> = msgs
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        pings.len() >= 4,
        "watchdog pings while idle-waiting on the broker: {msgs:?}"
    );
    // What systemd asks: a ping within every WATCHDOG_USEC, from READY to now.
    let mut marks = vec![msgs[ready].0];
    marks.extend(pings.iter().copied());
    marks.push(end);
    let gap = marks
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap();
    assert!(
        gap < WATCHDOG,
        "an idle consumer keeps the watchdog fed: a {gap:?} gap (WATCHDOG_USEC {WATCHDOG:?}): {msgs:?}"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let msgs = n.collect(Duration::from_secs(2));
    assert!(child.wait().unwrap().success());
    assert!(
        msgs.iter()
            .any(|(_, m)| m.contains("STOPPING=1") && m.contains("EXTEND_TIMEOUT_USEC=")),
        "{msgs:?}"
    );

    // Wedged: the pings stop, and the log says why.
    let n = Notify::new();
    let mut child = spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", n.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "600000"),
            ("LAR_WORKER_TEST_WEDGE", "1"),
        ],
    );
    let msgs = n.collect(Duration::from_secs(8));
    let end = Instant::now();
    term(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(msgs.iter().any(|(_, m)| m.contains("READY=1")));
    let last_ping = msgs
        .iter()
        .rev()
        .find(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t);
    if let Some(t) = last_ping {
        assert!(
            end.duration_since(t) > Duration::from_millis(3000),
            "pings continued while wedged: {msgs:?}"
        );
    }
    assert!(err.contains("withholding the watchdog ping"), "{err}");
    let mut r = local_redis();
    forget_queue(&mut r, &queue);
}

fn ensure_prometheus_parser() {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .unwrap()
        .success();
    if !ok {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "prometheus_client"])
            .status();
    }
}

#[test]
fn metrics_count_exactly_the_jobs_run() {
    ensure_prometheus_parser();
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("ops-{}:jobs", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let config = write_config(dir.path(), "redis://127.0.0.1:6379/0", &queue, Some(port));
    let mut r = local_redis();
    for i in 0..5 {
        let _: () = r
            .rpush(&queue, format!("{{\"kind\":\"sum\",\"numbers\":[{i},1]}}"))
            .unwrap();
    }
    let _: () = r.rpush(&queue, "not json").unwrap();
    let _: () = r.rpush(&queue, "[1,2]").unwrap();
    let mut child = spawn(&config, &[]);
    let results = format!("{queue}:out");
    let done = wait_for(Duration::from_secs(20), || {
        let n: u64 = r.llen(&results).ok()?;
        let d: u64 = r.llen(format!("{queue}:dead")).ok()?;
        (n == 5 && d == 2).then_some(())
    });
    assert!(done.is_some(), "jobs processed");
    let (code, body) =
        wait_for(Duration::from_secs(5), || http_get(port, "/metrics")).expect("/metrics answers");
    term(&mut child);
    assert_eq!(code, 200);
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"#;
    let mut py = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser accepts the page:\n{body}"
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str, labels: &str| m[format!("{name}{labels}")].as_f64().unwrap_or(-1.0);
    let q = |outcome: &str| format!("{{\"outcome\": \"{outcome}\", \"queue\": \"{queue}\"}}");
    assert_eq!(get("lar_worker_jobs_total", &q("claimed")), 7.0, "{m}");
    assert_eq!(get("lar_worker_jobs_total", &q("completed")), 5.0);
    assert_eq!(get("lar_worker_jobs_total", &q("dead_lettered")), 2.0);
    assert_eq!(get("lar_worker_jobs_total", &q("failed")), 0.0);
    assert_eq!(
        get(
            "lar_worker_step_duration_seconds_count",
            "{\"kind\": \"set\"}"
        ),
        10.0
    );
    assert_eq!(
        get(
            "lar_worker_step_duration_seconds_count",
            "{\"kind\": \"tool\"}"
        ),
        10.0
    );
    assert_eq!(
        get(
            "lar_worker_dead_letters",
            &format!("{{\"queue\": \"{queue}\"}}")
        ),
        2.0
    );
    assert_eq!(get("lar_worker_in_flight", "{}"), 0.0);
    forget_queue(&mut r, &queue);
}

/// A private redis-server on `port` (nothing on disk; `extra` arguments after the defaults),
/// run in `dir`.
fn private_redis(dir: &Path, port: &str, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .current_dir(dir)
        .args([
            "--port",
            port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts a private plain redis-server on a free port and waits until it answers; its URL.
fn private_redis_up(dir: &Path) -> (Child, String, u16) {
    let rport = free_port();
    let child = private_redis(dir, &rport.to_string(), &[]);
    let url = format!("redis://127.0.0.1:{rport}/0");
    wait_for(Duration::from_secs(5), || {
        redis::Client::open(url.as_str())
            .ok()?
            .get_connection()
            .ok()
    })
    .expect("redis up");
    (child, url, rport)
}

#[test]
fn ready_follows_redis_away_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut redis_proc, url, rport) = private_redis_up(dir.path());
    let start_redis = || private_redis(dir.path(), &rport.to_string(), &[]);
    let port = free_port();
    let config = write_config(dir.path(), &url, "ops-ready:jobs", Some(port));
    let mut child = spawn(&config, &[]);
    let up = wait_for(Duration::from_secs(10), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 200)
    });
    assert!(up.is_some(), "ready with redis up");
    let _ = redis_proc.kill();
    let _ = redis_proc.wait();
    let down = wait_for(Duration::from_secs(15), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 503)
    });
    let (_, body) = down.expect("/ready flips to 503 when redis goes away");
    assert!(body.contains("\"ready\":false"), "{body}");
    let mut redis_proc = start_redis();
    let back = wait_for(Duration::from_secs(20), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 200)
    });
    assert!(back.is_some(), "/ready comes back with redis");
    assert_eq!(http_get(port, "/live").map(|(c, _)| c), Some(200));
    // A request that arrives in pieces is answered once it is whole, not reset.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /li").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"ve HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    term(&mut child);
    let _ = redis_proc.kill();
    let _ = redis_proc.wait();
}

#[test]
fn dead_letters_show_and_redrive_keep_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("ops-{}:jobs", uuid::Uuid::new_v4().simple());
    let config = write_config(dir.path(), "redis://127.0.0.1:6379/0", &queue, None);
    let mut r = local_redis();
    let bad = "{\"kind\": \"sum\", truncated";
    let _: () = r.rpush(&queue, bad).unwrap();
    let mut child = spawn(&config, &[]);
    let dead = wait_for(Duration::from_secs(20), || {
        let d: Vec<String> = r.lrange(format!("{queue}:dead"), 0, -1).ok()?;
        (d.len() == 1).then(|| d[0].clone())
    })
    .expect("dead-lettered");
    term(&mut child);
    let entry: Value = serde_json::from_str(&dead).unwrap();
    let job_id = entry["job_id"].as_str().unwrap().to_string();
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON"),
        "{entry}"
    );
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = cli(&["dead-letters", "show", &job_id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("invalid JSON"), "{out}");
    let (code, _) = cli(&["dead-letters", "redrive", &job_id]);
    assert_eq!(code, Some(0));
    // Back under its own id (wrapped as claims keep it), the producer's bytes untouched.
    let back: Vec<Vec<u8>> = r.lrange(&queue, 0, -1).unwrap();
    assert_eq!(back.len(), 1);
    let (wrapped, raw) = lar_worker::queue::wrapper::unwrap_bytes(&back[0]).expect("wrapped");
    assert_eq!(wrapped.id, job_id);
    assert_eq!(raw, bad.as_bytes(), "the payload is back, byte for byte");
    let d: u64 = r.llen(format!("{queue}:dead")).unwrap();
    assert_eq!(d, 0);
    let (code, _) = cli(&["dead-letters", "redrive", &job_id]);
    assert_eq!(code, Some(2), "a second redrive finds nothing");
    forget_queue(&mut r, &queue);
}

/// journald restarting, or whoever read our stderr going away, must not cost the worker its
/// jobs or its stop: a log line that cannot be written is dropped, and SIGTERM still drains.
#[test]
fn a_worker_whose_log_reader_is_gone_still_works_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("ops-{}:jobs", uuid::Uuid::new_v4().simple());
    let config = write_config(dir.path(), "redis://127.0.0.1:6379/0", &queue, None);
    let mut r = local_redis();
    let mut child = spawn(&config, &[("RUST_LOG", "debug")]);
    drop(child.stderr.take());
    for i in 0..5 {
        let _: () = r
            .rpush(&queue, format!("{{\"kind\":\"sum\",\"numbers\":[{i},1]}}"))
            .unwrap();
    }
    let done = wait_for(Duration::from_secs(20), || {
        let n: usize = r.llen(format!("{queue}:out")).ok()?;
        (n == 5).then_some(n)
    });
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let stopped = wait_for(Duration::from_secs(15), || child.try_wait().ok().flatten());
    if stopped.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    forget_queue(&mut r, &queue);
    assert_eq!(done, Some(5), "every job ran with stderr broken");
    let status = stopped.expect("SIGTERM stops a worker whose stderr is a broken pipe");
    assert!(status.success(), "{status}");
}

/// A store that stops answering (here: its process frozen with SIGSTOP) must not hold the stop
/// past what the worker asks of systemd (`EXTEND_TIMEOUT_USEC` = the drain + 10 s): claim
/// loops and decision loops are cut off, and what they held comes back by lease expiry.
#[test]
fn a_store_that_stops_answering_does_not_hold_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (mut redis_proc, url, _) = private_redis_up(dir.path());
    let port = free_port();
    let config = dir.path().join("workers.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nconcurrency = 4\nlog_dir = \"audit\"\nlease_ms = 5000\ndrain_timeout_ms = 2000\n\
             [backend]\nkind = \"redis\"\nurl = \"{url}\"\n\
             [[queues]]\nname = \"hung:jobs\"\nresults = \"hung:out\"\ngraph = \"{}\"\n\
             decisions = \"hung:decisions\"\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\n",
            graph().display()
        ),
    )
    .unwrap();
    let mut child = spawn(&config, &[]);
    let up = wait_for(Duration::from_secs(10), || {
        http_get(port, "/ready").filter(|(c, _)| *c == 200)
    });
    let signal = |sig: &str, pid: u32| {
        let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
    };
    let stopped = up.as_ref().map(|_| {
        signal("-STOP", redis_proc.id());
        // Every loop is now waiting on the store.
        std::thread::sleep(Duration::from_millis(1500));
        let asked = Instant::now();
        signal("-TERM", child.id());
        let exited = wait_for(Duration::from_secs(60), || child.try_wait().ok().flatten());
        (exited, asked.elapsed())
    });
    signal("-CONT", redis_proc.id());
    let _ = child.kill();
    let _ = child.wait();
    let _ = redis_proc.kill();
    let _ = redis_proc.wait();
    assert!(up.is_some(), "ready with redis up");
    let (exited, took) = stopped.unwrap();
    assert!(exited.is_some(), "the worker never stopped");
    assert!(
        took < Duration::from_secs(2 + 10),
        "the stop took {took:?}, past the drain (2 s) + 10 s the worker asks of systemd"
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn make_tls_certs(dir: &Path) {
    let ssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=lar-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

/// `rediss://`: the worker talks to a Redis that only speaks TLS, trusting a private CA given
/// the standard way (`SSL_CERT_FILE`), and runs a job end to end; without the CA it refuses the
/// server and says why instead of running.
#[test]
fn rediss_runs_jobs_over_tls_and_refuses_an_untrusted_server() {
    let dir = tempfile::tempdir().unwrap();
    make_tls_certs(dir.path());
    let tport = free_port();
    let tls_port = tport.to_string();
    let mut redis_proc = private_redis(
        dir.path(),
        "0",
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
        ],
    );
    let up = wait_for(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", tport)).ok()
    });
    let url = format!("rediss://127.0.0.1:{tport}/0");
    let config = write_config(dir.path(), &url, "tls:jobs", None);
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let cli = |args: &[&str], trust: bool| {
        let mut c = Command::new(BIN);
        c.args(args).arg("--config").arg(&config);
        if trust {
            c.env("SSL_CERT_FILE", ca);
        } else {
            // An empty trust store: the private CA is unknown.
            c.env("SSL_CERT_FILE", "/dev/null");
        }
        c.output().unwrap()
    };
    let refused = up
        .as_ref()
        .map(|_| cli(&["enqueue", r#"{"kind":"sum","numbers":[1]}"#], false));
    let mut child = up
        .as_ref()
        .map(|_| spawn(&config, &[("SSL_CERT_FILE", ca)]));
    let enqueued = up
        .as_ref()
        .map(|_| cli(&["enqueue", r#"{"kind":"sum","numbers":[20,22]}"#], true));
    let result = up.as_ref().and_then(|_| {
        wait_for(Duration::from_secs(20), || {
            let out = cli(&["results"], true);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("\"result\":42").then_some(text)
        })
    });
    if let Some(c) = child.as_mut() {
        term(c);
    }
    let _ = redis_proc.kill();
    let _ = redis_proc.wait();
    assert!(up.is_some(), "redis-server with TLS did not start");
    let refused = refused.unwrap();
    assert!(!refused.status.success(), "an untrusted server is refused");
    let why = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(why.contains("certificate") || why.contains("tls"), "{why}");
    let enqueued = enqueued.unwrap();
    assert!(
        enqueued.status.success(),
        "{}",
        String::from_utf8_lossy(&enqueued.stderr)
    );
    assert!(result.is_some(), "the job's result came back over TLS");
}

/// The admin commands give up on a server that does not answer (here: frozen with SIGSTOP)
/// after `--timeout`, with an error that says so, instead of hanging a producer's script.
#[test]
fn admin_commands_give_up_on_a_frozen_server() {
    let dir = tempfile::tempdir().unwrap();
    let (mut redis_proc, url, _) = private_redis_up(dir.path());
    let config = write_config(dir.path(), &url, "frozen:jobs", None);
    let signal = |sig: &str, pid: u32| {
        let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
    };
    signal("-STOP", redis_proc.id());
    let mut outcomes = Vec::new();
    for args in [
        vec!["enqueue", r#"{"x":1}"#],
        vec!["inspect"],
        vec!["pending"],
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .arg("--config")
            .arg(&config)
            .args(["--timeout", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let started = Instant::now();
        let exited = wait_for(Duration::from_secs(20), || child.try_wait().ok().flatten());
        let took = started.elapsed();
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        outcomes.push((
            args[0],
            exited,
            took,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    signal("-CONT", redis_proc.id());
    let _ = redis_proc.kill();
    let _ = redis_proc.wait();
    for (cmd, exited, took, stderr) in outcomes {
        let status = exited.unwrap_or_else(|| panic!("`{cmd}` still waiting after {took:?}"));
        assert_eq!(status.code(), Some(1), "`{cmd}`: {stderr}");
        assert!(stderr.contains("within 1 s"), "`{cmd}`: {stderr}");
        assert!(took < Duration::from_secs(10), "`{cmd}` took {took:?}");
    }
}
