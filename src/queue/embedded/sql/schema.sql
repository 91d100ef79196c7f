CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT    NOT NULL,
    job_id       TEXT    NOT NULL UNIQUE,
    payload      BLOB    NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    epoch        INTEGER NOT NULL DEFAULT 0,
    state        TEXT    NOT NULL CHECK (state IN ('ready', 'claimed')),
    available_at INTEGER NOT NULL,
    owner        TEXT,
    lease_until  INTEGER,
    history      TEXT    NOT NULL DEFAULT '[]',
    enqueued_at  INTEGER NOT NULL,
    decision     TEXT,
    recoveries   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, state, available_at);
CREATE TABLE IF NOT EXISTS results (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    body       BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_queue ON results (queue, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    entry      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue, seq);
CREATE TABLE IF NOT EXISTS pending (
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    record     BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    epoch      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, job_id)
);
