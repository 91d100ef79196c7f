-- Prelude: now_ms(), Redis's own clock, in ms since the epoch.
-- KEYS: none.
-- ARGV: none.
-- Every lease deadline, retry due time and expiry check is taken on it, not on the worker's:
-- replicas on hosts whose clocks disagree would otherwise reap each other's live claims early
-- (or a dead one's late).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
