//! Atomic file writes: a temporary file in the same directory, fsync, rename, fsync the
//! directory. A reader never sees a truncated log, and a crash leaves either nothing or all.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `dir/name` atomically; with `durable`, fsyncs the file and the directory.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    durable: bool,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let final_path = dir.join(name);
    let tmp_path = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp_path)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp_path, &final_path)?;
        if durable {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(final_path.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result
}

/// Group commit for the daemon's audit logs: one thread writes every finished log to a
/// temporary file, makes the whole batch durable with a single `syncfs`, renames each into
/// place, and fsyncs each directory once. Hundreds of concurrent jobs then share two flushes
/// instead of paying two each, and directory updates do not contend across threads.
#[derive(Clone, Debug)]
pub struct LogWriter {
    tx: tokio::sync::mpsc::UnboundedSender<WriteRequest>,
}

#[derive(Debug)]
struct WriteRequest {
    dir: PathBuf,
    name: String,
    bytes: Vec<u8>,
    durable: bool,
    done: tokio::sync::oneshot::Sender<std::io::Result<PathBuf>>,
}

/// The most logs committed together.
const MAX_BATCH: usize = 512;

impl LogWriter {
    /// Starts the writer thread; it ends when every handle is dropped.
    pub fn start() -> std::io::Result<LogWriter> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WriteRequest>();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    commit_batch(batch);
                }
            })?;
        Ok(LogWriter { tx })
    }

    /// Writes `dir/name` atomically and (with `durable`) durably; resolves once it is.
    pub async fn write(
        &self,
        dir: &Path,
        name: String,
        bytes: Vec<u8>,
        durable: bool,
    ) -> std::io::Result<PathBuf> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let req = WriteRequest {
            dir: dir.to_path_buf(),
            name,
            bytes,
            durable,
            done,
        };
        self.tx
            .send(req)
            .map_err(|_| std::io::Error::other("the audit writer thread has stopped"))?;
        wait.await
            .map_err(|_| std::io::Error::other("the audit writer thread has stopped"))?
    }
}

fn commit_batch(batch: Vec<WriteRequest>) {
    let durable = batch.iter().any(|r| r.durable);
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut staged: Vec<(WriteRequest, std::io::Result<PathBuf>)> = Vec::with_capacity(batch.len());
    for r in batch {
        if !dirs.contains(&r.dir) {
            if let Err(e) = std::fs::create_dir_all(&r.dir) {
                staged.push((r, Err(e)));
                continue;
            }
            dirs.push(r.dir.clone());
        }
        let tmp = r
            .dir
            .join(format!(".{}.{}.tmp", r.name, std::process::id()));
        let res = std::fs::write(&tmp, &r.bytes).map(|_| tmp);
        staged.push((r, res));
    }
    let flushed = if durable {
        sync_filesystem(&dirs)
    } else {
        Ok(())
    };
    let mut renamed = Vec::with_capacity(staged.len());
    for (r, res) in staged {
        let res = match (res, &flushed) {
            (Ok(tmp), Ok(())) => {
                let dest = r.dir.join(&r.name);
                match std::fs::rename(&tmp, &dest) {
                    Ok(()) => Ok(dest),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        Err(e)
                    }
                }
            }
            (Ok(tmp), Err(e)) => {
                let _ = std::fs::remove_file(&tmp);
                Err(std::io::Error::new(e.kind(), e.to_string()))
            }
            (Err(e), _) => Err(e),
        };
        renamed.push((r, res));
    }
    let dir_sync: Result<(), String> = if durable {
        dirs.iter()
            .try_for_each(|d| std::fs::File::open(d).and_then(|f| f.sync_all()))
            .map_err(|e| e.to_string())
    } else {
        Ok(())
    };
    for (r, res) in renamed {
        let res = match (res, &dir_sync) {
            (Ok(p), Ok(())) => Ok(p),
            (Ok(_), Err(e)) => Err(std::io::Error::other(format!(
                "directory fsync failed: {e}"
            ))),
            (Err(e), _) => Err(e),
        };
        let _ = r.done.send(res);
    }
}

/// One `syncfs(2)` per filesystem the batch touched: every staged file is on disk after it.
fn sync_filesystem(dirs: &[PathBuf]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for d in dirs {
        let f = std::fs::File::open(d)?;
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
        let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
