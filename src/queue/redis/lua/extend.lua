-- Extends the leases of claims still held under their epoch: 1 per claim extended, 0 lost.
-- KEYS: 1 leases, 2 epochs.
-- ARGV: 1 lease ms, then (id, epoch)...
local deadline = now_ms() + tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] and redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
