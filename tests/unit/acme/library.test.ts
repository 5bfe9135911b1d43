/**
 * What mailgate reaches of acme-client beyond its documented API
 * (src/acme/library.ts), against the installed acme-client: the parts are
 * where the adapter expects them, and they still do what client.ts relies
 * on, checked with a tiny CA on loopback. A new acme-client that moves or
 * changes one of them fails here.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import acme from 'acme-client';
import { AcmeAccount, AcmeError, closeAcmeHttp, configureAcmeHttp } from '../../../src/acme/client.ts';
import { acmeHttpDefaults, acmeNodeHttpAdapter, clientHttp, wrapApiRequest } from '../../../src/acme/library.ts';
import { AcmeStorage } from '../../../src/acme/storage.ts';
import { createLogger } from '../../../src/core/log.ts';

const log = createLogger('silent');
let server: Server;
let base = '';
const hits: string[] = [];
const work = mkdtempSync(join(tmpdir(), 'mailgate-acme-library-'));

/** A CA that knows a directory, nonces, ARI and refuses every new account as rate limited. */
function answer(req: IncomingMessage): { status: number; headers: Record<string, string>; body?: unknown } {
  const path = req.url ?? '/';
  if (path === '/dir') {
    return { status: 200, headers: {}, body: { newNonce: `${base}/nonce`, newAccount: `${base}/account`, newOrder: `${base}/order`, renewalInfo: `${base}/ari/` } };
  }
  if (path === '/nonce') return { status: 200, headers: { 'replay-nonce': `n${hits.length}` } };
  if (path === '/account') {
    return { status: 429, headers: { 'retry-after': '120', 'replay-nonce': 'n-next' }, body: { type: 'urn:ietf:params:acme:error:rateLimited', detail: 'too many new accounts' } };
  }
  if (path === '/ari/abc.def') {
    return { status: 200, headers: { 'retry-after': '3600' }, body: { suggestedWindow: { start: '2030-01-01T00:00:00Z', end: '2030-01-02T00:00:00Z' } } };
  }
  return { status: 404, headers: {}, body: { type: 'urn:ietf:params:acme:error:malformed', detail: 'not here' } };
}

before(async () => {
  server = createServer((req, res) => {
    hits.push(`${req.method} ${req.url}`);
    req.resume();
    req.on('end', () => {
      const a = answer(req);
      res.writeHead(a.status, { 'content-type': a.body === undefined ? 'text/plain' : 'application/problem+json', ...a.headers });
      res.end(a.body === undefined ? undefined : JSON.stringify(a.body));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  base = `http://127.0.0.1:${typeof addr === 'object' && addr ? addr.port : 0}`;
  configureAcmeHttp({ timeoutMs: 5_000 });
});

after(() => {
  closeAcmeHttp();
  server.close();
  rmSync(work, { recursive: true, force: true });
});

test('the parts of acme-client mailgate reaches are where the adapter expects them', async () => {
  const defaults = acmeHttpDefaults();
  assert.equal(typeof defaults.acmeSettings.retryDefaultDelay, 'number');
  assert.equal(typeof acmeNodeHttpAdapter(), 'function');
  const client = new acme.Client({ directoryUrl: `${base}/dir`, accountKey: await acme.crypto.createPrivateEcdsaKey('P-256') });
  const http = clientHttp(client);
  assert.equal(typeof http.request, 'function');
  let wrapped = 0;
  wrapApiRequest(client, (original) => (...args) => {
    wrapped++;
    return original(...args);
  });
  await assert.rejects(client.createAccount({ termsOfServiceAgreed: true }));
  assert.equal(wrapped, 1, 'createAccount went through the wrapped api.apiRequest');
});

test('the directory and ARI go through the client\'s HTTP side, with the CA\'s Retry-After', async () => {
  const account = new AcmeAccount({ directory: `${base}/dir`, storage: new AcmeStorage(join(work, 'ari'), `${base}/dir`), log });
  assert.equal((await account.directory()).renewalInfo, `${base}/ari/`);
  const ari = await account.renewalInfo('abc.def');
  assert.equal(ari?.info.window.start.toISOString(), '2030-01-01T00:00:00.000Z');
  assert.equal(ari?.retryAfterMs, 3_600_000);
});

test('a refused signed request is one request (acme-client retries nothing) and an AcmeError with problem, status and Retry-After', async () => {
  const account = new AcmeAccount({ directory: `${base}/dir`, storage: new AcmeStorage(join(work, 'order'), `${base}/dir`), log });
  const before = hits.filter((h) => h === 'POST /account').length;
  const err = await account.order({ name: 'a.example', challenge: 'http-01', keyType: 'ecdsa-p256', hooks: { http01: () => () => undefined, tlsAlpn01: () => () => undefined }, checkpoint: () => undefined, log }).then(
    () => assert.fail('the order must fail'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof AcmeError, String(err));
  assert.equal(err.problem, 'rateLimited');
  assert.equal(err.status, 429);
  assert.equal(err.retryAfterMs, 120_000);
  assert.equal(hits.filter((h) => h === 'POST /account').length - before, 1, 'no retry inside acme-client');
});

test('a CA that cannot be reached is an AcmeError naming the request, through the wrapped http adapter', async () => {
  const closed = createServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const addr = closed.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  await new Promise<void>((resolve) => closed.close(() => resolve()));
  const account = new AcmeAccount({ directory: `http://127.0.0.1:${port}/dir`, storage: new AcmeStorage(join(work, 'down'), `http://127.0.0.1:${port}/dir`), log });
  await assert.rejects(account.directory(), (e: unknown) => e instanceof AcmeError && /^GET http:\/\/127\.0\.0\.1:\d+\/dir: /.test(e.message));
});
