/**
 * Access policy end to end: local users (hashes made by `mailgate
 * hash-password`), access rules, per-user routing, brute-force bans (guesses
 * that hang up before the backend's delayed verdict included) and rate
 * limits, through the real daemon to real backends (Dovecots, smtp-sink,
 * nginx), driven by Python's imaplib/poplib/smtplib, curl and a TLS line client.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlClient } from '../../src/control/client.ts';
import { imapLoginFrom, LineClient, python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, startNginx, startSmtpSink, userByName, type Dovecot, type Nginx, type SmtpServer } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

let dovecot: Dovecot;
let migrated: Dovecot;
let sink: SmtpServer;
let nginx: Nginx;
let gw: Gateway;
const alice = userByName('alice');
const bob = userByName('bob');
const carol = userByName('carol');
const dave = userByName('dave');

/** A hash from the real CLI verb, the password on standard input. */
async function hashOf(password: string): Promise<string> {
  const r = await run(process.execPath, [CLI, 'hash-password'], { input: `${password}\n` });
  assert.equal(r.code, 0, r.stderr);
  const hash = r.stdout.trim();
  assert.match(hash, /^\$scrypt\$ln=15,r=8,p=3\$/);
  return hash;
}

const PAIR_BAN_S = 6;

before(async () => {
  [dovecot, migrated, sink, nginx] = await Promise.all([startDovecot(), startDovecot(), startSmtpSink(), startNginx()]);
  const list = await Promise.all([alice, bob, carol, dave].map(async (u) => ({ name: u.name, password_hash: await hashOf(u.password) })));
  gw = await startGateway({
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}`, authentication: 'local' },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}`, authentication: 'local' },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${sink.port}`, auth: 'required', authentication: 'local', backend_login: 'none' },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${nginx.port}` },
    ],
    extra: {
      users: { list },
      routes: [{ users: ['bob'], listeners: ['imaps'], backend: `127.0.0.1:${migrated.imapPort}` }],
      access: { default: 'allow', rules: [{ action: 'deny', addresses: ['127.0.0.66/32'], reason: 'Blocked by the test rule' }] },
      brute_force: {
        per_address: { failures: 100, window: '1m', ban: '1m' },
        per_address_user: { failures: 3, window: '1m', ban: `${PAIR_BAN_S}s` },
        per_user: { failures: 100, window: '1m', ban: '1m' },
      },
      rate_limits: [
        { limit: 'messages', per: 'user', max: 2, window: '1h', listeners: ['smtps'] },
        { limit: 'connections', per: 'address', max: 3, window: '1m', listeners: ['https'] },
      ],
    },
  });
});

after(async () => {
  await gw?.stop();
  await Promise.all([dovecot?.stop(), migrated?.stop(), sink?.stop(), nginx?.stop()]);
});

interface ImapResult {
  ok: boolean;
  error?: string;
  exists?: string;
}

function imapLogin(port: number, user: string, password: string): Promise<ImapResult> {
  return python<ImapResult>(
    `
import imaplib
m = imaplib.IMAP4_SSL('127.0.0.1', int(sys.argv[1]), ssl_context=ctx(), timeout=10)
try:
    m.login(sys.argv[2], sys.argv[3])
except imaplib.IMAP4.error as e:
    out({'ok': False, 'error': str(e)})
    sys.exit(0)
typ, n = m.select('INBOX', readonly=True)
m.logout()
out({'ok': True, 'exists': n[0].decode()})
`,
    [port, user, password],
  );
}

async function backendLog(d: Dovecot): Promise<string> {
  return d.logs();
}

test('a local user logs in over IMAPS, POP3S and SMTPS; the SMTP backend is asked for no AUTH', async () => {
  const imap = await imapLogin(gw.ports.imaps!, alice.name, alice.password);
  assert.equal(imap.ok, true, imap.error);
  const pop = await python<{ stat: number[]; quit: string }>(
    `
import poplib
p = poplib.POP3_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
p.user(sys.argv[2])
p.pass_(sys.argv[3])
stat = p.stat()
out({'stat': list(stat), 'quit': p.quit().decode()})
`,
    [gw.ports.pop3s!, alice.name, alice.password],
  );
  assert.ok(pop.stat[0]! >= 1, 'alice has mail');
  assert.match(pop.quit, /^\+OK/);
  const marker = `policy-${Date.now()}`;
  const smtp = await python<{ login: number; sent: object }>(
    `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
code, _ = s.login(sys.argv[2], sys.argv[3])
sent = s.sendmail('alice@e2e.test', ['someone@elsewhere.example'], 'Subject: %s\\r\\n\\r\\nhello\\r\\n' % sys.argv[4])
s.quit()
out({'login': code, 'sent': sent})
`,
    [gw.ports.smtps!, alice.name, alice.password, marker],
  );
  assert.equal(smtp.login, 235);
  assert.deepEqual(smtp.sent, {});
  const msgs = await sink.waitForMessages(1);
  assert.ok(msgs.some((m) => m.includes(marker)));
  assert.doesNotMatch(await sink.logs(), /AUTH (PLAIN|LOGIN) /, 'the gateway sent no AUTH to the sink');
});

test('a wrong password is refused by the gateway before any backend sees the credentials', async () => {
  const r = await imapLogin(gw.ports.imaps!, carol.name, 'not-her-password');
  assert.equal(r.ok, false);
  assert.match(r.error ?? '', /AUTHENTICATIONFAILED/);
  const smtp = await python<{ code: number }>(
    `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
try:
    s.login(sys.argv[2], 'wrong')
    out({'code': 235})
except smtplib.SMTPAuthenticationError as e:
    out({'code': e.smtp_code})
`,
    [gw.ports.smtps!, carol.name],
  );
  assert.equal(smtp.code, 535);
  assert.doesNotMatch(await backendLog(dovecot), /user=<carol>/, 'Dovecot never saw a login for carol');
  await gw.waitForLog((l) => l.msg === 'login refused by policy' && l.user === carol.name);
});

test('a denied address gets a refusal and nothing else (IMAPS line client, HTTPS curl)', async () => {
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true, localAddress: '127.0.0.66' });
  assert.equal(await c.readLine(), '* BYE [AUTHORIZATIONFAILED] Blocked by the test rule');
  await c.closedPromise;
  const r = await run('curl', ['-sS', '-k', '--interface', '127.0.0.66', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${gw.ports.https}/`]);
  assert.equal(r.stdout, '403');
});

test('a routed user lands on the second backend, the others on the listener default', async () => {
  const r = await imapLogin(gw.ports.imaps!, bob.name, bob.password);
  assert.equal(r.ok, true, r.error);
  assert.match(await backendLog(migrated), /Login: user=<bob>/);
  assert.doesNotMatch(await backendLog(dovecot), /Login: user=<bob>/);
  assert.doesNotMatch(await backendLog(migrated), /Login: user=<alice>/);
});

test('3 failed logins ban the user from that address: the right password cannot pass, across a reload, until the ban ends', async () => {
  for (let i = 0; i < 3; i++) {
    const r = await imapLogin(gw.ports.imaps!, dave.name, `guess-${i}`);
    assert.match(r.error ?? '', /AUTHENTICATIONFAILED/, `attempt ${i + 1}`);
  }
  const bannedAt = Date.now();
  const refused = await imapLogin(gw.ports.imaps!, dave.name, dave.password);
  assert.equal(refused.ok, false);
  assert.match(refused.error ?? '', /UNAVAILABLE.*Too many failed logins/);
  assert.equal((await imapLogin(gw.ports.imaps!, alice.name, alice.password)).ok, true, 'other users from the same address are fine');

  gw.signal('SIGHUP');
  await gw.waitForLog((l) => l.msg === 'configuration reloaded');
  const afterReload = await imapLogin(gw.ports.imaps!, dave.name, dave.password);
  assert.match(afterReload.error ?? '', /Too many failed logins/, 'the ban survived the reload');

  await sleep(Math.max(0, bannedAt + PAIR_BAN_S * 1000 + 300 - Date.now()));
  const later = await imapLogin(gw.ports.imaps!, dave.name, dave.password);
  assert.equal(later.ok, true, later.error);
});

test('guesses whose clients hang up before the backend answers are counted all the same, and ban the address (issue 17)', async () => {
  // Dovecot answers a wrong password after 2 s (its default auth_failure_delay); each client is gone after 0.3 s.
  const slow = await startDovecot({ authFailureDelay: '2s' });
  const g = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${slow.imapPort}` }],
    extra: {
      brute_force: {
        per_address: { failures: 5, window: '1m', ban: '1m' },
        per_address_user: { failures: 100, window: '1m', ban: '1m' },
        per_user: { failures: 100, window: '1m', ban: '1m' },
      },
    },
  });
  try {
    const from = '127.0.0.77';
    for (let i = 0; i < 6; i++) {
      const c = await LineClient.connect(g.ports.imaps!, { tls: true, localAddress: from });
      assert.match(await c.readLine(), /^\* OK /, `guess ${i + 1} was let in`);
      c.write(`a LOGIN ${dave.name} guess-${i}\r\n`);
      await sleep(300);
      c.close();
    }
    const banned = await waitFor(
      'the address to be banned',
      async () => {
        const c = await LineClient.connect(g.ports.imaps!, { tls: true, localAddress: from });
        const first = await c.readLine();
        c.close();
        return /^\* BYE \[UNAVAILABLE\] Too many failed logins/.test(first) ? first : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 500 },
    );
    assert.match(banned, /Too many failed logins/);
    const counted = (await g.logs()).filter((l) => l.msg === 'login failed' && l.client === from && l.clientGone === true);
    assert.ok(counted.length >= 5, `${counted.length} verdicts counted after the client had gone`);
    assert.equal((await imapLogin(g.ports.imaps!, alice.name, alice.password)).ok, true, 'another address is not banned');
  } finally {
    await g.stop();
    await slow.stop();
  }
});

test('the SMTP message limit: the second message is accepted, then 421; a new login is refused with 454', async () => {
  const before = (await sink.messages()).length;
  const r = await python<{ first: object; second: object; third: number; relogin: number }>(
    `
import smtplib
def session():
    s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
    s.login(sys.argv[2], sys.argv[3])
    return s
s = session()
msg = 'Subject: limit\\r\\n\\r\\nbody\\r\\n'
first = s.sendmail('carol@e2e.test', ['x@elsewhere.example'], msg)
second = s.sendmail('carol@e2e.test', ['y@elsewhere.example'], msg)
try:
    s.sendmail('carol@e2e.test', ['z@elsewhere.example'], msg)
    third = 250
except smtplib.SMTPSenderRefused as e:
    third = e.smtp_code
except smtplib.SMTPServerDisconnected:
    third = -1
try:
    session()
    relogin = 235
except smtplib.SMTPAuthenticationError as e:
    relogin = e.smtp_code
out({'first': first, 'second': second, 'third': third, 'relogin': relogin})
`,
    [gw.ports.smtps!, carol.name, carol.password],
  );
  assert.deepEqual(r.first, {});
  assert.deepEqual(r.second, {}, 'the message that reaches the limit is accepted');
  assert.equal(r.third, 421);
  assert.equal(r.relogin, 454);
  await sink.waitForMessages(before + 2);
  await sleep(300);
  assert.equal((await sink.messages()).length, before + 2, 'exactly two messages went through');
});

test('the HTTPS connection limit per address answers 429 with Retry-After', async () => {
  const get = () => run('curl', ['-sS', '-k', '--interface', '127.0.0.77', '-o', '/dev/null', '-D', '-', '-w', '%{http_code}', `https://127.0.0.1:${gw.ports.https}/`]);
  for (let i = 0; i < 3; i++) assert.match((await get()).stdout, /200$/, `request ${i + 1}`);
  const limited = await get();
  assert.match(limited.stdout, /429$/);
  assert.match(limited.stdout, /^retry-after: \d+\r?$/im);
  const other = await run('curl', ['-sS', '-k', '--interface', '127.0.0.78', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${gw.ports.https}/`]);
  assert.equal(other.stdout, '200', 'another address is not limited');
});

test('HTTP requests per address on one keep-alive connection: 429 past the limit', async () => {
  const local = await startGateway({
    listeners: [{ name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${nginx.port}` }],
    extra: { rate_limits: [{ limit: 'http_requests', per: 'address', max: 3, window: '1m' }] },
  });
  try {
    const url = `https://127.0.0.1:${local.ports.https}/`;
    // One curl, one keep-alive connection, four requests (-o applies to one URL each).
    const r = await run('curl', ['-sS', '-k', '-w', '%{http_code}\\n', ...[1, 2, 3, 4].flatMap(() => ['-o', '/dev/null', url])]);
    assert.deepEqual(r.stdout.trim().split('\n'), ['200', '200', '200', '429']);
  } finally {
    await local.stop();
  }
});

test('a ban holds for every spelling Dovecot (%n) takes for the same account: brute-force pair and user bans, and one set by hand', async () => {
  // Dovecot itself: "dave@anything.invalid" and "Dave@EXAMPLE.org" are dave (auth_username_format %Lu, passdb %n).
  const direct = await python<{ a: string; b: string }>(
    `
import imaplib
r = {}
for k, u in (('a', sys.argv[2]), ('b', sys.argv[3])):
    m = imaplib.IMAP4('127.0.0.1', int(sys.argv[1]), timeout=10)
    r[k] = m.login(u, sys.argv[4])[0]
    m.logout()
out(r)
`,
    [dovecot.imapPort, 'dave@anything.invalid', 'Dave@EXAMPLE.org', dave.password],
  );
  assert.deepEqual(direct, { a: 'OK', b: 'OK' }, 'the backend maps both spellings to dave');

  const pass = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: {
      brute_force: {
        per_address: { failures: 100, window: '10m', ban: '10m' },
        per_address_user: { failures: 3, window: '10m', ban: '10m' },
        per_user: { failures: 4, window: '10m', ban: '10m' },
      },
    },
  });
  try {
    const port = pass.ports.imaps!;
    // Three wrong passwords for "dave" from one address: Dovecot refuses each, the gateway bans dave there.
    for (let i = 0; i < 3; i++) assert.match((await imapLoginFrom(port, 'dave', `guess-${i}`, '127.0.0.60')).error ?? '', /AUTHENTICATIONFAILED/);
    for (const spelling of ['dave', 'dave@anything.invalid', 'Dave@EXAMPLE.org']) {
      const r = await imapLoginFrom(port, spelling, dave.password, '127.0.0.60');
      assert.equal(r.ok, false, `${spelling} with the right password from the banned address`);
      assert.match(r.error ?? '', /UNAVAILABLE.*Too many failed logins/, spelling);
    }
    assert.equal((await imapLoginFrom(port, 'dave@example.org', dave.password, '127.0.0.61')).ok, true, 'another address is not banned');

    // A per-user ban: the fourth failure, from a second address and under another spelling, bans the account dave;
    // it holds where failures came from, for every spelling, and not at a clean address.
    assert.match((await imapLoginFrom(port, 'DAVE@guess.invalid', 'guess-4', '127.0.0.62')).error ?? '', /AUTHENTICATIONFAILED/);
    await pass.waitForLog((l) => l.msg === 'banned after failed logins' && l.ban === 'user' && l.user === 'dave');
    assert.match((await imapLoginFrom(port, 'dave@other.invalid', dave.password, '127.0.0.62')).error ?? '', /Too many failed logins/);
    assert.equal((await imapLoginFrom(port, 'dave', dave.password, '127.0.0.63')).ok, true, 'the real dave at a clean address');

    // By hand: ban the user alice everywhere from the control socket; no spelling passes, from any address.
    const c = await ControlClient.connect(join(pass.dir, 'control.sock'));
    try {
      const r = await c.request('ban', { user: 'alice', seconds: 600, reason: 'Account locked, call the helpdesk' });
      assert.deepEqual(r.bans.map((b) => b.id), ['user:alice']);
    } finally {
      c.close();
    }
    for (const spelling of ['alice', 'ALICE@anything.invalid', 'alice@example.org']) {
      const r = await imapLoginFrom(port, spelling, alice.password, '127.0.0.64');
      assert.equal(r.ok, false, spelling);
      assert.match(r.error ?? '', /UNAVAILABLE.*Account locked, call the helpdesk/, spelling);
    }
    const logins = (await dovecot.logs()).split('\n').filter((l) => /imap-login: Login: user=<(dave|alice)>.*rip=127\.0\.0\.6[024]/.test(l));
    assert.deepEqual(logins, [], 'no banned attempt reached Dovecot');
  } finally {
    await pass.stop();
  }
});

test('rate_limits exempt: a monitoring address passes a connection limit that refuses everyone else (IMAPS logins to Dovecot)', async () => {
  const limited = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: { rate_limits: [{ limit: 'connections', per: 'address', max: 3, window: '1m', exempt: ['127.0.0.80/32'] }] },
  });
  try {
    const port = limited.ports.imaps!;
    for (let i = 0; i < 8; i++) {
      const r = await imapLoginFrom(port, alice.name, alice.password, '127.0.0.80');
      assert.equal(r.ok, true, `monitoring check ${i + 1}: ${r.error ?? ''}`);
    }
    for (let i = 0; i < 3; i++) assert.equal((await imapLoginFrom(port, alice.name, alice.password, '127.0.0.81')).ok, true, `other address, connection ${i + 1}`);
    const c = await LineClient.connect(port, { tls: true, localAddress: '127.0.0.81' });
    assert.equal(await c.readLine(), '* BYE [UNAVAILABLE] Too many connections, try again later', 'the fourth from another address is refused');
    await c.closedPromise;
  } finally {
    await limited.stop();
  }
});

test('a backend that is down: quick retries each hear "backend unavailable", never "too many login attempts" (no verdict holds no attempt in flight)', async () => {
  const down = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: '127.0.0.1:1' }],
    extra: { brute_force: { per_address: { failures: 100, window: '1m', ban: '1m' }, per_address_user: { failures: 3, window: '1m', ban: '1m' }, per_user: { failures: 100, window: '1m', ban: '1m' } } },
  });
  try {
    for (let i = 0; i < 6; i++) {
      const c = await LineClient.connect(down.ports.imaps!, { tls: true });
      assert.match(await c.readLine(), /^\* OK/);
      c.write(`a${i} LOGIN dave guess${i}\r\n`);
      const answer = [await c.readLine(), await c.readLine()].join('\n');
      assert.match(answer, /BYE \[UNAVAILABLE\] Backend server unavailable/, `retry ${i + 1}: ${answer}`);
      assert.doesNotMatch(answer, /Too many login attempts/);
      c.close();
    }
  } finally {
    await down.stop();
  }
});
