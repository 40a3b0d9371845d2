// The package README cannot drift from the package: its first example runs (pointed at the
// busy-provider emulator), every other JavaScript block is code a test runs (the worker example,
// the bundled apps), and its numbers are the code's.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { createFetch } from '../node.js';
import { provider } from '../test-support/busy-provider.mjs';

const run = promisify(execFile);
const npm = fileURLToPath(new URL('../', import.meta.url));
const root = fileURLToPath(new URL('../../../', import.meta.url));
const readme = readFileSync(`${npm}README.md`, 'utf8');
const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
const scratch = mkdtempSync(join(tmpdir(), 'unbusy-readme-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

const normal = (text) =>
  text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .join('\n');

test('the first example runs: the openai SDK gets an answer through a busy provider', async () => {
  const example = blocks.find((b) => b.includes('new OpenAI('));
  assert.ok(example, 'the README has the openai example');
  const primary = await provider('deepseek', ['--busy-503', '1']);
  const backup = await provider('backup');
  // The README's code as it is, but for where the providers live and where the modules are.
  const code =
    example
      .replaceAll("'https://api.deepseek.com'", JSON.stringify(primary.url))
      .replaceAll("'https://api.example-llm.com/v1'", JSON.stringify(`${backup.url}/v1`))
      .replace("from 'openai'", `from ${JSON.stringify(import.meta.resolve('openai'))}`)
      .replace("from 'unbusy'", `from ${JSON.stringify(pathToFileURL(`${npm}node.js`).href)}`) +
    `
const answer = await client.chat.completions.create({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello' }] });
console.log(JSON.stringify(answer));
`;
  assert.ok(code.includes(primary.url) && code.includes(backup.url), 'the example names both providers');
  writeFileSync(join(scratch, 'example.mjs'), code);
  const { stdout } = await run(process.execPath, [join(scratch, 'example.mjs')], {
    env: { ...process.env, DEEPSEEK_API_KEY: 'sk-deepseek', BACKUP_KEY: 'sk-backup' },
  });
  assert.equal(JSON.parse(stdout).choices[0].message.content, '[backup] An answer to: hello');
  assert.equal((await primary.stats()).attempts, 1);
  assert.equal((await backup.stats()).attempts, 1);
});

test('every other JavaScript block is code that a test runs', () => {
  const ran = ['examples/worker/worker.js', 'wasm-js/npm/test/bundlers.test.mjs', 'wasm-js/npm/test/metrics.test.mjs', 'wasm-js/npm/test/store.test.mjs'].map((f) => [f, normal(readFileSync(`${root}${f}`, 'utf8'))]);
  const others = blocks.filter((b) => !b.includes('new OpenAI('));
  assert.ok(others.length >= 3, `${others.length} blocks`);
  for (const block of others) {
    const where = ran.find(([, text]) => text.includes(normal(block)));
    assert.ok(where, `this README block is in no file a test runs:\n${block}`);
  }
});

test("the README's numbers are the code's", () => {
  // Deadlines: the table's defaults are the core's (`DeadlinesConfig::default`).
  const rust = readFileSync(`${root}core/src/config.rs`, 'utf8');
  const defaults = /impl Default for DeadlinesConfig \{[\s\S]*?\}\n\}/.exec(rust)[0];
  const rows = [...readme.matchAll(/^\| `deadlines\.(\w+)` \| (\d+) \|/gm)];
  assert.equal(rows.length, 4);
  for (const [, field, ms] of rows) {
    const snake = field.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    const value = new RegExp(`${snake}: ([\\d_]+),`).exec(defaults)?.[1]?.replaceAll('_', '');
    assert.equal(ms, value, `deadlines.${field}`);
  }
  // The learned first-byte wait (`learned_first_byte_wait` and its constants).
  const engine = readFileSync(`${root}core/src/engine.rs`, 'utf8');
  const constant = (name) => /= (\d+)/.exec(new RegExp(`const ${name}: [^=]+= [^;]+;`).exec(engine)[0])[1];
  const learned = /once a provider has shown (\d+) first real bytes[\s\S]*?waits (\d+) times the slowest of its last (\d+),\s+at least (\d+) s/.exec(readme);
  assert.ok(learned, 'the learned wait is described');
  assert.deepEqual(learned.slice(1), [constant('RECENT_ENOUGH'), constant('FIRST_BYTE_WAIT_FACTOR'), constant('RECENT'), constant('FIRST_BYTE_WAIT_FLOOR')]);
  assert.match(engine, /const FIRST_BYTE_WAIT_FLOOR: Nanos = \d+ \* SECOND;/);
  // How long a hung provider keeps its attempts abortable.
  const core = readFileSync(`${npm}core.js`, 'utf8');
  assert.match(readme, /in the last ten minutes/);
  assert.match(core, /const HUNG_MEMORY_MS = 10 \* 60 \* 1000;/);
  // The sizes the Bundlers section gives, within 15%.
  const wasm = readFileSync(`${npm}pkg/unbusy_js_bg.wasm`);
  const bytesModule = readFileSync(`${npm}pkg/unbusy_js_bg_bytes.js`);
  const near = (said, actual, what) => assert.ok(Math.abs(actual / 1000 - said) <= said * 0.15, `${what}: the README says about ${said} KB, it is ${actual} bytes`);
  near(Number(/\(about (\d+) KB gzipped, compiled while it streams\)/.exec(readme)[1]), gzipSync(wasm).length, 'the gzipped .wasm');
  const [, js, gz] = /\(about (\d+) KB of\s+JavaScript, (\d+) KB gzipped\)/.exec(readme);
  near(Number(js), bytesModule.length, 'unbusy/wasm');
  near(Number(gz), gzipSync(bytesModule).length, 'unbusy/wasm gzipped');
});

test("the README's configuration error is the one createFetch throws", () => {
  const said = /\(`(unbusy: invalid configuration: [^`]*?\\`[^`]*?\\`[^`]*?)`\)/.exec(readme.replace(/\n\s*/g, ' '))[1].replaceAll('\\`', '`');
  assert.throws(
    () => createFetch({ providers: [{ name: 'p', baseUrl: 'ftp://x' }], deadlines: { firstTokenMS: 1500 } }),
    (e) => {
      assert.equal(e.message, said);
      return true;
    },
  );
});
