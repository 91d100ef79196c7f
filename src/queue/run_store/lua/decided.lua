-- Marks the job's `deciding` entry confirmed (the broker holds its message: see
-- `RunStore::decided`) if it answers the halt at `step` (or has no readable step): a late
-- confirm never touches a later decision's entry.
-- KEYS: 1 deciding.
-- ARGV: 1 id, 2 step.
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return 0 end
local ok, e = pcall(cjson.decode, d)
if not ok or type(e) ~= 'table' then return 0 end
local ds = decided_step(d)
if ds and ds ~= tonumber(ARGV[2]) then return 0 end
e.confirmed = true
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
return 1
