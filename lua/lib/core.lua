-- core.lua: shared pieces of every redlockdlm script (redlockdlm/engine/scripts.py
-- assembles it and every lua/<name>.lua into one Functions library, or one EVAL script).
--
-- Layout every mutating script shares:
--   KEYS[1]  epoch hash `dlm:epoch`      (id, safe, rejoin, tfix, toff)
--   KEYS[2]  waiter index zset           member "<lock id>|<resource key>", score = lease expiry ms
--   KEYS[3]  the resource key            msgpack blob, see `load`
--   ARGV[1]  rejoin_ms                   E1: how long a new epoch stays recovering
--   ARGV[2]  channel prefix              events go to ARGV[2] .. owner
-- On a Redis Cluster member (H2c) the epoch hash, the waiter index and the channel prefix are
-- those of the resource's hash slot: `dlm:epoch:{T}`, `dlm:<ns>:waiters:{T}` and
-- `dlm:<ns>:ch:{T}:` with one slot tag T (redlockdlm/engine/keys.py `slot_tag`), and events go
-- out by SPUBLISH (sharded pub/sub). Each server accepts only its own layout (check_keys).
--
-- Nothing is written until `commit()`: every check that can fail runs first, so an error
-- reply (bad input, wrong owner, ...) leaves the database exactly as it was.
--
-- Rule ids (G1, H1, V3, ...) refer to docs/rules.md.

-- The globals the scripts use, as locals. In a Functions library every global read goes
-- through the protected globals table (~1 µs each), and the library cannot read them while it
-- loads, so `call` binds these once, on its first call. (In EVAL form: on every call.)
local function the_globals()  -- defined before the locals below, so these are the globals
  return redis, cmsgpack, string, table, math, type, tonumber, tostring, pcall, error, ipairs
end
local redis, cmsgpack, string, table, math, type, tonumber, tostring, pcall, error, ipairs

-- ----------------------------------------------------------------- state between calls
-- Every variable of the library that a call writes, in one place. In a Functions library
-- these locals live as long as the library on the instance (FUNCTION LOAD to the next load,
-- FUNCTION FLUSH or restart) and are shared by all its calls; Redis runs one script at a
-- time, so a call never sees another half done. In EVAL form the whole chunk runs on every
-- call: each starts as declared here. (KEYS, ARGV: the library's locals, set by `call`.)
--
-- Kept between calls: caches of pure functions of their input, or validated with it on use,
-- so a kept entry can never make a call decide otherwise than without it:
--   redis ... ipairs above: the globals, bound by the first `call` (`the_globals`); they do
--     not change while the library is loaded.
--   int_s, int_n, id_s, prio_s, prio_n: the argument checks (arg_int, arg_id, arg_priority):
--     per argument (`what`, a fixed set of names), the last string found valid and its
--     number. Validity is a pure function of the string, compared by ==; ranges are checked
--     on every call.
local int_s, int_n, id_s = {}, {}, {}  -- what -> last valid string (and its number)
local prio_s, prio_n  -- the last valid priority string and its value
--   valid_w, valid_ns, valid_prefix, valid_ch (check_keys): the last waiter index found valid
--     and what derives from it, a pure function of that string (and h2c.e, below):
--     namespace, key prefix, channel prefix. Each call's KEYS[1] and KEYS[2] are compared
--     with h2c.e and valid_w first.
local valid_w, valid_ns, valid_prefix, valid_ch
--   ep_all, ep_id, ep_safe, ep_rejoin, ep_fix, ep_off (epoch_fields): the last `all` field
--     of the epoch hash parsed, and its parts (a pure function of that string).
local ep_all, ep_id, ep_safe, ep_rejoin, ep_fix, ep_off
--   written (commit, load, lone_get): what the last committing call wrote: key -> {blob,
--     the compact record packed into it or false, the resource's table or false (at least
--     one of the two)}. A GET returning exactly those bytes decodes to exactly that, so the
--     unpack is skipped; bytes that differ in any way (another writer, expiry, a flush)
--     simply miss. An entry is handed over when used (the call may change the table, or
--     fail), and the whole map is replaced by every commit: one call's keys at most.
local written = {}
--   lk[enc.KEY] (commit, `enc.lock`): a lock table's own msgpack bytes and the fields they
--     were packed from, {bytes, gr, rq, e, tok, f, ct, pm, pr, k, id, o, t, p, pk}, kept in
--     the table itself (under a key no decoded lock can have: a table) and so as long as
--     `written` keeps the resource. A lock whose fields are all still those (its `k` the
--     same empty list) packs to exactly those bytes, so they are reused: a commit packs
--     only the locks its call changed or added (docs/design.md, "Storage"). Never written:
--     `enc.lock` packs a lock without it. enc.parts: the pieces of the last resource
--     `enc.resource` assembled (reused: entries past its count are stale).
local enc = {KEY = {}, parts = {}}
--   scan_memo (lua/scan.lua): the resources scan decoded: {cur = {}, old = {}, n = entries
--     in cur, seq = stamps issued, base = the library's load time on this instance}. An
--     entry is used only for the same bytes and while its leases and the clock allow (see
--     scan.lua); at most 2 x MEMO_MAX entries.
local scan_memo = {cur = {}, old = {}, n = 0, seq = 0, base = false}
--   run_checked (epoch_load, commit; E2): true once a call of this server process has
--     committed with an epoch of this process (created by it, or checked against its
--     run_id). Not a cache: a flag the library's lifetime bounds (a FUNCTION LOAD starts
--     it over: one more INFO, the same run_id, nothing changes). `register` is a local of
--     the Functions library only (redlockdlm/engine/scripts.py); the EVAL form declares
--     it nil and skips the check (no state between calls: INFO on every call).
local run_checked = false
local FUNCTIONS = register ~= nil
--   h2c: the Redis Cluster layout (H2c), one table (a Functions library has at most 200
--     locals, all but taken):
--     .cluster (h2c.on): whether this server is a Redis Cluster member (`INFO cluster`),
--       nil until the first call asks. `cluster-enabled` cannot change while the server
--       runs, and a restart starts the library over. (EVAL form: asked on every call.)
--     .e, .pub (check_keys): the epoch key that goes with valid_w, and the command that
--       publishes events: PUBLISH, or SPUBLISH on a cluster member (the shard channel of
--       the slot: Redis refuses a channel of another slot in a script).
--     .run, .run_ok (epoch_load; E2 on a cluster member): the server's run_id (its first 8
--       hex digits, read once: the process cannot change it) and the last epoch id found
--       to end with it (a pure function of that string). On a cluster each slot's epoch can
--       come from another process (a slot migrated here from another shard, a replica
--       promoted), so the check holds on every call, not once per library.
local h2c = {}
--
-- Per call: reset by `call` before every script runs (events and windex_ops are reused
-- only when empty), so nothing of one call reaches the next.
local REJOIN, CHANNEL  -- ARGV[1] rejoin_ms (E1: raised to the stored wait); ARGV[2]
local NOW, NOW_US      -- the instance clock (`clock`, read by epoch_load)
local EP_FIX, EP_OFF  -- the test clock fields as stored (strings, or false), for commit
local EP_SYNC         -- the `all` field to write when the hash has none (epoch_fields)
local EPOCH, SAFE      -- the epoch id and the time it is safe (E1; epoch_load)
local epoch_dirty = false  -- the epoch hash is written by commit
local cache        -- key -> resource (false if absent)
local dirty        -- key -> true
local dirty_order
local windex_ops   -- {'add', member, score} | {'rem', member}
local events       -- {owner, message}
local lone         -- false, or key -> compact record to write (the fast path, `lone_put`)
local pre_key, pre_blob, pre_rec  -- the key `lone_get` read: its bytes, its compact record
local one_key, one_rec  -- the single record a request or release writes (`lone_write`)

local NL, CR, CW, PR, PW, EX = 0, 1, 2, 3, 4, 5
local NONE = -1

-- M1. Rows: granted mode; columns: requested mode.
--              NL     CR     CW     PR     PW     EX
local COMPAT = {
  [0] = {[0]=true, true,  true,  true,  true,  true },  -- NL
  [1] = {[0]=true, true,  true,  true,  true,  false},  -- CR
  [2] = {[0]=true, true,  true,  false, false, false},  -- CW
  [3] = {[0]=true, true,  false, true,  false, false},  -- PR
  [4] = {[0]=true, true,  false, false, false, false},  -- PW
  [5] = {[0]=true, false, false, false, false, false},  -- EX
}

local F_NOQUEUE, F_EXPEDITE, F_QUECVT, F_CONVDEADLK, F_NODLCKWT, F_SUBTREE = 1, 2, 4, 8, 16, 32
local F_BLKAST = 64  -- N1: the lock's owner reads its blocking events (an `on_blocking`)
local REQUEST_FLAGS = F_NOQUEUE + F_EXPEDITE + F_NODLCKWT + F_BLKAST
local CONVERT_FLAGS = F_NOQUEUE + F_QUECVT + F_CONVDEADLK + F_NODLCKWT + F_BLKAST
local RELEASE_FLAGS = F_SUBTREE

local S_GRANTED, S_QUEUED, S_NOTQUEUED, S_DEADLOCK, S_RECOVERING = 0, 1, 2, 3, 4
local S_NOPARENT, S_NOTFOUND, S_RELEASED, S_CANCELLED, S_CANCELGRANT = 5, 6, 7, 8, 9

local TOMBSTONE_MS = 60000
local TOMBSTONE_PX = '60000'  -- a string: redis.call converts numbers at some cost
local MAX_LEASE_MS = 86400000
local MAX_INT = 9007199254740991
-- F1: the largest fencing floor accepted. Sequences are Lua doubles: above 2^53 `seq + 1`
-- rounds back to `seq`, so a floor near MAX_INT would freeze the tokens of the resource.
-- From 2^52 there are still 2^52 strictly increasing grants (and now_us reaches 2^52 in 2112).
local MAX_TOKEN = 4503599627370496
local MAX_KEY = 65536    -- bytes of a resource key (our own keys are < 50000)
local MAX_VBMAX = 65536
local BLOCKERS_REPORTED = 8

local function fail(code, msg)
  error({err = code .. ' ' .. msg})
end

local function has(flags, bit)
  return flags % (bit + bit) >= bit
end

-- ----------------------------------------------------------------- argument checks

-- The values checked come from ARGV: strings, or nil when missing. (string.find of the one
-- character that is NOT allowed, so no match string is created.)
--
-- The syntax checks are pure functions of the string, so the last string found valid for each
-- argument (`what`) is remembered between calls with what it gave (`int_s`, `int_n`, `id_s`,
-- `prio_s`, `prio_n`: the state block at the top): a client repeating its owner, rejoin_ms,
-- lease, flags... pays one comparison (strings are interned: == compares pointers) instead
-- of a C call. Ranges are checked on every call.

local function arg_int(s, what, lo, hi)
  lo = lo or 0
  hi = hi or MAX_INT
  local n
  if s ~= nil and int_s[what] == s then
    n = int_n[what]
  else
    if not s or #s == 0 or #s > 16 or string.find(s, '%D') then
      fail('DLM_BADARG', what .. ' must be an integer in ' .. lo .. '..' .. string.format('%.0f', hi))
    end
    n = s + 0  -- digits only: the same number as tonumber(s), without a C call
    int_s[what], int_n[what] = s, n
  end
  if n < lo or n > hi then
    fail('DLM_BADARG', what .. ' must be an integer in ' .. lo .. '..' .. string.format('%.0f', hi))
  end
  return n
end

local function arg_id(s, what)
  if s ~= nil and id_s[what] == s then return s end
  if not s or #s == 0 or #s > 64 or string.find(s, '[^%w_%.:%-]') then
    fail('DLM_BADARG', what .. ' must be 1..64 characters of [A-Za-z0-9_.:-]')
  end
  id_s[what] = s
  return s
end

local function arg_mode(s)
  local b = s and #s == 1 and string.byte(s)
  if not b or b < 48 or b > 53 then  -- '0'..'5'
    fail('DLM_BADARG', 'mode must be an integer 0..5 (NL CR CW PR PW EX)')
  end
  return b - 48
end

-- P1: a signed int in the range of a C int; absent (an older caller): 0.
local MIN_PRIORITY, MAX_PRIORITY = -2147483648, 2147483647
local function arg_priority(s)
  if s == nil then return 0 end
  if s == prio_s then return prio_n end
  if #s == 0 or #s > 11 or not string.find(s, '^%-?%d+$') then
    fail('DLM_BADARG', 'priority must be an integer in ' .. MIN_PRIORITY .. '..' .. MAX_PRIORITY)
  end
  local n = tonumber(s)
  if n < MIN_PRIORITY or n > MAX_PRIORITY then
    fail('DLM_BADARG', 'priority must be an integer in ' .. MIN_PRIORITY .. '..' .. MAX_PRIORITY)
  end
  if n == 0 then n = 0 end  -- (-0 too)
  prio_s, prio_n = s, n
  return n
end

local function arg_flags(s, allowed)
  local f = arg_int(s, 'flags', 0, 255)
  local bit = 1
  while bit <= f do
    if has(f, bit) and not has(allowed, bit) then
      fail('DLM_BADARG', 'flags ' .. f .. ' not allowed here (allowed mask ' .. allowed .. ')')
    end
    bit = bit + bit
  end
  return f
end

-- ----------------------------------------------------------------- clock and epoch (E1)

-- The instance clock, read here only (every script: epoch_load, init, inspect, scan).
-- `fix`, `off`: the test clock fields `tfix` and `toff` of the epoch hash as HMGET gives
-- them (strings, or false when absent; set only by the `init clock` script). With `tfix`
-- the clock is frozen at that many ms; else it is TIME plus `toff` ms. Returns now in ms,
-- now in µs, and TIME's seconds and microseconds (nil when frozen: TIME is not read).
local function clock(fix, off)
  if fix then
    local now = tonumber(fix)
    return now, now * 1000
  end
  local t = redis.call('TIME')
  local sec, usec = t[1] + 0, t[2] + 0  -- TIME: two strings of digits
  off = off and tonumber(off) or 0
  return sec * 1000 + (usec - usec % 1000) / 1000 + off,  -- usec: 0..999999
    sec * 1000000 + usec + off * 1000, sec, usec
end

-- A new epoch's id: the instance clock's TIME (without the test offset: sec, usec as
-- `clock` returns them; read here when the clock is frozen) and the first 8 hex digits of
-- the server's run_id, so two servers never create the same id (clients refuse two
-- instances whose replies carry one id: one server reached by two URLs, docs/protocol.md).
-- INFO only when an epoch is created, and once per server process for E2 (epoch_load).
local function server_run()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x%x%x%x%x%x%x%x)') or '0'
end

-- H2c: is this server a Redis Cluster member? Asked once per library (every call in EVAL form).
function h2c.on()
  local c = h2c.cluster
  if c == nil then
    c = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
    h2c.cluster = c
  end
  return c
end

-- K1, H2c: is `k` the epoch hash of this server's layout? (`dlm:epoch` on a standalone
-- server, `dlm:epoch:{<digits>}` on a cluster member; Redis itself refuses keys of other
-- slots.) And the layout's name of it, for error replies.
function h2c.epoch_ok(k)
  if h2c.on() then
    return type(k) == 'string' and #k <= 24 and string.find(k, '^dlm:epoch:{%d+}$') ~= nil
  end
  return k == 'dlm:epoch'
end

function h2c.epoch_form()
  if h2c.cluster then return 'dlm:epoch:{<slot tag>} (a Redis Cluster member)' end
  return 'dlm:epoch'
end

local function new_epoch_id(sec, usec, run)
  if not sec then
    local t = redis.call('TIME')
    sec, usec = t[1] + 0, t[2] + 0  -- TIME: two strings of digits
  end
  return string.format('%x.%x.', sec, usec) .. (run or server_run())
end

-- E1: the epoch hash holds the instance's own rejoin wait (`rejoin`, ms), stored when the
-- epoch is created: the largest of the creating call's rejoin_ms (the largest the client
-- knows: its own, the values other instances' epochs store, a library floor) and a value an
-- operator stored before (`init rejoin`). A later call with a larger rejoin_ms extends a
-- recovery still running (a longer wait is always safe), never one that is over (clients
-- that started since remember the stored value: raising it needs `init rejoin`).
--
-- The epoch hash's fields (id, safe, rejoin, tfix, toff) are also stored joined in one field,
-- `all` = "id|safe|rejoin|tfix|toff" (absent ones empty), which every writer of the hash
-- keeps equal to them (`commit`, `epoch_sync`): a call reads that one field and, while it
-- is the string the previous call read, parses nothing. Without `all` (no epoch yet, or a
-- hash written before it existed) the fields are read one by one and the call writes `all`.
local function epoch_join(id, safe, rejoin, fix, off)
  return id .. '|' .. safe .. '|' .. rejoin .. '|' .. (fix or '') .. '|' .. (off or '')
end

-- id, safe (number), tfix, toff (strings or false), stored rejoin (number or nil), and
-- the `all` field to write (false when it is there).
local function epoch_fields()
  local all = redis.call('HGET', KEYS[1], 'all')
  if all then
    if all == ep_all then return ep_id, ep_safe, ep_fix, ep_off, ep_rejoin, false end
    local id, safe, rejoin, fix, off =
      string.match(all, '^([^|]+)|(%d+)|(%d*)|(%d*)|(%-?%d*)$')
    if id then
      if fix == '' then fix = false end
      if off == '' then off = false end
      ep_all, ep_id, ep_safe, ep_fix, ep_off, ep_rejoin =
        all, id, tonumber(safe), fix, off, tonumber(rejoin)
      return ep_id, ep_safe, ep_fix, ep_off, ep_rejoin, false
    end
  end
  local e = redis.call('HMGET', KEYS[1], 'id', 'safe', 'tfix', 'toff', 'rejoin')
  return e[1], e[2] and tonumber(e[2]), e[3], e[4], e[5] and tonumber(e[5]),
    e[1] and epoch_join(e[1], e[2] or '0', e[5] or '', e[3], e[4])
end

-- (init.lua, after it changed the epoch hash: `all` follows the fields.)
local function epoch_sync()
  local e = redis.call('HMGET', KEYS[1], 'id', 'safe', 'rejoin', 'tfix', 'toff')
  if e[1] then
    redis.call('HSET', KEYS[1], 'all', epoch_join(e[1], e[2] or '0', e[3] or '', e[4], e[5]))
  else
    redis.call('HDEL', KEYS[1], 'all')
  end
end

-- E2: the first call of a server process (Functions form only) compares the run_id that
-- created the epoch (the end of its id) with the server's own. Another one: the server
-- restarted WITH its data (AOF, RDB, a promoted replica), which may lack the last writes
-- before the restart (grants, renewals), so the epoch is replaced by a new one in its
-- rejoin window exactly as if it had been lost (E1; V5 marks apply). `run_checked` is set
-- only when such a call commits, so a call that fails leaves the check to the next one.
local function epoch_load()
  local id, safe, fix, off, stored
  id, safe, fix, off, stored, EP_SYNC = epoch_fields()
  EP_FIX, EP_OFF = fix, off
  local sec, usec
  NOW, NOW_US, sec, usec = clock(fix, off)
  local cluster = h2c.cluster
  if id and not cluster and FUNCTIONS and not run_checked then
    local run = server_run()
    if string.sub(id, -#run - 1) ~= '.' .. run then  -- E2: restarted with its data
      id = nil
      EPOCH = new_epoch_id(sec, usec, run)
    end
  elseif id and cluster and id ~= h2c.run_ok then  -- E2, per slot (see h2c.run)
    local run = h2c.run
    if not run then
      run = server_run()
      if FUNCTIONS then h2c.run = run end
    end
    if string.sub(id, -#run - 1) ~= '.' .. run then  -- another process made this epoch
      id = nil
      EPOCH = new_epoch_id(sec, usec, run)
    elseif FUNCTIONS then
      h2c.run_ok = id
    end
  end
  if id then
    EPOCH, SAFE = id, safe
    if stored then
      if REJOIN > stored and SAFE > NOW then
        SAFE = SAFE - stored + REJOIN  -- still recovering: wait the longer rejoin
        epoch_dirty = true
      elseif stored > REJOIN then
        REJOIN = stored  -- (V5's window is the instance's rejoin wait)
      end
    end
  else
    EPOCH = EPOCH or new_epoch_id(sec, usec)
    if stored and stored > REJOIN then REJOIN = stored end
    SAFE = NOW + REJOIN
    epoch_dirty = true
  end
end

local function recovering_ms()
  if SAFE > NOW then return SAFE - NOW end
  return 0
end

-- V5: an instance that restarted empty (its epoch was created here, SAFE > 0; `init fresh`
-- stores 0) may have forgotten a value block whose resource lives on elsewhere. Until
-- rejoin_ms after it became safe (long enough for the held locks to re-acquire their vote,
-- R2), a resource that gets its first lock here has its value block marked forgotten.
local VI_FORGOTTEN = 2
local function forgets_values()
  return SAFE > 0 and NOW < SAFE + REJOIN
end

-- ----------------------------------------------------------------- resources

-- A resource blob: {n=name, s=fencing seq, v=value (absent if none), vv=version,
-- vi=1 if invalid, g={granted...}, c={converting...}, w={waiting...}}.
-- A lock: {id, o=owner, gr, rq (NONE if none), f=flags, t=ticket, ct=conversion ticket,
-- e=expiry ms, p=parent id or '', pk=parent key or '', k={{key, id}...}, tok, pm,
-- pr=priority (P1; absent when 0, so a lock without one is stored as before)}.

local function mark(key)
  if not dirty[key] then
    dirty[key] = true
    dirty_order[#dirty_order + 1] = key
  end
end

local function windex_add(key, lk)
  windex_ops[#windex_ops + 1] = {'add', lk.id .. '|' .. key, lk.e}
end

local function windex_rem(key, lk)
  windex_ops[#windex_ops + 1] = {'rem', lk.id .. '|' .. key}
end

local function emit(owner, msg)
  events[#events + 1] = {owner, msg}
end

local function fmt(n)
  return string.format('%.0f', n)
end

-- (Numeric loops, not ipairs: each ipairs step is a C function call.)
local function compatible_with_granted(r, lk, mode)
  local q = r.g
  for i = 1, #q do
    local o = q[i]
    if o ~= lk and not COMPAT[o.gr][mode] then return false end
  end
  q = r.c
  for i = 1, #q do
    local o = q[i]
    if o ~= lk and not COMPAT[o.gr][mode] then return false end
  end
  return true
end

local function bump(r)  -- F1: hybrid logical clock
  local s = r.s + 1
  if NOW_US > s then s = NOW_US end
  r.s = s
  return s
end

local function grant_event(r, lk)  -- N2
  local hasv, v = 0, ''
  if r.v then hasv, v = 1, r.v end
  emit(lk.o, 'G|' .. lk.id .. '|' .. lk.gr .. '|' .. fmt(lk.tok) .. '|' .. fmt(r.vv) .. '|'
    .. r.vi .. '|' .. hasv .. '|' .. v)
end

local function remove_from(q, lk)
  for i = 1, #q do
    if q[i] == lk then
      table.remove(q, i)
      return i
    end
  end
  return nil
end

local function index_of(q, lk)
  for i = 1, #q do
    if q[i] == lk then return i end
  end
  return nil
end

-- G8: the conversion queue first, repeatedly; then waiters strictly in order while no
-- conversion is queued, stopping at the first that cannot be granted. Returns true if it
-- granted anything (the caller marks the resource then).
local function process(key, r)
  local granted = false
  local changed = #r.c > 0
  while changed do
    changed = false
    local snapshot = {}
    for i = 1, #r.c do snapshot[i] = r.c[i] end
    for i = 1, #snapshot do
      local lk = snapshot[i]
      if index_of(r.c, lk) and not (has(lk.f, F_QUECVT) and r.c[1] ~= lk)
          and compatible_with_granted(r, lk, lk.rq) then
        remove_from(r.c, lk)
        lk.pm, lk.gr, lk.rq = lk.gr, lk.rq, NONE
        lk.tok = bump(r)
        r.g[#r.g + 1] = lk
        windex_rem(key, lk)
        grant_event(r, lk)
        changed = true
        granted = true
      end
    end
  end
  while #r.c == 0 and #r.w > 0 do
    local lk = r.w[1]
    if not compatible_with_granted(r, lk, lk.rq) then break end
    table.remove(r.w, 1)
    lk.gr, lk.rq = lk.rq, NONE
    lk.tok = bump(r)
    r.g[#r.g + 1] = lk
    windex_rem(key, lk)
    grant_event(r, lk)
    granted = true
  end
  return granted
end

-- G10, V4: drop expired locks, invalidate the value of an expired writer. G13: a purge that
-- removes the last lock drops the value block, as a release does, also when the same call
-- then adds a lock (a request): else an instance that missed the resource's disappearance
-- elsewhere would hand out the older value to the next holder, said valid.
-- G8: then the queues are processed, whether a lock went or not: every call that loads a
-- resource finds its queues processed, so one left unprocessed (by an older version of the
-- scripts) is repaired by the next call that touches it, a waiter's own renewal included.
local QUEUES = {'g', 'c', 'w'}  -- read only

local function purge(key, r)
  local removed = false
  for qi = 1, 3 do
    local qn = QUEUES[qi]
    local q = r[qn]
    local n = #q
    local first = 1  -- the first expired lock; the queue is rebuilt only if there is one
    while first <= n and q[first].e > NOW do first = first + 1 end
    if first <= n then
      local keep = {}
      for i = 1, first - 1 do keep[i] = q[i] end
      for i = first, n do
        local lk = q[i]
        if lk.e <= NOW then
          removed = true
          if lk.gr >= PW and r.vi == 0 then r.vi = 1 end  -- (V5's mark stays)
          if qn ~= 'g' then windex_rem(key, lk) end
        else
          keep[#keep + 1] = lk
        end
      end
      r[qn] = keep
    end
  end
  if removed then
    mark(key)
    if #r.g == 0 and #r.c == 0 and #r.w == 0 then
      r.v, r.vi = nil, 0  -- (G9: the version stays, with the tombstone, G16)
    end
  end
  if process(key, r) then mark(key) end
end

-- K1: a resource key that holds something else than a resource (another type, bytes that
-- do not decode to one: written by another program, or damaged) is refused with the typed
-- error `DLM_CORRUPT <key> <why>` before anything is changed, rather than failing halfway
-- (DLM_INTERNAL). lua/renew.lua catches it to fail that lock alone.
local function corrupt(key, why)
  fail('DLM_CORRUPT', key .. ' ' .. why)
end

local function is_table(x) return type(x) == 'table' end

-- A decoded blob is used only if it has a resource's shape: a table with a numeric
-- sequence, queues that are lists of tables with the fields every script reads.
local function check_shape(key, r)
  if not is_table(r) or type(r.s) ~= 'number' then corrupt(key, 'is not a lock resource') end
  for qi = 1, 3 do
    local q = r[QUEUES[qi]]
    if q ~= nil then
      if not is_table(q) then corrupt(key, 'has a malformed queue') end
      for i = 1, #q do
        local lk = q[i]
        if not is_table(lk) or type(lk.id) ~= 'string' or type(lk.o) ~= 'string'
            or type(lk.gr) ~= 'number' or type(lk.e) ~= 'number' then
          corrupt(key, 'has a malformed lock')
        end
      end
    end
  end
end

-- The bytes at a resource key (false if absent): WRONGTYPE there is DLM_CORRUPT (K1);
-- any other refusal (an ACL, K3) is raised as it is, for `failure` to type it.
local function get_blob(key)
  local blob = redis.pcall('GET', key)
  if is_table(blob) and blob.err then
    if string.find(blob.err, 'WRONGTYPE', 1, true) then corrupt(key, 'holds another type') end
    error(blob.err)
  end
  return blob
end

-- ----------------------------------------------------------------- compact records
-- The common resources are stored in a compact form, a flat msgpack array that the fast
-- path (request, release, renew of a lone lock) reads and writes field by field, without
-- building the full table of `load` (docs/design.md, "Storage"):
--   tombstone (G9):   {n, s} or {n, s, vv}      (vi = 0, no value, no lock; vv: the
--                     version of the value that went with the last lock, G16)
--   one lock (lone):  {n, s, vv, vi, v or false, id, o, gr, f, t, e, tok, pm, ct, pr}
-- (the fields of the map and of its lock, in this order; pr = 0 when the lock has none).
-- Told apart by their length; all are msgpack fixarrays (first byte 0x92, 0x93, 0x9f).
-- A lone record is a resource whose only lock is granted (rq = NONE), has no parent and no
-- children: nothing waits, converts or hangs below it. Any other resource is the msgpack
-- map described above. `commit` picks the form; every reader accepts both (`decode`).
local A_N, A_S, A_VV, A_VI, A_V, A_ID, A_O, A_GR, A_F, A_T, A_E, A_TOK, A_PM, A_CT, A_PR =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
local TOMB_LEN, LONE_LEN = 2, 15
-- A tombstone: {n, s} when it has no version, else {n, s, vv} (TOMB_LEN + 1 fields; a
-- valid record of at most that many is one). (A field of `enc`: the library's main
-- function is at Lua's limit of 200 locals.)
function enc.tomb(n, s, vv)
  if vv == 0 then return {n, s} end
  return {n, s, vv}
end
-- false: no fast path and no compact record written (every resource stored as a map, as
-- before they existed). Only tests/engine/test_fastpath.py builds a library so, to check
-- that the fast path decides as the full one does.
local FAST = true

-- A compact record has the shape above (K1: bytes we did not write may claim to be one).
local function lone_valid(a)
  if not is_table(a) or type(a[A_N]) ~= 'string' or type(a[A_S]) ~= 'number' then
    return false
  end
  local len = #a
  if len == TOMB_LEN then return true end
  if len == TOMB_LEN + 1 then return type(a[A_VV]) == 'number' end
  return len == LONE_LEN and type(a[A_VV]) == 'number'
    and type(a[A_VI]) == 'number' and (a[A_V] == false or type(a[A_V]) == 'string')
    and type(a[A_ID]) == 'string' and type(a[A_O]) == 'string'
    and type(a[A_GR]) == 'number' and type(a[A_F]) == 'number'
    and type(a[A_T]) == 'number' and type(a[A_E]) == 'number'
    and type(a[A_TOK]) == 'number' and type(a[A_PM]) == 'number'
    and type(a[A_CT]) == 'number' and type(a[A_PR]) == 'number'
end

-- The full table of a (valid) compact record.
local function expand(a)
  if #a <= TOMB_LEN + 1 then return {n = a[A_N], s = a[A_S], vv = a[A_VV] or 0, vi = 0} end
  local lk = {id = a[A_ID], o = a[A_O], gr = a[A_GR], rq = NONE, f = a[A_F], t = a[A_T],
              ct = a[A_CT], e = a[A_E], p = '', pk = '', k = {}, tok = a[A_TOK],
              pm = a[A_PM]}
  if a[A_PR] ~= 0 then lk.pr = a[A_PR] end
  local v = a[A_V]
  if v == false then v = nil end
  return {n = a[A_N], s = a[A_S], v = v, vv = a[A_VV], vi = a[A_VI], g = {lk}, c = {}, w = {}}
end

-- The compact record of a full resource table, or nil if it has no compact form.
local function compact(r)
  if not FAST or #r.c > 0 or #r.w > 0 then return nil end
  local g = r.g
  if #g == 0 then return enc.tomb(r.n, r.s, r.vv) end  -- (commit writes it as a tombstone)
  if #g > 1 then return nil end
  local lk = g[1]
  if lk.rq ~= NONE or lk.p ~= '' or #lk.k > 0 then return nil end
  return {r.n, r.s, r.vv, r.vi, r.v or false, lk.id, lk.o, lk.gr, lk.f, lk.t,
          lk.e, lk.tok, lk.pm, lk.ct, lk.pr or 0}
end

-- A resource's bytes decoded, and checked to have a resource's shape (K1: DLM_CORRUPT).
local function decode(key, blob)
  local ok, r = pcall(cmsgpack.unpack, blob)
  if not ok then corrupt(key, 'does not decode') end
  if is_table(r) and r[1] ~= nil then  -- a compact record
    if not lone_valid(r) then corrupt(key, 'is not a lock resource') end
    return expand(r)
  end
  check_shape(key, r)
  return r
end

-- Load a resource (nil if absent), purging expired locks first (G10).
local function load(key)
  if key == nil then fail('DLM_KEYS', 'a resource key is missing from KEYS') end
  local r = cache[key]
  if r == nil then
    local a = lone and lone[key]  -- the fast path changed it in this call (renew)
    local blob
    if a then
      lone[key] = nil
      blob = true
    elseif key == pre_key then  -- (lone_get read it)
      blob, a = pre_blob, pre_rec
      pre_key = nil
    else
      blob = get_blob(key)
    end
    if blob then
      local w = written[key]
      if a then
        r = expand(a)
      elseif w and w[1] == blob then  -- (its locks have their `k`: `commit` wrote it)
        r = w[3] or expand(w[2])
        written[key] = nil
      else
        r = decode(key, blob)
        for qi = 1, 3 do
          local q = r[QUEUES[qi]]
          for i = 1, q and #q or 0 do
            local lk = q[i]
            if not lk.k then lk.k = {} end
          end
        end
      end
      r.g = r.g or {}
      r.c = r.c or {}
      r.w = r.w or {}
      cache[key] = r
      purge(key, r)
    else
      cache[key] = false
      return nil
    end
  end
  if r == false then return nil end
  return r
end

-- ----------------------------------------------------------------- the fast path
-- request, release and renew first look at their resource with `lone_get`: when it is
-- absent, a tombstone or a lone lock (a compact record, above), what they do is decided on
-- the record's fields alone (nothing queued: no purge beyond the lock's own expiry, no queue
-- processing, no waiter index, no event), and `lone_put` hands the changed record to
-- `commit`. Anything else goes to the full path (`load`), which reads the record
-- `lone_get` already read. tests/engine/test_fastpath.py checks both paths give the same.

-- The resource at `key` for the fast path: its compact record (the caller may change it and
-- hand it to `lone_put`), false when the key is absent, nil when it has the full form or
-- this call already loaded it (the full path then; K1 errors too: `load` reports them).
local function lone_get(key)
  if not FAST or key == nil or cache[key] ~= nil then return nil end  -- (nil: `load` says)
  local a = lone and lone[key]
  if a then return a end
  local blob = get_blob(key)
  pre_key, pre_blob, pre_rec = key, blob, nil
  if not blob then return false end
  local w = written[key]
  if w and w[1] == blob then
    a = w[2]
    if not a then return nil end  -- the full form: `load` takes it from `written`
    written[key] = nil
  else
    local b = string.byte(blob)
    if b ~= 0x92 and b ~= 0x93 and b ~= 0x9f then return nil end  -- (the fixarrays 2, 3, 15)
    local ok
    ok, a = pcall(cmsgpack.unpack, blob)
    if not ok or not lone_valid(a) then return nil end
  end
  pre_rec = a
  return a
end

local function lone_put(key, a)
  if not lone then lone = {} end
  lone[key] = a
  mark(key)
end

-- The write of a request or release on the fast path: its call's only write and last act
-- (the script returns right after). `commit` writes it alone, without the bookkeeping of
-- `lone_put` (per-call tables), unless the epoch or another key is to be written too.
local function lone_write(key, a)
  if one_key or lone or #dirty_order > 0 then
    lone_put(key, a)
  else
    one_key, one_rec = key, a
  end
end

local function create(key, name)
  local r = {n = name, s = 0, vv = 0, vi = 0, g = {}, c = {}, w = {}}
  cache[key] = r
  mark(key)
  return r
end

local function find(r, id)
  for qi = 1, 3 do
    local qn = QUEUES[qi]
    local q = r[qn]
    for i = 1, #q do
      local lk = q[i]
      if lk.id == id then return qn, lk end
    end
  end
  return nil, nil
end

local function ticket_less(a, b, conv)
  local ta, tb
  if conv then ta, tb = a.ct, b.ct else ta, tb = a.t, b.t end
  if ta ~= tb then return ta < tb end
  return a.id < b.id
end

-- G11: queues are kept in (ticket, id) order: `lk` goes after the last lock that is not
-- after it (searched from the tail, where a new request's ticket, the newest, goes).
local function insert(q, lk, conv)
  local i = #q
  while i > 0 and ticket_less(lk, q[i], conv) do i = i - 1 end
  table.insert(q, i + 1, lk)
end

-- N1: tell the holders whose granted mode blocks a queued request, those that read it:
-- a holder whose flags ask for blocking events (BLKAST: its owner has an `on_blocking`),
-- and one whose own ticket or conversion ticket is younger than the queued one (the
-- client reads that event to give back a grant split between instances, Y1). Nobody
-- else reads it, so it is not published.
local function blocking(r, lk)
  local ticket = lk.t
  if lk.gr ~= NONE then ticket = lk.ct end
  for qi = 1, 2 do
    local q = r[QUEUES[qi]]
    for i = 1, #q do
      local o = q[i]
      if o ~= lk and not COMPAT[o.gr][lk.rq]
          and (ticket < o.t or ticket < o.ct or has(o.f, F_BLKAST)) then
        emit(o.o, 'B|' .. o.id .. '|' .. lk.rq .. '|' .. fmt(ticket) .. '|' .. lk.id)
      end
    end
  end
end

-- The reply about one lock, the one place its layout is written (redlockdlm/engine/codec.py
-- `parse_lock_reply` reads it; its _LOCK_REPLY_LEN and _BLOCKER_FIELDS point here):
--   R_STATUS     S_*                       R_VALUE      value block or false (V2)
--   R_EPOCH      the instance's epoch id   R_VERSION    value block version
--   R_MODE       granted mode or NONE      R_INVALID    0 valid, 1 invalid (V4), 2 forgotten (V5)
--   R_TOKEN      fencing token (F1)        R_WAIT       ms to the earliest lease ahead, -1: none
--   R_POS        queue position, -1: none  R_EXTRA      RECOVERING: ms to wait; RELEASED: count;
--                                                       QUEUED: the resource's fencing sequence
--                                                       (a grant after this reply has a larger
--                                                       token: older grant events are stale)
--   R_NBLOCKERS  blockers found, then R_LEN + 1...: owner, id, mode of each blocker reported
--                (BLOCKERS_REPORTED at most; break.lua puts its own tail there instead).
-- `reply` builds the head in this order (a table constructor: no index is written there).
-- The common outcomes have short forms, without a tail, told apart by their length (each
-- element of a reply costs the server a conversion; docs/protocol.md, "Lock reply"):
--   3 fields  {status, epoch, extra}: mode NONE, token 0, position -1 and every other field
--             its default (`short`: RELEASED, NOTFOUND, RECOVERING, NOTQUEUED, NOPARENT);
--   4 fields  {status, epoch, mode, token}: granted (position 0), no value block to report
--             (none, version 0, valid: an NL grant, or a resource without a value);
--   7 fields  {status, epoch, mode, token, value, version, invalid}: granted, with them.
local R_STATUS, R_EPOCH, R_MODE, R_TOKEN, R_POS = 1, 2, 3, 4, 5
local R_VALUE, R_VERSION, R_INVALID, R_WAIT, R_EXTRA, R_NBLOCKERS = 6, 7, 8, 9, 10, 11
local R_LEN = 11

local function reply(status, gr, tok, pos, extra)
  return {status, EPOCH, gr or NONE, tok or 0, pos or -1, false, 0, 0, -1, extra or 0, 0}
end

-- The 3-field form: `reply(status, NONE, 0, -1, extra)` said shorter.
local function short(status, extra)
  return {status, EPOCH, extra or 0}
end

-- The reply of a grant (V2: the value block unless NL), in the 4- or 7-field form.
local function granted_reply(gr, tok, v, vv, vi)
  if gr == NL or (not v and vv == 0 and vi == 0) then
    return {S_GRANTED, EPOCH, gr, tok}
  end
  return {S_GRANTED, EPOCH, gr, tok, v or false, vv, vi}
end

-- The reply about a lone record's lock: granted (`lock_state`).
local function lone_reply(a)
  return granted_reply(a[A_GR], a[A_TOK], a[A_V], a[A_VV], a[A_VI])
end

local function lock_state(r, lk)
  local qn = nil
  if index_of(r.g, lk) then qn = 'g' elseif index_of(r.c, lk) then qn = 'c' else qn = 'w' end
  if qn == 'g' then return granted_reply(lk.gr, lk.tok, r.v, r.vv, r.vi) end
  local q = r[qn]
  local pos = index_of(q, lk) - 1
  local out = reply(S_QUEUED, lk.gr, lk.tok, pos, r.s)
  local wait = nil  -- the earliest lease of a lock ahead
  for qi = 1, 3 do
    local bq, last = r[QUEUES[qi]], nil
    if qi < 3 then last = #bq elseif qn == 'w' then last = pos else last = 0 end
    for i = 1, last do
      local o = bq[i]
      if o ~= lk and (wait == nil or o.e < wait) then wait = o.e end
    end
  end
  if wait ~= nil then
    if wait < NOW then wait = NOW end
    out[R_WAIT] = wait - NOW
  end
  local n = 0
  for qi = 1, 2 do
    local bq = r[QUEUES[qi]]
    for i = 1, #bq do
      local o = bq[i]
      if o ~= lk and not COMPAT[o.gr][lk.rq] then
        n = n + 1
        if n <= BLOCKERS_REPORTED then
          out[#out + 1] = o.o
          out[#out + 1] = o.id
          out[#out + 1] = o.gr
        end
      end
    end
  end
  out[R_NBLOCKERS] = n
  return out
end

local function declared(key)
  for i = 3, #KEYS do
    if KEYS[i] == key then return true end
  end
  return false
end

local function parent_unlink(key, lk)
  if lk.p ~= '' and declared(lk.pk) then
    local pr = load(lk.pk)
    if pr then
      local _, plk = find(pr, lk.p)
      if plk then
        for i, kd in ipairs(plk.k) do
          if kd[1] == key and kd[2] == lk.id then
            table.remove(plk.k, i)
            mark(lk.pk)
            break
          end
        end
      end
    end
  end
end

-- Remove a lock from its queue and process the resource (G8).
local function remove_lock(key, r, qn, lk, unlink)
  remove_from(r[qn], lk)
  if qn ~= 'g' then windex_rem(key, lk) end
  if unlink then parent_unlink(key, lk) end
  mark(key)
  process(key, r)
end

-- H3, H4: remove every lock below `lk`, depth first (its children's children before them),
-- and return how many went. Every child key must be passed in KEYS. `pre(parent, child)`
-- runs before a child's own subtree goes (release: refuse without SUBTREE), `post(key, r,
-- queue, child)` after it, just before the child itself goes (break: report and tell it).
local function remove_kids(lk, pre, post)
  local n = 0
  local kids = lk.k
  for i = 1, #kids do
    local ckey, cid = kids[i][1], kids[i][2]
    if not declared(ckey) then
      fail('DLM_KEYS', 'child resource key not passed in KEYS (H3): ' .. ckey)
    end
    local cr = load(ckey)
    local cqn, clk = nil, nil
    if cr then cqn, clk = find(cr, cid) end
    if clk then
      if pre then pre(lk, clk) end
      n = n + remove_kids(clk, pre, post) + 1
      if post then post(ckey, cr, cqn, clk) end
      remove_lock(ckey, cr, cqn, clk, false)
    end
  end
  lk.k = {}
  return n
end

-- ----------------------------------------------------------------- commit

-- K3: a command of the script refused by the caller's ACL is reported as DLM_NOPERM, and
-- never after a write (the script would stop there with its earlier writes kept): each write
-- that follows another is checked first (redis.acl_check_cmd, ~1 us; a call that writes one
-- key and publishes nothing, the common case, checks nothing).
local function allowed(cmd, ...)
  if not redis.acl_check_cmd(cmd, ...) then
    local key = ...
    fail('DLM_NOPERM', "this user's ACL refuses " .. cmd .. ' ' .. key .. ' (see `dlm acl`)')
  end
end

-- The bytes of lock `lk` (cmsgpack.pack(lk) of its fields): those it keeps when every
-- field is the one they were packed from, else packed now and kept with the fields, when
-- it has no children (a list changed in place, unlike the fields).
function enc.lock(lk)
  local K = enc.KEY
  local m = lk[K]
  local k = lk.k
  if m and m[2] == lk.gr and m[3] == lk.rq and m[4] == lk.e and m[5] == lk.tok
      and m[6] == lk.f and m[7] == lk.ct and m[8] == lk.pm and m[9] == lk.pr
      and m[10] == k and #k == 0 and m[11] == lk.id and m[12] == lk.o and m[13] == lk.t
      and m[14] == lk.p and m[15] == lk.pk then
    return m[1]
  end
  lk[K] = nil
  local b = cmsgpack.pack(lk)
  if #k == 0 then
    lk[K] = {b, lk.gr, lk.rq, lk.e, lk.tok, lk.f, lk.ct, lk.pm, lk.pr, k, lk.id, lk.o, lk.t,
             lk.p, lk.pk}
  end
  return b
end

-- msgpack's array header for n elements (as cmsgpack writes it).
function enc.array(n)
  if n < 16 then return string.char(0x90 + n) end
  if n < 65536 then return string.char(0xdc, (n - n % 256) / 256, n % 256) end
  local b = {0xdd}
  for i = 4, 2, -1 do
    b[i + 1] = n % 256
    n = (n - b[i + 1]) / 256
  end
  b[2] = n
  return string.char(b[1], b[2], b[3], b[4], b[5])
end

enc.QKEYS = {'\161g', '\161c', '\161w'}  -- the msgpack strings 'g', 'c', 'w'

-- The msgpack map of resource `r` (what cmsgpack.pack(r) decodes to: the same fields,
-- perhaps in another order): the map of its other fields, packed, with the queues
-- appended lock by lock (`enc.lock`).
function enc.resource(r)
  local g, c, w = r.g, r.c, r.w
  r.g, r.c, r.w = nil, nil, nil
  local head = cmsgpack.pack(r)
  r.g, r.c, r.w = g, c, w
  local b = string.byte(head)
  local parts, n = enc.parts, 2
  if not b or b < 0x81 or b > 0x8c then  -- (fields we never write: packed as they are)
    local K = enc.KEY
    for qi = 1, 3 do
      local q = r[QUEUES[qi]]
      for i = 1, #q do q[i][K] = nil end
    end
    return cmsgpack.pack(r)
  end
  parts[1], parts[2] = string.char(b + 3), string.sub(head, 2)  -- (3 more fields)
  for qi = 1, 3 do
    local q = r[QUEUES[qi]]
    local len = #q
    parts[n + 1], parts[n + 2] = enc.QKEYS[qi], enc.array(len)
    n = n + 2
    for i = 1, len do
      n = n + 1
      parts[n] = enc.lock(q[i])
    end
  end
  return table.concat(parts, '', 1, n)
end

local function commit()
  if one_key then
    local key, a = one_key, one_rec
    one_key, one_rec = nil, nil
    if not (epoch_dirty or EP_SYNC) and #dirty_order == 0 and #windex_ops == 0
        and #events == 0 then  -- the one write: no ACL check needed before it (K3)
      local blob = cmsgpack.pack(a)
      if #a <= TOMB_LEN + 1 then  -- (a tombstone: a lone record has LONE_LEN fields)
        redis.call('SET', key, blob, 'PX', TOMBSTONE_PX)  -- G9, as below
      else
        redis.call('SET', key, blob)
      end
      written = {[key] = {blob, a, false}}
      run_checked = true  -- (E2, as below)
      return
    end
    lone_put(key, a)
  end
  local before = epoch_dirty or EP_SYNC
  for di = 1, #dirty_order do
    local key = dirty_order[di]
    if cache[key] or (lone and lone[key]) then
      if before then allowed('SET', key, 'x') end
      before = true
    end
  end
  if before then
    local za, zr = false, false
    for i = 1, #windex_ops do
      if windex_ops[i][1] == 'add' then za = true else zr = true end
    end
    if za then allowed('ZADD', KEYS[2], '0', 'x') end
    if zr then allowed('ZREM', KEYS[2], 'x') end
    for i = 1, #events do allowed(h2c.pub, CHANNEL .. events[i][1], 'x') end
  end
  if epoch_dirty then
    local safe, rejoin = fmt(SAFE), fmt(REJOIN)
    redis.call('HSET', KEYS[1], 'id', EPOCH, 'safe', safe, 'rejoin', rejoin,
               'all', epoch_join(EPOCH, safe, rejoin, EP_FIX, EP_OFF))
  elseif EP_SYNC then  -- (the fields as they are, joined)
    redis.call('HSET', KEYS[1], 'all', EP_SYNC)
  end
  local now_written = {}
  for di = 1, #dirty_order do
    local key = dirty_order[di]
    local r = cache[key]
    local a = (lone and lone[key]) or (r and compact(r))
    if a then
      local blob = cmsgpack.pack(a)
      if #a <= TOMB_LEN + 1 then
        -- G9: the resource is gone; its fencing sequence outlives it as a tombstone, and
        -- the version of its value block (G16), not the value itself
        redis.call('SET', key, blob, 'PX', TOMBSTONE_PX)
        now_written[key] = {blob, a, false}
      else
        redis.call('SET', key, blob)  -- (no TTL while it has a lock: see below)
        now_written[key] = {blob, a, r or false}
      end
    elseif r and #r.g == 0 and #r.c == 0 and #r.w == 0 then  -- (FAST = false: as a map)
      local t = {n = r.n, s = r.s, vv = r.vv, vi = 0}
      local blob = cmsgpack.pack(t)
      redis.call('SET', key, blob, 'PX', TOMBSTONE_PX)
      now_written[key] = {blob, false, t}
    elseif r then
      -- No TTL while the resource has locks, expired ones included (the next call that
      -- loads it purges them, G10; `dlm sweep` those nobody touches again): a key with a
      -- TTL is what a volatile-* maxmemory-policy may evict, and an evicted lock is a lock
      -- granted twice while the epoch, which has no TTL, says nothing was lost
      -- (docs/operations.md, "Memory"). Tombstones keep theirs.
      local blob = enc.resource(r)
      redis.call('SET', key, blob)
      now_written[key] = {blob, false, r}
    end
  end
  written = now_written
  for i = 1, #windex_ops do
    local op = windex_ops[i]
    if op[1] == 'add' then
      redis.call('ZADD', KEYS[2], op[3], op[2])
    else
      redis.call('ZREM', KEYS[2], op[2])
    end
  end
  for i = 1, #events do
    local ev = events[i]
    redis.call(h2c.pub, CHANNEL .. ev[1], ev[2])
  end
  run_checked = true  -- E2: this process's epoch is committed (see epoch_load)
end

-- Run `main` with errors turned into typed error replies; commit only on success.
-- K1, hostile input: every key must be ours and of ONE namespace (KEYS[2] names it), and the
-- channel prefix that namespace's, so no call touches another namespace, publishes outside
-- it, or uses the epoch hash or the waiter index as a resource (a WRONGTYPE error in the
-- middle of `commit` would leave a partial write). H2c: a server accepts only its own layout;
-- on a cluster member the epoch hash, the waiter index and the channel prefix must carry the
-- same slot tag (Redis refuses declared keys of two slots, CROSSSLOT, and a script's SPUBLISH
-- on a channel of another slot, which would come after the writes: the equal tags rule it
-- out before anything is written).
local function check_keys()
  local e, w = KEYS[1], KEYS[2]
  if e ~= h2c.e or w ~= valid_w then
    local ns, tag, wtag
    if h2c.on() then
      tag = type(e) == 'string' and #e <= 24 and string.match(e, '^dlm:epoch:{(%d+)}$')
      if not tag then fail('DLM_KEYS', 'KEYS[1] must be ' .. h2c.epoch_form()) end
      if type(w) == 'string' and #w <= 100 then
        ns, wtag = string.match(w, '^dlm:([%w_%.%-]+):waiters:{(%d+)}$')
      end
      if not ns or #ns > 64 or wtag ~= tag then
        fail('DLM_KEYS', 'KEYS[2] must be the waiter index dlm:<namespace>:waiters:{' .. tag
          .. '} of the slot of KEYS[1] (a Redis Cluster member)')
      end
      valid_ch, h2c.pub = 'dlm:' .. ns .. ':ch:{' .. tag .. '}:', 'SPUBLISH'
    else
      if e ~= 'dlm:epoch' then fail('DLM_KEYS', 'KEYS[1] must be dlm:epoch') end
      ns = w and #w <= 76 and string.match(w, '^dlm:([%w_%.%-]+):waiters$')
      if not ns then
        fail('DLM_KEYS', 'KEYS[2] must be the waiter index dlm:<namespace>:waiters')
      end
      valid_ch, h2c.pub = 'dlm:' .. ns .. ':ch:', 'PUBLISH'
    end
    h2c.e, valid_w, valid_ns, valid_prefix = e, w, ns, 'dlm:{' .. ns .. ':'
  end
  local prefix = valid_prefix
  local n = #prefix
  local k3 = KEYS[3]
  for i = 3, #KEYS do
    local k = KEYS[i]
    -- (a plain find at 1 rather than string.sub: no substring is created; a key equal to
    -- KEYS[3], as KEYS[4] often is, was checked as KEYS[3])
    if (i == 3 or k ~= k3)
        and (#k <= n or #k > MAX_KEY or string.find(k, prefix, 1, true) ~= 1) then
      fail('DLM_KEYS', 'KEYS[' .. i .. '] is not a resource key of namespace ' .. valid_ns)
    end
  end
  if ARGV[2] ~= valid_ch then
    fail('DLM_BADARG', 'the channel prefix must be ' .. valid_ch)
  end
end

local function prologue_and(main)
  REJOIN = arg_int(ARGV[1], 'rejoin_ms', 0, MAX_LEASE_MS)
  check_keys()
  CHANNEL = ARGV[2]
  epoch_load()
  return main()
end

-- The error reply of a failed call: our own DLM_ code, else DLM_NOPERM for an ACL refusal
-- of one of the script's commands (K3), else DLM_INTERNAL.
local function failure(res)
  if type(res) == 'table' and res.err then res = res.err end
  res = tostring(res)
  if string.sub(res, 1, 4) == 'DLM_' then return res end
  if string.find(res, "can't run this command", 1, true) or string.find(res, 'NOPERM', 1, true)
      or string.find(res, 'no permissions', 1, true) then
    return "DLM_NOPERM this user's ACL refuses a command of the scripts (see `dlm acl`): " .. res
  end
  return 'DLM_INTERNAL ' .. res
end

local function run(main)
  local ok, res = pcall(prologue_and, main)
  if ok then
    local cok, err = pcall(commit)  -- only its first write can fail (K3): nothing written
    if cok then return res end
    res = err
  end
  return redis.error_reply(failure(res))
end

-- The entry of every script: `script` is the body of lua/<name>.lua. KEYS and ARGV are
-- locals of the library (or of the EVAL chunk) set here, and every per-call variable is
-- reset, because a Functions library keeps its upvalues from one call to the next.
local function call(script, keys, args)
  if not pcall then
    redis, cmsgpack, string, table, math, type, tonumber, tostring, pcall, error, ipairs =
      the_globals()
  end
  KEYS, ARGV = keys, args
  REJOIN, CHANNEL, NOW, NOW_US, EPOCH, SAFE = nil, nil, nil, nil, nil, nil
  EP_FIX, EP_OFF, EP_SYNC = nil, nil, false
  epoch_dirty = false
  cache, dirty, dirty_order = {}, {}, {}
  lone = false  -- (a table once `lone_put` writes one)
  pre_key, pre_blob, pre_rec = nil, nil, nil
  one_key, one_rec = nil, nil
  if not events or #events > 0 then events = {} end  -- (an empty one is reused)
  if not windex_ops or #windex_ops > 0 then windex_ops = {} end
  return script()
end
