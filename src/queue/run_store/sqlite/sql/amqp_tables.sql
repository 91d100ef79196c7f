CREATE TABLE IF NOT EXISTS recoveries (
    queue  TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (queue, job_id)
);
CREATE TABLE IF NOT EXISTS holds (
    queue    TEXT    NOT NULL,
    job_id   TEXT    NOT NULL,
    epoch    INTEGER NOT NULL,
    until_ms INTEGER NOT NULL,
    message  TEXT    NOT NULL,
    PRIMARY KEY (queue, job_id)
);
