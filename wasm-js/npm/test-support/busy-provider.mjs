// The busy-provider emulator (the workspace's `busy-provider` binary) for the npm tests: one
// process per provider on a loopback port, stopped when the test file ends. Kept outside test/
// so that `node --test test/` does not run it as a test file.
import { after } from 'node:test';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const BUSY = process.env.UNBUSY_BUSY_PROVIDER ?? `${root}target/release/busy-provider`;
const children = [];
after(() => children.forEach((c) => c.kill()));

/** A provider named `name` with the emulator's flags `args` (fast by default): its URL and
 * its `/stats`. */
export async function provider(name, args = []) {
  const child = spawn(BUSY, ['--name', name, '--first-token-ms', '30,60', '--total-ms', '120,200', '--keepalive-ms', '100', ...args]);
  children.push(child);
  const line = await new Promise((resolve, reject) => {
    child.on('error', reject);
    createInterface({ input: child.stdout }).once('line', resolve);
  });
  const url = line.split(' listening on ')[1];
  return {
    url,
    /** Stops it (the process exits; its port is free again). */
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      await new Promise((resolve) => {
        child.once('exit', resolve);
        child.kill();
      });
    },
    async stats() {
      return (await fetch(`${url}/stats`)).json();
    },
  };
}
