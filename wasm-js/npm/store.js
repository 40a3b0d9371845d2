// unbusy/store: cache stores for Node servers that share one L2 cache with an Envoy fleet
// (docs/store.md). `storeCache` speaks unbusy-store's HTTP API, as the Envoy filter does;
// `redisCache` speaks to Redis itself through the app's own node `redis` client, with
// unbusy-store's key layout and scripts, so an entry written by either is read by every host.
//
// Both implement the package's cache-store interface (`createFetch`'s `cache` option). The
// package passes each call the request's tenant id and the answer's two lifetimes beside the
// key; the key, the tenant and whether an age is fresh or stale are the core's (read in wasm),
// never computed here. A store that fails, hangs or answers nonsense is a miss, and a write it
// refuses is dropped: the provider answers as if there were no store (fail open). After a
// failure the store is left alone for a second, as the filter does, so an outage does not cost
// every request a timeout. An outage is logged once when it starts and once when it ends, not
// per request.
//
// Edge workers keep the platform's stores (KV, the Cache API): they have no Redis to share.

/** Default bound on a lookup (the Envoy filter's `store.timeout_ms`): a hung store costs a
 * request this much at most. */
export const DEFAULT_TIMEOUT_MS = 20;
/** Bound on a write (the filter's write-back bound): writes are off the hot path. */
const WRITE_TIMEOUT_MS = 500;
/** After a failure the store is left alone this long (the filter's `BACK_OFF`): lookups are
 * misses and writes dropped without a call, so an outage costs at most one `timeoutMs` a second,
 * not one per request. */
const BACK_OFF_MS = 1000;
/** unbusy-store's default `--prefix`. */
const DEFAULT_PREFIX = 'unbusy:';
/** A tenant id and a cache key as the core prints them (`tenantOf`, `read`). */
const TENANT = /^[0-9a-f]{16}$/;
const KEY = /^[0-9a-f]{32}$/;

// unbusy-store's scripts (store/src/scripts.rs, `CACHE_PUT` and `CACHE_GET`), byte for byte:
// the entry's age is by Redis's clock, so every host agrees on it whatever its own clock says.
// A test checks they are the store's.
const CACHE_PUT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'ct', ARGV[2], 'ce', ARGV[3], 'at', now, 'ttl', ARGV[4], 'st', ARGV[5])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[5]))
return 1
`;
const CACHE_GET = `
local v = redis.call('HMGET', KEYS[1], 'b', 'ct', 'ce', 'at', 'ttl', 'st')
if not v[1] or not v[4] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local age = now - tonumber(v[4])
if age < 0 then age = 0 end
return {v[1], v[2] or '', v[3] or '', tostring(age), v[5] or '0', v[6] or '0'}
`;

function positive(value, what, fallback) {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new TypeError(`unbusy/store: ${what} must be a number of milliseconds above 0, not ${JSON.stringify(value)}`);
  }
  return value;
}

function logger(log, what) {
  if (log === undefined) return (m) => console.warn(m);
  if (typeof log !== 'function') throw new TypeError(`unbusy/store: ${what} must be a function taking a message`);
  return log;
}

/** One log line when the store starts failing and one when it answers again; the back-off. */
function outage(log, name) {
  let down = false;
  let skipUntil = 0;
  return {
    /** Whether to leave the store alone for now (it failed less than `BACK_OFF_MS` ago). */
    skipping: () => down && performance.now() < skipUntil,
    failed(why) {
      skipUntil = performance.now() + BACK_OFF_MS;
      if (down) return;
      down = true;
      try {
        log(`unbusy: ${name} is unavailable (${why}); answers come from the providers until it answers again`);
      } catch {
        /* the app's logger: never the request's problem */
      }
    },
    answered() {
      if (!down) return;
      down = false;
      try {
        log(`unbusy: ${name} answers again`);
      } catch {
        /* as above */
      }
    },
  };
}

/** `promise`, or `undefined` after `ms` (the work is abandoned, its outcome ignored). */
function bounded(promise, ms, onTimeout) {
  let timer;
  const late = new Promise((resolve) => {
    timer = setTimeout(() => resolve(onTimeout()), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The lifetimes of a write: the package's (`info`), else all of `ttlMs` fresh. */
function lifetimes(ttlMs, info) {
  const ttl = Math.round(info?.ttlMs ?? ttlMs);
  const stale = Math.round(info?.staleTtlMs ?? 0);
  return ttl >= 1 && stale >= 0 ? [ttl, stale] : null;
}

/** An answer the store had, as the package's stores give it: its age by the store's clock
 * becomes `storedAt` on this host's clock, and the engine judges it (`CacheLookup::for_age`). */
function answer(body, contentType, contentEncoding, ageMs) {
  // The package asks providers for `identity` and stores what it judged; an encoded body is
  // not one of ours (the filter's `read_cached` refuses it the same way).
  if (contentEncoding && contentEncoding.toLowerCase() !== 'identity') return undefined;
  const age = Number(ageMs);
  if (!Number.isFinite(age) || age < 0) return undefined;
  return { body, stream: /^\s*text\/event-stream/i.test(contentType ?? ''), status: 200, storedAt: Date.now() - age };
}

const contentType = (value) => (value.stream ? 'text/event-stream' : 'application/json');

/**
 * A cache store over unbusy-store's HTTP API (`GET`/`PUT /v1/cache/{tenant}/{key}`).
 * `url`: the store's base URL (`http://127.0.0.1:7379`); `timeoutMs`: the bound on a lookup
 * (default 20); `fetch`: the fetch to use (default the global one); `log`: where the outage
 * lines go (default `console.warn`).
 */
export function storeCache({ url, timeoutMs, fetch: fetchFn, log } = {}) {
  let base;
  try {
    base = new URL(url);
  } catch {
    throw new TypeError(`unbusy/store: storeCache's url must be the store's http(s) URL, e.g. 'http://127.0.0.1:7379', not ${JSON.stringify(url)}`);
  }
  if (base.protocol !== 'http:' && base.protocol !== 'https:') {
    throw new TypeError(`unbusy/store: storeCache's url must be http: or https:, not ${base.protocol}`);
  }
  const lookupMs = positive(timeoutMs, "storeCache's timeoutMs", DEFAULT_TIMEOUT_MS);
  const send = fetchFn ?? globalThis.fetch.bind(globalThis);
  if (typeof send !== 'function') throw new TypeError("unbusy/store: storeCache's fetch must be a function");
  const root = base.href.replace(/\/+$/, '');
  // The origin only: a URL's credentials never reach a log.
  const state = outage(logger(log, "storeCache's log"), `the store at ${base.origin}`);
  const path = (key, info) => (KEY.test(key) && TENANT.test(info?.tenant ?? '') ? `${root}/v1/cache/${info.tenant}/${key}` : null);

  /** `fetch` bounded by `ms`, its body read within it too; null when it failed. */
  async function call(target, init, ms, read) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), ms);
    try {
      const r = await send(target, { ...init, signal: ctl.signal });
      if (r.status >= 500) {
        await r.body?.cancel().catch(() => {});
        state.failed(`HTTP ${r.status}`);
        return null;
      }
      const out = await read(r);
      state.answered();
      return out;
    } catch (e) {
      state.failed(ctl.signal.aborted ? `no answer within ${ms} ms` : String(e?.cause?.code ?? e?.message ?? e));
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  return {
    async get(key, info) {
      const target = path(key, info);
      if (!target || state.skipping()) return undefined;
      const hit = await call(target, { method: 'GET' }, lookupMs, async (r) => {
        if (r.status !== 200) {
          await r.body?.cancel().catch(() => {});
          return undefined;
        }
        const body = await r.text();
        return answer(body, r.headers.get('content-type'), r.headers.get('content-encoding'), r.headers.get('x-unbusy-age-ms') ?? NaN);
      });
      return hit ?? undefined;
    },
    async set(key, value, ttlMs, info) {
      const target = path(key, info);
      const lives = lifetimes(ttlMs, info);
      if (!target || !lives || typeof value?.body !== 'string' || state.skipping()) return;
      await call(
        target,
        {
          method: 'PUT',
          headers: { 'content-type': contentType(value), 'x-unbusy-ttl-ms': String(lives[0]), 'x-unbusy-stale-ttl-ms': String(lives[1]) },
          body: value.body,
        },
        Math.max(lookupMs, WRITE_TIMEOUT_MS),
        async (r) => {
          await r.body?.cancel().catch(() => {});
        },
      );
    },
  };
}

/**
 * A cache store straight on Redis through the app's node `redis` client (v4 or v5; anything
 * with `sendCommand(args)`), with unbusy-store's key layout (`<prefix>cache:<tenant>:<key>`)
 * and scripts: a Node app and an Envoy fleet behind unbusy-store share its entries. `prefix`:
 * unbusy-store's `--prefix` (default `unbusy:`); `timeoutMs`: the bound on a lookup (default
 * 20; a client that queues commands while it reconnects would otherwise hold the request);
 * `log`: where the outage lines go (default `console.warn`). The app owns the client: it
 * connects it, listens to its `error` events and closes it.
 */
export function redisCache(client, { prefix, timeoutMs, log } = {}) {
  if (typeof client?.sendCommand !== 'function') {
    throw new TypeError("unbusy/store: redisCache needs a connected node `redis` client (createClient(...)), one with sendCommand");
  }
  const p = prefix ?? DEFAULT_PREFIX;
  if (typeof p !== 'string' || p.length > 64 || /[{}\s]/.test(p)) {
    throw new TypeError(`unbusy/store: redisCache's prefix must be at most 64 characters without braces or whitespace (as unbusy-store's --prefix), not ${JSON.stringify(p)}`);
  }
  const lookupMs = positive(timeoutMs, "redisCache's timeoutMs", DEFAULT_TIMEOUT_MS);
  const state = outage(logger(log, "redisCache's log"), 'Redis');
  const redisKey = (key, info) => (KEY.test(key) && TENANT.test(info?.tenant ?? '') ? `${p}cache:${info.tenant}:${key}` : null);
  const FAILED = Symbol('failed');

  function run(args, ms) {
    let work;
    try {
      work = Promise.resolve(client.sendCommand(args));
    } catch (e) {
      work = Promise.reject(e);
    }
    return bounded(
      work.then(
        (reply) => {
          state.answered();
          return reply;
        },
        (e) => {
          state.failed(String(e?.message ?? e));
          return FAILED;
        },
      ),
      ms,
      () => {
        state.failed(`no answer within ${ms} ms`);
        return FAILED;
      },
    );
  }

  return {
    async get(key, info) {
      const k = redisKey(key, info);
      if (!k || state.skipping()) return undefined;
      const reply = await run(['EVAL', CACHE_GET, '1', k], lookupMs);
      if (!Array.isArray(reply) || reply.length < 4) return undefined;
      const [body, ct, ce, age] = reply.map(String);
      return answer(body, ct, ce, age);
    },
    async set(key, value, ttlMs, info) {
      const k = redisKey(key, info);
      const lives = lifetimes(ttlMs, info);
      if (!k || !lives || typeof value?.body !== 'string' || state.skipping()) return;
      await run(['EVAL', CACHE_PUT, '1', k, value.body, contentType(value), '', String(lives[0]), String(lives[1])], Math.max(lookupMs, WRITE_TIMEOUT_MS));
    },
  };
}
