#!lua
-- The shebang (Redis 7) declares the script a write, as its flags default
-- to: a replica then redirects it to its master (MOVED) rather than run it
-- on a connection in READONLY mode (redis-rs sends READONLY on every
-- cluster connection) and fail at its first write. Without it a master
-- demoted by a failover ran every call and failed, and the client, never
-- redirected, never learnt of the new master.
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
-- Lifetimes: a key expires (PX) when its state has run out, worked out from
-- the call's now. Redis expires keys on its own clock, which is the call's
-- clock on the server's TIME but not a time the caller gives (a manual
-- clock, for tests about time): that moves only when the caller moves it,
-- and a key lapsing after so much real time would forget state still live
-- at the caller's now (an emptied bucket full again, places in flight or a
-- reset's mark gone, while the caller's clock stands still). So on a given
-- time a key whose state runs out within a day lives a day of real time
-- (state past its time reads as none all the same).
--
-- Throttle key: the string "<tat_s> <tat_ns> <tol> <since_s> <since_ns>
-- <tie>", tol the span (interval * burst, ns) the TAT was written under,
-- since the instant those numbers came into force (the throttle's "since"
-- when it was written) and tie how many changes came before them at that
-- very instant (the last three are missing in a key written by mode "r"
-- without the numbers in force, or by an older version); missing = a full
-- bucket. It expires when the bucket is full again (see "Lifetimes"). A
-- key read under other numbers is converted as Gcra::rescale does at each
-- change: when the throttle's earlier spans (the "before" argument) hold
-- the key's, at each change since in turn, the time between two changes
-- draining at the scale then, each rounded down as a store converting at
-- once rounds it; otherwise (numbers this instance never had, or older
-- than it keeps) from the key's span to the current one, as of the latest
-- change (the throttle's "since"; now when it is 0 0). A key converted
-- when next used thus ends where one converted at each change would; the
-- conversion is stored at once, whatever the verdict (left unstored, the
-- old TAT would keep draining at the old scale and refill the bucket
-- early).
--
-- Key newer than the call: a key whose numbers came into force after the
-- call's (later since, or the same and a larger tie; an instance yet to
-- learn of a change) is never converted back to the call's, which every
-- later call under the newer ones would convert forward again, a share
-- lost or gained to rounding at each round trip. "a", "p" and "b" decide
-- on the key's TAT ahead of now told in the call's span (scaled, rounded
-- up: the call never finds more room than the key has) and reply that;
-- what is charged is scaled to the key's span (rounded down) and stored
-- under the key's numbers: the request's share of the bucket, as a
-- settlement under older numbers ("t", "r", see `converted`) is. Where
-- only the rate changed that is exactly what the new numbers charge; the
-- key holds its span, not its interval, so where the burst changed too the
-- request is charged its share of the old bucket, until the caller learns
-- of the change.
--
-- Quota key: hash {w = window start (days since 1970-01-01), n = used in it,
-- d = the day of the last change, x = "<s> <ns>" the time of the last reset
-- (mode "z") or set (mode "s"), if any, b = "<s> <ns>" the time the count
-- was made (its first write after none, a reset or data lost: a restart
-- without persistence, a failover)}, expiring a day after the window ends. History key: hash {u:<day> = used that
-- UTC day, r:<day> = what remained in the window after the day's last change,
-- l:<day> = the window's limit that r: was worked out under (a report reads
-- r: under the limit in force at the day's end, see "k")},
-- expiring history_days and a month after its last write; days that fall
-- out of the history are deleted when a new day is first written, but for
-- the r: and l: of the latest of them.
--
-- Limit log key (one per quota of a plan or an account, not per key):
-- hash {<day> = "<limit> <offset> <created_s> <period> <week_start>"}, the
-- quota's numbers before they were changed on that UTC day (the first
-- change of the day; entries written without the period were written
-- under the period now), written
-- by mode "k" when a plan or account is put anew and read by usage reports
-- only, never by a decision; days older than history_days and a month are
-- deleted when a day is first written, and the key expires as long after
-- its last write.
--
-- Modes (ARGV[1]):
--
-- "a" acquire. KEYS: t_1..t_n, then q_i, h_i for each quota.
--   ARGV: "a", now_s, now_ns, cost, n, n times (interval_ns, burst, shadow,
--   since_s, since_ns, cost_i, before), before "" when the numbers never
--   changed, else "<tie> " (how many changes came before them at since)
--   and the spans in force before since, newest first, each "<span>
--   <since_s> <since_ns> <tie>" (since it came into force), separated by
--   spaces,
--   then m (0..9) quotas (an account's, a plan's and a model's: a request
--   quota, a token day and a token month each), m times (limit, period
--   (D|W|M), week_start (0 = Monday .. 6), offset, created_s, shadow,
--   history_days, cost_i, tokens), tokens = 1 for a token budget. A cost above a quota's whole
--   limit fits no window's limit, only what a raise (UpdateUsage) left in
--   this one: it is decided as any cost is (the caller names it).
--   Each limit is charged its own cost_i (requests or tokens); ARGV[4], the
--   request's cost in requests, decides whether a concurrency place is taken.
--   All or nothing: when a limit that is not a shadow denies, nothing is
--   charged; otherwise every throttle that allows is charged (a shadow
--   throttle that would deny is not) and the quota is (a shadow quota past
--   its limit too).
--   Then c (0..2) concurrency caps (a plan's, a model's), c times (cap,
--   lease_ms, member, shadow): KEYS ends with c_1..c_c, each a sorted set
--   of the leases of requests in flight (member, expiry in ms); a request
--   let in adds its lease to each, which its caller removes (ZREM) when the
--   response ends, renews (mode "l") while it holds it, and which lapses
--   after lease_ms if the caller stops renewing it (its process gone)
--   without removing it.
--   Reply: now_s, now_ns, allowed (1|0), before_1..before_n (ns the TAT was
--   ahead of now, after conversion), then per quota: window start day,
--   window end day, the window's limit, the count before this request; then
--   per cap: the requests in flight before this one.
--
-- "p" peek: as "a", with the same reply, but nothing is charged (a
--   conversion is still stored). It tells which limits would deny.
--
-- "b" acquire and borrow: as "a" without a concurrency cap, with two more
--   ARGV after the "0" of the caps: want, lend. When the request is allowed,
--   g more units of it are charged with it, to every limit: as many as fit
--   of `want` (requests waiting for them now), plus at most `lend` more and
--   at most a quarter of what would still fit after those (a share to
--   decide from locally: none near a limit). A shadow limit that would deny
--   the first unit fits none. The reply is a's, then g.
--
-- "r" refund (Gcra::refund). KEYS: t_1..t_n, then x_1..x_n, each
--   throttle's reset mark (see "f"). ARGV: "r", now_s, now_ns, cost, n, n
--   times (interval_ns, burst, mine_s, mine_ns, cost_i), then charged_s,
--   charged_ns; mine the TAT this request stored, charged the time of the
--   call that charged it; then optionally, n times, the numbers the charge
--   was made under and those in force: since_s, since_ns, tie (of the
--   charge's numbers), interval_ns, burst, since_s, since_ns, before (the
--   numbers in force, as "a" takes them). With them, the key is converted
--   to the numbers in force (never back from newer ones of its own) and so
--   is what is given back (cost * interval and mine, see `converted`)
--   before it is given; without them, a key
--   whose span changed since is left alone. A key reset after the charge
--   is left alone (its mark later than it; a charge at the reset's very
--   instant is taken as made after it): the reset refilled the charge
--   already, and given back it would be granted twice.
--   Reply: now_s, now_ns.
--
-- "t" settle a request's actual tokens. KEYS: t_1..t_n (0 or 1), then q_i,
--   h_i for each quota. ARGV: "t", now_s, now_ns, delta (tokens, negative
--   for a refund), n, n times (interval_ns, burst, since_s, since_ns, tie,
--   then the numbers in force: interval_ns, burst, since_s, since_ns,
--   before, as "a" takes them), m, m times (limit,
--   period, week_start, offset, created_s, history_days; m at most 2, at
--   most 6 for "g"), then optionally
--   time the tokens were charged (charged_s, charged_ns), then optionally
--   "o": a charge (delta > 0) so marked is what a local copy admitted
--   during an outage, owed to Redis, and goes only to the window that began on or before its day,
--   to no count reset or set after it, and to that day in the history
--   while it holds it. A throttle's key is converted to the numbers in
--   force and its TAT moves by delta * interval converted to them as the
--   bucket's share was at each change since the request's numbers (see
--   `converted`; a refund never below now; a charge may put the bucket in
--   debt, past its span); a quota's count by delta (never
--   below 0), except that a refund is not given to a window that began
--   after the day the tokens were charged, nor to a count reset after the
--   time they were charged, nor to one made after it (b: the count that
--   held them is gone, Redis having restarted empty; none counts them any
--   more; a charge at the reset's or the making's very instant is taken as
--   made after it); in
--   the history a refund comes off that day's use while the history holds
--   it (and adds to what remained at that day's end).
--   Reply: now_s, now_ns.
--
-- "g" give back what one part of a split decision (a Redis Cluster) charged
--   its quotas when a later part denied the request. KEYS and ARGV as "t",
--   with no throttle, delta the negative cost and the charge time given.
--   The exact inverse of the charge: a count below 0 (raised by
--   UpdateUsage) goes back below 0, where "t" would stop at 0 and the
--   denial would take the raise away. A quota whose count is gone
--   (expired, or reset and not charged since), was reset after the
--   charge or made after it no longer counts it, and gets nothing. Nor
--   does a window that began after the day of the charge (a borrowed
--   share given back after midnight); that day's history, while it holds
--   it, counts only what was admitted: the units come off its use and add
--   to what remained at its end.
--   Reply: now_s, now_ns.
--
-- "z" reset a quota (Admin::reset_key). KEYS: q, h. ARGV: "z", now_s,
--   now_ns, limit, period, week_start, offset, created_s. Deletes the count
--   and the history, and marks the count with the time of the reset (x;
--   the time of a reset before it if that is later, the clock gone back),
--   kept until a day after the window holding it ends: a refund or
--   give-back ("t", "g") of units charged before it gets nothing, as
--   one charged before the window began does not (the reset forgave them;
--   given back, they would be granted twice). Past that window the mark is
--   not needed: such a charge is older than the window anyway.
--   Reply: now_s, now_ns.
--
-- "f" fill a throttle (Admin::reset_key). KEYS: t, x. ARGV: "f", now_s,
--   now_ns, interval_ns, burst. Deletes the TAT (a full bucket) and marks
--   the throttle with the time of the reset (x = "<s> <ns>", never moved
--   back by a clock gone back), kept for the throttle's span (interval *
--   burst): a refund ("r") of units charged before it gets nothing back.
--   Past the span the mark is not needed: what such a charge stored has
--   refilled by then, and a refund gives back only what has not. Only
--   admin resets and refunds read or write the mark, never a decision.
--   Reply: now_s, now_ns.
--
-- "l" renew the leases of places this instance's live responses hold.
--   KEYS: c (one cap's sorted set of leases). ARGV: "l", now_s, now_ns,
--   lease_ms, member_1..member_k (k >= 1). Each member still in the set
--   lapses lease_ms from now, never sooner than it would have; one no longer
--   in it (given back, or lapsed and removed by a decision, which may have
--   let another request take its place since) is not added back. The set
--   expires no sooner than lease_ms from now while a member was renewed.
--   Reply: now_s, now_ns, the number of members still in the set.
--
-- "k" log a quota's numbers before a change (Store::requota). KEYS: the
--   quota's limit log. ARGV: "k", now_s, now_ns, limit, offset, created_s,
--   history_days, period, week_start. Writes the numbers under today's day unless a change
--   earlier today did (what was in force before the day's first change is
--   what the days before it ended under).
--   Reply: now_s, now_ns.
--
-- "s" set what remains of the quota (UpdateUsage). KEYS: q, h. ARGV: "s",
--   now_s, now_ns, remaining, limit, period, week_start, offset, created_s,
--   history_days. Marks the count as "z" does: what was charged before the
--   set is in what was set, and a refund or give-back of it gets nothing.
--   Reply: now_s, now_ns, window start day, window end day, the window's
--   limit, the new count.

-- Cost: EVALSHA runs this whole chunk on every call (Redis keeps nothing
-- between calls), so every function, upvalue and table below is made again
-- each time, and in Redis's Lua a C function call (tonumber, math.max,
-- string.format) costs as much as a dozen lines of arithmetic. So the
-- helpers capture no variable (each takes what it needs as arguments, and
-- the mode's function gets them the same way, through pcall: an upvalue
-- costs more than a closure); only the mode's own function is made, and the
-- quota helpers only for a call with a quota; numbers are literals (2 ^ 53
-- is folded when compiled); records are arrays; an argument is checked with
-- one pattern, "0" and "1" with none; and integers are written with '%d',
-- which prints a double's integer exactly (as a C long) and as '%.0f' does,
-- since every number written is an integer below 2^53 and none is -0.
-- benches/script_cpu.sh measures a decision against a hand-written script
-- that makes the same Redis calls.

-- A call sent once ("t!", "r!", "g!": a settlement that is sent again when
-- Redis did not answer it, and may have run): its last key is a marker in
-- the slot of its keys, and its last argument the marker's life in ms. The
-- first run sets the marker and runs the mode; a run that finds it set
-- changes nothing. Read before anything else reads the mode, so that
-- every part of the script sees the plain one.
local once = ARGV[1]
if once and #once == 2 and string.sub(once, 2) == '!' then
  local marker, life = KEYS[#KEYS], ARGV[#ARGV]
  if not marker or #ARGV < 4 or not string.find(life, '^[1-9]%d*$') then
    return redis.error_reply('tollgate: bad marker')
  end
  KEYS[#KEYS], ARGV[#ARGV] = nil, nil
  ARGV[1] = string.sub(ARGV[1], 1, 1)
  if not redis.call('SET', marker, '1', 'NX', 'PX', life) then
    if ARGV[2] ~= '' then
      return { ARGV[2] + 0, ARGV[3] + 0 }
    end
    local t = redis.call('TIME')
    return { t[1] + 0, t[2] * 1000 }
  end
end

-- An integer argument in [lo, hi] (else an error naming `what`), written as
-- Rust writes it: digits with no leading zero, after a minus if negative.
-- Such digits convert exactly below 2^53, and a conversion never rounds
-- across 2^53 (itself exact), so a value read as below it was written below
-- it; 2^53 itself must be spelt out. These are exactly the strings that
-- '%.0f' prints back unchanged. (v + 0 converts as tonumber does.)
local function int(v, lo, hi, what)
  -- Most arguments are 0 or 1 (and every hi >= 0): no pattern for them.
  if v == '0' and lo <= 0 or v == '1' and lo <= 1 and hi >= 1 then
    return v == '1' and 1 or 0
  end
  local x = v and string.find(v, '^%-?[1-9]%d*$') and v + 0
  if not x or x < lo or x > hi or x == 2 ^ 53 and v ~= '9007199254740992' then
    error({ tollgate = 'bad ' .. what })
  end
  return x
end

-- The time of the call (ARGV[2], ARGV[3]; see the top).
local function clock(int)
  if ARGV[2] ~= '' then
    return int(ARGV[2], 0, 2 ^ 40, 'now'), int(ARGV[3], 0, 1e9 - 1, 'now')
  end
  local t = redis.call('TIME')
  local s, us = t[1] + 0, t[2] + 0
  if ARGV[3] ~= '' then
    -- A deadline in microseconds of the server's TIME: a call that runs after
    -- it (the server stalled with the call queued) was given up by its
    -- caller, who answered the request without it, so it decides nothing.
    if s * 1000000 + us > int(ARGV[3], 0, 2 ^ 53 - 1, 'deadline') then
      error({ tollgate = 'expired' })
    end
  end
  return s, us * 1000
end

-- A throttle key's TAT ahead of now in ns (may be <= 0), its span, the TAT
-- itself, and since its numbers held (three nils if the key does not say);
-- nil if missing. (s - now_s) * 1e9 is exact (a multiple of 2^9 far below
-- 2^62); the sum is exact below 2^53, and above it only compares as larger.
local function load(key, now_s, now_ns)
  local v = redis.call('GET', key)
  if not v then
    return nil
  end
  local s, ns, tol, rest = string.match(v, '^(%d+) (%d+) (%d+)(.*)$')
  local vs, vns, vt
  if s then
    s, ns, tol = s + 0, ns + 0, tol + 0
    if rest ~= '' then
      vs, vns, vt = string.match(rest, '^ (%d+) (%d+) (%d+)$')
      if vs then
        vs, vns, vt = vs + 0, vns + 0, vt + 0
      end
      if not vs or vs > 2 ^ 40 or vns >= 1e9 then
        s = nil
      end
    end
  end
  if not s or s >= 2 ^ 53 or ns >= 1e9 or tol < 1 or tol >= 2 ^ 53 then
    error({ tollgate = 'bad throttle state' })
  end
  return (s - now_s) * 1e9 + (ns - now_ns), tol, s, ns, vs, vns, vt
end

-- Stores the TAT now + ahead under span tol, in force since vs, vns after
-- vt changes at that instant (nil: not said), expiring when the bucket is full again (ceil to ms, at least
-- 1); a TAT at or before now is no key at all.
-- For integers 0 <= x < 2^53, x % d (x - floor(x / d) * d) is exact while
-- x / d cannot round up to the next integer, so below 2^52 here;
-- math.fmod is exact everywhere, and slower.
local function store(key, ahead, tol, vs, vns, vt, now_s, now_ns)
  if ahead <= 0 then
    redis.call('DEL', key)
    return
  end
  local small = ahead < 2 ^ 52
  local r = small and ahead % 1e9 or math.fmod(ahead, 1e9)
  local s, ns = now_s + (ahead - r) / 1e9, now_ns + r
  if ns >= 1e9 then
    s, ns = s + 1, ns - 1e9
  end
  local sub = small and ahead % 1e6 or math.fmod(ahead, 1e6)
  local ms = (ahead - sub) / 1e6 + (sub > 0 and 1 or 0)
  if ARGV[2] ~= '' and ms < 86400000 then
    ms = 86400000 -- a given time (see "Lifetimes")
  end
  local v
  if vs then
    v = string.format('%d %d %d %d %d %d', s, ns, tol, vs, vns, vt)
  else
    v = string.format('%d %d %d', s, ns, tol)
  end
  redis.call('SET', key, v, 'PX', string.format('%d', ms))
end

-- floor(a * b / c) exactly, for integers 0 <= a <= c, b >= 0, 0 < c, all
-- below 2^53 while a * b need not be. With b = q * c + r it is a * q
-- (exact: at most b) plus floor(a * r / c), built over the bits of a from
-- the top as k * c + rem with 0 <= rem < c, so that no sum leaves the
-- exact range.
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
  return q + k, rem
end

-- floor(a * b / c) for any a >= 0 (a bucket in debt is ahead by more than
-- its span c), at most 2^53 - 1 as a stored TAT is: a = qa * c + ra gives
-- qa * b plus muldiv(ra, b, c). Also returns the remainder of the division
-- (0: exact), which muldiv leaves.
local function scale(a, b, c)
  local ra = math.fmod(a, c)
  local k, rem = muldiv(ra, b, c)
  return math.min((a - ra) / c * b + k, 2 ^ 53 - 1), rem
end

-- Gcra::rescale at each change of a throttle's numbers since the key's own
-- (span old, in force since vs, vns after vt changes at that instant),
-- when `before` (the earlier spans, newest first, "<span> <s> <ns> <tie>"
-- each, after the current numbers' tie) holds them: at each change the TAT
-- ahead of it (past the span then for a bucket in debt, which keeps its
-- debt) is scaled exactly to the next span, and the time to the next change
-- drains it. Returns true and the TAT ahead of now under the current span
-- (nil: full), or false when `before` does not hold the key's numbers. Between changes the
-- TAT is kept as an instant plus ns ahead of it, so that each difference is
-- taken as `load` takes it: exact, or so large that the bucket is full.
local function replay(before, old, vs, vns, vt, tol, since_s, since_ns, tat_s, tat_ns, now_s, now_ns)
  local spans, ss, nss, at = {}, {}, {}, nil
  for t, s, ns, tie in string.gmatch(before, ' (%d+) (%d+) (%d+) (%d+)') do
    t, s, ns, tie = t + 0, s + 0, ns + 0, tie + 0
    if t < 1 or t >= 2 ^ 53 or s > 2 ^ 40 or ns >= 1e9 then
      error({ tollgate = 'bad earlier spans' })
    end
    local i = #spans + 1
    spans[i], ss[i], nss[i] = t, s, ns
    if t == old and s == vs and ns == vns and tie == vt then
      at = i
      break
    end
  end
  if not at then
    return false
  end
  -- The change out of span i is the coming into force of span i - 1 (of
  -- the current numbers for i = 1).
  local base_s, base_ns, ahead, from = tat_s, tat_ns, 0, old
  for i = at, 1, -1 do
    local cs, cns, to = since_s, since_ns, tol
    if i > 1 then
      cs, cns, to = ss[i - 1], nss[i - 1], spans[i - 1]
    end
    local a = (base_s - cs) * 1e9 + (base_ns - cns) + ahead
    if a <= 0 then
      return true, nil
    end
    base_s, base_ns, ahead, from = cs, cns, scale(a, to, from), to
  end
  return true, (base_s - now_s) * 1e9 + (base_ns - now_ns) + ahead
end

-- Gcra::rescale at the change of a throttle's span from `old` to `tol`: the
-- TAT ahead of `since` (past the old span for a bucket in debt, which keeps
-- its debt), scaled exactly (ahead == old gives exactly tol), less the time
-- since the change. A key written after the change by an instance still on
-- the old numbers cannot be told from one in debt at it: it converts as of
-- the change too. A huge `elapsed` is inexact but then the result is
-- <= 0 either way. Returns the TAT ahead of now under the new span, or nil
-- when the bucket was full at the change.
local function rescale(ahead, old, tol, tat_s, tat_ns, since_s, since_ns, now_s, now_ns)
  local elapsed = 0
  if since_s > 0 or since_ns > 0 then
    elapsed = math.max((now_s - since_s) * 1e9 + (now_ns - since_ns), 0)
  end
  local at_change = ahead + elapsed
  if elapsed > 0 then
    at_change = (tat_s - since_s) * 1e9 + (tat_ns - since_ns)
  end
  if at_change > 0 then
    return scale(at_change, tol, old) - elapsed
  end
end

-- A settlement ("t" charging a throttle, "r" giving back to one) of a
-- request reserved under numbers that may have changed since: the key
-- converted to the current numbers as "a" converts it, and the
-- settlement's shift (ns of the bucket's time line under the reservation's
-- span tol_s, in force since ss, sns after st changes at that instant) and
-- the end of the reservation's own share (u_s, u_ns; nil for none)
-- converted to the current span tol_c (since cs, cns, earlier spans
-- before_c, whose first word is its tie) as the bucket's share in use was
-- at each change: at each change the shift scaled exactly to the next
-- span, rounded down, the share's end as a TAT (Gcra::rescale_span,
-- Gcra::rescale); from tol_s to tol_c as of the latest change when
-- before_c does not hold the reservation's numbers. A key under numbers
-- newer than those the caller names as in force (an instance yet to learn
-- of a change, a share given back after it) is never converted back to
-- them: it keeps its own, and the settlement is converted to those from
-- the reservation's as of their coming into force, as when before_c does
-- not hold them. Returns the key's TAT ahead of now (nil: full), the
-- shift, the share's end ahead of now (nil: refilled, or none), and the
-- numbers the key is kept under: span, since (s, ns) and tie. Made only
-- for "t" and "r".
local converted = nil
if ARGV[1] == 't' or ARGV[1] == 'r' then
  converted = function(load, rescale, replay, key, now_s, now_ns, tol_s, ss, sns, st,
      tol_c, cs, cns, before_c, shift, u_s, u_ns)
    local ct = 0
    if before_c ~= '' then
      ct = string.match(before_c, '^%d+')
      ct = ct and ct + 0
      if not ct or ct >= 2 ^ 53 then
        error({ tollgate = 'bad earlier spans' })
      end
    end
    local ahead, old, tat_s, tat_ns, vs, vns, vt = load(key, now_s, now_ns)
    if ahead and vs and (vs > cs or vs == cs and (vns > cns or vns == cns and vt > ct)) then
      tol_c, cs, cns, ct, before_c = old, vs, vns, vt, ''
    end
    if ahead and (old ~= tol_c or vs and (vs ~= cs or vns ~= cns or vt ~= ct)) then
      local found, a = false, nil
      if vs and before_c ~= '' then
        found, a = replay(before_c, old, vs, vns, vt, tol_c, cs, cns, tat_s, tat_ns, now_s, now_ns)
      end
      if found then
        ahead = a
      elseif old ~= tol_c then
        ahead = rescale(ahead, old, tol_c, tat_s, tat_ns, cs, cns, now_s, now_ns)
      end
    end
    local ends = u_s and (u_s - now_s) * 1e9 + (u_ns - now_ns)
    if tol_s == tol_c and ss == cs and sns == cns and st == ct then
      return ahead, shift, ends, tol_c, cs, cns, ct
    end
    -- The spans from the reservation's to the current ones (newest first
    -- in before_c, after its tie), as replay reads them.
    local spans, at = {}, nil
    for t, s, ns, tie in string.gmatch(before_c, ' (%d+) (%d+) (%d+) (%d+)') do
      t, s, ns, tie = t + 0, s + 0, ns + 0, tie + 0
      spans[#spans + 1] = t
      if t == tol_s and s == ss and ns == sns and tie == st then
        at = #spans
        break
      end
    end
    if at then
      local from = tol_s
      for i = at, 1, -1 do
        local to = i > 1 and spans[i - 1] or tol_c
        shift = scale(shift, to, from)
        from = to
      end
      if u_s then
        local _, a = replay(before_c, tol_s, ss, sns, st, tol_c, cs, cns, u_s, u_ns, now_s, now_ns)
        ends = a
      end
    else
      shift = scale(shift, tol_c, tol_s)
      if u_s then
        ends = rescale(ends, tol_s, tol_c, u_s, u_ns, cs, cns, now_s, now_ns)
      end
    end
    return ahead, shift, ends, tol_c, cs, cns, ct
  end
end

-- The quota helpers, made only for a call with a quota: the quota's
-- parameters at ARGV[i..] (spec), its window and count (roll), and their
-- writes (save). Between the checks and the writes a quota is the array
-- {w, n, stop, today, history_days}, then what acquire needs (cost,
-- limit_in): an array, not a table of named fields, which costs thrice as
-- much to make.
local function quotas(int)
  -- The window [start, end) in days holding day `day`.
  local function window(period, week_start, day)
    if period == 'D' then
      return day, day + 1
    elseif period == 'W' then
      -- Day 0 is a Thursday: (day + 3) % 7 counts from Monday.
      local back = ((day + 3) % 7 - week_start) % 7
      return day - back, day - back + 7
    end
    -- The month: proleptic Gregorian dates (Howard Hinnant's algorithms, as
    -- window.rs).
    local floor = math.floor
    local function days_from_civil(y, m)
      if m <= 2 then
        y = y - 1
      end
      local era = floor(y / 400)
      local yoe = y - era * 400
      local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5)
      local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
      return era * 146097 + doe - 719468
    end
    local z = day + 719468
    local era = floor(z / 146097)
    local doe = z - era * 146097
    local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524)
      - floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
    local mp = floor((5 * doy + 2) / 153)
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400 + (m <= 2 and 1 or 0)
    if m == 12 then
      return days_from_civil(y, 12), days_from_civil(y + 1, 1)
    end
    return days_from_civil(y, m), days_from_civil(y, m + 1)
  end

  -- The parameters at ARGV[i..i+4], checked: limit, period, week_start,
  -- offset, created_s.
  local function spec(i)
    local limit = int(ARGV[i], 0, 2 ^ 53, 'limit')
    local period = ARGV[i + 1]
    local week_start = int(ARGV[i + 2], 0, 6, 'week start')
    local offset = int(ARGV[i + 3], 0, 2 ^ 53, 'offset')
    local created = int(ARGV[i + 4], 1 - 2 ^ 53, 2 ^ 53 - 1, 'creation time')
    if period ~= 'D' and period ~= 'W' and period ~= 'M' then
      error({ tollgate = 'bad period' })
    end
    return limit, period, week_start, offset, created
  end

  -- Count::roll: the window of now if it began after the day of the last
  -- change d, with a count of 0; else (the same window, the clock went
  -- back, or the plan's period changed to one whose window holds d) the
  -- stored count in the window holding d. Returns the day to count on, the
  -- window start w and count n to store, the window [start, stop) and its
  -- limit (QuotaSpec::limit_in). The day is today, or in a kept window d
  -- when that is later (the clock went back): what is charged then is
  -- counted on the latest day seen, and the days before keep their records
  -- as they closed. A key written without d is taken as changed last on
  -- its window's first day.
  -- now_s < 2^41, so now_s % 86400 is exact.
  local function roll(key, now_s, limit, period, week_start, offset, created)
    local today = (now_s - now_s % 86400) / 86400
    local v = redis.call('HMGET', key, 'w', 'n', 'd')
    local w, n, d = v[1], v[2] or '0', v[3]
    if w then
      w = string.find(w, '^%-?%d+$') and w + 0
      n = string.find(n, '^%-?%d+$') and n + 0
      d = d and string.find(d, '^%-?%d+$') and d + 0 or (not d and w)
      if not w or not n or not d or w > 2 ^ 40 or w < -2 ^ 40 or n > 2 ^ 53 or n < -2 ^ 53
        or d > 2 ^ 40 or d < -2 ^ 40 then
        error({ tollgate = 'bad quota state' })
      end
    end
    local start, stop = window(period, week_start, today)
    if w and start <= d then
      start, stop = window(period, week_start, d)
      w = start
      if d > today then
        today = d
      end
    else
      w, n = start, 0
    end
    if start * 86400 <= created and created < stop * 86400 then
      limit = limit - offset
    end
    return today, w, n, start, stop, limit
  end

  -- Writes the count of quota q, and in the history the use of the day it
  -- counts on (+ add, an integer as a string, or nil) and what remains.
  local function save(q, key, hist, add, remaining, now_s, now_ns)
    local fmt = string.format
    local w, n, stop, today, days = q[1], q[2], q[3], q[4], q[5]
    local day = fmt('%d', today)
    if redis.call('HSET', key, 'w', fmt('%d', w), 'n', fmt('%d', n), 'd', day) == 3 then
      -- A new count (all three fields new): when it was made. A refund or
      -- give-back of a charge before it ("t", "g") was counted by a count
      -- since lost (Redis restarted empty), not by this one.
      redis.call('HSET', key, 'b', fmt('%d %d', now_s, now_ns))
    end
    -- A day after the window ends, counted from the decision's now (whose
    -- day is before the one counted on when the clock went back).
    local ms = (stop + 1 - (now_s - now_s % 86400) / 86400) * 86400000
      - now_s % 86400 * 1000 - (now_ns - now_ns % 1000000) / 1000000
    redis.call('PEXPIRE', key, fmt('%d', ms > 1 and ms or 1))
    -- Today's use starts at 0. HINCRBY makes a missing field from 0, so
    -- with something to add, the HSETNX(u, 0) this once made first wrote
    -- nothing HINCRBY does not: one call fewer for every charge.
    if add then
      redis.call('HINCRBY', hist, 'u:' .. day, add)
    else
      redis.call('HSETNX', hist, 'u:' .. day, '0')
    end
    -- u:<day>, r:<day> and l:<day> are always written together, so HSET
    -- counting r:<day> or l:<day> as new tells the day's first write, as
    -- HSETNX's reply did: a new day drops the days that fell out of the
    -- history (once a day; it never touches today's fields). l: is the
    -- window's limit (what remains and the count add up to it): a report
    -- reads r: under the limit in force at the day's end instead.
    if redis.call('HSET', hist, 'r:' .. day, fmt('%d', remaining),
      'l:' .. day, fmt('%d', remaining + n)) > 0 then
      -- What remained after the latest day cut is kept (its r: and l:
      -- alone): it is what remains on the days after it in its window,
      -- which may reach into the history (a month's first day leaves a
      -- history of 31 days while the rest of the month is in it).
      local cut, fields, kept = today - days, redis.call('HKEYS', hist), nil
      for _, f in ipairs(fields) do
        local d = tonumber(string.match(f, '^r:(%-?%d+)$'))
        if d and d <= cut and (not kept or d > kept) then
          kept = d
        end
      end
      local kept_l = kept and fmt('l:%d', kept)
      kept = kept and fmt('r:%d', kept)
      for _, f in ipairs(fields) do
        local d = tonumber(string.match(f, '^[url]:(%-?%d+)$'))
        if d and d <= cut and f ~= kept and f ~= kept_l then
          redis.call('HDEL', hist, f)
        end
      end
    end
    -- Kept a month (the longest window) past the history, for the same
    -- reason.
    redis.call('PEXPIRE', hist, fmt('%d', (days + 31) * 86400000))
  end

  return spec, roll, save
end

-- The mode's function: only the one asked for is made. It gets the helpers
-- as arguments (see Cost).
local mode, run = ARGV[1], nil

-- "a" acquire, "p" peek.
if mode == 'a' or mode == 'p' or mode == 'b' then
  run = function(int, clock, load, store, rescale, quotas, replay, scale)
    local argv, keys = ARGV, KEYS -- locals: a global is found by name
    local cost = int(argv[4], 0, 2 ^ 53 - 1, 'cost')
    local n = int(argv[5], 0, #keys, 'throttle count')
    local qi = 6 + 7 * n
    if #argv < qi then
      error({ tollgate = 'wrong number of arguments' })
    end
    local m = int(argv[qi], 0, 9, 'quota count')
    local ci = qi + 1 + 9 * m
    if #argv < ci then
      error({ tollgate = 'wrong number of arguments' })
    end
    local caps = int(argv[ci], 0, 2, 'concurrency cap count')
    local nkeys = n + 2 * m + caps
    local grant = argv[1] == 'b'
    local extra = 4 * caps + (grant and 2 or 0)
    if #argv ~= ci + extra or #keys ~= nkeys or (grant and caps > 0) then
      error({ tollgate = 'wrong number of arguments' })
    end
    local want, lend = 0, 0
    if grant then
      want = int(argv[ci + 1], 0, 2 ^ 53 - 1, 'want')
      lend = int(argv[ci + 2], 0, 2 ^ 53 - 1, 'lend')
    end
    local now_s, now_ns = clock(int)
    -- Made with room for a throttle, a quota and a cap: Redis reads the
    -- reply up to its first nil.
    local reply = { now_s, now_ns, 1, nil, nil, nil, nil, nil, nil }
    local k = 3 + n -- its length
    local allowed = true
    -- Per throttle i, at 5i-4 .. 5i: its span, the TAT ahead to store if
    -- charged, and if not (a conversion); false where nothing is stored;
    -- since when its numbers hold.
    local plans = { false, false, false, false, false } -- room for one throttle
    local ties = { 0 }
    -- Per throttle whose key holds newer numbers than the call's: its TAT
    -- ahead of now (at least 0), that told in the call's span, and the
    -- key's numbers (span, since, tie).
    local keyed = {}
    local steps = grant and {} -- per throttle, ns one unit of the request takes
    for i = 1, n do
      local j = 7 * i - 1
      local interval = int(argv[j], 1, 2 ^ 53 - 1, 'interval')
      local burst = int(argv[j + 1], 1, 2 ^ 53 - 1, 'burst')
      local shadow = int(argv[j + 2], 0, 1, 'shadow flag') == 1
      local since_s = int(argv[j + 3], 0, 2 ^ 40, 'since')
      local since_ns = int(argv[j + 4], 0, 1e9 - 1, 'since')
      local cost_i = int(argv[j + 5], 0, 2 ^ 53 - 1, 'cost')
      local tol = interval * burst -- exact if below 2^53, else at least 2^53
      if tol >= 2 ^ 53 then
        error({ tollgate = 'throttle span of 2^53 ns or more' })
      end
      local earlier = argv[j + 6]
      local tie = 0
      if earlier ~= '' then
        tie = string.match(earlier, '^%d+')
        tie = tie and tie + 0
        if not tie or tie >= 2 ^ 53 then
          error({ tollgate = 'bad earlier spans' })
        end
      end
      local before, old, tat_s, tat_ns, vs, vns, vt = load(keys[i], now_s, now_ns)
      local convert = false
      if before and vs and (vs > since_s or vs == since_s
          and (vns > since_ns or vns == since_ns and vt > tie)) then
        -- The key's numbers are newer than the caller's (an instance yet
        -- to learn of a change): it is never converted back to them. The
        -- request is decided on the key's share in use, told in the
        -- caller's span (rounded up: never more room than the key has),
        -- and what it charges is converted to the key's span as the
        -- bucket's share (see "Key newer than the call").
        local ahead = math.max(before, 0)
        local told, rem = scale(ahead, tol, old)
        if rem > 0 then
          told = told + 1
        end
        keyed[i] = { ahead, told, old, vs, vns, vt }
        before = told
      elseif before and (old ~= tol or vs and (vs ~= since_s or vns ~= since_ns or vt ~= tie)) then
        local found, ahead = false, nil
        if vs and earlier ~= '' then
          found, ahead = replay(
            earlier, old, vs, vns, vt, tol, since_s, since_ns, tat_s, tat_ns, now_s, now_ns
          )
        end
        if found then
          before, convert = ahead, ahead or false
        elseif old ~= tol then
          before = rescale(before, old, tol, tat_s, tat_ns, since_s, since_ns, now_s, now_ns)
          convert = before or false
        end
      end
      if not before or before < 0 then
        before = 0
      end
      reply[3 + i] = before
      -- cost <= burst, so cost * interval <= tol < 2^53: exact.
      local charge = false
      if cost_i <= burst and before + cost_i * interval <= tol then
        charge = cost_i > 0 and before + cost_i * interval
      elseif not shadow then
        allowed = false
      end
      local p = 5 * i
      plans[p - 4], plans[p - 3], plans[p - 2], plans[p - 1], plans[p] =
        tol, charge, convert, since_s, since_ns
      ties[i] = tie
      if grant then
        steps[i] = cost_i * interval
      end
    end
    local spec, roll, save, qs
    if m > 0 then
      spec, roll, save = quotas(int)
      qs = {}
    end
    for i = 1, m do
      local j = qi + 1 + 9 * (i - 1)
      local limit, period, week_start, offset, created = spec(j)
      local shadow = int(argv[j + 5], 0, 1, 'quota shadow flag') == 1
      local days = int(argv[j + 6], 1, 100000, 'history days')
      local cost_q = int(argv[j + 7], 0, 2 ^ 53 - 1, 'cost')
      int(argv[j + 8], 0, 1, 'quota tokens flag')
      local today, w, used, start, stop, limit_in =
        roll(keys[n + 2 * i - 1], now_s, limit, period, week_start, offset, created)
      k = k + 4
      reply[k - 3], reply[k - 2], reply[k - 1], reply[k] = start, stop, limit_in, used
      if used + cost_q > limit_in and not shadow then
        allowed = false
      end
      qs[i] = { w, used, stop, today, days, cost_q, limit_in }
    end
    local now_ms
    if caps > 0 then
      -- Leases of requests in flight; one past its time was held by an
      -- instance that died or lost track of it.
      now_ms = now_s * 1000 + (now_ns - now_ns % 1000000) / 1000000
    end
    for i = 1, caps do
      local j = ci + 4 * (i - 1)
      local cap = int(argv[j + 1], 1, 2 ^ 53 - 1, 'concurrency cap')
      int(argv[j + 2], 1, 2 ^ 53 - 1, 'lease')
      local shadow = int(argv[j + 4], 0, 1, 'concurrency shadow flag') == 1
      local key = keys[n + 2 * m + i]
      redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now_ms))
      local in_flight = redis.call('ZCARD', key)
      k = k + 1
      reply[k] = in_flight
      if in_flight >= cap and not shadow then
        allowed = false
      end
    end
    -- Conversions are stored whatever the verdict; charges only when allowed
    -- (and never by a peek).
    local charging = allowed and argv[1] ~= 'p'
    local g = 0
    if charging and (want > 0 or lend > 0) then
      -- How many more units fit in every limit after this one.
      local fit = 2 ^ 53
      for i = 1, n do
        if steps[i] > 0 then
          local charge = plans[5 * i - 3]
          if charge then
            local more = (plans[5 * i - 4] - charge - (plans[5 * i - 4] - charge) % steps[i]) / steps[i]
            fit = math.min(fit, more)
          else
            fit = 0
          end
        end
      end
      for i = 1, m do
        local q = qs[i]
        local cost_q = q[6]
        if cost_q > 0 then
          local room = math.max(q[7] - q[2] - cost_q, 0)
          fit = math.min(fit, (room - room % cost_q) / cost_q)
        end
      end
      g = math.min(want, fit)
      local rest = fit - g
      g = g + math.min(lend, (rest - rest % 4) / 4)
      if g > 0 then
        for i = 1, n do
          if plans[5 * i - 3] then
            plans[5 * i - 3] = plans[5 * i - 3] + g * steps[i]
          end
        end
        for i = 1, m do
          qs[i][6] = qs[i][6] * (1 + g)
        end
      end
    end
    if charging and cost > 0 then
      for i = 1, caps do
        local j = ci + 4 * (i - 1)
        local key = keys[n + 2 * m + i]
        local lease = int(argv[j + 2], 1, 2 ^ 53 - 1, 'lease')
        redis.call('ZADD', key, string.format('%d', now_ms + lease), argv[j + 3])
        -- lease_ms as written, or a day on a given time (see "Lifetimes")
        redis.call('PEXPIRE', key, (argv[2] ~= '' and lease < 86400000) and '86400000' or argv[j + 2])
      end
    end
    for i = 1, n do
      local p = 5 * i
      local ahead = charging and plans[p - 3] or plans[p - 2]
      local k_i = keyed[i]
      if ahead and k_i then
        -- Charged in the key's span, under its numbers.
        local own, told, span = k_i[1], k_i[2], k_i[3]
        local add = scale(ahead - told, span, plans[p - 4])
        store(keys[i], math.min(own + add, 2 ^ 53 - 1), span, k_i[4], k_i[5], k_i[6], now_s, now_ns)
      elseif ahead then
        store(keys[i], ahead, plans[p - 4], plans[p - 1], plans[p], ties[i], now_s, now_ns)
      end
    end
    if not allowed then
      reply[3] = 0
    elseif charging then
      for i = 1, m do
        local q = qs[i]
        local cost_q, limit_in = q[6], q[7]
        local used = q[2] + cost_q
        if used > 2 ^ 53 then
          used = 2 ^ 53 -- a shadow's overage saturates
        end
        q[2] = used
        -- The cost as the caller wrote it (checked by int), or with the
        -- units granted beside it.
        local add = cost_q > 0 and argv[qi + 8 + 9 * (i - 1)] or nil
        if add and g > 0 then
          add = string.format('%d', cost_q)
        end
        -- A quota charged nothing (a peek, a request that costs a token
        -- budget nothing) is left as it is, as the memory store leaves it:
        -- no count made, no day's record written (a record of nothing used
        -- would stand for the day in a report, under the limit then).
        if cost_q > 0 then
          save(q, keys[n + 2 * i - 1], keys[n + 2 * i], add, limit_in - used, now_s, now_ns)
        end
      end
    end
    if grant then
      reply[k + 1] = g
    end
    return reply
  end
end

-- "r" refund.
if mode == 'r' then
  run = function(int, clock, load, store, rescale, _, replay)
    int(ARGV[4], 0, 2 ^ 53 - 1, 'cost')
    local n = int(ARGV[5], 0, #KEYS, 'throttle count')
    -- The numbers each throttle's charge was made under and those in
    -- force, after the charge time, when the caller knows them.
    local numbered = #ARGV == 7 + 13 * n
    if (#ARGV ~= 7 + 5 * n and not numbered) or #KEYS ~= 2 * n then
      error({ tollgate = 'wrong number of arguments' })
    end
    local charged_s = int(ARGV[6 + 5 * n], 0, 2 ^ 40, 'charge time')
    local charged_ns = int(ARGV[7 + 5 * n], 0, 1e9 - 1, 'charge time')
    local now_s, now_ns = clock(int)
    local plan = {}
    for i = 1, n do
      local j = 1 + 5 * i
      local interval = int(ARGV[j], 1, 2 ^ 53 - 1, 'interval')
      local burst = int(ARGV[j + 1], 1, 2 ^ 53 - 1, 'burst')
      local mine_s = int(ARGV[j + 2], 0, 2 ^ 40, 'own TAT')
      local mine_ns = int(ARGV[j + 3], 0, 1e9 - 1, 'own TAT')
      local cost = int(ARGV[j + 4], 0, 2 ^ 53 - 1, 'cost')
      if interval * burst >= 2 ^ 53 then
        error({ tollgate = 'throttle span of 2^53 ns or more' })
      end
      plan[i] = { interval, burst, mine_s, mine_ns, cost }
      if numbered then
        local k = 8 + 5 * n + 8 * (i - 1)
        local c_interval = int(ARGV[k + 3], 1, 2 ^ 53 - 1, 'interval')
        local c_burst = int(ARGV[k + 4], 1, 2 ^ 53 - 1, 'burst')
        if c_interval * c_burst >= 2 ^ 53 then
          error({ tollgate = 'throttle span of 2^53 ns or more' })
        end
        plan[i][6] = {
          int(ARGV[k], 0, 2 ^ 40, 'since'), int(ARGV[k + 1], 0, 1e9 - 1, 'since'),
          int(ARGV[k + 2], 0, 2 ^ 53 - 1, 'tie'), c_interval * c_burst,
          int(ARGV[k + 5], 0, 2 ^ 40, 'since'), int(ARGV[k + 6], 0, 1e9 - 1, 'since'),
          ARGV[k + 7],
        }
      end
    end
    for i = 1, n do
      local interval, burst, mine_s, mine_ns, cost, numbers = unpack(plan[i])
      local ahead, tol, vs, vns, vt, give, _
      if numbers then
        -- Converted to the numbers in force first (see `converted`).
        local ss, sns, st, tol_c, cs, cns, before_c = unpack(numbers)
        local ends
        ahead, give, ends, tol, vs, vns, vt = converted(load, rescale, replay, KEYS[i],
          now_s, now_ns, interval * burst, ss, sns, st, tol_c, cs, cns, before_c,
          math.min(cost * interval, 2 ^ 53 - 1), mine_s, mine_ns)
        give = math.min(give, math.max(ends or 0, 0))
      else
        ahead, tol, _, _, vs, vns, vt = load(KEYS[i], now_s, now_ns)
        -- give = min(cost * interval, max(mine - now, 0)); nothing across
        -- a change of span.
        local mine = (mine_s - now_s) * 1e9 + (mine_ns - now_ns)
        give = math.min(cost * interval, math.max(mine, 0))
        if tol ~= interval * burst then
          ahead = nil
        end
      end
      -- Nothing to give back to a full bucket.
      local give_back = ahead and ahead > 0
      if give_back then
        -- Nor to a bucket reset after the charge (read only when there is
        -- something to give).
        local x = redis.call('GET', KEYS[n + i])
        if x then
          local xs, xns = string.match(x, '^(%d+) (%d+)$')
          if not xs then
            error({ tollgate = 'bad throttle state' })
          end
          xs, xns = xs + 0, xns + 0
          give_back = charged_s > xs or charged_s == xs and charged_ns >= xns
        end
      end
      if give_back then
        -- The TAT moves back by it, but not below now.
        store(KEYS[i], ahead - give, tol, vs, vns, vt, now_s, now_ns)
      end
    end
    return { now_s, now_ns }
  end
end

-- "t" settle, "g" give back.
if mode == 't' or mode == 'g' then
  run = function(int, clock, load, store, rescale, quotas, replay)
    local exact = ARGV[1] == 'g'
    local delta = int(ARGV[4], 1 - 2 ^ 53, exact and 0 or 2 ^ 53 - 1, 'delta')
    local n = int(ARGV[5], 0, exact and 0 or 1, 'throttle count')
    local qi = 6 + 10 * n
    if #ARGV < qi then
      error({ tollgate = 'wrong number of arguments' })
    end
    -- A settlement ("t") charges at most a request's two token quotas; a
    -- give-back ("g") of a borrowed share, every quota its call charged:
    -- an account's, the plan's and a model's, each a request quota and a
    -- day's and a month's tokens, as many as "a" takes (nine: one beyond
    -- what "g" took made every such give-back an error, so that the units
    -- stayed charged).
    local m = int(ARGV[qi], 0, exact and 9 or 2, 'quota count')
    local tail = #ARGV - (qi + 6 * m)
    if (tail ~= 2 and (exact or (tail ~= 0 and tail ~= 3)))
      or #KEYS ~= n + 2 * m then
      error({ tollgate = 'wrong number of arguments' })
    end
    local charged_day, charged_s, charged_ns = nil, nil, nil
    -- Owed ("o" after the time): units a local copy admitted on its own.
    local owed = tail == 3
    if owed and ARGV[#ARGV] ~= 'o' then
      error({ tollgate = 'wrong number of arguments' })
    end
    if tail >= 2 then
      charged_s = int(ARGV[qi + 6 * m + 1], -2 ^ 40, 2 ^ 40, 'charge time')
      charged_ns = int(ARGV[qi + 6 * m + 2], 0, 1e9 - 1, 'charge time')
      charged_day = (charged_s - charged_s % 86400) / 86400
    end
    local now_s, now_ns = clock(int)
    local spec, roll, save = quotas(int)
    local throttles, qs = {}, {}
    for i = 1, n do
      local j = 6 + 10 * (i - 1)
      local interval = int(ARGV[j], 1, 2 ^ 53 - 1, 'interval')
      local burst = int(ARGV[j + 1], 1, 2 ^ 53 - 1, 'burst')
      local c_interval = int(ARGV[j + 5], 1, 2 ^ 53 - 1, 'interval')
      local c_burst = int(ARGV[j + 6], 1, 2 ^ 53 - 1, 'burst')
      if interval * burst >= 2 ^ 53 or c_interval * c_burst >= 2 ^ 53 then
        error({ tollgate = 'throttle span of 2^53 ns or more' })
      end
      throttles[i] = {
        interval, interval * burst,
        int(ARGV[j + 2], 0, 2 ^ 40, 'since'), int(ARGV[j + 3], 0, 1e9 - 1, 'since'),
        int(ARGV[j + 4], 0, 2 ^ 53 - 1, 'tie'), c_interval * c_burst,
        int(ARGV[j + 7], 0, 2 ^ 40, 'since'), int(ARGV[j + 8], 0, 1e9 - 1, 'since'),
        ARGV[j + 9],
      }
    end
    for i = 1, m do
      local j = qi + 1 + 6 * (i - 1)
      qs[i] = { spec(j) }
      qs[i][6] = int(ARGV[j + 5], 1, 100000, 'history days')
    end
    for i = 1, n do
      local interval, tol_s, ss, sns, st, tol_c, cs, cns, before_c = unpack(throttles[i])
      -- Converted to the numbers in force first (see `converted`): the key
      -- and the settlement's share.
      local ahead, shift, _, tol, vs, vns, vt = converted(load, rescale, replay, KEYS[i],
        now_s, now_ns, tol_s, ss, sns, st, tol_c, cs, cns, before_c,
        math.min(math.abs(delta) * interval, 2 ^ 53 - 1), nil, nil)
      ahead = math.max(ahead or 0, 0)
      if delta > 0 then
        store(KEYS[i], math.min(ahead + shift, 2 ^ 53 - 1), tol, vs, vns, vt, now_s, now_ns)
      elseif ahead > 0 then
        store(KEYS[i], math.max(ahead - shift, 0), tol, vs, vns, vt, now_s, now_ns)
      end
    end
    for i = 1, m do
      local key, hist = KEYS[n + 2 * i - 1], KEYS[n + 2 * i]
      local p = qs[i]
      local kept = not exact or redis.call('HEXISTS', key, 'w') == 1
      if kept and charged_s and (delta < 0 or owed) then
        -- Reset or set (UpdateUsage) after the charge, or made after it
        -- (the count that held it lost): the count does not hold it. A
        -- charge ("t", delta > 0, with the time the local copy admitted
        -- the units) is not counted after a reset or set since; a count
        -- made since (data lost) takes it.
        local marks = redis.call('HMGET', key, 'x', 'b')
        for j = 1, delta < 0 and 2 or 1 do
          local x = marks[j]
          if x and kept then
            local xs, xns = string.match(x, '^(%-?%d+) (%d+)$')
            if not xs then
              error({ tollgate = 'bad quota state' })
            end
            xs, xns = xs + 0, xns + 0
            kept = charged_s > xs or charged_s == xs and charged_ns >= xns
          end
        end
      end
      local today, w, before, start, stop, limit_in = roll(key, now_s, unpack(p, 1, 5))
      if kept and ((delta >= 0 and not owed) or not charged_day or charged_day >= start) then
        local used
        if exact then
          used = math.max(before + delta, -2 ^ 53)
        else
          used = math.min(math.max(before + delta, 0), 2 ^ 53)
        end
        save({ w, used, stop, today, p[6] }, key, hist, nil, limit_in - used, now_s, now_ns)
        if used ~= before then
          local fmt = string.format
          -- A refund comes off the day that was charged, while the history
          -- still holds it (and adds to what remained at that day's end).
          local day = today
          if (delta < 0 or owed) and charged_day and charged_day ~= today
            and redis.call('HEXISTS', hist, fmt('u:%d', charged_day)) == 1 then
            day = charged_day
          end
          redis.call('HINCRBY', hist, fmt('u:%d', day), fmt('%d', used - before))
          if day ~= today and redis.call('HEXISTS', hist, fmt('r:%d', day)) == 1 then
            redis.call('HINCRBY', hist, fmt('r:%d', day), fmt('%d', before - used))
          end
        end
      elseif kept and exact and delta < 0 then
        -- Given back ("g") after the window that charged it ended: the new
        -- window's count gets nothing, but the day that was charged counts
        -- only what was admitted (a share's unused units were not), while
        -- the history still holds it: they come off its use and add to
        -- what remained at its end.
        local fmt = string.format
        local u, r = fmt('u:%d', charged_day), fmt('r:%d', charged_day)
        if redis.call('HEXISTS', hist, u) == 1 then
          redis.call('HINCRBY', hist, u, fmt('%d', delta))
          if redis.call('HEXISTS', hist, r) == 1 then
            redis.call('HINCRBY', hist, r, fmt('%d', -delta))
          end
        end
      end
    end
    return { now_s, now_ns }
  end
end

-- The mark a reset ("z") or a set ("s") leaves on a quota (field `x`):
-- what was charged before it is not counted any more, so a refund or
-- give-back of such a charge ("t", "g") gets nothing. Never earlier than a
-- mark before it, as the memory store keeps its latest: on a clock that
-- went back, a charge made between that mark and this one's earlier time
-- was forgiven by it, and marked with this time alone a refund of it would
-- count again. Made only for those two modes.
local latest_mark = nil
if mode == 's' or mode == 'z' then
  latest_mark = function(key, now_s, now_ns)
    local x_s, x_ns = now_s, now_ns
    local old = redis.call('HGET', key, 'x')
    if old then
      local s, ns = string.match(old, '^(%-?%d+) (%d+)$')
      if not s then
        error({ tollgate = 'bad quota state' })
      end
      s, ns = s + 0, ns + 0
      if s > x_s or s == x_s and ns > x_ns then
        x_s, x_ns = s, ns
      end
    end
    return x_s, x_ns
  end
end

-- "s" set what remains of the quota.
if mode == 's' then
  run = function(int, clock, _, _, _, quotas)
    if #ARGV ~= 10 or #KEYS ~= 2 then
      error({ tollgate = 'wrong number of arguments' })
    end
    local remaining = int(ARGV[4], 0, 2 ^ 53, 'remaining')
    local spec, roll, save = quotas(int)
    local limit, period, week_start, offset, created = spec(5)
    local days = int(ARGV[10], 1, 100000, 'history days')
    local now_s, now_ns = clock(int)
    local today, w, _, start, stop, limit_in =
      roll(KEYS[1], now_s, limit, period, week_start, offset, created)
    local used = limit_in - remaining
    if used < -2 ^ 53 then
      error({ tollgate = 'remaining out of range' })
    end
    save({ w, used, stop, today, days }, KEYS[1], KEYS[2], nil, remaining, now_s, now_ns)
    -- What remains is what was set: units charged before it (a share
    -- another instance still holds, a late settlement) are counted in it,
    -- and given back later they would raise it past what was set.
    local x_s, x_ns = latest_mark(KEYS[1], now_s, now_ns)
    redis.call('HSET', KEYS[1], 'x', string.format('%d %d', x_s, x_ns))
    return { now_s, now_ns, start, stop, limit_in, used }
  end
end

-- "k" log a quota's numbers before a change.
if mode == 'k' then
  run = function(int, clock)
    if #ARGV ~= 9 or #KEYS ~= 1 then
      error({ tollgate = 'wrong number of arguments' })
    end
    local limit = int(ARGV[4], 0, 2 ^ 53, 'limit')
    local offset = int(ARGV[5], 0, 2 ^ 53, 'offset')
    local created = int(ARGV[6], 1 - 2 ^ 53, 2 ^ 53 - 1, 'creation time')
    local days = int(ARGV[7], 1, 100000, 'history days')
    local period = ARGV[8]
    local week_start = int(ARGV[9], 0, 6, 'week start')
    if period ~= 'D' and period ~= 'W' and period ~= 'M' then
      error({ tollgate = 'bad period' })
    end
    local now_s, now_ns = clock(int)
    local today = (now_s - now_s % 86400) / 86400
    local fmt, key = string.format, KEYS[1]
    local entry = fmt('%d %d %d %s %d', limit, offset, created, period, week_start)
    if redis.call('HSETNX', key, fmt('%d', today), entry) == 1 then
      -- A day no report reads any more (its records are out of the
      -- history and the month kept past it) is dropped, once a day.
      local cut = today - days - 32
      for _, f in ipairs(redis.call('HKEYS', key)) do
        local d = tonumber(string.match(f, '^(%-?%d+)$'))
        if not d or d < cut then
          redis.call('HDEL', key, f)
        end
      end
    end
    redis.call('PEXPIRE', key, fmt('%d', (days + 33) * 86400000))
    return { now_s, now_ns }
  end
end

-- "z" reset a quota.
if mode == 'z' then
  run = function(int, clock, _, _, _, quotas)
    if #ARGV ~= 8 or #KEYS ~= 2 then
      error({ tollgate = 'wrong number of arguments' })
    end
    local spec, roll = quotas(int)
    local limit, period, week_start, offset, created = spec(4)
    local now_s, now_ns = clock(int)
    local x_s, x_ns = latest_mark(KEYS[1], now_s, now_ns)
    redis.call('DEL', KEYS[1], KEYS[2])
    -- The window of now, as a fresh count has it: the mark lasts as a
    -- count written now would.
    local _, _, _, _, stop = roll(KEYS[1], now_s, limit, period, week_start, offset, created)
    local fmt = string.format
    redis.call('HSET', KEYS[1], 'x', fmt('%d %d', x_s, x_ns))
    local ms = (stop + 1 - (now_s - now_s % 86400) / 86400) * 86400000
      - now_s % 86400 * 1000 - (now_ns - now_ns % 1000000) / 1000000
    redis.call('PEXPIRE', KEYS[1], fmt('%d', ms > 1 and ms or 1))
    return { now_s, now_ns }
  end
end

-- "l" renew leases.
if mode == 'l' then
  run = function(int, clock)
    if #ARGV < 5 or #KEYS ~= 1 then
      error({ tollgate = 'wrong number of arguments' })
    end
    local lease = int(ARGV[4], 1, 2 ^ 53 - 1, 'lease')
    local now_s, now_ns = clock(int)
    local fmt, key = string.format, KEYS[1]
    local until_ms = fmt('%d', now_s * 1000 + (now_ns - now_ns % 1000000) / 1000000 + lease)
    local held = 0
    for i = 5, #ARGV do
      -- XX: only a member still there; GT: never sooner than it was.
      redis.call('ZADD', key, 'XX', 'GT', until_ms, ARGV[i])
      if redis.call('ZSCORE', key, ARGV[i]) then
        held = held + 1
      end
    end
    if held > 0 then
      -- A day at least on a given time (see "Lifetimes").
      local life = (ARGV[2] ~= '' and lease < 86400000) and 86400000 or lease
      redis.call('PEXPIRE', key, fmt('%d', life), 'GT')
    end
    return { now_s, now_ns, held }
  end
end

-- "f" fill a throttle.
if mode == 'f' then
  run = function(int, clock)
    if #ARGV ~= 5 or #KEYS ~= 2 then
      error({ tollgate = 'wrong number of arguments' })
    end
    local interval = int(ARGV[4], 1, 2 ^ 53 - 1, 'interval')
    local burst = int(ARGV[5], 1, 2 ^ 53 - 1, 'burst')
    local span = interval * burst
    if span >= 2 ^ 53 then
      error({ tollgate = 'throttle span of 2^53 ns or more' })
    end
    local now_s, now_ns = clock(int)
    redis.call('DEL', KEYS[1])
    -- A later mark stays (a clock gone back does not make charges
    -- forgiven then come back).
    local s, ns = now_s, now_ns
    local x = redis.call('GET', KEYS[2])
    if x then
      local xs, xns = string.match(x, '^(%d+) (%d+)$')
      if xs then
        xs, xns = xs + 0, xns + 0
        if xs > s or xs == s and xns > ns then
          s, ns = xs, xns
        end
      end
    end
    -- The span in ms, rounded up (math.fmod: exact for any span here).
    local sub = math.fmod(span, 1e6)
    local ms = (span - sub) / 1e6 + (sub > 0 and 1 or 0)
    local fmt = string.format
    if ARGV[2] ~= '' and ms < 86400000 then
      ms = 86400000 -- a given time (see "Lifetimes")
    end
    redis.call('SET', KEYS[2], fmt('%d %d', s, ns), 'PX', fmt('%d', ms))
    return { now_s, now_ns }
  end
end

if not run then
  return redis.error_reply('tollgate: unknown mode')
end
local ok, res = pcall(run, int, clock, load, store, rescale, quotas, replay, scale)
if ok then
  return res
elseif type(res) == 'table' and res.tollgate then
  return redis.error_reply('tollgate: ' .. res.tollgate)
end
error(res, 0)
