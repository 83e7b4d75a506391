-- break.lua: an operator's forced release of a lock, or of all an owner's locks, on one
-- resource (rules G8, V4, N3).
--
-- KEYS[1] epoch hash, KEYS[2] waiter index, KEYS[3] resource
-- ARGV[1] rejoin_ms        ARGV[2] channel prefix
-- ARGV[3] lock id or ''    ARGV[4] owner or ''   (at least one; either matches)
--
-- Every matching lock goes, whatever its queue; a broken PW/EX holder invalidates the value
-- block; each owner gets C|id|broken.
-- Reply: lock reply with status RELEASED and extra = locks broken. Errors: DLM_BADARG.

return run(function()
  local id = ARGV[3] or ''
  local owner = ARGV[4] or ''
  if id ~= '' then arg_id(id, 'lock id') end
  if owner ~= '' then arg_id(owner, 'owner') end
  if id == '' and owner == '' then fail('DLM_BADARG', 'break needs a lock id or an owner') end
  local key = KEYS[3]
  local r = load(key)
  local n = 0
  if r then
    for _, qn in ipairs({'g', 'c', 'w'}) do
      local keep = {}
      for _, lk in ipairs(r[qn]) do
        if (id ~= '' and lk.id == id) or (owner ~= '' and lk.o == owner) then
          n = n + 1
          if lk.gr >= PW and r.vi == 0 then r.vi = 1 end  -- V4 (V5's mark stays)
          if qn ~= 'g' then windex_rem(key, lk) end
          emit(lk.o, 'C|' .. lk.id .. '|broken')
        else
          keep[#keep + 1] = lk
        end
      end
      r[qn] = keep
    end
    mark(key)
    process(key, r)
  end
  return reply(S_RELEASED, NONE, 0, -1, n)
end)
