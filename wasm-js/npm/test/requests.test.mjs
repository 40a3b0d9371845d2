// The per-request rules (docs/requests.md) as the package applies them: the core's one reading of
// a request (`request::read`), the same function the Envoy filter calls. tests/tests/requests_e2e.rs
// sends the same requests through Envoy and expects the same answers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createFetch } from 'unbusy';
import { provider } from '../test-support/busy-provider.mjs';

const chat = (content, extra = {}) =>
  JSON.stringify({ model: 'deepseek-chat', messages: [{ role: 'user', content }], ...extra });

const post = (f, base, body, headers = {}) =>
  f(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer caller', ...headers },
    body,
  });

// One Chinese prompt, written as a JS client writes it (raw UTF-8: 142 bytes) and as Python's
// json.dumps does (escaped, with spaces). Either is charged ceil(142 / 4) + max_tokens tokens:
// 37 with max_tokens 1. (UTF-16 units / 4, the package's old estimate, said 27.)
const RAW = (maxTokens) =>
  `{"model":"deepseek-chat","max_tokens":${maxTokens},"messages":[{"role":"user","content":"请用三句话介绍长城，并说明它为什么重要。"}]}`;
const ESCAPED = (maxTokens) =>
  `{"model": "deepseek-chat", "max_tokens": ${maxTokens}, "messages": [{"role": "user", "content": "\\u8bf7\\u7528\\u4e09\\u53e5\\u8bdd\\u4ecb\\u7ecd\\u957f\\u57ce\\uff0c\\u5e76\\u8bf4\\u660e\\u5b83\\u4e3a\\u4ec0\\u4e48\\u91cd\\u8981\\u3002"}]}`;

test('a Chinese prompt is charged 37 tokens, raw or escaped, as behind Envoy', async () => {
  const p = await provider('primary');
  // A bucket of exactly 37 tokens per tenant, refilled at one a second: 37 fits, 38 never does.
  const f = createFetch({
    providers: [{ name: 'primary', baseUrl: p.url }],
    limits: { perTenant: { tokensPerMinute: 60, burstTokens: 37 } },
  });
  const cases = [
    ['raw, max_tokens 1', RAW(1), 200],
    ['raw, max_tokens 2', RAW(2), 413],
    ['escaped, max_tokens 1', ESCAPED(1), 200],
    ['escaped, max_tokens 2', ESCAPED(2), 413],
  ];
  for (const [i, [what, body, status]] of cases.entries()) {
    const r = await post(f, p.url, body, { authorization: `Bearer tenant-${i}` });
    const text = await r.text();
    assert.equal(r.status, status, `${what}: ${text}`);
  }
  // The bucket a 37-token request emptied refuses the next one with a 429.
  const again = await post(f, p.url, ESCAPED(1), { authorization: 'Bearer tenant-0' });
  assert.equal(again.status, 429, await again.text());
  assert.equal((await p.stats()).attempts, 2);
});

test('x-unbusy-cache: always caches a sampled request, never keeps a deterministic one out', async () => {
  const p = await provider('primary');
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }] });
  const sampled = chat('sampled', { temperature: 0.7 });
  for (const expected of ['cache=miss', 'cache=hit']) {
    const r = await post(f, p.url, sampled, { 'x-unbusy-cache': 'always' });
    assert.equal(r.status, 200, await r.clone().text());
    assert.match(r.headers.get('x-unbusy'), new RegExp(expected));
    await r.text();
  }
  // Without the opt-in a sampled request is not cached; with `never`, a deterministic one is not.
  const plain = await post(f, p.url, chat('sampled too', { temperature: 0.7 }));
  assert.match(plain.headers.get('x-unbusy'), /cache=none/);
  await plain.text();
  const deterministic = chat('deterministic', { temperature: 0 });
  for (let i = 0; i < 2; i++) {
    const r = await post(f, p.url, deterministic, { 'x-unbusy-cache': 'NEVER' });
    assert.match(r.headers.get('x-unbusy'), /cache=none/);
    await r.text();
  }
  assert.equal((await p.stats()).attempts, 4);
});

test('a per-request header value it does not define is a 400 naming the header, sent nowhere', async () => {
  const p = await provider('primary');
  const f = createFetch({ providers: [{ name: 'primary', baseUrl: p.url }] });
  for (const [name, value, says] of [
    ['x-unbusy-priority', 'urgent', 'x-unbusy-priority must be low, normal or high, not "urgent"'],
    ['x-unbusy-cache', 'force', 'x-unbusy-cache must be always, never or default, not "force"'],
    ['x-unbusy-deadline-ms', '1.5', 'x-unbusy-deadline-ms must be a whole number of milliseconds, at least 1, not "1.5"'],
    ['x-unbusy-deadline-ms', '0', 'x-unbusy-deadline-ms must be a whole number of milliseconds, at least 1, not "0"'],
  ]) {
    const r = await post(f, p.url, chat('hi'), { [name]: value });
    assert.equal(r.status, 400);
    assert.equal(r.headers.get('x-unbusy'), 'refused=bad_request');
    assert.equal(r.headers.get('x-should-retry'), 'false');
    const error = (await r.json()).error;
    assert.equal(error.type, 'invalid_request_error');
    assert.equal(error.message, says);
  }
  // A header given twice is one list (fetch's Headers joins it), as the filter reads it.
  const twice = new Headers({ 'content-type': 'application/json', authorization: 'Bearer caller' });
  twice.append('x-unbusy-priority', 'low');
  twice.append('x-unbusy-priority', 'high');
  const r = await f(`${p.url}/v1/chat/completions`, { method: 'POST', headers: twice, body: chat('hi') });
  assert.equal(r.status, 400);
  assert.equal((await r.json()).error.message, 'x-unbusy-priority must be low, normal or high, not "low, high"');
  // A body that is not a JSON object: the same 400 the filter gives, not the provider's.
  for (const [body, says] of [
    ['{"model":', /^the request body is not valid JSON: .* at byte 9$/],
    ['[1]', /^the request body must be a JSON object$/],
  ]) {
    const r = await post(f, p.url, body);
    assert.equal(r.status, 400);
    assert.match((await r.json()).error.message, says);
  }
  // Valid values, any case, and empty ones (no header) go through.
  for (const headers of [{ 'x-unbusy-priority': 'High' }, { 'x-unbusy-cache': '' }, { 'x-unbusy-deadline-ms': '5000' }]) {
    const r = await post(f, p.url, chat('fine'), headers);
    assert.equal(r.status, 200, await r.text());
  }
  assert.equal((await p.stats()).attempts, 3);
});
