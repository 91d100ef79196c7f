//! Outbound HTTP shared by LLM providers and `http` tools: one client (rustls, no redirects),
//! secrets resolved at call time and never logged, bounded retries with backoff and
//! `Retry-After`, a per-attempt deadline, and a size limit on answers.

pub mod mask;
pub mod secret;

pub use secret::{HeaderSpec, Redactor, SecretRef, SecretRefError, ValueSpec};

use crate::backoff::Backoff;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use std::sync::OnceLock;
use std::time::Duration;

/// Answers beyond this are refused (a runaway endpoint must not exhaust memory).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// How much of an error body is kept for `last_error`.
pub const EXCERPT_CHARS: usize = 300;
/// A `Retry-After` longer than this is shortened to it: a step never sleeps for minutes.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

/// How often and how patiently a call is retried.
#[derive(Debug, Clone)]
pub struct RetrySpec {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl RetrySpec {
    /// `max_attempts` attempts, waiting `initial_ms` doubling up to `max_ms` (±20 % jitter).
    pub fn new(max_attempts: u32, initial_ms: u64, max_ms: u64) -> Self {
        RetrySpec {
            max_attempts: max_attempts.max(1),
            backoff: Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms.max(initial_ms)),
                multiplier: 2.0,
                jitter: 0.2,
            },
        }
    }
}

/// One outbound request, rebuilt for every attempt.
pub struct Outgoing<'a> {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Vec<u8>>,
    /// The deadline of one attempt: connecting, sending and reading the whole answer.
    pub timeout: Duration,
    pub retry: &'a RetrySpec,
    /// Whether failures that may be transient are retried at all (false for non-idempotent
    /// actions).
    pub retry_allowed: bool,
}

/// A 2xx answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub attempts: u32,
}

/// Why a call failed, after its last attempt. The texts never hold a secret: bodies are
/// redacted and URLs are shown without query or credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{target}: HTTP {status} after {attempts} attempt(s){}", excerpt_suffix(.excerpt))]
    Status {
        target: String,
        status: u16,
        excerpt: String,
        attempts: u32,
    },
    #[error("{target}: timed out after {timeout_ms} ms ({attempts} attempt(s))")]
    Timeout {
        target: String,
        timeout_ms: u64,
        attempts: u32,
    },
    #[error("{target}: connection failed after {attempts} attempt(s): {detail}")]
    Connection {
        target: String,
        detail: String,
        attempts: u32,
    },
    #[error("{target}: the answer is larger than {limit} bytes")]
    TooLarge { target: String, limit: usize },
    #[error("{target}: cannot build the request: {detail}")]
    Invalid { target: String, detail: String },
    #[error("the HTTP client is unavailable: {0}")]
    NoClient(String),
}

fn excerpt_suffix(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

impl CallError {
    /// Attempts made before giving up.
    pub fn attempts(&self) -> u32 {
        match self {
            CallError::Status { attempts, .. }
            | CallError::Timeout { attempts, .. }
            | CallError::Connection { attempts, .. } => *attempts,
            _ => 1,
        }
    }
}

/// The process-wide client: connection pools are shared, TLS is rustls, redirects are not
/// followed (a redirect could carry a secret header to another host; a 3xx is a failure).
pub fn client() -> Result<&'static reqwest::Client, CallError> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("lar-worker/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| error_chain(&e))
        })
        .as_ref()
        .map_err(|e| CallError::NoClient(e.clone()))
}

/// `scheme://host[:port]/path`, without credentials or query: what error texts show.
pub fn display_target(method: &Method, url: &Url) -> String {
    let mut shown = format!(
        "{method} {}://{}",
        url.scheme(),
        url.host_str().unwrap_or("?")
    );
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// Sends the request, retrying 408, 429, 5xx, timeouts and connection failures (when allowed)
/// up to `max_attempts`, waiting per `Retry-After` (seconds or an HTTP date, capped at
/// [`RETRY_AFTER_CAP`]) or, without one, the backoff.
pub async fn send(req: &Outgoing<'_>, redactor: &Redactor) -> Result<Reply, CallError> {
    let target = display_target(&req.method, &req.url);
    let client = client()?;
    let max = if req.retry_allowed {
        req.retry.max_attempts.max(1)
    } else {
        1
    };
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let (err, retry_after) = match attempt_once(client, req, &target, attempt, redactor).await {
            Ok(reply) => return Ok(reply),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Transient(e, retry_after)) => (e, retry_after),
        };
        if attempt >= max {
            return Err(err);
        }
        let wait = retry_after.unwrap_or_else(|| req.retry.backoff.delay(attempt));
        tracing::debug!(target = %target, attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying");
        tokio::time::sleep(wait).await;
    }
}

enum Failure {
    /// Worth another attempt (with the wait the server's `Retry-After` asks for, capped, if it
    /// gave one).
    Transient(CallError, Option<Duration>),
    Final(CallError),
}

async fn attempt_once(
    client: &reqwest::Client,
    req: &Outgoing<'_>,
    target: &str,
    attempts: u32,
    redactor: &Redactor,
) -> Result<Reply, Failure> {
    let mut builder = client
        .request(req.method.clone(), req.url.clone())
        .headers(req.headers.clone());
    if let Some(body) = &req.body {
        builder = builder.body(body.clone());
    }
    let timeout_ms = u64::try_from(req.timeout.as_millis()).unwrap_or(u64::MAX);
    let exchange = async {
        let mut resp = builder.send().await?;
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_BODY {
                return Ok((status, retry_after, None));
            }
            body.extend_from_slice(&chunk);
        }
        Ok::<_, reqwest::Error>((status, retry_after, Some(body)))
    };
    let (status, retry_after, body) = match tokio::time::timeout(req.timeout, exchange).await {
        Err(_) => {
            return Err(Failure::Transient(
                CallError::Timeout {
                    target: target.to_string(),
                    timeout_ms,
                    attempts,
                },
                None,
            ))
        }
        Ok(Err(e)) if e.is_builder() => {
            return Err(Failure::Final(CallError::Invalid {
                target: target.to_string(),
                detail: redactor.redact_str(&error_chain(&e.without_url())),
            }))
        }
        Ok(Err(e)) => {
            let err = if e.is_timeout() {
                CallError::Timeout {
                    target: target.to_string(),
                    timeout_ms,
                    attempts,
                }
            } else {
                CallError::Connection {
                    target: target.to_string(),
                    detail: redactor.redact_str(&error_chain(&e.without_url())),
                    attempts,
                }
            };
            return Err(Failure::Transient(err, None));
        }
        Ok(Ok(done)) => done,
    };
    let Some(mut body) = body else {
        return Err(Failure::Final(CallError::TooLarge {
            target: target.to_string(),
            limit: MAX_BODY,
        }));
    };
    redactor.redact_bytes(&mut body);
    if status.is_success() {
        return Ok(Reply {
            status: status.as_u16(),
            body,
            attempts,
        });
    }
    let err = CallError::Status {
        target: target.to_string(),
        status: status.as_u16(),
        excerpt: excerpt(&body),
        attempts,
    };
    if is_transient(status) {
        Err(Failure::Transient(err, retry_after))
    } else {
        Err(Failure::Final(err))
    }
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// The server's `Retry-After`, if it gave a readable one.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    retry_after(text, crate::clock::now_ms())
}

/// The wait a `Retry-After` value asks for, `now_ms` being the wall clock (ms since the Unix
/// epoch), clamped to [`RETRY_AFTER_CAP`]:
///
/// - delay-seconds, `120` (a decimal such as `0.5` is accepted too);
/// - an HTTP date (RFC 9110 §5.6.7): the IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, or the
///   obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT` and asctime `Sun Nov  6 08:49:37 1994`
///   forms. The wait is the date minus our clock (the server's `Date` is not consulted, so a
///   skewed clock shifts it; the cap bounds the harm). A date already past means no wait.
///
/// Anything else (negative, not finite, an unknown form) is `None`: the backoff applies.
fn retry_after(text: &str, now_ms: i64) -> Option<Duration> {
    let text = text.trim();
    let wait = if let Ok(secs) = text.parse::<f64>() {
        if !(secs.is_finite() && secs >= 0.0) {
            return None;
        }
        Duration::from_secs_f64(secs.min(RETRY_AFTER_CAP.as_secs_f64()))
    } else {
        let at_ms = http_date_ms(text)?;
        Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0))
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

/// An HTTP date in any of its three forms, as ms since the Unix epoch. The weekday must match
/// the date. RFC 850's two-digit year is read as chrono does (70–99 → 19xx, 00–69 → 20xx).
fn http_date_ms(text: &str) -> Option<i64> {
    const FORMS: [&str; 3] = [
        "%a, %d %b %Y %H:%M:%S GMT", // IMF-fixdate
        "%A, %d-%b-%y %H:%M:%S GMT", // RFC 850
        "%a %b %e %H:%M:%S %Y",      // asctime
    ];
    FORMS
        .iter()
        .find_map(|form| chrono::NaiveDateTime::parse_from_str(text, form).ok())
        .map(|t| t.and_utc().timestamp_millis())
}

/// The start of a body as one line of text, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut count = 0;
    let mut last_space = false;
    for c in text.trim().chars() {
        if count >= EXCERPT_CHARS {
            out.push('…');
            break;
        }
        let c = if c.is_whitespace() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        out.push(c);
        count += 1;
    }
    out
}

/// An error and its causes on one line ("error sending request: connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_header_is_read() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(2)));
        // A date long past: no wait (rather than the backoff).
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
    }

    /// 1994-11-06T08:49:37Z, the RFC's example date, in ms.
    const EXAMPLE_MS: i64 = 784_111_777_000;

    #[test]
    fn retry_after_seconds() {
        assert_eq!(retry_after("2", 0), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 0.5 ", 0), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("0", 0), Some(Duration::ZERO));
        assert_eq!(retry_after("3600", 0), Some(RETRY_AFTER_CAP));
        assert_eq!(retry_after("1e300", 0), Some(RETRY_AFTER_CAP));
        for bad in ["-1", "NaN", "inf", "", "soon", "1 s"] {
            assert_eq!(retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_imf_fixdate() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(http_date_ms(date), Some(EXAMPLE_MS));
        assert_eq!(
            retry_after(date, EXAMPLE_MS - 2_500),
            Some(Duration::from_millis(2_500))
        );
    }

    #[test]
    fn retry_after_rfc850_and_asctime() {
        for date in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun Nov 6 08:49:37 1994",
        ] {
            assert_eq!(http_date_ms(date), Some(EXAMPLE_MS), "{date:?}");
            assert_eq!(
                retry_after(date, EXAMPLE_MS - 1_000),
                Some(Duration::from_secs(1)),
                "{date:?}"
            );
        }
    }

    #[test]
    fn retry_after_date_is_clamped_and_past_is_no_wait() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        // An hour ahead: the cap.
        assert_eq!(
            retry_after(date, EXAMPLE_MS - 3_600_000),
            Some(RETRY_AFTER_CAP)
        );
        // Exactly now, or already past: no wait.
        assert_eq!(retry_after(date, EXAMPLE_MS), Some(Duration::ZERO));
        assert_eq!(retry_after(date, EXAMPLE_MS + 5_000), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_rejects_malformed_dates() {
        for bad in [
            "Mon, 06 Nov 1994 08:49:37 GMT", // wrong weekday
            "Sun, 06 Nov 1994 08:49:37 PST", // not GMT
            "Sun, 31 Nov 1994 08:49:37 GMT", // no such day
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "1994-11-06T08:49:37Z",
            "Sun, 06 Nov 1994",
        ] {
            assert_eq!(http_date_ms(bad), None, "{bad:?}");
            assert_eq!(retry_after(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn excerpt_is_one_bounded_line() {
        let body = format!("  line one\n\n  line two {}", "x".repeat(1000));
        let e = excerpt(body.as_bytes());
        assert!(e.starts_with("line one line two x"));
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }

    #[test]
    fn target_hides_credentials_and_query() {
        let url = Url::parse("https://user:pw@api.example.com:8443/v1/x?key=abc").unwrap();
        assert_eq!(
            display_target(&Method::POST, &url),
            "POST https://api.example.com:8443/v1/x"
        );
    }
}
