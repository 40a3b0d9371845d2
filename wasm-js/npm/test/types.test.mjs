// The package's TypeScript declarations: test-support/types/app.ts (every configuration field,
// every event, both openai SDKs' `fetch` option, and misspelt fields under `@ts-expect-error`)
// must pass `tsc --strict`; the fields declared must be the ones the core's configuration parser
// reads (core/src/config.rs), and the app's configuration must be one the engine accepts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createFetch } from '../node.js';

const run = promisify(execFile);
const npm = fileURLToPath(new URL('../', import.meta.url));
const root = fileURLToPath(new URL('../../../', import.meta.url));
const camel = (s) => s.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
// The Envoy filter's fields, which the package refuses or ignores: not declared.
const ENVOY_ONLY = new Set(['ProviderConfig.cluster', 'ProviderConfig.failoverCluster', 'ProviderConfig.apiKeyEnv']);

test('tsc --strict accepts the declarations as an app uses them, and refuses misspelt fields', async () => {
  const tsc = `${npm}node_modules/.bin/tsc`;
  const out = await run(tsc, ['-p', 'test-support/types/tsconfig.json', '--strict'], { cwd: npm }).catch((e) => e);
  assert.equal(out.code ?? 0, 0, `tsc found errors:\n${out.stdout}${out.stderr}`);
  // Every `@ts-expect-error` in it was needed (tsc reports an unused one), so these are errors.
  const app = readFileSync(`${npm}test-support/types/app.ts`, 'utf8');
  assert.ok((app.match(/@ts-expect-error/g) ?? []).length >= 12);
});

test('the declared configuration fields are exactly the ones core/src/config.rs reads', () => {
  const rust = readFileSync(`${root}core/src/config.rs`, 'utf8');
  const read = new Set();
  for (const [, struct, fields] of rust.matchAll(/read_struct!\((\w+) \{([^}]*)\}\);/g)) {
    for (const f of fields.split(',').map((s) => s.trim()).filter(Boolean)) read.add(`${struct}.${camel(f)}`);
  }
  const rustFields = new Set([...read].filter((f) => !ENVOY_ONLY.has(f)).map((f) => f.split('.')[1]));
  const dts = readFileSync(`${npm}index.d.ts`, 'utf8');
  const block = dts.slice(dts.indexOf('export interface ProviderConfig'), dts.indexOf('/** A cached answer. */'));
  const declared = new Set([...block.matchAll(/^\s+(\w+)\??:/gm)].map((m) => m[1]));
  assert.deepEqual([...declared].filter((f) => !rustFields.has(f)), [], 'declared but not read by the parser');
  assert.deepEqual([...rustFields].filter((f) => !declared.has(f)), [], 'read by the parser but not declared');
});

test("the app's configuration, with every field, is one the engine accepts", () => {
  const app = readFileSync(`${npm}test-support/types/app.ts`, 'utf8');
  const literal = /const config: Config = (\{[\s\S]*?\n\});/.exec(app)[1];
  const config = new Function(`return ${literal};`)();
  assert.equal(typeof createFetch(config), 'function');
  // It names every field the parser reads, so each declared field is checked against the engine.
  const rust = readFileSync(`${root}core/src/config.rs`, 'utf8');
  const fields = [...rust.matchAll(/read_struct!\((\w+) \{([^}]*)\}\);/g)].flatMap(([, struct, f]) =>
    f.split(',').map((s) => s.trim()).filter(Boolean).map((s) => `${struct}.${camel(s)}`));
  for (const q of fields) {
    if (ENVOY_ONLY.has(q)) continue;
    const f = q.split('.')[1];
    assert.match(literal, new RegExp(`\\b${f}:`), `the app's configuration does not set ${f}`);
  }
});
