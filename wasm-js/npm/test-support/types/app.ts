// Type-checked by test/types.test.mjs with `tsc --strict`: the package's declarations as an
// app uses them, with both openai SDKs' `fetch` option. Each `@ts-expect-error` line must be an
// error: a misspelt field or a value the engine never sends must not type-check.
import 'openai/shims/web'; // openai v4: its `fetch` option takes the web's types with this
import OpenAI from 'openai';
import OpenAIv6 from 'openai-v6';
import { createFetch, init, MemoryCache, type Config, type UnbusyEvent, type CacheStore } from 'unbusy';
import { prometheusMetrics, openTelemetryMetrics, TOKEN_BUCKETS, DURATION_BUCKETS, FIRST_CHUNK_BUCKETS } from 'unbusy/metrics';
import promClient from 'prom-client';
import { metrics } from '@opentelemetry/api';
import wasm from 'unbusy/wasm';
import { createClient } from 'redis';
import { redisCache, storeCache, DEFAULT_TIMEOUT_MS } from 'unbusy/store';

await init({ module: wasm });
await init();

// Every field the engine reads, at a legal value.
const config: Config = {
  providers: [
    { name: 'deepseek', baseUrl: 'https://api.deepseek.com' },
    { name: 'backup', baseUrl: 'https://api.example.com/v1', apiKey: 'sk-x', models: { 'deepseek-chat': 'x-chat' }, weight: 2, priority: 1, maxConcurrency: 8 },
  ],
  retry: { maxAttempts: 4, baseMs: 250, capMs: 8000, jitter: 'decorrelated', maxHintMs: 60000 },
  budget: { windowMs: 10000, ratio: 0.5, minPerSecond: 1 },
  limits: {
    global: { requestsPerMinute: 600, tokensPerMinute: 100000, burstRequests: 50, burstTokens: null },
    perTenant: { requestsPerMinute: 60 },
    tenantSlots: 4096,
  },
  concurrency: { min: 1, max: 64, backoffRatio: 0.75, decreaseCooldownMs: 500, latencyTolerance: 0, queueTimeoutMs: 30000 },
  throttle: { enabled: true, windowMs: 20000, k: 2, maxReject: 0.9 },
  breaker: {
    windowMs: 10000,
    minVolume: 10,
    minSuccessRate: 0.05,
    consecutiveFailures: 10,
    openMs: 500,
    maxOpenMs: 1000,
    halfOpenProbes: 1,
    probeSuccesses: 1,
    probeRamp: true,
  },
  deadlines: { totalMs: 60000, firstTokenMs: 15000, responseMs: 25000, stallMs: 30000 },
  cache: { enabled: true, ttlMs: 300000, staleTtlMs: 3600000, maxBytes: 1 << 26, maxEntryBytes: 1 << 20 },
  degradation: { enabled: true, enter: [0.3, 0.6, 0.9], exit: [0.15, 0.4, 0.7], minDwellMs: 10000, maxTokensCap: 1024, modelFallbacks: { 'gpt-4o': 'gpt-4o-mini' } },
  tenancy: { header: 'x-tenant', headerTrusted: false, defaultTenant: 'anonymous' },
  endpoints: { passthrough: 'refuse' },
  store: { cluster: 'unbusy_store', timeoutMs: 20, cache: true, pollMs: 100, quotaLeaseMs: 1000, expectedProxies: 2 },
  // (Off here: this app is built and run without a network.)
  healthCheck: { enabled: false, path: '/v1/models', intervalMs: 5000, timeoutMs: 2000, unhealthyThreshold: 2, healthyThreshold: 2 },
};

function onEvent(e: UnbusyEvent): string {
  switch (e.type) {
    case 'requestFinished': {
      // @ts-expect-error not an outcome the engine sends
      if (e.outcome === 'succeeded') return '';
      // @ts-expect-error usage is there only when the answer reported one
      const tokens: number = e.inputTokens;
      const error: string = e.errorType ?? 'none';
      return `${e.outcome} after ${e.attempts} attempts in ${e.latencyMs} ms: ${e.model} on ${e.providerName ?? 'no provider'} (${error}), ${e.firstChunkMs ?? '-'} ms to first chunk, ${e.inputTokens ?? 0} + ${e.outputTokens ?? 0} tokens ${tokens}`;
    }
    case 'attemptFinished':
      // @ts-expect-error not a result the engine sends
      if (e.result === 'overloaded') return '';
      return `${e.provider}: ${e.result}`;
    case 'breakerChanged': {
      const state: 'closed' | 'half-open' | 'open' = (['closed', 'half-open', 'open'] as const)[e.state];
      // @ts-expect-error a state is 0, 1 or 2
      if (e.state === 3) return '';
      return state;
    }
    case 'tierChanged':
      // @ts-expect-error a tier is 0 to 3
      if (e.tier === 4) return '';
      return `tier ${e.tier}`;
    case 'providerHealth':
      // @ts-expect-error `up` is a boolean
      if (e.up === 1) return '';
      return `${e.provider} ${e.up ? 'up' : 'down'} (${e.status})`;
    case 'firstToken':
    case 'throttled':
    case 'budgetExhausted':
      return e.type;
    default: {
      const never: never = e;
      return never;
    }
  }
}

// The metrics adapters take the libraries' own objects.
const promOnEvent: (e: UnbusyEvent) => void = prometheusMetrics(promClient, promClient.register);
const otelOnEvent: (e: UnbusyEvent) => void = openTelemetryMetrics(metrics.getMeter('unbusy'));
const bounds: readonly number[] = [...TOKEN_BUCKETS, ...DURATION_BUCKETS, ...FIRST_CHUNK_BUCKETS];
void [promOnEvent, otelOnEvent, bounds];

const cache: CacheStore = new MemoryCache({ maxBytes: 1 << 20 });
const unbusyFetch = createFetch(config, { cache, onEvent, unmatched: 'error', waitUntil: (p) => void p });

// Both SDKs take it as their `fetch`.
new OpenAI({ baseURL: 'https://api.deepseek.com', apiKey: 'sk-x', maxRetries: 0, fetch: unbusyFetch });
new OpenAIv6({ baseURL: 'https://api.deepseek.com', apiKey: 'sk-x', maxRetries: 0, fetch: unbusyFetch });

const providers = config.providers;
// @ts-expect-error misspelt: firstTokenMS
createFetch({ providers, deadlines: { firstTokenMS: 1500 } });
// @ts-expect-error misspelt: requestsPerMinit
createFetch({ providers, limits: { perTenant: { requestsPerMinit: 60 } } });
// @ts-expect-error misspelt: backofRatio
createFetch({ providers, concurrency: { backofRatio: 0.5 } });
// @ts-expect-error misspelt: maxRejection
createFetch({ providers, throttle: { maxRejection: 0.5 } });
// @ts-expect-error misspelt: minSucessRate
createFetch({ providers, breaker: { minSucessRate: 0.1 } });
// @ts-expect-error two thresholds, not three
createFetch({ providers, degradation: { enter: [0.3, 0.6] } });
// @ts-expect-error misspelt: intervalMS
createFetch({ providers, healthCheck: { intervalMS: 200 } });
// @ts-expect-error not a jitter
createFetch({ providers, retry: { jitter: 'random' } });
// @ts-expect-error the Envoy filter's: refused here
createFetch({ providers: [{ name: 'p', baseUrl: 'https://x', apiKeyEnv: 'KEY' }] });
// @ts-expect-error waitUntil takes the promise
createFetch(config, { waitUntil: 'ctx' });

// unbusy/store: a node `redis` client (v5) is what redisCache takes; both are CacheStores.
const shared: CacheStore = storeCache({ url: 'http://127.0.0.1:7379', timeoutMs: DEFAULT_TIMEOUT_MS, log: (m) => console.warn(m) });
const client = createClient({ url: 'redis://127.0.0.1:6379' });
createFetch(config, { cache: redisCache(client, { prefix: 'unbusy:', timeoutMs: 50 }) });
createFetch(config, { cache: shared });
// A store that reads what the package passes beside the key.
const tenants: CacheStore = {
  get: async (key, info) => (info?.tenant.length === 16 ? undefined : undefined),
  set: async (key, value, ttlMs, info) => void (info && info.ttlMs + info.staleTtlMs === ttlMs),
};
createFetch(config, { cache: tenants });
// @ts-expect-error storeCache needs the store's url
storeCache({ timeoutMs: 20 });
// @ts-expect-error misspelt: timeoutMS
redisCache(client, { timeoutMS: 20 });
