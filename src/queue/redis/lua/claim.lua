-- Claims up to n messages from the queue: moves each into this worker's processing list, wraps
-- it and holds it under a lease and a new epoch.
-- KEYS: 1 queue, 2 processing, 3 leases, 4 claims, 5 owners, 6 epochs, 7 epoch sequence,
--   8 delayed, 9 run-key prefix, 10 recoveries.
-- ARGV: 1 worker, 2 lease ms, 3 n, 4 envelope, 5... candidate ids.
-- Returns (stored, epoch, id, has run, recoveries) quintuples: has run is 1 when the job has a
-- stored run (checkpoint and journal); recoveries is how many of its claims the reaper took
-- back from a holder that did not end them (recover.lua counts them, finish.lua resets them).
-- The count comes from the queue's hash, never from the message: a producer cannot forge it.
-- A copy of a job whose id is held right now (a producer sent it twice) is not claimed: it
-- waits in the delayed set for a lease and comes back after, so one id never has two holders
-- (their claims, leases and checkpoints are keyed by the id). Byte-identical copies waiting
-- at the same time wait as one.
-- Epochs come from the queue's sequence (the run store's prelude_next_epoch.lua).
local out = {}
for i = 1, tonumber(ARGV[3]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'LEFT')
  if not raw then break end
  local wrapped, id = wrap(raw, ARGV[4 + i], ARGV[4])
  if redis.call('HEXISTS', KEYS[4], id) == 1 then
    redis.call('LPOP', KEYS[2])
    redis.call('ZADD', KEYS[8], deadline, wrapped)
  else
    redis.call('LSET', KEYS[2], 0, wrapped)
    out[#out + 1] = wrapped
    out[#out + 1] = hold(wrapped, id)
    out[#out + 1] = id
    out[#out + 1] = redis.call('EXISTS', KEYS[9] .. id)
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[10], id) or '0')
  end
end
return out
