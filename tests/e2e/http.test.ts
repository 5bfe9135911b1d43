/** HTTPS through the gateway to a real nginx, driven by curl and openssl. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, test } from 'node:test';
import { LineClient, run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, NGINX_INDEX_HTML, startNginx, type Nginx } from './harness/servers.ts';

let nginx: Nginx;
let gw: Gateway;

before(async () => {
  nginx = await startNginx();
  const dead = await freePort();
  gw = await startGateway({
    listeners: [
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${nginx.port}`, hsts: 31536000 },
      { name: 'http', protocol: 'http', tls: 'none', backend: `127.0.0.1:${nginx.port}`, redirect_https: true },
      { name: 'dead', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${dead}` },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
});

function curl(port: number, path: string, extra: string[] = []) {
  return run('curl', ['-sS', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${port}:127.0.0.1`, ...extra, `https://${gw.hostname}:${port}${path}`], { encoding: 'latin1' });
}

test('GET through HTTPS returns the backend page, with HSTS, verified against the gateway certificate', async () => {
  const r = await curl(gw.ports.https!, '/', ['-i', '--http1.1']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^HTTP\/1\.1 200/);
  assert.match(r.stdout, /strict-transport-security: max-age=31536000/i);
  assert.ok(r.stdout.endsWith(NGINX_INDEX_HTML));
});

test('a 1 MiB download arrives intact', async () => {
  const r = await curl(gw.ports.https!, '/big.bin');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(createHash('sha256').update(Buffer.from(r.stdout, 'latin1')).digest('hex'), nginx.bigSha256);
});

test('the backend sees the real client address and protocol; a forged X-Forwarded-For is replaced', async () => {
  const r = await curl(gw.ports.https!, '/echo-headers', ['--interface', '127.0.0.3', '-H', 'X-Forwarded-For: 6.6.6.6', '-H', 'Authorization: Bearer s3cr3t-token']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^x-forwarded-for: 127\.0\.0\.3$/m);
  assert.match(r.stdout, /^x-forwarded-proto: https$/m);
  assert.match(r.stdout, new RegExp(`^host: ${gw.hostname.replace(/\./g, '\\.')}:${gw.ports.https}$`, 'm'));
  assert.doesNotMatch(r.stdout, /6\.6\.6\.6/);
  const logs = await gw.rawLogs();
  assert.ok(!logs.includes('s3cr3t-token'), 'the Authorization header never reaches the log');
});

test('a client that asks for Connection: close gets it, and its next request a new connection', async () => {
  const url = `https://${gw.hostname}:${gw.ports.https}/`;
  const close = await run('curl', ['-sS', '--http1.1', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${gw.ports.https}:127.0.0.1`, '-H', 'Connection: close', '-D', '-', '-w', 'code=%{http_code} connects=%{num_connects}\n', '-o', '/dev/null', url, '-o', '/dev/null', url]);
  assert.equal(close.code, 0, close.stderr);
  assert.deepEqual(close.stdout.match(/^code=.*$/gm), ['code=200 connects=1', 'code=200 connects=1']);
  assert.equal(close.stdout.match(/^connection: close\r?$/gim)?.length, 2);
  // Without it, the connection is kept and reused.
  const keep = await run('curl', ['-sS', '--http1.1', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${gw.ports.https}:127.0.0.1`, '-w', 'code=%{http_code} connects=%{num_connects}\n', '-o', '/dev/null', url, '-o', '/dev/null', url]);
  assert.deepEqual(keep.stdout.match(/^code=.*$/gm), ['code=200 connects=1', 'code=200 connects=0']);
});

test('the plain listener redirects to https', async () => {
  const r = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code} %{redirect_url}', '-H', `Host: ${gw.hostname}`, `http://127.0.0.1:${gw.ports.http}/some/path?q=1`]);
  assert.match(r.stdout, new RegExp(`^30[18] https://${gw.hostname.replace(/\./g, '\\.')}/some/path\\?q=1$`));
});

test('a dead backend gives 502 and the gateway keeps serving', async () => {
  const r = await curl(gw.ports.dead!, '/', ['-o', '/dev/null', '-w', '%{http_code}']);
  assert.equal(r.stdout, '502');
  const ok = await curl(gw.ports.https!, '/', ['-o', '/dev/null', '-w', '%{http_code}']);
  assert.equal(ok.stdout, '200');
});

test('an IMAP client sent to the HTTPS port is refused at the handshake (ALPACA); TLS 1.1 is refused', async () => {
  await assert.rejects(LineClient.connect(gw.ports.https!, { tls: true, alpn: ['imap'] }));
  const r = await curl(gw.ports.https!, '/', ['--tlsv1.1', '--tls-max', '1.1']);
  assert.notEqual(r.code, 0);
});
