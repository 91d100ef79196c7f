-- Drops the job's `deciding` entry if it answers the halt at `step`: its message ended
-- without applying it.
-- KEYS: 1 deciding.
-- ARGV: 1 id, 2 step ('' for any).
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return 0 end
local ds = decided_step(d)
if ARGV[2] ~= '' and ds and ds ~= tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
