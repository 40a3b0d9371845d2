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
  // Each request has its own engine (see worker.js): the primary is tried first; a busy or
  // stalled primary fails over to the healthy backup at once. So an answer is the primary's on
  // its first attempt or the backup's on its second, and says so in its body and x-unbusy.
  let fromBackup = 0;
  for (const [i, r] of answers.entries()) {
    const text = await r.text();
    assert.equal(r.status, 200, text);
    const note = r.headers.get('x-unbusy');
    const [, name, attempts] = /^provider=(primary|backup); attempts=(\d+); cache=none; tier=0$/.exec(note ?? '') ?? [];
    assert.ok(name, `request ${i}: x-unbusy ${note}`);
    assert.equal(attempts, name === 'primary' ? '1' : '2', `request ${i}: ${note}`);
    fromBackup += name === 'backup' ? 1 : 0;
    let content;
    if (i % 2 === 0) {
      // A stream: data events of chunks, then [DONE], and nothing else (no keep-alive).
      assert.match(r.headers.get('content-type') ?? '', /^text\/event-stream/);
      const events = text.split('\n\n').filter((e) => e !== '');
      assert.equal(events.at(-1), 'data: [DONE]', text);
      content = events
        .slice(0, -1)
        .map((e) => {
          assert.match(e, /^data: \{/, `request ${i}: ${JSON.stringify(e)}`);
          return JSON.parse(e.slice('data: '.length)).choices[0]?.delta?.content ?? '';
        })
        .join('');
    } else {
      content = JSON.parse(text).choices[0].message.content;
    }
    assert.equal(content, `[${name}] An answer to: q${i}`, `request ${i}`);
    ok += 1;
  }
  assert.equal(ok, 12);
  // Every request reached the primary once; those it failed reached the backup once.
  const stats = await (await fetch(`${primary}/stats`)).json();
  const backupStats = await (await fetch(`${backup}/stats`)).json();
  assert.equal(stats.attempts, 12);
  assert.equal(stats.busy_503 + stats.stalls, fromBackup, 'each failover was a busy or stalled primary');
  assert.equal(stats.ok, 12 - fromBackup);
  assert.equal(backupStats.attempts, fromBackup);
  assert.ok(fromBackup > 0, 'the primary really was busy');
});
