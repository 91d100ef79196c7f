-- Sends a paused job its decision: takes its pending record and queues its message; 0 when
-- the job is not pending (at that halt).
-- KEYS: 1 pending, 2 queue, 3 decided.
-- ARGV: 1 id, 2 message, 3 the halt's step ('' for any: see `pending::waits_at`).
-- Marks the job's decision as on its way (`decided`: id -> step) until its message ends: a
-- copy of the job (its id sent again) that pauses again at that halt in the meantime asks
-- nobody (FINISH `pause`), or a second decision could override this one.
local p = redis.call('HGET', KEYS[1], ARGV[1])
if not p then return 0 end
local step = step_of(p)
if ARGV[3] ~= '' and step ~= tonumber(ARGV[3]) then return 0 end
if step then redis.call('HSET', KEYS[3], ARGV[1], string.format('%d', step)) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
