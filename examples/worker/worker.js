// A Cloudflare-style worker answering chat/completions through unbusy: the busy primary's
// 503s, 429s and keep-alive stalls become answers from the backup, and answers to cacheable
// requests (temperature 0) are kept across requests in KV (an ANSWERS binding) or else the
// Cache API. Deploy with wrangler (which resolves `unbusy` to its workerd build and the .wasm to
// a compiled module), or bundle it yourself with the `workerd` condition (README, "Workers"), as
// `make test` does before running it in workerd through miniflare. PRIMARY and BACKUP are the
// providers' base URLs (vars or secrets).
import { createFetch } from 'unbusy';

// KV: entries expire at least 60 s after they are written (KV's least expirationTtl).
const kvStore = (kv) => ({
  get: (key) => kv.get(key, 'json').then((v) => v ?? undefined),
  set: (key, value, ttlMs) => kv.put(key, JSON.stringify(value), { expirationTtl: Math.max(60, Math.ceil(ttlMs / 1000)) }),
});

// The Cache API: the data center's cache (it stores nothing on a workers.dev subdomain).
const cacheApiStore = (cache) => ({
  async get(key) {
    const r = await cache.match(`https://unbusy.cache/${key}`);
    return r ? r.json() : undefined;
  },
  set: (key, value, ttlMs) =>
    cache.put(`https://unbusy.cache/${key}`, new Response(JSON.stringify(value), {
      headers: { 'cache-control': `max-age=${Math.ceil(ttlMs / 1000)}` },
    })),
});

// One unbusy fetch per incoming request: the Workers runtime forbids one request's I/O
// (fetches, timers) from completing another request's promises, so the engine and its timers
// live with the request (retries, failover and deadlines all happen inside it). Its cache
// outlives it in the store.
export default {
  async fetch(request, env, ctx) {
    const unbusyFetch = createFetch(
      {
        providers: [
          { name: 'primary', baseUrl: env.PRIMARY },
          { name: 'backup', baseUrl: env.BACKUP },
        ],
        deadlines: { firstTokenMs: 1500, responseMs: 3000, totalMs: 20000 },
      },
      {
        cache: env.ANSWERS ? kvStore(env.ANSWERS) : cacheApiStore(caches.default),
        // A store's write finishes after the answer went out: keep the worker alive for it.
        waitUntil: (p) => ctx.waitUntil(p),
      },
    );
    const body = await request.text();
    return unbusyFetch(`${env.PRIMARY}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: request.headers.get('authorization') ?? '' },
      body,
      signal: request.signal,
    });
  },
};
