-- request.lua: a new lock request (rules G1-G3, G10-G12, H1, N1, F1, E1, V5).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource,
-- KEYS[4] parent's resource (only read when ARGV[9] names a parent; absent otherwise, or
--         KEYS[3])
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lock id (client-chosen, the same on every instance)
-- ARGV[5] mode 0..5        ARGV[6] flags (NOQUEUE=1 EXPEDITE=2 NODLCKWT=16 BLKAST=64)
-- ARGV[7] ticket (client µs clock; queue order on every instance)
-- ARGV[8] lease ms         ARGV[9] parent lock id or ''   ARGV[10] display name
-- ARGV[11] priority (P1: a signed 32-bit int; absent: 0, as clients send a 0)
--
-- Reply: the lock reply of core.lua `reply`: status GRANTED, QUEUED, NOTQUEUED, RECOVERING
-- (extra = ms to wait), NOPARENT. Errors: DLM_BADARG, DLM_NOTOWNER (id used by another owner).
-- Events: G to locks granted by queue processing, B to holders blocking a queued request
-- that read it (N1: BLKAST, or a younger ticket).

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local id = arg_id(ARGV[4], 'lock id')
  local mode = arg_mode(ARGV[5])
  local flags = arg_flags(ARGV[6], REQUEST_FLAGS)
  local ticket = arg_int(ARGV[7], 'ticket')
  local lease = arg_int(ARGV[8], 'lease_ms', 1, MAX_LEASE_MS)
  local priority = arg_priority(ARGV[11])
  local pid = ARGV[9] or ''
  if pid ~= '' then arg_id(pid, 'parent id') end
  local name = ARGV[10] or ''
  if #name > 16399 then  -- K1: 16 names of 1024 bytes joined by NUL (keys.py)
    fail('DLM_BADARG', 'resource name of ' .. #name .. ' bytes exceeds 16399')
  end
  if has(flags, F_EXPEDITE) and mode ~= NL then
    fail('DLM_BADARG', 'EXPEDITE is only for NL requests (G3)')
  end
  local key = KEYS[3]

  local wait = recovering_ms()
  if wait > 0 then return short(S_RECOVERING, wait) end

  if pid == '' then  -- the fast path (core.lua `lone_get`), same rules
    local a = lone_get(key)
    if a == false or (a and #a <= TOMB_LEN + 1) then  -- (a tombstone, either form)
      -- G1: nothing granted, converting or waiting: granted at once. From a tombstone, the
      -- name it kept (K2: a name only where it has none), its fencing sequence (F1) and the
      -- version of the value that went (G16).
      local n, seq, vv = name, 0, 0
      if a then
        seq, vv = a[A_S], a[A_VV] or 0
        if a[A_N] ~= '' then n = a[A_N] end
      end
      local vi = 0
      if forgets_values() then vi = VI_FORGOTTEN end  -- V5
      local tok = seq + 1  -- F1 (`bump`)
      if NOW_US > tok then tok = NOW_US end
      a = {n, tok, vv, vi, false, id, owner, mode, flags, ticket, NOW + lease, tok, NONE, 0,
           priority}
      lone_write(key, a)
      return lone_reply(a)
    elseif a and a[A_ID] == id and a[A_E] > NOW then  -- G12 on a lone lock
      if a[A_O] ~= owner then
        fail('DLM_NOTOWNER', 'lock id ' .. id .. ' belongs to another owner')
      end
      if a[A_E] < NOW + lease then
        a[A_E] = NOW + lease
        lone_write(key, a)
      end
      return lone_reply(a)
    end
  end

  local pr = nil
  if pid ~= '' then pr = load(KEYS[4]) end
  local r = load(key)
  if r then
    local q, old = find(r, id)
    if old then  -- G12: a retried request finds itself
      if old.o ~= owner then fail('DLM_NOTOWNER', 'lock id ' .. id .. ' belongs to another owner') end
      -- and renews its lease, as renew.lua would: the client counts the grant it answers
      -- from when it sent this request (a grant given meanwhile by the queue must not end
      -- before that count does)
      if old.e < NOW + lease then
        old.e = NOW + lease
        if q ~= 'g' then windex_add(key, old) end
        mark(key)
      end
      return lock_state(r, old)
    end
  end
  local plk = nil
  if pid ~= '' then  -- H1
    if pr then
      local _, p = find(pr, pid)
      plk = p
    end
    if not plk or plk.o ~= owner or plk.gr == NONE then return short(S_NOPARENT) end
  end
  if not r then r = create(key, name) end
  if #r.g == 0 and #r.c == 0 and #r.w == 0 and forgets_values() then  -- V5
    r.vi = VI_FORGOTTEN
  end
  local pk = ''
  if pid ~= '' then pk = KEYS[4] end
  local lk = {id = id, o = owner, gr = NONE, rq = mode, f = flags, t = ticket, ct = 0,
              e = NOW + lease, p = pid, pk = pk, k = {}, tok = 0, pm = NONE}
  if priority ~= 0 then lk.pr = priority end  -- P1
  if has(flags, F_EXPEDITE)  -- G3
      or (#r.c == 0 and #r.w == 0 and compatible_with_granted(r, lk, mode)) then  -- G1
    lk.gr, lk.rq = mode, NONE
    lk.tok = bump(r)
    r.g[#r.g + 1] = lk
    mark(key)
  elseif has(flags, F_NOQUEUE) then  -- G2
    return short(S_NOTQUEUED)
  else
    insert(r.w, lk, false)  -- G11
    windex_add(key, lk)
    mark(key)
    process(key, r)
    if lk.gr == NONE then blocking(r, lk) end
  end
  -- K2: only a resource without a name (a tombstone left by a release floor, F1) takes the
  -- request's: another owner's request never renames a resource, and a request refused
  -- with NOTQUEUED (returned above) leaves nothing behind (G2).
  if r.n == '' and name ~= '' then r.n = name end
  if plk then
    plk.k[#plk.k + 1] = {key, id}
    mark(KEYS[4])
  end
  return lock_state(r, lk)
end)
