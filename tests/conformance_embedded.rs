//! The backend conformance suite against the embedded (SQLite) backend: each test's database
//! is a file in its own temporary directory, shared by the test and its worker processes.

#[macro_use]
mod conformance;

conformance_suite!(conformance::Kind::Embedded);
