/**
 * Load: 100,000 complete IMAP sessions (greeting, LOGIN, NOOP, LOGOUT; every
 * tenth over TLS) from a client in its own process, 50 at a time, through
 * the daemon to a fake backend. The daemon's heap after a forced full GC
 * (through its inspector) must come back to within a small margin of where
 * it was after a warm-up, and its RSS must not have grown with the count.
 *
 *   LOAD_LEAK_SESSIONS=100000 npm run test:load
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startFakeImap, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway } from '../e2e/harness/gateway.ts';
import { makeTempDir, removeTempDir, sleep } from '../helpers/proc.ts';
import { daemonMemory, ecCertificate, mb, runClient, SOURCES } from './helpers.ts';

const TOTAL = Number(process.env.LOAD_LEAK_SESSIONS ?? 100_000);
const WARMUP = 5_000;
/** Margins: a leak of 100 bytes per session would be 10 MB of heap after 100,000 sessions. */
const HEAP_MARGIN = 8 * 1024 * 1024;
const RSS_MARGIN = 64 * 1024 * 1024;
const HOST = 'mail.e2e.test';
let backend: FakeBackend;
let gw: Gateway;
let dir: string;

before(async () => {
  dir = await makeTempDir('leak-certs');
  const pair = ecCertificate(dir, 'ec', HOST);
  backend = await startFakeImap({ users: { alice: 'secret' } });
  // The backend keeps a record per connection for other tests; here that record would be the leak.
  setInterval(() => void (backend.connections.length = 0), 1000).unref();
  const at = `127.0.0.1:${backend.port}`;
  gw = await startGateway({
    logLevel: 'info',
    nodeArgs: ['--inspect=127.0.0.1:0'],
    extra: { brute_force: { enabled: false }, tls: { dir: './certs', certificates: [{ cert: pair.cert, key: pair.key }] } },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: at },
      { name: 'plain', protocol: 'imap', tls: 'none', require_tls: false, backend: at },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await backend?.close();
  if (dir) await removeTempDir(dir);
});

async function churn(total: number): Promise<Record<string, unknown>> {
  const r = await runClient({ mode: 'churn', port: gw.ports.plain, tlsPort: gw.ports.imaps, user: 'alice', password: 'secret', sources: SOURCES, total, concurrency: 50, tlsEvery: 10, servername: HOST }).done;
  assert.equal(r.failed, 0, `failed sessions: ${JSON.stringify(r.errors)}`);
  assert.equal(r.ok, total);
  return r;
}

test(`memory after ${TOTAL} sessions returns to the warm-up level`, { timeout: 900_000 }, async () => {
  await churn(WARMUP);
  await sleep(500);
  const start = await daemonMemory(gw);
  const r = await churn(TOTAL);
  // Sessions end asynchronously after the client saw its close; give the last ones a moment.
  await sleep(1000);
  const end = await daemonMemory(gw);
  const figures = {
    sessions: TOTAL,
    seconds: Number(r.ms) / 1000,
    perSecond: Math.round(TOTAL / (Number(r.ms) / 1000)),
    heapBefore: mb(start.heapUsed),
    heapAfter: mb(end.heapUsed),
    rssBefore: mb(start.rss),
    rssAfter: mb(end.rss),
  };
  process.stdout.write(`# load/leak: ${JSON.stringify(figures)}\n`);
  assert.ok(end.heapUsed - start.heapUsed < HEAP_MARGIN, `heap grew from ${figures.heapBefore} to ${figures.heapAfter}`);
  assert.ok(end.rss - start.rss < RSS_MARGIN, `RSS grew from ${figures.rssBefore} to ${figures.rssAfter}`);
  const logs = await gw.logs();
  assert.ok(!logs.some((l) => l.level === 'error' || l.level === 'fatal'), 'nothing logged as an error');
});
