-- Takes a claim's delivery into the store until now + lease (after prelude_now: now_ms()).
-- KEYS: 1 epochs, 2 holds.
-- ARGV: 1 id, 2 epoch, 3 lease ms, 4 message (to publish the job again).
-- 1 held, 0 fenced off.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1],
  cjson.encode({e = ARGV[2], u = now_ms() + tonumber(ARGV[3]), m = ARGV[4]}))
return 1
