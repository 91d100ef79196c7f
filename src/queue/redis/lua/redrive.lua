-- Puts a dead letter back on the queue: 1 when the entry was still there, else 0.
-- KEYS: 1 dead, 2 queue.
-- ARGV: 1 entry, 2 payload.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
