/** A provider: an OpenAI-compatible base URL, optionally with its own key and model names. */
export interface ProviderConfig {
  name: string;
  baseUrl: string;
  /** Replaces the caller's Authorization for this provider (never logged). */
  apiKey?: string;
  /** Caller's model name -> this provider's. */
  models?: Record<string, string>;
  weight?: number;
  /** Lower is preferred. Default: the provider's position in the list. */
  priority?: number;
  /** The provider's concurrency quota, if known. */
  maxConcurrency?: number;
}

/** The engine's configuration (docs/config.md), camelCase. Every field but providers is optional. */
export interface Config {
  providers: ProviderConfig[];
  retry?: { maxAttempts?: number; baseMs?: number; capMs?: number; jitter?: 'full' | 'equal' | 'decorrelated' | 'none'; maxHintMs?: number };
  budget?: { windowMs?: number; ratio?: number; minPerSecond?: number };
  limits?: Record<string, unknown>;
  concurrency?: Record<string, unknown>;
  throttle?: Record<string, unknown>;
  breaker?: Record<string, unknown>;
  deadlines?: { totalMs?: number; firstTokenMs?: number; responseMs?: number; stallMs?: number };
  cache?: { enabled?: boolean; ttlMs?: number; staleTtlMs?: number; maxBytes?: number; maxEntryBytes?: number };
  degradation?: Record<string, unknown>;
  tenancy?: { header?: string; headerTrusted?: boolean; defaultTenant?: string };
}

/** A cached answer. */
export interface CachedAnswer {
  body: string;
  /** Whether the body is SSE (replayed as `text/event-stream`), else JSON. */
  stream: boolean;
  status: number;
  storedAt: number;
}

/** The store interface: plug in the Cache API, KV, Redis... */
export interface CacheStore {
  get(key: string): Promise<CachedAnswer | undefined>;
  set(key: string, value: CachedAnswer, ttlMs: number): Promise<void>;
}

/** An engine event, for metrics. */
export type UnbusyEvent =
  | { type: 'requestFinished'; outcome: string; attempts: number; latencyMs: number }
  | { type: 'attemptFinished'; provider: number; result: string; latencyMs: number }
  | { type: 'firstToken'; provider: number; latencyMs: number }
  | { type: 'budgetExhausted' }
  | { type: 'breakerChanged'; provider: number; state: number }
  | { type: 'tierChanged'; tier: number }
  | { type: 'throttled'; provider: number };

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
}

/** Builds a fetch that manages requests to the configured providers. Throws on invalid config. */
export function createFetch(config: Config, options?: Options): typeof fetch;

/**
 * Loads the wasm module (browsers: required once before createFetch; elsewhere a no-op).
 * Rejects when the module cannot be loaded; createFetch then throws that error as its `cause`.
 */
export function init(url?: string | URL | Response | BufferSource): Promise<void>;

/** The default in-memory LRU store. */
export class MemoryCache implements CacheStore {
  constructor(options?: { maxBytes?: number });
  get(key: string): Promise<CachedAnswer | undefined>;
  set(key: string, value: CachedAnswer, ttlMs: number): Promise<void>;
}
