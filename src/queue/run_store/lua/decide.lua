-- Moves a pending job to `deciding` and returns the entry there, or nil when the job is not
-- pending at that halt (see `pending::waits_at`).
-- KEYS: 1 pending, 2 deciding, 3 run.
-- ARGV: 1 id, 2 decision (JSON), 3 now ms, 4 the halt's step ('' for any).
local p = redis.call('HGET', KEYS[1], ARGV[1])
if not p then return false end
if ARGV[4] ~= '' and step_of(p) ~= tonumber(ARGV[4]) then return false end
local entry = cjson.encode({at = tonumber(ARGV[3]), decision = ARGV[2], pending = p,
  props = redis.call('HGET', KEYS[3], 'amqp') or '{}'})
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], entry)
return entry
