-- Forgets the job's epoch entry (and its recovery count) if `epoch` still holds it.
-- KEYS: 1 epochs, 2 recoveries.
-- ARGV: 1 id, 2 epoch, 3 '1' to keep the recovery count (a hand-back), else ''.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
