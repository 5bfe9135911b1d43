/**
 * Automatic certificates against a real ACME CA: Pebble (with
 * pebble-challtestsrv resolving every name to 127.0.0.1), started on loopback
 * by the harness, and the real mailgate daemon.
 *
 * Scenarios:
 *  1. tls-alpn-01: first certificate, served on IMAPS and HTTPS, chains to
 *     Pebble's root for the right name (openssl s_client -verify_return_error);
 *     key files 0600; acme-tls/1 without a pending challenge is refused;
 *     `mailgate certs`; a reload keeps serving it.
 *  2. restart with the same storage: the stored certificate is served, no order;
 *     then `mailgate certs renew NAME` forces one through the running daemon.
 *  3. http-01 on the plain http (redirect) listener.
 *  4. short-lived certificates (30 s): renewal replaces the certificate for new
 *     handshakes while an IMAP session opened before stays up on the old one.
 *  5. Pebble down: failed renewals back off exponentially with jitter, the old
 *     certificate keeps being served, expiry approaching is an error in the log
 *     and in `mailgate certs`; Pebble back: renewal succeeds (new account).
 *  6. ARI: Pebble 2.4 offers no renewalInfo, so an HTTPS proxy in front of it
 *     adds one (RFC 9773 answers from the test): renewal happens inside the
 *     suggested window, and newOrder carries `replaces` with the old certID.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { after, before, test } from 'node:test';
import { LineClient, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway, type LogLine } from './harness/gateway.ts';
import { httpsGet, startPebble, type Pebble } from './harness/pebble.ts';
import { freePort, makeTempDir, removeTempDir, sleep } from '../helpers/proc.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

const NAME = 'mail.acme.test';
const alice = userByName('alice');

let dovecot: Dovecot;
let longCa: Pebble;
let shortCa: Pebble;
let ports: { http: number; https: number; imaps: number };
let deadBackend: number;
const storages: string[] = [];
const gateways: Gateway[] = [];

before(async () => {
  dovecot = await startDovecot();
  ports = { http: await freePort(), https: await freePort(), imaps: await freePort() };
  deadBackend = await freePort();
  // Both CAs validate on the same gateway ports; the tests below run one gateway at a time.
  longCa = await startPebble({ httpPort: ports.http, tlsPort: ports.https, validitySeconds: 3600 });
  shortCa = await startPebble({ httpPort: ports.http, tlsPort: ports.https, validitySeconds: 30 });
});

after(async () => {
  for (const g of gateways) await g.stop();
  for (const s of storages) await removeTempDir(s);
  await longCa?.stop();
  await shortCa?.stop();
  await dovecot?.stop();
});

async function storage(): Promise<string> {
  const dir = await makeTempDir('acme-store');
  storages.push(dir);
  return dir;
}

async function gateway(opts: { ca: Pebble; storage: string; challenge: 'tls-alpn-01' | 'http-01'; directory?: string; renew?: Record<string, string> }): Promise<Gateway> {
  // One gateway at a time on the fixed ports: a failed test may have left one behind.
  for (const g of gateways.splice(0)) await g.stop();
  const gw = await startGateway({
    ports: { http: ports.http, https: ports.https, imaps: ports.imaps },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${deadBackend}` },
      { name: 'http', protocol: 'http', tls: 'none', backend: `127.0.0.1:${deadBackend}`, redirect_https: true },
    ],
    extra: {
      hostname: NAME,
      control: { socket: './control.sock' },
      acme: {
        directory: opts.directory ?? opts.ca.directoryUrl,
        accept_terms: true,
        email: 'postmaster@acme.test',
        ca_bundle: opts.ca.caBundle,
        names: [NAME],
        challenge: opts.challenge,
        storage: opts.storage,
        renew: { retry_min: '1s', retry_max: '3s', ...opts.renew },
      },
    },
  });
  gateways.push(gw);
  return gw;
}

async function stopGateway(gw: Gateway): Promise<void> {
  await gw.stop();
  gateways.splice(gateways.indexOf(gw), 1);
}

const obtained = (l: LogLine) => l.msg.startsWith('certificate obtained for');
const renewed = (l: LogLine) => l.msg.startsWith('certificate renewed for');

/** The certificate a TLS client gets for NAME on a port, and whether it verifies against `ca` for NAME. */
function served(port: number, ca?: string): Promise<{ cert: X509Certificate; authorized: boolean; error: string | null }> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: NAME, ...(ca ? { ca } : {}), rejectUnauthorized: false }, () => {
      const cert = s.getPeerX509Certificate();
      s.destroy();
      if (!cert) reject(new Error('no peer certificate'));
      else resolve({ cert, authorized: s.authorized, error: s.authorizationError ? String(s.authorizationError) : null });
    });
    s.once('error', reject);
  });
}

async function opensslVerify(port: number, caFile: string, input = ''): Promise<string> {
  const r = await run('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-servername', NAME, '-verify_hostname', NAME, '-CAfile', caFile, '-verify_return_error', '-brief'], { input });
  return r.stdout + r.stderr;
}

function mailgateCli(args: string[], gw: Gateway, timeoutMs = 20_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return run(process.execPath, [CLI, ...args, '-s', path.join(gw.dir, 'control.sock')], { timeoutMs });
}

async function orderCount(ca: Pebble): Promise<number> {
  return ((await ca.logs()).match(/POST \/order-plz/g) ?? []).length;
}

/** certID as RFC 9773 spells it, computed with openssl (independently of src/acme/ari.ts). */
async function certIdByOpenssl(pem: string): Promise<string> {
  const text = await new Promise<string>((resolve, reject) => {
    const child = execFile('openssl', ['x509', '-noout', '-text', '-serial'], (err, out) => (err ? reject(err) : resolve(out)));
    child.stdin?.end(pem);
  });
  const aki = /X509v3 Authority Key Identifier:\s*\n\s*(?:keyid:)?([0-9A-F:]+)/.exec(text)?.[1];
  const serialHex = /^serial=([0-9A-F]+)$/m.exec(text)?.[1];
  assert.ok(aki && serialHex, `AKI and serial in openssl output:\n${text}`);
  let serial = Buffer.from(serialHex.length % 2 ? `0${serialHex}` : serialHex, 'hex');
  if ((serial[0] ?? 0) & 0x80) serial = Buffer.concat([Buffer.from([0]), serial]);
  return `${Buffer.from(aki.replace(/:/g, ''), 'hex').toString('base64url')}.${serial.toString('base64url')}`;
}

// ---- 1 + 2: tls-alpn-01, then a restart ------------------------------------------------------

let firstFingerprint = '';
let firstStorage = '';

test('tls-alpn-01: the first certificate comes from Pebble and is served on IMAPS and HTTPS for the right name', async () => {
  firstStorage = await storage();
  const gw = await gateway({ ca: longCa, storage: firstStorage, challenge: 'tls-alpn-01' });
  await gw.waitForLog((l) => l.msg.startsWith('no ACME certificate for') && l.serving === 'self-signed');
  const got = await gw.waitForLog(obtained, 30_000);
  assert.equal(got.name, NAME);
  assert.ok((await gw.logs()).some((l) => l.msg === 'challenge validated' && l.challenge === 'tls-alpn-01'));

  const rootFile = await longCa.rootFile();
  for (const port of [ports.imaps, ports.https]) {
    const out = await opensslVerify(port, rootFile, port === ports.imaps ? 'a LOGOUT\r\n' : '');
    assert.match(out, /Verification: OK/, `port ${port} chains to Pebble's root for ${NAME}:\n${out}`);
    const s = await served(port, await longCa.root());
    assert.ok(s.authorized, `node verifies it too: ${s.error}`);
    assert.ok(s.cert.subjectAltName?.includes(`DNS:${NAME}`));
    assert.match(s.cert.issuer, /Pebble Intermediate CA/);
    firstFingerprint = s.cert.fingerprint256;
  }

  const caDir = path.join(firstStorage, 'acme', `127.0.0.1_${longCa.port}-dir`);
  const keyMode = (await fsp.stat(path.join(caDir, 'certificates', NAME, `${NAME}.key`))).mode & 0o777;
  const accountMode = (await fsp.stat(path.join(caDir, 'account.key'))).mode & 0o777;
  assert.equal(keyMode, 0o600, 'certificate key is 0600');
  assert.equal(accountMode, 0o600, 'account key is 0600');

  // acme-tls/1 with no challenge pending is refused (no cross-protocol use of the mail port).
  const alpn = await run('openssl', ['s_client', '-connect', `127.0.0.1:${ports.imaps}`, '-servername', NAME, '-alpn', 'acme-tls/1', '-brief'], { input: '' });
  assert.notEqual(alpn.code, 0, `acme-tls/1 handshake must fail:\n${alpn.stdout}${alpn.stderr}`);

  const table = await mailgateCli(['certs'], gw);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, new RegExp(`${NAME.replace(/\./g, '\\.')}\\s+acme\\s+Pebble Intermediate CA`));
  assert.match(table.stdout, /NEXT RENEWAL/);
  assert.match(table.stdout, /\(lifetime\)\s+ok/);

  // A reload rebuilds the certificate store: the ACME certificate is still the one served, nothing is ordered.
  const orders = await orderCount(longCa);
  gw.signal('SIGHUP');
  await gw.waitForLog((l) => l.msg === 'configuration reloaded');
  assert.equal((await served(ports.imaps, await longCa.root())).cert.fingerprint256, firstFingerprint, 'served across a reload');
  assert.equal(await orderCount(longCa), orders);
  await stopGateway(gw);
});

test('a restart reuses the stored certificate: served at once, no new order; `mailgate certs renew` then forces one', async () => {
  assert.ok(firstStorage && firstFingerprint, 'runs after the tls-alpn-01 test');
  const before = await orderCount(longCa);
  const gw = await gateway({ ca: longCa, storage: firstStorage, challenge: 'tls-alpn-01' });
  const s = await served(ports.imaps, await longCa.root());
  assert.equal(s.cert.fingerprint256, firstFingerprint, 'the stored certificate is served from the first handshake');
  assert.ok(s.authorized);
  await sleep(2000);
  const logs = await gw.logs();
  assert.ok(logs.some((l) => l.msg === 'stored ACME certificate in use'));
  assert.ok(!logs.some((l) => l.msg === 'order created' || l.msg === 'obtaining certificate'), 'no order');
  assert.ok(!logs.some((l) => l.msg.startsWith('no ACME certificate')), 'no self-signed phase');
  assert.equal(await orderCount(longCa), before, 'Pebble saw no newOrder');

  // `mailgate certs renew NAME` forces a renewal through the running daemon and waits for it.
  const renew = await mailgateCli(['certs', 'renew', NAME], gw, 60_000);
  assert.equal(renew.code, 0, renew.stderr + renew.stdout);
  assert.match(renew.stdout, new RegExp(`^${NAME.replace(/\./g, '\\.')}: renewed, valid until `));
  const after = await served(ports.imaps, await longCa.root());
  assert.notEqual(after.cert.fingerprint256, firstFingerprint, 'the forced renewal is served at once');
  assert.equal(await orderCount(longCa), before + 1);
  const unknown = await mailgateCli(['certs', 'renew', 'other.test'], gw);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stdout, /other\.test: FAILED: other\.test is not an ACME-managed name/);
  await stopGateway(gw);
});

// ---- 3: http-01 ------------------------------------------------------------------------------

test('http-01: the plain http listener answers the challenge and the certificate is served on HTTPS', async () => {
  const gw = await gateway({ ca: longCa, storage: await storage(), challenge: 'http-01' });
  await gw.waitForLog(obtained, 30_000);
  assert.ok((await gw.logs()).some((l) => l.msg === 'challenge validated' && l.challenge === 'http-01'));
  const out = await opensslVerify(ports.https, await longCa.rootFile());
  assert.match(out, /Verification: OK/, out);
  // The redirect listener still redirects everything else.
  const r = await run('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code} %{redirect_url}', '-H', `Host: ${NAME}`, `http://127.0.0.1:${ports.http}/x`]);
  assert.match(r.stdout, /^301 https:\/\/mail\.acme\.test/);
  await stopGateway(gw);
});

// ---- 4 + 5: short-lived certificates, renewal, CA outage ------------------------------------------

let shortGw: Gateway;

test('short-lived certificate: renewal swaps it for new handshakes while an open IMAP session stays on the old one', async () => {
  shortGw = await gateway({ ca: shortCa, storage: await storage(), challenge: 'tls-alpn-01' });
  await shortGw.waitForLog(obtained, 30_000);
  const root = await shortCa.root();
  const first = await served(ports.imaps, root);
  assert.ok(first.authorized, String(first.error));

  const session = await LineClient.connect(ports.imaps, { tls: true, servername: NAME });
  const sessionCert = (session.socket as tls.TLSSocket).getPeerX509Certificate();
  assert.equal(sessionCert?.fingerprint256, first.cert.fingerprint256, 'the session was opened on the first certificate');
  assert.match(await session.readLine(), /^\* OK/);
  session.write(`a1 LOGIN ${alice.name} ${alice.password}\r\n`);
  await session.readUntil(/^a1 OK/);

  // 30 s certificates renew with half the lifetime left.
  await shortGw.waitForLog(renewed, 30_000);
  const second = await served(ports.imaps, root);
  assert.ok(second.authorized, String(second.error));
  assert.notEqual(second.cert.fingerprint256, first.cert.fingerprint256, 'new handshakes get the renewed certificate');
  const https2 = await served(ports.https, root);
  assert.equal(https2.cert.fingerprint256, second.cert.fingerprint256, 'every listener serving the name swapped');

  // The session opened before the swap goes on, on its own TLS connection (no renegotiation, no drop).
  assert.ok(!session.closed, 'the IMAP session is still open');
  session.write('a2 NOOP\r\n');
  await session.readUntil(/^a2 OK/);
  session.write('a3 LOGOUT\r\n');
  await session.readUntil(/^a3 OK/);
  session.close();
});

test('Pebble down: renewals back off with jitter, the old certificate stays, expiry approaching is an error; back up: renewed', async () => {
  assert.ok(shortGw, 'runs after the short-lived test');
  const root = await shortCa.root();
  const failuresBefore = (await shortGw.logs()).filter((l) => l.failures !== undefined && typeof l.retryAt === 'string').length;
  await shortCa.stopCa();
  const current = await served(ports.imaps, root);

  const failureLines = async () => (await shortGw.logs()).filter((l) => l.failures !== undefined && typeof l.retryAt === 'string').slice(failuresBefore);
  const fails = await waitFor('three failed attempts while Pebble is down', async () => {
    const lines = await failureLines();
    return lines.length >= 3 && lines;
  }, { timeoutMs: 40_000, intervalMs: 200, detail: async () => `got ${(await failureLines()).length}` });
  // retry_min 1s, retry_max 3s: the n-th wait is between half and all of min(3s, 1s·2^(n-1)).
  fails.slice(0, 3).forEach((l, i) => {
    const wait = Date.parse(l.retryAt as string) - Date.parse(l.time as string);
    const nominal = Math.min(3000, 1000 * 2 ** i);
    assert.ok(wait >= nominal / 2 - 50 && wait <= nominal + 5, `failure ${i + 1}: waits ${wait} ms, expected ${nominal / 2}..${nominal}`);
    assert.equal(l.failures, i + 1);
  });
  const stillServed = await served(ports.imaps, root);
  assert.equal(stillServed.cert.fingerprint256, current.cert.fingerprint256, 'the old certificate keeps being served');

  // Less than a quarter of the lifetime left with renewal failing: an error, and `mailgate certs` says so.
  const critical = await shortGw.waitForLog((l) => l.level === 'error' && /expires soon and renewal keeps failing/.test(l.msg), 30_000);
  assert.equal(critical.name, NAME);
  const table = await mailgateCli(['certs'], shortGw);
  assert.equal(table.code, 1, 'certs exits 1 while renewal fails');
  assert.match(table.stdout, /(EXPIRES SOON, renewal failing|renewal failing|EXPIRED)/);
  assert.match(table.stdout, /\(retry\)/);

  await shortCa.startCa();
  const renewedAgain = await shortGw.waitForLog((l) => renewed(l) && Date.parse(l.time as string) > Date.parse(critical.time as string), 30_000);
  assert.equal(renewedAgain.name, NAME);
  const fresh = await served(ports.imaps, await shortCa.root());
  assert.ok(fresh.authorized, `chains to the restarted Pebble's new root: ${fresh.error}`);
  assert.ok((await shortGw.logs()).some((l) => /does not know our account/.test(l.msg)), 'the forgotten account was registered again');
  await stopGateway(shortGw);
});

// ---- 6: ARI ------------------------------------------------------------------------------------

test('ARI (through a renewalInfo proxy in front of Pebble): renewal inside the suggested window, newOrder says which certificate it replaces', async () => {
  const dir = await longCa.directory();
  assert.equal(dir.renewalInfo, undefined, 'this Pebble offers no ARI; if it ever does, test against it directly');

  const pebbleCa = await fsp.readFile(longCa.caBundle, 'utf8');
  const proxyPort = await freePort();
  const origin = `https://127.0.0.1:${proxyPort}`;
  const asked: { certId: string; at: number }[] = [];
  const orders: Record<string, unknown>[] = [];
  const windows = new Map<string, { start: number; end: number }>();
  const proxy = https.createServer({ cert: pebbleCa, key: await fsp.readFile(longCa.tlsKey, 'utf8') }, (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const url = req.url ?? '/';
      if (req.method === 'GET' && url === '/dir') {
        httpsGet(`${longCa.origin}/dir`, pebbleCa).then(
          (r) => {
            const d = JSON.parse(r.body.split(longCa.origin).join(origin)) as Record<string, unknown>;
            d.renewalInfo = `${origin}/renewal-info`;
            res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(d));
          },
          () => res.writeHead(502).end(),
        );
        return;
      }
      if (req.method === 'GET' && url.startsWith('/renewal-info/')) {
        const certId = url.slice('/renewal-info/'.length);
        asked.push({ certId, at: Date.now() });
        // The first certificate is to be renewed 4-7 s from its first question; later ones in a day.
        let w = windows.get(certId);
        if (!w) {
          w = windows.size === 0 ? { start: Date.now() + 4000, end: Date.now() + 7000 } : { start: Date.now() + 86_400_000, end: Date.now() + 2 * 86_400_000 };
          windows.set(certId, w);
        }
        res.writeHead(200, { 'content-type': 'application/json', 'retry-after': '3600' });
        res.end(JSON.stringify({ suggestedWindow: { start: new Date(w.start).toISOString(), end: new Date(w.end).toISOString() } }));
        return;
      }
      if (req.method === 'POST' && url === '/order-plz') {
        const jws = JSON.parse(body.toString('utf8')) as { payload: string };
        orders.push(JSON.parse(Buffer.from(jws.payload, 'base64url').toString('utf8')) as Record<string, unknown>);
      }
      // Everything else goes to Pebble unchanged; Host stays the proxy's, which is what the JWS "url" names.
      const up = https.request(
        { host: '127.0.0.1', port: longCa.port, method: req.method, path: url, headers: req.headers, ca: pebbleCa, servername: 'localhost' },
        (ur) => {
          const headers = { ...ur.headers };
          for (const h of ['location', 'link'] as const) {
            const v = headers[h];
            if (typeof v === 'string') headers[h] = v.split(longCa.origin).join(origin);
            else if (Array.isArray(v)) headers[h] = v.map((x) => x.split(longCa.origin).join(origin)).join(', ');
          }
          res.writeHead(ur.statusCode ?? 502, headers);
          ur.pipe(res);
        },
      );
      up.on('error', () => res.writeHead(502).end());
      up.end(body);
    });
  });
  await new Promise<void>((r) => proxy.listen(proxyPort, '127.0.0.1', r));
  try {
    const gw = await gateway({ ca: longCa, storage: await storage(), challenge: 'tls-alpn-01', directory: `${origin}/dir` });
    const got = await gw.waitForLog(obtained, 30_000);
    const firstPem = await fsp.readFile(got.file as string, 'utf8');
    const firstId = await certIdByOpenssl(firstPem);
    const windowLine = await gw.waitForLog((l) => l.msg === 'renewal window from the CA (ARI)', 10_000);
    assert.ok(asked.some((a) => a.certId === firstId), `renewalInfo asked for the certID openssl computes (${firstId}); asked: ${JSON.stringify(asked)}`);
    const w = windows.get(firstId)!;
    const renewAt = Date.parse(windowLine.renewAt as string);
    assert.ok(renewAt >= w.start && renewAt <= w.end, 'the chosen time lies inside the window');

    const start = await gw.waitForLog((l) => l.msg === 'renewing certificate', 20_000);
    const startedAt = Date.parse(start.time as string);
    assert.ok(startedAt >= w.start - 50, `renewal did not start before the window (${startedAt - w.start} ms)`);
    assert.ok(startedAt <= w.end + 1000, `renewal started within the window (${startedAt - w.end} ms after its end)`);
    const done = await gw.waitForLog(renewed, 30_000);
    assert.equal(done.replaced, firstId);
    const withReplaces = orders.filter((o) => 'replaces' in o);
    assert.equal(withReplaces.length, 1, `exactly one order replaced a certificate: ${JSON.stringify(orders)}`);
    assert.equal(withReplaces[0]!.replaces, firstId, 'newOrder carries replaces = the old certificate\'s certID');
    assert.equal(asked.filter((a) => a.certId === firstId).length, 1, 'Retry-After: 3600 was honoured (no second poll for the same certificate)');
    assert.equal(orders.length, 2, 'first order and one renewal, no more');
    // The new certificate gets its own window (a day away) and nothing else is ordered.
    await sleep(1500);
    assert.equal(orders.length, 2);
    await stopGateway(gw);
  } finally {
    await new Promise<void>((r) => proxy.close(() => r()));
    proxy.closeAllConnections();
  }
});
