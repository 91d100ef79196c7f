//! The admin HTTP port (off by default; bind it to 127.0.0.1): `/live`, `/ready`, `/metrics`.
//! A deliberately small HTTP/1.1 responder: GET only, one request per connection.

use crate::ops::health::Readiness;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long an answer may take to compute (`/ready` and `/metrics` ask the queue store) and
/// to send: a store that hangs, or a client that never reads, holds a task for no longer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints ask the worker, one method per endpoint. The worker implements it;
/// this module knows nothing else of it, so `ops` does not depend on `worker`.
#[async_trait::async_trait]
pub trait WorkerProbe: Send + Sync {
    /// `/live`: whether the worker's loops turned within the watchdog window.
    fn alive(&self) -> bool;
    /// `/ready`: the READY checks.
    async fn readiness(&self) -> Readiness;
    /// `/metrics`: the Prometheus page.
    async fn metrics_text(&self) -> String;
}

pub async fn serve(
    listener: TcpListener,
    worker: Arc<dyn WorkerProbe>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let w = Arc::clone(&worker);
        tokio::spawn(async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let head = String::from_utf8_lossy(&head);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else {
                match path {
                    "/live" => {
                        if w.alive() {
                            ("200 OK", "text/plain", "ok\n".to_string())
                        } else {
                            (
                                "503 Service Unavailable",
                                "text/plain",
                                "wedged: a loop stopped turning\n".to_string(),
                            )
                        }
                    }
                    "/ready" => match tokio::time::timeout(ANSWER_TIMEOUT, w.readiness()).await {
                        Ok(r) => {
                            let body = serde_json::to_string(&r).unwrap_or_default() + "\n";
                            if r.ready {
                                ("200 OK", "application/json", body)
                            } else {
                                ("503 Service Unavailable", "application/json", body)
                            }
                        }
                        Err(_) => too_slow("the readiness checks"),
                    },
                    "/metrics" => {
                        match tokio::time::timeout(ANSWER_TIMEOUT, w.metrics_text()).await {
                            Ok(text) => ("200 OK", "text/plain; version=0.0.4", text),
                            Err(_) => too_slow("the metrics"),
                        }
                    }
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "try /live, /ready or /metrics\n".to_string(),
                    ),
                }
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

/// The answer when computing one took longer than [`ANSWER_TIMEOUT`].
fn too_slow(what: &str) -> (&'static str, &'static str, String) {
    (
        "503 Service Unavailable",
        "text/plain",
        format!(
            "{what} took over {} s (is the queue store answering?)\n",
            ANSWER_TIMEOUT.as_secs()
        ),
    )
}

/// Reads the request head: up to the blank line that ends the headers, at most 4 KiB, within
/// 5 s. A client may send the request line in several segments; answering (and closing) after
/// the first one would leave its rest unread, and the kernel then resets the connection
/// instead of delivering the answer.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    const MAX: usize = 4096;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => head.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
    (!head.is_empty()).then_some(head)
}
