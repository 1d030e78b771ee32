-- tollgate: decides a rate-limit request atomically (Redis 7, Lua 5.1).
--
-- The same integer arithmetic as gcra.rs (GCRA throttles), quota.rs (calendar
-- quotas and their daily history) and window.rs (UTC windows). Lua numbers are
-- doubles, so every integer is kept within 2^53: times are split into whole
-- seconds and nanoseconds, and only differences from now are taken in
-- nanoseconds, which caps a throttle's span (interval * burst) below 2^53 ns
-- (about 104 days).
--
-- Time (ARGV[2], ARGV[3]): now in seconds and nanoseconds (0..999999999), or
-- "" and "" for the server's TIME, or "" and a deadline in microseconds of the
-- server's TIME past which the call decides nothing (error "expired").
--
-- Throttle key: the string "<tat_s> <tat_ns> <tol>", tol the span
-- (interval * burst, ns) the TAT was written under; missing = a full bucket.
-- It expires when the bucket is full again. A key read under another span is
-- converted as Gcra::rescale does, as of the instant the span changed (the
-- throttle's "since"; now when it is 0 0), so that a key converted when next
-- used ends where one converted at the change would; the conversion is stored
-- at once, whatever the verdict (left unstored, the old TAT would keep
-- draining at the old scale and refill the bucket early).
--
-- Quota key: hash {w = window start (days since 1970-01-01), n = used in it},
-- expiring a day after the window ends. History key: hash {u:<day> = used that
-- UTC day, r:<day> = what remained in the window after the day's last change},
-- expiring history_days after its last write; days that fall out of the
-- history are deleted when a new day is first written.
--
-- Modes (ARGV[1]):
--
-- "a" acquire. KEYS: t_1..t_n, then q_i, h_i for each quota.
--   ARGV: "a", now_s, now_ns, cost, n, n times (interval_ns, burst, shadow,
--   since_s, since_ns, cost_i),
--   then m (0..3) quotas, m times (limit, period (D|W|M), week_start
--   (0 = Monday .. 6), offset, created_s, shadow, history_days, cost_i,
--   tokens), tokens = 1 for a token budget. A cost above a quota's whole
--   limit never fits, in any window.
--   Each limit is charged its own cost_i (requests or tokens); ARGV[4], the
--   request's cost in requests, decides whether a concurrency place is taken.
--   All or nothing: when a limit that is not a shadow denies, nothing is
--   charged; otherwise every throttle that allows is charged (a shadow
--   throttle that would deny is not) and the quota is (a shadow quota past
--   its limit too).
--   Then "0", or "1", cap, lease_ms, member, shadow for a concurrency cap:
--   KEYS ends with c, a sorted set of the leases of requests in flight
--   (member, expiry in ms); a request let in adds its lease, which its
--   caller removes (ZREM) when the response ends, and which lapses after
--   lease_ms if the caller never does.
--   Reply: now_s, now_ns, allowed (1|0), before_1..before_n (ns the TAT was
--   ahead of now, after conversion), then per quota: window start day,
--   window end day, the window's limit, the count before this request; then
--   with a cap: the requests in flight before this one.
--
-- "p" peek: as "a", with the same reply, but nothing is charged (a
--   conversion is still stored). It tells which limits would deny.
--
-- "b" acquire and borrow: as "a" without a concurrency cap, with two more
--   ARGV after the "0" of the cap: want, lend. When the request is allowed,
--   g more units of it are charged with it, to every limit: as many as fit
--   of `want` (requests waiting for them now), plus at most `lend` more and
--   at most a quarter of what would still fit after those (a share to
--   decide from locally: none near a limit). A shadow limit that would deny
--   the first unit fits none. The reply is a's, then g.
--
-- "r" refund (Gcra::refund). KEYS: t_1..t_n. ARGV: "r", now_s, now_ns, cost,
--   n, n times (interval_ns, burst, mine_s, mine_ns, cost_i), mine the TAT
--   this request stored. A key whose span changed since is left alone.
--   Reply: now_s, now_ns.
--
-- "t" settle a request's actual tokens. KEYS: t_1..t_n (0 or 1), then q_i,
--   h_i for each quota. ARGV: "t", now_s, now_ns, delta (tokens, negative
--   for a refund), n, n times (interval_ns, burst), m, m times (limit,
--   period, week_start, offset, created_s, history_days), then optionally
--   the day (days since 1970-01-01) the tokens were charged. A throttle's
--   TAT moves by delta * interval (a refund never below now; a charge may
--   put the bucket in debt, past its span); a quota's count by delta (never
--   below 0), except that a refund is not given to a window that began
--   after the day the tokens were charged (it never counted them); in the
--   history a refund comes off that day's use while the history holds it
--   (and adds to what remained at that day's end).
--   Reply: now_s, now_ns.
--
-- "s" set what remains of the quota (UpdateUsage). KEYS: q, h. ARGV: "s",
--   now_s, now_ns, remaining, limit, period, week_start, offset, created_s,
--   history_days. Reply: now_s, now_ns, window start day, window end day, the
--   window's limit, the new count.

local E9 = 1000000000
local MAX = 9007199254740992 -- 2^53, the last of the exact integers
local DAY_S = 86400
local DAY_MS = 86400000

-- Bad input raises this; the caller gets an error reply.
local function bad(msg)
  error({ tollgate = msg })
end

-- Integers as Redis expects them (tostring would write 1e+15).
local function str(x)
  return string.format('%.0f', x)
end

-- An integer argument in [lo, hi], written as Rust writes it: the check that
-- it prints back the same rejects what a double cannot hold exactly.
local function int(v, lo, hi, what)
  local x = type(v) == 'string' and string.match(v, '^%-?%d+$') and tonumber(v)
  if not x or x < lo or x > hi or str(x) ~= v or v == '-0' then
    bad('bad ' .. what)
  end
  return x
end

local function flag(v, what)
  if v ~= '0' and v ~= '1' then
    bad('bad ' .. what)
  end
  return v == '1'
end

-- floor(x / d) for integers x >= 0, d > 0: exact where x / d may round up.
local function div(x, d)
  return (x - math.fmod(x, d)) / d
end

local now_s, now_ns
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
end

local function read_now()
  if not now_s then
    now_s = int(ARGV[2], 0, 2 ^ 40, 'now')
    now_ns = int(ARGV[3], 0, E9 - 1, 'now')
  elseif ARGV[3] ~= '' then
    -- A deadline in microseconds of the server's TIME: a call that runs after
    -- it (the server stalled with the call queued) was given up by its
    -- caller, who answered the request without it, so it decides nothing.
    local deadline = int(ARGV[3], 0, MAX - 1, 'deadline')
    if now_s * 1000000 + div(now_ns, 1000) > deadline then
      bad('expired')
    end
  end
end

-- tat - now in ns. (s - now_s) * 1e9 is exact (a multiple of 2^9 far below
-- 2^62); the sum is exact below 2^53, and above it only compares as larger.
local function ahead_of(s, ns)
  return (s - now_s) * E9 + (ns - now_ns)
end

-- floor(a * b / c) exactly, for integers 0 <= a <= c, b >= 0, 0 < c, all below
-- 2^53 while a * b need not be. With b = q * c + r it is a * q (exact: at
-- most b) plus floor(a * r / c), built over the bits of a from the top as
-- k * c + rem with 0 <= rem < c, so that no sum leaves the exact range.
local function muldiv(a, b, c)
  local r = math.fmod(b, c)
  local q = a * ((b - r) / c)
  local p, x, k, rem = 1, a, 0, 0
  while p * 2 <= a do
    p = p * 2
  end
  while p >= 1 do
    k = k * 2 -- (k * c + rem) * 2
    if rem >= c - rem then
      rem, k = rem - (c - rem), k + 1
    else
      rem = rem * 2
    end
    if x >= p then -- + r
      x = x - p
      if rem >= c - r then
        rem, k = rem - (c - r), k + 1
      else
        rem = rem + r
      end
    end
    p = p / 2
  end
  return q + k
end

-- A throttle key's TAT ahead of now (may be <= 0) and span, or nil if missing.
local function load(key)
  local v = redis.call('GET', key)
  if not v then
    return nil
  end
  local s, ns, tol = string.match(v, '^(%d+) (%d+) (%d+)$')
  s, ns, tol = tonumber(s), tonumber(ns), tonumber(tol)
  if not s or s >= MAX or ns >= E9 or tol < 1 or tol >= MAX then
    bad('bad throttle state')
  end
  return ahead_of(s, ns), tol, s, ns
end

-- Stores the TAT now + ahead under span tol, expiring when the bucket is full
-- again (ceil to ms, at least 1); a TAT at or before now is no key at all.
local function store(key, ahead, tol)
  if ahead <= 0 then
    redis.call('DEL', key)
    return
  end
  local r = math.fmod(ahead, E9)
  local s, ns = now_s + (ahead - r) / E9, now_ns + r
  if ns >= E9 then
    s, ns = s + 1, ns - E9
  end
  local ms = div(ahead, 1e6) + (math.fmod(ahead, 1e6) > 0 and 1 or 0)
  redis.call('SET', key, str(s) .. ' ' .. str(ns) .. ' ' .. str(tol), 'PX', str(ms))
end

-- Proleptic Gregorian dates (Howard Hinnant's algorithms, as window.rs).
local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m
end

-- The window [start, end) in days holding day `day`.
local function window(q, day)
  if q.period == 'D' then
    return day, day + 1
  elseif q.period == 'W' then
    -- Day 0 is a Thursday: (day + 3) % 7 counts from Monday.
    local back = ((day + 3) % 7 - q.week_start) % 7
    return day - back, day - back + 7
  end
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if m == 12 then
    ny, nm = y + 1, 1
  end
  return days_from_civil(y, m, 1), days_from_civil(ny, nm, 1)
end

-- The quota parameters at ARGV[i..i+4]: limit, period, week_start, offset,
-- created_s.
local function quota_spec(i)
  local q = {
    limit = int(ARGV[i], 0, MAX, 'limit'),
    period = ARGV[i + 1],
    week_start = int(ARGV[i + 2], 0, 6, 'week start'),
    offset = int(ARGV[i + 3], 0, MAX, 'offset'),
    created = int(ARGV[i + 4], 1 - MAX, MAX - 1, 'creation time'),
  }
  if q.period ~= 'D' and q.period ~= 'W' and q.period ~= 'M' then
    bad('bad period')
  end
  return q
end

-- State::roll: the window of now if it is later than the stored one, with a
-- count of 0; else (the same window, or the clock went back) the stored
-- window and count. Also sets the window's limit (QuotaSpec::limit_in).
local function roll(q, key)
  q.today = div(now_s, DAY_S)
  q.w, q.n = nil, 0
  local v = redis.call('HMGET', key, 'w', 'n')
  if v[1] then
    q.w = tonumber(string.match(v[1], '^%-?%d+$'))
    q.n = tonumber(string.match(v[2] or '0', '^%-?%d+$'))
    if not q.w or not q.n or math.abs(q.w) > 2 ^ 40 or math.abs(q.n) > MAX then
      bad('bad quota state')
    end
  end
  q.start, q.stop = window(q, q.today)
  if q.w and q.start <= q.w then
    q.start, q.stop = window(q, q.w)
  else
    q.w, q.n = q.start, 0
  end
  if q.start * DAY_S <= q.created and q.created < q.stop * DAY_S then
    q.limit_in = q.limit - q.offset
  else
    q.limit_in = q.limit
  end
end

-- Writes the count, and in the history today's use (+ used) and what remains.
local function save(q, key, hist, used, remaining)
  redis.call('HSET', key, 'w', str(q.w), 'n', str(q.n))
  -- A day after the window ends, counted from the decision's now.
  local ms = (q.stop + 1 - q.today) * DAY_MS - math.fmod(now_s, DAY_S) * 1000
    - div(now_ns, 1e6)
  redis.call('PEXPIRE', key, str(math.max(ms, 1)))
  local u = 'u:' .. str(q.today)
  if redis.call('HSETNX', hist, u, '0') == 1 then
    -- A new day: drop the days that fell out of the history (once a day).
    local cut = q.today - q.history_days
    for _, f in ipairs(redis.call('HKEYS', hist)) do
      local d = tonumber(string.match(f, '^[ur]:(%-?%d+)$'))
      if d and d <= cut then
        redis.call('HDEL', hist, f)
      end
    end
  end
  if used > 0 then
    redis.call('HINCRBY', hist, u, str(used))
  end
  redis.call('HSET', hist, 'r:' .. str(q.today), str(remaining))
  redis.call('PEXPIRE', hist, str(q.history_days * DAY_MS))
end

local function acquire(peek, grant)
  local cost = int(ARGV[4], 0, MAX - 1, 'cost')
  local n = int(ARGV[5], 0, #KEYS, 'throttle count')
  local qi = 6 + 6 * n
  if #ARGV < qi then
    bad('wrong number of arguments')
  end
  local m = int(ARGV[qi], 0, 3, 'quota count')
  local ci = qi + 1 + 9 * m
  if #ARGV < ci then
    bad('wrong number of arguments')
  end
  local has_cap = flag(ARGV[ci], 'concurrency flag')
  local nkeys = n + 2 * m + (has_cap and 1 or 0)
  local extra = (has_cap and 4 or 0) + (grant and 2 or 0)
  if #ARGV ~= ci + extra or #KEYS ~= nkeys or (grant and has_cap) then
    bad('wrong number of arguments')
  end
  local want, lend = 0, 0
  if grant then
    want = int(ARGV[ci + 1], 0, MAX - 1, 'want')
    lend = int(ARGV[ci + 2], 0, MAX - 1, 'lend')
  end
  read_now()
  local reply = { now_s, now_ns, 1 }
  local allowed = true
  local charge, convert = {}, {} -- per throttle: the TAT ahead to store, or false
  local tols, steps = {}, {} -- per throttle: span, and ns one unit of the request takes
  for i = 1, n do
    local j = 6 * i
    local interval = int(ARGV[j], 1, MAX - 1, 'interval')
    local burst = int(ARGV[j + 1], 1, MAX - 1, 'burst')
    local shadow = flag(ARGV[j + 2], 'shadow flag')
    local since_s = int(ARGV[j + 3], 0, 2 ^ 40, 'since')
    local since_ns = int(ARGV[j + 4], 0, E9 - 1, 'since')
    local cost = int(ARGV[j + 5], 0, MAX - 1, 'cost')
    local tol = interval * burst -- exact if below 2^53, else at least 2^53
    if tol >= MAX then
      bad('throttle span of 2^53 ns or more')
    end
    local before, old, tat_s, tat_ns = load(KEYS[i])
    charge[i], convert[i], tols[i] = false, false, tol
    if before and old ~= tol then
      -- Gcra::rescale at the change: the TAT ahead of `since` (at most the
      -- old span: the key was written before the change), scaled exactly
      -- (ahead == old gives exactly tol), less the time since the change.
      -- A huge `elapsed` is inexact but then the result is <= 0 either way.
      local elapsed = 0
      if since_s > 0 or since_ns > 0 then
        elapsed = math.max(-ahead_of(since_s, since_ns), 0)
      end
      local at_change = before + elapsed
      if elapsed > 0 then
        at_change = (tat_s - since_s) * E9 + (tat_ns - since_ns)
        if at_change > old then
          -- Written after the change, by an instance still on the old
          -- numbers: convert as of now.
          elapsed, at_change = 0, before
        end
      end
      if at_change > 0 then
        before = muldiv(math.min(at_change, old), tol, old) - elapsed
        convert[i] = before
      end
    end
    before = math.max(before or 0, 0)
    reply[3 + i] = before
    -- cost <= burst, so cost * interval <= tol < 2^53: exact.
    steps[i] = cost * interval
    if cost <= burst and before + cost * interval <= tol then
      charge[i] = cost > 0 and before + cost * interval
    elseif not shadow then
      allowed = false
    end
  end
  local quotas = {}
  for i = 1, m do
    local j = qi + 1 + 9 * (i - 1)
    local q = quota_spec(j)
    local shadow = flag(ARGV[j + 5], 'quota shadow flag')
    q.history_days = int(ARGV[j + 6], 1, 100000, 'history days')
    q.cost = int(ARGV[j + 7], 0, MAX - 1, 'cost')
    flag(ARGV[j + 8], 'quota tokens flag')
    q.key, q.hist = KEYS[n + 2 * i - 1], KEYS[n + 2 * i]
    roll(q, q.key)
    local k = #reply
    reply[k + 1], reply[k + 2], reply[k + 3], reply[k + 4] = q.start, q.stop, q.limit_in, q.n
    if (q.n + q.cost > q.limit_in or q.cost > q.limit) and not shadow then
      allowed = false
    end
    quotas[i] = q
  end
  local cap, lease_ms, member, now_ms
  if has_cap then
    cap = int(ARGV[ci + 1], 1, MAX - 1, 'concurrency cap')
    lease_ms = int(ARGV[ci + 2], 1, MAX - 1, 'lease')
    member = ARGV[ci + 3]
    local shadow = flag(ARGV[ci + 4], 'concurrency shadow flag')
    -- Leases of requests in flight; one past its time was held by an
    -- instance that died or lost track of it.
    now_ms = now_s * 1000 + div(now_ns, 1000000)
    redis.call('ZREMRANGEBYSCORE', KEYS[nkeys], '-inf', str(now_ms))
    local in_flight = redis.call('ZCARD', KEYS[nkeys])
    reply[#reply + 1] = in_flight
    if in_flight >= cap and not shadow then
      allowed = false
    end
  end
  -- Conversions are stored whatever the verdict; charges only when allowed
  -- (and never by a peek).
  local charging = allowed and not peek
  local g = 0
  if charging and (want > 0 or lend > 0) then
    -- How many more units fit in every limit after this one.
    local fit = MAX
    for i = 1, n do
      if steps[i] > 0 then
        fit = charge[i] and math.min(fit, div(tols[i] - charge[i], steps[i])) or 0
      end
    end
    for _, q in ipairs(quotas) do
      if q.cost > 0 then
        fit = math.min(fit, math.max(div(math.max(q.limit_in - q.n - q.cost, 0), q.cost), 0))
      end
    end
    g = math.min(want, fit)
    g = g + math.min(lend, div(fit - g, 4))
    if g > 0 then
      for i = 1, n do
        if charge[i] then
          charge[i] = charge[i] + g * steps[i]
        end
      end
      for _, q in ipairs(quotas) do
        q.cost = q.cost * (1 + g)
      end
    end
  end
  if charging and has_cap and cost > 0 then
    redis.call('ZADD', KEYS[nkeys], str(now_ms + lease_ms), member)
    redis.call('PEXPIRE', KEYS[nkeys], str(lease_ms))
  end
  for i = 1, n do
    local ahead = charging and charge[i] or convert[i]
    if ahead then
      store(KEYS[i], ahead, tols[i])
    end
  end
  if not allowed then
    reply[3] = 0
  elseif charging then
    for _, q in ipairs(quotas) do
      q.n = math.min(q.n + q.cost, MAX) -- a shadow's overage saturates
      save(q, q.key, q.hist, q.cost, q.limit_in - q.n)
    end
  end
  if grant then
    reply[#reply + 1] = g
  end
  return reply
end

local function refund()
  int(ARGV[4], 0, MAX - 1, 'cost')
  local n = int(ARGV[5], 0, #KEYS, 'throttle count')
  if #ARGV ~= 5 + 5 * n or #KEYS ~= n then
    bad('wrong number of arguments')
  end
  read_now()
  local plan = {}
  for i = 1, n do
    local j = 1 + 5 * i
    local interval = int(ARGV[j], 1, MAX - 1, 'interval')
    local burst = int(ARGV[j + 1], 1, MAX - 1, 'burst')
    local mine_s = int(ARGV[j + 2], 0, 2 ^ 40, 'own TAT')
    local mine_ns = int(ARGV[j + 3], 0, E9 - 1, 'own TAT')
    local cost = int(ARGV[j + 4], 0, MAX - 1, 'cost')
    if interval * burst >= MAX then
      bad('throttle span of 2^53 ns or more')
    end
    plan[i] = { interval, burst, mine_s, mine_ns, cost }
  end
  for i = 1, n do
    local interval, burst, mine_s, mine_ns, cost = unpack(plan[i])
    local ahead, tol = load(KEYS[i])
    -- Nothing to give back to a full bucket, nor across a change of span.
    if ahead and ahead > 0 and tol == interval * burst then
      -- give = min(cost * interval, max(mine - now, 0)); the TAT moves back
      -- by it, but not below now.
      local give = math.min(cost * interval, math.max(ahead_of(mine_s, mine_ns), 0))
      store(KEYS[i], ahead - give, tol)
    end
  end
  return { now_s, now_ns }
end

local function settle()
  local delta = int(ARGV[4], 1 - MAX, MAX - 1, 'delta')
  local n = int(ARGV[5], 0, 1, 'throttle count')
  local qi = 6 + 2 * n
  if #ARGV < qi then
    bad('wrong number of arguments')
  end
  local m = int(ARGV[qi], 0, 2, 'quota count')
  if (#ARGV ~= qi + 6 * m and #ARGV ~= qi + 6 * m + 1) or #KEYS ~= n + 2 * m then
    bad('wrong number of arguments')
  end
  local charged_day = nil
  if #ARGV == qi + 6 * m + 1 then
    charged_day = int(ARGV[#ARGV], -2 ^ 40, 2 ^ 40, 'charge day')
  end
  read_now()
  local throttles, quotas = {}, {}
  for i = 1, n do
    local interval = int(ARGV[4 + 2 * i], 1, MAX - 1, 'interval')
    local burst = int(ARGV[5 + 2 * i], 1, MAX - 1, 'burst')
    if interval * burst >= MAX then
      bad('throttle span of 2^53 ns or more')
    end
    throttles[i] = { interval, interval * burst }
  end
  for i = 1, m do
    local j = qi + 1 + 6 * (i - 1)
    local q = quota_spec(j)
    q.history_days = int(ARGV[j + 5], 1, 100000, 'history days')
    quotas[i] = q
  end
  for i = 1, n do
    local interval, tol = unpack(throttles[i])
    local ahead, old = load(KEYS[i])
    ahead = math.max(ahead or 0, 0)
    -- A key whose span changed since the decision is left alone.
    if not old or old == tol then
      local shift = math.min(math.abs(delta) * interval, MAX - 1)
      if delta > 0 then
        store(KEYS[i], math.min(ahead + shift, MAX - 1), tol)
      elseif ahead > 0 then
        store(KEYS[i], math.max(ahead - shift, 0), tol)
      end
    end
  end
  for i, q in ipairs(quotas) do
    local key, hist = KEYS[n + 2 * i - 1], KEYS[n + 2 * i]
    roll(q, key)
    if delta >= 0 or not charged_day or charged_day >= q.start then
      local before = q.n
      q.n = math.min(math.max(q.n + delta, 0), MAX)
      save(q, key, hist, 0, q.limit_in - q.n)
      if q.n ~= before then
        -- A refund comes off the day that was charged, while the history
        -- still holds it.
        local day = q.today
        if delta < 0 and charged_day and charged_day ~= day
          and redis.call('HEXISTS', hist, 'u:' .. str(charged_day)) == 1 then
          day = charged_day
        end
        redis.call('HINCRBY', hist, 'u:' .. str(day), str(q.n - before))
        if day ~= q.today and redis.call('HEXISTS', hist, 'r:' .. str(day)) == 1 then
          -- What remained at that day's end had the units never been charged.
          redis.call('HINCRBY', hist, 'r:' .. str(day), str(before - q.n))
        end
      end
    end
  end
  return { now_s, now_ns }
end

local function set_remaining()
  if #ARGV ~= 10 or #KEYS ~= 2 then
    bad('wrong number of arguments')
  end
  local remaining = int(ARGV[4], 0, MAX, 'remaining')
  local q = quota_spec(5)
  q.history_days = int(ARGV[10], 1, 100000, 'history days')
  read_now()
  roll(q, KEYS[1])
  q.n = q.limit_in - remaining
  if q.n < -MAX then
    bad('remaining out of range')
  end
  save(q, KEYS[1], KEYS[2], 0, remaining)
  return { now_s, now_ns, q.start, q.stop, q.limit_in, q.n }
end

local modes = {
  a = acquire,
  b = function()
    return acquire(false, true)
  end,
  p = function()
    return acquire(true)
  end,
  r = refund,
  s = set_remaining,
  t = settle,
}
local run = modes[ARGV[1]]
if not run then
  return redis.error_reply('tollgate: unknown mode')
end
local ok, res = pcall(run)
if ok then
  return res
elseif type(res) == 'table' and res.tollgate then
  return redis.error_reply('tollgate: ' .. res.tollgate)
end
error(res, 0)
