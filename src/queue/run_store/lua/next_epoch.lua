-- The job's next epoch (after prelude_next_epoch.lua); a retired run (one set to expire) is
-- the new holder's again.
-- KEYS: 1 epochs, 2 epoch sequence, 3 run.
-- ARGV: 1 id.
local epoch = next_epoch(KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], epoch)
redis.call('PERSIST', KEYS[3])
return epoch
