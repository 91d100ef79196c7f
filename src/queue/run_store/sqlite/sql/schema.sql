CREATE TABLE IF NOT EXISTS epochs (
    queue  TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    epoch  INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS pending (
    queue      TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    record     BLOB    NOT NULL,
    props      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS deciding (
    queue    TEXT    NOT NULL,
    job_id   TEXT    NOT NULL,
    decision TEXT    NOT NULL,
    pending  TEXT    NOT NULL,
    props    TEXT    NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS deciding_confirmed (
    queue  TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (queue, job_id)
);
