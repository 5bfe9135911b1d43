/**
 * Load: a flood of client addresses. 40,000 sessions, each from a new
 * address (127.10.0.1 and on), through a gateway whose connection limit counts
 * per address: the policy's memory counters (the cluster primary's with
 * workers, else the daemon's own) keep at most policy_store.max_keys keys, so
 * the daemon's heap after a forced full GC stays within a small margin of
 * where it was, however many addresses come. Without the bound each address
 * kept about 460 bytes until its window ended (40,000 addresses: +18 MB).
 *
 *   LOAD_FLOOD_SESSIONS=40000 npm run test:load
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startFakeImap, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway } from '../e2e/harness/gateway.ts';
import { sleep } from '../helpers/proc.ts';
import { daemonMemory, mb, runClient } from './helpers.ts';

const TOTAL = Number(process.env.LOAD_FLOOD_SESSIONS ?? 40_000);
const WARMUP = 5_000;
const MAX_KEYS = 2_000;
/** 40,000 unbounded keys would be about 18 MB; the bound holds 2,000 (about 1 MB). */
const HEAP_MARGIN = 6 * 1024 * 1024;
let backend: FakeBackend;
let gw: Gateway;

before(async () => {
  backend = await startFakeImap({ users: { alice: 'secret' } });
  setInterval(() => void (backend.connections.length = 0), 1000).unref();
  gw = await startGateway({
    logLevel: 'info',
    nodeArgs: ['--inspect=127.0.0.1:0'],
    extra: {
      policy_store: { type: 'memory', max_keys: MAX_KEYS },
      rate_limits: [{ limit: 'connections', per: 'address', max: 60, window: '10m' }],
    },
    listeners: [{ name: 'plain', protocol: 'imap', tls: 'none', require_tls: false, backend: `127.0.0.1:${backend.port}` }],
  });
});

after(async () => {
  await gw?.stop();
  await backend?.close();
});

async function flood(total: number, start: number): Promise<Record<string, unknown>> {
  const r = await runClient({ mode: 'churn', port: gw.ports.plain, user: 'alice', password: 'secret', sources: [], sourceCount: 1_000_000, sourceStart: start, total, concurrency: 50, tlsEvery: 0 }).done;
  assert.equal(r.failed, 0, `failed sessions: ${JSON.stringify(r.errors)}`);
  assert.equal(r.ok, total);
  return r;
}

test(`${TOTAL} sessions from ${TOTAL} addresses: the policy counters stay at policy_store.max_keys, the heap flat`, { timeout: 900_000 }, async () => {
  await flood(WARMUP, 0);
  await sleep(500);
  const start = await daemonMemory(gw);
  const r = await flood(TOTAL, WARMUP);
  await sleep(1000);
  const end = await daemonMemory(gw);
  const figures = {
    sessions: TOTAL,
    addresses: TOTAL,
    maxKeys: MAX_KEYS,
    seconds: Number(r.ms) / 1000,
    heapBefore: mb(start.heapUsed),
    heapAfter: mb(end.heapUsed),
    rssBefore: mb(start.rss),
    rssAfter: mb(end.rss),
  };
  process.stdout.write(`# load/keys: ${JSON.stringify(figures)}\n`);
  assert.ok(end.heapUsed - start.heapUsed < HEAP_MARGIN, `heap grew from ${figures.heapBefore} to ${figures.heapAfter} with ${TOTAL} new addresses`);
  const logs = await gw.logs();
  assert.ok(logs.some((l) => l.msg === 'policy counter full: the counts that started longest ago are forgotten (policy_store.max_keys)'), 'the bound was reached and logged');
  assert.ok(!logs.some((l) => l.level === 'error' || l.level === 'fatal'), 'nothing logged as an error');
});
