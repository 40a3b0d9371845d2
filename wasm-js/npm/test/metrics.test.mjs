// `unbusy/metrics` against busy-provider emulators, with the real prom-client and the real
// OpenTelemetry SDK (an in-memory exporter): the GenAI instruments carry the provider that
// answered, the model (dots and all), token sums equal to the usage the emulator reported, a
// stream's time to first chunk; unbusy's own counters count the failover. Both README examples
// are in this file as they are written there.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InMemoryMetricExporter, MeterProvider, PeriodicExportingMetricReader, AggregationTemporality } from '@opentelemetry/sdk-metrics';
import { provider } from '../test-support/busy-provider.mjs';

const fast = { deadlines: { firstTokenMs: 800, responseMs: 1500, totalMs: 20000 } };

/** A busy primary and a healthy backup: every request fails over once. */
async function providers() {
  const primary = await provider('primary', ['--busy-503', '1']);
  const backup = await provider('backup');
  return {
    ...fast,
    providers: [
      { name: 'primary', baseUrl: primary.url },
      { name: 'backup', baseUrl: backup.url },
    ],
  };
}

/** Two answers for `gpt-4.1` and a stream for `deepseek-v3.2` asking for its usage; what the
 * emulator reported each model used. */
async function send(unbusyFetch, base) {
  const used = { 'gpt-4.1': [0, 0], 'deepseek-v3.2': [0, 0] };
  const post = (body) =>
    unbusyFetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer caller' },
      body: JSON.stringify(body),
    });
  for (const n of [1, 2]) {
    const r = await post({ model: 'gpt-4.1', messages: [{ role: 'user', content: `question ${n}` }] });
    assert.equal(r.status, 200);
    const { usage } = await r.json();
    used['gpt-4.1'][0] += usage.prompt_tokens;
    used['gpt-4.1'][1] += usage.completion_tokens;
  }
  const r = await post({
    model: 'deepseek-v3.2',
    stream: true,
    stream_options: { include_usage: true },
    messages: [{ role: 'user', content: 'a streamed question' }],
  });
  assert.equal(r.status, 200);
  const text = await r.text();
  const chunk = text
    .split('\n')
    .filter((l) => l.startsWith('data: {'))
    .map((l) => JSON.parse(l.slice(6)))
    .find((c) => c.usage);
  assert.ok(chunk, text);
  used['deepseek-v3.2'] = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens];
  assert.ok(used['gpt-4.1'][0] > 0 && used['deepseek-v3.2'][1] > 0);
  return used;
}

/** Polls `check` until it stops throwing (the stream's end is reported as the caller reads it). */
async function eventually(check) {
  const until = Date.now() + 10000;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      if (Date.now() > until) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

// The README's two examples, as written there (imports are hoisted: they run first).
const config = await providers();
import client from 'prom-client';
import { createFetch } from 'unbusy';
import { prometheusMetrics } from 'unbusy/metrics';

const unbusyFetch = createFetch(config, { onEvent: prometheusMetrics(client) });

const exporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3600000 });
metrics.setGlobalMeterProvider(new MeterProvider({ readers: [reader] }));
import { metrics } from '@opentelemetry/api';
import { openTelemetryMetrics } from 'unbusy/metrics';

const onEvent = openTelemetryMetrics(metrics.getMeter('unbusy'));

test('prom-client: the GenAI histograms and unbusy counters, labelled as the Envoy filter labels them', async () => {
  const used = await send(unbusyFetch, config.providers[0].baseUrl);
  const find = async (name, labels, suffix = '') => {
    const metric = (await client.register.getMetricsAsJSON()).find((m) => m.name === name);
    assert.ok(metric, name);
    const v = metric.values.find(
      (v) => (!suffix || v.metricName === `${name}${suffix}`) && Object.entries(labels).every(([k, x]) => v.labels[k] === x),
    );
    return v?.value;
  };
  const genai = (model) => ({ gen_ai_operation_name: 'chat', gen_ai_provider_name: 'backup', gen_ai_request_model: model });
  await eventually(async () => {
    assert.equal(await find('unbusy_requests_total', { outcome: 'success' }), 3);
  });
  assert.equal(await find('unbusy_attempts_total', { provider: 'primary', result: 'busy' }), 3);
  assert.equal(await find('unbusy_attempts_total', { provider: 'backup', result: 'success' }), 3);
  const duration = 'gen_ai_client_operation_duration_seconds';
  assert.equal(await find(duration, genai('gpt-4.1'), '_count'), 2);
  assert.equal(await find(duration, genai('deepseek-v3.2'), '_count'), 1);
  // No error: no `error_type` label on any GenAI sample.
  const all = await client.register.getMetricsAsJSON();
  assert.ok(all.filter((m) => m.name.startsWith('gen_ai_')).every((m) => m.values.every((v) => !('error_type' in v.labels))));
  // 10 ms to minutes.
  const le = all.find((m) => m.name === duration).values.filter((v) => v.metricName.endsWith('_bucket')).map((v) => v.labels.le);
  assert.ok(le.includes(0.01) && le.includes(327.68), `${le}`);
  const ttfc = 'gen_ai_client_operation_time_to_first_chunk_seconds';
  assert.equal(await find(ttfc, genai('deepseek-v3.2'), '_count'), 1);
  assert.equal(await find(ttfc, genai('gpt-4.1'), '_count'), undefined);
  for (const [model, [input, output]] of Object.entries(used)) {
    assert.equal(await find('gen_ai_client_token_usage', { ...genai(model), gen_ai_token_type: 'input' }, '_sum'), input, model);
    assert.equal(await find('gen_ai_client_token_usage', { ...genai(model), gen_ai_token_type: 'output' }, '_sum'), output, model);
  }
  const text = await client.register.metrics();
  assert.match(text, /gen_ai_client_token_usage_bucket\{le="67108864",gen_ai_operation_name="chat",gen_ai_provider_name="backup",gen_ai_request_model="gpt-4\.1",gen_ai_token_type="input"\} 2/);
});

test('OpenTelemetry: the GenAI instruments by the semantic conventions, in seconds', async () => {
  const otelConfig = await providers();
  const used = await send(createFetch(otelConfig, { onEvent }), otelConfig.providers[0].baseUrl);
  const points = async (name) => {
    exporter.reset();
    await reader.forceFlush();
    const all = exporter.getMetrics().flatMap((r) => r.scopeMetrics.flatMap((s) => s.metrics));
    return all.find((m) => m.descriptor.name === name);
  };
  const attrs = (model) => ({ 'gen_ai.operation.name': 'chat', 'gen_ai.provider.name': 'backup', 'gen_ai.request.model': model });
  const point = (m, want) =>
    m.dataPoints.find((p) => Object.entries(want).every(([k, v]) => p.attributes[k] === v) && Object.keys(p.attributes).length === Object.keys(want).length);
  await eventually(async () => {
    const requests = await points('unbusy.requests');
    assert.equal(point(requests, { outcome: 'success' })?.value, 3);
  });
  const duration = await points('gen_ai.client.operation.duration');
  assert.equal(duration.descriptor.unit, 's');
  assert.equal(point(duration, attrs('gpt-4.1')).value.count, 2);
  assert.deepEqual(point(duration, attrs('gpt-4.1')).value.buckets.boundaries.slice(0, 2), [0.01, 0.02]);
  const ttfc = await points('gen_ai.client.operation.time_to_first_chunk');
  assert.equal(point(ttfc, attrs('deepseek-v3.2')).value.count, 1);
  assert.equal(point(ttfc, attrs('gpt-4.1')), undefined);
  const tokens = await points('gen_ai.client.token.usage');
  assert.equal(tokens.descriptor.unit, '{token}');
  for (const [model, [input, output]] of Object.entries(used)) {
    assert.equal(point(tokens, { ...attrs(model), 'gen_ai.token.type': 'input' }).value.sum, input, model);
    assert.equal(point(tokens, { ...attrs(model), 'gen_ai.token.type': 'output' }).value.sum, output, model);
  }
  const attempts = await points('unbusy.attempts');
  assert.equal(point(attempts, { provider: 'primary', result: 'busy' }).value, 3);
});

test('a request that got no answer carries its error.type and the provider it last tried', async () => {
  const down = await provider('down', ['--busy-503', '1']);
  const events = [];
  const unbusyFetch = createFetch(
    { deadlines: { firstTokenMs: 300, responseMs: 500, totalMs: 1500 }, retry: { maxAttempts: 2 }, providers: [{ name: 'down', baseUrl: down.url }] },
    { onEvent: (e) => events.push(e) },
  );
  const r = await unbusyFetch(`${down.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'x' }] }),
  });
  assert.notEqual(r.status, 200);
  const finished = events.find((e) => e.type === 'requestFinished');
  assert.ok(['failed', 'deadline_exceeded'].includes(finished.outcome), finished.outcome);
  assert.equal(finished.errorType, finished.outcome);
  assert.equal(finished.providerName, 'down');
  assert.equal(finished.model, 'm');
  assert.equal(finished.inputTokens, undefined);
});
