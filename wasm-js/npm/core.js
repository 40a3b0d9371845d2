// unbusy: the engine as a drop-in `fetch`. This file is the host: it turns `fetch` calls and
// their answers into engine calls, and the engine's actions into `fetch`es, timers and
// Responses. Every decision (which provider, retry or not, when, what to cache, when to give
// up) is the engine's, in the wasm module.

const ORIGIN = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i;
const SSE = /^\s*text\/event-stream/i;
/** The content codings fetch decodes itself in every runtime (it leaves the header in place). */
const DECODED = ['gzip', 'x-gzip', 'deflate', 'br'];
/** The `accept-encoding` managed attempts send (`core::answer::MANAGED_ACCEPT_ENCODING`): the
 * answer must be readable to be judged, watched for keep-alive bytes and cached. Browsers do not
 * let a page set it; there fetch decodes whatever it asked for. */
const MANAGED_ACCEPT_ENCODING = 'identity';
const NEVER_SNAKE = new Set(['models', 'model_fallbacks']); // their keys are model names

function snake(key) {
  return key.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
}

/**
 * The configuration in the engine's schema (snake_case keys). `names` gets each path in it (the
 * core's form: `providers[0].base_url`) with the caller's own spelling of it
 * (`providers[0].baseUrl`), and `problems` the keys the caller spelled twice.
 */
function toSnake(value, parent, names, problems, path = '', caller = '') {
  if (Array.isArray(value)) return value.map((v, i) => toSnake(v, parent, names, problems, `${path}[${i}]`, `${caller}[${i}]`));
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      const key = NEVER_SNAKE.has(parent) ? k : snake(k);
      const at = path ? `${path}.${key}` : key;
      const callerAt = caller ? `${caller}.${k}` : k;
      if (Object.hasOwn(out, key)) problems.push(`${names.get(at)} and ${callerAt} are the same field`);
      names.set(at, callerAt);
      out[key] = toSnake(v, key, names, problems, at, callerAt);
    }
    return out;
  }
  return value;
}

/** A path in the core's form as the caller spelled it; the parts they did not write (a field
 * left to its default) in camelCase. */
function spell(path, names) {
  if (names.has(path)) return names.get(path);
  let at = '';
  let out = '';
  for (const [, key, index] of path.matchAll(/\.?([^.[\]]+)|\[(\d+)\]/g)) {
    const part = key === undefined ? `[${index}]` : (at ? '.' : '') + key;
    at += part;
    out = names.get(at) ?? out + (key === undefined ? part : (out ? '.' : '') + key.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase()));
  }
  return out;
}

/** One of the core's configuration errors (`config::ConfigError`), in the caller's spelling. */
function callerProblem(line, names) {
  let m = /^unknown field `(.*)` in (.*)$/.exec(line) ?? /^unknown field `(.*)`()$/.exec(line);
  if (m) {
    const parent = m[2] && spell(m[2], names);
    const written = names.get(m[2] ? `${m[2]}.${m[1]}` : m[1]);
    const key = written === undefined ? m[1] : written.slice(parent ? parent.length + 1 : 0);
    return `unknown field \`${key}\`` + (parent ? ` in ${parent}` : '');
  }
  // `cluster` is the Envoy filter's: here every provider needs a base URL.
  if ((m = /^(.*) must set `base_url` or `cluster` \(or both\)$/.exec(line))) return `${spell(`${m[1]}.base_url`, names)} must be set`;
  if ((m = /^(.*) and (.*) must not both be set$/.exec(line))) return `${spell(m[1], names)} and ${spell(m[2], names)} must not both be set`;
  if ((m = /^(.*) must be (at least|below) (.*)$/.exec(line))) {
    return `${spell(m[1], names)} must be ${m[2]} ${m[3].replace(/[a-z_]+(\.[a-z_]+)+/g, (p) => spell(p, names))}`;
  }
  if ((m = /^(.+?) (must .*)$/s.exec(line))) return `${spell(m[1], names)} ${m[2]}`;
  return line;
}

/** Every problem with the configuration, in the caller's spelling (none: an engine for it). */
function engineFor(wasm, config) {
  if (!config || typeof config !== 'object' || Array.isArray(config)) {
    throw new TypeError('unbusy: invalid configuration: it must be an object');
  }
  // Listing order is preference unless a provider says otherwise.
  const listed = config.providers;
  const withOrder = {
    ...config,
    providers: Array.isArray(listed)
      ? listed.map((p, i) => (p && typeof p === 'object' && !Array.isArray(p) ? { priority: i, ...p } : p))
      : listed,
  };
  const names = new Map();
  const problems = [];
  const snakeConfig = toSnake(withOrder, undefined, names, problems);
  let engine = null;
  try {
    engine = new wasm.JsEngine(JSON.stringify(snakeConfig), Math.random() * 2 ** 52);
  } catch (e) {
    // `config::ConfigErrors` joins its errors with '; ' (split here and joined again below, a
    // name with '; ' in it comes out as it went in).
    problems.unshift(...String(e?.message ?? e).split('; ').map((line) => callerProblem(line, names)));
  }
  // The Envoy filter's ways to reach a provider and its key: here they would be silently
  // missing (no clusters; no process environment in browsers and workers), and the caller's
  // own key would go to the provider instead.
  if (Array.isArray(snakeConfig.providers)) {
    snakeConfig.providers.forEach((p, i) => {
      if (p?.api_key_env !== undefined) {
        const at = spell(`providers[${i}].api_key_env`, names);
        problems.push(`${at} is read only by the Envoy filter: pass ${at.endsWith('api_key_env') ? 'api_key' : 'apiKey'}`);
      }
      if (p?.cluster !== undefined && p.base_url === undefined) {
        problems.push(`${spell(`providers[${i}].base_url`, names)} must be set (\`${spell(`providers[${i}].cluster`, names).replace(/.*\./, '')}\` is read only by the Envoy filter)`);
      }
    });
  }
  if (problems.length) {
    engine?.free();
    throw new TypeError('unbusy: invalid configuration: ' + problems.join('; '));
  }
  return { engine, snakeConfig };
}

/**
 * What `init(input)` was given: `{ module }` (the module's bytes, a WebAssembly.Module, a
 * Response or a promise of one, or its URL), or one of those alone (the older form); `given`:
 * whether the caller named a module at all.
 */
export function moduleSource(input) {
  if (input === undefined || input === null) return { source: undefined, given: false };
  if (typeof input === 'object' && Object.getPrototypeOf(input) === Object.prototype) {
    if (input.module === undefined || input.module === null) {
      throw new TypeError(
        'unbusy: init({ module }) needs the module: its bytes, its URL, a Response or a WebAssembly.Module ' +
          "(`import wasm from 'unbusy/wasm'` gives its bytes); it was " + String(input.module),
      );
    }
    return { source: input.module, given: true };
  }
  return { source: input, given: true };
}

/** An in-memory LRU cache, bounded in bytes, implementing the store interface. */
export class MemoryCache {
  constructor({ maxBytes = 64 << 20 } = {}) {
    this.maxBytes = maxBytes;
    this.bytes = 0;
    this.map = new Map();
  }
  async get(key) {
    const e = this.map.get(key);
    if (!e) return undefined;
    if (e.expires <= Date.now()) {
      this.delete(key);
      return undefined;
    }
    this.map.delete(key);
    this.map.set(key, e); // most recently used last
    return e.value;
  }
  async set(key, value, ttlMs) {
    const size = value.body.length + 64;
    if (size > this.maxBytes) return;
    this.delete(key);
    this.map.set(key, { value, expires: Date.now() + ttlMs, size });
    this.bytes += size;
    for (const [k, e] of this.map) {
      if (this.bytes <= this.maxBytes) break;
      this.map.delete(k);
      this.bytes -= e.size;
    }
  }
  delete(key) {
    const e = this.map.get(key);
    if (e) {
      this.map.delete(key);
      this.bytes -= e.size;
    }
  }
}

// Action kinds, as the engine numbers them.
const SEND = 1;
const ABORT = 2;
const DELIVER = 3;
const SERVE_CACHE = 4;
const ABORT_REASONS = ['FirstTokenDeadline', 'Deadline', 'Stalled'];
// What the cache did, as `note` numbers it (`reply::CacheNote`).
const CACHE_NONE = 0;
const CACHE_MISS = 1;
const CACHE_HIT = 2;
const CACHE_STALE = 3;

const encoder = new TextEncoder();
const EMPTY = new Uint8Array();
const decoder = new TextDecoder();

/** How long a provider that left an attempt hanging before its headers keeps every attempt to it
 * abortable (see `send`). */
const HUNG_MEMORY_MS = 10 * 60 * 1000;

/**
 * An answer read whole, for hosts whose consumers use only `Response`'s public API (Node): the
 * body is kept as the text already read and the headers are built when first asked for, instead
 * of a second `Response` copying both (a byte stream and a header list per call, most of the
 * per-call cost in Node). `body`, `clone()` and `formData()` fall back to a real `Response`.
 * Not used where the runtime itself may read the object (a worker returning it, a service
 * worker's `respondWith`): those read internal slots, which here hold no body.
 */
class HeldResponse extends Response {
  #text;
  #headerSource;
  #extra;
  #headers = null;
  #used = false;
  #real = null;

  constructor(text, status, headerSource, extra) {
    super(null, { status });
    this.#text = text;
    this.#headerSource = headerSource;
    this.#extra = extra;
  }

  get headers() {
    if (this.#headers === null) {
      const h = new Headers(this.#headerSource ?? undefined);
      h.delete('content-length');
      h.delete('content-encoding');
      for (const [k, v] of this.#extra) h.set(k, v);
      this.#headers = h;
    }
    return this.#headers;
  }

  #realResponse() {
    if (this.#real === null) {
      this.#real = new Response(this.#used ? null : this.#text, { status: this.status, headers: this.headers });
      this.#used = true;
    }
    return this.#real;
  }

  #take() {
    if (this.#real !== null) return null;
    if (this.#used) throw new TypeError('Body is unusable: Body has already been read');
    this.#used = true;
    return this.#text;
  }

  get body() {
    return this.#realResponse().body;
  }
  get bodyUsed() {
    return this.#real !== null ? this.#real.bodyUsed : this.#used;
  }
  async text() {
    const t = this.#take();
    return t ?? this.#real.text();
  }
  async json() {
    const t = this.#take();
    return t === null ? this.#real.json() : JSON.parse(t);
  }
  async arrayBuffer() {
    const t = this.#take();
    if (t === null) return this.#real.arrayBuffer();
    const bytes = encoder.encode(t);
    return bytes.byteLength === bytes.buffer.byteLength ? bytes.buffer : bytes.slice().buffer;
  }
  async bytes() {
    const t = this.#take();
    return t === null ? this.#real.bytes() : encoder.encode(t);
  }
  async blob() {
    const t = this.#take();
    return t === null ? this.#real.blob() : new Blob([t], { type: this.headers.get('content-type') ?? '' });
  }
  async formData() {
    return this.#realResponse().formData();
  }
  clone() {
    if (this.bodyUsed) throw new TypeError('Response.clone: Body has already been consumed.');
    if (this.#real !== null) return this.#real.clone();
    return new HeldResponse(this.#text, this.status, this.headers, []);
  }
}

/** A request header from whatever `init.headers` was (Headers, pairs or a plain object). */
function headerOf(headers, name) {
  if (!headers) return null;
  if (typeof headers.get === 'function') return headers.get(name);
  const pairs = Array.isArray(headers) ? headers : Object.entries(headers);
  for (const [k, v] of pairs) if (k.toLowerCase() === name) return String(v);
  return null;
}

/** Headers the attempt sets itself, or that are for unbusy only. */
const NOT_FORWARDED = new Set(['content-length', 'accept-encoding', 'x-unbusy-deadline-ms']);

/** An attempt's request headers: the caller's, less content-length and its accept-encoding,
 * asking for an unencoded answer, with the provider's credentials. A plain object stays one
 * (fetch converts it once, as for a direct call). */
function attemptHeaders(headers, authorization) {
  if (headers && typeof headers === 'object' && !Array.isArray(headers) && typeof headers.get !== 'function') {
    const out = {};
    for (const k in headers) {
      const lower = k.toLowerCase();
      if (NOT_FORWARDED.has(lower) || (authorization && lower === 'authorization')) continue;
      out[k] = headers[k];
    }
    if (authorization) out.authorization = authorization;
    out['accept-encoding'] = MANAGED_ACCEPT_ENCODING;
    return out;
  }
  const out = new Headers(headers ?? undefined);
  if (authorization) out.set('authorization', authorization);
  for (const h of NOT_FORWARDED) out.delete(h);
  out.set('accept-encoding', MANAGED_ACCEPT_ENCODING);
  return out;
}

/** Whether fetch handed over the body as it was encoded: a `content-encoding` with a coding the
 * runtime does not decode (fetch then decodes none of them). Such a body is never judged as
 * text nor cached, and reaches the caller as bytes with its `content-encoding`. */
function undecoded(contentEncoding, decodes) {
  if (!contentEncoding) return false;
  for (const c of contentEncoding.toLowerCase().split(',')) {
    const coding = c.trim();
    if (coding && coding !== 'identity' && !decodes.includes(coding)) return true;
  }
  return false;
}

function abortError(signal) {
  return signal?.reason ?? new DOMException('The operation was aborted.', 'AbortError');
}

/**
 * Builds the `fetch` for a configuration in the engine's schema (camelCase keys).
 * Throws at once, naming the field, when the configuration is invalid.
 */
export function makeCreateFetch(wasm, host = {}) {
  return function createFetch(config, options = {}) {
    const baseFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    const now = options.now ?? (() => (globalThis.performance ? performance.now() : Date.now()));
    const onEvent = options.onEvent;
    const unmatched = options.unmatched ?? 'passthrough';
    if (unmatched !== 'passthrough' && unmatched !== 'error') {
      throw new TypeError(`unbusy: options.unmatched must be 'passthrough' or 'error', not ${JSON.stringify(unmatched)}`);
    }
    const decodes = host.decodes ?? DECODED;
    const { engine, snakeConfig } = engineFor(wasm, config);
    const providers = snakeConfig.providers.map((p, index) => ({
      index,
      name: p.name,
      baseUrl: String(p.base_url ?? '').replace(/\/+$/, ''),
    }));
    const waitUntil = options.waitUntil;
    if (waitUntil !== undefined && typeof waitUntil !== 'function') {
      throw new TypeError('unbusy: options.waitUntil must be a function that keeps the runtime alive for a promise, e.g. (p) => ctx.waitUntil(p)');
    }
    const cache = options.cache ?? new MemoryCache({ maxBytes: snakeConfig.cache?.max_bytes });
    const cacheTtl = snakeConfig.cache?.ttl_ms ?? 300000;
    const staleTtl = snakeConfig.cache?.stale_ttl_ms ?? 3600000;

    /** Stores an answer. The store's write goes on after the answer was handed over: a worker
     * must be kept alive for it (`options.waitUntil`, e.g. `ctx.waitUntil`), or the runtime may
     * cancel it when the response is done. A store that fails loses the entry, nothing else.
     * `tenant` and the two lifetimes are for stores shared with the Envoy filter (`unbusy/store`),
     * which keep them beside the entry as `unbusy-store` does. */
    function store(key, tenant, value) {
      let write;
      try {
        const info = { tenant, ttlMs: cacheTtl, staleTtlMs: staleTtl };
        write = Promise.resolve(cache.set(key, value, cacheTtl + staleTtl, info)).catch(() => {});
      } catch {
        return;
      }
      if (waitUntil) {
        try {
          waitUntil(write);
        } catch {
          /* the runtime's own refusal: the write goes on unattended */
        }
      }
    }
    // The request headers the core reads (`request::read`): only these cross into the module.
    const readHeaders = engine.headerNames().toLowerCase().split(',').filter(Boolean);
    const requests = new Map();
    // When each provider last left an attempt hanging before its headers (see `send`).
    const hungAt = [];
    let timer = null;
    let timerAt = Infinity;

    if (!onEvent) engine.listen(false); // nobody listens: events are dropped as they come

    // The engine's action buffer, read in place (a new view when the memory has grown).
    const actionAt = engine.actionBuffer();
    const memory = host.memory();
    let actionView = new Float64Array(memory.buffer, actionAt, 6);
    function actionNumbers() {
      if (actionView.length === 0) actionView = new Float64Array(memory.buffer, actionAt, 6); // detached by growth
      return actionView;
    }

    function emit() {
      if (!onEvent) return;
      const events = engine.takeEvents();
      if (events) {
        for (const e of JSON.parse(events)) {
          // (The name is what metrics label with; the engine knows providers by index.)
          if (typeof e.provider === 'number') e.providerName = providers[e.provider]?.name;
          try {
            onEvent(e);
          } catch {
            /* a listener's error is its own */
          }
        }
      }
    }

    function onError(kind, request, e) {
      const r = requests.get(request);
      if (r && kind !== ABORT) {
        engine.cancel(now(), r.id);
        finish(r);
        r.reject(e);
      }
    }

    function schedule() {
      if (requests.size === 0) {
        // Nothing left to time. Where timers do not hold the process (Node's are unref'd), the
        // armed one is left to fire into an idle engine: cheaper than clearing and setting one
        // per request. Elsewhere no stray timer may keep a worker request alive.
        if (host.lingeringTimers) return;
        if (timer) clearTimeout(timer);
        timer = null;
        timerAt = Infinity;
        return;
      }
      const at = engine.nextWakeup();
      if (Number.isNaN(at) || at >= timerAt) return;
      if (timer) clearTimeout(timer);
      timerAt = at;
      timer = setTimeout(() => {
        timer = null;
        timerAt = Infinity;
        // A timer fires no earlier than it was set for, but a runtime's clock may be coarser
        // than the engine's instants (workerd's stands still between I/O events, in whole
        // milliseconds): ticking with the clock alone could find the wake-up not yet due and
        // set a 1 ms timer again and again without ever getting there.
        engine.tick(Math.max(now(), at));
        drain();
      }, Math.max(0, Math.ceil(at - now())));
      if (typeof timer === 'object' && timer?.unref) timer.unref();
    }

    // Each provider's base URL and credentials, asked of the engine once.
    const routes = [];

    function route(provider) {
      let route = routes[provider];
      if (route === undefined) {
        route = JSON.parse(engine.route(provider));
        route.base = (route.baseUrl ?? providers[provider]?.baseUrl ?? '').replace(/\/+$/, '');
        route.origin = ORIGIN.exec(route.base)?.[0] ?? route.base;
        routes[provider] = route;
      }
      return route;
    }

    // The engine's actions come as numbers (see `nextAction` in wasm-js/src/lib.rs), read into
    // locals before anything else calls the engine (a call may grow the memory under the view);
    // strings are asked for only when an action has them.
    function drain() {
      let kind;
      while ((kind = engine.nextAction()) !== 0) {
        const v = actionNumbers();
        const request = v[1];
        const a2 = v[2];
        const a3 = v[3];
        const a4 = v[4];
        const a5 = v[5];
        // One action failing (a runtime refusing an abort, say) must not drop the others:
        // the next one is often the failover that answers the caller.
        try {
          act(kind, request, a2, a3, a4, a5);
        } catch (e) {
          onError(kind, request, e);
        }
      }
      emit();
      schedule();
    }

    /** The `x-unbusy` header (`reply::note`). `tier` comes with the action when there is one. */
    function note(r, cache, tier = engine.tier()) {
      return engine.note(r.provider, r.attempt, cache ?? r.cacheNote, tier);
    }

    /** Stops the attempt in flight: through its AbortController if it has one, else by cancelling
     * its body; one that has neither is left to fail on its own (its answer is ignored), and its
     * provider's attempts carry a controller from now on. */
    function abortAttempt(r) {
      try {
        if (r.attemptAbort) r.attemptAbort.abort();
        else if (r.attemptReader) r.attemptReader.cancel().catch(() => {});
        else if (r.attemptNo > 0) hungAt[r.provider] = now();
      } catch {
        /* the runtime may refuse to abort a body it is reading; the attempt is dropped anyway */
      }
      r.attemptAbort = null;
      r.attemptReader = null;
      r.attemptNo = 0; // whatever the attempt still says is not listened to
    }

    /** The caller's answer: a HeldResponse where the host allows it, else a Response. Never with
     * the `content-encoding` and `content-length` of an encoded original (fetch decoded it),
     * unless fetch left it encoded (`bytes`, see `undecoded`). */
    function respond(r, status, headerSource, text, extra, bytes) {
      if (bytes) {
        const headers = new Headers(headerSource ?? undefined);
        for (const [k, v] of extra) headers.set(k, v);
        return new Response(bytes, { status, headers });
      }
      if (host.heldResponses) return new HeldResponse(text, status, headerSource, extra);
      const headers = new Headers(headerSource ?? undefined);
      headers.delete('content-length');
      headers.delete('content-encoding');
      for (const [k, v] of extra) headers.set(k, v);
      return new Response(text, { status, headers });
    }

    function finish(r) {
      requests.delete(r.id);
      if (r.onAbort) r.signal.removeEventListener?.('abort', r.onAbort);
    }

    /** Carries out one action (its numbers as `nextAction` lays them out). */
    function act(kind, request, a2, a3, a4, a5) {
      const r = requests.get(request);
      if (!r) return;
      switch (kind) {
        case SEND:
          send(r, a2, a3, !Number.isNaN(a4) || a5 === 1);
          break;
        case ABORT:
          if (r.attemptNo !== a2) break;
          abortAttempt(r);
          if (r.streaming) {
            // Bytes already reached the caller: end their stream here.
            try {
              r.streaming.error(new Error(`unbusy: the provider stopped making progress (${ABORT_REASONS[a3]})`));
            } catch {
              /* the caller's stream already ended */
            }
            finish(r);
          }
          break;
        case DELIVER: {
          const storeInCache = a2 === 1;
          if (r.streaming) {
            r.storeStream = storeInCache;
            break; // already flowing; stored (if complete) when the stream ends
          }
          const ans = r.answer;
          // Only a complete, valid, readable answer (`answer::assess`), with its own framing: an
          // SSE body is replayed as SSE whatever the request's `stream` said.
          if (storeInCache && r.cacheKey && ans?.cacheable) {
            store(r.cacheKey, r.tenant, { body: ans.body, stream: ans.sse, status: 200, storedAt: Date.now() });
          }
          r.resolve(respond(r, ans?.status ?? 502, ans?.headers, ans?.body ?? '', [['x-unbusy', note(r, undefined, a3)]], ans?.bytes));
          finish(r);
          break;
        }
        case SERVE_CACHE: {
          const e = r.cached;
          const extra = [
            ['content-type', e?.stream ? 'text/event-stream' : 'application/json'],
            ['x-unbusy', note(r, a2 === 1 ? CACHE_STALE : CACHE_HIT, a3)],
          ];
          r.resolve(respond(r, 200, null, e?.body ?? '', extra));
          finish(r);
          break;
        }
        default: {
          const headers = JSON.parse(engine.replyHeaders());
          r.resolve(respond(r, a2, headers, engine.replyBody(), [['x-unbusy', note(r, undefined, a3)]]));
          finish(r);
          break;
        }
      }
    }

    /** Sends an attempt; `rewrites`: the engine changes the body (model mapping, max_tokens cap). */
    function send(r, attempt, provider, rewrites) {
      r.attempt = attempt;
      r.attemptNo = attempt;
      r.provider = provider;
      r.attemptReader = null;
      const target = route(provider);
      const headers = attemptHeaders(r.headers, target.authorization);
      // (`request::rewrite_body`, as the Envoy filter rewrites it.)
      const body = (rewrites && engine.rewriteBody(r.bodyText)) || r.bodyText;
      // An AbortController per attempt is the only way to stop one that hangs before its
      // headers, and fetch's bookkeeping for a signal is about 12 µs a call in Node. So an
      // attempt carries one when it may be aborted from outside (the caller gave a signal),
      // when it is a retry (something already went wrong), or when its provider left an attempt
      // hanging before its headers in the last ten minutes. Otherwise an abort before the
      // headers abandons the attempt (its answer is ignored; the connection ends at the
      // runtime's own timeout) and marks the provider; after the headers, cancelling the body
      // stops it either way.
      const guarded = r.signal || attempt > 1 || now() - (hungAt[provider] ?? -Infinity) < HUNG_MEMORY_MS;
      const init = { method: 'POST', headers, body };
      if (guarded) {
        r.attemptAbort = new AbortController();
        init.signal = r.attemptAbort.signal;
      } else {
        r.attemptAbort = null;
      }
      // The caller's own URL for the provider it is under; for any other, the endpoint under
      // that provider's base URL, whatever prefix each has (`request::Endpoint::under`).
      const url = provider === r.home ? r.url : target.origin + wasm.endpointUnder(target.base, r.suffix);
      baseFetch(url, init).then(
        (resp) => answer(r, attempt, resp),
        (err) => {
          if (r.attemptNo !== attempt || !requests.has(r.id)) return;
          const kind = /refused|ECONNREFUSED|ENOTFOUND/i.test(String(err?.cause?.code ?? err)) ? 'refused' : 'reset';
          engine.onFault(now(), r.id, attempt, kind);
          drain();
        },
      );
    }

    /** Reads an attempt's body whole (as bytes) through a reader the attempt can be stopped by. */
    async function readAll(r, resp) {
      const reader = resp.body.getReader();
      r.attemptReader = reader;
      const chunks = [];
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
      }
      return chunks.length === 1 ? chunks[0] : concat(chunks);
    }

    /** The headers the core's verdict reads, as `[[name, value], ...]` JSON: the content type,
     * the encoding when fetch left the body encoded, and (for an error) the provider's hints. */
    function verdictHeaders(resp, contentType, unreadable, ok) {
      const pairs = [];
      if (contentType !== null) pairs.push(['content-type', contentType]);
      if (unreadable) pairs.push(['content-encoding', resp.headers.get('content-encoding')]);
      if (!ok) {
        for (const [n, v] of resp.headers) {
          if (/^(retry-after|retry-after-ms|x-ratelimit-reset)/i.test(n)) pairs.push([n, v]);
        }
      }
      return pairs.length ? JSON.stringify(pairs) : '';
    }

    async function answer(r, attempt, resp) {
      // Whether this attempt is still the one listened to (an abort or a newer attempt ends it).
      const live = () => r.attemptNo === attempt && requests.has(r.id);
      if (!live()) {
        resp.body?.cancel().catch(() => {});
        return;
      }
      const ok = resp.status >= 200 && resp.status < 300;
      const contentType = resp.headers.get('content-type');
      const sse = contentType !== null && SSE.test(contentType);
      // fetch decodes the codings it knows and leaves `content-encoding` in place.
      const unreadable = undecoded(resp.headers.get('content-encoding'), decodes);
      if (r.stream && ok && sse && resp.body) {
        streamAnswer(r, attempt, resp, unreadable);
        return;
      }
      // Held whole (a non-streaming answer, an error, or a stream request answered with
      // something that is not a stream) and judged whole by the core before anything is
      // delivered or cached: truncated JSON, an HTML page, an error object and keep-alive bytes
      // only are failures, retried or failed over like any other.
      let bytes = EMPTY;
      try {
        if (resp.body) bytes = await readAll(r, resp);
      } catch {
        if (!live()) return;
        if (ok) {
          engine.onFault(now(), r.id, attempt, 'stall');
          drain();
          return;
        }
        /* an error cut short: judged by what its status says */
      }
      if (!live()) return;
      const cacheable = engine.onAnswer(now(), r.id, attempt, resp.status, verdictHeaders(resp, contentType, unreadable, ok), ok ? bytes : bytes.subarray(0, 512), Date.now() / 1000);
      r.answer = {
        status: resp.status,
        headers: resp.headers,
        body: unreadable ? '' : decoder.decode(bytes),
        bytes: unreadable ? bytes : undefined,
        cacheable: cacheable === 1 && !unreadable,
        sse,
      };
      drain();
    }

    /** A streamed answer: held until its first real event (keep-alive bytes never reach the
     * caller), then streamed on; it is an answer, and cached, only if it ends with `[DONE]`. */
    async function streamAnswer(r, attempt, resp, unreadable) {
      const live = () => r.attemptNo === attempt && requests.has(r.id);
      const tracker = new wasm.ProgressTracker(true);
      const reader = resp.body.getReader();
      r.attemptReader = reader;
      const held = [];
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (!live()) {
            reader.cancel().catch(() => {});
            return;
          }
          if (done) break;
          // Bytes fetch left encoded cannot be told from keep-alive ones: any byte is progress.
          const feed = unreadable ? (value.length ? 1 : 0) : tracker.feed(value);
          if (feed === 0) continue; // keep-alive: never shown to the caller
          held.push(value);
          engine.onFirstProgress(now(), r.id, attempt);
          startStream(r, attempt, resp, reader, held, unreadable);
          drain();
          return;
        }
      } catch {
        if (!live()) return;
        engine.onFault(now(), r.id, attempt, 'stall');
        drain();
        return;
      } finally {
        tracker.free?.();
      }
      // Ended with keep-alive bytes only: a stall in disguise (the core's verdict on it).
      r.answer = { status: 200, headers: resp.headers, body: '', cacheable: false, sse: true };
      engine.onAnswer(now(), r.id, attempt, 200, verdictHeaders(resp, resp.headers.get('content-type'), false, true), EMPTY, Date.now() / 1000);
      drain();
    }

    function startStream(r, attempt, resp, reader, held, unreadable) {
      const copy = [];
      const headers = new Headers(resp.headers);
      headers.set('x-unbusy', note(r));
      headers.delete('content-length');
      if (!unreadable) headers.delete('content-encoding');
      // Whether the bytes the caller got so far end with `data: [DONE]` (`answer::DoneTracker`).
      const tracker = new wasm.DoneTracker();
      let complete = false;
      let ended = false;
      let controller;
      const pass = (chunk) => {
        tracker.feed(chunk);
        controller.enqueue(chunk);
        copy.push(chunk);
      };
      /** The stream is over, however it ended; `finished`: its body ended or the caller stopped
       * reading (then it is an answer if it was complete), else it failed or was aborted. */
      const end = (finished) => {
        if (ended) return false;
        ended = true;
        complete = unreadable || tracker.complete();
        // The usage chunk it carried, for the request's `requestFinished` event.
        if (finished && requests.has(r.id)) engine.onStreamUsage(r.id, tracker);
        tracker.free();
        if (!finished || !requests.has(r.id)) return true;
        // Complete: a success, stored if the engine says so; cut short before `[DONE]`: the
        // provider's failure (the caller has its bytes, so it is not retried) and never cached.
        engine.onStreamEnd(now(), r.id, attempt, complete);
        drain();
        if (complete && !unreadable && r.storeStream && r.cacheKey) {
          store(r.cacheKey, r.tenant, { body: decoder.decode(concat(copy)), stream: true, status: 200, storedAt: Date.now() });
        }
        finish(r);
        return true;
      };
      const body = new ReadableStream({
        start(c) {
          controller = c;
          for (const chunk of held) pass(chunk);
        },
        cancel() {
          reader.cancel().catch(() => {});
          if (ended) return;
          // A caller that stops reading once it has `[DONE]` (the openai SDK from v5 on) got a
          // whole answer: a success, cached as one. Before it, the caller gave up.
          if (tracker.complete()) {
            end(true);
            return;
          }
          end(false);
          if (!requests.has(r.id)) return;
          engine.cancel(now(), r.id);
          finish(r);
          drain();
        },
      });
      r.streaming = {
        /** The engine cut the stream (stalled, or past its deadline). */
        error: (e) => {
          end(false);
          try {
            controller.error(e);
          } catch {
            /* the caller's stream already ended */
          }
        },
        /** The caller's signal fired: true when the stream was already complete (then it is
         * a success), else the caller's stream errors with the signal's reason. */
        abort: (e) => {
          if (!ended && tracker.complete()) {
            reader.cancel().catch(() => {});
            end(true);
            return true;
          }
          end(false);
          try {
            controller.error(e);
          } catch {
            /* already ended */
          }
          return false;
        },
      };
      r.resolve(new Response(body, { status: 200, headers }));
      (async () => {
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (ended) return;
            if (done) break;
            pass(value);
            engine.onProgress(now(), r.id, attempt);
          }
          controller.close();
          end(true);
        } catch (e) {
          if (ended) return;
          end(false);
          try {
            controller.error(e);
          } catch {
            /* already errored */
          }
          if (requests.has(r.id)) {
            engine.onFault(now(), r.id, attempt, 'reset');
            drain();
            finish(r);
          }
        }
      })();
    }

    function concat(chunks) {
      let n = 0;
      for (const c of chunks) n += c.length;
      const out = new Uint8Array(n);
      let i = 0;
      for (const c of chunks) {
        out.set(c, i);
        i += c.length;
      }
      return out;
    }

    function providerOf(url) {
      for (const p of providers) {
        if (p.baseUrl && (url === p.baseUrl || url.startsWith(p.baseUrl + '/'))) return p;
      }
      return null;
    }

    /** The managed request, once the core has read it (`handle`) and its cache entry is looked up. */
    function start(p, url, suffix, signal, bodyText, requestHeaders, handle, stream, key, tenant, cached) {
      return new Promise((resolve, reject) => {
        // Fresh, stale or expired is the core's rule (`CacheLookup::for_age`), from the age.
        const id = engine.admit(now(), handle, cached ? Math.max(0, Date.now() - cached.storedAt) : NaN);
        const r = {
          id,
          resolve,
          reject,
          signal,
          headers: requestHeaders, // copied per attempt, in send()
          bodyText,
          url,
          suffix,
          home: p.index,
          stream,
          cacheKey: key,
          tenant,
          cached,
          cacheNote: key ? CACHE_MISS : CACHE_NONE,
          attempt: 0,
          attemptNo: 0,
          provider: 0,
        };
        if (signal) {
          r.onAbort = () => {
            if (!requests.has(id)) return;
            if (r.streaming?.abort(abortError(signal))) return; // it had its [DONE]: an answer
            abortAttempt(r);
            engine.cancel(now(), id);
            finish(r);
            reject(abortError(signal));
            drain();
          };
          signal.addEventListener?.('abort', r.onAbort, { once: true });
        }
        requests.set(id, r);
        drain();
      });
    }

    /** The headers the core reads, as `[[name, value], ...]` JSON ('' for none). */
    function readable(headers) {
      let out = '';
      for (const name of readHeaders) {
        const v = headerOf(headers, name);
        if (v !== null && v !== undefined) out += (out ? ',' : '[') + JSON.stringify([name, v]);
      }
      return out && out + ']';
    }

    function prepare(p, url, suffix, signal, bodyText, requestHeaders) {
      // The core's one reading of the request (`request::read`, as the Envoy filter reads it):
      // tenant, priority, deadline, cache opt-in, model, stream, token estimate, cache key.
      const key = engine.read(readable(requestHeaders), bodyText);
      const v = actionNumbers();
      const handle = v[0];
      const stream = v[1] === 1;
      if (handle === 0) {
        // Refused (a body that is not a JSON object, a per-request header it does not define).
        return Promise.resolve(respond(null, v[2], JSON.parse(engine.replyHeaders()), engine.replyBody(), []));
      }
      if (!key) return start(p, url, suffix, signal, bodyText, requestHeaders, handle, stream, undefined, undefined, undefined);
      // The request's tenant id (the core's, in hex), for stores that keep it beside the key.
      const tenant = engine.tenantOf(handle);
      let pending;
      try {
        pending = Promise.resolve(cache.get(key, { tenant }));
      } catch {
        pending = Promise.resolve(undefined);
      }
      return pending.then(
        (cached) => start(p, url, suffix, signal, bodyText, requestHeaders, handle, stream, key, tenant, cached),
        () => start(p, url, suffix, signal, bodyText, requestHeaders, handle, stream, key, tenant, undefined),
      );
    }

    // Active health checks (`healthCheck`, off by default; the rules are the core's
    // `health` module): a GET of `healthCheck.path` with each provider's key on an interval,
    // so a provider that went down while nothing was sent to it is skipped by the next request.
    // The timers are unref'd where they can be (Node): probes never keep a process alive.
    if (snakeConfig.health_check?.enabled) {
      const probeTimeout = engine.probeTimeoutMs();
      const later = (f, ms) => {
        const t = setTimeout(f, ms);
        if (typeof t === 'object' && t?.unref) t.unref();
        return t;
      };
      const probe = async (provider) => {
        const target = route(provider);
        const headers = target.authorization ? { authorization: target.authorization } : {};
        const controller = new AbortController();
        const timeout = later(() => controller.abort(), probeTimeout);
        let status = 0; // no answer: a network error or the timeout
        try {
          const answer = await baseFetch(target.origin + engine.probePath(provider), {
            method: 'GET',
            headers,
            signal: controller.signal,
          });
          status = answer.status;
          answer.body?.cancel().catch(() => {});
        } catch {
          /* no answer */
        } finally {
          clearTimeout(timeout);
        }
        const changed = engine.onProbe(now(), provider, status);
        if (changed >= 0 && onEvent) {
          try {
            onEvent({ type: 'providerHealth', provider, providerName: providers[provider]?.name ?? '', up: changed === 1, status });
          } catch {
            /* a listener's error is its own */
          }
        }
      };
      const probeDue = () => {
        let provider;
        while ((provider = engine.nextProbe(now())) >= 0) probe(provider);
        const at = engine.nextProbeAt();
        if (!Number.isNaN(at)) later(probeDue, Math.max(1, Math.ceil(at - now())));
      };
      probeDue();
    }

    return function unbusyFetch(input, init) {
      try {
        const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
        const method = init?.method ?? (typeof input === 'object' ? input.method : undefined) ?? 'GET';
        const p = providerOf(url);
        if (!p) {
          if (unmatched === 'error') {
            return Promise.reject(new TypeError(`unbusy: ${url} is under no configured provider's baseUrl (${providers.map((q) => q.baseUrl).join(', ')}); options.unmatched is 'error'`));
          }
          return baseFetch(input, init); // not ours: untouched
        }
        // Managed: POST to chat/completions (`request::Endpoint`, whatever the prefix).
        const suffix = url.slice(p.baseUrl.length);
        if (!(method === 'POST' || String(method).toUpperCase() === 'POST') || wasm.endpointOf(suffix) !== 1) {
          return baseFetch(input, init); // a provider's other endpoints: untouched
        }
        const signal = init?.signal ?? (typeof input === 'object' ? input.signal : undefined);
        if (signal?.aborted) return Promise.reject(abortError(signal));
        // The common case (a URL string and a string body, as SDKs send) needs no Request copy
        // and, unless a cache entry must be looked up, no await before the engine has it.
        if (typeof input === 'string' && typeof init?.body === 'string') {
          return prepare(p, url, suffix, signal, init.body, init.headers);
        }
        const request = new Request(input, init);
        return request.text().then((bodyText) => prepare(p, url, suffix, signal, bodyText, request.headers));
      } catch (e) {
        return Promise.reject(e);
      }
    };
  };
}
