//! What can go wrong talking to a queue store, classified by what a retry can do about it.
//!
//! The worker retries only [`QueueError::is_retryable`] errors (with the one backoff policy);
//! corrupt data, conflicts and calls a backend cannot serve are reported or dead-lettered with
//! their reason, since trying again would read the same bytes or make the same call.

/// Failures talking to the queue's store.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis answered with an error or could not be reached (see [`QueueError::is_retryable`]).
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// SQLite failed (a busy file or an I/O error is worth a retry; a constraint is not).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The broker closed, refused or did not confirm: a retry on a new channel may help.
    #[error("amqp: {0}")]
    Amqp(String),
    /// The store could not be reached or did not answer (a timeout, a stopped writer task, a
    /// blocking task that failed): a retry may help.
    #[error("queue store: {0}")]
    Transport(String),
    /// The backend cannot do this, as configured (a capability it lacks, a setting missing).
    #[error("queue store: {0}")]
    Unsupported(String),
    /// What the store holds cannot be read or does not fit (an unreadable entry, an id of the
    /// wrong shape, a checkpoint of another job): a retry reads the same bytes.
    #[error("queue store: {0}")]
    Corrupt(String),
    /// The store refused a write that contradicts what it holds (an id in use, a schema newer
    /// than this binary).
    #[error("queue store: {0}")]
    Conflict(String),
}

impl QueueError {
    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Redis(e) => redis_retryable(e),
            QueueError::Sqlite(e) => sqlite_retryable(e),
            QueueError::Amqp(_) | QueueError::Transport(_) => true,
            QueueError::Unsupported(_) | QueueError::Corrupt(_) | QueueError::Conflict(_) => false,
        }
    }
}

fn redis_retryable(e: &::redis::RedisError) -> bool {
    use ::redis::RetryMethod;
    // The client's own classification: a refused script or command (a Lua error, a wrong
    // type, an unparsable reply) gets the same answer again. Out of memory is the exception:
    // it passes when memory frees.
    !matches!(e.retry_method(), RetryMethod::NoRetry) || e.code() == Some("OOM")
}

fn sqlite_retryable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::CannotOpen,
        ) => true,
        Some(_) => false,
        // Not an error of the database itself (a type conversion, a missing row): the same
        // bytes give the same answer.
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_is_retried_and_data_is_not() {
        assert!(QueueError::Transport("timeout".into()).is_retryable());
        assert!(QueueError::Amqp("channel closed".into()).is_retryable());
        assert!(!QueueError::Corrupt("unreadable".into()).is_retryable());
        assert!(!QueueError::Conflict("in use".into()).is_retryable());
        assert!(!QueueError::Unsupported("no pauses".into()).is_retryable());
    }

    #[test]
    fn sqlite_busy_is_retried_and_a_constraint_is_not() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        let constraint = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            None,
        );
        assert!(QueueError::from(busy).is_retryable());
        assert!(!QueueError::from(constraint).is_retryable());
        assert!(!QueueError::from(rusqlite::Error::QueryReturnedNoRows).is_retryable());
    }

    #[test]
    fn redis_io_is_retried_and_a_script_error_is_not() {
        let io = ::redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(QueueError::from(io).is_retryable());
        let typed =
            ::redis::RedisError::from((::redis::ErrorKind::UnexpectedReturnType, "not a list"));
        assert!(!QueueError::from(typed).is_retryable());
    }

    #[test]
    fn the_message_keeps_its_old_shape() {
        // Operators grep for these prefixes; the classification is in the type, not the text.
        assert_eq!(
            QueueError::Corrupt("x".into()).to_string(),
            "queue store: x"
        );
        assert_eq!(
            QueueError::Transport("x".into()).to_string(),
            "queue store: x"
        );
    }
}
