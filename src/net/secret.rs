//! Secrets for outbound calls (API keys, header values): named in the graph file as an
//! environment variable or a file, read only when a call is made, sent as "sensitive" header
//! values, and scrubbed from every answer and error text we keep.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::path::PathBuf;

/// Where a secret comes from. Its value is never stored in the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

/// Why a secret could not be read. Names the variable or file, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error("environment variable {0} is not set (or not UTF-8)")]
    EnvUnset(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read secret file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("secret file {0} is empty")]
    FileEmpty(String),
    #[error("the value of {0} cannot be sent as an HTTP header (control characters?)")]
    BadHeaderValue(String),
    #[error("{0} holds the workers' HMAC secret, which is never sent anywhere")]
    SigningKey(String),
}

impl SecretRef {
    /// `env:VAR` or `file:/path`, as written in graph files; `None` for a plain value.
    pub fn parse_prefixed(text: &str) -> Option<SecretRef> {
        if let Some(var) = text.strip_prefix("env:") {
            Some(SecretRef::Env(var.to_string()))
        } else {
            text.strip_prefix("file:")
                .map(|p| SecretRef::File(PathBuf::from(p)))
        }
    }

    /// What the manifest and errors show: the source, never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(v) => format!("env:{v}"),
            SecretRef::File(p) => format!("file:{}", p.display()),
        }
    }

    /// Reads the secret now. A file's trailing newline is dropped. The workers' own HMAC key
    /// is refused, whichever variable or file it is reached through.
    pub fn resolve(&self) -> Result<String, SecretRefError> {
        let value = self.read()?;
        if crate::signing::is_signing_key(value.as_bytes()) {
            return Err(SecretRefError::SigningKey(self.describe()));
        }
        Ok(value)
    }

    fn read(&self) -> Result<String, SecretRefError> {
        match self {
            SecretRef::Env(var) => match std::env::var(var) {
                Ok(v) if v.is_empty() => Err(SecretRefError::EnvEmpty(var.clone())),
                Ok(v) => Ok(v),
                Err(_) => Err(SecretRefError::EnvUnset(var.clone())),
            },
            SecretRef::File(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| SecretRefError::File {
                    path: shown.clone(),
                    reason: e.kind().to_string(),
                })?;
                let text = text.trim_end_matches(['\n', '\r']).to_string();
                if text.is_empty() {
                    return Err(SecretRefError::FileEmpty(shown));
                }
                Ok(text)
            }
        }
    }
}

/// A header value or a command tool's environment value in a graph file: plain text, or a
/// secret reference (`env:VAR`, `file:PATH`) read when the call is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSpec {
    Plain(String),
    Secret(SecretRef),
}

/// One configured header. The name and a plain value were checked at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSpec {
    pub name: String,
    pub value: ValueSpec,
}

impl ValueSpec {
    /// Reads a value written in a graph file: `env:VAR` and `file:PATH` (relative to the
    /// graph's folder) are secret references, remembered for redaction; anything else is
    /// plain text. `what` names the field in errors.
    pub fn parse(what: &str, text: &str, base: &std::path::Path) -> Result<ValueSpec, String> {
        let spec = match SecretRef::parse_prefixed(text) {
            Some(SecretRef::Env(var)) if var.is_empty() => {
                return Err(format!("{what}: 'env:' needs a variable name"))
            }
            Some(SecretRef::File(p)) if p.as_os_str().is_empty() => {
                return Err(format!("{what}: 'file:' needs a path"))
            }
            Some(SecretRef::File(p)) => ValueSpec::Secret(SecretRef::File(base.join(p))),
            Some(s) => ValueSpec::Secret(s),
            None => ValueSpec::Plain(text.to_string()),
        };
        if let ValueSpec::Secret(s) = &spec {
            register_graph_secret(s);
        }
        Ok(spec)
    }

    /// The value now: plain text as written, a secret read from its source.
    pub fn resolve(&self) -> Result<String, SecretRefError> {
        match self {
            ValueSpec::Plain(v) => Ok(v.clone()),
            ValueSpec::Secret(s) => s.resolve(),
        }
    }

    /// What the manifest shows: plain text, or a secret's source only.
    pub fn describe(&self) -> String {
        match self {
            ValueSpec::Plain(v) => v.clone(),
            ValueSpec::Secret(s) => format!("<{}>", s.describe()),
        }
    }
}

impl HeaderSpec {
    /// Parses one configured header (a plain value, or `env:VAR` / `file:PATH` relative to
    /// `base`).
    pub fn parse(name: &str, value: &str, base: &std::path::Path) -> Result<HeaderSpec, String> {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("'{name}' is not a valid HTTP header name"))?;
        let value = ValueSpec::parse(&format!("header '{name}'"), value, base)?;
        if let ValueSpec::Plain(v) = &value {
            HeaderValue::from_str(v).map_err(|_| {
                format!("header '{name}': the value has characters HTTP does not allow")
            })?;
        }
        Ok(HeaderSpec {
            name: name.to_string(),
            value,
        })
    }

    /// `name: value` for the manifest, secrets shown by their source only.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.name, self.value.describe())
    }
}

/// Resolves `specs` into `headers`, marking secret values sensitive and remembering them in
/// `redactor`.
pub fn add_headers(
    headers: &mut HeaderMap,
    specs: &[HeaderSpec],
    redactor: &mut Redactor,
) -> Result<(), SecretRefError> {
    for spec in specs {
        // Names were validated at load.
        let Ok(name) = HeaderName::from_bytes(spec.name.as_bytes()) else {
            continue;
        };
        let value = match &spec.value {
            ValueSpec::Plain(v) => match HeaderValue::from_str(v) {
                Ok(v) => v,
                Err(_) => continue,
            },
            ValueSpec::Secret(s) => {
                let text = s.resolve()?;
                redactor.add(&text);
                secret_header_value(&text, &s.describe())?
            }
        };
        headers.insert(name, value);
    }
    Ok(())
}

/// A header value that holds a secret: flagged sensitive so it never shows in debug output.
pub fn secret_header_value(text: &str, source: &str) -> Result<HeaderValue, SecretRefError> {
    let mut v = HeaderValue::from_str(text)
        .map_err(|_| SecretRefError::BadHeaderValue(source.to_string()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Where the loaded graphs keep their secrets (`api_key_env`, `env:`/`file:` header values),
/// process-wide: a command tool inherits the worker's environment (trusted code, see the
/// README), and what it prints on failure goes into `last_error`, the step record and the
/// result, so those texts are redacted against every one of them ([`redact_graph_secrets`]).
static GRAPH_SECRETS: std::sync::Mutex<Vec<SecretRef>> = std::sync::Mutex::new(Vec::new());

/// Remembers a secret source a graph uses (called as graphs load).
pub fn register_graph_secret(source: &SecretRef) {
    let mut known = match GRAPH_SECRETS.lock() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    if !known.contains(source) {
        known.push(source.clone());
    }
}

/// The environment variables the loaded graphs read secrets from: a command tool does not
/// inherit them from the worker (a tool that needs one is granted it in its `env` table).
pub fn graph_secret_env_vars() -> Vec<String> {
    let sources = match GRAPH_SECRETS.lock() {
        Ok(k) => k.clone(),
        Err(p) => p.into_inner().clone(),
    };
    sources
        .into_iter()
        .filter_map(|s| match s {
            SecretRef::Env(var) => Some(var),
            SecretRef::File(_) => None,
        })
        .collect()
}

/// `text` with the current value of every registered graph secret replaced by `[redacted]`.
pub fn redact_graph_secrets(text: &str) -> String {
    let sources = match GRAPH_SECRETS.lock() {
        Ok(k) => k.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let mut redactor = Redactor::default();
    for s in &sources {
        if let Ok(value) = s.read() {
            redactor.add(value.trim());
        }
    }
    redactor.redact_str(text)
}

/// Replaces known secret values with `[redacted]` in text we keep (answers, error excerpts),
/// in every form a reply or a message may carry them (see [`forms`]).
#[derive(Default)]
pub struct Redactor {
    /// Every form of every secret, longest first.
    secrets: Vec<String>,
}

/// Values shorter than this are not searched for: they would match ordinary text.
const MIN_REDACT_LEN: usize = 6;
const REDACTED: &str = "[redacted]";

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_REDACT_LEN {
            return;
        }
        for form in forms(secret) {
            if !self.secrets.contains(&form) {
                self.secrets.push(form);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    pub fn redact_str(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        out
    }

    pub fn redact_bytes(&self, body: &mut Vec<u8>) {
        for s in &self.secrets {
            let needle = s.as_bytes();
            if !body.windows(needle.len()).any(|w| w == needle) {
                continue;
            }
            let mut out = Vec::with_capacity(body.len());
            let mut i = 0;
            while i < body.len() {
                if body[i..].starts_with(needle) {
                    out.extend_from_slice(REDACTED.as_bytes());
                    i += needle.len();
                } else {
                    out.push(body[i]);
                    i += 1;
                }
            }
            *body = out;
        }
    }
}

/// The forms a secret takes in text: as it is; inside a JSON string, as serde_json writes it,
/// as Python's `ensure_ascii` does (and Jackson and .NET, with upper-case hex), and as Go does
/// (`<`, `>`, `&` as `\u003c`…), each also with `/` written `\/` (some servers do); and
/// percent-encoded (upper- or lower-case hex), as a URL echoed in an error carries it. A
/// provider that quotes a key holding a `"`, `\`, `/` or non-ASCII character in a JSON error
/// would otherwise pass it on unredacted.
fn forms(secret: &str) -> Vec<String> {
    let unquoted = |bytes: Vec<u8>| {
        let s = String::from_utf8_lossy(&bytes).into_owned();
        s.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .map(str::to_string)
            .unwrap_or(s)
    };
    let serde_form = unquoted(serde_json::to_vec(secret).unwrap_or_default());
    let go_form = serde_form
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let mut ascii = Vec::with_capacity(secret.len() + 8);
    crate::json::canonical::write_str(&mut ascii, secret);
    let ascii_form = unquoted(ascii);
    let ascii_upper = upper_unicode_escapes(&ascii_form);
    let percent = |upper: bool| -> String {
        secret
            .bytes()
            .map(|b| match b {
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => (b as char).to_string(),
                b if upper => format!("%{b:02X}"),
                b => format!("%{b:02x}"),
            })
            .collect()
    };
    let mut out = vec![secret.to_string()];
    for form in [serde_form, go_form, ascii_form, ascii_upper] {
        for f in [form.replace('/', "\\/"), form] {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    for f in [percent(true), percent(false)] {
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// `\u00f6` as `\u00F6`: the hex digits of every `\u` escape in upper case (an escaped
/// backslash followed by a `u` is left alone).
fn upper_unicode_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '\\' {
            continue;
        }
        match chars.next() {
            Some('u') => {
                out.push('u');
                for h in chars.by_ref().take(4) {
                    out.push(h.to_ascii_uppercase());
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_is_never_resolved_for_sending() {
        let dir = tempfile::tempdir().unwrap();
        let key = "net-secret-test-signing-key-7f3a";
        let _signer = crate::signing::Secret::new(key).unwrap();
        let file = dir.path().join("hmac_secret");
        std::fs::write(&file, format!("{key}\n")).unwrap();
        let err = SecretRef::File(file.clone()).resolve().unwrap_err();
        assert_eq!(
            err,
            SecretRefError::SigningKey(format!("file:{}", file.display()))
        );
        assert!(!err.to_string().contains(key));
        let other = dir.path().join("api_key");
        std::fs::write(&other, "sk-not-the-signing-key").unwrap();
        assert_eq!(
            SecretRef::File(other).resolve().unwrap(),
            "sk-not-the-signing-key"
        );
    }

    #[test]
    fn redacts_every_occurrence() {
        let mut r = Redactor::default();
        r.add("sk-secret-123");
        r.add("abc"); // too short to search for
        assert_eq!(
            r.redact_str("key sk-secret-123 and sk-secret-123; abc"),
            "key [redacted] and [redacted]; abc"
        );
        let mut body = b"{\"k\":\"sk-secret-123\"}".to_vec();
        r.redact_bytes(&mut body);
        assert_eq!(body, b"{\"k\":\"[redacted]\"}");
    }

    #[test]
    fn escaped_and_percent_encoded_forms_are_redacted() {
        let mut r = Redactor::default();
        let secret = "sk-pa\"ss/w\u{f6}rd\\1";
        r.add(secret);
        for (form, text) in [
            ("raw", format!("key {secret} echoed")),
            (
                "serde JSON",
                r#"{"error":"bad key sk-pa\"ss/wörd\\1"}"#.to_string(),
            ),
            (
                "escaped slash",
                r#"{"error":"bad key sk-pa\"ss\/wörd\\1"}"#.to_string(),
            ),
            (
                "ensure_ascii",
                r#"{"error":"bad key sk-pa\"ss/w\u00f6rd\\1"}"#.to_string(),
            ),
            (
                "ensure_ascii, upper-case hex",
                r#"{"error":"bad key sk-pa\"ss/w\u00F6rd\\1"}"#.to_string(),
            ),
            (
                "percent",
                "GET /v1?key=sk-pa%22ss%2Fw%C3%B6rd%5C1 failed".to_string(),
            ),
            (
                "percent, lower-case hex",
                "GET /v1?key=sk-pa%22ss%2fw%c3%b6rd%5c1 failed".to_string(),
            ),
        ] {
            let out = r.redact_str(&text);
            assert!(out.contains("[redacted]"), "{form}: {out}");
            assert!(
                !out.contains("rd"),
                "{form}: a part of the secret is left in {out}"
            );
            let mut body = text.clone().into_bytes();
            r.redact_bytes(&mut body);
            assert_eq!(String::from_utf8_lossy(&body), out, "{form}: bytes as text");
        }
        // Go writes `<`, `>` and `&` as `\u003c`, `\u003e` and `\u0026`.
        let mut go = Redactor::default();
        go.add("sk<&>key1");
        assert_eq!(
            go.redact_str(r#"{"error":"sk\u003c\u0026\u003ekey1"}"#),
            r#"{"error":"[redacted]"}"#
        );
        // An escaped backslash followed by a `u` is not an escape to change.
        assert_eq!(upper_unicode_escapes(r"a\\user\u00e9"), r"a\\user\u00E9");
        // A plain key has one form: nothing else is searched for.
        let mut plain = Redactor::default();
        plain.add("sk-plain-key-123");
        assert_eq!(plain.secrets, vec!["sk-plain-key-123".to_string()]);
    }

    #[test]
    fn header_specs() {
        let base = std::path::Path::new("/etc/graphs");
        let h = HeaderSpec::parse("X-Api-Key", "env:MY_KEY", base).unwrap();
        assert_eq!(h.value, ValueSpec::Secret(SecretRef::Env("MY_KEY".into())));
        let h = HeaderSpec::parse("X-Token", "file:token.txt", base).unwrap();
        assert_eq!(
            h.value,
            ValueSpec::Secret(SecretRef::File("/etc/graphs/token.txt".into()))
        );
        assert!(HeaderSpec::parse("bad name", "x", base).is_err());
        assert!(HeaderSpec::parse("X-A", "line\nbreak", base).is_err());
        assert!(HeaderSpec::parse("X-A", "env:", base).is_err());
    }

    #[test]
    fn missing_env_names_the_variable_only() {
        let e = SecretRef::Env("LAR_TEST_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable LAR_TEST_SURELY_UNSET_VAR is not set (or not UTF-8)"
        );
    }
}
