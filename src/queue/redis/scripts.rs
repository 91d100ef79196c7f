//! The Redis backend's Lua scripts, one file each under `lua/` (each file's header says its
//! KEYS, its ARGV and what it does), and how they are put together: a script is its preludes
//! (the helper functions it calls) followed by its body, concatenated here as one text.

use super::batch::BatchedScript;
use crate::queue::run_store::redis::{NEXT_EPOCH_FN, STEP_FNS};
use ::redis::aio::ConnectionManager;
use ::redis::Script;

/// Redis's own clock, `now_ms()`: every lease deadline, retry due time and expiry check is
/// taken on it (see `lua/prelude_now.lua`).
const NOW_FN: &str = include_str!("lua/prelude_now.lua");

/// Wraps a producer's message with its job id (see `wrapper.rs`), and holds a claim (see
/// `lua/prelude_wrap.lua`).
const WRAP_FN: &str = include_str!("lua/prelude_wrap.lua");

/// Claims a batch off the queue (see `lua/claim.lua`).
const CLAIM: &str = include_str!("lua/claim.lua");

/// After a BLMOVE: the same, for the one message it moved (see `lua/adopt.lua`).
const ADOPT: &str = include_str!("lua/adopt.lua");

/// Extends the leases still held (see `lua/extend.lua`).
const EXTEND: &str = include_str!("lua/extend.lua");

/// Ends one claim, fenced on its epoch; run per job in batches (`batch`, see `lua/finish.lua`).
const FINISH: &str = include_str!("lua/finish.lua");

/// Hands back expired leases, dead workers' lists, due retries and unheld messages (see
/// `lua/recover.lua`).
const RECOVER: &str = include_str!("lua/recover.lua");

/// Puts a dead letter back on the queue (see `lua/redrive.lua`).
const REDRIVE: &str = include_str!("lua/redrive.lua");

/// Sends a paused job its decision (see `lua/submit_decision.lua`).
const SUBMIT_DECISION: &str = include_str!("lua/submit_decision.lua");

pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) adopt: Script,
    pub(super) extend: Script,
    /// Per job, batched across jobs (see `batch`).
    pub(super) finish: BatchedScript,
    pub(super) recover: Script,
    pub(super) submit_decision: Script,
    pub(super) redrive: Script,
}

impl Scripts {
    /// Every script with its preludes. Must be called inside the tokio runtime (the finish
    /// writer is a task).
    pub(super) fn load(conn: &ConnectionManager) -> Self {
        Scripts {
            claim: Script::new(&format!("{NOW_FN}{NEXT_EPOCH_FN}{WRAP_FN}{CLAIM}")),
            adopt: Script::new(&format!("{NOW_FN}{NEXT_EPOCH_FN}{WRAP_FN}{ADOPT}")),
            extend: Script::new(&format!("{NOW_FN}{EXTEND}")),
            finish: BatchedScript::start(
                "finish",
                &format!("{STEP_FNS}{NOW_FN}"),
                FINISH,
                13,
                9,
                conn.clone(),
            ),
            recover: Script::new(&format!("{NOW_FN}{RECOVER}")),
            submit_decision: Script::new(&format!("{STEP_FNS}{SUBMIT_DECISION}")),
            redrive: Script::new(REDRIVE),
        }
    }
}
