/**
 * authentication: http through the policy engine, against a small auth
 * service on loopback speaking nginx's auth_http protocol: the request
 * headers as nginx sends them, OK with a backend (and replacement
 * credentials), a refusal after Auth-Wait that counts toward brute force,
 * a temporary refusal, and a service that is down, slow or answers
 * nonsense (a temporary failure, never a pass); the keep-alive pool and the
 * bounded negative cache; no credential in any log line.
 */
import assert from 'node:assert/strict';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, test } from 'node:test';
import { escapeLikeNginx } from '../../../src/policy/auth-http.ts';
import { configFrom, connect, creds, engineFor, login, memoryLog } from './helpers.ts';

interface Seen {
  headers: IncomingHttpHeaders;
  socket: number;
}

const seen: Seen[] = [];
let server: Server;
let port = 0;
let sockets = 0;
/** How the service answers, by user name. */
const answers: Record<string, { status?: number; headers: Record<string, string>; delayMs?: number }> = {
  alice: { headers: { 'Auth-Status': 'OK', 'Auth-Server': '127.0.0.9', 'Auth-Port': '1143' } },
  bob: { headers: { 'Auth-Status': 'OK', 'Auth-Server': '127.0.0.9', 'Auth-Port': '1143', 'Auth-User': 'bob*master', 'Auth-Pass': 'masterpw' } },
  carol: { headers: { 'Auth-Status': 'Invalid login or password', 'Auth-Wait': '1' } },
  dave: { headers: { 'Auth-Status': 'Temporary server problem, try again later', 'Auth-Error-Code': '451 4.3.0', 'Auth-Wait': '0' } },
  slow: { headers: { 'Auth-Status': 'OK', 'Auth-Server': '127.0.0.9', 'Auth-Port': '1143' }, delayMs: 1500 },
  broken: { status: 500, headers: { 'Auth-Status': 'OK', 'Auth-Server': '127.0.0.9', 'Auth-Port': '1143' } },
  noserver: { headers: { 'Auth-Status': 'OK' } },
  silent: { headers: {} },
};

before(async () => {
  server = createServer((req, res) => {
    const socket = (req.socket as { id?: number } & typeof req.socket);
    socket.id ??= ++sockets;
    seen.push({ headers: req.headers, socket: socket.id });
    const user = decodeURIComponent(String(req.headers['auth-user'] ?? ''));
    const a = answers[user] ?? answers.carol!;
    setTimeout(() => {
      res.writeHead(a.status ?? 200, a.headers);
      res.end();
    }, a.delayMs ?? 0);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  port = (server.address() as AddressInfo).port;
});

after(() => new Promise<void>((r) => server.close(() => r())));

function setup(extra = '') {
  return configFrom(`
auth_http:
  url: http://127.0.0.1:${port}/auth
  timeout: 1s
  headers: { X-Auth-Key: s3cret }
  negative_cache: { size: 2, ttl: 1h }
${extra}
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: http }
  - { name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:25", authentication: http }
`);
}

test('OK: the backend is the service\'s Auth-Server:Auth-Port; the request carries nginx\'s headers, URL-encoded credentials and the configured header', async () => {
  const config = setup();
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '203.0.113.5');
  const before = seen.length;
  const d = await engine.onAuth({ ...login(c, creds('alice', 'p w%ö')), attempt: 2 }, creds('alice', 'p w%ö'));
  assert.deepEqual(d.action === 'allow' && [d.backend, d.credentials?.user, d.credentials?.password], [{ host: '127.0.0.9', port: 1143 }, 'alice', 'p w%ö']);
  const h = seen[before]!.headers;
  assert.equal(h['auth-method'], 'plain');
  assert.equal(h['auth-user'], 'alice');
  assert.equal(h['auth-pass'], 'p%20w%25%C3%B6');
  assert.equal(h['auth-protocol'], 'imap');
  assert.equal(h['auth-login-attempt'], '2');
  assert.equal(h['client-ip'], '203.0.113.5');
  assert.equal(h['client-host'], undefined, 'as nginx: Client-Host for SMTP only');
  assert.equal(h['auth-ssl'], 'on');
  assert.equal(h['x-auth-key'], 's3cret');
});

test('OK with Auth-User and Auth-Pass: those are replayed on the backend instead', async () => {
  const config = setup();
  const { engine } = await engineFor(config);
  const c = connect(config, 'smtps', '203.0.113.6');
  const d = await engine.onAuth(login(c, creds('bob', 'whatever')), creds('bob', 'whatever'));
  assert.deepEqual(d.action === 'allow' && [d.credentials?.user, d.credentials?.password], ['bob*master', 'masterpw']);
  assert.equal(seen.at(-1)!.headers['auth-protocol'], 'smtp');
  assert.equal(seen.at(-1)!.headers['client-host'], '[UNAVAILABLE]');
});

test('a refusal waits Auth-Wait, is a bad login that counts toward brute force, and is answered from the negative cache next time', async () => {
  const config = setup('brute_force: { per_address_user: { failures: 2, window: 1m, ban: 1m } }');
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '203.0.113.7');
  const asked = seen.length;
  const started = Date.now();
  const d = await engine.onAuth(login(c, creds('carol', 'guess')), creds('carol', 'guess'));
  assert.deepEqual(d, { action: 'deny', code: 'bad-login', text: 'Authentication failed' });
  assert.ok(Date.now() - started >= 950, 'the client waited the Auth-Wait second');
  assert.equal(seen.length, asked + 1);
  const again = await engine.onAuth(login(c, creds('carol', 'guess')), creds('carol', 'guess'));
  assert.equal(again.action, 'deny');
  assert.ok(Date.now() - started >= 1900, 'the cached refusal waits as long as the service asked');
  assert.equal(seen.length, asked + 1, 'the same wrong password from the same address did not reach the service');
  const banned = await engine.onAuth(login(c, creds('carol', 'other')), creds('carol', 'other'));
  assert.equal(banned.action === 'tempfail' && banned.code, 'banned', 'two refusals banned the pair');
});

test('the negative cache is bounded: the oldest refusal is forgotten first', async () => {
  const config = setup();
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '203.0.113.8');
  answers.carol!.headers['Auth-Wait'] = '0';
  try {
    for (const pw of ['a', 'b', 'c']) await engine.onAuth(login(c, creds('carol', pw)), creds('carol', pw));
    const asked = seen.length;
    await engine.onAuth(login(c, creds('carol', 'c')), creds('carol', 'c'));
    assert.equal(seen.length, asked, 'the newest is cached');
    await engine.onAuth(login(c, creds('carol', 'a')), creds('carol', 'a'));
    assert.equal(seen.length, asked + 1, 'the oldest of three (size 2) was forgotten');
  } finally {
    answers.carol!.headers['Auth-Wait'] = '1';
  }
});

test('a temporary refusal (Auth-Error-Code 4xx) is a tempfail and is not cached', async () => {
  const config = setup();
  const { engine } = await engineFor(config);
  const c = connect(config, 'smtps', '203.0.113.9');
  for (let i = 0; i < 2; i++) {
    const asked = seen.length;
    const d = await engine.onAuth(login(c, creds('dave', 'pw')), creds('dave', 'pw'));
    assert.equal(d.action === 'tempfail' && d.code, 'auth-unavailable');
    assert.equal(seen.length, asked + 1);
  }
});

test('the service down, slow, failing or vague gives a temporary failure, never a pass; the log names why without the password', async () => {
  const { log, lines } = memoryLog();
  const config = setup();
  const { engine } = await engineFor(config, { log });
  const c = connect(config, 'imaps', '203.0.113.10');
  for (const user of ['slow', 'broken', 'noserver', 'silent']) {
    const d = await engine.onAuth(login(c, creds(user, 'hunter2-secret')), creds(user, 'hunter2-secret'));
    assert.equal(d.action === 'tempfail' && d.code, 'auth-unavailable', user);
  }
  const down = configFrom(`
auth_http: { url: "http://127.0.0.1:1/auth", timeout: 500ms }
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: http }
`);
  const e2 = (await engineFor(down, { log })).engine;
  const d = await e2.onAuth(login(connect(down, 'imaps', '203.0.113.11'), creds('alice', 'hunter2-secret')), creds('alice', 'hunter2-secret'));
  assert.equal(d.action === 'tempfail' && d.code, 'auth-unavailable');
  const text = JSON.stringify(lines);
  for (const why of ['no answer within 1000 ms', 'HTTP status 500', 'without Auth-Server', 'no Auth-Status', 'ECONNREFUSED']) assert.ok(text.includes(why), why);
  assert.ok(!text.includes('hunter2'), 'no password in the log');
});

test('requests share a small keep-alive pool: one after another, they reuse one connection', async () => {
  const config = setup();
  const { engine } = await engineFor(config);
  const c = connect(config, 'imaps', '203.0.113.12');
  const from = seen.length;
  for (let i = 0; i < 4; i++) await engine.onAuth(login(c, creds('alice', 'pw')), creds('alice', 'pw'));
  const used = new Set(seen.slice(from).map((s) => s.socket));
  assert.equal(used.size, 1);
});

test('Auth-User and Auth-Pass are escaped as nginx does (control bytes, space, % and bytes from 0x7f)', () => {
  assert.equal(escapeLikeNginx(Buffer.from('a b%c\x01\x7f+/@:é', 'utf8')), 'a%20b%25c%01%7F+/@:%C3%A9');
});

test('authentication: http without an auth_http section, or on an SMTP listener without auth, is refused with its file and line', () => {
  assert.throws(
    () => configFrom(`listeners:\n  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: http }\n`),
    /listeners\[0\]\.authentication: http needs an auth_http section/,
  );
  assert.throws(
    () => configFrom(`auth_http: { url: "http://127.0.0.1:9/" }\nlisteners:\n  - { name: mx, protocol: smtp, listen: "127.0.0.1:0", tls: none, auth: none, backend: "10.0.0.1:25", authentication: http }\n`),
    /auth: none has none/,
  );
  assert.throws(() => configFrom(`auth_http: { url: "ftp://x/" }\n`), /auth_http\.url/);
});
