-- Renews a hold for lease ms from now if `epoch` still holds the job and its hold.
-- KEYS: 1 epochs, 2 holds.
-- ARGV: 1 id, 2 epoch, 3 lease ms.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local h = cjson.decode(raw)
if h.e ~= ARGV[2] then return 0 end
h.u = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(h))
return 1
