-- inspect.lua: read-only view of resources, for the CLI, the detector and the tests.
--
-- KEYS[1] epoch hash, KEYS[2..] resource keys (on a Redis Cluster member: the epoch hash of
--   their slot, H2c)
-- ARGV: none
--
-- Nothing is purged or written: expired locks show a negative lease. A key that holds no
-- lock resource (K1) fails the call with DLM_CORRUPT <key>.
-- Reply: {epoch id or nil, now ms, recovering ms, then per key: nil if absent, else
--   {name, seq, value or nil, version, invalid, {lock}, {lock}, ...}} where lock is
--   {queue 'G'|'C'|'W', id, owner, gr, rq, flags, ticket, cticket, lease left ms, parent id,
--    token, previous mode, priority, kid key, kid id, kid key, kid id, ...}; modes are -1
--    when none.

if not h2c.epoch_ok(KEYS[1]) then  -- K1: read our keys only (core.lua: the layout, H2c)
  return redis.error_reply('DLM_KEYS KEYS[1] must be ' .. h2c.epoch_form())
end
for i = 2, #KEYS do
  if string.sub(KEYS[i], 1, 5) ~= 'dlm:{' then
    return redis.error_reply('DLM_KEYS KEYS[' .. i .. '] is not a resource key')
  end
end
local e = redis.call('HMGET', KEYS[1], 'id', 'safe', 'tfix', 'toff')
local now = clock(e[3], e[4])  -- (core.lua)
local rec = 0
if e[2] and tonumber(e[2]) > now then rec = tonumber(e[2]) - now end
local out = {e[1] or false, now, rec}
for i = 2, #KEYS do
  local blob = get_blob(KEYS[i])  -- (core.lua: K1, a corrupt key is DLM_CORRUPT)
  if not blob then
    out[#out + 1] = false
  else
    local r = decode(KEYS[i], blob)
    local res = {r.n or '', r.s or 0, r.v or false, r.vv or 0, r.vi or 0}
    for _, qn in ipairs({'g', 'c', 'w'}) do
      for _, lk in ipairs(r[qn] or {}) do
        local l = {string.upper(qn), lk.id, lk.o, lk.gr, lk.rq, lk.f, lk.t, lk.ct, lk.e - now,
                   lk.p, lk.tok, lk.pm, lk.pr or 0}
        for _, kd in ipairs(lk.k or {}) do
          l[#l + 1] = kd[1]
          l[#l + 1] = kd[2]
        end
        res[#res + 1] = l
      end
    end
    out[#out + 1] = res
  end
end
return out
