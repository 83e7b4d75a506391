-- yield.lua: give a grant back to its place in the queue (rule Y1), for split votes.
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lock id
--
-- A granted new request goes back to the wait queue at its ticket; a granted up-conversion
-- goes back to the conversion queue in its previous mode; then the queues are processed, so
-- the lock is granted again at once if it is first. A waiting lock is left as it is.
-- Reply: lock reply (GRANTED, QUEUED) or NOTFOUND. Errors: DLM_BADARG, DLM_NOTOWNER.

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local id = arg_id(ARGV[4], 'lock id')
  local key = KEYS[3]
  local r = load(key)
  local qn, lk = nil, nil
  if r then qn, lk = find(r, id) end
  if not lk then return short(S_NOTFOUND) end
  if lk.o ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
  if qn == 'g' then
    remove_from(r.g, lk)
    if lk.pm ~= NONE then
      lk.rq, lk.gr, lk.pm = lk.gr, lk.pm, NONE
      insert(r.c, lk, true)
    else
      lk.rq, lk.gr = lk.gr, NONE
      insert(r.w, lk, false)
    end
    windex_add(key, lk)
    mark(key)
    process(key, r)
  end
  return lock_state(r, lk)
end)
