//! The run store's tables (as `.sql` files beside this one), opening a SQLite file in WAL mode,
//! and the one epoch sequence every claim of the file draws from. The embedded backend's queue
//! file holds the same run tables.

use crate::queue::QueueError;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

pub(super) const SCHEMA: &str = include_str!("sql/schema.sql");

/// The checkpoint and journal tables, shared with the embedded backend's file.
pub(in crate::queue) const RUN_TABLES: &str = include_str!("sql/run_tables.sql");

/// Starts the file's epoch sequence, once, above `highest` (the largest epoch the file already
/// holds, for files from before the sequence). Epochs come from this one sequence, never from
/// a per-job counter: a job's row or entry goes when its run ends, and a counter started again
/// at 1 would meet a cut-off holder that still has the old epoch.
pub(in crate::queue) fn seed_epoch_seq(conn: &Connection, highest: &str) -> Result<(), QueueError> {
    conn.execute(
        &format!("INSERT OR IGNORE INTO epoch_seq (id, n) VALUES (1, COALESCE(({highest}), 0))"),
        [],
    )?;
    Ok(())
}

/// The next epoch of the file's sequence (see [`seed_epoch_seq`]).
pub(in crate::queue) fn next_epoch(conn: &Connection) -> Result<i64, QueueError> {
    Ok(conn
        .prepare_cached("UPDATE epoch_seq SET n = n + 1 WHERE id = 1 RETURNING n")?
        .query_row([], |r| r.get(0))?)
}

pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a SQLite file in WAL mode with `busy` as its busy timeout. Switching a file to WAL
/// needs it to itself for a moment, and SQLite answers "database is locked" at once rather
/// than waiting when another process (a replica starting at the same time) has it open: the
/// switch is tried again until `busy` has passed.
pub(in crate::queue) fn open_wal(path: &Path, busy: Duration) -> Result<Connection, QueueError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    let deadline = std::time::Instant::now() + busy;
    let mode: String = loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(QueueError::Unsupported(format!(
            "{}: SQLite refused WAL mode (journal_mode is '{mode}')",
            path.display()
        )));
    }
    Ok(conn)
}

/// The store's column on `runs` (added to files from before it): when a retired run goes, in
/// ms since the epoch (see `RunStore::retire`); NULL for a live run. Its index holds only the
/// retired runs, so the sweep never reads the live ones. Runs inside the opening's immediate
/// transaction: replicas starting together must not both add the column.
pub(super) fn add_retire_at(tx: &rusqlite::Transaction<'_>) -> Result<(), QueueError> {
    let has: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('runs') WHERE name = 'retire_at'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        tx.execute_batch("ALTER TABLE runs ADD COLUMN retire_at INTEGER")?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_retired ON runs (queue, retire_at)
         WHERE retire_at IS NOT NULL",
    )?;
    Ok(())
}

/// Every table that holds something of a job's run.
pub(super) const JOB_TABLES: &[&str] = &[
    "runs",
    "run_steps",
    "epochs",
    "pending",
    "deciding",
    "deciding_confirmed",
];
