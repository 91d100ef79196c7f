-- Stores a paused run's pending record and its delivery's properties, while `epoch` still
-- holds the job.
-- KEYS: 1 epochs, 2 pending, 3 deciding, 4 run.
-- ARGV: 1 id, 2 epoch, 3 pending record, 4 delivery properties (JSON), 5 '1' when the pausing
--   claim carried the decision (see `RunStore::pause`).
-- 1 paused, 0 fenced off (a newer delivery holds the job), 2 a decision is already on its way
-- for this halt (a copy of the job raced a human: nothing to pause). A decision on its way
-- for an earlier halt was applied (the run moved past it; its entry only waited for the
-- broker's confirm): its entry goes, and the new pause stands.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local d = redis.call('HGET', KEYS[3], ARGV[1])
if d then
  local ds, ns = decided_step(d), step_of(ARGV[3])
  if not ((ds and ns and ns > ds) or ARGV[5] == '1') then return 2 end
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[4], 'amqp', ARGV[4])
return 1
