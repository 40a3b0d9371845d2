// Cloudflare-style workers (workerd): the .wasm is imported as a compiled module (workers
// forbid compiling from bytes at run time) and instantiated synchronously.
import module from './pkg/unbusy_js_bg.wasm';
import * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache } from './core.js';

const exports = wasm.initSync({ module });

export const createFetch = makeCreateFetch(wasm, { memory: () => exports.memory });
export { MemoryCache };
export async function init() {}
