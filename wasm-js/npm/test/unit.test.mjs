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
    /providers\[0\]\.apiKeyEnv is read only by the Envoy filter: pass apiKey/,
  );
  // Every provider that has one, with the other problems.
  assert.deepEqual(
    problems({
      providers: [
        { name: 'p', baseUrl: 'http://x', apiKeyEnv: 'P' },
        { name: 'q', baseUrl: 'http://y', api_key_env: 'Q' },
      ],
      retry: { maxAttempts: 0 },
    }),
    [
      'retry.maxAttempts must be between 1 and 16',
      'providers[0].apiKeyEnv is read only by the Envoy filter: pass apiKey',
      'providers[1].api_key_env is read only by the Envoy filter: pass api_key',
    ],
  );
});

/** The problems a configuration is refused with, as a list. */
function problems(config) {
  try {
    createFetch(config);
  } catch (e) {
    assert.ok(e instanceof TypeError, String(e));
    assert.match(e.message, /^unbusy: invalid configuration: /);
    return e.message.slice('unbusy: invalid configuration: '.length).split('; ');
  }
  assert.fail('the configuration was accepted');
}

test('every configuration problem is reported at once, in the spelling the caller used', () => {
  // An unknown field, a type error and what validation finds elsewhere, together.
  assert.deepEqual(
    problems({
      providers: [{ name: 'a', baseUrl: 'ftp://a' }, { name: 'a', baseUrl: 'http://b', weight: 0, maxConcurrency: 'many' }],
      deadlines: { firstTokenMS: 1000 },
      retry: { maxAttempts: 0, capMs: 1, baseMs: 10 },
      cache: { ttl_ms: 0 },
    }),
    [
      'providers[1].maxConcurrency must be a whole number from 0 to 4294967295',
      'unknown field `firstTokenMS` in deadlines',
      'providers[0].baseUrl must be an http:// or https:// URL with a host',
      'providers[1].name must be unique: "a" repeats',
      'providers[1].weight must be > 0',
      'retry.maxAttempts must be between 1 and 16',
      'retry.capMs must be at least retry.baseMs',
      'cache.ttl_ms must be > 0', // written in snake_case: reported so
    ],
  );
  // A rule relating a field the caller did not write names it in camelCase.
  assert.deepEqual(problems({ providers: [{ name: 'a', baseUrl: 'http://a' }], retry: { capMs: 1 } }), ['retry.capMs must be at least retry.baseMs']);
});

test('a provider without baseUrl is told to set it, not an Envoy cluster; cluster alone is refused', () => {
  assert.deepEqual(problems({ providers: [{ name: 'a' }, { name: 'b', baseUrl: 'http://b' }] }), ['providers[0].baseUrl must be set']);
  assert.deepEqual(problems({ providers: [{ name: 'a', cluster: 'a' }] }), ['providers[0].baseUrl must be set (`cluster` is read only by the Envoy filter)']);
  for (const p of problems({ providers: [{ name: 'a' }] })) assert.doesNotMatch(p, /cluster/);
});

test('a configuration of the wrong shape is refused by name, never with a TypeError from inside', () => {
  assert.deepEqual(problems({ providers: { a: { baseUrl: 'http://a' } } }), ['providers must be an array of providers']);
  assert.deepEqual(problems({ providers: [7, { name: 'b', baseUrl: 'http://b' }] }), ['providers[0] must be an object']);
  for (const config of [undefined, null, 'providers', [{ name: 'a', baseUrl: 'http://a' }]]) {
    assert.deepEqual(problems(config), ['it must be an object'], String(config));
  }
  assert.deepEqual(problems({ providers: [{ name: 'a', baseUrl: 'http://a' }], deadlines: { firstTokenMs: 1, first_token_ms: 2 } }), [
    'deadlines.firstTokenMs and deadlines.first_token_ms are the same field',
  ]);
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
