// Node: the .wasm is read from the package and instantiated synchronously at import.
import { readFileSync } from 'node:fs';
import * as wasm from './pkg/unbusy_js.js';
import { makeCreateFetch, MemoryCache } from './core.js';

wasm.initSync({ module: readFileSync(new URL('./pkg/unbusy_js_bg.wasm', import.meta.url)) });

export const createFetch = makeCreateFetch(wasm);
export { MemoryCache };
export async function init() {}
