// Browsers and bundlers: call `await init()` once (optionally with the .wasm's URL) before
// `createFetch`; it streams and compiles the module from that URL.
import initWasm, * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache } from './core.js';

let exports = null;
/** Why the last `init()` failed (until one succeeds): `createFetch` reports it, not "call init". */
let failure = null;

export async function init(url) {
  if (exports) return;
  try {
    exports = await initWasm({ module_or_path: url ?? new URL('./pkg/unbusy_js_bg.wasm', import.meta.url) });
    failure = null;
  } catch (e) {
    failure = e;
    throw e;
  }
}

// Browsers decode zstd too (those that advertise it).
const create = makeCreateFetch(wasm, { memory: () => exports.memory, decodes: ['gzip', 'x-gzip', 'deflate', 'br', 'zstd'] });

export function createFetch(config, options) {
  if (!exports) {
    if (failure) {
      throw new Error(`unbusy: init() failed, so there is no engine for createFetch: ${failure?.message ?? failure}`, { cause: failure });
    }
    throw new Error('unbusy: call `await init()` before createFetch in a browser');
  }
  return create(config, options);
}
export { MemoryCache };
