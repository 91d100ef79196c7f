-- Forgets the job's epoch entry (and its recovery count) if `epoch` still holds it.
-- KEYS: 1 epochs, 2 recoveries.
-- ARGV: 1 id, 2 epoch.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
