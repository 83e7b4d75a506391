-- renew.lua: extend the leases of many locks of one owner in one call (rules G10, F1).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3..] the resource of each lock
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lease ms
-- ARGV[5..] pairs: lock id, fencing floor (the holder's quorum token, 0 if none) for
--           KEYS[3], KEYS[4], ... in order
--
-- Also the waiter's re-check: purging and processing happen as in every script, so a lock
-- whose blockers expired is granted by this call.
-- Reply: {epoch, then per lock: status (GRANTED, QUEUED, NOTFOUND, CORRUPT), granted mode,
-- token, position, wait_ms}. CORRUPT (K1): the lock's resource key holds no lock resource
-- (another type, or bytes that do not decode to one); that key is neither read further nor
-- written, and the other locks of the call are renewed as usual.
-- Errors: DLM_BADARG, DLM_NOTOWNER (nothing renewed then).
-- Events: G to locks granted by queue processing.

local S_CORRUPT = 10

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local lease = arg_int(ARGV[4], 'lease_ms', 1, MAX_LEASE_MS)
  local n = #KEYS - 2
  if #ARGV ~= 4 + 2 * n then
    fail('DLM_BADARG', 'renew needs one (lock id, floor) pair per resource key')
  end
  local items = {}
  for i = 1, n do
    items[i] = {arg_id(ARGV[3 + 2 * i], 'lock id'),
                arg_int(ARGV[4 + 2 * i], 'floor', 0, MAX_TOKEN)}
  end
  local out = {EPOCH}
  for i = 1, n do
    local key = KEYS[2 + i]
    local id, floor = items[i][1], items[i][2]
    -- K1: a corrupt key fails its own lock only. `load` refuses it before caching or
    -- marking anything, so nothing of it is written (no WRONGTYPE halfway through commit).
    local fok, a = pcall(lone_get, key)  -- the fast path (core.lua): a live lone lock
    if fok and a and #a == LONE_LEN and a[A_ID] == id and a[A_E] > NOW then
      if a[A_O] ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
      a[A_E] = NOW + lease
      if floor > a[A_S] then a[A_S] = floor end
      lone_put(key, a)
      out[#out + 1] = S_GRANTED
      out[#out + 1] = a[A_GR]
      out[#out + 1] = a[A_TOK]
      out[#out + 1] = 0
      out[#out + 1] = -1
    else
      local ok, r = pcall(load, key)
      local status = nil  -- a lock that is not renewed here: CORRUPT or NOTFOUND
      local qn, lk = nil, nil
      if not ok then
        local msg = r  -- (Redis hands a caught error table over as its message)
        if type(r) == 'table' then msg = r.err end
        if type(msg) ~= 'string' or not string.find(msg, 'DLM_CORRUPT ', 1, true) then
          error(r, 0)
        end
        status = S_CORRUPT
      else
        if r then qn, lk = find(r, id) end
        if not lk then status = S_NOTFOUND end
      end
      if status then
        out[#out + 1] = status
        out[#out + 1] = NONE
        out[#out + 1] = 0
        out[#out + 1] = -1
        out[#out + 1] = -1
      else
        if lk.o ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
        lk.e = NOW + lease
        if qn ~= 'g' then windex_add(key, lk) end
        if floor > r.s then r.s = floor end
        mark(key)
        local st = lock_state(r, lk)
        out[#out + 1] = st[R_STATUS]
        out[#out + 1] = st[R_MODE]
        out[#out + 1] = st[R_TOKEN]
        if st[R_STATUS] == S_GRANTED then  -- (its short form: position 0, no wait)
          out[#out + 1] = 0
          out[#out + 1] = -1
        else
          out[#out + 1] = st[R_POS]
          out[#out + 1] = st[R_WAIT]
        end
      end
    end
  end
  return out
end)
