-- After a BLMOVE: the same as claim.lua, for the one message it moved.
-- KEYS: as claim.lua (1 queue, 2 processing, 3 leases, 4 claims, 5 owners, 6 epochs,
--   7 epoch sequence, 8 delayed, 9 run-key prefix, 10 recoveries).
-- ARGV: 1 worker, 2 lease ms, 3 _, 4 envelope, 5 candidate, 6 raw.
if redis.call('LREM', KEYS[2], 1, ARGV[6]) == 0 then return {} end
local wrapped, id = wrap(ARGV[6], ARGV[5], ARGV[4])
if redis.call('HEXISTS', KEYS[4], id) == 1 then
  redis.call('ZADD', KEYS[8], deadline, wrapped)
  return {}
end
redis.call('LPUSH', KEYS[2], wrapped)
return {wrapped, hold(wrapped, id), id, redis.call('EXISTS', KEYS[9] .. id),
  tonumber(redis.call('HGET', KEYS[10], id) or '0')}
