-- The reference for benches/script_cpu.sh: the Redis calls that script.lua's
-- acquire ("a") makes for throttles, DAY quotas and a concurrency cap, with
-- the same keys, the same order and the same values written, and the same
-- reply, written by hand with no argument checks, no span conversion and no
-- WEEK or MONTH windows. It is what a decision costs Redis when nothing but
-- the work is done; the driver compares script.lua against it.
--
-- KEYS and ARGV as script.lua's mode "a" (see its header).

local fmt, fmod, floor, tonumber = string.format, math.fmod, math.floor, tonumber
local call = redis.call

local now_s, now_ns
if ARGV[2] == '' then
  local t = call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
  if ARGV[3] ~= '' and now_s * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
    return redis.error_reply('tollgate: expired')
  end
else
  now_s, now_ns = tonumber(ARGV[2]), tonumber(ARGV[3])
end

local cost = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local reply = { now_s, now_ns, 1 }
local allowed = true

-- Throttles: GET, then the TAT ahead of now to store if allowed.
local charge = {}
for i = 1, n do
  local j = 6 * i
  local interval, burst, c = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 5])
  local tol = interval * burst
  local before = 0
  local v = call('GET', KEYS[i])
  if v then
    local s, ns = string.match(v, '^(%d+) (%d+)')
    before = (tonumber(s) - now_s) * 1000000000 + (tonumber(ns) - now_ns)
    if before < 0 then
      before = 0
    end
  end
  reply[3 + i] = before
  if c <= burst and before + c * interval <= tol then
    charge[i] = c > 0 and before + c * interval
  elseif ARGV[j + 2] == '0' then
    allowed = false
  end
end

-- DAY quotas: HMGET of the window and count.
local qi = 6 + 6 * n
local m = tonumber(ARGV[qi])
local today = floor(now_s / 86400)
local quotas = {}
for i = 1, m do
  local j = qi + 1 + 9 * (i - 1)
  local limit, offset, created = tonumber(ARGV[j]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local c = tonumber(ARGV[j + 7])
  local key = KEYS[n + 2 * i - 1]
  local v = call('HMGET', key, 'w', 'n')
  local w, used = today, 0
  if v[1] and today <= tonumber(v[1]) then
    w, used = tonumber(v[1]), tonumber(v[2])
  end
  local limit_in = limit
  if w * 86400 <= created and created < (w + 1) * 86400 then
    limit_in = limit - offset
  end
  local k = #reply
  reply[k + 1], reply[k + 2], reply[k + 3], reply[k + 4] = w, w + 1, limit_in, used
  if (used + c > limit_in or c > limit) and ARGV[j + 5] == '0' then
    allowed = false
  end
  quotas[i] = { key, KEYS[n + 2 * i], w, used, c, limit_in, tonumber(ARGV[j + 6]), ARGV[j + 7] }
end

-- A concurrency cap: drop lapsed leases, count the rest.
local ci = qi + 1 + 9 * m
local cap_key, now_ms
if ARGV[ci] == '1' then
  cap_key = KEYS[#KEYS]
  now_ms = now_s * 1000 + floor(now_ns / 1000000)
  call('ZREMRANGEBYSCORE', cap_key, '-inf', fmt('%d', now_ms))
  local in_flight = call('ZCARD', cap_key)
  reply[#reply + 1] = in_flight
  if in_flight >= tonumber(ARGV[ci + 1]) and ARGV[ci + 4] == '0' then
    allowed = false
  end
end

if not allowed then
  reply[3] = 0
  return reply
end
if cap_key and cost > 0 then
  local lease = tonumber(ARGV[ci + 2])
  call('ZADD', cap_key, fmt('%d', now_ms + lease), ARGV[ci + 3])
  call('PEXPIRE', cap_key, ARGV[ci + 2])
end
for i = 1, n do
  local ahead = charge[i]
  if ahead then
    local r = fmod(ahead, 1000000000)
    local s, ns = now_s + (ahead - r) / 1000000000, now_ns + r
    if ns >= 1000000000 then
      s, ns = s + 1, ns - 1000000000
    end
    local tol = tonumber(ARGV[6 * i]) * tonumber(ARGV[6 * i + 1])
    local ms = (ahead - fmod(ahead, 1000000)) / 1000000 + (fmod(ahead, 1000000) > 0 and 1 or 0)
    call('SET', KEYS[i], fmt('%d %d %d', s, ns, tol), 'PX', fmt('%d', ms))
  end
end
for i = 1, m do
  local q = quotas[i]
  local key, hist, w, used, c, limit_in, days = q[1], q[2], q[3], q[4], q[5], q[6], q[7]
  used = math.min(used + c, 9007199254740992)
  call('HSET', key, 'w', fmt('%d', w), 'n', fmt('%d', used))
  local ms = (w + 2 - today) * 86400000 - fmod(now_s, 86400) * 1000 - floor(now_ns / 1000000)
  call('PEXPIRE', key, fmt('%d', math.max(ms, 1)))
  local d = fmt('%d', today)
  if c > 0 then
    call('HINCRBY', hist, 'u:' .. d, q[8])
  else
    call('HSETNX', hist, 'u:' .. d, '0')
  end
  if call('HSET', hist, 'r:' .. d, fmt('%d', limit_in - used)) == 1 then
    local cut = today - days
    for _, f in ipairs(call('HKEYS', hist)) do
      local day = tonumber(string.match(f, '^[ur]:(%-?%d+)$'))
      if day and day <= cut then
        call('HDEL', hist, f)
      end
    end
  end
  call('PEXPIRE', hist, fmt('%d', days * 86400000))
end
return reply
