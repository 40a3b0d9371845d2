// unbusy/store against the real thing: a `redis-server` of the test's own (on a loopback port it
// picks, in a private directory, never the system's), the workspace's `unbusy-store` binary in
// front of it, and the busy-provider emulator as the provider. Two createFetch instances with
// stores of their own stand for two Node processes: whatever one finds that the other fetched
// went through the shared store, as it would between machines.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createFetch } from 'unbusy';
import { createClient } from 'redis';
import { redisCache, storeCache } from 'unbusy/store';
import { provider } from '../test-support/busy-provider.mjs';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const REDIS = process.env.UNBUSY_REDIS_SERVER ?? 'redis-server';
const STORE = process.env.UNBUSY_STORE ?? `${root}target/release/unbusy-store`;
const UNBUSY = process.env.UNBUSY_CLI ?? `${root}target/release/unbusy`;
const ENVOY = process.env.UNBUSY_ENVOY ?? `${root}.venv/bin/envoy`;
const scratch = mkdtempSync(join(tmpdir(), 'unbusy-store-'));
// Every test is bounded (generously): a store call that never returns fails it instead of
// hanging the run.
const BOUND = { timeout: 60000 };
const children = new Set();
const clients = [];
after(async () => {
  for (const c of clients) await c.close?.().catch(() => {});
  // `unbusy up` passes SIGTERM on to its Envoy and waits for it; SIGKILL would orphan Envoy.
  for (const c of children) c.kill(c.gentle ? 'SIGTERM' : 'SIGKILL');
  await Promise.all([...children].filter((c) => c.gentle).map(exited));
  rmSync(scratch, { recursive: true, force: true });
});

/** Waits for `check` to hold (generous deadline: the CI machine is loaded), else fails saying what. */
async function until(check, what, deadlineMs = 15000) {
  const end = Date.now() + deadlineMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) assert.fail(`not within ${deadlineMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function exited(child) {
  return new Promise((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve() : child.once('exit', resolve)));
}

/** A redis-server on `port` (a free one by default), no persistence, in a private directory. */
async function startRedis(port) {
  for (let tries = 0; ; tries++) {
    const p = port ?? (await freePort());
    const dir = mkdtempSync(join(scratch, 'redis-'));
    const child = spawn(REDIS, ['--port', String(p), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir]);
    children.add(child);
    child.once('exit', () => children.delete(child));
    const ready = await new Promise((resolve, reject) => {
      child.once('error', (e) => reject(new Error(`${REDIS} could not be started (make setup-redis installs it; UNBUSY_REDIS_SERVER names another binary): ${e.message}`)));
      child.once('exit', () => resolve(false));
      createInterface({ input: child.stdout }).on('line', (l) => l.includes('Ready to accept connections') && resolve(true));
    });
    if (ready) return { child, port: p, url: `redis://127.0.0.1:${p}` };
    if (port !== undefined || tries >= 5) assert.fail(`redis-server did not start on port ${p}`);
  }
}

/** unbusy-store in front of `redisUrl`, on `listen` (port 0: one it picks). */
async function startStore(redisUrl, listen = '127.0.0.1:0') {
  const child = spawn(STORE, ['--listen', listen, '--redis', redisUrl]);
  children.add(child);
  child.once('exit', () => children.delete(child));
  child.stderr.resume();
  const line = await new Promise((resolve, reject) => {
    child.once('error', (e) => reject(new Error(`${STORE} could not be started (make test-js builds it): ${e.message}`)));
    child.once('exit', () => reject(new Error(`unbusy-store exited before listening on ${listen}`)));
    createInterface({ input: child.stdout }).once('line', resolve);
  });
  const addr = /listening on (\S+)/.exec(line)[1];
  return { child, addr, url: `http://${addr}` };
}

/** `unbusy up`: Envoy with the filter in front of provider `p`, its L2 cache in unbusy-store at
 * `storeUrl` (lookups allowed 1 s, not the default 20 ms: the machine is loaded, and a lookup
 * that failed open would be a miss here). */
async function startEnvoy(p, storeUrl) {
  const dir = mkdtempSync(join(scratch, 'up-'));
  const configFile = join(dir, 'config.json');
  writeFileSync(configFile, JSON.stringify({ store: { timeout_ms: 1000 } }));
  const args = ['up', '--provider', `primary=${p.url}`, '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--concurrency', '1'];
  const child = spawn(UNBUSY, [...args, '--config', configFile, '--store', storeUrl, '--envoy', ENVOY], { env: { ...process.env, TMPDIR: dir } });
  child.gentle = true;
  children.add(child);
  child.once('exit', () => children.delete(child));
  let log = '';
  child.stderr.on('data', (d) => (log += d));
  const url = await new Promise((resolve, reject) => {
    child.once('error', (e) => reject(new Error(`${UNBUSY} could not be started (make test-js builds it; Envoy: make setup-python): ${e.message}`)));
    child.once('exit', () => reject(new Error(`unbusy up exited before listening:\n${log}`)));
    createInterface({ input: child.stdout }).on('line', (l) => /^listening on /.test(l) && resolve(l.slice('listening on '.length)));
  });
  return { child, url };
}

/** A connected node-redis client for the test's own look into Redis. */
async function inspector(url) {
  const c = createClient({ url });
  c.on('error', () => {});
  await c.connect();
  clients.push(c);
  return c;
}

const chat = (content, extra = {}) => JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content }], temperature: 0, ...extra });
const post = (f, base, body, key = 'caller') =>
  f(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body,
  });
const config = (p) => ({ providers: [{ name: 'primary', baseUrl: p.url }], cache: { ttlMs: 60000, staleTtlMs: 120000 } });
const entries = async (r) => (await r.keys('unbusy:cache:*')).sort();

/** Process A fetches `body` (a miss, answered by the provider, written back), process B then
 * gets it from the shared store: a hit, the same answer, the provider not asked again; another
 * tenant's identical request is a miss. Returns A's Redis entry. */
async function sharedThrough(p, inspect, storeA, storeB, body) {
  const a = createFetch(config(p), { cache: storeA });
  const b = createFetch(config(p), { cache: storeB });
  const before = await entries(inspect);
  const attempts = (await p.stats()).attempts;
  const first = await post(a, p.url, body);
  assert.match(first.headers.get('x-unbusy'), /cache=miss/);
  const text = await first.text();
  // The write-back goes on after the answer was handed over.
  let added;
  await until(async () => (added = (await entries(inspect)).filter((k) => !before.includes(k))).length === 1, "A's answer in Redis");
  const second = await post(b, p.url, body);
  assert.match(second.headers.get('x-unbusy'), /cache=hit/, 'B gets A\'s answer from the store');
  assert.equal(await second.text(), text);
  assert.equal((await p.stats()).attempts, attempts + 1, 'the provider was asked once');
  const other = await post(b, p.url, body, 'someone-else');
  assert.match(other.headers.get('x-unbusy'), /cache=miss/, "another tenant never gets A's answer");
  await other.text();
  await until(async () => (await entries(inspect)).length === before.length + 2, "the other tenant's answer in an entry of its own");
  return { key: added[0], text, contentType: first.headers.get('content-type') };
}

test('through unbusy-store: one process fetches, another gets it from the store, same tenant only; key layout and lifetimes as the store keeps them', BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  const store = await startStore(redis.url);
  const inspect = await inspector(redis.url);
  const generous = { url: store.url, timeoutMs: 5000 };
  const { key } = await sharedThrough(p, inspect, storeCache(generous), storeCache(generous), chat('shared through the store'));
  // `<prefix>cache:<tenant>:<key>`, the tenant and key the core's (16 and 32 hex digits).
  assert.match(key, /^unbusy:cache:[0-9a-f]{16}:[0-9a-f]{32}$/);
  const fields = await inspect.hGetAll(key);
  assert.equal(fields.ct, 'application/json');
  assert.equal(fields.ce, '');
  assert.equal(fields.ttl, '60000');
  assert.equal(fields.st, '120000');
  const pttl = await inspect.pTTL(key);
  assert.ok(pttl > 120000 && pttl <= 180000, `expires at ttl + stale ttl: ${pttl}`);
});

test('through Redis with the redis adapter: one process fetches, another gets it, same tenant only', BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  const inspect = await inspector(redis.url);
  const [ca, cb] = [await inspector(redis.url), await inspector(redis.url)];
  const { key } = await sharedThrough(p, inspect, redisCache(ca, { timeoutMs: 5000 }), redisCache(cb, { timeoutMs: 5000 }), chat('shared through redis'));
  assert.match(key, /^unbusy:cache:[0-9a-f]{16}:[0-9a-f]{32}$/);
  const fields = await inspect.hGetAll(key);
  assert.deepEqual([fields.ct, fields.ce, fields.ttl, fields.st], ['application/json', '', '60000', '120000']);
  assert.ok(Number(fields.at) > 0, 'stored at, by Redis time');
  // A prefix keeps two fleets apart, as unbusy-store's --prefix does.
  const other = createFetch(config(p), { cache: redisCache(cb, { prefix: 'fleet2:', timeoutMs: 5000 }) });
  const r = await post(other, p.url, chat('shared through redis'));
  assert.match(r.headers.get('x-unbusy'), /cache=miss/);
  await r.text();
  await until(async () => (await inspect.keys('fleet2:cache:*')).length === 1, 'the entry under the other prefix');
});

test('one layout: the redis adapter and unbusy-store read what the other wrote, streamed answers included', BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  const store = await startStore(redis.url);
  const inspect = await inspector(redis.url);
  const client = await inspector(redis.url);
  const viaRedis = () => redisCache(client, { timeoutMs: 5000 });
  const viaStore = () => storeCache({ url: store.url, timeoutMs: 5000 });
  await sharedThrough(p, inspect, viaRedis(), viaStore(), chat('written by the adapter'));
  await sharedThrough(p, inspect, viaStore(), viaRedis(), chat('written by the store'));
  // An SSE answer is kept as text/event-stream and replayed as one, whichever side wrote it.
  const { key, contentType } = await sharedThrough(p, inspect, viaRedis(), viaStore(), chat('streamed', { stream: true }));
  assert.match(contentType, /text\/event-stream/);
  assert.equal(await inspect.hGet(key, 'ct'), 'text/event-stream');
  const replay = await post(createFetch(config(p), { cache: viaStore() }), p.url, chat('streamed', { stream: true }));
  assert.match(replay.headers.get('content-type'), /text\/event-stream/);
  assert.match(await replay.text(), /data: \[DONE\]/);
  // What a hit costs a Node server, printed (not asserted): 300 lookups of that entry each way.
  const [, tenant, hex] = /^unbusy:cache:(\w+):(\w+)$/.exec(key);
  for (const [name, cache] of [['storeCache', viaStore()], ['redisCache', viaRedis()]]) {
    const took = [];
    for (let i = 0; i < 300; i++) {
      const t = performance.now();
      assert.ok(await cache.get(hex, { tenant }), `${name}: a hit`);
      took.push(performance.now() - t);
    }
    took.sort((x, y) => x - y);
    console.log(`${name} hit (${took.length} lookups, loopback): median ${took[150].toFixed(2)} ms, p99 ${took[296].toFixed(2)} ms`);
  }
});

test('a Node server and an Envoy fleet share one cache: what Envoy fetched is a hit in Node, through the store and through Redis, and the other way round', BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  const store = await startStore(redis.url);
  const envoy = await startEnvoy(p, store.url);
  const inspect = await inspector(redis.url);
  const client = await inspector(redis.url);
  const nodes = [createFetch(config(p), { cache: storeCache({ url: store.url, timeoutMs: 5000 }) }), createFetch(config(p), { cache: redisCache(client, { timeoutMs: 5000 }) })];
  // Through Envoy (the caller's own request, as any client sends it), then from Node.
  const body = chat('fetched by envoy');
  const first = await post(fetch, envoy.url, body);
  assert.match(first.headers.get('x-unbusy'), /cache=miss/);
  const text = await first.text();
  await until(async () => (await entries(inspect)).length === 1, "Envoy's write-back in Redis");
  const attempts = (await p.stats()).attempts;
  for (const [i, f] of nodes.entries()) {
    const r = await post(f, p.url, body);
    assert.match(r.headers.get('x-unbusy'), /cache=hit/, "Node gets Envoy's answer");
    assert.equal(await r.text(), text);
    const other = await post(f, p.url, body, `someone-else-${i}`);
    assert.match(other.headers.get('x-unbusy'), /cache=miss/, 'another tenant never gets it');
    await other.text();
  }
  await until(async () => (await entries(inspect)).length === 3, "the other tenants' answers in entries of their own");
  // From Node (each store in turn), then through Envoy: an L2 hit there.
  for (const [i, f] of nodes.entries()) {
    const mine = chat(`fetched by node ${i}`);
    const before = (await entries(inspect)).length;
    const r = await post(f, p.url, mine);
    assert.match(r.headers.get('x-unbusy'), /cache=miss/);
    const answer = await r.text();
    await until(async () => (await entries(inspect)).length === before + 1, "Node's write-back in Redis");
    const viaEnvoy = await post(fetch, envoy.url, mine);
    assert.match(viaEnvoy.headers.get('x-unbusy'), /cache=hit-l2/, `Envoy gets what Node (${i ? 'redisCache' : 'storeCache'}) stored`);
    assert.equal(await viaEnvoy.text(), answer);
  }
  assert.equal((await p.stats()).attempts, attempts + 2 + 2, 'the provider: the two other tenants and the two answers Node fetched');
});

test("the adapter's scripts are unbusy-store's", BOUND, () => {
  const rust = readFileSync(`${root}store/src/scripts.rs`, 'utf8');
  const js = readFileSync(fileURLToPath(new URL('../store.js', import.meta.url)), 'utf8');
  for (const name of ['CACHE_PUT', 'CACHE_GET']) {
    const fromRust = new RegExp(`pub static ${name}[\\s\\S]*?r"([\\s\\S]*?)",\\n`).exec(rust)[1];
    const fromJs = new RegExp(`const ${name} = \`([\\s\\S]*?)\`;`).exec(js)[1];
    assert.equal(fromJs, fromRust, name);
  }
});

/** Requests answered while the store is hung or gone: each a miss the provider answers. With
 * `cache`, also what a lookup alone took (printed, not asserted: the bound is the code's), and
 * that after a failure the store is left alone for a second: of five lookups in a row, only
 * those a second apart call it (`calls()` counts the calls made). */
async function answeredWithout(f, p, label, cache, calls) {
  if (cache) {
    const lookups = [];
    const before = calls();
    const started = performance.now();
    for (let i = 0; i < 5; i++) {
      const t = performance.now();
      assert.equal(await cache.get('0'.repeat(32), { tenant: '0'.repeat(16) }), undefined);
      lookups.push(Math.round(performance.now() - t));
    }
    const made = calls() - before;
    console.log(`${label}: a lookup took ${lookups.join(', ')} ms (${made} called the store)`);
    assert.ok(made <= 2 + Math.floor((performance.now() - started) / 1000), `${made} of 5 lookups called a failing store`);
  }
  const took = [];
  for (let i = 0; i < 3; i++) {
    const started = performance.now();
    const r = await post(f, p.url, chat(`${label} ${i}`));
    assert.equal(r.status, 200);
    assert.match(r.headers.get('x-unbusy'), /cache=miss/);
    assert.match(await r.text(), /An answer to/);
    took.push(Math.round(performance.now() - started));
  }
  console.log(`${label}: answered in ${took.join(', ')} ms`);
}

/** Once the store is back (the client reconnects by itself, within the 20 ms bound or not),
 * an answer written back is found again: only the store can have it (no other cache). */
async function hitsAgain(f, p) {
  const body = chat('after the restart');
  await until(async () => {
    const r = await post(f, p.url, body);
    await r.text();
    return /cache=hit/.test(r.headers.get('x-unbusy'));
  }, 'a hit from the store once it is back');
}

test('unbusy-store hung, killed and restarted: answers come from the provider, the outage logged once, then hits again', BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  let store = await startStore(redis.url);
  const logs = [];
  // The default 20 ms bound: a hung store would otherwise hold every request.
  let calls = 0;
  const counted = (url, init) => (calls++, fetch(url, init));
  const cache = storeCache({ url: store.url, log: (m) => logs.push(m), fetch: counted });
  const f = createFetch(config(p), { cache });
  store.child.kill('SIGSTOP');
  await answeredWithout(f, p, 'store hung', cache, () => calls);
  store.child.kill('SIGKILL');
  await exited(store.child);
  await answeredWithout(f, p, 'store killed', cache, () => calls);
  assert.equal(logs.length, 1, logs.join('\n'));
  assert.match(logs[0], new RegExp(`unbusy: the store at http://${store.addr} is unavailable`));
  store = await startStore(redis.url, store.addr);
  await hitsAgain(f, p);
  assert.match(logs[1], new RegExp(`unbusy: the store at http://${store.addr} answers again`));
  assert.ok(!logs.join('\n').includes('undefined'), logs.join('\n'));
});

test("Redis gone behind unbusy-store: the store's 503 is a miss the provider answers, logged once, then hits again", BOUND, async () => {
  const p = await provider('primary');
  let redis = await startRedis();
  const store = await startStore(redis.url);
  const logs = [];
  const f = createFetch(config(p), { cache: storeCache({ url: store.url, timeoutMs: 5000, log: (m) => logs.push(m) }) });
  redis.child.kill('SIGKILL');
  await exited(redis.child);
  await answeredWithout(f, p, 'redis behind the store killed');
  assert.deepEqual(logs, [`unbusy: the store at http://${store.addr} is unavailable (HTTP 503); answers come from the providers until it answers again`]);
  redis = await startRedis(redis.port);
  await hitsAgain(f, p);
  assert.equal(logs[1], `unbusy: the store at http://${store.addr} answers again`);
});

test('Redis hung, killed and restarted under the redis adapter: answers come from the provider, the outage logged once, then hits again', BOUND, async () => {
  const p = await provider('primary');
  let redis = await startRedis();
  const client = createClient({ url: redis.url });
  client.on('error', () => {});
  await client.connect();
  clients.push(client);
  const logs = [];
  let calls = 0;
  const cache = redisCache({ sendCommand: (args) => (calls++, client.sendCommand(args)) }, { log: (m) => logs.push(m) });
  const f = createFetch(config(p), { cache });
  redis.child.kill('SIGSTOP');
  await answeredWithout(f, p, 'redis hung', cache, () => calls);
  redis.child.kill('SIGKILL');
  await exited(redis.child);
  await answeredWithout(f, p, 'redis killed', cache, () => calls);
  assert.equal(logs.length, 1, logs.join('\n'));
  assert.match(logs[0], /unbusy: Redis is unavailable/);
  redis = await startRedis(redis.port);
  await hitsAgain(f, p);
  assert.equal(logs[1], 'unbusy: Redis answers again');
});

test('bad options are refused, naming the option', BOUND, () => {
  assert.throws(() => storeCache({ url: 'localhost:7379' }), /storeCache's url must be http: or https:/);
  assert.throws(() => storeCache({}), /storeCache's url must be the store's http\(s\) URL/);
  assert.throws(() => storeCache({ url: 'http://127.0.0.1:7379', timeoutMs: 0 }), /storeCache's timeoutMs must be a number of milliseconds above 0, not 0/);
  assert.throws(() => redisCache({}), /redisCache needs a connected node `redis` client/);
  const client = { sendCommand: async () => null };
  assert.throws(() => redisCache(client, { prefix: 'a {b}' }), /redisCache's prefix must be/);
  assert.throws(() => redisCache(client, { timeoutMs: -1 }), /redisCache's timeoutMs must be/);
});

test("the README's examples: storeCache and redisCache as it shows them, a second identical request a hit", BOUND, async () => {
  const p = await provider('primary');
  const redis = await startRedis();
  const store = await startStore(redis.url);
  const config = { providers: [{ name: 'primary', baseUrl: p.url }] };
  const storeUrl = store.url;
  const redisUrl = redis.url;
  const hitOn = async (unbusyFetch, content) => {
    // The default 20 ms bound may miss under load: asked again until the store answers in time.
    await until(async () => {
      const r = await post(unbusyFetch, p.url, chat(content));
      await r.text();
      return /cache=hit/.test(r.headers.get('x-unbusy'));
    }, `a hit for ${content}`);
  };
  {
    // storeUrl: where unbusy-store listens, e.g. 'http://127.0.0.1:7379'
    const unbusyFetch = createFetch(config, { cache: storeCache({ url: storeUrl }) });
    await hitOn(unbusyFetch, 'readme store');
  }
  {
    const client = await createClient({ url: redisUrl })
      .on('error', () => {}) // redisCache logs an outage once; the client reconnects by itself
      .connect();
    const unbusyFetch = createFetch(config, { cache: redisCache(client) });
    clients.push(client);
    await hitOn(unbusyFetch, 'readme redis');
  }
});
