/**
 * IMAP through the gateway against a real Dovecot, with real clients:
 * Python's imaplib, curl and openssl s_client, plus a byte-level client for
 * the injection and bounds checks.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LineClient, python, run } from './harness/clients.ts';
import { waitFor } from '../helpers/wait.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, mailboxBytes, startDovecot, userByName, type Dovecot } from './harness/servers.ts';

let dovecot: Dovecot;
let preauth: Dovecot;
let gw: Gateway;
const alice = userByName('alice');
const dave = userByName('dave');

before(async () => {
  dovecot = await startDovecot();
  preauth = await startDovecot({ preauth: true });
  const dead = await freePort();
  gw = await startGateway({
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'imap', protocol: 'imap', tls: 'starttls', backend: `127.0.0.1:${dovecot.imapPort}` },
      { name: 'dead', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dead}` },
      { name: 'preauth', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${preauth.imapPort}` },
      {
        name: 'tight',
        protocol: 'imap',
        tls: 'implicit',
        backend: `127.0.0.1:${dovecot.imapPort}`,
        timeouts: { tls_handshake: '1s', preauth_idle: '2s' },
        limits: { max_line: 1024 },
      },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await dovecot?.stop();
  await preauth?.stop();
});

test('imaplib over IMAPS: login, list, select and fetch every message byte-exact, logout', async () => {
  const r = await python<{ list: string[]; messages: string[]; logout: string }>(
    `
import imaplib
m = imaplib.IMAP4_SSL('127.0.0.1', int(sys.argv[1]), ssl_context=ctx())
m.login(sys.argv[2], sys.argv[3])
typ, boxes = m.list()
typ, n = m.select('INBOX', readonly=True)
msgs = []
for i in range(1, int(n[0]) + 1):
    typ, data = m.fetch(str(i), '(BODY.PEEK[])')
    msgs.append(base64.b64encode(data[0][1]).decode())
typ, bye = m.logout()
out({'list': [b.decode() for b in boxes], 'messages': msgs, 'logout': typ})
`,
    [gw.ports.imaps!, alice.name, alice.password, gw.certFile],
  );
  const want = mailboxBytes('alice').map((b) => b.toString('base64'));
  assert.ok(want.length >= 2, 'fixture has messages');
  assert.deepEqual(r.messages, want, 'every message arrives byte-exact');
  assert.ok(r.list.some((l) => l.includes('INBOX')));
  assert.equal(r.logout, 'BYE');
});

test('the certificate is the self-signed one for the configured host name, verified by openssl', async () => {
  const r = await run('openssl', ['s_client', '-connect', `127.0.0.1:${gw.ports.imaps}`, '-servername', gw.hostname, '-CAfile', gw.certFile, '-verify_return_error', '-brief'], {
    input: 'a LOGOUT\r\n',
  });
  assert.match(r.stderr + r.stdout, /Verification: OK/);
  assert.match(r.stderr + r.stdout, /Protocol version: TLSv1\.3/);
  const old = await run('openssl', ['s_client', '-connect', `127.0.0.1:${gw.ports.imaps}`, '-tls1_1', '-brief'], { input: '' });
  assert.notEqual(old.code, 0, 'TLS 1.1 is refused');
});

test('curl over imaps fetches a message byte-exact; over imap with --ssl-reqd it uses STARTTLS', async () => {
  const want = mailboxBytes('alice')[0]!;
  const base = ['-s', '--cacert', gw.certFile, '-u', `${alice.name}:${alice.password}`];
  const r1 = await run('curl', [...base, '--resolve', `${gw.hostname}:${gw.ports.imaps}:127.0.0.1`, `imaps://${gw.hostname}:${gw.ports.imaps}/INBOX;UID=1`], { encoding: 'latin1' });
  assert.equal(r1.code, 0, r1.stderr);
  assert.equal(Buffer.from(r1.stdout, 'latin1').toString('base64'), want.toString('base64'));
  const r2 = await run('curl', [...base, '--ssl-reqd', '--resolve', `${gw.hostname}:${gw.ports.imap}:127.0.0.1`, `imap://${gw.hostname}:${gw.ports.imap}/INBOX;UID=1`], { encoding: 'latin1' });
  assert.equal(r2.code, 0, r2.stderr);
  assert.equal(Buffer.from(r2.stdout, 'latin1').toString('base64'), want.toString('base64'));
});

test('STARTTLS listener: LOGINDISABLED before TLS, login after; a password with quotes and backslashes survives', async () => {
  const r = await python<{ before: string[]; after: string[]; login: string; refused: string }>(
    `
import imaplib
m = imaplib.IMAP4('127.0.0.1', int(sys.argv[1]))
before = list(m.capabilities)
try:
    m.login('x', 'y'); refused = 'no'
except imaplib.IMAP4.error as e:
    refused = str(e)
m.starttls(ssl_context=ctx())
after = list(m.capabilities)
typ, _ = m.login(sys.argv[2], sys.argv[3])
m.logout()
out({'before': before, 'after': after, 'login': typ, 'refused': refused})
`,
    [gw.ports.imap!, dave.name, dave.password],
  );
  assert.ok(r.before.includes('STARTTLS') && r.before.includes('LOGINDISABLED'));
  assert.ok(!r.after.includes('STARTTLS') && r.after.includes('AUTH=PLAIN'));
  assert.equal(r.login, 'OK');
  assert.match(r.refused, /PRIVACYREQUIRED|LOGINDISABLED|disabled/i);
});

test('AUTHENTICATE PLAIN with SASL-IR and wrong passwords answered in IMAP words', async () => {
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await c.readLine(), /^\* OK \[CAPABILITY .*AUTH=PLAIN/);
  c.write(`a AUTHENTICATE PLAIN ${Buffer.from(`\0${alice.name}\0wrong`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^a NO \[AUTHENTICATIONFAILED\]/);
  c.write(`b AUTHENTICATE PLAIN ${Buffer.from(`\0${alice.name}\0${alice.password}`).toString('base64')}\r\n`);
  const lines = await c.readUntil(/^b /);
  assert.match(lines.at(-1)!, /^b OK /);
  c.write('c SELECT INBOX\r\n');
  assert.match((await c.readUntil(/^c /)).at(-1)!, /^c OK/);
  c.close();
});

test('the backend learns the real client address through IMAP ID', async () => {
  // The client connects from 127.0.0.2; the gateway reaches Dovecot from 127.0.0.1.
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true, localAddress: '127.0.0.2' });
  await c.readLine();
  c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
  assert.match((await c.readUntil(/^a /)).at(-1)!, /^a OK/);
  c.write('b LOGOUT\r\n');
  await c.waitClosed();
  // Dovecot logs the ID line first; wait for the login line itself.
  const logs = await waitFor('Dovecot to log the login with the real client address', async () => {
    const t = await dovecot.logs();
    return /user=<alice>.*rip=127\.0\.0\.2/.test(t) && t;
  });
  assert.match(logs, /user=<alice>.*rip=127\.0\.0\.2/);
});

test('a dead backend gives * BYE [UNAVAILABLE] and the gateway goes on serving others', async () => {
  const c = await LineClient.connect(gw.ports.dead!, { tls: true });
  assert.match(await c.readLine(), /^\* OK/);
  c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
  const lines = await c.readUntil(/^a /);
  assert.match(lines.join('\n'), /^\* BYE \[UNAVAILABLE\]/m);
  assert.match(lines.at(-1)!, /^a NO \[UNAVAILABLE\]/);
  assert.ok(await c.waitClosed());
  const ok = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await ok.readLine(), /^\* OK/);
  ok.close();
});

test('a backend PREAUTH greeting is never passed to an unauthenticated client', async () => {
  const c = await LineClient.connect(gw.ports.preauth!, { tls: true });
  const greeting = await c.readLine();
  assert.match(greeting, /^\* OK/);
  c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
  const lines = await c.readUntil(/^a /);
  assert.doesNotMatch(lines.join('\n'), /PREAUTH/);
  assert.match(lines.at(-1)!, /^a NO \[UNAVAILABLE\]/);
});

test('STARTTLS command injection: commands sent with STARTTLS in plaintext are discarded', async () => {
  const c = await LineClient.connect(gw.ports.imap!);
  await c.readLine();
  c.write('a STARTTLS\r\nb CAPABILITY\r\nc LOGOUT\r\n');
  assert.equal(await c.readLine(), 'a OK Begin TLS negotiation now');
  await c.startTls();
  assert.equal(await c.readFor(300), '', 'nothing answers the injected commands');
  c.write('d NOOP\r\n');
  assert.equal(await c.readLine(), 'd OK NOOP completed');
  c.close();
});

test('an overlong line gets * BYE [TOOBIG] and the connection is closed', async () => {
  const c = await LineClient.connect(gw.ports.tight!, { tls: true });
  await c.readLine();
  c.write(`a LOGIN ${'x'.repeat(5000)}`);
  assert.equal(await c.readLine(), '* BYE [TOOBIG] Line too long');
  assert.ok(await c.waitClosed());
});

test('garbage bytes get BAD answers, then the command bound closes the session; the daemon survives', async () => {
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
  await c.readLine();
  const garbage = Buffer.alloc(4000);
  for (let i = 0; i < garbage.length; i++) garbage[i] = (i * 7919 + 13) % 256;
  c.write(garbage);
  c.write('\r\n'.repeat(60));
  const lines = await c.readUntil(/^\* BYE/, 5000);
  assert.ok(lines.some((l) => / BAD /.test(l)));
  assert.ok(await c.waitClosed());
  const ok = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await ok.readLine(), /^\* OK/);
  ok.close();
});

test('a client that stalls the TLS handshake is cut off at the handshake deadline', async () => {
  const c = await LineClient.connect(gw.ports.tight!);
  c.write(Buffer.from([0x16, 0x03, 0x01])); // the start of a ClientHello, then nothing
  assert.ok(await c.waitClosed(6000), 'closed by the 1 s handshake deadline');
  const logs = await gw.waitForLog((l) => l.msg === 'session end' && l.reason === 'tls-handshake-timeout');
  assert.equal(logs.listener, 'tight');
});

test('a silent client after the greeting is closed at the pre-auth idle deadline with BYE', async () => {
  const c = await LineClient.connect(gw.ports.tight!, { tls: true });
  await c.readLine();
  assert.equal(await c.readLine(8000), '* BYE Idle timeout, closing');
  assert.ok(await c.waitClosed());
});

test('an HTTPS client sent to an IMAP port is refused at the TLS handshake (ALPACA)', async () => {
  await assert.rejects(LineClient.connect(gw.ports.imaps!, { tls: true, alpn: ['http/1.1'] }), /no_application_protocol|NO_APPLICATION_PROTOCOL|alert/i);
  const ok = await LineClient.connect(gw.ports.imaps!, { tls: true, alpn: ['imap'] });
  assert.match(await ok.readLine(), /^\* OK/);
  ok.close();
});

test('the session end is logged with user, backend, TLS, bytes and reason, and no password', async () => {
  const line = await gw.waitForLog((l) => l.msg === 'session end' && l.user === 'alice' && l.listener === 'imaps');
  assert.equal(line.backend, `127.0.0.1:${dovecot.imapPort}`);
  assert.match(String(line.tls), /^TLSv1\.[23]$/);
  assert.ok(Number(line.bytesIn) > 0 && Number(line.bytesOut) > 0);
  assert.ok(typeof line.reason === 'string');
  const raw = await gw.rawLogs();
  for (const u of [alice, dave]) assert.ok(!raw.includes(u.password), `password of ${u.name} never logged`);
});
