// Per-call overhead in Node against a fast local server: plain fetch, createFetch, and a
// cockatiel retry + circuit-breaker policy around fetch, in one run, interleaved in rounds so
// drift hits all three alike. Also the package's sizes beside cockatiel's and p-retry's.
// Usage: node bench/overhead.mjs [calls-per-round] [rounds]
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { createFetch } from 'unbusy';
import { startServer, runRounds, printTable } from './harness.mjs';
import { retry, circuitBreaker, handleAll, wrap, ExponentialBackoff, ConsecutiveBreaker } from 'cockatiel';

const calls = Number(process.argv[2] ?? 500);
const rounds = Number(process.argv[3] ?? 31);
const { base, url, init, close } = await startServer();

const unbusy = createFetch({ providers: [{ name: 'local', baseUrl: base }], cache: { enabled: false } });
const policy = wrap(
  retry(handleAll, { maxAttempts: 2, backoff: new ExponentialBackoff() }),
  circuitBreaker(handleAll, { halfOpenAfter: 10_000, breaker: new ConsecutiveBreaker(5) }),
);
const cases = {
  'plain fetch': () => fetch(url, init),
  'unbusy createFetch': () => unbusy(url, init),
  'cockatiel retry + breaker around fetch': () => policy.execute(() => fetch(url, init)),
};
const totals = await runRounds(cases, { calls, rounds, warmUp: 200 });
close();
printTable(totals, { calls, rounds });
const here = new URL('../', import.meta.url).pathname;
const gz = (b) => gzipSync(b, { level: 9 }).length;
function jsFiles(dir) {
  const out = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory() && !/test|__|esm/.test(e.name)) out.push(...jsFiles(p));
    else if (/\.(m?js|cjs)$/.test(e.name) && !/\.d\.|test/.test(e.name)) out.push(p);
  }
  return out;
}
function total(files) {
  const b = Buffer.concat(files.map((f) => readFileSync(f)));
  return `${b.length} B (${gz(b)} B gzipped)`;
}
const wasm = readFileSync(here + 'pkg/unbusy_js_bg.wasm');
console.log('\n| package part | size |');
console.log('|---|---|');
console.log(`| unbusy .wasm (wasm-opt -Oz) | ${wasm.length} B (${gz(wasm)} B gzipped) |`);
console.log(`| unbusy JS glue (core.js, node.js, wasm-bindgen glue) | ${total([here + 'core.js', here + 'node.js', here + 'pkg/unbusy_js.js'])} |`);
console.log(`| cockatiel 3.2.1 (dist, CommonJS build) | ${total(jsFiles(here + 'node_modules/cockatiel/dist'))} |`);
console.log(`| p-retry 6.2.1 + retry + is-network-error | ${total([here + 'node_modules/p-retry/index.js', ...jsFiles(here + 'node_modules/retry/lib'), here + 'node_modules/is-network-error/index.js'])} |`);
