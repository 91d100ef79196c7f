-- Ends one claim, fenced on its epoch. Run per job in batches (batch.rs): the body reads its
-- keys as K and its arguments as A.
-- KEYS: 1 processing, 2 leases, 3 claims, 4 owners, 5 epochs, 6 results, 7 dead, 8 queue,
--   9 delayed, 10 run (checkpoint + journal), 11 pending, 12 decided, 13 recoveries.
-- ARGV: 1 id, 2 epoch, 3 mode, 4 a, 5 b, 6 '1' when the claim carries a decision (else ''),
--   7 '1' when the finish drops a decision on its way, 8 '1' when it forgets the run, 9 '1'
--   when it resets the job's count of recoveries.
-- The mode says where the message goes; 7, 8 and 9 say what happens to the decision, the run
-- and the recoveries. All four come from the finish rules (queue/finish.rs), not from this
-- script.
-- Modes: publish (a = result or '', b = dead entry or ''), retry (a = new stored message, b =
-- delay ms), dead (a = entry), release (a = stored message), pause (a = awaiting_decision
-- result, b = pending record). A run to forget stays, though, while the job waits for a human
-- (a pending record): then this claim was a copy of the paused job (a producer sent its id
-- again), and the paused run is not its to end.
-- A pending record whose halt the journal shows answered is stale (a copy of the job paused
-- again while the decision was on its way): it goes with the run, or a later decision of it
-- would resume the ended run and publish a second result. A pause keeps the job's epoch, so
-- the claim that resumes it gets a newer one than any earlier holder (a holder whose lease
-- expired stays fenced off).
-- While a decision is on its way (`decided`, set by SUBMIT_DECISION), a copy of the job that
-- pauses again at that halt asks nobody, and no other claim ends the run the decision needs;
-- the decision's own claim clears the mark when it ends (a hand-back and a retry that keeps
-- the run carry the decision on).
-- The claim is looked for from the processing list's tail: claims are pushed at its head, and
-- jobs end roughly in the order they were claimed, so a finish meets its entry near the tail
-- instead of comparing itself with every job in flight (perf: 7 % of Redis's CPU at 256).
if redis.call('HGET', K[5], A[1]) ~= A[2] then return 0 end
local function forget_run()
  -- A decision on its way (another claim's message) needs the run to resume.
  if A[6] == '1' then redis.call('HDEL', K[12], A[1])
  elseif redis.call('HEXISTS', K[12], A[1]) == 1 then return end
  local p = redis.call('HGET', K[11], A[1])
  if p then
    local s = step_of(p)
    if not (s and redis.call('HEXISTS', K[10], string.format('%d', s)) == 1) then return end
    redis.call('HDEL', K[11], A[1])
  end
  redis.call('DEL', K[10])
end
local stored = redis.call('HGET', K[3], A[1])
if not stored then return 0 end
redis.call('LREM', K[1], -1, stored)
redis.call('ZREM', K[2], A[1])
redis.call('HDEL', K[3], A[1])
redis.call('HDEL', K[4], A[1])
local mode = A[3]
-- The claim carried the decision on its way (`decided`) and this finish ends it without
-- carrying it on: no decision is on its way any more.
if A[6] == '1' and A[7] == '1' then
  redis.call('HDEL', K[12], A[1])
end
-- The job's life ended (published, dead-lettered, paused): its next life counts afresh.
if A[9] == '1' then redis.call('HDEL', K[13], A[1]) end
if mode == 'publish' then
  if A[4] ~= '' then redis.call('RPUSH', K[6], A[4]) end
  if A[5] ~= '' then redis.call('RPUSH', K[7], A[5]) end
  redis.call('HDEL', K[5], A[1])
elseif mode == 'retry' then
  redis.call('ZADD', K[9], now_ms() + tonumber(A[5]), A[4])
elseif mode == 'dead' then
  redis.call('RPUSH', K[7], A[4])
  redis.call('HDEL', K[5], A[1])
elseif mode == 'release' then
  redis.call('LPUSH', K[8], A[4])
elseif mode == 'pause' then
  local d = tonumber(redis.call('HGET', K[12], A[1]))
  if d then
    local s = step_of(A[5])
    -- A copy of the job pausing again at a halt whose decision is on its way: nothing to
    -- ask, the decision's message resumes the run. (The decision's own claim pausing there
    -- did not apply it, an unsigned one say: its pause stands.)
    if s and s <= d and A[6] ~= '1' then return 1 end
    redis.call('HDEL', K[12], A[1])
  end
  redis.call('RPUSH', K[6], A[4])
  redis.call('HSET', K[11], A[1], A[5])
end
if A[8] == '1' then forget_run() end
return 1
