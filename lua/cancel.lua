-- cancel.lua: cancel a waiting request or a queued conversion (rule G8, N3).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource,
-- KEYS[4] parent's resource (pass KEYS[3] if the lock has no parent)
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lock id
-- ARGV[5] reason: 'cancel' (the owner's own) or 'deadlock' (chosen by the detector)
-- ARGV[6] 1 to publish a C event to the owner, else 0
--
-- A waiting request disappears; a conversion returns to the granted set in its old mode.
-- Reply: lock reply; status CANCELLED, CANCELGRANT (it was granted: nothing done) or
-- NOTFOUND. Errors: DLM_BADARG, DLM_NOTOWNER.
-- Events: C|id|reason to the owner when asked, G to locks granted by queue processing.

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local id = arg_id(ARGV[4], 'lock id')
  local reason = ARGV[5]
  if reason ~= 'cancel' and reason ~= 'deadlock' then
    fail('DLM_BADARG', 'reason must be cancel or deadlock')
  end
  local notify = ARGV[6] == '1'
  local key = KEYS[3]

  local r = load(key)
  local qn, lk = nil, nil
  if r then qn, lk = find(r, id) end
  if not lk then return short(S_NOTFOUND) end
  if lk.o ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
  if qn == 'g' then return reply(S_CANCELGRANT, lk.gr, lk.tok) end
  if qn == 'w' then
    remove_lock(key, r, qn, lk, true)
  else
    remove_from(r.c, lk)
    lk.rq = NONE
    r.g[#r.g + 1] = lk
    windex_rem(key, lk)
    mark(key)
    process(key, r)
  end
  if notify then emit(owner, 'C|' .. id .. '|' .. reason) end
  return reply(S_CANCELLED, lk.gr, lk.tok)
end)
