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

/// Group commit for the daemon's audit logs: one thread writes every finished log to an
/// unnamed file (`O_TMPFILE`, or a named temporary file where the filesystem lacks it), makes
/// the whole batch durable with a single `syncfs`, links (or renames) each into place, and
/// fsyncs each directory once. Hundreds of concurrent jobs then share two flushes instead of
/// paying two each, and a log appears under its name only whole. An unnamed file costs one
/// directory update where a temporary file costs three (create, and rename's remove and add).
#[derive(Clone, Debug)]
pub struct LogWriter {
    tx: tokio::sync::mpsc::UnboundedSender<WriteRequest>,
}

#[derive(Debug)]
struct WriteRequest {
    dir: PathBuf,
    name: String,
    bytes: Vec<u8>,
    /// How many steps the log holds (see [`LogWriter::write`]).
    steps: usize,
    durable: bool,
    done: tokio::sync::oneshot::Sender<std::io::Result<PathBuf>>,
}

/// The most logs committed together (each holds a descriptor until it is linked).
const MAX_BATCH: usize = 256;

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

    /// Writes the run log `dir/name`, holding `steps` steps, atomically and (with `durable`)
    /// durably; resolves once it is. A run's log only grows, so a log of the same run already
    /// there with more steps is kept: it was written by a later holder of the job, and this
    /// write comes from a holder cut off since (frozen past its lease, say), whose finish will
    /// be fenced off. Without that rule its shorter log would replace the evidence of the
    /// finished run.
    pub async fn write(
        &self,
        dir: &Path,
        name: String,
        bytes: Vec<u8>,
        steps: usize,
        durable: bool,
    ) -> std::io::Result<PathBuf> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let req = WriteRequest {
            dir: dir.to_path_buf(),
            name,
            bytes,
            steps,
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
    let mut staged: Vec<(WriteRequest, std::io::Result<Staged>)> = Vec::with_capacity(batch.len());
    for r in batch {
        if !dirs.contains(&r.dir) {
            if let Err(e) = std::fs::create_dir_all(&r.dir) {
                staged.push((r, Err(e)));
                continue;
            }
            dirs.push(r.dir.clone());
        }
        let res = Staged::write(&r.dir, &r.name, &r.bytes);
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
            (Ok(staged), Ok(())) => staged.place(&r.dir, &r.name, r.steps),
            (Ok(staged), Err(e)) => {
                staged.discard();
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

/// A log written but not yet under its name.
enum Staged {
    /// An unnamed inode in the directory (`O_TMPFILE`): nothing to clean up if dropped.
    Unnamed(std::fs::File),
    /// A named temporary file, where the filesystem has no `O_TMPFILE`.
    Named(PathBuf),
}

impl Staged {
    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<Staged> {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(mut f) => {
                f.write_all(bytes)?;
                Ok(Staged::Unnamed(f))
            }
            // Filesystems without it answer EOPNOTSUPP (older kernels EISDIR or EINVAL).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                let tmp = temp_path(dir, name);
                std::fs::write(&tmp, bytes)?;
                Ok(Staged::Named(tmp))
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the written file (a log of `steps` steps) its name. An existing log of that name
    /// (the run paused, or finished twice across a crash) is replaced whole, unless it holds
    /// more steps (see [`LogWriter::write`]).
    fn place(self, dir: &Path, name: &str, steps: usize) -> std::io::Result<PathBuf> {
        let dest = dir.join(name);
        if let Staged::Unnamed(f) = &self {
            match link_unnamed(f, &dest) {
                Ok(()) => return Ok(dest),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        // A log of this run is (or may be) there: compare and replace under the directory's
        // lock, so replicas of one host replacing the same log take turns.
        let _lock = DirLock::take(dir)?;
        if steps_in(&dest).is_some_and(|there| there > steps) {
            tracing::warn!(log = %dest.display(), steps, "a longer log of this run is already in place (written by a later holder of the job): kept");
            self.discard();
            return Ok(dest);
        }
        let tmp = match self {
            Staged::Named(tmp) => tmp,
            Staged::Unnamed(f) => {
                let tmp = temp_path(dir, name);
                let _ = std::fs::remove_file(&tmp);
                link_unnamed(&f, &tmp)?;
                tmp
            }
        };
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => Ok(dest),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn discard(self) {
        if let Staged::Named(tmp) = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// How many steps the run log at `path` holds; `None` when there is none or it is unreadable
/// (then it is replaced).
fn steps_in(path: &Path) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Steps {
        steps: Vec<serde::de::IgnoredAny>,
    }
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Steps>(&bytes)
        .ok()
        .map(|s| s.steps.len())
}

/// An exclusive `flock` on the directory's `.lar-audit.lock`, held while a log is compared
/// with the one in place and replaced; released when dropped.
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn take(dir: &Path) -> std::io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lar-audit.lock"))?;
        // SAFETY: flock only reads the descriptor, which `f` keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock { _file: f })
    }
}

fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Links an `O_TMPFILE` file into the directory tree (open(2): `linkat` through
/// `/proc/self/fd`, which needs no capability, unlike `AT_EMPTY_PATH`).
fn link_unnamed(f: &std::fs::File, dest: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from =
        CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(std::io::Error::other)?;
    let to = CString::new(dest.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn group_commit_writes_whole_files_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let w = LogWriter::start().unwrap();
        let mut handles = Vec::new();
        for i in 0..20 {
            let w = w.clone();
            let d = dir.path().to_path_buf();
            handles.push(tokio::spawn(async move {
                w.write(&d, format!("run_{i}.json"), vec![b'x'; 1000 + i], 1, true)
                    .await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let got = names(dir.path());
        assert_eq!(got.len(), 20, "{got:?}");
        for i in 0..20 {
            let b = std::fs::read(dir.path().join(format!("run_{i}.json"))).unwrap();
            assert_eq!(b.len(), 1000 + i);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("run_0.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644 & !umask(), "{mode:o}");
    }

    #[tokio::test]
    async fn a_second_write_of_the_same_name_replaces_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let w = LogWriter::start().unwrap();
        w.write(dir.path(), "run_a.json".into(), b"first".to_vec(), 1, true)
            .await
            .unwrap();
        w.write(dir.path(), "run_a.json".into(), b"second".to_vec(), 1, true)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("run_a.json")).unwrap(),
            b"second"
        );
        // The lock the replacement took stays (empty); no temporary file does.
        assert_eq!(names(dir.path()), [".lar-audit.lock", "run_a.json"]);
    }

    /// A cut-off holder finishing late (its halted log of 2 steps) must not replace the log
    /// of the run a later holder finished (6 steps); a log with as many steps or more does.
    #[tokio::test]
    async fn a_shorter_log_of_the_run_never_replaces_a_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        let w = LogWriter::start().unwrap();
        let log = |n: usize, tag: &str| {
            let steps: Vec<serde_json::Value> =
                (0..n).map(|i| serde_json::json!({"step": i})).collect();
            serde_json::to_vec(&serde_json::json!({"tag": tag, "steps": steps})).unwrap()
        };
        let read = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(dir.path().join("run_r.json")).unwrap()).unwrap()
        };
        w.write(dir.path(), "run_r.json".into(), log(6, "finished"), 6, true)
            .await
            .unwrap();
        let kept = w
            .write(dir.path(), "run_r.json".into(), log(2, "stale"), 2, true)
            .await
            .unwrap();
        assert_eq!(kept, dir.path().join("run_r.json"));
        assert_eq!(read()["tag"], "finished");
        w.write(dir.path(), "run_r.json".into(), log(6, "again"), 6, true)
            .await
            .unwrap();
        assert_eq!(read()["tag"], "again");
        w.write(dir.path(), "run_r.json".into(), log(7, "longer"), 7, true)
            .await
            .unwrap();
        assert_eq!(read()["tag"], "longer");
        assert_eq!(names(dir.path()), [".lar-audit.lock", "run_r.json"]);
    }

    #[test]
    fn a_named_temporary_file_is_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = temp_path(dir.path(), "run_b.json");
        std::fs::write(&tmp, b"named").unwrap();
        let placed = Staged::Named(tmp)
            .place(dir.path(), "run_b.json", 1)
            .unwrap();
        assert_eq!(std::fs::read(placed).unwrap(), b"named");
        assert_eq!(names(dir.path()), [".lar-audit.lock", "run_b.json"]);
    }

    fn umask() -> u32 {
        // SAFETY: umask only swaps the process mask; it is restored at once.
        unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m as u32
        }
    }
}
