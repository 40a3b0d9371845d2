// Per-call overhead in Node against a fast local server: plain fetch, createFetch, and a
// cockatiel retry + circuit-breaker policy around fetch, in one run, interleaved in rounds so
// drift hits all three alike. Also the package's sizes beside cockatiel's and p-retry's.
// Usage: node bench/overhead.mjs [calls-per-round] [rounds]
import { createServer } from 'node:http';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { createFetch } from 'unbusy';
import { retry, circuitBreaker, handleAll, wrap, ExponentialBackoff, ConsecutiveBreaker } from 'cockatiel';

const calls = Number(process.argv[2] ?? 500);
const rounds = Number(process.argv[3] ?? 31);
const answer = JSON.stringify({ id: 'x', object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }] });
const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(answer) });
    res.end(answer);
  });
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;
const url = `${base}/v1/chat/completions`;
const body = JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello' }] });
const init = { method: 'POST', headers: { 'content-type': 'application/json', authorization: 'Bearer k' }, body };

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
const totals = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
for (const [name, f] of Object.entries(cases)) for (let i = 0; i < 200; i++) await (await f()).text(); // warm up
for (let r = 0; r < rounds; r++) {
  for (const [name, f] of Object.entries(cases)) {
    const t = performance.now();
    for (let i = 0; i < calls; i++) {
      const resp = await f();
      await resp.text();
    }
    totals[name].push(((performance.now() - t) * 1000) / calls);
  }
}
server.close();
const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
const plain = totals['plain fetch'];
// "Above plain fetch" is the median of each round's difference: a round's cases run back to
// back, so the machine's drift between rounds cancels out.
console.log(`Node ${process.version}, ${calls} sequential calls x ${rounds} rounds, medians`);
console.log('| case | µs per call | above plain fetch |');
console.log('|---|---:|---:|');
for (const [name, v] of Object.entries(totals)) {
  const above = median(v.map((x, i) => x - plain[i]));
  console.log(`| ${name} | ${median(v).toFixed(1)} | ${(above >= 0 ? '+' : '') + above.toFixed(1)} |`);
}
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
