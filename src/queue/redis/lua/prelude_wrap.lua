-- Prelude of claim.lua and adopt.lua: wrap() wraps a producer's message with its job id (see
-- wrapper.rs), hold() files the claim of a wrapped message under a new epoch.
-- KEYS (those of claim.lua): 3 leases, 4 claims, 5 owners, 6 epochs, 7 epoch sequence.
-- ARGV (those of claim.lua): 1 worker, 2 lease ms.
-- Needs now_ms() (prelude_now.lua) and next_epoch() (the run store's prelude_next_epoch.lua).
-- An id taken from a message must be well-formed UTF-8 (Unicode's table 3-7, as Rust checks it):
-- cjson passes any bytes through, and an id the worker cannot hold as text would be fenced off
-- on every finish.
local PREFIX = '{"lar_worker":1,'
-- Every claim of this call (ARGV[2]: the lease in ms) ends its lease at the same moment.
local deadline = now_ms() + tonumber(ARGV[2])
local function utf8_ok(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    else return false end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      if j > i + 1 then lo, hi = 0x80, 0xBF end
      if not cc or cc < lo or cc > hi then return false end
    end
    i = i + len
  end
  return true
end
local function wrap(raw, candidate, envelope)
  if string.sub(raw, 1, #PREFIX) == PREFIX then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' and type(obj.id) == 'string' and #obj.id > 0
      and utf8_ok(obj.id) then return raw, obj.id end
  end
  local id = candidate
  if envelope == '1' then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' then
      if type(obj.id) == 'string' and #obj.id > 0 and #obj.id <= 200 and utf8_ok(obj.id) then id = obj.id
      elseif type(obj.id) == 'number' then id = string.format('%.17g', obj.id) end
    end
  end
  return PREFIX .. '"id":' .. cjson.encode(id) .. ',"attempt":0,"history":[],"raw":' .. cjson.encode(raw) .. '}', id
end
local function hold(wrapped, id)
  local epoch = next_epoch(KEYS[7])
  redis.call('HSET', KEYS[6], id, epoch)
  redis.call('ZADD', KEYS[3], deadline, id)
  redis.call('HSET', KEYS[4], id, wrapped)
  redis.call('HSET', KEYS[5], id, ARGV[1])
  return epoch
end
