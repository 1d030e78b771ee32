#!/bin/sh
# Two versions of the decision script side by side on random calls: the same
# replies, errors and stored state, or the first call where they part.
#
#   benches/script_diff.sh OLD.lua [NEW.lua] [host] [port] [batches] [seed]
#
# (defaults: NEW the crate's script.lua, 127.0.0.1, 6379, 20 batches of 500
# calls, seed 1). For example, against the script of a commit:
#
#   git show REV:src/store/redis/script.lua >/tmp/old.lua
#   benches/script_diff.sh /tmp/old.lua
#
# A run that finds a difference prints the call, both replies and states,
# and START_MS; START_MS=<that> with the same seed replays it.
#
# Each batch is one EVAL holding both scripts as functions of (KEYS, ARGV).
# It draws calls of every mode (acquire, peek, refund, settle, set
# remaining) with throttles whose numbers change, quotas of every period,
# caps, times that jump ahead and go back, a bad argument now and then, a
# wrong count of arguments or keys, and throttle or quota state that is not
# the script's; it runs each call on keys of its own per script
# ("tollgate-diff:a:*" and "tollgate-diff:b:*") and compares the replies (an
# error by its message) and then every key: type, value, and expiry (set on
# Redis's running clock, so compared to the milliseconds between the two
# calls). Within one EVAL no key lapses, so both sides see the same keys.
# The keys are deleted at the end.
set -eu

old=$1
dir=$(dirname "$0")
new=${2:-$dir/../src/store/redis/script.lua}
host=${3:-127.0.0.1}
port=${4:-6379}
batches=${5:-20}
seed=${6:-1}
cli() { redis-cli -h "$host" -p "$port" "$@"; }

prog=$(mktemp)
trap 'rm -f "$prog"' EXIT
{
    echo "local function old_script(KEYS, ARGV)"
    cat "$old"
    echo "end"
    echo "local function new_script(KEYS, ARGV)"
    cat "$new"
    echo "end"
    cat <<'EOF'
-- ARGV: seed, calls, now (ms).
math.randomseed(tonumber(ARGV[1]))
local calls, now_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local S = 1000000000
local suffixes = { 't1', 't2', 'q1', 'h1', 'q2', 'h2', 'c' }
local junk = { '', 'x', '01', '1e3', '-1', '-0', '9007199254740993', '9007199254740992', '1.5',
  ' 1', '+1', '0x10', '2', '7', '99999999999999999999', 'D', 'W', 'M', 'Y', '1000000000', '0',
  '1', 'inf', 'nan' }
local function pick(t)
  return t[math.random(#t)]
end
local function throttle()
  return { pick({ S, S / 10, S / 1000, 3 * S, 333333333, 1234567891 }), pick({ 1, 2, 3, 5, 10 }) }
end
local function quota()
  return { limit = pick({ 0, 1, 2, 5, 10, 20 }), period = pick({ 'D', 'D', 'W', 'W', 'M' }),
    week_start = math.random(0, 6), offset = pick({ 0, 0, 1, 3 }),
    created = math.floor(now_ms / 1000) - math.random(0, 40 * 86400), days = pick({ 1, 2, 3, 31 }) }
end
local function qargs(q, t)
  for _, v in ipairs({ q.limit, q.period, q.week_start, q.offset, q.created }) do
    t[#t + 1] = v
  end
end
local th, qs = { throttle(), throttle() }, { quota(), quota() }

-- A reply as a string, errors (a table or a raised error) by message.
local function show(ok, r)
  if not ok then
    return 'raised ' .. tostring(type(r) == 'table' and r.err or r)
  elseif type(r) == 'table' then
    if r.err then
      return 'error ' .. r.err
    end
    local out = {}
    for i = 1, #r do
      out[i] = tostring(r[i])
    end
    return table.concat(out, ' ')
  end
  return tostring(r)
end
-- Every key of one side: type and value, and apart its expiry (unix ms).
local function state(prefix)
  local out, expiry = {}, {}
  for _, k in ipairs(suffixes) do
    local key = prefix .. k
    local t = redis.call('TYPE', key).ok
    local v = ''
    if t == 'string' then
      v = redis.call('GET', key)
    elseif t == 'hash' then
      local h = redis.call('HGETALL', key)
      local fields = {}
      for i = 1, #h, 2 do
        fields[#fields + 1] = h[i] .. '=' .. h[i + 1]
      end
      table.sort(fields)
      v = table.concat(fields, ',')
    elseif t == 'zset' then
      v = table.concat(redis.call('ZRANGE', key, 0, -1, 'WITHSCORES'), ',')
    end
    out[#out + 1] = k .. ':' .. t .. ':' .. v
    expiry[#expiry + 1] = redis.call('PEXPIRETIME', key)
  end
  return table.concat(out, ' | '), expiry
end
-- A TTL is set on Redis's running clock, so the same TTL set by the two
-- calls (the old first) expires on the new side later by 0 up to the
-- milliseconds from the old call's start to the new call's end. A key whose
-- expiry neither call changed was checked when it was set.
local function millis()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function same_expiry(a, b, last_a, last_b, lo, hi)
  for i = 1, #a do
    if a[i] < 0 or b[i] < 0 then
      if a[i] ~= b[i] then
        return false
      end
    elseif (a[i] ~= last_a[i] or b[i] ~= last_b[i]) and (b[i] - a[i] < lo or b[i] - a[i] > hi) then
      return false
    end
  end
  return true
end
-- Between two batches the clock runs: a key about to lapse may be gone on
-- one side only (the new side's expiries are a little later), so such keys
-- go on both.
for _, k in ipairs(suffixes) do
  local a, b = 'tollgate-diff:a:' .. k, 'tollgate-diff:b:' .. k
  local ta, tb = redis.call('PTTL', a), redis.call('PTTL', b)
  local soon = ta >= 0 and ta < 1000 or tb >= 0 and tb < 1000
  if soon and (ta >= 0 or ta == -2) and (tb >= 0 or tb == -2) then
    redis.call('DEL', a, b)
  end
end
local _, last_a = state('tollgate-diff:a:')
local _, last_b = state('tollgate-diff:b:')

for step = 1, calls do
  now_ms = now_ms + pick({ 0, 1, 10, 100, 1000, 5000, 60000, 3600000, 86400000, -500, -86400000 })
  if math.random() < 0.05 then
    th[math.random(2)] = throttle()
  end
  if math.random() < 0.05 then
    qs[math.random(2)] = quota()
  end
  local now_s = math.floor(now_ms / 1000)
  local now_ns = now_ms % 1000 * 1000000 + pick({ 0, 0, 1, 999999 })
  local mode = pick({ 'a', 'a', 'a', 'a', 'a', 'p', 'p', 'r', 'r', 't', 't', 's' })
  local keys, args = {}, { mode, now_s, now_ns }
  if mode == 'a' or mode == 'p' then
    local cost = pick({ 0, 1, 1, 2, 3 })
    local n, m = math.random(0, 2), math.random(0, 2)
    args[#args + 1], args[#args + 2] = cost, n
    for i = 1, n do
      local since_s, since_ns = 0, 0
      local r = math.random(3)
      if r == 2 then
        since_s, since_ns = now_s - math.random(0, 100), math.random(0, S - 1)
      elseif r == 3 then
        since_s = now_s + 5
      end
      for _, v in ipairs({ th[i][1], th[i][2], pick({ 0, 0, 0, 1 }), since_s, since_ns,
        pick({ cost, cost, 0, 1 }) }) do
        args[#args + 1] = v
      end
      keys[#keys + 1] = 't' .. i
    end
    args[#args + 1] = m
    for i = 1, m do
      qargs(qs[i], args)
      for _, v in ipairs({ pick({ 0, 0, 1 }), qs[i].days, pick({ cost, cost, 0, 5 }), pick({ 0, 1 }) }) do
        args[#args + 1] = v
      end
      keys[#keys + 1], keys[#keys + 2] = 'q' .. i, 'h' .. i
    end
    if math.random() < 0.3 then
      for _, v in ipairs({ 1, math.random(1, 3), pick({ 50, 5000 }), pick({ 'm1', 'm2', 'm3', 'm4' }),
        pick({ 0, 0, 1 }) }) do
        args[#args + 1] = v
      end
      keys[#keys + 1] = 'c'
    else
      args[#args + 1] = 0
    end
  elseif mode == 'r' then
    local n = math.random(0, 2)
    args[#args + 1], args[#args + 2] = pick({ 1, 2 }), n
    for i = 1, n do
      local iv = th[i][1]
      local mine = now_ms * 1000000 + pick({ 0, iv, 2 * iv, -iv, 5 * iv })
      for _, v in ipairs({ iv, th[i][2], math.floor(mine / S), mine % S, pick({ 1, 2, 5 }) }) do
        args[#args + 1] = v
      end
      keys[#keys + 1] = 't' .. i
    end
  elseif mode == 't' then
    local n, m = math.random(0, 1), math.random(0, 2)
    args[#args + 1], args[#args + 2] = pick({ -5, -1, 1, 3, 1000 }), n
    for i = 1, n do
      args[#args + 1], args[#args + 2] = th[i][1], th[i][2]
      keys[#keys + 1] = 't' .. i
    end
    args[#args + 1] = m
    for i = 1, m do
      qargs(qs[i], args)
      args[#args + 1] = qs[i].days
      keys[#keys + 1], keys[#keys + 2] = 'q' .. i, 'h' .. i
    end
    if math.random() < 0.5 then
      args[#args + 1] = math.floor(now_ms / 86400000) - pick({ 0, 1, 8, 40 })
    end
  else
    args[#args + 1] = pick({ 0, 1, 5, 30 })
    qargs(qs[1], args)
    args[#args + 1] = qs[1].days
    keys = { 'q1', 'h1' }
  end
  for i = 1, #args do
    args[i] = string.format(type(args[i]) == 'number' and '%d' or '%s', args[i])
  end
  if math.random() < 0.08 then
    args[math.random(#args)] = pick(junk)
  end
  if math.random() < 0.02 then
    if math.random() < 0.5 then
      args[#args] = nil
    else
      args[#args + 1] = '0'
    end
  end
  if math.random() < 0.01 and #keys > 0 then
    keys[#keys] = nil
  end
  if math.random() < 0.01 then
    -- State that is not the script's, alike on both sides.
    local v = pick({ 'garbage', '1 2', '5 0 0', '1e3 0 5' })
    local throttle_state = math.random() < 0.5
    for _, p in ipairs({ 'tollgate-diff:a:', 'tollgate-diff:b:' }) do
      if throttle_state then
        redis.call('SET', p .. 't1', v)
      else
        redis.call('HSET', p .. 'q1', 'w', string.match(v, '^%S+'), 'n', '1')
      end
    end
  end
  local ka, kb = {}, {}
  for i, k in ipairs(keys) do
    ka[i], kb[i] = 'tollgate-diff:a:' .. k, 'tollgate-diff:b:' .. k
  end
  local a0 = millis()
  local ra = show(pcall(old_script, ka, args))
  local rb = show(pcall(new_script, kb, args))
  local b1 = millis()
  local sa, ta = state('tollgate-diff:a:')
  local sb, tb = state('tollgate-diff:b:')
  local same = same_expiry(ta, tb, last_a, last_b, 0, b1 - a0)
  last_a, last_b = ta, tb
  if ra ~= rb or sa ~= sb or not same then
    return { 'differ at call ' .. step, 'keys ' .. table.concat(keys, ' '),
      'args ' .. table.concat(args, ' '), 'old: ' .. ra, 'new: ' .. rb, 'old state: ' .. sa,
      'new state: ' .. sb, 'old expiry: ' .. table.concat(ta, ' '),
      'new expiry: ' .. table.concat(tb, ' '), 'calls from ms ' .. a0 .. ' to ' .. b1 }
  end
end
return { 'same', tostring(now_ms) }
EOF
} >"$prog"

now=$(cli TIME | head -n 1)
now_ms=${START_MS:-$((now * 1000))}
start_ms=$now_ms
b=1
while [ "$b" -le "$batches" ]; do
    out=$(cli EVAL "$(cat "$prog")" 0 $((seed * 100000 + b)) 500 "$now_ms")
    if [ "$(echo "$out" | head -n 1)" != same ]; then
        echo "batch $b (seed $seed, START_MS=$start_ms):"
        echo "$out"
        cli --scan --pattern 'tollgate-diff:*' | xargs -r redis-cli -h "$host" -p "$port" DEL >/dev/null
        exit 1
    fi
    now_ms=$(echo "$out" | sed -n 2p)
    b=$((b + 1))
done
cli --scan --pattern 'tollgate-diff:*' | xargs -r redis-cli -h "$host" -p "$port" DEL >/dev/null
echo "same replies and state for $((batches * 500)) calls"
