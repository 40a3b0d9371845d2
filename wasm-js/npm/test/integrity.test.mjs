// What the package delivers, caches and counts is what the core judges an answer to be, in
// Node against busy-provider emulators (their answer shapes and gzip) and small loopback
// servers for what the emulator does not send. The shared cases (tests/answers/cases.json) hold
// the Envoy filter and this package to the same verdicts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, request as httpRequest } from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import OpenAIv6 from 'openai-v6';
import { createFetch } from 'unbusy';
import { provider } from '../test-support/busy-provider.mjs';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const decoder = new TextDecoder();

const chat = (content, extra = {}) =>
  JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content }], temperature: 0, ...extra });

const post = (f, url, body, headers = {}) =>
  f(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer caller', ...headers },
    body,
  });

const fast = { deadlines: { firstTokenMs: 2000, responseMs: 3000, totalMs: 20000 } };

/** The emulators named, in order of preference. */
async function world(...specs) {
  const ps = [];
  for (const [name, args] of specs) ps.push(await provider(name, args));
  return ps;
}

const config = (ps, extra = {}) => ({ ...fast, providers: ps.map((p, i) => ({ name: i === 0 ? 'primary' : 'backup', baseUrl: p.url })), ...extra });

/** The content of a chat answer (a completion's message, or a stream's deltas joined). */
function contentOf(text, sse) {
  if (!sse) return JSON.parse(text).choices[0].message.content;
  let out = '';
  for (const line of text.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    out += JSON.parse(line.slice(6)).choices?.[0]?.delta?.content ?? '';
  }
  return out;
}

function validStream(text) {
  const events = text.split('\n\n').filter((e) => e.trim() !== '');
  return events.at(-1) === 'data: [DONE]';
}

const events = () => {
  const seen = [];
  const onEvent = (e) => seen.push(e);
  return { seen, onEvent };
};

/** Waits until `f()` is true (events arrive after the body's last byte). */
async function until(f, ms = 3000) {
  const end = performance.now() + ms;
  while (!f() && performance.now() < end) await new Promise((r) => setTimeout(r, 5));
  return f();
}

/** A loopback server answering every request with `handler(req, res, body)`. */
async function server(handler) {
  const s = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => handler(req, res, Buffer.concat(chunks).toString()));
  });
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  s.unref();
  return { url: `http://127.0.0.1:${s.address().port}`, close: () => s.close() };
}

/** A recording reverse proxy in front of `target`: a base URL with its own path prefix
 * (`/openai`), which it strips before forwarding; any other path is a 404, as a gateway's. */
async function prefixProxy(target, prefix) {
  const paths = [];
  const t = new URL(target);
  const s = await server((req, res, body) => {
    paths.push(req.url);
    if (!req.url.startsWith(prefix + '/')) {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"message":"no such path"}}');
      return;
    }
    const up = httpRequest(
      { host: t.hostname, port: t.port, method: req.method, path: req.url.slice(prefix.length), headers: req.headers },
      (upRes) => {
        res.writeHead(upRes.statusCode, upRes.headers);
        upRes.pipe(res);
      },
    );
    up.end(body);
  });
  return { ...s, paths };
}

test('managed attempts ask providers for identity, whatever the caller accepts', async () => {
  const [p] = await world(['primary', []]);
  const f = createFetch(config([p]));
  const r = await post(f, `${p.url}/v1/chat/completions`, chat('identity please'), { 'accept-encoding': 'gzip, br' });
  assert.equal(r.status, 200);
  await r.text();
  const s = await p.stats();
  assert.equal(s.recent[0].accept_encoding, 'identity');
  assert.equal(s.gzip_answers, 0);
  // Through a Headers object too.
  const h = new Headers({ 'content-type': 'application/json', 'accept-encoding': 'gzip' });
  await (await f(`${p.url}/v1/chat/completions`, { method: 'POST', headers: h, body: chat('identity, headers') })).text();
  assert.equal((await p.stats()).recent[1].accept_encoding, 'identity');
});

test('a provider that gzips anyway: judged decoded, cached and replayed without its content-encoding', async () => {
  const [p] = await world(['primary', ['--always-gzip']]);
  const f = createFetch(config([p]));
  for (const stream of [false, true]) {
    const body = chat(`gzip anyway ${stream}`, { stream });
    const a = await post(f, `${p.url}/v1/chat/completions`, body);
    assert.equal(a.status, 200);
    assert.equal(a.headers.get('content-encoding'), null);
    assert.equal(a.headers.get('content-length'), null);
    const textA = await a.text();
    assert.match(contentOf(textA, stream), /\[primary\]/);
    const b = await post(f, `${p.url}/v1/chat/completions`, body);
    assert.match(b.headers.get('x-unbusy'), /cache=hit/, `stream ${stream}`);
    assert.equal(b.headers.get('content-encoding'), null);
    assert.match(b.headers.get('content-type'), stream ? /^text\/event-stream/ : /^application\/json/);
    assert.equal(contentOf(await b.text(), stream), contentOf(textA, stream));
  }
  assert.ok((await p.stats()).gzip_answers >= 2, 'the emulator did gzip');
});

test('a gzip 200 carrying an overload body (服务器繁忙) fails over', async () => {
  const ps = await world(['primary', ['--always-gzip', '--answer', 'overload_200']], ['backup', []]);
  const f = createFetch(config(ps));
  const r = await post(f, `${ps[0].url}/v1/chat/completions`, chat('gzip overload'));
  assert.equal(r.status, 200);
  assert.match(r.headers.get('x-unbusy'), /provider=backup; attempts=2/);
  assert.match((await r.json()).choices[0].message.content, /\[backup\]/);
  assert.equal((await ps[0].stats()).overload_200, 1);
});

for (const shape of ['truncated_json', 'html_200', 'overload_200']) {
  test(`a non-streaming 200 that is not an answer (${shape}) fails over, and only the answer is cached`, async () => {
    const ps = await world(['primary', ['--answer', shape]], ['backup', []]);
    const { seen, onEvent } = events();
    const f = createFetch(config(ps), { onEvent });
    const body = chat(`shape ${shape}`);
    const a = await post(f, `${ps[0].url}/v1/chat/completions`, body);
    assert.equal(a.status, 200);
    assert.match(a.headers.get('x-unbusy'), /provider=backup; attempts=2; cache=miss/);
    const textA = await a.text();
    assert.match(JSON.parse(textA).choices[0].message.content, /\[backup\]/);
    assert.notEqual(seen.find((e) => e.type === 'attemptFinished' && e.provider === 0)?.result, 'success');
    const b = await post(f, `${ps[0].url}/v1/chat/completions`, body);
    assert.match(b.headers.get('x-unbusy'), /cache=hit/);
    assert.equal(await b.text(), textA);
    assert.equal((await ps[0].stats()).attempts, 1);
  });
}

test('a stream that ends without [DONE] reaches the caller as it came, and is never cached', async () => {
  const [p] = await world(['primary', ['--answer', 'sse_no_done']]);
  const { seen, onEvent } = events();
  const f = createFetch(config([p]), { onEvent });
  const body = chat('no done', { stream: true });
  const a = await post(f, `${p.url}/v1/chat/completions`, body);
  const text = await a.text();
  assert.match(contentOf(text, true), /\[primary\]/);
  assert.ok(!validStream(text));
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'failed');
  const b = await post(f, `${p.url}/v1/chat/completions`, body);
  assert.doesNotMatch(b.headers.get('x-unbusy'), /cache=hit/);
  await b.text();
  assert.equal((await p.stats()).attempts, 2);
});

test('an SSE answer to a request whose stream was not literally true is cached and replayed as SSE', async () => {
  const sse =
    'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"[sse] hi"}}]}\n\n' +
    'data: [DONE]\n\n';
  let seen = 0;
  const s = await server((req, res) => {
    seen += 1;
    res.writeHead(200, { 'content-type': 'text/event-stream' }).end(sse);
  });
  try {
    const f = createFetch({ ...fast, providers: [{ name: 'sse', baseUrl: s.url }] });
    for (const extra of [{}, { stream: 'true' }]) {
      const body = chat(`sse always ${JSON.stringify(extra)}`, extra);
      const a = await post(f, `${s.url}/v1/chat/completions`, body);
      assert.match(a.headers.get('content-type'), /^text\/event-stream/);
      assert.equal(await a.text(), sse);
      const b = await post(f, `${s.url}/v1/chat/completions`, body);
      assert.match(b.headers.get('x-unbusy'), /cache=hit/);
      assert.match(b.headers.get('content-type'), /^text\/event-stream/);
      assert.equal(await b.text(), sse);
    }
    assert.equal(seen, 2);
  } finally {
    s.close();
  }
});

test('a stream the caller cancels once it read [DONE] (the openai SDK v5 way) is a success, and cached', async () => {
  // The installed openai SDK is v4 (package.json), which reads a stream to its end: v5's
  // behaviour is reproduced as it does it, reading with a reader until the `[DONE]` event and
  // then cancelling the body.
  const [p] = await world(['primary', []]);
  const { seen, onEvent } = events();
  const f = createFetch(config([p]), { onEvent });
  const body = chat('v5 cancels', { stream: true });
  const a = await post(f, `${p.url}/v1/chat/completions`, body);
  const reader = a.body.getReader();
  let text = '';
  while (!text.includes('data: [DONE]')) {
    const { done, value } = await reader.read();
    assert.ok(!done, 'the stream ended before [DONE]');
    text += decoder.decode(value, { stream: true });
  }
  await reader.cancel();
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'success');
  assert.equal(seen.find((e) => e.type === 'attemptFinished').result, 'success');
  const b = await post(f, `${p.url}/v1/chat/completions`, body);
  assert.match(b.headers.get('x-unbusy'), /cache=hit/);
  assert.equal(contentOf(await b.text(), true), contentOf(text, true));
  assert.equal((await p.stats()).attempts, 1);
});

test('a stream the caller cancels before [DONE] stays cancelled, and is not cached', async () => {
  const [p] = await world(['primary', ['--total-ms', '600,600']]);
  const { seen, onEvent } = events();
  const f = createFetch(config([p]), { onEvent });
  const body = chat('cancelled early', { stream: true });
  const a = await post(f, `${p.url}/v1/chat/completions`, body);
  const reader = a.body.getReader();
  await reader.read();
  await reader.cancel();
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'cancelled');
  const b = await post(f, `${p.url}/v1/chat/completions`, body);
  assert.doesNotMatch(b.headers.get('x-unbusy'), /cache=hit/);
  await b.text();
});

test('the installed openai SDK (v4) streams through to the end: a success, cached', async () => {
  const [p] = await world(['primary', []]);
  const { seen, onEvent } = events();
  const client = new OpenAI({ baseURL: `${p.url}/v1`, apiKey: 'k', maxRetries: 0, fetch: createFetch(config([p]), { onEvent }) });
  const ask = async () => {
    const stream = await client.chat.completions.create({ model: 'deepseek-chat', temperature: 0, stream: true, messages: [{ role: 'user', content: 'sdk v4 stream' }] });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    return text;
  };
  const first = await ask();
  assert.match(first, /\[primary\]/);
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'success');
  assert.equal(await ask(), first);
  assert.equal((await p.stats()).attempts, 1, 'the second came from the cache');
});

test('the openai SDK v6 (Node 20 takes up to v6; v7 needs Node 22) streams through: a success, cached', async () => {
  const [p] = await world(['primary', []]);
  const { seen, onEvent } = events();
  const client = new OpenAIv6({ baseURL: `${p.url}/v1`, apiKey: 'k', maxRetries: 0, fetch: createFetch(config([p]), { onEvent }) });
  const ask = async () => {
    const stream = await client.chat.completions.create({ model: 'deepseek-chat', temperature: 0, stream: true, messages: [{ role: 'user', content: 'sdk v6 stream' }] });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    return text;
  };
  const first = await ask();
  assert.match(first, /\[primary\]/);
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'success');
  assert.equal(seen.find((e) => e.type === 'attemptFinished').result, 'success');
  assert.equal(await ask(), first);
  assert.equal((await p.stats()).attempts, 1, 'the second came from the cache');
});

for (const shape of ['retry_after_zero', 'retry_after_past']) {
  test(`${shape}: a hint that means "now" is no hint, and retries keep the backoff`, async () => {
    const [p] = await world(['primary', ['--answer', shape]]);
    const baseMs = 250;
    const f = createFetch({ ...config([p]), retry: { maxAttempts: 3, baseMs, capMs: 2000, jitter: 'none' } });
    const r = await post(f, `${p.url}/v1/chat/completions`, chat(`hint ${shape}`, { temperature: 0.5 }));
    await r.text();
    const at = (await p.stats()).recent.map((q) => q.at_ms);
    assert.equal(at.length, 3, `attempts: ${at}`);
    for (let i = 1; i < at.length; i++) {
      assert.ok(at[i] - at[i - 1] >= baseMs, `gap ${i}: ${at[i] - at[i - 1]} ms < retry.baseMs (${at})`);
    }
  });
}

test('failover places the endpoint under each provider base URL, whatever prefix each has', async () => {
  // The primary's base has no /v1 (as DeepSeek's), the gateway's is /openai/v1 (behind a
  // prefix-stripping proxy), the backup's ends in /v1; the SDK's baseURL ends in /v1.
  const [busy, busyToo, healthy] = await world(['primary', ['--busy-503', '1']], ['gateway', ['--busy-503', '1']], ['backup', []]);
  const gateway = await prefixProxy(busyToo.url, '/openai');
  const backup = await prefixProxy(healthy.url, '');
  try {
    const f = createFetch({
      ...fast,
      retry: { maxAttempts: 3 },
      providers: [
        { name: 'primary', baseUrl: busy.url },
        { name: 'gateway', baseUrl: `${gateway.url}/openai/v1` },
        { name: 'backup', baseUrl: `${backup.url}/v1` },
      ],
    });
    const client = new OpenAI({ baseURL: `${busy.url}/v1`, apiKey: 'k', maxRetries: 0, fetch: f });
    const done = await client.chat.completions.create({ model: 'deepseek-chat', messages: [{ role: 'user', content: 'paths' }] });
    assert.match(done.choices[0].message.content, /\[backup\]/);
    assert.deepEqual(gateway.paths, ['/openai/v1/chat/completions']);
    assert.deepEqual(backup.paths, ['/v1/chat/completions']);
  } finally {
    gateway.close();
    backup.close();
  }
});

test('the endpoint mapping on real base URL shapes (DeepSeek, OpenAI, a gateway path)', async () => {
  const providers = [
    { name: 'deepseek', baseUrl: 'https://api.deepseek.com' },
    { name: 'openai', baseUrl: 'https://api.openai.com/v1' },
    { name: 'gateway', baseUrl: 'https://host/openai/v1/' },
  ];
  const cases = [
    ['https://api.deepseek.com/v1/chat/completions', ['https://api.deepseek.com/v1/chat/completions', 'https://api.openai.com/v1/chat/completions', 'https://host/openai/v1/chat/completions']],
    ['https://api.deepseek.com/chat/completions', ['https://api.deepseek.com/chat/completions', 'https://api.openai.com/v1/chat/completions', 'https://host/openai/v1/chat/completions']],
  ];
  for (const [caller, want] of cases) {
    const urls = [];
    const stub = async (url) => {
      urls.push(String(url));
      return urls.length < 3
        ? new Response('{"error":{"message":"Server overloaded"}}', { status: 503, headers: { 'content-type': 'application/json' } })
        : new Response('{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}', { status: 200, headers: { 'content-type': 'application/json' } });
    };
    const f = createFetch({ ...fast, retry: { maxAttempts: 3 }, providers }, { fetch: stub });
    const r = await post(f, caller, chat('mapping', { temperature: 1 }));
    assert.equal(r.status, 200);
    assert.deepEqual(urls, want, caller);
  }
  // Caller under the OpenAI base, the others mapped from it; a query string is kept.
  const urls = [];
  const stub = async (url) => {
    urls.push(String(url));
    return new Response('{"error":{"message":"Server overloaded"}}', { status: 503 });
  };
  const f = createFetch({ ...fast, retry: { maxAttempts: 3 }, providers: [providers[1], providers[0], providers[2]] }, { fetch: stub });
  await (await post(f, 'https://api.openai.com/v1/chat/completions?api-version=1', chat('mapping 2', { temperature: 1 }))).text();
  assert.deepEqual(urls, [
    'https://api.openai.com/v1/chat/completions?api-version=1',
    'https://api.deepseek.com/chat/completions?api-version=1',
    'https://host/openai/v1/chat/completions?api-version=1',
  ]);
});

test("a URL under no provider's baseUrl passes through by default, and is an error with unmatched: 'error'", async () => {
  const urls = [];
  const stub = async (url) => {
    urls.push(String(url));
    return new Response('{}', { status: 200 });
  };
  const providers = [{ name: 'deepseek', baseUrl: 'https://api.deepseek.com' }];
  const elsewhere = 'https://api.other.example/v1/chat/completions';
  const pass = createFetch({ providers }, { fetch: stub });
  const r = await post(pass, elsewhere, chat('where'));
  assert.equal(r.headers.get('x-unbusy'), null);
  assert.deepEqual(urls, [elsewhere]);
  const strict = createFetch({ providers }, { fetch: stub, unmatched: 'error' });
  await assert.rejects(post(strict, elsewhere, chat('where')), (e) => {
    assert.ok(e instanceof TypeError);
    assert.match(e.message, /under no configured provider/);
    assert.match(e.message, /api\.other\.example/);
    return true;
  });
  await assert.rejects(strict('https://api.deepseek.com.evil.example/v1/chat/completions', { method: 'POST', body: '{}' }), TypeError);
  assert.equal(urls.length, 1, 'nothing was sent');
  // A provider's other endpoints still pass through.
  await strict('https://api.deepseek.com/models');
  assert.deepEqual(urls, [elsewhere, 'https://api.deepseek.com/models']);
  assert.throws(() => createFetch({ providers }, { unmatched: 'reject' }), TypeError);
});

test("a tenant header never reads another source's cache entries (x-tenant: Bearer victim, x-tenant: anonymous)", async () => {
  const [p] = await world(['primary', []]);
  const url = `${p.url}/v1/chat/completions`;
  let n = 0;
  // Each forgery against a fresh cache holding only the victim's entry.
  const forgeries = [
    [{ authorization: 'Bearer victim' }, { 'x-tenant': 'Bearer victim' }],
    [{ authorization: 'Bearer victim' }, { 'x-tenant': 'Bearer victim', authorization: 'Bearer attacker' }],
    [{}, { 'x-tenant': 'anonymous' }],
    [{}, { 'x-tenant': 'anonymous', authorization: 'Bearer attacker' }],
  ];
  for (const headerTrusted of [false, true]) {
    for (const [victim, forged] of forgeries) {
      const f = createFetch(config([p], { tenancy: { header: 'x-tenant', headerTrusted } }));
      const body = chat(`secret ${n++}`);
      const send = (headers) => f(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
      await (await send(victim)).text();
      const again = await send(victim);
      assert.match(again.headers.get('x-unbusy'), /cache=hit/, 'the victim itself hits');
      await again.text();
      const r = await send(forged);
      assert.doesNotMatch(r.headers.get('x-unbusy'), /cache=hit/, `trusted ${headerTrusted}: ${JSON.stringify(forged)} read ${JSON.stringify(victim)}'s entry`);
      await r.text();
    }
  }
  // The header still divides one key's namespace, and a trusted one names the tenant alone.
  const split = createFetch(config([p], { tenancy: { header: 'x-tenant' } }));
  const body = chat('team answers');
  const send = (f, headers) => f(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
  await (await send(split, { authorization: 'Bearer shared', 'x-tenant': 'team-a' })).text();
  const other = await send(split, { authorization: 'Bearer shared', 'x-tenant': 'team-b' });
  assert.doesNotMatch(other.headers.get('x-unbusy'), /cache=hit/);
  await other.text();
  const trusted = createFetch(config([p], { tenancy: { header: 'x-tenant', headerTrusted: true } }));
  await (await send(trusted, { authorization: 'Bearer one', 'x-tenant': 'acme' })).text();
  const same = await send(trusted, { authorization: 'Bearer two', 'x-tenant': 'acme' });
  assert.match(same.headers.get('x-unbusy'), /cache=hit/);
  await same.text();
});

test('x-unbusy-deadline-ms bounds the whole request', async () => {
  const [p] = await world(['primary', ['--stall', '1', '--stall-s', '30']]);
  // Without the header the stalled attempt would hold until responseMs (10 s): half of it tells
  // the two apart with room for any machine's load.
  const responseMs = 10000;
  const f = createFetch({ deadlines: { responseMs, totalMs: 20000 }, providers: [{ name: 'primary', baseUrl: p.url }] });
  const started = performance.now();
  const r = await post(f, `${p.url}/v1/chat/completions`, chat('in a hurry'), { 'x-unbusy-deadline-ms': '700' });
  const took = performance.now() - started;
  assert.ok(r.status >= 500, `status ${r.status}`);
  await r.text();
  assert.ok(took < responseMs / 2, `answered after ${took} ms`);
});

test('x-unbusy-deadline-ms ends the request with a 504 deadline_exceeded at the deadline, and is never forwarded', async () => {
  // A busy primary, then a backup that answers after 4 s; the package's own waits are far
  // longer (10 s for the first byte, 20 s in all), so only the caller's 1 s can end it early.
  const answerMs = 4000;
  const deadlineMs = 1000;
  const ps = await world(['primary', ['--busy-503', '1']], ['backup', ['--first-token-ms', String(answerMs), '--total-ms', String(answerMs + 1)]]);
  const f = createFetch(config(ps, { deadlines: { firstTokenMs: 10000, responseMs: 10000, totalMs: 20000, stallMs: 10000 } }));
  // Ended at the deadline, long before the backup's answer: the bound is halfway between.
  const bound = deadlineMs + (answerMs - deadlineMs) / 2;
  for (const stream of [false, true]) {
    const before = await Promise.all(ps.map((p) => p.stats()));
    const started = performance.now();
    const r = await post(f, `${ps[0].url}/v1/chat/completions`, chat(`in a hurry ${stream}`, { stream, temperature: 0.7 }), { 'x-unbusy-deadline-ms': String(deadlineMs) });
    const took = performance.now() - started;
    const text = await r.text();
    assert.equal(r.status, 504, text);
    assert.equal(JSON.parse(text).error.code, 'deadline_exceeded', text);
    assert.ok(took >= deadlineMs - 50, `answered before the deadline: ${took} ms`);
    assert.ok(took < bound, `the deadline was not kept: ${took} ms`);
    assert.match(r.headers.get('x-unbusy'), /attempts=2/);
    // One attempt each, and the caller's header for unbusy went with neither.
    for (const [i, p] of ps.entries()) {
      const stats = await p.stats();
      assert.equal(stats.attempts, before[i].attempts + 1, `provider ${i}`);
      assert.ok(!stats.recent.at(-1).unbusy_headers.includes('x-unbusy-deadline-ms'), `forwarded to provider ${i}: ${stats.recent.at(-1).unbusy_headers}`);
    }
  }
});

test('a stream that stalls midway is cut after stallMs: the caller keeps the first events, the attempt is a stall, nothing is cached', async () => {
  // The first event comes at once, the next only about 4 s later (the answer's five words
  // spread over 20 s): a pause far past stallMs.
  const stallMs = 800;
  const gapMs = 4000;
  const [p] = await world(['primary', ['--first-token-ms', '30', '--total-ms', '20000']]);
  const { seen, onEvent } = events();
  const f = createFetch(config([p], { deadlines: { firstTokenMs: 2000, responseMs: 3000, totalMs: 30000, stallMs } }), { onEvent });
  const body = chat('stall', { stream: true });
  const started = performance.now();
  const r = await post(f, `${p.url}/v1/chat/completions`, body);
  assert.equal(r.status, 200);
  // Read for at most two gaps: a stream that is never cut fails, it does not hang.
  const reader = r.body.getReader();
  const chunks = [];
  let firstAt;
  let cut;
  const giveUp = started + 2 * gapMs;
  for (;;) {
    const timeout = new Promise((resolve) => setTimeout(() => resolve('open'), Math.max(0, giveUp - performance.now())).unref());
    const step = await Promise.race([reader.read().catch((e) => ({ error: e })), timeout]);
    if (step === 'open') {
      reader.cancel().catch(() => {});
      cut = new Error(`still open after ${2 * gapMs} ms`);
      break;
    }
    if (step.error) {
      cut = step.error;
      break;
    }
    if (step.done) break;
    firstAt ??= performance.now() - started;
    chunks.push(decoder.decode(step.value));
  }
  const ended = performance.now() - started;
  const text = chunks.join('');
  // The caller had the first event...
  assert.ok(firstAt !== undefined, 'no event reached the caller');
  assert.match(contentOf(text, true), /\[primary\]/);
  assert.ok(!text.includes('[DONE]'), text);
  // ...and its stream was cut (an error, not a clean end) stallMs after it, long before the
  // next event would have come: the bound is halfway between the two.
  assert.ok(cut, 'the stream ended cleanly');
  assert.match(String(cut?.message), /Stalled/, String(cut));
  assert.ok(ended >= firstAt + stallMs - 50, `cut before stallMs: ${ended} ms, first event at ${firstAt} ms`);
  assert.ok(ended < firstAt + stallMs + (gapMs - stallMs) / 2, `not cut after stallMs: ${ended} ms, first event at ${firstAt} ms`);
  // The attempt is a stall, the request failed.
  assert.ok(await until(() => seen.some((e) => e.type === 'requestFinished')));
  assert.equal(seen.find((e) => e.type === 'attemptFinished' && e.provider === 0)?.result, 'stall');
  assert.equal(seen.find((e) => e.type === 'requestFinished').outcome, 'failed');
  // Nothing was cached: the same (deterministic) request goes to the provider again.
  const again = await post(f, `${p.url}/v1/chat/completions`, body);
  assert.doesNotMatch(again.headers.get('x-unbusy'), /cache=hit/);
  await again.body.cancel();
  assert.equal((await p.stats()).attempts, 2);
});

// The differential test: every shared case through the package, the verdicts the filter is
// held to (tests/answers/README.md).
const casesFile = `${root}tests/answers/cases.json`;
const cases = existsSync(casesFile) ? JSON.parse(readFileSync(casesFile, 'utf8')) : [];
for (const c of cases) {
  test(`shared case ${c.name}: ${c.answer}, stream ${c.stream}, accept-encoding ${c.accept_encoding}`, async () => {
    const ps = await world(['primary', ['--answer', c.answer]], ['backup', []]);
    const f = createFetch(config(ps));
    const url = `${ps[0].url}/v1/chat/completions`;
    const body = chat(`case ${c.name}`, { stream: c.stream });
    const accepted = (c.accept_encoding ?? '').toLowerCase().split(',').map((e) => e.split(';')[0].trim()).filter(Boolean);
    const read = async (r, acceptedCodings) => {
      const encoding = r.headers.get('content-encoding');
      const bytes = new Uint8Array(await r.arrayBuffer());
      if (encoding === null || encoding === 'identity') return decoder.decode(bytes);
      assert.ok(acceptedCodings.includes(encoding), `${c.name}: content-encoding ${encoding} was not accepted`);
      assert.equal(encoding, 'gzip');
      return decoder.decode(gunzipSync(bytes));
    };
    const valid = (r, text) => {
      assert.equal(r.status, 200, text);
      if (c.stream) assert.ok(validStream(text), `${c.name}: not a complete stream: ${text}`);
      else assert.ok(Array.isArray(JSON.parse(text).choices), text);
    };
    const a = await post(f, url, body, c.accept_encoding === null ? {} : { 'accept-encoding': c.accept_encoding });
    const textA = await read(a, accepted);
    const sseA = /^text\/event-stream/.test(a.headers.get('content-type') ?? '');
    const contentA = contentOf(textA, sseA);
    assert.ok(contentA.includes(`[${c.expect}]`), `${c.name}: expected an answer from ${c.expect}, got ${contentA}`);
    if (c.complete !== false) valid(a, textA);
    const b = await post(f, url, body);
    const hit = /cache=hit/.test(b.headers.get('x-unbusy') ?? '');
    assert.equal(hit, c.cached, `${c.name}: cache hit ${hit}, x-unbusy ${b.headers.get('x-unbusy')}`);
    const textB = await read(b, []);
    if (c.cached) {
      assert.equal(b.headers.get('content-encoding'), null);
      valid(b, textB);
      assert.equal(contentOf(textB, /^text\/event-stream/.test(b.headers.get('content-type') ?? '')), contentA);
    }
  });
}
