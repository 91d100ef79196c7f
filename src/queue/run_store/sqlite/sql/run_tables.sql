CREATE TABLE IF NOT EXISTS runs (
    queue      TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    checkpoint BLOB NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS run_steps (
    queue  TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    idx    INTEGER NOT NULL,
    record BLOB    NOT NULL,
    PRIMARY KEY (queue, job_id, idx)
);
CREATE TABLE IF NOT EXISTS epoch_seq (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
