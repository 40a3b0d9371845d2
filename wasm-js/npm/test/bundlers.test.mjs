// The packed package in a tiny app bundled by each bundler the README documents (esbuild,
// webpack, rollup, vite) and in a plain `<script type=module>` page: Node bundles run in Node,
// browser bundles in headless Chromium, each getting a real answer from a busy primary's
// healthy backup. Each app loads the engine the way the README's "Bundlers" section says.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, extname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import * as esbuild from 'esbuild';
import webpack from 'webpack';
import { rollup } from 'rollup';
import { nodeResolve } from '@rollup/plugin-node-resolve';
import { build as viteBuild } from 'vite';
import { chromium } from 'playwright-core';
import { Miniflare } from 'miniflare';
import { provider } from '../test-support/busy-provider.mjs';

const run = promisify(execFile);
const pkgDir = fileURLToPath(new URL('..', import.meta.url));
const CHROMIUM = process.env.UNBUSY_CHROMIUM ?? '/usr/bin/chromium';
const scratch = mkdtempSync(join(tmpdir(), 'unbusy-bundlers-'));
const app = join(scratch, 'app');
const servers = [];
const miniflares = [];
let browser;
let primary;
let backup;

after(async () => {
  for (const s of servers) s.close();
  // Everything is stopped even when a test left something broken.
  for (const mf of miniflares) await mf.dispose().catch(() => {});
  await browser?.close().catch(() => {});
  await esbuild.stop();
  rmSync(scratch, { recursive: true, force: true });
});

before(async () => {
  // The package as npm packs it, unpacked where the app's bundler looks for it.
  const { stdout } = await run('npm', ['pack', '--json', '--pack-destination', scratch, '--loglevel=error'], { cwd: pkgDir, maxBuffer: 1 << 24 });
  const tarball = join(scratch, JSON.parse(stdout)[0].filename);
  mkdirSync(join(app, 'node_modules', 'unbusy'), { recursive: true });
  await run('tar', ['-xzf', tarball, '-C', join(app, 'node_modules', 'unbusy'), '--strip-components=1']);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  primary = (await provider('primary', ['--busy-503', '1'])).url;
  backup = (await provider('backup')).url;
});

// How an app gets the engine: the README's "Bundlers" blocks, verbatim (test/readme.test.mjs
// checks that each of them is here).
const BYTES = `import { init, createFetch } from 'unbusy';
import wasm from 'unbusy/wasm';

await init({ module: wasm });
`;
const DEFAULT = `import { init, createFetch } from 'unbusy';

await init();
`;
const FILE = `import { init, createFetch } from 'unbusy';
import wasmUrl from 'unbusy/unbusy.wasm'; // esbuild: loader { '.wasm': 'file' }

await init({ module: new URL(wasmUrl, import.meta.url) });
`;

/** The app: `head` gets the engine; `where` gives the two providers' base URLs. */
function appSource(head, where) {
  return `${head}
async function main() {
  const [primary, backup] = ${where};
  const unbusyFetch = createFetch({ providers: [{ name: 'primary', baseUrl: primary }, { name: 'backup', baseUrl: backup }] });
  const r = await unbusyFetch(primary + '/v1/chat/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer caller' },
    body: JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello' }] }),
  });
  return { status: r.status, note: r.headers.get('x-unbusy'), content: (await r.json()).choices?.[0]?.message?.content };
}
`;
}
const NODE_MAIN = `main().then((a) => console.log(JSON.stringify(a)), (e) => { console.error(e); process.exit(1); });\n`;
const BROWSER_MAIN = `main().then((a) => { window.answer = a; }, (e) => { window.answer = { error: String(e?.message ?? e) }; });\n`;
const NODE_WHERE = 'process.argv.slice(2)';
const BROWSER_WHERE = "['primary', 'backup'].map((k) => new URLSearchParams(location.search).get(k))";
const HTML = (script) => `<!doctype html><meta charset="utf-8"><body><script type="module" src="${script}"></script></body>`;

function writeApp(name, source) {
  const dir = join(app, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'main.js'), source);
  return dir;
}

function assertAnswer(answer, how) {
  assert.equal(answer.error, undefined, `${how}: ${answer.error}`);
  assert.equal(answer.status, 200, how);
  assert.match(answer.note, /^provider=backup; attempts=2; /, how);
  assert.equal(answer.content, '[backup] An answer to: hello', how);
}

async function runNode(file) {
  const { stdout } = await run(process.execPath, [file, primary, backup], { cwd: app });
  return JSON.parse(stdout);
}

function webpackRun(config) {
  // Production mode without minifying: terser would take most of the test's time and changes
  // nothing about where the .wasm goes.
  return new Promise((resolve, reject) =>
    webpack({ ...config, optimization: { minimize: false } }, (err, stats) => {
      if (err) return reject(err);
      if (stats.hasErrors()) return reject(new Error(stats.toString({ all: false, errors: true })));
      resolve(stats);
    }),
  );
}

const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };

/** A static server for `root` on loopback: its origin. */
async function serve(root) {
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const file = join(root, path.endsWith('/') ? `${path}index.html` : path);
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  servers.push(server);
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${server.address().port}`;
}

async function runPage(origin, path = '/') {
  browser ??= await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  try {
    await page.goto(`${origin}${path}?primary=${encodeURIComponent(primary)}&backup=${encodeURIComponent(backup)}`);
    await page.waitForFunction(() => window.answer !== undefined, null, { timeout: 20000 });
    const answer = await page.evaluate(() => window.answer);
    assert.deepEqual(errors, []);
    return answer;
  } finally {
    await page.close();
  }
}

// Node bundles.

test('esbuild, Node: unbusy/wasm and init({ module })', async () => {
  const dir = writeApp('esbuild-node', appSource(BYTES, NODE_WHERE) + NODE_MAIN);
  await esbuild.build({ entryPoints: [join(dir, 'main.js')], bundle: true, platform: 'node', format: 'esm', outfile: join(dir, 'out/main.mjs'), logLevel: 'silent' });
  assertAnswer(await runNode(join(dir, 'out/main.mjs')), 'esbuild node bundle');
});

test('webpack, Node: init() finds the .wasm webpack emitted', async () => {
  const dir = writeApp('webpack-node', appSource(DEFAULT, NODE_WHERE) + NODE_MAIN);
  await webpackRun({ mode: 'production', target: 'node', context: dir, entry: './main.js', output: { path: join(dir, 'out'), filename: 'main.cjs' } });
  assertAnswer(await runNode(join(dir, 'out/main.cjs')), 'webpack node bundle');
});

test('rollup, Node: unbusy/wasm and init({ module })', async () => {
  const dir = writeApp('rollup-node', appSource(BYTES, NODE_WHERE) + NODE_MAIN);
  const bundle = await rollup({ input: join(dir, 'main.js'), plugins: [nodeResolve({ exportConditions: ['node'] })], onwarn() {} });
  await bundle.write({ file: join(dir, 'out/main.mjs'), format: 'es' });
  assertAnswer(await runNode(join(dir, 'out/main.mjs')), 'rollup node bundle');
});

test('a Node bundle without the .wasm says what to do', async () => {
  // init() without a module in a bundle that left the .wasm behind: the error names the way out.
  const dir = writeApp('esbuild-node-lost', appSource(DEFAULT, NODE_WHERE) + NODE_MAIN);
  await esbuild.build({ entryPoints: [join(dir, 'main.js')], bundle: true, platform: 'node', format: 'esm', outfile: join(dir, 'out/main.mjs'), logLevel: 'silent' });
  await assert.rejects(runNode(join(dir, 'out/main.mjs')), (e) => {
    assert.match(e.stderr, /could not read the engine from .*init\(\{ module: wasm \}\)/);
    return true;
  });
});

// Browser bundles.

test('esbuild, browser: unbusy/wasm and init({ module })', async () => {
  const dir = writeApp('esbuild-web', appSource(BYTES, BROWSER_WHERE) + BROWSER_MAIN);
  await esbuild.build({ entryPoints: [join(dir, 'main.js')], bundle: true, platform: 'browser', format: 'esm', outdir: join(dir, 'out'), logLevel: 'silent' });
  writeFileSync(join(dir, 'out/index.html'), HTML('main.js'));
  assertAnswer(await runPage(await serve(join(dir, 'out'))), 'esbuild browser bundle');
});

test("esbuild, browser: the .wasm as a file (loader 'file') and init({ module: its URL })", async () => {
  const dir = writeApp('esbuild-web-file', appSource(FILE, BROWSER_WHERE) + BROWSER_MAIN);
  await esbuild.build({ entryPoints: [join(dir, 'main.js')], bundle: true, platform: 'browser', format: 'esm', loader: { '.wasm': 'file' }, outdir: join(dir, 'out'), logLevel: 'silent' });
  writeFileSync(join(dir, 'out/index.html'), HTML('main.js'));
  assertAnswer(await runPage(await serve(join(dir, 'out'))), 'esbuild browser bundle with the .wasm file');
});

test('webpack, browser: init() fetches the .wasm webpack emitted', async () => {
  const dir = writeApp('webpack-web', appSource(DEFAULT, BROWSER_WHERE) + BROWSER_MAIN);
  await webpackRun({ mode: 'production', target: 'web', context: dir, entry: './main.js', output: { path: join(dir, 'out'), filename: 'main.js' } });
  writeFileSync(join(dir, 'out/index.html'), HTML('main.js'));
  assertAnswer(await runPage(await serve(join(dir, 'out'))), 'webpack browser bundle');
});

test('rollup, browser: unbusy/wasm and init({ module })', async () => {
  const dir = writeApp('rollup-web', appSource(BYTES, BROWSER_WHERE) + BROWSER_MAIN);
  const bundle = await rollup({ input: join(dir, 'main.js'), plugins: [nodeResolve({ browser: true })], onwarn() {} });
  await bundle.write({ dir: join(dir, 'out'), format: 'es' });
  writeFileSync(join(dir, 'out/index.html'), HTML('main.js'));
  assertAnswer(await runPage(await serve(join(dir, 'out'))), 'rollup browser bundle');
});

test('vite, browser: init() fetches the .wasm vite emitted', async () => {
  const dir = writeApp('vite-web', appSource(DEFAULT, BROWSER_WHERE) + BROWSER_MAIN);
  writeFileSync(join(dir, 'index.html'), HTML('/main.js'));
  await viteBuild({ root: dir, logLevel: 'silent', configFile: false, build: { outDir: join(dir, 'out') } });
  assertAnswer(await runPage(await serve(join(dir, 'out'))), 'vite browser build');
});

test('no bundler: <script type=module> with an import map', async () => {
  const dir = writeApp('plain', appSource(DEFAULT, BROWSER_WHERE) + BROWSER_MAIN);
  writeFileSync(
    join(dir, 'index.html'),
    `<!doctype html><meta charset="utf-8">
<script type="importmap">{ "imports": { "unbusy": "/node_modules/unbusy/browser.js" } }</script>
<script type="module" src="/plain/main.js"></script>`,
  );
  assertAnswer(await runPage(await serve(app), '/plain/'), 'a page without a bundler');
});

// Workers: the package's examples/worker/worker.js bundled by esbuild the way the README says,
// then run in workerd through miniflare.

async function bundleWorker(name, conditions) {
  const dir = join(app, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'worker.js'), readFileSync(join(app, 'node_modules/unbusy/examples/worker/worker.js')));
  await esbuild.build({ entryPoints: [join(dir, 'worker.js')], bundle: true, format: 'esm', conditions, loader: { '.wasm': 'copy' }, outdir: join(dir, 'out'), logLevel: 'silent' });
  return join(dir, 'out/worker.js');
}

function workerOf(name, scriptPath, extra = {}) {
  return {
    name,
    modules: true,
    scriptPath,
    modulesRoot: dirname(scriptPath),
    modulesRules: [{ type: 'CompiledWasm', include: ['**/*.wasm'] }],
    compatibilityDate: '2025-07-01',
    bindings: { PRIMARY: primary, BACKUP: backup },
    ...extra,
  };
}

async function ask(fetchOf, content, stream) {
  const r = await fetchOf('http://worker/', {
    method: 'POST',
    headers: { authorization: 'Bearer worker-cache' },
    body: JSON.stringify({ model: 'deepseek-chat', temperature: 0, stream, messages: [{ role: 'user', content }] }),
  });
  return { status: r.status, note: r.headers.get('x-unbusy'), text: await r.text() };
}

test('a worker bundled with the workerd condition: a second identical request is served from KV and from the Cache API', async () => {
  const script = await bundleWorker('worker', ['workerd', 'worker', 'browser']);
  const mf = new Miniflare({ workers: [workerOf('kv', script, { kvNamespaces: ['ANSWERS'] }), workerOf('cacheapi', script)] });
  miniflares.push(mf);
  for (const name of ['kv', 'cacheapi']) {
    const worker = await mf.getWorker(name);
    for (const stream of [false, true]) {
      const q = `${name} ${stream ? 'streamed' : 'whole'}`;
      const first = await ask((...a) => worker.fetch(...a), q, stream);
      assert.equal(first.status, 200, first.text);
      assert.match(first.note, /^provider=backup; attempts=2; cache=miss; /, q);
      // The store's write was kept alive past the first answer (options.waitUntil).
      const second = await ask((...a) => worker.fetch(...a), q, stream);
      assert.equal(second.status, 200, second.text);
      assert.match(second.note, /^provider=none; attempts=0; cache=hit; /, `${q}: the second request was not served from the ${name} store`);
      assert.equal(second.text, first.text, q);
      assert.match(second.text, new RegExp(`\\[backup\\] |An answer to: ${q}`));
    }
  }
});

test('a worker bundled without the workerd condition gets the browser build, and says so', async () => {
  const script = await bundleWorker('worker-browser', []);
  const mf = new Miniflare(workerOf('browser-build', script));
  miniflares.push(mf);
  const r = await ask((...a) => mf.dispatchFetch(...a), 'no condition', false);
  assert.equal(r.status, 500);
  assert.match(r.text, /call `await init\(\)`.*bundle with the `workerd` condition/);
});
