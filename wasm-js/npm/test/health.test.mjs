// Active health checks in the npm package (`healthCheck`), against real busy-provider emulators:
// a provider killed while nothing is sent to it is skipped by the next request, and taken back
// once it answers its probes again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createFetch } from 'unbusy';
import { provider } from '../test-support/busy-provider.mjs';

const chat = JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hi' }] });
const post = (f, base) =>
  f(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer caller' },
    body: chat,
  });

/** Waits for `done()` (polled every 20 ms) up to a generous deadline. */
async function until(what, done, within = 15000) {
  const deadline = performance.now() + within;
  for (;;) {
    if (await done()) return;
    if (performance.now() > deadline) assert.fail(`never: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('a provider killed while idle is skipped by the next request, and taken back when it answers', async () => {
  let primary = await provider('primary');
  const backup = await provider('backup');
  const port = new URL(primary.url).port;
  const events = [];
  const f = createFetch(
    {
      deadlines: { firstTokenMs: 800, responseMs: 1500, totalMs: 20000 },
      healthCheck: { enabled: true, intervalMs: 100, timeoutMs: 1000, unhealthyThreshold: 2, healthyThreshold: 2 },
      providers: [
        { name: 'primary', baseUrl: primary.url, apiKey: 'primary-key' },
        { name: 'backup', baseUrl: `${backup.url}/v1` },
      ],
    },
    { onEvent: (e) => e.type === 'providerHealth' && events.push(e) },
  );
  // Probes go out with each provider's key, to `/v1/models` under its base URL.
  await until('the primary is probed', async () =>
    (await primary.stats()).seen.some((r) => r.method === 'GET' && r.path === '/models'));
  const probes = (await primary.stats()).seen.filter((r) => r.method === 'GET');
  assert.ok(probes.every((r) => r.authorization === 'Bearer primary-key'), JSON.stringify(probes));
  await until('the backup is probed', async () =>
    (await backup.stats()).seen.some((r) => r.method === 'GET' && r.path === '/v1/models'));
  let r = await post(f, primary.url);
  assert.match(r.headers.get('x-unbusy'), /^provider=primary; attempts=1;/);
  await r.text();

  // Killed with nothing in flight: marked down by its probes, then skipped.
  await primary.kill();
  await until('the primary is marked down', () => events.some((e) => e.provider === 0 && !e.up));
  assert.deepEqual(events, [{ type: 'providerHealth', provider: 0, providerName: 'primary', up: false, status: 0 }]);
  const backupBefore = (await backup.stats()).attempts;
  for (let i = 0; i < 3; i++) {
    r = await post(f, primary.url);
    assert.equal(r.status, 200);
    assert.match(r.headers.get('x-unbusy'), /^provider=backup; attempts=1;/);
    await r.text();
  }
  assert.equal((await backup.stats()).attempts, backupBefore + 3);

  // Back on the same port: after two good probes, requests go to it again.
  primary = await provider('primary', ['--listen', `127.0.0.1:${port}`]);
  await until('the primary is marked up', () => events.some((e) => e.provider === 0 && e.up));
  r = await post(f, primary.url);
  assert.match(r.headers.get('x-unbusy'), /^provider=primary; attempts=1;/);
  await r.text();
  assert.equal((await primary.stats()).attempts, 1);
});

test('without healthCheck nothing is probed', async () => {
  const p = await provider('quiet');
  const f = createFetch({ providers: [{ name: 'quiet', baseUrl: p.url }] });
  const r = await post(f, p.url);
  await r.text();
  // (Absence needs a wait: a tenth of a second is 20 probe intervals of the test above.)
  await new Promise((done) => setTimeout(done, 100));
  assert.deepEqual((await p.stats()).seen.map((s) => s.method), ['POST']);
});

test('a bad healthCheck is refused at once, each field named as the caller spelled it', () => {
  assert.throws(
    () => createFetch({ providers: [{ name: 'a', baseUrl: 'http://a.example' }], healthCheck: { intervalMs: 0, path: 'models', healthyThreshhold: 1 } }),
    {
      message:
        'unbusy: invalid configuration: unknown field `healthyThreshhold` in healthCheck; healthCheck.path must be a path starting with /; healthCheck.intervalMs must be > 0',
    },
  );
});
