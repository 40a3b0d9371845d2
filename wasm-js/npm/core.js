// unbusy: the engine as a drop-in `fetch`. This file is the host: it turns `fetch` calls and
// their answers into engine calls, and the engine's actions into `fetch`es, timers and
// Responses. Every decision (which provider, retry or not, when, what to cache, when to give
// up) is the engine's, in the wasm module.

const CHAT = /\/chat\/completions\/?$/;
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

function abortError(signal) {
  return signal?.reason ?? new DOMException('The operation was aborted.', 'AbortError');
}

/**
 * Builds the `fetch` for a configuration in the engine's schema (camelCase keys).
 * Throws at once, naming the field, when the configuration is invalid.
 */
export function makeCreateFetch(wasm) {
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
    const tenantHeader = snakeConfig.tenancy?.header;
    const requests = new Map();
    let timer = null;
    let timerAt = Infinity;

    function emit() {
      if (!onEvent) {
        engine.discardEvents(); // nobody listens: not worth encoding
        return;
      }
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

    function onError(action, e) {
      const r = requests.get(action[1]);
      if (r && action[0] !== ABORT) {
        engine.cancel(now(), r.id);
        finish(r);
        r.reject(e);
      }
    }

    function schedule() {
      if (requests.size === 0) {
        // Nothing left to time: no stray timer keeps a process or a worker request alive.
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

    // The engine's actions come as numbers (see `nextAction` in wasm-js/src/lib.rs); strings
    // are asked for only when an action has them.
    function decode(v) {
      const request = v[1];
      switch (v[0]) {
        case SEND: {
          const route = (routes[v[3]] ??= JSON.parse(engine.route(v[3])));
          return {
            type: 'send',
            request,
            attempt: v[2],
            provider: v[3],
            rewrite: {
              baseUrl: route.baseUrl,
              authorization: route.authorization,
              model: v[5] === 1 ? engine.actionModel() : null,
              maxTokensCap: Number.isNaN(v[4]) ? null : v[4],
            },
          };
        }
        case ABORT:
          return { type: 'abort', request, attempt: v[2], reason: ABORT_REASONS[v[3]] };
        case DELIVER:
          return { type: 'deliver', request, storeInCache: v[2] === 1 };
        case SERVE_CACHE:
          return { type: 'serveCache', request, stale: v[2] === 1 };
        default:
          return { type: 'reply', request, status: v[2], headers: JSON.parse(engine.replyHeaders()), body: engine.replyBody() };
      }
    }

    function drain() {
      for (;;) {
        const action = engine.nextAction();
        if (!action) break;
        // One action failing (a runtime refusing an abort, say) must not drop the others:
        // the next one is often the failover that answers the caller.
        try {
          act(decode(action));
        } catch (e) {
          onError(action, e);
        }
      }
      emit();
      schedule();
    }

    function note(r, extra) {
      const provider = r.attempt > 0 ? providers[r.provider]?.name ?? 'none' : 'none';
      return `provider=${provider}; attempts=${r.attempt}; cache=${extra ?? r.cacheNote}; tier=${engine.tier()}`;
    }

    function finish(r) {
      requests.delete(r.id);
      r.signal?.removeEventListener?.('abort', r.onAbort);
    }

    function act(a) {
      const r = requests.get(a.request);
      if (!r) return;
      switch (a.type) {
        case 'send':
          send(r, a);
          break;
        case 'abort':
          if (r.attemptNo !== a.attempt) break;
          try {
            r.attemptAbort?.abort();
          } catch {
            /* the runtime may refuse to abort a body it is reading; the attempt is dropped anyway */
          }
          r.attemptAbort = null;
          if (r.streaming) {
            // Bytes already reached the caller: end their stream here.
            try {
              r.streaming.error(new Error(`unbusy: the provider stopped making progress (${a.reason})`));
            } catch {
              /* the caller's stream already ended */
            }
            finish(r);
          }
          break;
        case 'deliver': {
          const ans = r.answer;
          if (a.storeInCache && r.cacheKey && ans && !r.stream) {
            cache.set(r.cacheKey, { body: ans.body, stream: false, status: 200, storedAt: Date.now() }, cacheTtl + staleTtl);
          }
          if (r.streaming) {
            r.storeStream = a.storeInCache;
            break; // already flowing; finished when the stream ends
          }
          const headers = new Headers(ans?.headers ?? {});
          headers.set('x-unbusy', note(r));
          headers.delete('content-length');
          headers.delete('content-encoding');
          r.resolve(new Response(ans?.body ?? '', { status: ans?.status ?? 502, headers }));
          finish(r);
          break;
        }
        case 'serveCache': {
          const e = r.cached;
          const headers = new Headers({
            'content-type': e?.stream ? 'text/event-stream' : 'application/json',
            'x-unbusy': note(r, a.stale ? 'stale' : 'hit'),
          });
          r.resolve(new Response(e?.body ?? '', { status: 200, headers }));
          finish(r);
          break;
        }
        case 'reply': {
          const headers = new Headers(a.headers);
          headers.set('x-unbusy', note(r));
          r.resolve(new Response(a.body, { status: a.status, headers }));
          finish(r);
          break;
        }
      }
    }

    function send(r, a) {
      r.attempt = a.attempt;
      r.attemptNo = a.attempt;
      r.provider = a.provider;
      const target = providers[a.provider];
      const url = (a.rewrite.baseUrl ?? target.baseUrl).replace(/\/+$/, '') + r.suffix;
      const headers = new Headers(r.headers);
      if (a.rewrite.authorization) headers.set('authorization', a.rewrite.authorization);
      headers.delete('content-length');
      let body = r.bodyText;
      if (a.rewrite.model || a.rewrite.maxTokensCap) {
        const v = { ...r.json };
        if (a.rewrite.model) v.model = a.rewrite.model;
        if (a.rewrite.maxTokensCap) v.max_tokens = Math.min(v.max_tokens ?? Infinity, a.rewrite.maxTokensCap);
        body = JSON.stringify(v);
      }
      const ctl = new AbortController();
      r.attemptAbort = ctl;
      const attempt = a.attempt;
      baseFetch(url, { method: 'POST', headers, body, signal: ctl.signal }).then(
        (resp) => answer(r, attempt, resp, ctl),
        (err) => {
          if (ctl.signal.aborted || !requests.has(r.id)) return;
          const kind = /refused|ECONNREFUSED|ENOTFOUND/i.test(String(err?.cause?.code ?? err)) ? 'refused' : 'reset';
          engine.onFault(now(), r.id, attempt, kind);
          drain();
        },
      );
    }

    async function answer(r, attempt, resp, ctl) {
      const live = () => requests.has(r.id) && r.attemptNo === attempt && !ctl.signal.aborted;
      const type = resp.headers.get('content-type') ?? '';
      if (resp.status !== 200 || !resp.body) {
        // The provider's hints (a success needs none).
        const hintHeaders = [];
        for (const [n, v] of resp.headers) {
          if (/^(retry-after|retry-after-ms|x-ratelimit-reset)/i.test(n)) hintHeaders.push([n, v]);
        }
        let text = '';
        try {
          text = await resp.text();
        } catch {
          /* cut short */
        }
        if (!live()) return;
        r.answer = { status: resp.status, headers: resp.headers, body: text };
        engine.onResponse(now(), r.id, attempt, resp.status, JSON.stringify(hintHeaders), encoder.encode(text.slice(0, 512)), false, Date.now() / 1000);
        drain();
        return;
      }
      if (!r.stream) {
        // Held whole anyway: read it at once; blank lines only means a stall in disguise.
        let text;
        try {
          text = await resp.text();
        } catch {
          if (!live()) return;
          engine.onFault(now(), r.id, attempt, 'stall');
          drain();
          return;
        }
        if (!live()) return;
        // The core's JSON rule (progress.rs): any byte that is not JSON whitespace is real.
        const real = /[^ \t\n\r]/.test(text);
        if (real) engine.onFirstProgress(now(), r.id, attempt);
        r.answer = { status: 200, headers: resp.headers, body: text };
        engine.onResponse(now(), r.id, attempt, 200, '[]', EMPTY, !real, Date.now() / 1000);
        drain();
        return;
      }
      const tracker = new wasm.ProgressTracker(type.includes('event-stream'));
      const reader = resp.body.getReader();
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
      if (held.length) engine.onFirstProgress(now(), r.id, attempt);
      r.answer = { status: 200, headers: resp.headers, body: text };
      engine.onResponse(now(), r.id, attempt, 200, '[]', encoder.encode(text.slice(0, 512)), held.length === 0, Date.now() / 1000);
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
          engine.onResponse(now(), r.id, attempt, 200, '[]', new Uint8Array(), false, Date.now() / 1000);
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

    return async function unbusyFetch(input, init) {
      const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url;
      const method = String(init?.method ?? (typeof input === 'object' ? input.method : undefined) ?? 'GET').toUpperCase();
      const p = method === 'POST' ? providerOf(url) : null;
      if (!p || !CHAT.test(url.split('?')[0])) {
        return baseFetch(input, init); // not ours: untouched
      }
      const signal = init?.signal ?? (typeof input === 'object' ? input.signal : undefined);
      if (signal?.aborted) throw abortError(signal);
      // The common case (a URL string and a string body, as SDKs send) needs no Request copy.
      const simple = typeof input === 'string' && typeof init?.body === 'string';
      const request = simple ? null : new Request(input, init);
      const bodyText = simple ? init.body : await request.text();
      const requestHeaders = simple ? new Headers(init.headers) : request.headers;
      let json;
      try {
        json = JSON.parse(bodyText);
      } catch {
        json = null;
      }
      if (!json || typeof json !== 'object' || Array.isArray(json)) {
        return baseFetch(input, { ...init, body: bodyText }); // let the provider say what is wrong
      }
      const tenant = (tenantHeader && requestHeaders.get(tenantHeader)) || requestHeaders.get('authorization') || snakeConfig.tenancy?.default_tenant || 'anonymous';
      const stream = json.stream === true;
      const cacheOn = snakeConfig.cache?.enabled !== false;
      const key = cacheOn ? wasm.cacheKey(tenant, encoder.encode(bodyText), 0) : undefined;
      let cached;
      let lookup = 0;
      if (key) {
        try {
          cached = await cache.get(key);
        } catch {
          cached = undefined;
        }
        if (cached) {
          const age = Date.now() - cached.storedAt;
          lookup = age < cacheTtl ? 1 : age < cacheTtl + staleTtl ? 2 : 0;
          if (lookup === 0) cached = undefined;
        }
      }
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
        r.onAbort = () => {
          if (!requests.has(id)) return;
          r.attemptAbort?.abort();
          engine.cancel(now(), id);
          finish(r);
          reject(abortError(signal));
          drain();
        };
        signal?.addEventListener?.('abort', r.onAbort, { once: true });
        requests.set(id, r);
        drain();
      });
    };
  };
}
