// The npm package in Node, against real busy-provider emulators on loopback.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { createFetch } from 'unbusy';
import { provider } from '../test-support/busy-provider.mjs';

const chat = (content, extra = {}) =>
  JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content }], ...extra });

const post = (f, base, body, init = {}) =>
  f(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer caller', ...(init.headers ?? {}) },
    body,
    signal: init.signal,
  });

const fast = { deadlines: { firstTokenMs: 800, responseMs: 1500, totalMs: 20000 } };

test('a busy primary fails over to the backup, with its credentials and model name', async () => {
  const primary = await provider('primary', ['--busy-503', '1']);
  const backup = await provider('backup');
  const f = createFetch({
    ...fast,
    providers: [
      { name: 'primary', baseUrl: primary.url },
      { name: 'backup', baseUrl: backup.url, apiKey: 'backup-key', models: { 'deepseek-chat': 'backup-model' } },
    ],
  });
  const r = await post(f, primary.url, chat('hello'));
  assert.equal(r.status, 200);
  const v = await r.json();
  assert.match(v.choices[0].message.content, /\[backup\]/);
  assert.match(r.headers.get('x-unbusy'), /provider=backup; attempts=2/);
  const seen = (await backup.stats()).recent[0];
  assert.equal(seen.authorization, 'Bearer backup-key');
  assert.equal(seen.model, 'backup-model');
  assert.equal((await primary.stats()).recent[0].authorization, 'Bearer caller');
});

test('a keep-alive stall fails over before the caller sees a byte, and streams still stream', async () => {
  const primary = await provider('primary', ['--stall', '1', '--stall-s', '30']);
  const backup = await provider('backup', ['--total-ms', '900,900']);
  const f = createFetch({ ...fast, providers: [{ name: 'primary', baseUrl: primary.url }, { name: 'backup', baseUrl: backup.url }] });
  const started = performance.now();
  const r = await post(f, primary.url, chat('stalled', { stream: true }));
  const headersAt = performance.now() - started;
  assert.equal(r.status, 200);
  assert.ok(headersAt >= 750, `held until the first-token deadline: ${headersAt}`);
  assert.ok(r.body instanceof ReadableStream);
  const reader = r.body.getReader();
  const first = await reader.read();
  const firstAt = performance.now() - started;
  let text = new TextDecoder().decode(first.value);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    text += new TextDecoder().decode(value);
  }
  const endAt = performance.now() - started;
  assert.ok(endAt - firstAt > 500, `the backup's answer streamed (${firstAt} -> ${endAt})`);
  assert.match(text, /\[backup\]/);
  assert.doesNotMatch(text, /keep-alive/);
  assert.match(text, /data: \[DONE\]/);
});

test('the cache answers a repeat, never for another tenant', async () => {
  const p = await provider('primary');
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }] });
  const body = chat('deterministic', { temperature: 0 });
  const a = await post(f, p.url, body);
  const textA = await a.text();
  assert.match(a.headers.get('x-unbusy'), /cache=miss/);
  const b = await post(f, p.url, body);
  assert.match(b.headers.get('x-unbusy'), /cache=hit/);
  assert.equal(await b.text(), textA);
  const c = await post(f, p.url, body, { headers: { authorization: 'Bearer someone-else' } });
  assert.match(c.headers.get('x-unbusy'), /cache=miss/);
  await c.text();
  assert.equal((await p.stats()).attempts, 2);
});

test('AbortSignal is honoured while waiting to retry', async () => {
  // A 20 s hint against an abort at 400 ms: a bound of half the hint tells one from the other
  // with room for any machine's load.
  const hintS = 20;
  const p = await provider('primary', ['--rate-limit-429', '1', '--retry-after', String(hintS)]);
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }] });
  const ctl = new AbortController();
  setTimeout(() => ctl.abort(), 400);
  const started = performance.now();
  await assert.rejects(post(f, p.url, chat('wait'), { signal: ctl.signal }), { name: 'AbortError' });
  const took = performance.now() - started;
  assert.ok(took < (hintS * 1000) / 2, `rejected at the abort, not after the hint (${took} ms)`);
  assert.equal((await p.stats()).attempts, 1);
});

test('when nothing can help, an OpenAI-shaped 503 with Retry-After', async () => {
  const p = await provider('primary', ['--outage']);
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }], retry: { maxAttempts: 2 } });
  const r = await post(f, p.url, chat('down'));
  assert.equal(r.status, 503);
  assert.ok(Number(r.headers.get('retry-after')) >= 1);
  const v = await r.json();
  assert.equal(v.error.type, 'server_error');
});

test('invalid configuration throws at createFetch, naming the field', () => {
  assert.throws(() => createFetch({ providers: [{ name: 'p', baseUrl: 'ftp://x', weight: 0 }] }), (e) => {
    assert.match(e.message, /providers\[0\]\.baseUrl must be an http/);
    assert.match(e.message, /providers\[0\]\.weight must be > 0/);
    return true;
  });
  assert.throws(() => createFetch({ providers: [] }), /providers must not be empty/);
});

test('anything else passes straight through, untouched', async () => {
  const p = await provider('primary');
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }] });
  const models = await f(`${p.url}/v1/models`);
  assert.equal(models.status, 200);
  assert.equal(models.headers.get('x-unbusy'), null);
  const other = await f(`${p.url}/stats`);
  assert.equal((await other.json()).attempts, 0);
});

test('onEvent reports every engine event', async () => {
  const primary = await provider('primary', ['--busy-503', '1']);
  const backup = await provider('backup');
  const events = [];
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: primary.url }, { name: 'backup', baseUrl: backup.url }] }, { onEvent: (e) => events.push(e) });
  await (await post(f, primary.url, chat('events'))).text();
  assert.deepEqual(
    events.filter((e) => e.type === 'attemptFinished').map((e) => [e.provider, e.result]),
    [[0, 'busy'], [1, 'success']],
  );
  assert.equal(events.find((e) => e.type === 'requestFinished').outcome, 'success');
});

test('the openai SDK uses createFetch as its transport, with its own retries off', async () => {
  const primary = await provider('primary', ['--busy-503', '1']);
  const backup = await provider('backup');
  const client = new OpenAI({
    baseURL: `${primary.url}/v1`,
    apiKey: 'sdk-key',
    maxRetries: 0,
    fetch: createFetch({ providers: [{ name: 'primary', baseUrl: primary.url }, { name: 'backup', baseUrl: backup.url }] }),
  });
  const done = await client.chat.completions.create({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'sdk hello' }] });
  assert.match(done.choices[0].message.content, /\[backup\] An answer to: sdk hello/);
  const stream = await client.chat.completions.create({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'sdk stream' }], stream: true });
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  assert.match(text, /\[backup\] An answer to: sdk stream/);
  assert.equal((await primary.stats()).attempts, 2);
});

test('an answer read whole behaves as a Response: each body reader once, headers, clone', async () => {
  const p = await provider('primary');
  const f = createFetch({ ...fast, providers: [{ name: 'primary', baseUrl: p.url }] });
  const r = await post(f, p.url, chat('conformance'));
  assert.ok(r instanceof Response);
  assert.equal(r.status, 200);
  assert.equal(r.ok, true);
  assert.equal(r.headers.get('content-length'), null);
  assert.match(r.headers.get('x-unbusy'), /^provider=primary; attempts=1; cache=none; tier=0$/);
  assert.match(r.headers.get('content-type'), /application\/json/);
  const copy = r.clone();
  assert.equal(r.bodyUsed, false);
  const text = await r.text();
  assert.equal(r.bodyUsed, true);
  await assert.rejects(r.text(), TypeError);
  await assert.rejects(r.json(), TypeError);
  assert.throws(() => r.clone(), TypeError);
  assert.deepEqual(await copy.json(), JSON.parse(text));
  // As a stream, as bytes and as a blob: the same bytes.
  const viaStream = await post(f, p.url, chat('conformance'));
  let streamed = '';
  for await (const chunk of viaStream.body) streamed += new TextDecoder().decode(chunk, { stream: true });
  assert.equal(viaStream.bodyUsed, true);
  await assert.rejects(viaStream.text(), TypeError);
  assert.match(streamed, /"choices"/);
  const bytes = new Uint8Array(await (await post(f, p.url, chat('conformance'))).arrayBuffer());
  assert.match(new TextDecoder().decode(bytes), /"choices"/);
  const blob = await (await post(f, p.url, chat('conformance'))).blob();
  assert.match(blob.type, /application\/json/);
  assert.match(await blob.text(), /"choices"/);
});

test('attempts that hang before their headers: the answer still comes, hung connections do not pile up', async () => {
  // A provider that accepts requests and never answers them (emulated here: busy-provider's
  // stalls send headers first).
  const { createServer } = await import('node:http');
  let open = 0;
  let seen = 0;
  const hung = createServer((req) => {
    seen += 1;
    open += 1;
    req.socket.once('close', () => (open -= 1));
  });
  await new Promise((r) => hung.listen(0, '127.0.0.1', r));
  const hungUrl = `http://127.0.0.1:${hung.address().port}`;
  const backup = await provider('backup');
  try {
    const f = createFetch({
      deadlines: { firstTokenMs: 300, responseMs: 600, totalMs: 20000 },
      providers: [
        { name: 'hung', baseUrl: hungUrl },
        { name: 'backup', baseUrl: backup.url },
      ],
    });
    // Seven requests, one after the other. The hung provider is the preferred one and each
    // hang is a timeout (not an overload signal, and fewer than the breaker's run of failures),
    // so every request tries it first, gives up at the response deadline and is answered by
    // the backup: seven attempts reach the hung provider, one per request.
    const requests = 7;
    for (let i = 0; i < requests; i++) {
      const r = await post(f, hungUrl, chat(`hang ${i}`));
      assert.equal(r.status, 200);
      assert.equal(r.headers.get('x-unbusy'), 'provider=backup; attempts=2; cache=none; tier=0', `request ${i}`);
      assert.equal((await r.json()).choices[0].message.content, `[backup] An answer to: hang ${i}`);
    }
    assert.equal(seen, requests, `the hung provider saw ${seen} attempts`);
    assert.equal((await backup.stats()).attempts, requests);
    // The first hang is abandoned (no signal was worth its cost before it); every later attempt
    // to that provider can be aborted, so it is closed when the engine gives up on it. The
    // server hears of each close a moment later: wait for that, not for a fixed time.
    const until = performance.now() + 10_000;
    while (open > 1 && performance.now() < until) await new Promise((r) => setTimeout(r, 10));
    assert.ok(open <= 1, `${open} connections to the hung provider still open after ${seen} attempts`);
  } finally {
    hung.closeAllConnections();
    hung.close();
  }
});
