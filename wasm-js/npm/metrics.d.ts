// Types of `unbusy/metrics` (metrics.js): the engine's events as prom-client metrics or
// OpenTelemetry instruments. Structural types, so the package depends on neither library.
import type { UnbusyEvent } from './index.js';

/** `gen_ai.client.operation.duration` bucket boundaries, seconds. */
export declare const DURATION_BUCKETS: readonly number[];
/** `gen_ai.client.operation.time_to_first_chunk` bucket boundaries, seconds. */
export declare const FIRST_CHUNK_BUCKETS: readonly number[];
/** `gen_ai.client.token.usage` bucket boundaries, tokens. */
export declare const TOKEN_BUCKETS: readonly number[];

/** What `prometheusMetrics` uses of `prom-client` (pass the module itself); `R` its registry. */
export interface PromClientLike<R> {
  register: R;
  Histogram: new (config: { name: string; help: string; labelNames: string[]; buckets: number[]; registers: R[] }) => {
    observe(labels: Record<string, string>, value: number): void;
  };
  Counter: new (config: { name: string; help: string; labelNames: string[]; registers: R[] }) => {
    inc(labels: Record<string, string>): void;
  };
  Gauge: new (config: { name: string; help: string; labelNames: string[]; registers: R[] }) => {
    set(labels: Record<string, string>, value: number): void;
    set(value: number): void;
  };
}

/** What `openTelemetryMetrics` uses of an OpenTelemetry `Meter` (`@opentelemetry/api`). */
export interface MeterLike {
  createHistogram(name: string, options?: object): { record(value: number, attributes?: Record<string, string>): void };
  createCounter(name: string, options?: object): { add(value: number, attributes?: Record<string, string>): void };
  createUpDownCounter(name: string, options?: object): { add(value: number, attributes?: Record<string, string>): void };
  createGauge?(name: string, options?: object): { record(value: number, attributes?: Record<string, string>): void };
}

/** The events as prom-client metrics in `register` (default: `client.register`); returns the `onEvent` handler. */
export declare function prometheusMetrics<R>(client: PromClientLike<R>, register?: R): (event: UnbusyEvent) => void;

/** The events as OpenTelemetry instruments of `meter`; returns the `onEvent` handler. */
export declare function openTelemetryMetrics(meter: MeterLike): (event: UnbusyEvent) => void;
