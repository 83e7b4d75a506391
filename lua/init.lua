-- init.lua: instance epoch administration (rule E1).
--
-- KEYS[1] epoch hash (`dlm:epoch`; on a Redis Cluster member, one slot's: H2c)
-- ARGV[1] 'status'  -> {epoch id or nil, now ms, recovering ms, rejoin ms or nil}
--         'fresh' [ARGV[2] rejoin ms or ''] [ARGV[3] 'force'] -> create the epoch already
--                      safe, for an instance known to be new (development clusters, tests),
--                      with that rejoin wait (E1; absent or '': none stored). Never run it on
--                      an instance that may have restarted empty while locks were held: that
--                      is what E1 guards. An epoch created by `fresh` is kept (idempotent). An
--                      instance whose epoch was created by use (a lock script after an empty
--                      start: it is recovering, or was) is refused with DLM_NOTFRESH unless
--                      ARGV[3] is 'force', which marks it safe at once, keeping its epoch id.
--         'rejoin' ARGV[2] -> raise the instance's rejoin wait (E1) to ARGV[2] ms; never
--                      lowers it (a lower one could let a restarted instance grant while a
--                      lease granted under the higher one still runs). Stored even before
--                      the instance has an epoch: the epoch is then created with it.
--         'hello'   -> status, then the server's run_id and maxmemory_policy (INFO server,
--                      INFO memory): what a client reads at first contact (one server
--                      reached by two URLs; an eviction policy that could drop locks).
--         'clock' ARGV[2] ARGV[3] -> test clock: ARGV[2] frozen ms ('' to unfreeze),
--                      ARGV[3] offset ms added to TIME. For tests only.
-- Reply as for 'status'.

local function status()
  local e = redis.call('HMGET', KEYS[1], 'id', 'safe', 'tfix', 'toff', 'rejoin')
  local now = clock(e[3], e[4])  -- (core.lua)
  local rec = 0
  if e[2] and tonumber(e[2]) > now then rec = tonumber(e[2]) - now end
  return {e[1] or false, now, rec, e[5] or false}
end

local MAX_REJOIN = MAX_LEASE_MS  -- (core.lua: the longest lease a script accepts)
local function rejoin_arg(s)
  if not s or not string.match(s, '^%d+$') or #s > 9 or tonumber(s) > MAX_REJOIN then
    return nil
  end
  return tonumber(s)
end

-- E1: raise the stored rejoin wait to `rejoin` (never lower it); an epoch still
-- recovering under a stored wait then waits the longer one (`fresh` epochs are safe: 0).
local function raise_rejoin(rejoin)
  local e = redis.call('HMGET', KEYS[1], 'rejoin', 'safe')
  local old = tonumber(e[1] or '0') or 0
  if rejoin <= old then return end
  redis.call('HSET', KEYS[1], 'rejoin', rejoin)
  if e[1] and e[2] and tonumber(e[2]) > 0 and status()[3] > 0 then
    redis.call('HSET', KEYS[1], 'safe', string.format('%.0f', tonumber(e[2]) - old + rejoin))
  end
end

if not h2c.epoch_ok(KEYS[1]) or #KEYS ~= 1 then  -- K1: our epoch hash only (core.lua, H2c)
  return redis.error_reply('DLM_KEYS init takes one key, ' .. h2c.epoch_form())
end
local cmd = ARGV[1]
if cmd == 'status' then
  return status()
elseif cmd == 'fresh' then
  local rejoin = nil
  if ARGV[2] and ARGV[2] ~= '' then
    rejoin = rejoin_arg(ARGV[2])
    if not rejoin then return redis.error_reply('DLM_BADARG rejoin must be 0..' .. MAX_REJOIN) end
  end
  local e = redis.call('HMGET', KEYS[1], 'id', 'safe')
  if e[1] and tonumber(e[2]) ~= 0 then  -- created by use, not by `fresh` (E1)
    if ARGV[3] ~= 'force' then
      local rec = status()[3]
      local why = 'not brand-new: its epoch ' .. e[1] .. ' was created by its first use after '
        .. 'an empty start'
      if rec > 0 then
        why = 'recovering for ' .. rec .. ' ms more (epoch ' .. e[1] .. '): it started empty '
          .. 'and may have forgotten leases it granted before, so marking it fresh would let '
          .. 'it grant at once a lock still held elsewhere'
      end
      return redis.error_reply('DLM_NOTFRESH ' .. why .. ' (E1); force it only if it never '
        .. 'held a lock before its restart')
    end
    redis.call('HSET', KEYS[1], 'safe', '0')
  elseif not e[1] then
    redis.call('HSET', KEYS[1], 'id', new_epoch_id(), 'safe', '0')
  end
  if rejoin then raise_rejoin(rejoin) end
  epoch_sync()  -- (core.lua: the joined field follows)
  return status()
elseif cmd == 'rejoin' then
  local rejoin = rejoin_arg(ARGV[2])
  if not rejoin then return redis.error_reply('DLM_BADARG rejoin must be 0..' .. MAX_REJOIN) end
  raise_rejoin(rejoin)
  epoch_sync()
  return status()
elseif cmd == 'hello' then
  local st = status()
  st[5] = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or false
  st[6] = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w%-]+)') or false
  return st
elseif cmd == 'clock' then
  local fix, off = ARGV[2] or '', ARGV[3] or '0'
  if (fix ~= '' and not string.match(fix, '^%d+$')) or not string.match(off, '^%-?%d+$')
      or #fix > 16 or #off > 16 then  -- (more digits lose precision as Lua numbers)
    return redis.error_reply('DLM_BADARG clock needs up to 16 digits')
  end
  if fix == '' then redis.call('HDEL', KEYS[1], 'tfix') else redis.call('HSET', KEYS[1], 'tfix', fix) end
  redis.call('HSET', KEYS[1], 'toff', off)
  epoch_sync()
  return status()
end
return redis.error_reply('DLM_BADARG init needs status, hello, fresh, rejoin or clock')
