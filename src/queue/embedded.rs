//! The embedded backend: a durable queue in one SQLite file (WAL), for one machine.
