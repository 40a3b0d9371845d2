// Node: the .wasm is read from the package and instantiated synchronously at import.
import { readFileSync } from 'node:fs';
import * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache } from './core.js';

const exports = wasm.initSync({ module: readFileSync(new URL('./pkg/unbusy_js_bg.wasm', import.meta.url)) });

// Node's consumers read answers through Response's public API only: answers read whole are
// handed over as HeldResponses (see core.js).
export const createFetch = makeCreateFetch(wasm, { heldResponses: true, lingeringTimers: true, memory: () => exports.memory });
export { MemoryCache };
export async function init() {}
