/**
 * Load: 2,000 logged-in IMAP sessions over TLS held through 100 reloads
 * (SIGHUP), each reload swapping the certificate between two key pairs and
 * every tenth one adding or removing a listener, while new sessions keep
 * arriving. No held session may be dropped, no NOOP go unanswered, no new
 * session be refused, and new handshakes must see the certificate of the
 * config in force.
 *
 *   LOAD_SESSIONS=2000 LOAD_RELOADS=100 npm run test:load
 */
import assert from 'node:assert/strict';
import * as tls from 'node:tls';
import { after, before, test } from 'node:test';
import { startFakeImap, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway, type LogLine } from '../e2e/harness/gateway.ts';
import { freePort, makeTempDir, removeTempDir, sleep } from '../helpers/proc.ts';
import { ecCertificate, mb, rssBytes, runClient, SOURCES } from './helpers.ts';
import { waitFor } from '../helpers/wait.ts';

const SESSIONS = Number(process.env.LOAD_SESSIONS ?? 2000);
const RELOADS = Number(process.env.LOAD_RELOADS ?? 100);
const HOST = 'mail.e2e.test';
let backend: FakeBackend;
let gw: Gateway;
let dir: string;
let pairs: ReturnType<typeof ecCertificate>[];

before(async () => {
  dir = await makeTempDir('load-certs');
  pairs = [ecCertificate(dir, 'a', HOST), ecCertificate(dir, 'b', HOST)];
  backend = await startFakeImap({ users: { alice: 'secret' } });
  const at = `127.0.0.1:${backend.port}`;
  gw = await startGateway({
    logLevel: 'info',
    extra: {
      brute_force: { enabled: false },
      tls: { dir: './certs', certificates: [{ cert: pairs[0]!.cert, key: pairs[0]!.key }] },
    },
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

function presented(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ port, host: '127.0.0.1', servername: HOST, rejectUnauthorized: false }, () => {
      const fp = s.getPeerCertificate().fingerprint256;
      s.destroy();
      resolve(fp);
    });
    s.on('error', reject);
  });
}

/** Lines of the gateway itself: with workers (MAILGATE_E2E_WORKERS), each worker logs its own reload too, with a `worker` field. */
function count(logs: LogLine[], msg: string): number {
  return logs.filter((l) => l.msg === msg && l.worker === undefined).length;
}

test(`${SESSIONS} held sessions through ${RELOADS} reloads with certificate swaps: nothing dropped`, { timeout: 600_000 }, async (t) => {
  const t0 = Date.now();
  const client = runClient({
    mode: 'hold',
    port: gw.ports.plain,
    tlsPort: gw.ports.imaps,
    holdTls: true,
    user: 'alice',
    password: 'secret',
    sources: SOURCES,
    sessions: SESSIONS,
    noopEveryMs: 1000,
    churnPerSec: 20,
    servername: HOST,
  });
  t.after(() => client.kill());
  const held = await client.waitFor((l) => typeof l.held === 'number', 300_000);
  assert.equal(held.held, SESSIONS, `all sessions logged in (${JSON.stringify(held)})`);
  const rssHeld = rssBytes(gw.proc.pid);
  const extraPort = await freePort();
  const tReloads = Date.now();
  for (let i = 1; i <= RELOADS; i++) {
    const pair = pairs[i % 2]!;
    await gw.rewrite((c) => {
      c.tls = { dir: './certs', certificates: [{ cert: pair.cert, key: pair.key }] };
      // Every tenth reload starts (and the next one stops) a listener nobody uses.
      if (Math.floor(i / 10) % 2 === 1) {
        (c.listeners as unknown[]).push({ name: 'extra', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${backend.port}`, listen: `127.0.0.1:${extraPort}` });
      }
    });
    gw.signal('SIGHUP');
    await waitFor(`reload ${i} to finish`, async () => {
      const logs = await gw.logs();
      assert.ok(!logs.some((l) => l.msg === 'reload refused, keeping the running configuration' || l.msg === 'reload failed in a worker'), 'no reload was refused');
      return count(logs, 'configuration reloaded') >= i;
    }, { timeoutMs: 30_000 });
    // Spread the reloads over the run, so sessions are mid-NOOP, mid-handshake and mid-login when they happen.
    await sleep(100);
  }
  const reloadMs = Date.now() - tReloads;
  // New handshakes see the certificate of the last config (pair RELOADS % 2).
  assert.equal(await presented(gw.ports.imaps!), pairs[RELOADS % 2]!.fingerprint);
  // Let every held session do a few more NOOPs on the final config, then log them all out.
  await sleep(2500);
  client.stop();
  const r = await client.done;
  const logs = await gw.logs();
  const figures = {
    sessions: SESSIONS,
    reloads: count(logs, 'configuration reloaded'),
    reloadSeconds: reloadMs / 1000,
    noops: r.noops,
    dropped: r.dropped,
    noopFailures: r.noopFailures,
    loggedOut: r.loggedOut,
    churnOk: r.churnOk,
    churnFailed: r.churnFailed,
    rssWithSessionsHeld: mb(rssHeld),
    totalSeconds: (Date.now() - t0) / 1000,
  };
  process.stdout.write(`# load/reload: ${JSON.stringify(figures)}\n`);
  assert.deepEqual(r.errors, [], 'the client saw no error');
  assert.equal(r.dropped, 0, 'no held session was dropped');
  assert.equal(r.noopFailures, 0, 'every NOOP was answered');
  assert.equal(r.loggedOut, SESSIONS, 'every held session logged out normally');
  assert.equal(r.churnFailed, 0, 'no new session failed during the reloads');
  assert.ok(Number(r.churnOk) > 0);
  assert.equal(figures.reloads, RELOADS);
  assert.ok(!logs.some((l) => l.msg === 'internal error' || l.msg === 'uncaught exception'));
  // Sessions that ended did so because their client logged out (the backend closes after LOGOUT), never for a reload.
  const reasons = new Set(logs.filter((l) => l.msg === 'session end').map((l) => String(l.reason)));
  for (const reason of reasons) assert.ok(['backend-closed', 'client-closed', 'client-quit'].includes(reason), `a session ended for ${reason}`);
});
