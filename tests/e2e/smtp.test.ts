/**
 * SMTP through the gateway: submission to a real Postfix (SASL via Dovecot)
 * with swaks, smtplib and curl; MX traffic to Postfix's smtp-sink with XCLIENT.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { LineClient, python, run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, startPostfix, startSmtpSink, userByName, type Postfix, type SmtpServer } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

let postfix: Postfix;
let sink: SmtpServer;
let gw: Gateway;
const alice = userByName('alice');

before(async () => {
  postfix = await startPostfix();
  sink = await startSmtpSink({ xclient: true });
  const dead = await freePort();
  gw = await startGateway({
    listeners: [
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${postfix.port}`, auth: 'required' },
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${postfix.port}`, auth: 'none', xclient: true },
      { name: 'sink', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${sink.port}`, auth: 'none', xclient: true, greet_delay: '1s' },
      { name: 'dead', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${dead}`, auth: 'required' },
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
