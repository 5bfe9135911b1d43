/**
 * argon2id hashes end to end: `mailgate hash-password --argon2id` (the real
 * CLI verb, the password on standard input) makes the hash of a local user,
 * and that user logs in through the real daemon over IMAPS (replayed on a
 * real Dovecot) and SMTPS (a relay that trusts the gateway: smtp-sink),
 * with Python's imaplib and smtplib; a wrong password is refused on both.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { python, run } from './harness/clients.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, startSmtpSink, userByName, type Dovecot, type SmtpServer } from './harness/servers.ts';

let dovecot: Dovecot;
let sink: SmtpServer;
let gw: Gateway;
let hash = '';
const alice = userByName('alice');

before(async () => {
  [dovecot, sink] = await Promise.all([startDovecot(), startSmtpSink()]);
  const r = await run(process.execPath, [CLI, 'hash-password', '--argon2id'], { input: `${alice.password}\n` });
  assert.equal(r.code, 0, r.stderr);
  hash = r.stdout.trim();
  gw = await startGateway({
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}`, authentication: 'local' },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${sink.port}`, auth: 'required', authentication: 'local', backend_login: 'none' },
    ],
    extra: { users: { list: [{ name: alice.name, password_hash: hash }] } },
  });
});

after(async () => {
  await gw?.stop();
  await Promise.all([dovecot?.stop(), sink?.stop()]);
});

test('hash-password --argon2id prints an argon2id PHC string', () => {
  assert.match(hash, /^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$/);
  assert.ok(!hash.includes(alice.password));
});

test('an argon2id user logs in over IMAPS (and the login is replayed on Dovecot); a wrong password is refused', async () => {
  const r = await python<{ ok: string; wrong: string }>(
    `
import imaplib
m = imaplib.IMAP4_SSL('127.0.0.1', int(sys.argv[1]), ssl_context=ctx(), timeout=10)
typ, _ = m.login(sys.argv[2], sys.argv[3])
typ2, data = m.select('INBOX')
m.logout()
m = imaplib.IMAP4_SSL('127.0.0.1', int(sys.argv[1]), ssl_context=ctx(), timeout=10)
try:
    m.login(sys.argv[2], sys.argv[3] + 'x')
    wrong = 'accepted'
except imaplib.IMAP4.error as e:
    wrong = str(e)
out({'ok': typ + ' ' + typ2, 'wrong': wrong})
`,
    [gw.ports.imaps!, alice.name, alice.password],
  );
  assert.equal(r.ok, 'OK OK');
  assert.match(r.wrong, /AUTHENTICATIONFAILED/);
  assert.match(await dovecot.logs(), /Login: user=<alice>/);
});

test('an argon2id user logs in over SMTPS and sends; a wrong password gets 535', async () => {
  const r = await python<{ login: number; sent: object; wrong: number }>(
    `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
code, _ = s.login(sys.argv[2], sys.argv[3])
sent = s.sendmail('alice@e2e.test', ['bob@e2e.test'], 'Subject: argon2id\\r\\n\\r\\nhello\\r\\n')
s.quit()
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10)
try:
    s.login(sys.argv[2], sys.argv[3] + 'x')
    wrong = 235
except smtplib.SMTPAuthenticationError as e:
    wrong = e.smtp_code
out({'login': code, 'sent': sent, 'wrong': wrong})
`,
    [gw.ports.smtps!, alice.name, alice.password],
  );
  assert.equal(r.login, 235);
  assert.deepEqual(r.sent, {});
  assert.equal(r.wrong, 535);
  assert.ok((await sink.waitForMessages(1)).some((m) => m.includes('Subject: argon2id')));
});
