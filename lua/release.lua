-- release.lua: release a lock, granted or waiting (rules G8, G9, G16, H3, V1, V3, V6, F1).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource,
-- KEYS[4] parent's resource (KEYS[3] if the lock has no parent; absent when it has neither
--         parent nor descendants), KEYS[5..] the resource keys of every descendant (H3:
--         all must be declared)
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] owner            ARGV[4] lock id          ARGV[5] flags (SUBTREE=32)
-- ARGV[6] 1 to write the value block (PW/EX holders only), else 0
-- ARGV[7] value bytes      ARGV[8] value version    ARGV[9] value size limit (V1)
-- ARGV[10] fencing floor: the holder's quorum token (F1), 0 if none; raised even where
--          the lock is not found, so an instance where it expired still learns the token
--
-- Reply: lock reply; status RELEASED (extra = locks released, subtree included) or NOTFOUND.
-- Errors: DLM_BADARG, DLM_NOTOWNER, DLM_HASCHILDREN, DLM_KEYS.
-- Events: G to locks granted by queue processing.

local function refuse_kids(parent)
  fail('DLM_HASCHILDREN', 'lock ' .. parent.id .. ' has children; release them or ask SUBTREE')
end

return run(function()
  local owner = arg_id(ARGV[3], 'owner')
  local id = arg_id(ARGV[4], 'lock id')
  local flags = arg_flags(ARGV[5], RELEASE_FLAGS)
  local write = ARGV[6] == '1'
  local value = ARGV[7] or ''
  local version = arg_int(ARGV[8], 'version')
  local vbmax = arg_int(ARGV[9], 'vbmax', 0, MAX_VBMAX)
  local floor = arg_int(ARGV[10], 'floor', 0, MAX_TOKEN)
  if write and #value > vbmax then
    fail('DLM_BADARG', 'value block of ' .. #value .. ' bytes exceeds ' .. vbmax .. ' (V1)')
  end
  local key = KEYS[3]

  local a = lone_get(key)  -- the fast path (core.lua): a live lone lock, found
  if a and #a == LONE_LEN and a[A_ID] == id and a[A_E] > NOW then
    if a[A_O] ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
    if write and not (a[A_GR] >= PW) then
      fail('DLM_BADARG', 'the value block is written only releasing PW/EX (V3)')
    end
    -- G9: the last lock goes, with the value block (V6's write included), but not its
    -- version (G16); F1: the floor
    local seq, vv = a[A_S], a[A_VV]
    if floor > seq then seq = floor end
    if write and version > vv then vv = version end
    lone_write(key, enc.tomb(a[A_N], seq, vv))
    return short(S_RELEASED, 1)
  end

  local r = load(key)
  local qn, lk = nil, nil
  if r then qn, lk = find(r, id) end
  if not lk then
    if floor > 0 then
      if not r then r = create(key, '') end
      if floor > r.s then r.s = floor end
      mark(key)
    end
    return short(S_NOTFOUND)
  end
  if lk.o ~= owner then fail('DLM_NOTOWNER', 'lock ' .. id .. ' belongs to another owner') end
  if write and not (lk.gr >= PW) then
    fail('DLM_BADARG', 'the value block is written only releasing PW/EX (V3)')
  end
  local n = remove_kids(lk, not has(flags, F_SUBTREE) and refuse_kids or nil)
  if write and version >= r.vv then r.v, r.vv, r.vi = value, version, 0 end  -- V6
  if floor > r.s then r.s = floor end
  remove_lock(key, r, qn, lk, true)
  return short(S_RELEASED, n + 1)
end)
