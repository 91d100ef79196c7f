-- Hands back to the queue what no live claim holds; returns how many messages it moved.
-- KEYS: 1 queue, 2 leases, 3 claims, 4 owners, 5 delayed, 6 workers, 7 epochs, 8 own
--   processing list, 9 recoveries.
-- ARGV: 1 _, 2 processing-list prefix, 3 heartbeat prefix.
-- Every claim it takes back from its holder (an expired lease, a claim in a dead worker's
-- list) is a recovery: `recoveries` (id -> count) grows by one for its job, and the next claim
-- hands the count out (finish.lua resets it when the job's life ends). A message no claim
-- holds (one a BLMOVE moved that ADOPT never wrapped, or a stale copy) is handed back without
-- counting: nobody was running it.
-- Besides expired leases, dead workers' lists and due retries, it hands back any message in
-- the caller's own processing list that no claim holds: one a BLMOVE moved whose ADOPT never
-- ran (the connection dropped in between, or its reply timed out first). A raw message there
-- is held by nobody (only ADOPT wraps); a wrapped one (a retry, a hand-back, a decided job)
-- is held only if `claims` holds exactly it. An ADOPT that comes later finds it gone and
-- claims nothing.
local now = now_ms()
local PREFIX = '{"lar_worker":1,'
local function wrapped_id(item)
  local id = string.match(item, '^{"lar_worker":1,"id":"([^"\\]*)",')
  if id then return id end
  local ok, obj = pcall(cjson.decode, item)
  if ok and type(obj) == 'table' and type(obj.id) == 'string' then return obj.id end
  return nil
end
local moved = 0
for _, item in ipairs(redis.call('LRANGE', KEYS[8], 0, -1)) do
  local held = false
  if string.sub(item, 1, #PREFIX) == PREFIX then
    local id = wrapped_id(item)
    held = id ~= nil and redis.call('HGET', KEYS[3], id) == item
  end
  if not held then
    redis.call('LREM', KEYS[8], 1, item)
    redis.call('LPUSH', KEYS[1], item)
    moved = moved + 1
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  local stored = redis.call('HGET', KEYS[3], id)
  local owner = redis.call('HGET', KEYS[4], id)
  if stored then
    if owner then redis.call('LREM', ARGV[2] .. owner, 1, stored) end
    redis.call('LPUSH', KEYS[1], stored)
    redis.call('HINCRBY', KEYS[9], id, 1)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
for _, w in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if redis.call('EXISTS', ARGV[3] .. w) == 0 then
    local proc = ARGV[2] .. w
    while true do
      local item = redis.call('RPOP', proc)
      if not item then break end
      redis.call('LPUSH', KEYS[1], item)
      moved = moved + 1
      if string.sub(item, 1, #PREFIX) == PREFIX then
        local ok, obj = pcall(cjson.decode, item)
        if ok and type(obj) == 'table' and type(obj.id) == 'string' then
          if redis.call('HGET', KEYS[3], obj.id) == item then
            redis.call('HINCRBY', KEYS[9], obj.id, 1)
          end
          redis.call('ZREM', KEYS[2], obj.id)
          redis.call('HDEL', KEYS[3], obj.id)
          redis.call('HDEL', KEYS[4], obj.id)
        end
      end
    end
    redis.call('SREM', KEYS[6], w)
  end
end
for _, item in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('RPUSH', KEYS[1], item)
  redis.call('ZREM', KEYS[5], item)
  moved = moved + 1
end
return moved
