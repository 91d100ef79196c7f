//! The embedded backend: a durable queue in one SQLite file (WAL), for one machine.
//! (Placeholder until the implementation lands.)

use super::{Backend, QueueError};
use std::path::Path;
use std::sync::Arc;

pub fn open_backend(_path: &Path, _worker_id: String) -> Result<Arc<dyn Backend>, QueueError> {
    Err(QueueError::Other(
        "the embedded backend is not built yet".into(),
    ))
}
