//! Wakes the embedded backend's idle claims when the queue file changes. SQLite in WAL mode
//! appends every commit to `<file>-wal`, so an inotify watch on the file's directory sees another
//! process's enqueue (or decision, or hand-back) the moment it commits, and an idle worker picks
//! the job up at once instead of at its next poll.
//!
//! The watch is an optimisation only: where inotify is unavailable (another OS, the per-user
//! watch limit reached) or its stream fails, [`FileWatch::live`] turns false and claims poll as
//! they did before.

use inotify::{Inotify, StreamExt, WatchMask};
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// A watch on one SQLite file; stops when dropped.
pub(super) struct FileWatch {
    live: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FileWatch {
    /// Starts watching `db` (and its `-wal` and `-journal` companions) on the current tokio
    /// runtime, waking every waiter of `changed` at each change; `None` where no watch can be
    /// set up.
    pub fn start(db: &Path, changed: Arc<Notify>) -> Option<Self> {
        let name = db.file_name()?.to_os_string();
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        };
        let inotify = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "embedded queue: no inotify; idle workers poll the file");
                return None;
            }
        };
        let mask = WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MOVED_TO;
        if let Err(e) = inotify.watches().add(&dir, mask) {
            warn!(dir = %dir.display(), error = %e, "embedded queue: cannot watch the queue's directory; idle workers poll the file");
            return None;
        }
        let stream = match inotify.into_event_stream(vec![0u8; 4096]) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "embedded queue: cannot stream inotify events; idle workers poll the file");
                return None;
            }
        };
        let live = Arc::new(AtomicBool::new(true));
        let ours = companions(&name);
        let task = tokio::spawn({
            let live = Arc::clone(&live);
            async move {
                let mut stream = stream;
                while let Some(event) = stream.next().await {
                    match event {
                        // An overflowed queue has no name: it may hide one of ours.
                        Ok(e) if e.name.as_ref().is_none_or(|n| ours.contains(n)) => {
                            changed.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!(error = %e, "embedded queue: the file watch failed; idle workers poll the file");
                            break;
                        }
                    }
                }
                live.store(false, Ordering::SeqCst);
                // Whoever waits now would wait for nothing: let them poll.
                changed.notify_waiters();
            }
        });
        Some(FileWatch { live, task })
    }

    /// Whether changes are still being watched (else the caller polls).
    pub fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst) && !self.task.is_finished()
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The file names a commit to `name` touches: the database, its WAL and its rollback journal.
fn companions(name: &OsString) -> [OsString; 3] {
    let with = |suffix: &str| {
        let mut n = name.clone();
        n.push(suffix);
        n
    };
    [name.clone(), with("-wal"), with("-journal")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_to_the_wal_wakes_a_waiter_and_other_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let changed = Arc::new(Notify::new());
        let watch = FileWatch::start(&db, Arc::clone(&changed)).expect("inotify on Linux");
        assert!(watch.live());

        let other = changed.notified();
        tokio::pin!(other);
        other.as_mut().enable();
        std::fs::write(dir.path().join("q.db.bak"), b"x").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), other)
                .await
                .is_err(),
            "a file that is not the queue's woke the claim"
        );

        let ours = changed.notified();
        tokio::pin!(ours);
        ours.as_mut().enable();
        std::fs::write(dir.path().join("q.db-wal"), b"frame").unwrap();
        tokio::time::timeout(Duration::from_secs(10), ours)
            .await
            .expect("a commit to the WAL wakes the waiter");
    }
}
