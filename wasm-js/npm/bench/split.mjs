// Where createFetch's per-call overhead goes: against the same fast local server as
// overhead.mjs, plain fetch beside (1) the same wrapper without the engine (parse the request,
// copy its headers, fetch, read whole, hand over a held answer), (2) that wrapper plus the
// engine's calls for one request (admit, actions, outcome), (3) createFetch; and the time spent
// inside those engine calls, and the same calls in a warm loop without I/O.
// Usage: node bench/split.mjs [calls-per-round] [rounds]
import { readFileSync } from 'node:fs';
import { createFetch } from 'unbusy';
import * as glue from '../pkg/unbusy_js.js';
import { startServer, runRounds, printTable } from './harness.mjs';

const { memory } = glue.initSync({ module: readFileSync(new URL('../pkg/unbusy_js_bg.wasm', import.meta.url)) }); // already done by 'unbusy'
const calls = Number(process.argv[2] ?? 500);
const rounds = Number(process.argv[3] ?? 31);
const { base, url, init, close } = await startServer();
const unbusy = createFetch({ providers: [{ name: 'local', baseUrl: base }], cache: { enabled: false } });

// A held answer, as createFetch hands one over in Node (the text it read, no second stream).
class Held extends Response {
  #text;
  constructor(text, status) {
    super(null, { status });
    this.#text = text;
  }
  async text() {
    return this.#text;
  }
}
const decoder = new TextDecoder();
async function readWhole(resp) {
  const reader = resp.body.getReader();
  const chunks = [];
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
  }
  return chunks.map((c) => decoder.decode(c, { stream: true })).join('') + decoder.decode();
}
const engine = new glue.JsEngine(JSON.stringify({ providers: [{ name: 'local', base_url: base }], cache: { enabled: false } }), 1);
engine.listen(false);
const HEADERS = '[["authorization","Bearer k"]]';
const actionAt = engine.actionBuffer();
const JSON_HEADERS = '[["content-type","application/json"]]';
const ANSWER = new TextEncoder().encode('{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}');
let inEngine = 0;
let engineRequests = 0;
function admit(body) {
  const t = performance.now();
  engine.read(HEADERS, body); // the request as the core reads it: its handle in the action buffer
  const id = engine.admit(t, new Float64Array(memory.buffer, actionAt, 1)[0], NaN);
  while (engine.nextAction() !== 0);
  inEngine += performance.now() - t;
  return id;
}
function outcome(id, body) {
  const t = performance.now();
  engine.onAnswer(t, id, 1, 200, JSON_HEADERS, body, Date.now() / 1000);
  while (engine.nextAction() !== 0);
  inEngine += performance.now() - t;
  engineRequests += 1;
}

const cases = {
  'plain fetch': () => fetch(url, init),
  'wrapper without the engine': async () => {
    JSON.parse(init.body);
    const resp = await fetch(url, { method: 'POST', headers: { ...init.headers }, body: init.body });
    return new Held(await readWhole(resp), resp.status);
  },
  'wrapper + the engine\'s calls': async () => {
    const id = admit(init.body);
    const resp = await fetch(url, { method: 'POST', headers: { ...init.headers }, body: init.body });
    const text = await readWhole(resp);
    outcome(id, new TextEncoder().encode(text));
    return new Held(text, resp.status);
  },
  'unbusy createFetch': () => unbusy(url, init),
};
const totals = await runRounds(cases, {
  calls,
  rounds,
  warmUp: 300,
  afterWarmUp: () => {
    inEngine = 0;
    engineRequests = 0;
  },
});
close();
const inEngineUs = (inEngine * 1000) / engineRequests;

// The same engine calls in a warm loop, no I/O between them.
const n = 200000;
const t = performance.now();
for (let i = 0; i < n; i++) outcome(admit(init.body), ANSWER);
const warmUs = ((performance.now() - t) * 1000) / n;

printTable(totals, { calls, rounds });
console.log(`\ntime inside the engine's calls, per request: ${inEngineUs.toFixed(2)} µs between network events, ${warmUs.toFixed(2)} µs in a warm loop (both timings include performance.now())`);
