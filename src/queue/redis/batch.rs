//! Per-job scripts on Redis, batched across jobs. Every in-flight job hands its call (a step
//! save, a finish) to one task per script, which runs whatever has gathered as a single Lua
//! call and answers each job on its own. A job still waits one round trip, but 64 jobs share
//! it: Redis runs one script instead of 64, and the worker makes one write and one read.
//!
//! The script body is written for one job, against `K` (its keys) and `A` (its arguments), and
//! returns an integer; each job's part is checked (fenced) on its own, exactly as if it ran
//! alone. Atomicity is per job, which is all the per-job scripts promised.

use crate::queue::QueueError;
use ::redis::aio::ConnectionManager;
use ::redis::Script;
use tokio::sync::{mpsc, oneshot};

/// The most calls run as one script, and the most argument bytes.
const MAX_BATCH: usize = 128;
const MAX_BATCH_BYTES: usize = 8 << 20;

/// One job's call: its keys and arguments, in the order the body reads them.
struct Call {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    done: oneshot::Sender<Result<i64, QueueError>>,
}

impl Call {
    fn size(&self) -> usize {
        self.args.iter().map(Vec::len).sum::<usize>() + 64 * self.keys.len()
    }
}

/// A per-job Lua body run in batches; the task ends when the handle is dropped.
pub(in crate::queue) struct BatchedScript {
    tx: mpsc::UnboundedSender<Call>,
    name: &'static str,
}

impl BatchedScript {
    /// `keys` and `args`: how many of each one job's call has (checked on every call).
    /// `prelude`: Lua functions the body calls, defined once per script call.
    pub fn start(
        name: &'static str,
        prelude: &str,
        body: &str,
        keys: usize,
        args: usize,
        conn: ConnectionManager,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Script::new(&format!("{prelude}{}", wrap(body)));
        tokio::spawn(run(script, (keys, args), conn, rx));
        BatchedScript { tx, name }
    }

    /// Runs the body for one job; resolves with its return value.
    pub async fn call(&self, keys: Vec<String>, args: Vec<Vec<u8>>) -> Result<i64, QueueError> {
        let (done, wait) = oneshot::channel();
        let stopped =
            || QueueError::Transport(format!("the Redis {} writer has stopped", self.name));
        self.tx
            .send(Call { keys, args, done })
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

/// The batch script: the body as a function of its offsets into KEYS and ARGV, called once
/// per job in the batch. `K[n]` and `A[n]` become `KEYS[k + n]` and `ARGV[a + n]`: no table is
/// built per job.
fn wrap(body: &str) -> String {
    let body = rebase(&rebase(body, 'K', "KEYS[k + "), 'A', "ARGV[a + ");
    format!(
        "local function one(k, a)\n{body}\nend
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {{}}
for i = 0, #KEYS / nk - 1 do
  out[i + 1] = one(i * nk, 2 + i * na)
end
return out
"
    )
}

async fn run(
    script: Script,
    (nk, na): (usize, usize),
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Call>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(c) => {
                    bytes += c.size();
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        let (good, bad): (Vec<Call>, Vec<Call>) = batch
            .into_iter()
            .partition(|c| c.keys.len() == nk && c.args.len() == na);
        for c in bad {
            let _ = c.done.send(Err(QueueError::Unsupported(format!(
                "script call with {} keys and {} arguments, expected {nk} and {na}",
                c.keys.len(),
                c.args.len()
            ))));
        }
        if good.is_empty() {
            continue;
        }
        let mut inv = script.prepare_invoke();
        inv.arg(nk).arg(na);
        for c in &good {
            for k in &c.keys {
                inv.key(k);
            }
            for a in &c.args {
                inv.arg(a);
            }
        }
        match inv.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(codes) if codes.len() == good.len() => {
                for (c, code) in good.into_iter().zip(codes) {
                    let _ = c.done.send(Ok(code));
                }
            }
            Ok(codes) => {
                let msg = format!("a batch of {} got {} answers", good.len(), codes.len());
                for c in good {
                    let _ = c.done.send(Err(QueueError::Corrupt(msg.clone())));
                }
            }
            Err(e) => {
                // Each job gets the error itself, so whether a retry can help stays known.
                for c in good {
                    let _ = c.done.send(Err(QueueError::Redis(e.clone())));
                }
            }
        }
    }
}

/// Replaces `<name>[` with `with`, only where `name` is a whole identifier (`DATA[` and
/// `t.A[` stay as they are).
fn rebase(body: &str, name: char, with: &str) -> String {
    let mut out = String::with_capacity(body.len() + 64);
    let mut prev: Option<char> = None;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        let starts_identifier =
            !matches!(prev, Some(p) if p.is_ascii_alphanumeric() || p == '_' || p == '.');
        if c == name && starts_identifier && chars.peek() == Some(&'[') {
            chars.next();
            out.push_str(with);
            prev = Some('[');
            continue;
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rebase;

    #[test]
    fn only_whole_names_are_rebased() {
        let body = "if K[1] == A[2] then DATA[1] = t.A[1] .. KA[3] .. (A[4]) end";
        assert_eq!(
            rebase(&rebase(body, 'K', "KEYS[k + "), 'A', "ARGV[a + "),
            "if KEYS[k + 1] == ARGV[a + 2] then DATA[1] = t.A[1] .. KA[3] .. (ARGV[a + 4]) end"
        );
    }
}
