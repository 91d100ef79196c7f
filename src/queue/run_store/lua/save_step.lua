-- Saves one step of a run, its journal record and the checkpoint after it, fenced on the
-- epoch. Run per job in batches (queue/redis/batch.rs): the body reads its keys as K and its
-- arguments as A.
-- KEYS: 1 epochs, 2 run.
-- ARGV: 1 id, 2 epoch, 3 step index, 4 record, 5 checkpoint, 6 previous index ('' for the
--   first).
-- 1 saved, 0 fenced off, 2 the journal lacks the step before. Idempotent: saving a step again
-- (a retry after a lost reply) rewrites the same fields. Each `redis.call` costs a few µs in
-- Redis (measured): a step costs three.
if redis.call('HGET', K[1], A[1]) ~= A[2] then return 0 end
if A[6] ~= '' and redis.call('HEXISTS', K[2], A[6]) == 0 then return 2 end
redis.call('HSET', K[2], A[3], A[4], 'ckpt', A[5])
return 1
