/**
 * SMTP through the gateway: submission to a real Postfix (SASL via Dovecot)
 * with swaks, smtplib and curl; MX traffic to Postfix's smtp-sink with XCLIENT;
 * what a logged-in client may not do (gateway-only commands, bare CR/LF in
 * content, recipients past a limit) against a Postfix that would let it; how
 * an access rule's refusal of AUTH reads.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { LineClient, python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startPostfix, startSmtpSink, userByName, type Postfix, type SmtpServer } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

let postfix: Postfix;
let sink: SmtpServer;
let gw: Gateway;
const alice = userByName('alice');
const bob = userByName('bob');
const carol = userByName('carol');
const dave = userByName('dave');

/** Recipients per user on the `limited` listener. */
const RECIPIENT_LIMIT = 2;

before(async () => {
  // smtpd_forbid_bare_newline = no: this Postfix takes <LF>.<LF> for the end of DATA (SMTP smuggling).
  postfix = await startPostfix({ acceptBareNewline: true });
  sink = await startSmtpSink({ xclient: true });
  const dead = await freePort();
  const hash = await run(process.execPath, [CLI, 'hash-password'], { input: `${dave.password}\n` });
  assert.equal(hash.code, 0, hash.stderr);
  gw = await startGateway({
    extra: {
      users: { list: [{ name: dave.name, password_hash: hash.stdout.trim() }] },
      rate_limits: [{ limit: 'recipients', per: 'user', max: RECIPIENT_LIMIT, window: '1h', listeners: ['limited'] }],
      // Rules at login on the `ruled` listener only: with a reason of their own, and without.
      access: {
        default: 'allow',
        rules: [
          { action: 'deny', listeners: ['ruled'], users: [carol.name], reason: 'Carol sends through mail2.example.org now' },
          { action: 'tempfail', listeners: ['ruled'], users: [dave.name], reason: 'Maintenance until 18:00 UTC' },
          { action: 'deny', listeners: ['ruled'], users: [bob.name] },
        ],
      },
    },
    listeners: [
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${postfix.port}`, auth: 'none', xclient: true },
      { name: 'sink', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${sink.port}`, auth: 'none', xclient: true, greet_delay: '1s' },
      { name: 'dead', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${dead}`, auth: 'required' },
      { name: 'limited', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      { name: 'ruled', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      // mailgate checks the password and Postfix gets no login and no XCLIENT: its session is not authenticated.
      {
        name: 'local',
        protocol: 'smtp',
        tls: 'implicit',
        backend: `127.0.0.1:${postfix.port}`,
        auth: 'required',
        authentication: 'local',
        backend_login: 'none',
        xclient: false,
      },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await postfix?.stop();
  await sink?.stop();
});

/** A message with a unique marker, dot-leading lines and 8-bit text, CRLF throughout. */
function message(marker: string): Buffer {
  const body = [
    `From: alice@e2e.test`,
    `To: someone@elsewhere.example`,
    `Subject: gateway test ${marker}`,
    `Message-ID: <${marker}@e2e.test>`,
    '',
    'Hello through mailgate.',
    '.a line starting with a dot',
    '..two dots',
    `payload ${randomBytes(600).toString('base64')}`,
    'Gr\xfc\xdfe',
    '',
  ].join('\r\n');
  return Buffer.from(body, 'latin1');
}

function delivered(server: SmtpServer, marker: string): Promise<Buffer> {
  return waitFor(`message ${marker} to arrive`, async () => (await server.messages()).find((m) => m.includes(marker)), { timeoutMs: 10_000, intervalMs: 50 });
}

test('swaks over SMTPS with AUTH PLAIN: the message reaches Postfix byte-exact', async () => {
  const marker = `swaks-${randomBytes(4).toString('hex')}`;
  const file = join(gw.dir, `${marker}.eml`);
  const msg = message(marker);
  await writeFile(file, msg);
  const r = await run('swaks', [
    '--server', '127.0.0.1', '--port', String(gw.ports.smtps), '--tlsc',
    '--auth', 'PLAIN', '--auth-user', alice.name, '--auth-password', alice.password,
    '--from', 'alice@e2e.test', '--to', 'someone@elsewhere.example', '--data', file,
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const got = await delivered(postfix, marker);
  // swaks ends the DATA it reads from a file with one more CRLF of its own; everything before is untouched.
  assert.deepEqual(got.subarray(0, msg.length), msg);
  assert.equal(got.subarray(msg.length).toString(), '\r\n');
});

test('smtplib on the submission port: STARTTLS, AUTH LOGIN, sendmail; the message arrives byte-exact', async () => {
  const marker = `smtplib-${randomBytes(4).toString('hex')}`;
  const msg = message(marker);
  const r = await python<{ ehlo_plain: string; ehlo_tls: string; refused: number }>(
    `
import smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
s.ehlo('client.example')
ehlo_plain = s.ehlo_resp.decode()
try:
    s.docmd('AUTH', 'PLAIN ' + base64.b64encode(b'\\0x\\0y').decode()); refused = s.docmd('NOOP')[0]
except smtplib.SMTPException: refused = -1
code, _ = s.docmd('AUTH', 'PLAIN ' + base64.b64encode(b'\\0x\\0y').decode())
s.starttls(context=ctx())
s.ehlo('client.example')
ehlo_tls = s.ehlo_resp.decode()
s.login(sys.argv[2], sys.argv[3])
s.sendmail('alice@e2e.test', ['someone@elsewhere.example'], base64.b64decode(sys.argv[4]))
s.quit()
out({'ehlo_plain': ehlo_plain, 'ehlo_tls': ehlo_tls, 'refused': code})
`,
    [gw.ports.submission!, alice.name, alice.password, msg.toString('base64')],
  );
  assert.match(r.ehlo_plain, /STARTTLS/);
  assert.doesNotMatch(r.ehlo_plain, /AUTH/, 'no AUTH offered before TLS');
  assert.equal(r.refused, 530);
  assert.match(r.ehlo_tls, /AUTH PLAIN LOGIN/);
  assert.doesNotMatch(r.ehlo_tls, /STARTTLS|XCLIENT/);
  assert.deepEqual(await delivered(postfix, marker), msg);
});

test('curl smtps and smtp --ssl-reqd send mail; a wrong password gets 535', async () => {
  const marker = `curl-${randomBytes(4).toString('hex')}`;
  const file = join(gw.dir, `${marker}.eml`);
  await writeFile(file, message(marker));
  const args = ['-sS', '-k', '--mail-from', 'alice@e2e.test', '--mail-rcpt', 'someone@elsewhere.example', '-T', file];
  const ok = await run('curl', [...args, '-u', `${alice.name}:${alice.password}`, `smtps://127.0.0.1:${gw.ports.smtps}`]);
  assert.equal(ok.code, 0, ok.stderr);
  await delivered(postfix, marker);
  const starttls = await run('curl', [...args, '--ssl-reqd', '-u', `${alice.name}:${alice.password}`, `smtp://127.0.0.1:${gw.ports.submission}`]);
  assert.equal(starttls.code, 0, starttls.stderr);
  const bad = await run('curl', [...args, '-v', '-u', `${alice.name}:wrong`, `smtps://127.0.0.1:${gw.ports.smtps}`]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /< 535 5\.7\.8/);
});

test('AUTH refused by an access rule shows the rule\'s reason; without one it reads like a wrong password (smtplib, real Postfix) (issue 17)', async () => {
  const r = await python<Record<string, [number, string]>>(
    `
import smtplib
def login(user, password):
    s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
    try:
        s.login(user, password)
        return [235, '']
    except smtplib.SMTPAuthenticationError as e:
        return [e.smtp_code, e.smtp_error.decode()]
    finally:
        s.close()
out({
    'rule with a reason': login(sys.argv[2], sys.argv[3]),
    'tempfail rule with a reason': login(sys.argv[4], sys.argv[5]),
    'rule without a reason': login(sys.argv[6], sys.argv[7]),
    'wrong password (Postfix)': login(sys.argv[8], 'not-the-password'),
    'unknown user (Postfix)': login('nobody-at-all', 'whatever'),
})
`,
    [gw.ports.ruled!, carol.name, carol.password, dave.name, dave.password, bob.name, bob.password, alice.name],
  );
  assert.deepEqual(r['rule with a reason'], [535, '5.7.8 Carol sends through mail2.example.org now']);
  assert.deepEqual(r['tempfail rule with a reason'], [454, '4.7.0 Maintenance until 18:00 UTC']);
  assert.deepEqual(r['wrong password (Postfix)'], [535, '5.7.8 Authentication credentials invalid']);
  assert.deepEqual(r['unknown user (Postfix)'], r['wrong password (Postfix)'], 'an unknown user and a wrong password read alike');
  assert.deepEqual(r['rule without a reason'], r['wrong password (Postfix)'], 'a rule without a reason reads like a wrong password');
});

test('MAIL before AUTH on a submission listener is refused with 530; the backend never saw it', async () => {
  const c = await LineClient.connect(gw.ports.smtps!, { tls: true });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO client.example\r\n');
  await c.readUntil(/^250 /);
  c.write('MAIL FROM:<spammer@example.com>\r\n');
  assert.match(await c.readLine(), /^530 5\.7\.0/);
  c.write('QUIT\r\n');
  assert.match(await c.readLine(), /^221 /);
});

test('MX listener without auth: Postfix gets the session with XCLIENT carrying the real client address', async () => {
  const marker = `mx-${randomBytes(4).toString('hex')}`;
  const c = await LineClient.connect(gw.ports.mx!, { localAddress: '127.0.0.4' });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO mx.sender.example\r\n');
  const ehlo = await c.readUntil(/^250 /);
  assert.ok(ehlo.some((l) => /STARTTLS/.test(l)));
  c.write('MAIL FROM:<a@sender.example>\r\n');
  assert.match(await c.readLine(), /^250/);
  c.write('RCPT TO:<b@e2e.test>\r\nDATA\r\n');
  assert.match(await c.readLine(), /^250/);
  assert.match(await c.readLine(), /^354/);
  c.write(`Subject: ${marker}\r\n\r\nhello\r\n.\r\nQUIT\r\n`);
  assert.match(await c.readLine(), /^250/);
  assert.match(await c.readLine(), /^221/);
  await delivered(postfix, marker);
  const logs = await postfix.logs();
  assert.match(logs, /client=[^\n]*\[127\.0\.0\.4\]/, 'Postfix logged the real client, not the gateway');
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'mx' && l.client === '127.0.0.4');
  assert.equal(end.messages, 1);
  assert.equal(end.recipients, 1);
});

test('an SMTP client that talks before the greeting is refused with 554 (greet_delay)', async () => {
  const c = await LineClient.connect(gw.ports.sink!);
  c.write('EHLO too.early\r\n');
  assert.match(await c.readLine(), /^554 5\.5\.1/);
  assert.ok(await c.waitClosed());
  const polite = await LineClient.connect(gw.ports.sink!);
  assert.match(await polite.readLine(), /^220 /, 'a client that waits is greeted after the delay');
  polite.write('QUIT\r\n');
  assert.match(await polite.readLine(), /^221/);
});

test('a session forwarded as is to a sink without ADDR support keeps working (XCLIENT HELO only)', async () => {
  const marker = `sink-${randomBytes(4).toString('hex')}`;
  const r = await python<{ code: number }>(
    `
import smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
s.starttls(context=ctx())
s.sendmail('a@sender.example', ['b@e2e.test', 'c@e2e.test'], ('Subject: ' + sys.argv[2] + '\\r\\n\\r\\nbody\\r\\n').encode())
code = s.quit()[0]
out({'code': code})
`,
    [gw.ports.sink!, marker],
  );
  assert.equal(r.code, 221);
  await delivered(sink, marker);
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'sink' && l.recipients === 2);
  assert.equal(end.messages, 1);
  assert.equal(end.tls, 'TLSv1.3');
});

test('a dead backend answers AUTH with 421 and closes', async () => {
  const c = await LineClient.connect(gw.ports.dead!, { tls: true });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO client.example\r\n');
  await c.readUntil(/^250 /);
  c.write(`AUTH PLAIN ${Buffer.from(`\0${alice.name}\0${alice.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^421 4\.4\.1/);
  assert.ok(await c.waitClosed());
});

test('PIPELINING and BDAT/CHUNKING through the gateway: Postfix receives the chunks byte-exact, the gateway counts them', async () => {
  const marker = `bdat-${randomBytes(4).toString('hex')}`;
  const c = await LineClient.connect(gw.ports.smtps!, { tls: true, localAddress: '127.0.0.5' });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO client.example\r\n');
  const ehlo = await c.readUntil(/^250 /);
  assert.ok(ehlo.some((l) => /CHUNKING/.test(l)) && ehlo.some((l) => /PIPELINING/.test(l)), ehlo.join('\n'));
  c.write(`AUTH PLAIN ${Buffer.from(`\0${alice.name}\0${alice.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^235 /);
  // One chunk holds what would end a DATA transaction; BDAT carries it as bytes.
  const part1 = Buffer.from(`Subject: ${marker}\r\n\r\nfirst chunk\r\n.\r\n`);
  const part2 = Buffer.from('second chunk\r\n');
  c.write(
    Buffer.concat([
      Buffer.from('MAIL FROM:<alice@e2e.test>\r\nRCPT TO:<one@elsewhere.example>\r\nRCPT TO:<two@elsewhere.example>\r\n'),
      Buffer.from(`BDAT ${part1.length}\r\n`),
      part1,
      Buffer.from(`BDAT ${part2.length} LAST\r\n`),
      part2,
    ]),
  );
  for (const expect of [/^250 /, /^250 /, /^250 /, /^250 /, /^250 /]) assert.match(await c.readLine(), expect);
  c.write('QUIT\r\n');
  assert.match(await c.readLine(), /^221 /);
  const got = await delivered(postfix, marker);
  assert.deepEqual(got, Buffer.concat([part1, part2]));
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.client === '127.0.0.5');
  assert.equal(end.messages, 1);
  assert.equal(end.recipients, 2);
});

// ---- after login: what only the gateway may say, and what no client may send (issue 17) ----

/** An SMTPS session through the gateway, logged in with AUTH PLAIN (the EHLO reply before it is returned). */
async function loggedIn(port: number, user: { name: string; password: string }, localAddress: string): Promise<LineClient> {
  const c = await LineClient.connect(port, { tls: true, localAddress });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO client.example\r\n');
  await c.readUntil(/^250 /);
  c.write(`AUTH PLAIN ${Buffer.from(`\0${user.name}\0${user.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^235 /);
  return c;
}

/** The gateway-only EHLO keywords; none may reach a client after login. */
const GATEWAY_ONLY = /^250[ -](XCLIENT|XFORWARD|AUTH|STARTTLS|BINARYMIME)\b/i;

test('Postfix itself checks XCLIENT against the client address in force, and XFORWARD once per connection', async () => {
  // What the gateway's XCLIENT (protocols/smtp.ts) and its refusals after login (smtp-relay.ts) rely on,
  // asked of the real Postfix, with 127.0.0.0/8 authorised for both.
  const c = await LineClient.connect(postfix.port);
  assert.match(await c.readLine(), /^220 /);
  const say = async (line: string) => {
    c.write(`${line}\r\n`);
    return (await c.readUntil(/^\d{3} /)).join('\n');
  };
  assert.match(await say('EHLO gw.example'), /^250-XCLIENT /m);
  assert.match(await say('XCLIENT ADDR=127.0.0.9 HELO=one.example'), /^220 /, 'the gateway (127.0.0.1) is authorised');
  assert.match(await say('XCLIENT HELO=two.example'), /^220 /, '127.0.0.9, now in force, is authorised too');
  assert.match(await say('XCLIENT ADDR=203.0.113.9'), /^220 /);
  assert.match(await say('XCLIENT HELO=three.example'), /^550 5\.7\.0 Error: insufficient authorization/, '203.0.113.9 is not');
  assert.match(await say('XFORWARD ADDR=7.7.7.7'), /^250 /, 'XFORWARD still is: decided by the connection');
  c.write('QUIT\r\n');
  c.close();
});

test('after login the client sees no XCLIENT/XFORWARD/AUTH/STARTTLS and its XCLIENT, XFORWARD, AUTH and STARTTLS never reach Postfix', async () => {
  // The defect (issue 17, seen with this harness before the fix): the backend's EHLO reply reached the
  // client with XCLIENT and XFORWARD, and `XCLIENT ADDR=6.6.6.6 LOGIN=ceo@example.org` reached Postfix,
  // which answered 220 and took 6.6.6.6 and ceo@example.org as the client from then on. Postfix 3.7
  // checks XCLIENT permission against the client address in force (the gateway's, or the one its own
  // XCLIENT set), so it let the client in wherever that address is authorised, as the client's own
  // 127.0.0.6 is here; XFORWARD permission is decided once per connection, by the gateway's address,
  // so `XFORWARD ADDR=7.7.7.7` was accepted for every logged-in client (orig_client=7.7.7.7 in the log).
  const marker = `gateway-only-${randomBytes(4).toString('hex')}`;
  const c = await loggedIn(gw.ports.smtps!, alice, '127.0.0.6');
  c.write('EHLO client.example\r\n');
  const ehlo = await c.readUntil(/^250 /);
  assert.ok(ehlo.length > 3 && ehlo.some((l) => /PIPELINING/.test(l)) && ehlo.some((l) => /CHUNKING/.test(l)), ehlo.join('\n'));
  assert.deepEqual(ehlo.filter((l) => GATEWAY_ONLY.test(l)), [], 'no gateway-only keyword after login');
  assert.match(ehlo.at(-1)!, /^250 /);
  assert.ok(ehlo.slice(0, -1).every((l) => l.startsWith('250-')), ehlo.join('\n'));

  c.write('XCLIENT ADDR=6.6.6.6 LOGIN=ceo@example.org\r\n');
  assert.match(await c.readLine(), /^550 5\.7\.0 /);
  c.write('XFORWARD ADDR=7.7.7.7\r\n');
  assert.match(await c.readLine(), /^550 5\.7\.0 /);
  // Pipelined: the gateway's own answers keep their place among Postfix's.
  c.write('NOOP\r\nXCLIENT ADDR=6.6.6.6\r\nVRFY someone@e2e.test\r\nXFORWARD ADDR=7.7.7.7 NAME=evil.example\r\nNOOP\r\n');
  for (const expect of [/^250 2\.0\.0 /, /^550 5\.7\.0 /, /^252 /, /^550 5\.7\.0 /, /^250 2\.0\.0 /]) assert.match(await c.readLine(), expect);
  c.write(`AUTH PLAIN ${Buffer.from(`\0${bob.name}\0${bob.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^503 5\.5\.1 .*already authenticated/i);
  c.write('STARTTLS\r\n');
  assert.match(await c.readLine(), /^5\d\d /);

  c.write('MAIL FROM:<alice@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nDATA\r\n');
  for (const expect of [/^250 /, /^250 /, /^354 /]) assert.match(await c.readLine(), expect);
  c.write(`Subject: ${marker}\r\n\r\nhello\r\n.\r\nQUIT\r\n`);
  assert.match(await c.readLine(), /^250 /);
  assert.match(await c.readLine(), /^221 /);
  await delivered(postfix, marker);
  const raw = (await postfix.rawMessages()).find((m) => m.includes(marker))!.toString('latin1');
  const received = raw.slice(0, raw.indexOf('\r\n\r\n'));
  assert.match(received, /\[127\.0\.0\.6\]/, 'Postfix saw the real client');
  assert.match(received, /Authenticated sender: alice/);
  assert.doesNotMatch(received, /6\.6\.6\.6|7\.7\.7\.7|ceo@example\.org|evil\.example/);
  const logs = await postfix.logs();
  assert.doesNotMatch(logs, /6\.6\.6\.6|7\.7\.7\.7|ceo@example\.org|evil\.example|orig_client/);
  const refused = await gw.waitForLog((l) => l.msg === 'refused after login' && l.client === '127.0.0.6');
  assert.equal(refused.level, 'info');
});

test('AUTH after a local login is refused: a backend session without login is not logged in as someone else', async () => {
  // On this listener mailgate checked dave's password and Postfix has no login (backend_login: none, no
  // XCLIENT). Before the fix the client's AUTH went to Postfix, which logged it in as bob: the
  // gateway's policy (rules, limits, counts) was for dave, the backend's permissions were bob's.
  const marker = `local-auth-${randomBytes(4).toString('hex')}`;
  const c = await loggedIn(gw.ports.local!, dave, '127.0.0.8');
  c.write(`AUTH PLAIN ${Buffer.from(`\0${bob.name}\0${bob.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^503 5\.5\.1 .*already authenticated/i);
  c.write('MAIL FROM:<dave@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nRCPT TO:<dave@e2e.test>\r\nDATA\r\n');
  assert.match(await c.readLine(), /^250 /);
  assert.match(await c.readLine(), /^554 5\.7\.1 .*Relay access denied/, 'Postfix still treats the session as unauthenticated');
  assert.match(await c.readLine(), /^250 /);
  assert.match(await c.readLine(), /^354 /);
  c.write(`Subject: ${marker}\r\n\r\nhello\r\n.\r\nQUIT\r\n`);
  assert.match(await c.readLine(), /^250 /);
  assert.match(await c.readLine(), /^221 /);
  const raw = (await delivered(postfix, marker)).toString('latin1');
  assert.doesNotMatch(raw, /Authenticated sender/);
  assert.doesNotMatch(await postfix.logs(), /sasl_username=bob/);
});

/** What Postfix would take for six transactions: the client's, then five hidden behind bare-LF end-of-data lines. */
function smuggled(marker: string): string {
  const hidden = (i: number) => `MAIL FROM:<bob@e2e.test>\r\nRCPT TO:<victim${i}@e2e.test>\r\nDATA\r\nSubject: hidden ${i} ${marker}\r\n\r\nsmuggled ${i}\r\n`;
  const ends = ['\n.\n', '\n.\r\n', '\n.\n', '\n.\r\n', '\n.\n'];
  return `Subject: outer ${marker}\r\n\r\nhello\r\n${ends.map((end, i) => `${i === 0 ? 'tail' : ''}${end}${hidden(i + 1)}`).join('')}.\r\n`;
}

/**
 * Waits for Postfix to log the end of the sessions from `client`, then returns its log lines for that
 * client and how many messages from it were queued: a queue ID is given at the first accepted RCPT
 * (`ID: client=...`), a message is queued only once cleanup and qmgr have it (`ID: from=<...>, size=`).
 */
async function queuedFrom(client: string, sessions: number): Promise<{ queued: number; log: string }> {
  const ended = (l: string) => l.split('\n').filter((line) => line.includes(`disconnect from unknown[${client}]`)).length;
  await waitFor(`Postfix to log ${sessions} disconnects from ${client}`, async () => ended(await postfix.logs()) >= sessions, { timeoutMs: 10_000, detail: () => postfix.logs() });
  await new Promise((r) => setTimeout(r, 300)); // qmgr logs a message a moment after smtpd queued it
  const logs = await postfix.logs();
  assert.equal(ended(logs), sessions, logs);
  const ids = [...logs.matchAll(/([0-9A-F]{6,}): client=unknown\[([^\]]+)\]/g)].filter((m) => m[2] === client).map((m) => m[1]!);
  const mine = logs.split('\n').filter((line) => line.includes(`[${client}]`) || ids.some((id) => line.includes(`${id}:`)));
  return { queued: ids.filter((id) => logs.includes(`${id}: from=<`)).length, log: mine.join('\n') };
}

test('SMTP smuggling: bare-LF end-of-data lines in DATA are refused with 521; Postfix queues nothing from that DATA', async () => {
  // Before the fix the gateway passed this body on and counted one message; this Postfix (bare <LF> taken
  // for a line end, as 3.7 does by default) queued six, past any message or recipient limit.
  const marker = `smuggle-${randomBytes(4).toString('hex')}`;
  const body = smuggled(marker);
  assert.equal(body.match(/[^\r]\n\.\r?\n/g)?.length, 5, 'five hidden end-of-data lines');
  const c = await loggedIn(gw.ports.smtps!, bob, '127.0.0.7');
  c.write('MAIL FROM:<bob@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nDATA\r\n');
  for (const expect of [/^250 /, /^250 /, /^354 /]) assert.match(await c.readLine(), expect);
  c.write(body);
  assert.match(await c.readLine(), /^521 5\.5\.2 mail\.e2e\.test Error: bare <LF> received$/);
  assert.ok(await c.waitClosed(), 'the session ends');
  const pf = await queuedFrom('127.0.0.7', 1);
  assert.equal(pf.queued, 0, `Postfix queued nothing:\n${pf.log}`);
  assert.match(pf.log, /lost connection after DATA .*from unknown\[127\.0\.0\.7\]/, 'Postfix was inside DATA when the gateway hung up');
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await postfix.messages()).filter((m) => m.includes(marker)), []);
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.client === '127.0.0.7');
  assert.equal(end.reason, 'protocol-error');
  assert.equal(end.messages, 0);

  // The same client and user, a clean message on a new session: delivered.
  const clean = `clean-${randomBytes(4).toString('hex')}`;
  const again = await loggedIn(gw.ports.smtps!, bob, '127.0.0.7');
  again.write('MAIL FROM:<bob@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nDATA\r\n');
  for (const expect of [/^250 /, /^250 /, /^354 /]) assert.match(await again.readLine(), expect);
  again.write(`Subject: ${clean}\r\n\r\n..leading dot\r\nhello\r\n.\r\nQUIT\r\n`);
  assert.match(await again.readLine(), /^250 /);
  assert.match(await again.readLine(), /^221 /);
  assert.deepEqual(await delivered(postfix, clean), Buffer.from(`Subject: ${clean}\r\n\r\n.leading dot\r\nhello\r\n`));
});

test('a bare CR in DATA and a bare LF in a BDAT chunk are refused the same way; nothing is queued', async () => {
  const marker = `bare-${randomBytes(4).toString('hex')}`;
  const cr = await loggedIn(gw.ports.smtps!, bob, '127.0.0.9');
  cr.write('MAIL FROM:<bob@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nDATA\r\n');
  for (const expect of [/^250 /, /^250 /, /^354 /]) assert.match(await cr.readLine(), expect);
  cr.write(`Subject: cr ${marker}\r\n\r\nhello\r.\rMAIL FROM:<bob@e2e.test>\r\n.\r\n`);
  assert.match(await cr.readLine(), /^521 5\.5\.2 mail\.e2e\.test Error: bare <CR> received$/);
  assert.ok(await cr.waitClosed());

  const chunk = Buffer.from(`Subject: bdat ${marker}\r\n\r\none\ntwo\r\n`);
  const bdat = await loggedIn(gw.ports.smtps!, bob, '127.0.0.9');
  bdat.write(Buffer.concat([Buffer.from(`MAIL FROM:<bob@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nBDAT ${chunk.length} LAST\r\n`), chunk]));
  for (const expect of [/^250 /, /^250 /, /^521 5\.5\.2 mail\.e2e\.test Error: bare <LF> received$/]) assert.match(await bdat.readLine(), expect);
  assert.ok(await bdat.waitClosed());
  const pf = await queuedFrom('127.0.0.9', 2);
  assert.equal(pf.queued, 0, `Postfix queued nothing:\n${pf.log}`);
  assert.match(pf.log, /lost connection after DATA .*from unknown\[127\.0\.0\.9\]/);
  assert.match(pf.log, /lost connection after BDAT .*from unknown\[127\.0\.0\.9\]/);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await postfix.messages()).filter((m) => m.includes(marker)), []);
});

test('the recipients limit answers 452 4.5.3 at the recipient that crosses it; the message goes to the others', async () => {
  const marker = `rcpt-limit-${randomBytes(4).toString('hex')}`;
  const c = await loggedIn(gw.ports.limited!, carol, '127.0.0.10');
  const rcpts = Array.from({ length: RECIPIENT_LIMIT + 2 }, (_, i) => `r${i + 1}-${marker}@e2e.test`);
  // Pipelined, as a client with many recipients sends them: the answers keep their order.
  c.write(`MAIL FROM:<carol@e2e.test>\r\n${rcpts.map((r) => `RCPT TO:<${r}>\r\n`).join('')}DATA\r\n`);
  assert.match(await c.readLine(), /^250 /);
  for (let i = 0; i < rcpts.length; i++) {
    assert.match(await c.readLine(), i < RECIPIENT_LIMIT ? /^250 2\.1\.5 / : /^452 4\.5\.3 Too many recipients/, `RCPT ${i + 1}`);
  }
  assert.match(await c.readLine(), /^354 /);
  c.write(`Subject: ${marker}\r\n\r\nhello\r\n.\r\n`);
  assert.match(await c.readLine(), /^250 /);
  c.write('QUIT\r\n');
  assert.match(await c.readLine(), /^221 /);
  const mine = async () => (await postfix.envelopes()).filter((e) => e.to.some((t) => t.includes(marker)));
  await waitFor(`${RECIPIENT_LIMIT} envelopes for ${marker}`, async () => (await mine()).length >= RECIPIENT_LIMIT, { timeoutMs: 10_000 });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await mine()).map((e) => e.to[0]).sort(), rcpts.slice(0, RECIPIENT_LIMIT).sort());
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.client === '127.0.0.10');
  assert.equal(end.recipients, RECIPIENT_LIMIT);
  assert.equal(end.messages, 1);

  // The window's count is used up: a new login is refused until it ends.
  const again = await LineClient.connect(gw.ports.limited!, { tls: true, localAddress: '127.0.0.10' });
  assert.match(await again.readLine(), /^220 /);
  again.write('EHLO client.example\r\n');
  await again.readUntil(/^250 /);
  again.write(`AUTH PLAIN ${Buffer.from(`\0${carol.name}\0${carol.password}`).toString('base64')}\r\n`);
  assert.match(await again.readLine(), /^454 4\.7\.0 /);
  again.close();
});
