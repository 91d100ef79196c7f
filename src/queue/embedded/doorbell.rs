//! Wakes the embedded backend's idle claims when another process readies a job. Every write
//! that makes a job claimable (an enqueue, a decision, a retry or hand-back, a redrive, a
//! recovered lease) rings a doorbell: it writes a byte to `<queue file>-wake`. An inotify watch
//! on that one file wakes the waiting claims of every process on the queue at once, instead of
//! at their next poll.
//!
//! Why a doorbell and not a watch on the database's WAL: a watch costs every write to the
//! watched file an event, and a busy worker writes its WAL tens of times per job. With one
//! replica idle beside a busy one, a watch on the directory cost the busy one about 150 µs of
//! kernel time per job (throughput 955 and 897 jobs/s against 1,122 and 1,111 without it). The
//! doorbell is written only when a job becomes claimable.
//!
//! The watch is an optimisation only: where it cannot be set up (the per-user inotify limits
//! reached) or it ends (its stream fails, the doorbell file is removed), [`FileWatch::live`]
//! turns false and claims poll as they did before, until the backend starts a new watch. A writer that does not ring (a lar-worker
//! from before the doorbell) is seen at the claim's next poll.

use futures::FutureExt;
use inotify::{EventMask, Inotify, StreamExt, WatchMask};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// The least time between two wakes: a burst of rings (a bulk enqueue) costs a waiting claim a
/// look every few ms, not one per ring.
const PACE: std::time::Duration = std::time::Duration::from_millis(5);

/// The doorbell of the queue file `db`: beside the file itself (a symlink resolved), so every
/// process that names the file, by any path, rings and watches the same one.
pub(super) fn doorbell_path(db: &Path) -> PathBuf {
    let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    let mut name = db.as_os_str().to_os_string();
    name.push("-wake");
    PathBuf::from(name)
}

/// The doorbell, opened once by a backend to ring it.
pub(super) struct Doorbell {
    path: PathBuf,
    /// The queue file, whose owner and mode the doorbell takes.
    like: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Doorbell {
    /// Opens (creating) the doorbell at `path` for the queue file `like`; `None` where it
    /// cannot be (the claims of other processes then find this one's jobs at their next look).
    pub fn open(path: &Path, like: &Path) -> Option<Self> {
        match open_like(path, like) {
            Ok(file) => Some(Doorbell {
                path: path.to_path_buf(),
                like: like.to_path_buf(),
                file: Mutex::new(file),
            }),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "embedded queue: no doorbell; other processes see new jobs at their next look");
                None
            }
        }
    }

    /// Wakes every process watching: one byte written, nothing synced. A doorbell removed or
    /// replaced since it was opened is opened again, so the ring reaches today's watchers.
    pub fn ring(&self) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let inode = |m: std::io::Result<std::fs::Metadata>| m.map(|m| m.ino()).ok();
        if inode(std::fs::metadata(&self.path)) != inode(file.metadata()) {
            match open_like(&self.path, &self.like) {
                Ok(f) => *file = f,
                Err(e) => debug!(error = %e, "embedded queue: cannot open the doorbell again"),
            }
        }
        if let Err(e) = file.write_at(b"\n", 0) {
            debug!(error = %e, "embedded queue: cannot ring the doorbell");
        }
    }
}

/// Opens (creating) `path` with the owner and mode of the queue file `like`, as SQLite does for
/// its `-wal` and `-shm` files: a doorbell first made by root (`sudo lar-worker enqueue`) or
/// under a tight umask must still be writable and watchable by the service's user.
fn open_like(path: &Path, like: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    if let (Ok(queue), Ok(bell)) = (std::fs::metadata(like), file.metadata()) {
        // Only when they differ: a change is an event for the watchers (a wake for nothing,
        // and the real ring would then wait out the pace). Only the owner (or root) may change
        // them; anyone else leaves them as they are.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root && (bell.uid(), bell.gid()) != (queue.uid(), queue.gid()) {
            let _ = std::os::unix::fs::fchown(&file, Some(queue.uid()), Some(queue.gid()));
        }
        let mode = queue.mode() & 0o666;
        if bell.mode() & 0o777 != mode {
            let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
        }
    }
    Ok(file)
}

/// A watch on one doorbell; stops when dropped.
pub(super) struct FileWatch {
    live: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FileWatch {
    /// Starts watching the doorbell at `path` on the current tokio runtime, waking every
    /// waiter of `changed` at each ring; `None` where no watch can be set up.
    pub fn start(path: &Path, changed: Arc<Notify>) -> Option<Self> {
        let inotify = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "embedded queue: no inotify; idle workers poll the file");
                return None;
            }
        };
        if let Err(e) = inotify
            .watches()
            .add(path, WatchMask::MODIFY | WatchMask::ATTRIB)
        {
            warn!(path = %path.display(), error = %e, "embedded queue: cannot watch the doorbell; idle workers poll the file");
            return None;
        }
        let stream = match inotify.into_event_stream(vec![0u8; 1024]) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "embedded queue: cannot stream inotify events; idle workers poll the file");
                return None;
            }
        };
        let inode = std::fs::metadata(path).map(|m| m.ino()).ok();
        let path = path.to_path_buf();
        let live = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let live = Arc::clone(&live);
            async move {
                let mut stream = stream;
                'watch: while let Some(first) = stream.next().await {
                    // Everything already read goes as one wake; the pause after it lets the
                    // kernel fold the rings that follow into one event.
                    let mut next = Some(first);
                    while let Some(event) = next.take() {
                        match event {
                            // Removed (unlinked while open, it shows as a change of its link
                            // count), or its filesystem went: the rings of processes that open
                            // the doorbell from now on would not reach this watch.
                            Ok(e) if gone(&e.mask, &path, inode) => {
                                warn!("embedded queue: the doorbell is gone; idle workers poll the file");
                                break 'watch;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                debug!(error = %e, "embedded queue: the doorbell watch failed; idle workers poll the file");
                                break 'watch;
                            }
                        }
                        next = stream.next().now_or_never().flatten();
                    }
                    changed.notify_waiters();
                    tokio::time::sleep(PACE).await;
                }
                live.store(false, Ordering::SeqCst);
                // Whoever waits now would wait for nothing: let them poll.
                changed.notify_waiters();
            }
        });
        Some(FileWatch { live, task })
    }

    /// Whether rings are still being watched (else the caller polls).
    pub fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst) && !self.task.is_finished()
    }
}

/// Whether an event says the doorbell at `path` (the file whose inode is `inode`) is gone.
fn gone(mask: &EventMask, path: &Path, inode: Option<u64>) -> bool {
    mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF)
        || (mask.contains(EventMask::ATTRIB)
            && (inode.is_none() || std::fs::metadata(path).map(|m| m.ino()).ok() != inode))
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A queue file in a new directory, its doorbell path and a doorbell opened on it.
    fn queue_file() -> (tempfile::TempDir, PathBuf, PathBuf, Doorbell) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        std::fs::write(&db, b"").unwrap();
        let bell = doorbell_path(&db);
        let ringer = Doorbell::open(&bell, &db).unwrap();
        (dir, db, bell, ringer)
    }

    async fn wakes(changed: &Notify, act: impl FnOnce(), within: Duration) -> bool {
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        act();
        tokio::time::timeout(within, woken).await.is_ok()
    }

    #[tokio::test]
    async fn a_ring_wakes_a_waiter_and_database_writes_do_not() {
        let (dir, db, bell, ringer) = queue_file();
        let changed = Arc::new(Notify::new());
        let watch = FileWatch::start(&bell, Arc::clone(&changed)).expect("inotify on Linux");
        assert!(watch.live());
        let wal = dir.path().join("q.db-wal");
        assert!(
            !wakes(
                &changed,
                || std::fs::write(&wal, b"frame").unwrap(),
                Duration::from_millis(300)
            )
            .await,
            "a WAL write woke the claim"
        );
        assert!(wakes(&changed, || ringer.ring(), Duration::from_secs(10)).await);
        tokio::time::sleep(PACE * 2).await;
        // Another process opening the doorbell wakes nobody (its ring would otherwise wait
        // out the pace); its ring wakes the waiter the same way.
        let mut other = None;
        assert!(
            !wakes(
                &changed,
                || other = Doorbell::open(&bell, &db),
                Duration::from_millis(300)
            )
            .await,
            "opening the doorbell woke the claim"
        );
        let other = other.unwrap();
        assert!(wakes(&changed, || other.ring(), Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn a_symlinked_file_shares_its_doorbell() {
        let dir = tempfile::tempdir().unwrap();
        let (real, links) = (dir.path().join("real"), dir.path().join("links"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&links).unwrap();
        std::fs::write(real.join("q.db"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("q.db"), links.join("q.db")).unwrap();
        assert_eq!(
            doorbell_path(&links.join("q.db")),
            doorbell_path(&real.join("q.db"))
        );
    }

    #[tokio::test]
    async fn a_replaced_doorbell_is_rung_where_watchers_are_now() {
        let (_dir, db, bell, ringer) = queue_file();
        std::fs::remove_file(&bell).unwrap();
        // A process started since finds no doorbell, makes a new one and watches that.
        let _its_bell = Doorbell::open(&bell, &db).unwrap();
        let changed = Arc::new(Notify::new());
        let _watch = FileWatch::start(&bell, Arc::clone(&changed)).unwrap();
        assert!(wakes(&changed, || ringer.ring(), Duration::from_secs(10)).await);
    }

    #[test]
    fn the_doorbell_takes_the_queue_files_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o664)).unwrap();
        let bell = doorbell_path(&db);
        // Made first under a tight umask (or by another tool): the backend widens it to the
        // queue file's mode, so the service's group can ring and watch it.
        std::fs::write(&bell, b"").unwrap();
        std::fs::set_permissions(&bell, std::fs::Permissions::from_mode(0o600)).unwrap();
        let _ringer = Doorbell::open(&bell, &db).unwrap();
        let mode = std::fs::metadata(&bell).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o664);
    }

    #[tokio::test]
    async fn a_watch_whose_doorbell_goes_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let bell = dir.path().join("q.db-wake");
        let _ringer = Doorbell::open(&bell, &bell).unwrap();
        let watch = FileWatch::start(&bell, Arc::new(Notify::new())).unwrap();
        assert!(watch.live());
        std::fs::remove_file(&bell).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while watch.live() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!watch.live(), "claims would wait for rings that never come");
    }
}
