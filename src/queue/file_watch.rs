//! Wakes the embedded backend's idle claims when the queue file changes. SQLite in WAL mode
//! appends every commit to `<file>-wal`, so an inotify watch on the file's directory sees another
//! process's enqueue (or decision, or hand-back) the moment it commits, and an idle worker picks
//! the job up at once instead of at its next poll.
//!
//! The watch is armed only while some claim waits idle ([`FileWatch::idle`]): every write to a
//! watched file costs the writer an event, and a busy backend's own commits (tens of writes per
//! job) measured about 100 µs of kernel time per job with the watch always on.
//!
//! The watch is an optimisation only: where it cannot be set up (the per-user inotify limits
//! reached) or it ends (its stream fails, the directory goes), [`FileWatch::live`] turns false
//! and claims poll as they did before.

use futures::FutureExt;
use inotify::{EventMask, Inotify, StreamExt, WatchDescriptor, WatchMask, Watches};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// The least time between two wakes: a busy writer beside an idle claim (another replica on
/// the host) costs that claim a look every few ms, not one per write.
const PACE: std::time::Duration = std::time::Duration::from_millis(5);

/// A watch on one SQLite file; stops when dropped.
pub(super) struct FileWatch {
    live: Arc<AtomicBool>,
    arm: Arc<Arm>,
    task: tokio::task::JoinHandle<()>,
}

/// The directory watch, added while at least one claim waits idle and removed after.
struct Arm {
    watches: Mutex<Watches>,
    dir: PathBuf,
    /// Idle claims, and the watch while there are any.
    state: Mutex<(usize, Option<WatchDescriptor>)>,
}

const MASK: WatchMask = WatchMask::MODIFY
    .union(WatchMask::CREATE)
    .union(WatchMask::MOVED_TO);

impl Arm {
    fn state(&self) -> MutexGuard<'_, (usize, Option<WatchDescriptor>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watches(&self) -> MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `wd` is the watch armed now (an `IGNORED` for it means the directory went).
    fn is_current(&self, wd: &WatchDescriptor) -> bool {
        self.state().1.as_ref() == Some(wd)
    }
}

/// A claim waiting idle: the watch stays armed while one lives.
pub(super) struct Idle {
    arm: Arc<Arm>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        let mut state = self.arm.state();
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 {
            if let Some(wd) = state.1.take() {
                // Removing makes the kernel send `IGNORED` for it: no longer current, so the
                // watcher lets it pass.
                let _ = self.arm.watches().remove(wd);
            }
        }
    }
}

impl FileWatch {
    /// Starts watching `db` (and its `-wal` and `-journal` companions) on the current tokio
    /// runtime, waking every waiter of `changed` at each change while armed; `None` where no
    /// watch can be set up.
    pub fn start(db: &Path, changed: Arc<Notify>) -> Option<Self> {
        // SQLite puts the WAL beside the file a symlink points to.
        let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
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
        // Armed once now, so a directory that cannot be watched is known at the start.
        let mut watches = inotify.watches();
        match watches.add(&dir, MASK) {
            Ok(wd) => {
                let _ = watches.remove(wd);
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "embedded queue: cannot watch the queue's directory; idle workers poll the file");
                return None;
            }
        }
        let stream = match inotify.into_event_stream(vec![0u8; 4096]) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "embedded queue: cannot stream inotify events; idle workers poll the file");
                return None;
            }
        };
        let live = Arc::new(AtomicBool::new(true));
        let arm = Arc::new(Arm {
            watches: Mutex::new(watches),
            dir,
            state: Mutex::new((0, None)),
        });
        let ours = companions(&name);
        let task = tokio::spawn({
            let (live, arm) = (Arc::clone(&live), Arc::clone(&arm));
            async move {
                let mut stream = stream;
                'watch: while let Some(first) = stream.next().await {
                    // Everything already read goes as one wake; the pause after it lets the
                    // kernel fold a writer's identical events into one, so a flood of commits
                    // costs a wake every few ms, not one per write.
                    let mut wake = false;
                    let mut next = Some(first);
                    while let Some(event) = next.take() {
                        match event {
                            Ok(e) if e.mask.contains(EventMask::IGNORED) => {
                                // The directory went (or its filesystem): nothing more will
                                // come. (A disarmed watch's `IGNORED` is not current.)
                                if arm.is_current(&e.wd) {
                                    warn!("embedded queue: the watched directory is gone; idle workers poll the file");
                                    break 'watch;
                                }
                            }
                            // An overflowed queue has no name: it may hide one of ours.
                            Ok(e) => wake |= e.name.as_ref().is_none_or(|n| ours.contains(n)),
                            Err(e) => {
                                debug!(error = %e, "embedded queue: the file watch failed; idle workers poll the file");
                                break 'watch;
                            }
                        }
                        next = stream.next().now_or_never().flatten();
                    }
                    if wake {
                        changed.notify_waiters();
                        tokio::time::sleep(PACE).await;
                    }
                }
                live.store(false, Ordering::SeqCst);
                // Whoever waits now would wait for nothing: let them poll.
                changed.notify_waiters();
            }
        });
        Some(FileWatch { live, arm, task })
    }

    /// Arms the watch for a claim about to wait idle (before it looks at the file, so a commit
    /// in between is seen); `None` when it cannot be armed (the caller polls).
    pub fn idle(&self) -> Option<Idle> {
        if !self.live() {
            return None;
        }
        let mut state = self.arm.state();
        if state.1.is_none() {
            match self.arm.watches().add(&self.arm.dir, MASK) {
                Ok(wd) => state.1 = Some(wd),
                Err(e) => {
                    // The directory went while no claim waited (its `IGNORED` was not for a
                    // current watch): the watch is over.
                    warn!(error = %e, "embedded queue: cannot watch the queue's directory any more; idle workers poll the file");
                    self.live.store(false, Ordering::SeqCst);
                    return None;
                }
            }
        }
        state.0 += 1;
        Some(Idle {
            arm: Arc::clone(&self.arm),
        })
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
        let idle = watch.idle().expect("armed");

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

        // No claim waits idle: disarmed, the writes cost nothing and wake nobody.
        drop(idle);
        let quiet = changed.notified();
        tokio::pin!(quiet);
        quiet.as_mut().enable();
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(dir.path().join("q.db-wal"), b"frame 2").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), quiet)
                .await
                .is_err(),
            "a disarmed watch woke a waiter"
        );
        assert!(watch.live(), "disarming is not the directory going");
        let _again = watch.idle().expect("armed again");
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        std::fs::write(dir.path().join("q.db-wal"), b"frame 3").unwrap();
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("armed again, it wakes again");
    }

    #[tokio::test]
    async fn a_symlinked_file_is_watched_where_its_wal_is() {
        let dir = tempfile::tempdir().unwrap();
        let (real, links) = (dir.path().join("real"), dir.path().join("links"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&links).unwrap();
        std::fs::write(real.join("q.db"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("q.db"), links.join("q.db")).unwrap();
        let changed = Arc::new(Notify::new());
        let watch = FileWatch::start(&links.join("q.db"), Arc::clone(&changed)).unwrap();
        let _idle = watch.idle().unwrap();
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        std::fs::write(real.join("q.db-wal"), b"frame").unwrap();
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("the WAL beside the real file wakes the waiter");
    }

    #[tokio::test]
    async fn a_watch_whose_directory_goes_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("queue");
        std::fs::create_dir_all(&sub).unwrap();
        let watch = FileWatch::start(&sub.join("q.db"), Arc::new(Notify::new())).unwrap();
        assert!(watch.live());
        let _idle = watch.idle().unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while watch.live() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!watch.live(), "claims would wait for wakes that never come");
    }
}
