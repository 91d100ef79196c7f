//! The embedded queue file's schema and its migrations: the tables this backend keeps (the SQL
//! is in `sql/`, next to this file) and the step that creates them in a new file or brings an
//! older file up to [`SCHEMA_VERSION`] when a backend opens it.

use crate::queue::QueueError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;

/// The schema version this code writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 4;

/// The tables of the queue file (the run tables come from `run_store::sqlite::RUN_TABLES`).
pub(super) const SCHEMA: &str = include_str!("sql/schema.sql");

/// The largest epoch a file from before the epoch sequence holds (the sequence starts above
/// it). Epochs come from the sequence (`run_store::sqlite::next_epoch`): a job's row goes when it
/// ends, and a redrive or a re-sent id comes back as a new row, so epochs counted per row would
/// start again where a stalled task of this process may still hold the old one (`save_step`
/// and `extend` fence on the id and epoch).
const HIGHEST_EPOCH: &str =
    "SELECT MAX(e) FROM (SELECT MAX(epoch) AS e FROM jobs UNION ALL SELECT MAX(epoch) FROM pending)";

/// Version 2 added durable runs: a decision travelling with a resumed job, plus the `runs`,
/// `run_steps` and `pending` tables (created by [`SCHEMA`]).
const MIGRATE_TO_2: &str = include_str!("sql/migrate_to_2.sql");

/// Version 3 keeps a paused job's epoch with its pending record, so the claim that resumes it
/// gets a newer epoch than every earlier holder.
const MIGRATE_TO_3: &str = include_str!("sql/migrate_to_3.sql");

/// Version 4 counts a job's recoveries: how many of its claims `recover` took back from a
/// holder whose lease ran out (see `Claim::recoveries`).
const MIGRATE_TO_4: &str = include_str!("sql/migrate_to_4.sql");

/// Creates the schema where it is missing and migrates an older file to [`SCHEMA_VERSION`], in
/// one write transaction; refuses a file from a newer lar-worker (`path` names it in the error).
pub(super) fn create_or_migrate(conn: &mut Connection, path: &Path) -> Result<(), QueueError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::Conflict(format!(
            "{}: queue schema version {version} is newer than this lar-worker understands ({SCHEMA_VERSION})",
            path.display()
        )));
    }
    let had_jobs: bool = tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if had_jobs && version < 2 {
        tx.execute_batch(MIGRATE_TO_2)?;
    }
    // Version 2 files have a `pending` table without `epoch`; older ones get the whole
    // table from SCHEMA below.
    if had_jobs && version == 2 {
        tx.execute_batch(MIGRATE_TO_3)?;
    }
    // Every file from before version 4 has a `jobs` table without `recoveries`.
    if had_jobs && version < 4 {
        tx.execute_batch(MIGRATE_TO_4)?;
    }
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(crate::queue::run_store::sqlite::RUN_TABLES)?;
    crate::queue::run_store::sqlite::seed_epoch_seq(&tx, HIGHEST_EPOCH)?;
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}
