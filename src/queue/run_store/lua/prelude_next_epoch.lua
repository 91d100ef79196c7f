-- Prelude: next_epoch(seq), the Lua function every epoch comes from, here and in the redis
-- backend's claims: the queue's one sequence (`Q:epoch_seq`), never a per-job counter. Ending
-- a run forgets the job's entry, and a counter started again at 1 would meet a cut-off holder
-- that still has the old epoch. The sequence starts above 2^32, so no per-job epoch of earlier
-- versions comes again during a rolling upgrade.
-- KEYS: none (the sequence's key is its argument).
-- ARGV: none.
local function next_epoch(seq)
  local epoch = redis.call('INCR', seq)
  if epoch < 4294967296 then epoch = redis.call('INCRBY', seq, 4294967296) end
  return epoch
end
