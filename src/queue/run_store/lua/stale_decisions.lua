-- Entries older than the limit whose decision step is not journaled yet are stamped anew and
-- returned (`id, entry, ...`) to publish again; entries whose decision was applied (or whose
-- run is gone) are dropped.
-- KEYS: 1 deciding.
-- ARGV: 1 now ms, 2 stale after ms, 3 run key prefix.
local out = {}
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
for i = 1, #all, 2 do
  local id, raw = all[i], all[i + 1]
  local ok, e = pcall(cjson.decode, raw)
  if ok and type(e) == 'table' and tonumber(e.at) and tonumber(e.at) + tonumber(ARGV[2]) < now then
    local run = ARGV[3] .. id
    local step = type(e.pending) == 'string' and step_of(e.pending)
    if redis.call('EXISTS', run) == 0 or (step and redis.call('HEXISTS', run, string.format('%d', step)) == 1) then
      redis.call('HDEL', KEYS[1], id)
    elseif e.confirmed then
      -- The broker holds its message: it waits to be applied, not sent again.
    else
      e.at = now
      raw = cjson.encode(e)
      redis.call('HSET', KEYS[1], id, raw)
      out[#out + 1] = id
      out[#out + 1] = raw
    end
  end
end
return out
