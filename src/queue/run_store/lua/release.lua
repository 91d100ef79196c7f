-- Forgets the job's epoch entry if `epoch` still holds it.
-- KEYS: 1 epochs.
-- ARGV: 1 id, 2 epoch.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
