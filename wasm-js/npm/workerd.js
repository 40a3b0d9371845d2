// Cloudflare-style workers (workerd): the .wasm is imported as a compiled module (workers
// forbid compiling from bytes at run time) and instantiated synchronously. A bundler must keep
// that import for the runtime (wrangler does; with esbuild: the `workerd` condition and
// `loader: { '.wasm': 'copy' }`, README "Workers").
import module from './pkg/unbusy_js_bg.wasm';
import * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache } from './core.js';

const exports = wasm.initSync({ module });

export const createFetch = makeCreateFetch(wasm, { memory: () => exports.memory });
export { MemoryCache };
/** Nothing to do: the module was imported with this file. */
export async function init() {}
