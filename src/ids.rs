//! Identifiers: UUID v4 strings from the thread-local RNG (no syscall per id, which the
//! daemon would otherwise pay several times per job).

/// A new lowercase hyphenated UUID v4.
pub fn new_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}
