// What the npm benchmarks share: a fast local server answering a small chat completion at once,
// the request they send it, and rounds of sequential calls whose cases run back to back, with
// each case reported beside plain fetch as the median of its per-round differences (so the
// machine's drift between rounds cancels out).
import { createServer } from 'node:http';

const answer = JSON.stringify({ id: 'x', object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }] });

/** The server, its base URL, the chat/completions URL and the request's `init`. */
export async function startServer() {
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(answer) });
      res.end(answer);
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${server.address().port}`;
  const body = JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello' }] });
  return {
    base,
    url: `${base}/v1/chat/completions`,
    init: { method: 'POST', headers: { 'content-type': 'application/json', authorization: 'Bearer k' }, body },
    close: () => server.close(),
  };
}

/** Warms every case up, calls `afterWarmUp`, then runs the rounds: µs per call, by case. */
export async function runRounds(cases, { calls, rounds, warmUp, afterWarmUp = () => {} }) {
  const totals = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
  for (const f of Object.values(cases)) for (let i = 0; i < warmUp; i++) await (await f()).text();
  afterWarmUp();
  for (let r = 0; r < rounds; r++) {
    for (const [name, f] of Object.entries(cases)) {
      const t = performance.now();
      for (let i = 0; i < calls; i++) await (await f()).text();
      totals[name].push(((performance.now() - t) * 1000) / calls);
    }
  }
  return totals;
}

/** Prints the table; the first case is the baseline ("plain fetch"). */
export function printTable(totals, { calls, rounds }) {
  const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
  const plain = Object.values(totals)[0];
  console.log(`Node ${process.version}, ${calls} sequential calls x ${rounds} rounds, medians`);
  console.log('| case | µs per call | above plain fetch |');
  console.log('|---|---:|---:|');
  for (const [name, v] of Object.entries(totals)) {
    const above = median(v.map((x, i) => x - plain[i]));
    console.log(`| ${name} | ${median(v).toFixed(1)} | ${(above >= 0 ? '+' : '') + above.toFixed(1)} |`);
  }
}
