// Unit tests of the host's own pieces: the default cache store and the configuration's
// camelCase translation (model names inside `models` stay as written).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createFetch, MemoryCache } from 'unbusy';

test('MemoryCache evicts the least recently used entries beyond its byte bound', async () => {
  const c = new MemoryCache({ maxBytes: 400 });
  const entry = (n) => ({ body: 'x'.repeat(n), stream: false, status: 200, storedAt: Date.now() });
  await c.set('a', entry(100), 60000);
  await c.set('b', entry(100), 60000);
  assert.ok(await c.get('a')); // a is now the most recent
  await c.set('c', entry(100), 60000); // 3 x (100 + 64 overhead) > 400: the least recently used, b, goes
  assert.equal(await c.get('b'), undefined);
  assert.ok(await c.get('a'));
  assert.ok(await c.get('c'));
  await c.set('huge', entry(1000), 60000); // larger than the bound: not stored
  assert.equal(await c.get('huge'), undefined);
  await c.set('short', entry(10), 1);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(await c.get('short'), undefined, 'expired');
});

test('camelCase configuration reaches the engine; model names are not rewritten', () => {
  // Valid only if every camelCase key was translated: an unknown key would be refused.
  createFetch({
    providers: [{ name: 'p', baseUrl: 'http://127.0.0.1:9', maxConcurrency: 3, models: { 'gpt-4oMini': 'deepseek_chat' } }],
    retry: { maxAttempts: 3, baseMs: 100, capMs: 1000, maxHintMs: 5000 },
    deadlines: { firstTokenMs: 1000, responseMs: 2000, totalMs: 10000, stallMs: 5000 },
    cache: { ttlMs: 1000, staleTtlMs: 1000, maxBytes: 1 << 20, maxEntryBytes: 1 << 16 },
    degradation: { modelFallbacks: { 'big-Model': 'small_model' }, maxTokensCap: 512 },
    tenancy: { header: 'x-tenant', defaultTenant: 'anon' },
  });
  assert.throws(() => createFetch({ providers: [{ name: 'p', baseUrl: 'http://x', bogusField: 1 }] }), /bogusField|bogus_field|unknown field/);
});

test('a key named by an environment variable is refused: only the Envoy filter reads one', () => {
  // Accepted silently, the caller's own key would go to the provider instead.
  assert.throws(
    () => createFetch({ providers: [{ name: 'p', baseUrl: 'http://x', apiKeyEnv: 'UNBUSY_KEY_P' }] }),
    /providers\[0\]\.apiKeyEnv is read only by the Envoy filter; pass apiKey/,
  );
});

test("the wasm module's allocator: bodies of every size round-trip, and memory is reused", async () => {
  const glue = await import('../pkg/unbusy_js.js');
  const { memory } = glue.initSync({ module: new Uint8Array() }); // already initialised by the import above
  // Reading a request copies the body into wasm memory and canonicalises it for the cache key
  // (many small allocations, growing buffers): equal bodies must give equal keys however the
  // heap is laid out, different ones different keys, and freed blocks must be reused.
  const engine = new glue.JsEngine(JSON.stringify({ providers: [{ name: 'p', base_url: 'http://p' }] }), 1);
  engine.listen(false);
  const actions = new Float64Array(memory.buffer, engine.actionBuffer(), 6);
  const body = (n, salt) =>
    JSON.stringify({ model: 'm', temperature: 0, messages: [{ role: 'user', content: String(salt).padEnd(n, 'x') }] });
  const sizes = [1, 15, 16, 17, 1000, 4095, 4096, 65535, 65536, 65537, 300000, 1 << 20];
  const keys = new Map();
  for (let round = 0; round < 3; round++) {
    for (const n of sizes) {
      for (const salt of ['a', 'b']) {
        const k = engine.read('[["authorization","Bearer tenant"]]', body(n, salt));
        // (Admitted and cancelled, so the engine keeps nothing of it.)
        const handle = (actions.length ? actions : new Float64Array(memory.buffer, engine.actionBuffer(), 6))[0];
        engine.cancel(0, engine.admit(0, handle, NaN));
        while (engine.nextAction() !== 0);
        assert.match(k, /^[0-9a-f]{32}$/);
        const id = `${n}/${salt}`;
        if (keys.has(id)) assert.equal(k, keys.get(id), id);
        keys.set(id, k);
      }
    }
    if (round === 0) var after = memory.buffer.byteLength;
  }
  assert.equal(new Set(keys.values()).size, keys.size);
  // Later rounds fit in the blocks the first one freed.
  assert.equal(memory.buffer.byteLength, after);
});
