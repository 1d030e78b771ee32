#!lua
-- The shebang declares the script a write: see the decision script.
-- The key registry in Redis: every write is one call of this script, so
-- checking, writing the records, bumping the version and logging the change
-- happen together or not at all. Every key shares one hash tag, so this holds
-- on Redis Cluster too.
--
-- KEYS: 1 keys (id -> record), 2 values (value hash -> id), 3 plans (name ->
-- text), 4 accounts (name -> text), 5 removed (id -> version of removal),
-- 6 version (counter), 7 log (stream of changes: fields v, c), 8 staged
-- keys and 9 staged values of a large import in progress, 10 the import's
-- token (a string that expires: an import whose writer went away is
-- forgotten).
-- A record is "<32 hex value hash><0|1 enabled><len>:<plan>[<len>:<account>]".
--
-- ARGV[1] = 'h' (head): returns {version, id of the last log entry or '',
-- its version or 0}.
-- ARGV[1] = 'w' (write), or 'W' (the same write sent again after its
-- connection was lost; see the add below): ARGV[2] the log's length bound (MAXLEN ~), ARGV[3]
-- the largest change logged as it is (a larger one is logged as 'R': read
-- everything again), ARGV[4] the change (A add, I import, U update,
-- D remove, P plan, C account), then its fields. Returns {'ok', version} or
-- {reason, id} when the change is refused, with nothing written.
--
-- An update ('U') names only the fields it changes, and they are set on the
-- record Redis holds, here, where no other write can come between the read
-- and the write: ARGV[5] the key's id, ARGV[6] its record as the writing
-- instance holds it ('' when it holds no such key), then pairs of a field
-- and its new value: 'enabled' '0' or '1', 'plan' a name, 'account' ''
-- (none) or '<len>:<name>'. An instance writes what its admin changed, not
-- the whole record as it holds it: that copy may be older than Redis's (a
-- change made through another instance in the last poll has not reached
-- it), and writing it whole would undo that change. The writer's record is
-- used only when Redis holds none (a key of a static configuration,
-- changed for the first time); with neither, the key is unknown. Returns
-- {'ok', version, the record as written}, which the log carries too, so
-- that every instance, the writer included, ends with the merged record.
--
-- A large import is staged in parts, then made live at once: ARGV[4] = 'S'
-- (stage: ARGV[5] the import's token, ARGV[6] its time to live in ms, then
-- id and record pairs; each entry is checked against the live keys and the
-- entries staged before it), 'K' (commit a part: ARGV[5] the token, ARGV[6]
-- an HSCAN cursor of the staged keys, '0' first; up to ARGV[7] staged keys
-- become live; returns {'more', next cursor} until none is left, then bumps
-- the version, logs "read everything again" and returns {'ok', version}) or
-- 'X' (abort: ARGV[5] the token). A registry Redis lost is written back the
-- same way by an instance that holds it: 'E' claims it (ARGV[5] a token,
-- ARGV[6] its time to live in ms; {'claimed'} only when Redis holds no
-- version and nothing is being imported, {'present'} when it holds one,
-- {'busy'} while another claim or import runs), 'T' writes back plans,
-- accounts and tombstones under the claim, 'S' stages the keys and 'K'
-- commits them, with ARGV[9] the version the registry goes on from.
-- While an import is staged or committed,
-- every other write is refused ('busy'), so nothing can clash with it between
-- its checks and its commit. A refused stage forgets the whole import.

local keys, values, plans, accounts, removed, version, log =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local staged, staged_values, importing = KEYS[8], KEYS[9], KEYS[10]

if ARGV[1] == 'h' then
  local top = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  local id, v = '', 0
  if top then
    id = top[1]
    v = tonumber(top[2][2]) or 0
  end
  return {tonumber(redis.call('GET', version) or '0'), id, v}
end

if ARGV[1] ~= 'w' and ARGV[1] ~= 'W' then
  return redis.error_reply('tollgate: unknown registry mode')
end
-- 'W': an add or an import sent again because the connection was lost
-- before its reply; its first run may have been made.
local again = ARGV[1] == 'W'

local bound, largest, op = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function field(s)
  return #s .. ':' .. s
end
local out = {op}
-- What a successful write answers besides its version (an update's record).
local answer

-- The parts of a record: value hash, enabled ('0' or '1'), plan, and the
-- account as the record writes it ('' or '<len>:<name>'); nil when the text
-- is not a record (edited by hand).
local function parse(record)
  local hash, enabled = string.match(record, '^(' .. string.rep('%x', 32) .. ')([01])')
  if not hash then
    return nil
  end
  -- The strings after the flag: the plan, then the account if any.
  local strings, at = {}, 34
  while at <= #record do
    local len = string.match(record, '^(%d+):', at)
    if not len then
      return nil
    end
    local from = at + #len + 1
    at = from + tonumber(len)
    if at - 1 > #record then
      return nil
    end
    strings[#strings + 1] = string.sub(record, from, at - 1)
  end
  if #strings < 1 or #strings > 2 then
    return nil
  end
  local account = ''
  if strings[2] then
    account = field(strings[2])
  end
  return {hash = hash, enabled = enabled, plan = strings[1], account = account}
end

local token = redis.call('GET', importing)
local function forget()
  -- Freed in the background: a large import's staging is 100,000s of fields.
  redis.call('UNLINK', staged, staged_values, importing)
end
-- Calls `f` with up to `n` elements of `list` at a time (Lua's stack bounds
-- how many arguments one call takes).
local function each_part(list, n, f)
  for i = 1, #list, n do
    f(unpack(list, i, math.min(i + n - 1, #list)))
  end
end

if op == 'S' or op == 'K' or op == 'X' or op == 'E' or op == 'T' then
  local mine = ARGV[5]
  if op == 'X' then
    if token == mine then
      forget()
    end
    return {'ok', '0'}
  end
  if op == 'E' then
    -- Claims writing back a registry Redis lost: only when Redis holds no
    -- version (it restarted empty, or was flushed) and nobody else is
    -- writing one back or importing. The claim is the import's token: every
    -- other write is refused as busy until the commit.
    if redis.call('EXISTS', version) == 1 then
      return {'present', ''}
    end
    if token then
      return {'busy', ''}
    end
    forget()
    redis.call('SET', importing, mine, 'PX', ARGV[6])
    return {'claimed', ''}
  end
  if token and token ~= mine then
    return {'busy', ''}
  end
  if op == 'T' then
    -- Writes back plans ('P'), accounts ('C') or tombstones ('D') under the
    -- claim: ARGV[6] which, then name and text (for a tombstone, the id and
    -- the version that removed it).
    if not token then
      return {'expired', ''}
    end
    local into = ({P = plans, C = accounts, D = removed})[ARGV[6]]
    if not into then
      return redis.error_reply('tollgate: unknown registry part')
    end
    redis.call('PEXPIRE', importing, ARGV[7])
    if #ARGV > 7 then
      local list = {}
      for i = 8, #ARGV do
        list[#list + 1] = ARGV[i]
      end
      each_part(list, 4000, function(...) redis.call('HSET', into, ...) end)
    end
    return {'ok', '0'}
  end
  if op == 'S' then
    if not token then
      forget()
    end
    redis.call('SET', importing, mine, 'PX', ARGV[6])
    local ids, hashes = {}, {}
    for i = 7, #ARGV, 2 do
      local id, hash = ARGV[i], string.sub(ARGV[i + 1], 1, 32)
      local refused
      if ids[id] or redis.call('HEXISTS', keys, id) == 1
        or redis.call('HEXISTS', staged, id) == 1 then
        refused = 'duplicate'
      elseif hashes[hash] or redis.call('HEXISTS', values, hash) == 1
        or redis.call('HEXISTS', staged_values, hash) == 1 then
        refused = 'duplicate value'
      end
      if refused then
        forget()
        return {refused, id}
      end
      ids[id] = true
      hashes[hash] = true
    end
    local pairs_, hash_pairs = {}, {}
    for i = 7, #ARGV, 2 do
      local id, record = ARGV[i], ARGV[i + 1]
      pairs_[#pairs_ + 1] = id
      pairs_[#pairs_ + 1] = record
      hash_pairs[#hash_pairs + 1] = string.sub(record, 1, 32)
      hash_pairs[#hash_pairs + 1] = id
    end
    if #pairs_ > 0 then
      each_part(pairs_, 4000, function(...) redis.call('HSET', staged, ...) end)
      each_part(hash_pairs, 4000, function(...) redis.call('HSET', staged_values, ...) end)
    end
    return {'ok', '0'}
  end
  -- Commit, a part at a time: every key was checked when it was staged.
  if not token then
    return {'expired', ''}
  end
  redis.call('PEXPIRE', importing, ARGV[8])
  local scan = redis.call('HSCAN', staged, ARGV[6], 'COUNT', ARGV[7])
  local found = scan[2]
  if #found > 0 then
    local live, hashes, ids = {}, {}, {}
    for i = 1, #found, 2 do
      local id, record = found[i], found[i + 1]
      live[#live + 1] = id
      live[#live + 1] = record
      hashes[#hashes + 1] = string.sub(record, 1, 32)
      hashes[#hashes + 1] = id
      ids[#ids + 1] = id
    end
    each_part(live, 4000, function(...) redis.call('HSET', keys, ...) end)
    each_part(hashes, 4000, function(...) redis.call('HSET', values, ...) end)
    each_part(ids, 4000, function(...) redis.call('HDEL', removed, ...) end)
    each_part(ids, 4000, function(...) redis.call('HDEL', staged, ...) end)
  end
  if scan[1] ~= '0' or redis.call('HLEN', staged) > 0 then
    return {'more', scan[1]}
  end
  forget()
  -- A registry written back goes on from the version its writer held.
  if ARGV[9] and tonumber(redis.call('GET', version) or '0') < tonumber(ARGV[9]) then
    redis.call('SET', version, ARGV[9])
  end
  local v = redis.call('INCR', version)
  redis.call('XADD', log, 'MAXLEN', '~', bound, '*', 'v', v, 'c', 'R')
  return {'ok', tostring(v)}
end

if token then
  return {'busy', ''}
end

if op == 'A' or op == 'I' then
  -- Sent again ('W'): when Redis holds every entry exactly as sent (its id,
  -- the record, and the value hash as that id's), the first run made it,
  -- and the answer is the version as it is now. Otherwise it is checked as
  -- the first run was (one script call: its entries are all there or none).
  if again and #ARGV > 4 then
    local held = true
    for i = 5, #ARGV, 2 do
      local id, record = ARGV[i], ARGV[i + 1]
      if redis.call('HGET', keys, id) ~= record
        or redis.call('HGET', values, string.sub(record, 1, 32)) ~= id then
        held = false
        break
      end
    end
    if held then
      return {'ok', tostring(redis.call('GET', version) or '0')}
    end
  end
  -- Every entry is checked before anything is written: all or nothing.
  local ids, hashes = {}, {}
  for i = 5, #ARGV, 2 do
    local id, hash = ARGV[i], string.sub(ARGV[i + 1], 1, 32)
    if ids[id] or redis.call('HEXISTS', keys, id) == 1 then
      return {'duplicate', id}
    end
    if hashes[hash] or redis.call('HEXISTS', values, hash) == 1 then
      return {'duplicate value', id}
    end
    ids[id] = true
    hashes[hash] = true
  end
  for i = 5, #ARGV, 2 do
    local id, record = ARGV[i], ARGV[i + 1]
    redis.call('HSET', keys, id, record)
    redis.call('HSET', values, string.sub(record, 1, 32), id)
    redis.call('HDEL', removed, id)
    out[#out + 1] = field(id) .. field(record)
  end
elseif op == 'U' then
  local id, held = ARGV[5], ARGV[6]
  -- Checked before anything is written (an error reply undoes nothing).
  for i = 7, #ARGV, 2 do
    local name, value = ARGV[i], ARGV[i + 1]
    if not ((name == 'enabled' and (value == '0' or value == '1'))
      or name == 'plan' or name == 'account') then
      return redis.error_reply('tollgate: a malformed registry update')
    end
  end
  local stored = redis.call('HGET', keys, id)
  local r
  if stored then
    -- The record as Redis holds it, whatever the writer holds: its value
    -- hash never changes, and the fields this update does not name stay
    -- as another instance may just have set them.
    r = parse(stored)
    if not r then
      return {'unreadable', id}
    end
  else
    -- A key only in a static configuration, changed for the first time:
    -- the writer's record is the base. A removed key, or one the writer
    -- does not hold either, is unknown.
    if held == '' or redis.call('HEXISTS', removed, id) == 1 then
      return {'unknown', id}
    end
    r = parse(held)
    if not r then
      return redis.error_reply('tollgate: a malformed registry update')
    end
    if redis.call('HEXISTS', values, r.hash) == 1 then
      return {'duplicate value', id}
    end
    redis.call('HSET', values, r.hash, id)
  end
  for i = 7, #ARGV, 2 do
    r[ARGV[i]] = ARGV[i + 1]
  end
  local record = r.hash .. r.enabled .. field(r.plan) .. r.account
  redis.call('HSET', keys, id, record)
  out[2] = field(id) .. field(record)
  answer = record
elseif op == 'D' then
  local id = ARGV[5]
  local old = redis.call('HGET', keys, id)
  if old then
    local hash = string.sub(old, 1, 32)
    if redis.call('HGET', values, hash) == id then
      redis.call('HDEL', values, hash)
    end
    redis.call('HDEL', keys, id)
  end
  out[2] = field(id)
elseif op == 'P' or op == 'C' then
  local into = plans
  if op == 'C' then
    into = accounts
  end
  redis.call('HSET', into, ARGV[5], ARGV[6])
  out[2] = field(ARGV[5]) .. field(ARGV[6])
else
  return redis.error_reply('tollgate: unknown registry change')
end

local v = redis.call('INCR', version)
if op == 'D' then
  -- A tombstone: the key stays removed for instances started later, even
  -- when it is in their static configuration.
  redis.call('HSET', removed, ARGV[5], v)
end
local change = table.concat(out)
if #change > largest then
  change = 'R'
end
redis.call('XADD', log, 'MAXLEN', '~', bound, '*', 'v', v, 'c', change)
-- Without an answer (nil), the reply is {'ok', version}.
return {'ok', tostring(v), answer}
