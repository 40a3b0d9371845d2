// The package in headless Chromium (Debian's, driven by playwright-core): examples/browser
// served from localhost, calling busy-provider emulators directly (CORS).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { provider } from '../test-support/busy-provider.mjs';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const npm = fileURLToPath(new URL('../', import.meta.url));
const CHROMIUM = process.env.UNBUSY_CHROMIUM ?? '/usr/bin/chromium';
let server;
let browser;
after(async () => {
  server?.close();
  await browser?.close();
});

const TYPES = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };

test('a page in headless Chromium gets answers through a busy primary', async () => {
  const primary = (await provider('primary', ['--busy-503', '0.5', '--stall', '0.3', '--stall-s', '30'])).url;
  const backup = (await provider('backup')).url;
  server = createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const file = path.startsWith('/unbusy/') ? npm + path.slice('/unbusy/'.length) : `${root}examples/browser/index.html`;
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[file.slice(file.lastIndexOf('.'))] ?? 'text/plain' });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const page_url = `http://127.0.0.1:${server.address().port}/?primary=${encodeURIComponent(primary)}&backup=${encodeURIComponent(backup)}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(page_url);
  await page.waitForSelector('body[data-done="yes"]', { timeout: 30000 });
  const results = await page.evaluate(() => window.unbusyResults);
  assert.deepEqual(errors, []);
  assert.equal(results.length, 8);
  for (const r of results) {
    assert.equal(r.status, 200, r.text);
    assert.doesNotMatch(r.text, /keep-alive/);
    assert.match(r.note, /provider=(primary|backup)/);
  }
  const stats = await (await fetch(`${primary}/stats`)).json();
  assert.ok(stats.busy_503 + stats.stalls > 0, 'the primary really was busy');
});
