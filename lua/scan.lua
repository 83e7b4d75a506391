-- scan.lua: the deadlock detector's read of resources (docs/detector.md D1): read-only, and
-- only what the wait-for graph needs, as ONE flat array (no nested tables: each one costs
-- the server a table and the client a list; inspect.lua is the full view).
--
-- KEYS[1] epoch hash, KEYS[2..] resource keys (K1: as inspect, `dlm:{...` keys only; on a
--   Redis Cluster member the epoch hash of their slot, H2c)
-- ARGV[i] for KEYS[i + 1], optional: the stamp of that resource the caller holds from an
--         earlier scan of this instance ('' or absent: none)
--
-- Nothing is purged or written. Locks whose lease ran out (expiry <= now) are left out.
-- Reply, for n = #KEYS - 1 resource keys:
--   [1]        now ms (the instance clock, as `init status` reads it)
--   [2]        a string of n bytes, one per resource key: '-' no such resource; '=' the
--              resource is as it was when the caller got the stamp it sent (its live locks,
--              their fields, its name: the caller's copy stands); '+' it follows
--   [3 ...]    for each '+' key, in key order, three values: its stamp (to send back next
--              time), the number of its live locks, its name ('' for none)
--   then       the live locks of the '+' keys, in key order, then granted, converting,
--              waiting queue order, FIELDS values each: queue 'G'|'C'|'W', id, owner,
--              granted mode, requested mode, flags, ticket, conversion ticket, lease expiry
--              (ms, instance clock), parent id ('' for none), priority (modes are -1 when
--              none)
-- The fields of a lock are those of `detector.Lock`, in its order (the expiry becomes the
-- lease left), so the client reads them column by column. (The heads come first, not
-- between the locks, for the same reason.)
--
-- Why stamps: decoding a stored resource (cmsgpack.unpack) is most of a scan's server CPU,
-- and the detector reads the same, mostly unchanged, resources every interval. `scan_memo`
-- (core.lua; kept between calls of the library, empty on every call in EVAL form) keeps,
-- per resource key, the blob last decoded and what was read from it, under a stamp. A GET
-- that returns the same bytes decodes to the same locks, so the memo's are used instead;
-- they stay right until the earliest of their leases runs out (the entry is then read
-- again) and only if the clock has not gone back (test clocks). A stamp is unique to the
-- library's life on this instance (its load time) and the entry, so a caller's stamp
-- matches only what it was given for exactly these bytes. Memory: at most 2 x MEMO_MAX
-- entries (two generations; an entry used moves to the current one).

if not h2c.epoch_ok(KEYS[1]) then  -- K1: read our keys only (core.lua: the layout, H2c)
  return redis.error_reply('DLM_KEYS KEYS[1] must be ' .. h2c.epoch_form())
end
local nkeys = #KEYS
for i = 2, nkeys do
  if string.sub(KEYS[i], 1, 5) ~= 'dlm:{' then
    return redis.error_reply('DLM_KEYS KEYS[' .. i .. '] is not a resource key')
  end
end
local MEMO_MAX = 50000
local e = redis.call('HMGET', KEYS[1], 'tfix', 'toff')
local now = clock(e[1], e[2])  -- (core.lua)
local memo = scan_memo
if not memo.base then  -- the library's life on this instance
  local t = redis.call('TIME')
  memo.base = t[1] .. '.' .. t[2] .. ':'
end
local cur, old = memo.cur, memo.old
local status = {}
local heads = {}
local nh = 0
local body = {}
local nb = 0
local unpack, get = cmsgpack.unpack, redis.call
for i = 2, nkeys do
  local key = KEYS[i]
  local blob = get('GET', key)
  if not blob then
    status[i - 1] = '-'
  else
    local m = cur[key]
    if not m then
      m = old[key]
      if m then  -- used again: into the current generation
        old[key] = nil
        if memo.n >= MEMO_MAX then
          memo.old, memo.cur, memo.n = cur, {}, 0
          cur, old = memo.cur, memo.old
        end
        cur[key] = m
        memo.n = memo.n + 1
      end
    end
    if not (m and m.b == blob and m.t <= now and now < m.x) then
      local r = unpack(blob)
      if is_table(r) and r[1] ~= nil and lone_valid(r) then r = expand(r) end  -- (core.lua)
      local d, nd, live, first = {}, 0, 0, math.huge
      for qi = 1, 3 do
        local q = r[qi == 1 and 'g' or (qi == 2 and 'c' or 'w')]
        if q then
          local letter = qi == 1 and 'G' or (qi == 2 and 'C' or 'W')
          for j = 1, #q do
            local lk = q[j]
            local x = lk.e
            if x > now then
              d[nd + 1] = letter
              d[nd + 2] = lk.id
              d[nd + 3] = lk.o
              d[nd + 4] = lk.gr
              d[nd + 5] = lk.rq
              d[nd + 6] = lk.f
              d[nd + 7] = lk.t
              d[nd + 8] = lk.ct
              d[nd + 9] = x
              d[nd + 10] = lk.p
              d[nd + 11] = lk.pr or 0
              nd = nd + 11
              live = live + 1
              if x < first then first = x end
            end
          end
        end
      end
      memo.seq = memo.seq + 1
      local fresh = {b = blob, t = now, x = first, s = memo.base .. memo.seq, c = live,
                     n = r.n or '', d = d}
      if not m then
        if memo.n >= MEMO_MAX then
          memo.old, memo.cur, memo.n = cur, {}, 0
          cur, old = memo.cur, memo.old
        end
        memo.n = memo.n + 1
      end
      cur[key] = fresh
      m = fresh
    end
    if m.s == ARGV[i - 1] then
      status[i - 1] = '='
    else
      status[i - 1] = '+'
      heads[nh + 1] = m.s
      heads[nh + 2] = m.c
      heads[nh + 3] = m.n
      nh = nh + 3
      local d = m.d
      for j = 1, #d do body[nb + j] = d[j] end
      nb = nb + #d
    end
  end
end
local out = {now, table.concat(status)}
for j = 1, nh do out[j + 2] = heads[j] end
nh = nh + 2
for j = 1, nb do out[nh + j] = body[j] end
return out
