-- Forgets a finished run, if `epoch` still holds the job; with ms, retires it instead (it
-- expires after ms, the epoch entry stays for the `end_run` that follows).
-- KEYS: 1 epochs, 2 run, 3 pending, 4 deciding.
-- ARGV: 1 id, 2 epoch, 3 '' or ms.
-- A run waiting for a human (pending, or decided with its resume message on the way) is kept:
-- the claim that ended was a copy of the paused job. A pending or deciding entry whose halt
-- the journal shows answered is stale and goes with the run (see the redis backend's FINISH).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local function answered(s)
  return s and redis.call('HEXISTS', KEYS[2], string.format('%d', s)) == 1
end
local p = redis.call('HGET', KEYS[3], ARGV[1])
local d = redis.call('HGET', KEYS[4], ARGV[1])
local live = (p and not answered(step_of(p))) or (d and not answered(decided_step(d)))
if not live then
  if p then redis.call('HDEL', KEYS[3], ARGV[1]) end
  if d then redis.call('HDEL', KEYS[4], ARGV[1]) end
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
