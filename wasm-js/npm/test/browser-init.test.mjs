// The browser build's init() in Node (no browser needed: it loads the .wasm with fetch and
// WebAssembly, as a page does): a failed init() is what createFetch reports, with its cause.
import { test } from 'node:test';
import { readFile } from 'node:fs/promises';
import assert from 'node:assert/strict';
import { init, createFetch } from '../browser.js';

const config = { providers: [{ name: 'p', baseUrl: 'http://127.0.0.1:9' }] };

test('createFetch before init() says to call it; after a failed init() it rethrows that failure', async () => {
  assert.throws(() => createFetch(config), /call `await init\(\)` before createFetch/);
  // Not a wasm module: what a wrong URL served with an HTML page, or a broken file, gives.
  const failure = await init('data:application/wasm;base64,PGh0bWw+').then(
    () => assert.fail('init() of a non-module resolved'),
    (e) => e,
  );
  assert.ok(failure instanceof Error, String(failure));
  assert.throws(
    () => createFetch(config),
    (e) => {
      assert.equal(e.cause, failure);
      assert.match(e.message, /^unbusy: init\(\) failed/);
      assert.ok(e.message.includes(failure.message), e.message);
      assert.doesNotMatch(e.message, /call `await init\(\)`/);
      return true;
    },
  );
  // A later init() that succeeds clears it (given the module's bytes: Node's fetch reads no
  // file: URL).
  await init(await readFile(new URL('../pkg/unbusy_js_bg.wasm', import.meta.url)));
  assert.equal(typeof createFetch(config), 'function');
});
