// Browsers and bundlers: call `await init()` once before `createFetch`. By default it streams
// and compiles the .wasm next to this file (bundlers that follow `new URL(..., import.meta.url)`,
// such as vite and webpack, emit it as an asset); `init({ module })` takes the module from you
// instead: its bytes (`import wasm from 'unbusy/wasm'`), its URL, a Response or a compiled
// WebAssembly.Module (README, "Bundlers").
import initWasm, * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache, moduleSource } from './core.js';

let exports = null;
/** Why the last `init()` failed (until one succeeds): `createFetch` reports it, not "call init". */
let failure = null;

export async function init(input) {
  if (exports) return;
  const { source, given } = moduleSource(input);
  const from = source ?? new URL('./pkg/unbusy_js_bg.wasm', import.meta.url);
  try {
    exports = await initWasm({ module_or_path: from });
    failure = null;
  } catch (e) {
    // The default URL fails when a bundler copied this file but not the .wasm beside it.
    failure = given
      ? e
      : new Error(
          `unbusy: could not load the engine from ${from} (${e?.message ?? e}); if a bundler left the .wasm behind, ` +
            "pass the module: `import wasm from 'unbusy/wasm'; await init({ module: wasm })` (README, \"Bundlers\")",
          { cause: e },
        );
    throw failure;
  }
}

// Browsers decode zstd too (those that advertise it).
const create = makeCreateFetch(wasm, { memory: () => exports.memory, decodes: ['gzip', 'x-gzip', 'deflate', 'br', 'zstd'] });

export function createFetch(config, options) {
  if (!exports) {
    if (failure) {
      throw new Error(`unbusy: init() failed, so there is no engine for createFetch: ${failure?.message ?? failure}`, { cause: failure });
    }
    throw new Error(
      'unbusy: call `await init()` before createFetch in a browser (in a worker, this is the browser build: ' +
        "bundle with the `workerd` condition, README \"Workers\")",
    );
  }
  return create(config, options);
}
export { MemoryCache };
