-- Takes back the holds whose lease passed: epoch '0' (the old holder can neither renew nor
-- drop it), stamped for `again` ms, one more recovery of the job; returns id, message, ...
-- KEYS: 1 holds, 2 recoveries.
-- ARGV: 1 again ms.
local now = now_ms()
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local h = cjson.decode(all[i + 1])
  if h.u <= now then
    if h.e ~= '0' then redis.call('HINCRBY', KEYS[2], all[i], 1) end
    h.e = '0'
    h.u = now + tonumber(ARGV[1])
    redis.call('HSET', KEYS[1], all[i], cjson.encode(h))
    table.insert(out, all[i])
    table.insert(out, h.m)
  end
end
return out
