-- break.lua: an operator's forced release of a lock, or of all an owner's locks, on one
-- resource, each with its subtree (rules G8, H3, H4, V4, N3).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource,
-- KEYS[4..] the resource key of every descendant of the locks broken (H3: all must be
--           declared), and their parents' resources (optional: where declared, a broken
--           lock is unlinked from its parent lock)
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] lock id or ''    ARGV[4] owner or ''   (at least one; either matches)
--
-- H4: every matching lock goes, whatever its queue, with every lock below it: children
-- first, depth first, each child resource's queues processed (G8) as its lock goes, the
-- resource's own once every matching lock has gone. A
-- broken PW/EX holder invalidates the value block; each owner gets C|id|broken for every
-- lock of it that went.
-- Reply: lock reply with status RELEASED and extra = locks broken, followed by 7 fields per
-- lock broken, in the order they went: resource key, resource name, lock id, owner, granted
-- mode, requested mode (-1 when none), queue 'G' | 'C' | 'W'.
-- Errors: DLM_BADARG, DLM_KEYS (a descendant's resource not in KEYS: nothing broken).

local broken  -- the reply's tail

local function break_one(key, r, qn, lk)
  if lk.gr >= PW and r.vi == 0 then r.vi = 1 end  -- V4 (V5's mark stays)
  emit(lk.o, 'C|' .. lk.id .. '|broken')
  local n = #broken
  broken[n + 1], broken[n + 2], broken[n + 3], broken[n + 4] = key, r.n or '', lk.id, lk.o
  broken[n + 5], broken[n + 6], broken[n + 7] = lk.gr, lk.rq, string.upper(qn)
end

return run(function()
  local id = ARGV[3] or ''
  local owner = ARGV[4] or ''
  if id ~= '' then arg_id(id, 'lock id') end
  if owner ~= '' then arg_id(owner, 'owner') end
  if id == '' and owner == '' then fail('DLM_BADARG', 'break needs a lock id or an owner') end
  broken = {}
  local key = KEYS[3]
  local r = load(key)
  local n = 0
  if r then
    local matched = {}
    for qi = 1, 3 do
      local qn = QUEUES[qi]
      for _, lk in ipairs(r[qn]) do
        if (id ~= '' and lk.id == id) or (owner ~= '' and lk.o == owner) then
          matched[#matched + 1] = {qn, lk}
        end
      end
    end
    for _, m in ipairs(matched) do  -- every match goes before the queues move (G8)
      local qn, lk = m[1], m[2]
      n = n + remove_kids(lk, nil, break_one) + 1
      break_one(key, r, qn, lk)
      remove_from(r[qn], lk)
      if qn ~= 'g' then windex_rem(key, lk) end
      parent_unlink(key, lk)
    end
    mark(key)
    process(key, r)
  end
  local out = reply(S_RELEASED, NONE, 0, -1, n)
  for i = 1, #broken do out[R_LEN + i] = broken[i] end
  return out
end)
