//! Shared by the network tests: a scripted HTTP/1.1 server on 127.0.0.1 (a random port, real
//! sockets, one request per connection), and helpers that load a graph, run it through
//! `run_job` with a secret, and check the signed log.
#![allow(dead_code)]

use lar_worker::audit::{verify_file, Secret, Verdict};
use lar_worker::graph::{load_graph_file, Graph};
use lar_worker::job::{run_job, AuditSettings, JobReport};
use lar_worker::tools::Registry;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The API key the tests hand to providers and tools; it must never reach a log.
pub const API_KEY: &str = "sk-test-DO-NOT-LEAK-7f3a9c1e";

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    /// The `model` of a chat request.
    pub fn model(&self) -> String {
        self.json()["model"].as_str().unwrap_or("").to_string()
    }
    /// The user message of a chat request.
    pub fn user_prompt(&self) -> String {
        let j = self.json();
        j["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string()
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Resp {
    pub fn json(status: u16, v: Value) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: v.to_string(),
            delay: Duration::ZERO,
        }
    }
    pub fn text(status: u16, body: &str) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn after(mut self, d: Duration) -> Resp {
        self.delay = d;
        self
    }
}

/// An OpenAI-style chat answer.
pub fn chat(content: &str, model: &str, prompt_tokens: u64, completion_tokens: u64) -> Resp {
    Resp::json(
        200,
        json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
        }),
    )
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) `secs` whole seconds after the current
/// second: the wait it asks for is between `secs - 1` and `secs` seconds.
pub fn http_date_in(secs: i64) -> String {
    let at = chrono::Utc::now().timestamp() + secs;
    chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

type Handler = dyn Fn(&Req, usize) -> Resp + Send + Sync;

pub struct Server {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Req>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Server {
    /// Starts a server whose `handler` gets each request and its 0-based number.
    pub async fn start(handler: impl Fn(&Req, usize) -> Resp + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, i, m) = (seen.clone(), in_flight.clone(), max_in_flight.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (s, i, m, h) = (s.clone(), i.clone(), m.clone(), handler.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, s, i, m, h).await;
                });
            }
        });
        Server {
            addr,
            seen,
            in_flight,
            max_in_flight,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn requests(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut sock: TcpStream,
    seen: Arc<Mutex<Vec<Req>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    handler: Arc<Handler>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let req = Req {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    };
    let number = {
        let mut s = seen.lock().unwrap();
        s.push(req.clone());
        s.len() - 1
    };
    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    max_in_flight.fetch_max(now, Ordering::SeqCst);
    let resp = handler(&req, number);
    if !resp.delay.is_zero() {
        tokio::time::sleep(resp.delay).await;
    }
    in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        resp.body.len()
    ));
    out.push_str(&resp.body);
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A temporary directory with a key file, a log directory and a signing secret.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub secret: Secret,
    pub audit: AuditSettings,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api_key"), format!("{API_KEY}\n")).unwrap();
        let secret = Secret::new("test-hmac-secret").unwrap();
        let audit = AuditSettings {
            log_dir: dir.path().join("logs"),
            secret: Some(secret.clone()),
            durable: false,
            writer: None,
        };
        Env { dir, secret, audit }
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("api_key")
    }

    /// Writes the graph beside the key file and loads it.
    pub fn graph(&self, toml: &str) -> Arc<Graph> {
        let path = self.dir.path().join("graph.toml");
        std::fs::write(&path, toml).unwrap();
        match load_graph_file(&path, &Registry::with_builtins()) {
            Ok(g) => Arc::new(g),
            Err(e) => panic!("graph does not load:\n{e}\n---\n{toml}"),
        }
    }

    /// The load errors of an invalid graph, as text.
    pub fn graph_errors(&self, toml: &str) -> String {
        let path = self.dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        match load_graph_file(&path, &Registry::with_builtins()) {
            Ok(_) => panic!("the graph should not load:\n{toml}"),
            Err(e) => e.to_string(),
        }
    }

    /// Runs the graph to its end and checks what every run must satisfy: the log verifies and
    /// holds no API key.
    pub async fn run(&self, graph: Arc<Graph>, input: Value) -> (JobReport, Value) {
        let input: Map<String, Value> = input.as_object().cloned().unwrap_or_default();
        let report = run_job(
            graph,
            &Registry::with_builtins(),
            "job-1",
            input,
            None,
            &self.audit,
        )
        .await
        .unwrap();
        let log = check_log(&report.log_path, &self.secret);
        (report, log)
    }
}

/// Verifies the log with the secret, asserts the API key is nowhere in it, returns it parsed.
pub fn check_log(path: &Path, secret: &Secret) -> Value {
    let verdict = verify_file(path, secret);
    assert!(
        matches!(verdict, Verdict::Valid { .. }),
        "log does not verify: {verdict:?}"
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        !text.contains(API_KEY),
        "the API key appears in the log file"
    );
    serde_json::from_str(&text).unwrap()
}

/// The steps of a parsed log.
pub fn steps(log: &Value) -> &Vec<Value> {
    log["steps"].as_array().unwrap()
}

/// A step's keys in file order.
pub fn keys(step: &Value) -> Vec<&str> {
    step.as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}
