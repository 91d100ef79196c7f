//! Unit tests of the embedded backend that look inside it: the poll back-off, the claim's query
//! plan, and opening (and migrating) a queue file.

use super::claim::{next_poll, FIRST_POLL, MAX_POLL};
use super::schema::{SCHEMA, SCHEMA_VERSION};
use super::*;

#[test]
fn polling_backs_off_to_the_cap() {
    // Polls in a 1 s wait: a handful, not a spin.
    let mut pause = FIRST_POLL;
    let mut slept = Duration::ZERO;
    let mut polls = 1;
    while slept < Duration::from_secs(1) {
        slept += pause;
        pause = next_poll(pause);
        polls += 1;
    }
    assert_eq!(pause, MAX_POLL);
    assert!(polls <= 12, "{polls} polls in one second");
}

#[test]
fn claim_uses_the_index_without_sorting() {
    let dir = tempfile::tempdir().unwrap();
    let b = EmbeddedBackend::open(&dir.path().join("q.db"), "w".into()).unwrap();
    let conn = b.conn.lock().unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT seq FROM jobs
             WHERE queue = 'q' AND state = 'ready' AND available_at <= 5 ORDER BY available_at, seq LIMIT 3",
        )
        .unwrap()
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("jobs_claim"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
}

#[test]
fn open_is_idempotent_and_creates_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/q.db");
    drop(EmbeddedBackend::open(&path, "w1".into()).unwrap());
    let b = EmbeddedBackend::open_with(&path, "w2".into(), true).unwrap();
    let conn = b.conn.lock().unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "FULL");
}

#[test]
fn a_version_2_file_gains_the_pending_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let conn = Connection::open(&path).unwrap();
        // The version 2 schema: SCHEMA without `pending.epoch` and `jobs.recoveries`.
        conn.execute_batch(&without_recoveries(SCHEMA).replace(
            "    created_at INTEGER NOT NULL,\n    epoch      INTEGER NOT NULL DEFAULT 0,\n",
            "    created_at INTEGER NOT NULL,\n",
        ))
        .unwrap();
        conn.execute(
            "INSERT INTO pending (queue, job_id, record, created_at) VALUES ('q', 'j', x'7b7d', 1)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
    }
    let b = EmbeddedBackend::open(&path, "w1".into()).unwrap();
    let conn = b.conn.lock().unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let epoch: i64 = conn
        .query_row("SELECT epoch FROM pending WHERE job_id = 'j'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(epoch, 0);
}

/// SCHEMA as it was before version 4: `jobs` without `recoveries`.
fn without_recoveries(schema: &str) -> String {
    let old = schema.replace(
        "    decision     TEXT,\n    recoveries   INTEGER NOT NULL DEFAULT 0\n",
        "    decision     TEXT\n",
    );
    assert_ne!(
        old, schema,
        "SCHEMA no longer has the recoveries column as written here"
    );
    old
}

#[test]
fn a_version_3_file_gains_the_recoveries_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&without_recoveries(SCHEMA)).unwrap();
        conn.execute(
            "INSERT INTO jobs (queue, job_id, payload, state, available_at, enqueued_at)
             VALUES ('q', 'j', x'7b7d', 'ready', 0, 0)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
    }
    let b = EmbeddedBackend::open(&path, "w1".into()).unwrap();
    let conn = b.conn.lock().unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!((version, SCHEMA_VERSION), (4, 4));
    let recoveries: i64 = conn
        .query_row("SELECT recoveries FROM jobs WHERE job_id = 'j'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(recoveries, 0, "a job queued before the upgrade starts at 0");
    drop(conn);
    drop(b);
    // And opening it again (now version 4) migrates nothing twice.
    drop(EmbeddedBackend::open(&path, "w2".into()).unwrap());
}
