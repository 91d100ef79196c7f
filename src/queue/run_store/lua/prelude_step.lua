-- Prelude: step_of(record), the step of a stored pending record (JSON), and
-- decided_step(entry), that of the one inside a `deciding` entry; shared with the redis
-- backend's scripts.
-- KEYS: none.
-- ARGV: none.
local function step_of(record)
  local ok, p = pcall(cjson.decode, record)
  if ok and type(p) == 'table' then return tonumber(p.step) end
  return nil
end
local function decided_step(entry)
  local ok, e = pcall(cjson.decode, entry)
  if ok and type(e) == 'table' and type(e.pending) == 'string' then return step_of(e.pending) end
  return nil
end
