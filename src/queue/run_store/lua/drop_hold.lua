-- Drops the job's hold if `epoch` holds it ('0': a hold taken back by expired_holds).
-- KEYS: 1 holds.
-- ARGV: 1 id, 2 epoch.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
if cjson.decode(raw).e ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
