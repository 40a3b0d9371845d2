// Node: the .wasm is read from the package and instantiated synchronously at import. A bundle
// that left the .wasm behind (esbuild, rollup) cannot read it: then `await init({ module })`
// with its bytes (`import wasm from 'unbusy/wasm'`) before the first createFetch.
import { readFileSync } from 'node:fs';
import initWasm, * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache, moduleSource } from './core.js';

const WASM = new URL('./pkg/unbusy_js_bg.wasm', import.meta.url);
let exports = null;
/** Why there is no engine yet: the .wasm beside this file could not be read, or init() failed. */
let failure = null;
try {
  exports = wasm.initSync({ module: readFileSync(WASM) });
} catch (e) {
  failure = new Error(
    `unbusy: could not read the engine from ${WASM.href} (${e?.message ?? e}); if a bundler left the .wasm behind, ` +
      "pass the module before the first createFetch: `import wasm from 'unbusy/wasm'; await init({ module: wasm })` (README, \"Bundlers\")",
    { cause: e },
  );
}

// Node's consumers read answers through Response's public API only: answers read whole are
// handed over as HeldResponses (see core.js).
const create = makeCreateFetch(wasm, { heldResponses: true, lingeringTimers: true, memory: () => exports.memory });

export function createFetch(config, options) {
  if (!exports) throw failure;
  return create(config, options);
}
export { MemoryCache };

/** Nothing to do when the package's own .wasm was read; else loads the module given. */
export async function init(input) {
  if (exports) return;
  let { source, given } = moduleSource(input);
  if (!given) throw failure;
  source = await source;
  // A path or a file: URL is read from disk (Node's fetch reads no file: URL); bytes, a
  // WebAssembly.Module, a Response or an http(s) URL go to wasm-bindgen's loader.
  if (typeof source === 'string' && !/^(https?|data):/i.test(source)) source = readFileSync(source);
  else if (source instanceof URL && source.protocol === 'file:') source = readFileSync(source);
  try {
    exports = await initWasm({ module_or_path: source });
    failure = null;
  } catch (e) {
    failure = new Error(`unbusy: init() failed, so there is no engine for createFetch: ${e?.message ?? e}`, { cause: e });
    throw e;
  }
}
