/**
 * TLS-ALPN-01 on the ordinary listeners: the challenge certificate goes to
 * acme-tls/1 validation handshakes only, everyone else keeps the real one.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer as createHttpsServer } from 'node:https';
import { createServer, type AddressInfo, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, TLSSocket, type PeerCertificate } from 'node:tls';
import { after, before, test } from 'node:test';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { alpnSelector } from '../../../src/tls/options.ts';

const dir = mkdtempSync(join(tmpdir(), 'mailgate-alpn-'));
function pair(cn: string, san: string): { cert: string; key: string } {
  const k = join(dir, `${cn}.key`);
  const c = join(dir, `${cn}.crt`);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', k, '-out', c, '-days', '1', '-subj', `/CN=${cn}`, '-addext', `subjectAltName=DNS:${san}`], { stdio: 'ignore' });
  return { cert: readFileSync(c, 'utf8'), key: readFileSync(k, 'utf8') };
}

const store = new CertStore('TLSv1.2');
let mailServer: Server;
let httpsServer: ReturnType<typeof createHttpsServer>;
let mailPort = 0;
let httpsPort = 0;

before(async () => {
  const real = pair('real', 'a.test');
  store.put(real.cert, real.key, 'acme', { makeDefault: true });
  const challenge = pair('challenge', 'a.test');
  store.setChallenge('a.test', challenge.cert, challenge.key);
  // Like mail-session.ts: a TLSSocket over the accepted socket.
  mailServer = createServer((raw) => {
    const s = new TLSSocket(raw, { isServer: true, secureContext: store.contextFor(undefined), SNICallback: store.sniCallback, ALPNCallback: alpnSelector('imap') });
    s.on('error', () => undefined);
    s.on('secure', () => s.end());
  });
  // Like http-listener.ts: node:https with the callbacks as server options.
  httpsServer = createHttpsServer({ SNICallback: store.sniCallback, ALPNCallback: alpnSelector('http') }, (_req, res) => res.end('ok'));
  httpsServer.on('tlsClientError', () => undefined);
  httpsServer.on('secureConnection', (s) => s.end());
  await new Promise<void>((r) => mailServer.listen(0, '127.0.0.1', r));
  await new Promise<void>((r) => httpsServer.listen(0, '127.0.0.1', r));
  mailPort = (mailServer.address() as AddressInfo).port;
  httpsPort = (httpsServer.address() as AddressInfo).port;
});

after(() => {
  mailServer.close();
  httpsServer.close();
  rmSync(dir, { recursive: true, force: true });
});

function hello(port: number, opts: { servername: string; alpn?: string[]; version?: 'TLSv1.2' | 'TLSv1.3' }): Promise<{ cn: string; alpn: string | false } | { error: string }> {
  return new Promise((resolve) => {
    const v = opts.version ?? 'TLSv1.3';
    const s = connect({ host: '127.0.0.1', port, servername: opts.servername, rejectUnauthorized: false, minVersion: v, maxVersion: v, ...(opts.alpn ? { ALPNProtocols: opts.alpn } : {}) }, () => {
      const cert = s.getPeerCertificate() as PeerCertificate;
      resolve({ cn: String(cert.subject?.CN), alpn: s.alpnProtocol ?? false });
      s.destroy();
    });
    s.on('error', (err) => resolve({ error: err.message }));
  });
}

for (const [label, port] of [
  ['mail listener (TLSSocket)', () => mailPort],
  ['https listener (node:https)', () => httpsPort],
] as const) {
  test(`${label}: an acme-tls/1 validation (TLS 1.3) gets the challenge certificate`, async () => {
    assert.deepEqual(await hello(port(), { servername: 'a.test', alpn: ['acme-tls/1'] }), { cn: 'challenge', alpn: 'acme-tls/1' });
  });

  test(`${label}: other clients keep the real certificate while the challenge is pending`, async () => {
    const own = label.startsWith('mail') ? 'imap' : 'http/1.1';
    assert.deepEqual(await hello(port(), { servername: 'a.test', alpn: [own] }), { cn: 'real', alpn: own });
    assert.deepEqual(await hello(port(), { servername: 'a.test' }), { cn: 'real', alpn: false });
    assert.deepEqual(await hello(port(), { servername: 'a.test', version: 'TLSv1.2' }), { cn: 'real', alpn: false });
    // acme-tls/1 among others is no validation (RFC 8737 offers it alone): the real certificate and our protocol.
    assert.deepEqual(await hello(port(), { servername: 'a.test', alpn: ['acme-tls/1', own] }), { cn: 'real', alpn: own });
  });

  test(`${label}: acme-tls/1 is refused for a name without a pending challenge, and in TLS 1.2`, async () => {
    assert.ok('error' in (await hello(port(), { servername: 'b.test', alpn: ['acme-tls/1'] })));
    assert.ok('error' in (await hello(port(), { servername: 'a.test', alpn: ['acme-tls/1'], version: 'TLSv1.2' })), 'TLS 1.2 picks the certificate before ALPN: refused, not answered wrongly');
  });
}

test('after clearChallenge, acme-tls/1 is refused and the real certificate is unaffected', async () => {
  store.clearChallenge('A.TEST');
  assert.ok('error' in (await hello(mailPort, { servername: 'a.test', alpn: ['acme-tls/1'] })));
  assert.deepEqual(await hello(mailPort, { servername: 'a.test', alpn: ['imap'] }), { cn: 'real', alpn: 'imap' });
  const c = pair('challenge2', 'a.test');
  store.setChallenge('a.test', c.cert, c.key);
  const other = new CertStore('TLSv1.2');
  const real2 = pair('real2', 'a.test');
  other.put(real2.cert, real2.key, 'acme');
  store.replaceWith(other); // a reload keeps pending challenges
  assert.deepEqual(await hello(mailPort, { servername: 'a.test', alpn: ['acme-tls/1'] }), { cn: 'challenge2', alpn: 'acme-tls/1' });
  assert.deepEqual(await hello(mailPort, { servername: 'a.test', alpn: ['imap'] }), { cn: 'real2', alpn: 'imap' });
});
