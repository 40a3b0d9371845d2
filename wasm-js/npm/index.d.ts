/**
 * A provider: an OpenAI-compatible base URL, optionally with its own key and model names.
 * (The Envoy filter's `cluster`, `failoverCluster` and `apiKeyEnv` are refused here.)
 */
export interface ProviderConfig {
  /** Unique; used in events and the `x-unbusy` header. */
  name: string;
  /** `http://` or `https://` URL of the provider. */
  baseUrl: string;
  /** Replaces the caller's Authorization for this provider (never logged). Default: the caller's. */
  apiKey?: string | null;
  /** Caller's model name -> this provider's. Default: none. */
  models?: Record<string, string>;
  /** Share of load within the priority tier; > 0. Default 1. */
  weight?: number;
  /** Lower is preferred. Default: the provider's position in the list. */
  priority?: number;
  /** The provider's concurrency quota, if known. Default: none (learned). */
  maxConcurrency?: number | null;
}

/** A rate: requests and/or estimated LLM tokens per minute (`docs/config.md`, `limits`). */
export interface RateConfig {
  /** > 0 when set. Default: unlimited. */
  requestsPerMinute?: number | null;
  /** Estimated prompt tokens + `max_tokens`; > 0 when set. Default: unlimited. */
  tokensPerMinute?: number | null;
  /** Requests accepted at once from a full bucket. Default: `requestsPerMinute`. */
  burstRequests?: number | null;
  /** Tokens accepted at once from a full bucket. Default: `tokensPerMinute`. */
  burstTokens?: number | null;
}

/** Three pressures, one per degradation tier (1 feature, 2 data, 3 service). */
export type TierThresholds = [number, number, number];

/**
 * The engine's configuration (`docs/config.md`, in the Envoy filter's snake_case there), in
 * camelCase. Every field but `providers` is optional and has the default named; whole
 * milliseconds in fields ending in `Ms`. Unknown fields are refused at run time too.
 */
export interface Config {
  providers: ProviderConfig[];
  retry?: {
    /** Attempts per request, the first included; 1 to 16. Default 8. */
    maxAttempts?: number;
    /** First retry's delay before jitter; > 0. Default 250. */
    baseMs?: number;
    /** Largest delay; at least `baseMs`. Default 8000. */
    capMs?: number;
    /** Default `'full'`. */
    jitter?: 'full' | 'equal' | 'decorrelated' | 'none';
    /** Longest server hint honoured. Default 60000. */
    maxHintMs?: number;
  };
  budget?: {
    /** How long first attempts and retries count; > 0. Default 10000. */
    windowMs?: number;
    /** Failed retries allowed per first attempt; 0 to 10. Default 1. */
    ratio?: number;
    /** Retries per second always allowed. Default 1. */
    minPerSecond?: number;
  };
  limits?: {
    /** Across all tenants. Default: unlimited. */
    global?: RateConfig;
    /** Per tenant. Default: unlimited. */
    perTenant?: RateConfig;
    /** Tenants tracked at once; 8 to 1048576. Default 4096. */
    tenantSlots?: number;
  };
  concurrency?: {
    /** Lowest learned limit; > 0. Default 1. */
    min?: number;
    /** Highest learned limit; at least `min`. Default 100000. */
    max?: number;
    /** Multiplier on overload; between 0 and 1 exclusive. Default 0.75. */
    backoffRatio?: number;
    /** Least time between two decreases. Default 500. */
    decreaseCooldownMs?: number;
    /** A success slower than this multiple of the average is mild overload; 0 disables. Default 0. */
    latencyTolerance?: number;
    /** How long a request may wait for a slot or a provider. Default 60000. */
    queueTimeoutMs?: number;
  };
  throttle?: {
    /** Adaptive client-side throttling per provider. Default true. */
    enabled?: boolean;
    /** How long outcomes count; > 0. Default 20000. */
    windowMs?: number;
    /** The SRE multiplier; 1 to 100. Default 2. */
    k?: number;
    /** Highest rejection probability; 0 to 0.999. Default 0.9. */
    maxReject?: number;
  };
  breaker?: {
    /** > 0. Default 10000. */
    windowMs?: number;
    /** Outcomes needed before the success rate is judged. Default 10. */
    minVolume?: number;
    /** Open below this success rate; 0 to 1. Default 0.05. */
    minSuccessRate?: number;
    /** Open after this many failures in a row; 0 disables. Default 10. */
    consecutiveFailures?: number;
    /** First open period; > 0. Default 500. */
    openMs?: number;
    /** Longest open period; at least `openMs`. Default 1000. */
    maxOpenMs?: number;
    /** Probes in flight when half-open; > 0. Default 1. */
    halfOpenProbes?: number;
    /** Successful probes that close the breaker; > 0. Default 1. */
    probeSuccesses?: number;
    /** The probes allowed double every quarter of `openMs` while none fails. Default true. */
    probeRamp?: boolean;
  };
  deadlines?: {
    /** The whole request, retries and waits included. Default 60000. */
    totalMs?: number;
    /** Each streaming attempt's first real SSE event, at most. Default 15000. */
    firstTokenMs?: number;
    /** Each non-streaming attempt's first real byte, at most. Default 25000. */
    responseMs?: number;
    /** The longest pause between real events once progress started. Default 30000. */
    stallMs?: number;
  };
  cache?: {
    /** Default true (only cacheable requests are cached). */
    enabled?: boolean;
    /** How long an answer is fresh; > 0. Default 300000. */
    ttlMs?: number;
    /** How long past freshness it may be served when degraded or nothing answers. Default 3600000. */
    staleTtlMs?: number;
    /** The in-memory store's bound; at least `maxEntryBytes`. Default 67108864. */
    maxBytes?: number;
    /** Larger answers are not cached; > 0. Default 1048576. */
    maxEntryBytes?: number;
  };
  degradation?: {
    /** The three-tier ladder. Default true. */
    enabled?: boolean;
    /** Pressure entering tiers 1, 2, 3; increasing, in (0, 1]. Default [0.3, 0.6, 0.9]. */
    enter?: TierThresholds;
    /** Pressure below which each tier is left; each below its `enter`. Default [0.15, 0.4, 0.7]. */
    exit?: TierThresholds;
    /** Least time between two tier changes. Default 10000. */
    minDwellMs?: number;
    /** Tier 1+: `max_tokens` capped at this; 0 disables. Default 1024. */
    maxTokensCap?: number;
    /** Tier 1+: expensive model -> cheaper model. Default: none. */
    modelFallbacks?: Record<string, string>;
  };
  tenancy?: {
    /** A request header whose value names the tenant. Default: none (a hash of Authorization). */
    header?: string | null;
    /** Whether `header` alone names the tenant. Default false. */
    headerTrusted?: boolean;
    /** The tenant of requests with neither. Default `'anonymous'`. */
    defaultTenant?: string;
  };
  /** The Envoy filter's: accepted, but the package leaves unmanaged requests untouched whatever it says. */
  endpoints?: {
    /** Default `'refuse'`. */
    passthrough?: 'refuse' | 'caller_key';
  };
  /**
   * The Envoy filter's L2 cache through `unbusy-store` (docs/store.md): accepted and checked,
   * but the package does not call a store; give it a `cache` store instead.
   */
  healthCheck?: {
    /**
     * Probe every provider on an interval (a GET of `path` with its `apiKey`), so one that went
     * down while idle is skipped by the next request. Timers are unref'd in Node. Default false.
     */
    enabled?: boolean;
    /** The probe's path, placed under each `baseUrl` as a request's would be. Default '/v1/models'. */
    path?: string;
    /** Between two probes of one provider; > 0. Default 5000. */
    intervalMs?: number;
    /** A probe unanswered this long says down; > 0. Default 2000. */
    timeoutMs?: number;
    /** Probes in a row saying down (no answer, 5xx) that mark a provider down; > 0. Default 2. */
    unhealthyThreshold?: number;
    /** Probes in a row saying up (any status below 500) that mark it up again; > 0. Default 2. */
    healthyThreshold?: number;
  };
  store?: {
    /** The Envoy cluster of the store. Default: none (no L2). */
    cluster?: string | null;
    /** How long a lookup may hold a request, 1 to 10000. Default 20. */
    timeoutMs?: number;
    /** Whether answers are looked up in and written to the store. Default true. */
    cache?: boolean;
    /** How often the filter polls fleet-wide pauses and renews its concurrency holdings, 10 to 60000. Default 100. */
    pollMs?: number;
    /** How long a global quota lease is spent, 10 to 60000. Default: the store's `lease_ms`. */
    quotaLeaseMs?: number | null;
    /** The proxies of the fleet (the local share without a lease is `limit / N`), 1 to 10000. Default 1. */
    expectedProxies?: number;
  };
}

/** A cached answer. */
export interface CachedAnswer {
  body: string;
  /** Whether the body is SSE (replayed as `text/event-stream`), else JSON. */
  stream: boolean;
  status: number;
  storedAt: number;
}

/** What a store is told beside the key, for stores shared with the Envoy filter
 * (`unbusy/store`); others may ignore it. */
export interface CacheLookupInfo {
  /** The request's tenant id (the core's `tenant_id`), 16 hex digits; the key is already
   * scoped to it. */
  tenant: string;
}

/** What a store is told beside an answer it stores. */
export interface CacheWriteInfo extends CacheLookupInfo {
  /** `cache.ttlMs`: how long the answer is fresh. */
  ttlMs: number;
  /** `cache.staleTtlMs`: how long after that it may still be served stale. */
  staleTtlMs: number;
}

/** The store interface: plug in the Cache API, KV, Redis... (`ttlMs` is the two lifetimes'
 * sum: how long to keep the entry.) */
export interface CacheStore {
  get(key: string, info?: CacheLookupInfo): Promise<CachedAnswer | undefined>;
  set(key: string, value: CachedAnswer, ttlMs: number, info?: CacheWriteInfo): Promise<void>;
}

/** How a request ended (`requestFinished`). */
export type RequestOutcome =
  | 'success'
  | 'caller_error'
  | 'cached'
  | 'stale'
  | 'rate_limited'
  | 'shed'
  | 'failed'
  | 'deadline_exceeded'
  | 'cancelled';

/** What an attempt's outcome meant (`attemptFinished`). */
export type AttemptResult = 'success' | 'busy' | 'rate_limited' | 'server_error' | 'reset' | 'refused' | 'timeout' | 'stall' | 'caller_error';

/** A circuit breaker's state: 0 closed, 1 half-open, 2 open. */
export type BreakerState = 0 | 1 | 2;

/** A degradation tier: 0 normal, 1 feature, 2 data, 3 service. */
export type Tier = 0 | 1 | 2 | 3;

/** An engine event, for metrics. `provider` is the provider's index in `config.providers`,
 * `providerName` its name. `unbusy/metrics` maps them to prom-client and OpenTelemetry
 * (`docs/metrics.md`). */
export type UnbusyEvent =
  | {
      type: 'requestFinished';
      outcome: RequestOutcome;
      attempts: number;
      latencyMs: number;
      /** The model as a bounded label: the configured models and the first 16 others seen, the rest `_OTHER`. */
      model: string;
      /** `error.type`: the outcome of a request that got no answer; `null` for answers. */
      errorType: string | null;
      /** The provider of its last attempt (absent when none was sent: a cache hit, a refusal). */
      provider?: number;
      providerName?: string;
      /** A stream's time from admission to its first chunk. */
      firstChunkMs?: number;
      /** The answer's `usage` (a stream's with `stream_options.include_usage`), when it had one. */
      inputTokens?: number;
      outputTokens?: number;
    }
  | { type: 'attemptFinished'; provider: number; providerName: string; result: AttemptResult; latencyMs: number }
  | { type: 'firstToken'; provider: number; providerName: string; latencyMs: number }
  | { type: 'budgetExhausted' }
  | { type: 'breakerChanged'; provider: number; providerName: string; state: BreakerState }
  | { type: 'tierChanged'; tier: Tier }
  | { type: 'throttled'; provider: number; providerName: string }
  /** `healthCheck`'s verdict on a provider changed; `status`: the last probe's (0: no answer). */
  | { type: 'providerHealth'; provider: number; providerName: string; up: boolean; status: number };

export interface Options {
  /** The fetch that reaches the network (default: globalThis.fetch). */
  fetch?: typeof fetch;
  /** The response cache (default: an in-memory LRU bounded by cache.maxBytes). */
  cache?: CacheStore;
  /** Called for every engine event. */
  onEvent?: (event: UnbusyEvent) => void;
  /**
   * A URL under no provider's `baseUrl`: passed to `fetch` untouched (`'passthrough'`, the
   * default), or refused with a rejected `TypeError` before anything is sent (`'error'`).
   */
  unmatched?: 'passthrough' | 'error';
  /**
   * Keeps the runtime alive for work that goes on after an answer was handed over (a cache
   * store's write): in a worker, `(p) => ctx.waitUntil(p)`.
   */
  waitUntil?: (promise: Promise<unknown>) => void;
}

/** Builds a fetch that manages requests to the configured providers. Throws on invalid config. */
export function createFetch(config: Config, options?: Options): typeof fetch;

/** Where the engine's WebAssembly module comes from. */
export type ModuleSource = BufferSource | WebAssembly.Module | Response | URL | string;

/**
 * Loads the engine's module. Browsers: required once before createFetch; with no argument it
 * fetches the `.wasm` next to the package's file. In a bundle that left the `.wasm` behind,
 * pass it: `import wasm from 'unbusy/wasm'; await init({ module: wasm })`. Node and workers
 * load it at import (then this does nothing). Rejects when the module cannot be loaded;
 * createFetch then throws that error as its `cause`.
 */
export function init(input?: { module: ModuleSource | Promise<ModuleSource> } | ModuleSource): Promise<void>;

/** The default in-memory LRU store. */
export class MemoryCache implements CacheStore {
  constructor(options?: { maxBytes?: number });
  get(key: string, info?: CacheLookupInfo): Promise<CachedAnswer | undefined>;
  set(key: string, value: CachedAnswer, ttlMs: number, info?: CacheWriteInfo): Promise<void>;
}
