//! Test hooks, read from the environment: each makes one failure happen on purpose so the
//! integration tests can show the worker survives it. Never set them in production.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// What `LAR_WORKER_TEST_WEDGE` wedges after the first claim answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wedge {
    None,
    /// `1`: each claim loop stops turning (it waits for the stop and nothing else), as a loop
    /// stuck on a call that never returns would.
    ClaimLoop,
    /// `runtime`: every thread of the runtime is blocked, as a runtime stuck in blocking code
    /// would be; nothing async runs any more (the stop neither: the test kills the process).
    Runtime,
}

pub(super) fn wedge() -> Wedge {
    match std::env::var("LAR_WORKER_TEST_WEDGE").as_deref() {
        Ok("1") => Wedge::ClaimLoop,
        Ok("runtime") => Wedge::Runtime,
        _ => Wedge::None,
    }
}

/// Blocks every thread of the current (multi-threaded) runtime for good: enough tasks that
/// each block their thread that every worker thread runs one of them.
pub(super) fn block_the_runtime() {
    let threads = std::thread::available_parallelism().map_or(8, |n| n.get());
    for _ in 0..threads * 4 {
        tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        });
    }
}

/// `LAR_WORKER_TEST_CLAIM_LOOP_PANICS=<queue>=<n>`: the claim loop of `queue` panics as it
/// starts, the first `n` times. True when this start is one of them.
pub(super) fn claim_loop_panics(queue: &str) -> bool {
    static DONE: AtomicU32 = AtomicU32::new(0);
    let Ok(spec) = std::env::var("LAR_WORKER_TEST_CLAIM_LOOP_PANICS") else {
        return false;
    };
    let Some((q, n)) = spec.rsplit_once('=') else {
        return false;
    };
    let n: u32 = n.parse().unwrap_or(0);
    q == queue && DONE.fetch_add(1, Ordering::Relaxed) < n
}

/// `LAR_WORKER_TEST_SLOW_DECISIONS_MS=<ms>`: each decision message takes this long before it
/// is applied, as with a slow store.
pub(super) fn slow_decisions() -> Option<Duration> {
    std::env::var("LAR_WORKER_TEST_SLOW_DECISIONS_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}
