// unbusy/store: cache stores for Node servers that share one L2 cache with an Envoy fleet
// (docs/store.md). Both fail open: a store down, slow or refusing is a miss, a write dropped.
import type { CacheStore } from './index.js';

/** The default bound on a lookup, in ms (the Envoy filter's `store.timeout_ms`). */
export const DEFAULT_TIMEOUT_MS: 20;

export interface StoreCacheOptions {
  /** unbusy-store's base URL, e.g. `http://127.0.0.1:7379`. */
  url: string | URL;
  /** The bound on a lookup, in ms; > 0. Default 20. Writes get at least 500. */
  timeoutMs?: number;
  /** The fetch to call the store with. Default: the global one. */
  fetch?: (input: string, init: RequestInit) => Promise<Response>;
  /** Gets one line when the store becomes unavailable and one when it answers again.
   * Default `console.warn`. */
  log?: (message: string) => void;
}

/** A cache store over unbusy-store's HTTP API, shared with the Envoy filters that use it. */
export function storeCache(options: StoreCacheOptions): CacheStore;

/** What `redisCache` needs of a node `redis` client (v4 or v5): `createClient(...)`, connected. */
export interface RedisCommandClient {
  sendCommand(args: string[]): Promise<unknown>;
}

export interface RedisCacheOptions {
  /** unbusy-store's `--prefix`: at most 64 characters, no braces or whitespace. Default `unbusy:`. */
  prefix?: string;
  /** The bound on a lookup, in ms; > 0. Default 20. Writes get at least 500. */
  timeoutMs?: number;
  /** Gets one line when Redis becomes unavailable and one when it answers again.
   * Default `console.warn`. */
  log?: (message: string) => void;
}

/** A cache store on Redis with unbusy-store's key layout (`<prefix>cache:<tenant>:<key>`),
 * through the app's own client. */
export function redisCache(client: RedisCommandClient, options?: RedisCacheOptions): CacheStore;
