// unbusy: the engine as a drop-in `fetch`. This file is the host: it turns `fetch` calls and
// their answers into engine calls, and the engine's actions into `fetch`es, timers and
// Responses. Every decision (which provider, retry or not, when, what to cache, when to give
// up) is the engine's, in the wasm module.

const CHAT = /\/chat\/completions\/?(?:[?#]|$)/;
const NEVER_SNAKE = new Set(['models', 'model_fallbacks']); // their keys are model names

function snake(key) {
  return key.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
}

function toSnake(value, parent) {
  if (Array.isArray(value)) return value.map((v) => toSnake(v, parent));
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      const key = NEVER_SNAKE.has(parent) ? k : snake(k);
      out[key] = toSnake(v, key);
    }
    return out;
  }
  return value;
}

function camel(message) {
  return message.replace(/([a-z0-9])_([a-z])/g, (_, a, b) => a + b.toUpperCase());
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

/** An attempt's request headers: the caller's, less content-length, with the provider's
 * credentials. A plain object stays one (fetch converts it once, as for a direct call). */
function attemptHeaders(headers, authorization) {
  if (headers && typeof headers === 'object' && !Array.isArray(headers) && typeof headers.get !== 'function') {
    const out = {};
    for (const k in headers) {
      const lower = k.toLowerCase();
      if (lower === 'content-length' || (authorization && lower === 'authorization')) continue;
      out[k] = headers[k];
    }
    if (authorization) out.authorization = authorization;
    return out;
  }
  const out = new Headers(headers ?? undefined);
  if (authorization) out.set('authorization', authorization);
  out.delete('content-length');
  return out;
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
    // Listing order is preference unless a provider says otherwise.
    const withOrder = {
      ...config,
      providers: (config?.providers ?? []).map((p, i) => ({ priority: i, ...p })),
    };
    const snakeConfig = toSnake(withOrder);
    let engine;
    try {
      engine = new wasm.JsEngine(JSON.stringify(snakeConfig), Math.random() * 2 ** 52);
    } catch (e) {
      throw new TypeError('unbusy: invalid configuration: ' + camel(String(e?.message ?? e)));
    }
    const providers = (config.providers ?? []).map((p) => ({
      name: p.name,
      baseUrl: String(p.baseUrl ?? '').replace(/\/+$/, ''),
    }));
    const cache = options.cache ?? new MemoryCache({ maxBytes: snakeConfig.cache?.max_bytes });
    const cacheTtl = snakeConfig.cache?.ttl_ms ?? 300000;
    const staleTtl = snakeConfig.cache?.stale_ttl_ms ?? 3600000;
    const tenantHeader = snakeConfig.tenancy?.header?.toLowerCase();
    const cacheOn = snakeConfig.cache?.enabled !== false;
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

    /** The `x-unbusy` header. `tier` comes with the action when there is one. */
    function note(r, extra, tier = engine.tier()) {
      const provider = r.attempt > 0 ? providers[r.provider]?.name ?? 'none' : 'none';
      return `provider=${provider}; attempts=${r.attempt}; cache=${extra ?? r.cacheNote}; tier=${tier}`;
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

    /** The caller's answer: a HeldResponse where the host allows it, else a Response. */
    function respond(r, status, headerSource, text, extra) {
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
          send(r, a2, a3, Number.isNaN(a4) ? null : a4, a5 === 1 ? engine.actionModel() : null);
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
          const ans = r.answer;
          if (storeInCache && r.cacheKey && ans && !r.stream) {
            cache.set(r.cacheKey, { body: ans.body, stream: false, status: 200, storedAt: Date.now() }, cacheTtl + staleTtl);
          }
          if (r.streaming) {
            r.storeStream = storeInCache;
            break; // already flowing; finished when the stream ends
          }
          r.resolve(respond(r, ans?.status ?? 502, ans?.headers, ans?.body ?? '', [['x-unbusy', note(r, undefined, a3)]]));
          finish(r);
          break;
        }
        case SERVE_CACHE: {
          const e = r.cached;
          const extra = [
            ['content-type', e?.stream ? 'text/event-stream' : 'application/json'],
            ['x-unbusy', note(r, a2 === 1 ? 'stale' : 'hit', a3)],
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

    function send(r, attempt, provider, maxTokensCap, model) {
      r.attempt = attempt;
      r.attemptNo = attempt;
      r.provider = provider;
      r.attemptReader = null;
      const target = route(provider);
      const headers = attemptHeaders(r.headers, target.authorization);
      let body = r.bodyText;
      if (model || maxTokensCap) {
        const v = { ...r.json };
        if (model) v.model = model;
        if (maxTokensCap) v.max_tokens = Math.min(v.max_tokens ?? Infinity, maxTokensCap);
        body = JSON.stringify(v);
      }
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
      baseFetch(target.base + r.suffix, init).then(
        (resp) => answer(r, attempt, resp),
        (err) => {
          if (r.attemptNo !== attempt || !requests.has(r.id)) return;
          const kind = /refused|ECONNREFUSED|ENOTFOUND/i.test(String(err?.cause?.code ?? err)) ? 'refused' : 'reset';
          engine.onFault(now(), r.id, attempt, kind);
          drain();
        },
      );
    }

    /** Reads an attempt's body whole through a reader the attempt can be stopped by. */
    async function readAll(r, resp) {
      const reader = resp.body.getReader();
      r.attemptReader = reader;
      const chunks = [];
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
      }
      return chunks.length === 1 ? decoder.decode(chunks[0]) : decoder.decode(concat(chunks));
    }

    async function answer(r, attempt, resp) {
      // Whether this attempt is still the one listened to (an abort or a newer attempt ends it).
      const live = () => r.attemptNo === attempt && requests.has(r.id);
      if (!live()) {
        resp.body?.cancel().catch(() => {});
        return;
      }
      if (resp.status !== 200 || !resp.body) {
        // The provider's hints (a success needs none).
        const hintHeaders = [];
        for (const [n, v] of resp.headers) {
          if (/^(retry-after|retry-after-ms|x-ratelimit-reset)/i.test(n)) hintHeaders.push([n, v]);
        }
        let text = '';
        try {
          if (resp.body) text = await readAll(r, resp);
        } catch {
          /* cut short */
        }
        if (!live()) return;
        r.answer = { status: resp.status, headers: resp.headers, body: text };
        engine.onResponse(now(), r.id, attempt, resp.status, hintHeaders.length ? JSON.stringify(hintHeaders) : '', encoder.encode(text.slice(0, 512)), false, false, Date.now() / 1000);
        drain();
        return;
      }
      if (!r.stream) {
        // Held whole anyway: read it at once; blank lines only means a stall in disguise.
        let text;
        try {
          text = await readAll(r, resp);
        } catch {
          if (!live()) return;
          engine.onFault(now(), r.id, attempt, 'stall');
          drain();
          return;
        }
        if (!live()) return;
        // The core's JSON rule (progress.rs): any byte that is not JSON whitespace is real.
        const real = /[^ \t\n\r]/.test(text);
        r.answer = { status: 200, headers: resp.headers, body: text };
        engine.onResponse(now(), r.id, attempt, 200, '', EMPTY, !real, real, Date.now() / 1000);
        drain();
        return;
      }
      const tracker = new wasm.ProgressTracker((resp.headers.get('content-type') ?? '').includes('event-stream'));
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
          const feed = tracker.feed(value);
          if (feed === 0) continue; // keep-alive: never shown to the caller
          held.push(value);
          if (r.stream && feed === 1) {
            engine.onFirstProgress(now(), r.id, attempt);
            startStream(r, attempt, resp, reader, held);
            drain();
            return;
          }
        }
      } catch {
        if (!live()) return;
        engine.onFault(now(), r.id, attempt, held.length ? 'reset' : 'stall');
        drain();
        return;
      } finally {
        tracker.free?.();
      }
      const text = decoder.decode(concat(held));
      r.answer = { status: 200, headers: resp.headers, body: text };
      engine.onResponse(now(), r.id, attempt, 200, '', encoder.encode(text.slice(0, 512)), held.length === 0, held.length > 0, Date.now() / 1000);
      drain();
    }

    function startStream(r, attempt, resp, reader, held) {
      const copy = [];
      const headers = new Headers(resp.headers);
      headers.set('x-unbusy', note(r));
      headers.delete('content-length');
      headers.delete('content-encoding');
      let controller;
      const body = new ReadableStream({
        start(c) {
          controller = c;
          for (const chunk of held) {
            c.enqueue(chunk);
            copy.push(chunk);
          }
        },
        cancel() {
          reader.cancel().catch(() => {});
          if (requests.has(r.id)) {
            engine.cancel(now(), r.id);
            finish(r);
            drain();
          }
        },
      });
      r.streaming = { error: (e) => controller.error(e) };
      r.resolve(new Response(body, { status: 200, headers }));
      (async () => {
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            controller.enqueue(value);
            copy.push(value);
            engine.onProgress(now(), r.id, attempt);
          }
          controller.close();
          if (!requests.has(r.id)) return;
          engine.onResponse(now(), r.id, attempt, 200, '', EMPTY, false, false, Date.now() / 1000);
          drain();
          if (r.storeStream && r.cacheKey) {
            cache.set(r.cacheKey, { body: decoder.decode(concat(copy)), stream: true, status: 200, storedAt: Date.now() }, cacheTtl + staleTtl);
          }
          finish(r);
        } catch (e) {
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

    /** The managed request, once its body is text and its cache entry looked up. */
    function start(p, url, signal, bodyText, requestHeaders, json, tenant, key, cached) {
      let lookup = 0;
      if (cached) {
        const age = Date.now() - cached.storedAt;
        lookup = age < cacheTtl ? 1 : age < cacheTtl + staleTtl ? 2 : 0;
        if (lookup === 0) cached = undefined;
      }
      const stream = json.stream === true;
      const suffix = url.slice(p.baseUrl.length);
      const tokens = Math.ceil(bodyText.length / 4) + (Number(json.max_tokens) || 1024);
      return new Promise((resolve, reject) => {
        const id = engine.admit(now(), tenant, String(json.model ?? ''), stream, 1, tokens, NaN, key ?? undefined, lookup);
        const r = {
          id,
          resolve,
          reject,
          signal,
          headers: requestHeaders, // copied per attempt, in send()
          bodyText,
          json,
          suffix,
          stream,
          cacheKey: key,
          cached,
          cacheNote: key ? 'miss' : 'none',
          attempt: 0,
          attemptNo: 0,
          provider: 0,
        };
        if (signal) {
          r.onAbort = () => {
            if (!requests.has(id)) return;
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

    function prepare(p, url, signal, bodyText, requestHeaders, input, init) {
      let json;
      try {
        json = JSON.parse(bodyText);
      } catch {
        json = null;
      }
      if (!json || typeof json !== 'object' || Array.isArray(json)) {
        return baseFetch(input, { ...init, body: bodyText }); // let the provider say what is wrong
      }
      const tenant = (tenantHeader && headerOf(requestHeaders, tenantHeader)) || headerOf(requestHeaders, 'authorization') || snakeConfig.tenancy?.default_tenant || 'anonymous';
      const key = cacheOn ? wasm.cacheKey(tenant, encoder.encode(bodyText), 0) : undefined;
      if (!key) return start(p, url, signal, bodyText, requestHeaders, json, tenant, undefined, undefined);
      let pending;
      try {
        pending = Promise.resolve(cache.get(key));
      } catch {
        pending = Promise.resolve(undefined);
      }
      return pending.then(
        (cached) => start(p, url, signal, bodyText, requestHeaders, json, tenant, key, cached),
        () => start(p, url, signal, bodyText, requestHeaders, json, tenant, key, undefined),
      );
    }

    return function unbusyFetch(input, init) {
      try {
        const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
        const method = init?.method ?? (typeof input === 'object' ? input.method : undefined) ?? 'GET';
        const p = method === 'POST' || String(method).toUpperCase() === 'POST' ? providerOf(url) : null;
        if (!p || !CHAT.test(url)) {
          return baseFetch(input, init); // not ours: untouched
        }
        const signal = init?.signal ?? (typeof input === 'object' ? input.signal : undefined);
        if (signal?.aborted) return Promise.reject(abortError(signal));
        // The common case (a URL string and a string body, as SDKs send) needs no Request copy
        // and, unless a cache entry must be looked up, no await before the engine has it.
        if (typeof input === 'string' && typeof init?.body === 'string') {
          return prepare(p, url, signal, init.body, init.headers, input, init);
        }
        const request = new Request(input, init);
        return request.text().then((bodyText) => prepare(p, url, signal, bodyText, request.headers, input, init));
      } catch (e) {
        return Promise.reject(e);
      }
    };
  };
}
