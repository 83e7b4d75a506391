-- convert.lua: change the mode of a granted lock (rules G2, G4-G8, G15, V1, V3, V6, N1, F1).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lock id          ARGV[5] new mode 0..5
-- ARGV[6] flags (NOQUEUE=1 QUECVT=4 CONVDEADLK=8 NODLCKWT=16 BLKAST=64)
-- ARGV[7] conversion ticket (client µs clock)       ARGV[8] lease ms
-- ARGV[9] 1 to write the value block (down from PW/EX only), else 0
-- ARGV[10] value bytes     ARGV[11] value version   ARGV[12] value size limit (V1)
-- ARGV[13] fencing floor: the holder's quorum token (F1), 0 if none
-- ARGV[14] priority (P1: a signed 32-bit int; absent: 0), stored where the flags are
--
-- Reply: lock reply; status GRANTED, QUEUED (converting), NOTQUEUED, DEADLOCK (G7; the lock
-- keeps its mode), RECOVERING (E1, up-conversions only), NOTFOUND. Errors: DLM_BADARG, DLM_NOTOWNER, DLM_STATE (the lock is
-- waiting or already converting).
-- Events: G to locks granted by queue processing, B to holders blocking a queued conversion
-- that read it (N1: BLKAST, or a younger ticket).

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local id = arg_id(ARGV[4], 'lock id')
  local mode = arg_mode(ARGV[5])
  local flags = arg_flags(ARGV[6], CONVERT_FLAGS)
  local cticket = arg_int(ARGV[7], 'ticket')
  local lease = arg_int(ARGV[8], 'lease_ms', 1, MAX_LEASE_MS)
  local write = ARGV[9] == '1'
  local value = ARGV[10] or ''
  local version = arg_int(ARGV[11], 'version')
  local vbmax = arg_int(ARGV[12], 'vbmax', 0, MAX_VBMAX)
  local floor = arg_int(ARGV[13], 'floor', 0, MAX_TOKEN)
  local priority = arg_priority(ARGV[14])
  local pr = nil  -- P1: stored only when not 0
  if priority ~= 0 then pr = priority end
  if write and #value > vbmax then
    fail('DLM_BADARG', 'value block of ' .. #value .. ' bytes exceeds ' .. vbmax .. ' (V1)')
  end
  local key = KEYS[3]

  local r = load(key)
  local qn, lk = nil, nil
  if r then qn, lk = find(r, id) end
  if not lk then return short(S_NOTFOUND) end
  if lk.o ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
  if qn == 'w' then fail('DLM_STATE', 'lock ' .. id .. ' is not granted yet') end
  if qn == 'c' then fail('DLM_STATE', 'lock ' .. id .. ' is already converting') end
  -- G15: a conversion older than the up-conversion that gave the lock its mode here (a
  -- message that arrived late, overtaken by a newer conversion of the same lock on another
  -- connection) changes nothing: the reply is the lock's state
  if cticket < lk.ct then return lock_state(r, lk) end
  -- M2: PR->CW is a middle conversion, not a down one
  local down = mode < lk.gr and not (lk.gr == PR and mode == CW)
  if write and not (lk.gr >= PW and down) then
    fail('DLM_BADARG', 'the value block is written only converting down from PW/EX (V3)')
  end
  if floor > r.s then r.s = floor end
  mark(key)
  if mode == lk.gr then  -- G4
    lk.e = NOW + lease
    return lock_state(r, lk)
  end
  if down then  -- G4
    if write and version >= r.vv then r.v, r.vv, r.vi = value, version, 0 end  -- V6
    lk.pm = NONE
    lk.gr = mode
    lk.e = NOW + lease
    process(key, r)
    return lock_state(r, lk)
  end
  local wait = recovering_ms()  -- E1: only reachable if the epoch was lost, not the data
  if wait > 0 then return reply(S_RECOVERING, lk.gr, lk.tok, -1, wait) end
  if compatible_with_granted(r, lk, mode)  -- G5
      and not (has(flags, F_QUECVT) and #r.c > 0) then
    lk.pm, lk.gr = lk.gr, mode
    lk.tok = bump(r)
    lk.e = NOW + lease
    lk.f, lk.ct = flags, cticket  -- Y1 puts a yielded conversion back at this ticket
    lk.pr = pr  -- P1
    -- G8: a middle conversion (CW->PR, PR->CW) granted at once can let queued requests
    -- through (a PR waiter behind a CW holder that now holds PR): process the queues, as
    -- after every change of a granted mode.
    process(key, r)
    return lock_state(r, lk)
  end
  if has(flags, F_NOQUEUE) then return short(S_NOTQUEUED) end  -- G2
  local old_rq, old_ct, old_f, old_pr = lk.rq, lk.ct, lk.f, lk.pr
  lk.rq, lk.ct, lk.f, lk.pr = mode, cticket, flags, pr  -- (P1)
  local trial = {}
  for i, o in ipairs(r.c) do trial[i] = o end
  insert(trial, lk, true)
  -- G7: fs/dlm conversion_deadlock_detect()
  local deadlock, behind = false, false
  for _, o in ipairs(trial) do
    if o == lk then
      behind = true
    elseif not behind then
      if not COMPAT[lk.gr][o.rq] then deadlock = true end
    elseif not COMPAT[lk.gr][o.rq] and not COMPAT[o.gr][lk.rq] then
      deadlock = true
    end
  end
  if deadlock then
    if not has(flags, F_CONVDEADLK) then
      lk.rq, lk.ct, lk.f, lk.pr = old_rq, old_ct, old_f, old_pr
      return reply(S_DEADLOCK, lk.gr, lk.tok)
    end
    lk.gr = NL
  end
  lk.pm = NONE
  lk.e = NOW + lease
  remove_from(r.g, lk)
  insert(r.c, lk, true)  -- G6
  windex_add(key, lk)
  process(key, r)
  if index_of(r.c, lk) then blocking(r, lk) end
  return lock_state(r, lk)
end)
