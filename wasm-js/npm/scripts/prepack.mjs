// prepack: what `npm pack` and `npm publish` ship must be built from this checkout. pkg/ (the
// wasm module and its glue, from `make js`) is git-ignored, and the files the README points to
// live outside the package directory: without this a clean checkout packs a tarball whose
// import fails (ERR_MODULE_NOT_FOUND .../pkg/unbusy_js.js).
//
// Run from wasm-js/npm inside the unbusy repository: copies docs/config.md, docs/requests.md,
// docs/metrics.md, docs/store.md, examples/worker/worker.js and examples/browser/index.html into the package, and runs
// `make js` unless pkg/ is newer than every source of the wasm build. Anywhere else it
// refuses, saying why.
import { copyFileSync, existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const pkgDir = fileURLToPath(new URL('..', import.meta.url));
const root = join(pkgDir, '..', '..');
const BUILT = ['pkg/unbusy_js.js', 'pkg/unbusy_js_bg.wasm', 'pkg/unbusy_js_bg_bytes.js'];
const COPIED = ['docs/config.md', 'docs/requests.md', 'docs/metrics.md', 'docs/store.md', 'examples/worker/worker.js', 'examples/browser/index.html'];
// Everything the wasm build reads: when one of these is newer than pkg/, pkg/ is stale.
const SOURCES = ['Makefile', 'Cargo.toml', 'Cargo.lock', 'core/Cargo.toml', 'core/src', 'wasm-js/Cargo.toml', 'wasm-js/src', 'wasm-js/npm/scripts/inline-wasm.mjs'];

function refuse(why) {
  console.error(`unbusy prepack: ${why}\n` + 'Pack or publish the package from wasm-js/npm in the unbusy repository, with the Rust toolchain and wasm-bindgen that `make js` installs (`make setup`).');
  process.exit(1);
}

function newest(path) {
  const s = statSync(path);
  if (!s.isDirectory()) return s.mtimeMs;
  let t = s.mtimeMs;
  for (const e of readdirSync(path)) t = Math.max(t, newest(join(path, e)));
  return t;
}

if (!existsSync(join(root, 'Makefile')) || !existsSync(join(root, 'wasm-js', 'src', 'lib.rs'))) {
  refuse(`${pkgDir} is not wasm-js/npm of the unbusy repository: pkg/ (the wasm build) and the docs cannot be made here.`);
}

for (const f of COPIED) {
  mkdirSync(dirname(join(pkgDir, f)), { recursive: true });
  copyFileSync(join(root, f), join(pkgDir, f));
}

const built = BUILT.map((f) => join(pkgDir, f));
const stale = built.some((f) => !existsSync(f)) || Math.min(...built.map((f) => statSync(f).mtimeMs)) < Math.max(...SOURCES.map((s) => newest(join(root, s))));
if (stale) {
  console.error('unbusy prepack: pkg/ is missing or older than its sources; running `make js`');
  const make = spawnSync('make', ['-C', root, 'js'], { stdio: ['ignore', process.stderr, process.stderr] });
  if (make.error || make.status !== 0 || built.some((f) => !existsSync(f))) {
    refuse(`\`make js\` failed (${make.error?.message ?? `exit ${make.status}`}), so pkg/ cannot be built.`);
  }
}
