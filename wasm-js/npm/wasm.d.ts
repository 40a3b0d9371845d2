/**
 * The engine's WebAssembly module as bytes, for bundles that do not carry the `.wasm` file
 * along (esbuild, rollup, Node bundles): `await init({ module: wasm })` before `createFetch`.
 */
declare const wasm: Uint8Array;
export default wasm;
