-- scan.lua: the deadlock detector's read of resources (docs/detector.md D1): read-only, and
-- only what the wait-for graph needs, as ONE flat array (no nested tables: each one costs
-- the server a table and the client a list; inspect.lua is the full view).
--
-- KEYS[1] epoch hash, KEYS[2..] resource keys (K1: as inspect, `dlm:{...` keys only)
-- ARGV: none
--
-- Nothing is purged or written. Locks whose lease ran out (lease left <= 0) are left out.
-- Reply, for n = #KEYS - 1 resource keys:
--   [1]                 now ms (the instance clock, as `init status` reads it)
--   [2i], [2i + 1]      for the i-th resource key: the number of its live locks (-1: no
--                       such resource), then its name ('' for none; nil if absent; the
--                       detector names the victim's resource with it)
--   [2n + 2 ...]        the live locks of every resource, in key order, then granted,
--                       converting, waiting queue order, FIELDS values each:
--                       queue 'G'|'C'|'W', id, owner, granted mode, requested mode, flags,
--                       ticket, conversion ticket, lease left ms, parent id ('' for none)
--                       (modes are -1 when none)
-- The fields of a lock are those of `detector.Lock`, in its order, so the client reads
-- them column by column. (The counts come first, not between the locks, for the same
-- reason.)

if KEYS[1] ~= 'dlm:epoch' then  -- K1: read our keys only
  return redis.error_reply('DLM_KEYS KEYS[1] must be dlm:epoch')
end
local nkeys = #KEYS
for i = 2, nkeys do
  if string.sub(KEYS[i], 1, 5) ~= 'dlm:{' then
    return redis.error_reply('DLM_KEYS KEYS[' .. i .. '] is not a resource key')
  end
end
local e = redis.call('HMGET', KEYS[1], 'tfix', 'toff')
local now
if e[1] then
  now = tonumber(e[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (tonumber(e[2] or '0') or 0)
end
local out = {now}
local h = 1                          -- the last header slot written
local n = 2 * nkeys - 1              -- the last value written (headers are reserved first)
for i = 2, n do out[i] = false end   -- (filled in order, so `out` stays an array)
local unpack, get = cmsgpack.unpack, redis.call
for i = 2, nkeys do
  local blob = get('GET', KEYS[i])
  if not blob then
    out[h + 1] = -1
    h = h + 2
  else
    local r = unpack(blob)
    local live = 0
    for qi = 1, 3 do
      local qn = qi == 1 and 'g' or (qi == 2 and 'c' or 'w')
      local q = r[qn]
      if q then
        local letter = qi == 1 and 'G' or (qi == 2 and 'C' or 'W')
        for j = 1, #q do
          local lk = q[j]
          local left = lk.e - now
          if left > 0 then
            out[n + 1] = letter
            out[n + 2] = lk.id
            out[n + 3] = lk.o
            out[n + 4] = lk.gr
            out[n + 5] = lk.rq
            out[n + 6] = lk.f
            out[n + 7] = lk.t
            out[n + 8] = lk.ct
            out[n + 9] = left
            out[n + 10] = lk.p
            n = n + 10
            live = live + 1
          end
        end
      end
    end
    out[h + 1] = live
    out[h + 2] = r.n or ''
    h = h + 2
  end
end
return out
