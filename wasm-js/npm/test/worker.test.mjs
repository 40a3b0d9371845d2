// The package in workerd (through miniflare): examples/worker/worker.js, its outbound fetches
// reaching busy-provider emulators on loopback. Half the requests stream.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Miniflare } from 'miniflare';
import { provider } from '../test-support/busy-provider.mjs';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const npm = fileURLToPath(new URL('../', import.meta.url));
let mf;
after(async () => {
  await mf?.dispose();
});

test('a worker in workerd gets answers through a busy primary', async () => {
  const primary = (await provider('primary', ['--busy-503', '0.5', '--stall', '0.3', '--stall-s', '30'])).url;
  const backup = (await provider('backup')).url;
  const src = (p) => readFileSync(`${npm}${p}`, 'utf8');
  mf = new Miniflare({
    modules: [
      { type: 'ESModule', path: 'worker.js', contents: readFileSync(`${root}examples/worker/worker.js`, 'utf8') },
      { type: 'ESModule', path: 'unbusy', contents: src('workerd.js') },
      { type: 'ESModule', path: 'core.js', contents: src('core.js') },
      { type: 'ESModule', path: 'pkg/unbusy_js.js', contents: src('pkg/unbusy_js.js') },
      { type: 'CompiledWasm', path: 'pkg/unbusy_js_bg.wasm', contents: readFileSync(`${npm}pkg/unbusy_js_bg.wasm`) },
    ],
    compatibilityDate: '2025-07-01',
    port: 0,
    bindings: { PRIMARY: primary, BACKUP: backup },
  });
  let ok = 0;
  const answers = await Promise.all(
    Array.from({ length: 12 }, (_, i) =>
      mf.dispatchFetch('http://worker/', {
        method: 'POST',
        headers: { authorization: 'Bearer worker-test' },
        body: JSON.stringify({ model: 'deepseek-chat', stream: i % 2 === 0, messages: [{ role: 'user', content: `q${i}` }] }),
      }),
    ),
  );
  for (const r of answers) {
    const text = await r.text();
    assert.equal(r.status, 200, text);
    assert.match(text, /An |answer/);
    assert.doesNotMatch(text, /keep-alive/);
    assert.match(r.headers.get('x-unbusy') ?? '', /provider=(primary|backup)/);
    ok += 1;
  }
  assert.equal(ok, 12);
  const stats = await (await fetch(`${primary}/stats`)).json();
  assert.ok(stats.busy_503 + stats.stalls > 0, 'the primary really was busy');
});
