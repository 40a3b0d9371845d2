// The package as npm packs it: what the tarball holds, that a checkout which cannot build it
// refuses to pack, and that the tarball installed into a fresh project answers in Node.
// (Relies on pkg/ being built, as `make test-js` does first: prepack then finds it fresh and
// does not rebuild it under the other test files.)
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { provider } from '../test-support/busy-provider.mjs';

const run = promisify(execFile);
const pkgDir = fileURLToPath(new URL('..', import.meta.url));
const scratch = mkdtempSync(join(tmpdir(), 'unbusy-pack-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
const npm = (args, cwd) => run('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, maxBuffer: 1 << 24 });

test('npm pack ships the LICENSE, the built pkg/ and every file the README points to', async () => {
  const { stdout } = await npm(['pack', '--dry-run', '--json'], pkgDir);
  const files = JSON.parse(stdout)[0].files.map((f) => f.path);
  for (const f of ['LICENSE', 'README.md', 'package.json', 'pkg/unbusy_js.js', 'pkg/unbusy_js_bg.wasm', 'node.js', 'browser.js', 'workerd.js', 'core.js', 'index.d.ts']) {
    assert.ok(files.includes(f), `${f} is not in ${files}`);
  }
  assert.match(readFileSync(join(pkgDir, 'LICENSE'), 'utf8'), /Apache License\s+Version 2\.0, January 2004/);
  const referenced = [...readFileSync(join(pkgDir, 'README.md'), 'utf8').matchAll(/`((?:docs|examples)\/[\w./-]+)`/g)].map((m) => m[1]);
  assert.ok(referenced.includes('docs/config.md') && referenced.includes('examples/worker/worker.js'), String(referenced));
  for (const f of referenced) assert.ok(files.includes(f), `the README points to ${f}, which is not in ${files}`);
  // Every file an export names is shipped, the package.json included.
  const { exports } = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));
  assert.equal(exports['./package.json'], './package.json');
  const targets = Object.values(exports).flatMap((t) => (typeof t === 'string' ? [t] : Object.values(t)));
  assert.ok(targets.includes('./pkg/unbusy_js_bg_bytes.js') && targets.includes('./wasm.d.ts'), String(targets));
  for (const target of targets) assert.ok(files.includes(target.replace(/^\.\//, '')), target);
});

test('the .wasm it ships is at most 60 KB gzipped (issue 13), by gzip level 9 as bench/overhead.mjs measures', () => {
  const gzipped = gzipSync(readFileSync(join(pkgDir, 'pkg/unbusy_js_bg.wasm')), { level: 9 }).length;
  assert.ok(gzipped <= 60 * 1024, `the .wasm is ${gzipped} B gzipped, over 61,440`);
});

test('a checkout that cannot build pkg/ refuses to pack, saying why', async () => {
  // The package's tracked files alone, outside the repository: what a clean checkout has
  // without the Rust build (pkg/ is git-ignored).
  const bare = join(scratch, 'bare');
  const { stdout } = await run('git', ['ls-files'], { cwd: pkgDir });
  for (const f of stdout.split('\n').filter(Boolean)) {
    mkdirSync(dirname(join(bare, f)), { recursive: true });
    copyFileSync(join(pkgDir, f), join(bare, f));
  }
  await assert.rejects(npm(['pack', '--pack-destination', scratch], bare), (e) => {
    assert.match(e.stderr, /unbusy prepack: .* not wasm-js\/npm of the unbusy repository/);
    assert.match(e.stderr, /make js/);
    return true;
  });
});

test('the packed tarball, installed into a fresh project, answers in Node', async () => {
  const { stdout } = await npm(['pack', '--json', '--pack-destination', scratch], pkgDir);
  const tarball = join(scratch, JSON.parse(stdout)[0].filename);
  const app = join(scratch, 'app');
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  // No dependencies at run time: the install needs nothing but the tarball.
  await npm(['install', '--offline', tarball], app);
  const primary = await provider('primary', ['--busy-503', '1']);
  const backup = await provider('backup');
  writeFileSync(
    join(app, 'main.js'),
    `import { createFetch } from 'unbusy';
const f = createFetch({ providers: [{ name: 'primary', baseUrl: process.argv[2] }, { name: 'backup', baseUrl: process.argv[3] }] });
const r = await f(process.argv[2] + '/v1/chat/completions', {
  method: 'POST',
  headers: { 'content-type': 'application/json', authorization: 'Bearer caller' },
  body: JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello' }] }),
});
console.log(JSON.stringify({ status: r.status, note: r.headers.get('x-unbusy'), body: await r.json() }));
`,
  );
  const out = await run(process.execPath, ['main.js', primary.url, backup.url], { cwd: app });
  const answer = JSON.parse(out.stdout);
  assert.equal(answer.status, 200);
  assert.match(answer.note, /provider=backup; attempts=2/);
  assert.match(answer.body.choices[0].message.content, /\[backup\]/);
});
