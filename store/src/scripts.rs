//! The Lua scripts: each operation is one script, so it is atomic and one round trip. Every
//! script reads the time from Redis (`TIME`), so a fleet of proxies with skewed clocks agrees.
//! In a Redis Cluster every key of one script shares a hash tag (`{...}`), hence a slot.

use redis::Script;
use std::sync::LazyLock;

/// Store an answer: `KEYS[1]` the entry; `ARGV` body, content type, content encoding (empty:
/// none), ttl ms, stale ttl ms. The entry lives ttl + stale ttl, then Redis drops it.
pub static CACHE_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'ct', ARGV[2], 'ce', ARGV[3], 'at', now, 'ttl', ARGV[4], 'st', ARGV[5])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[5]))
return 1
",
    )
});

/// Read an answer: nil, or `{body, content type, content encoding, age ms, ttl ms, stale ms}`.
pub static CACHE_GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HMGET', KEYS[1], 'b', 'ct', 'ce', 'at', 'ttl', 'st')
if not v[1] or not v[4] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local age = now - tonumber(v[4])
if age < 0 then age = 0 end
return {v[1], v[2] or '', v[3] or '', tostring(age), v[5] or '0', v[6] or '0'}
",
    )
});

/// GCRA over several buckets of one scope (same hash tag), in microseconds of Redis time.
/// `ARGV[1]` is `lease` or `return`; then for each key three values: the emission interval
/// (µs per unit, may be fractional), the burst (units a full bucket holds), and the units
/// wanted (lease) or given back (return). A bucket's key holds its theoretical arrival time
/// (TAT) and expires when the bucket is full again, so an idle bucket costs nothing.
///
/// Lease: grants as many of the wanted units as fit now (`floor((now + burst*T - tat) / T)`),
/// charging them all at once (tat += granted*T); when fewer than wanted fit, also says in how
/// many ms the next unit will. Return: tat -= units*T, never below now (units a proxy leased
/// and did not spend, given back so another proxy may take them).
///
/// Answers, per key, `{granted, retry_after_ms}`.
pub static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = ARGV[1] == 'lease'
local out = {}
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 3
  local interval = tonumber(ARGV[base])
  local burst = tonumber(ARGV[base + 1])
  local units = tonumber(ARGV[base + 2])
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local granted = 0
  local wait = 0
  if lease then
    local room = math.floor((now + burst * interval - tat) / interval + 1e-9)
    if room < 0 then room = 0 end
    granted = math.min(units, room)
    tat = tat + granted * interval
    if granted < units then
      wait = tat + interval - burst * interval - now
      if wait < 0 then wait = 0 end
    end
  else
    granted = units
    tat = tat - units * interval
    if tat < now then tat = now end
  end
  local ttl = math.ceil((tat - now) / 1000)
  if ttl > 0 then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', ttl)
  else
    redis.call('DEL', key)
  end
  out[i] = {granted, math.ceil(wait / 1000)}
end
return out
",
    )
});

/// A counting semaphore with expiring holders. `KEYS[1]` a sorted set (holder → expiry, ms of
/// Redis time), `KEYS[2]` a hash (holder → slots held). `ARGV`: holder, want, limit, lease ms.
/// Expired holders are dropped first (a proxy that died gives its slots back within one
/// lease), then the holder is set to hold `min(want, limit - what the others hold)` slots
/// (0 releases it) until now + lease. Setting, not adding, makes a retried call harmless.
///
/// Answers `{held, in use by everyone, ms until the next other holder's lease ends (0: none)}`.
pub static SEMAPHORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = ARGV[1]
local want = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, h in ipairs(dead) do
  redis.call('ZREM', KEYS[1], h)
  redis.call('HDEL', KEYS[2], h)
end
local mine = tonumber(redis.call('HGET', KEYS[2], holder) or '0') or 0
local total = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do total = total + (tonumber(n) or 0) end
local others = total - mine
local held = math.min(want, limit - others)
if held < 0 then held = 0 end
if held > 0 then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  redis.call('HSET', KEYS[2], holder, held)
else
  redis.call('ZREM', KEYS[1], holder)
  redis.call('HDEL', KEYS[2], holder)
end
local wait = 0
if held < want then
  local first = redis.call('ZRANGE', KEYS[1], 0, 1, 'WITHSCORES')
  for j = 1, #first, 2 do
    if first[j] ~= holder then
      wait = math.max(0, tonumber(first[j + 1]) - now)
      break
    end
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  local ttl = tonumber(last[2]) - now + 1000
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {held, others + held, wait}
",
    )
});

/// Publish a pause: `KEYS[1]` the provider's pause, `ARGV` ms, reason. A pause only grows: a
/// shorter one than the pause in force leaves it as it is. Answers `{remaining ms, reason}`.
pub static PAUSE_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local want = tonumber(ARGV[1])
local cur = redis.call('PTTL', KEYS[1])
if cur < want then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', want)
  return {want, ARGV[2]}
end
return {cur, redis.call('GET', KEYS[1]) or ''}
",
    )
});

/// Read a pause: nil, or `{remaining ms, reason}`.
pub static PAUSE_GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local ms = redis.call('PTTL', KEYS[1])
if ms < 0 then ms = 0 end
return {ms, v}
",
    )
});
