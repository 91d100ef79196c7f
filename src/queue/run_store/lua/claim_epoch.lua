-- The job's next epoch (after prelude_next_epoch.lua), with its recovery count: a redelivery
-- of a job whose epoch entry shows an earlier holder that never ended its claim is one more
-- recovery. A retired run (one set to expire) is the new holder's again.
-- KEYS: 1 epochs, 2 epoch sequence, 3 run, 4 recoveries.
-- ARGV: 1 id, 2 '1' when the broker redelivered the message, else ''.
local n = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if ARGV[2] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  n = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
end
local epoch = next_epoch(KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], epoch)
redis.call('PERSIST', KEYS[3])
return {epoch, n}
