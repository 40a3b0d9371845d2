// `unbusy/metrics`: the engine's events (`onEvent`) as metrics dashboards understand, through
// the metrics library the application already has (`prom-client`, or the OpenTelemetry API):
// the OpenTelemetry GenAI client instruments and unbusy's own counters, named as the Envoy
// filter names them (`docs/metrics.md`). Why adapters and no dependency: the package must not
// pull a metrics library in; each adapter takes the caller's and returns an `onEvent` handler.
// What the events carry (provider, bounded model label, `error.type`, usage) is decided by the
// core, not here: these only record it.

/** `gen_ai.client.operation.duration`, seconds: OpenTelemetry's advised boundaries, then on to
 * about five minutes (the Envoy filter's, in seconds). */
export const DURATION_BUCKETS = [
  0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 327.68,
];
/** `gen_ai.client.operation.time_to_first_chunk`, seconds: OpenTelemetry's advised boundaries,
 * then 30 s, one and two minutes. */
export const FIRST_CHUNK_BUCKETS = [
  0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60, 120,
];
/** `gen_ai.client.token.usage`: OpenTelemetry's advised boundaries (powers of 4). */
export const TOKEN_BUCKETS = [
  1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
];

const REJECTION = { budgetExhausted: 'budget', throttled: 'throttled' };

/** The GenAI attributes of a `requestFinished` event (OpenTelemetry's names). */
function genaiAttributes(e) {
  const a = {
    'gen_ai.operation.name': 'chat',
    'gen_ai.provider.name': e.providerName ?? 'none',
    'gen_ai.request.model': e.model,
  };
  if (e.errorType) a['error.type'] = e.errorType;
  return a;
}

/** Calls `record` for each GenAI value of a `requestFinished` event. */
function genai(e, record) {
  const attributes = genaiAttributes(e);
  record('duration', e.latencyMs / 1000, attributes);
  if (typeof e.firstChunkMs === 'number') record('firstChunk', e.firstChunkMs / 1000, attributes);
  if (typeof e.inputTokens === 'number') {
    record('tokens', e.inputTokens, { ...attributes, 'gen_ai.token.type': 'input' });
    record('tokens', e.outputTokens, { ...attributes, 'gen_ai.token.type': 'output' });
  }
}

/** OpenTelemetry attribute names as Prometheus label names (dots to underscores). */
function labels(attributes) {
  const out = {};
  for (const [k, v] of Object.entries(attributes)) out[k.replaceAll('.', '_')] = v;
  return out;
}

const GENAI_LABELS = ['gen_ai_operation_name', 'gen_ai_provider_name', 'gen_ai_request_model', 'error_type'];

/**
 * The events as `prom-client` metrics, in `register` (default: `client.register`). Returns the
 * `onEvent` handler. Names and labels are the Envoy filter's, in seconds where it has
 * milliseconds (`docs/metrics.md`).
 */
export function prometheusMetrics(client, register = client.register) {
  const registers = [register];
  const histogram = (name, help, labelNames, buckets) =>
    new client.Histogram({ name, help, labelNames, buckets, registers });
  const counter = (name, help, labelNames) => new client.Counter({ name, help, labelNames, registers });
  const gauge = (name, help, labelNames) => new client.Gauge({ name, help, labelNames, registers });
  const instruments = {
    duration: histogram('gen_ai_client_operation_duration_seconds', 'GenAI operation duration.', GENAI_LABELS, DURATION_BUCKETS),
    firstChunk: histogram('gen_ai_client_operation_time_to_first_chunk_seconds', 'Time to the first chunk of a streamed answer.', GENAI_LABELS, FIRST_CHUNK_BUCKETS),
    tokens: histogram('gen_ai_client_token_usage', 'Tokens used, by type (the answer\'s usage).', [...GENAI_LABELS, 'gen_ai_token_type'], TOKEN_BUCKETS),
  };
  const requests = counter('unbusy_requests_total', 'Requests by outcome.', ['outcome']);
  const attempts = counter('unbusy_attempts_total', 'Attempts by provider and result.', ['provider', 'result']);
  const rejections = counter('unbusy_rejections_total', 'Requests and retries refused, by reason.', ['reason']);
  const firstToken = histogram('unbusy_first_token_seconds', 'Send to first real progress, per attempt.', ['provider'], FIRST_CHUNK_BUCKETS);
  const breaker = gauge('unbusy_breaker_state', 'Breaker state: 0 closed, 1 half-open, 2 open.', ['provider']);
  const tier = gauge('unbusy_degradation_tier', 'Degradation tier: 0 normal to 3 service.', []);
  return (e) => {
    switch (e.type) {
      case 'requestFinished':
        requests.inc({ outcome: e.outcome });
        if (e.outcome === 'shed') rejections.inc({ reason: 'shed' });
        genai(e, (what, value, attributes) => instruments[what].observe(labels(attributes), value));
        break;
      case 'attemptFinished':
        attempts.inc({ provider: e.providerName, result: e.result });
        break;
      case 'firstToken':
        firstToken.observe({ provider: e.providerName }, e.latencyMs / 1000);
        break;
      case 'breakerChanged':
        breaker.set({ provider: e.providerName }, e.state);
        break;
      case 'tierChanged':
        tier.set(e.tier);
        break;
      case 'budgetExhausted':
      case 'throttled':
        rejections.inc({ reason: REJECTION[e.type] });
        break;
    }
  };
}

/**
 * The events as OpenTelemetry instruments of `meter` (`@opentelemetry/api`'s `Meter`). Returns
 * the `onEvent` handler. GenAI instruments by the semantic conventions (seconds, `{token}`),
 * with their advised bucket boundaries; unbusy's own as `unbusy.*` (`docs/metrics.md`).
 */
export function openTelemetryMetrics(meter) {
  const histogram = (name, description, unit, boundaries) =>
    meter.createHistogram(name, { description, unit, advice: { explicitBucketBoundaries: boundaries } });
  const instruments = {
    duration: histogram('gen_ai.client.operation.duration', 'GenAI operation duration.', 's', DURATION_BUCKETS),
    firstChunk: histogram('gen_ai.client.operation.time_to_first_chunk', 'Time to the first chunk of a streamed answer.', 's', FIRST_CHUNK_BUCKETS),
    tokens: histogram('gen_ai.client.token.usage', 'Tokens used, by type.', '{token}', TOKEN_BUCKETS),
  };
  const requests = meter.createCounter('unbusy.requests', { description: 'Requests by outcome.', unit: '{request}' });
  const attempts = meter.createCounter('unbusy.attempts', { description: 'Attempts by provider and result.', unit: '{attempt}' });
  const rejections = meter.createCounter('unbusy.rejections', { description: 'Requests and retries refused, by reason.', unit: '{request}' });
  const firstToken = histogram('unbusy.first_token', 'Send to first real progress, per attempt.', 's', FIRST_CHUNK_BUCKETS);
  // (A synchronous gauge where the API has one, 1.9 on; else an up-down counter moved by the change.)
  const gauge = (name, description) => {
    if (typeof meter.createGauge === 'function') {
      const g = meter.createGauge(name, { description });
      return (value, attributes) => g.record(value, attributes);
    }
    const c = meter.createUpDownCounter(name, { description });
    const last = new Map();
    return (value, attributes) => {
      const key = JSON.stringify(attributes);
      c.add(value - (last.get(key) ?? 0), attributes);
      last.set(key, value);
    };
  };
  const breaker = gauge('unbusy.breaker.state', 'Breaker state: 0 closed, 1 half-open, 2 open.');
  const tier = gauge('unbusy.degradation.tier', 'Degradation tier: 0 normal to 3 service.');
  return (e) => {
    switch (e.type) {
      case 'requestFinished':
        requests.add(1, { outcome: e.outcome });
        if (e.outcome === 'shed') rejections.add(1, { reason: 'shed' });
        genai(e, (what, value, attributes) => instruments[what].record(value, attributes));
        break;
      case 'attemptFinished':
        attempts.add(1, { provider: e.providerName, result: e.result });
        break;
      case 'firstToken':
        firstToken.record(e.latencyMs / 1000, { provider: e.providerName });
        break;
      case 'breakerChanged':
        breaker(e.state, { provider: e.providerName });
        break;
      case 'tierChanged':
        tier(e.tier, {});
        break;
      case 'budgetExhausted':
      case 'throttled':
        rejections.add(1, { reason: REJECTION[e.type] });
        break;
    }
  };
}
