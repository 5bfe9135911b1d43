// Proves that the e2e harness starts real, working backend servers, using real
// clients: Python's imaplib/poplib/smtplib, curl and swaks.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { waitFor } from '../helpers/wait.ts';

import {
  FIXTURE_UIDVALIDITY,
  freePort,
  mailboxBytes,
  startDovecot,
  startNginx,
  startPostfix,
  startSmtpSink,
  userByName,
} from './harness/servers.ts';

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], timeoutMs = 20_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function python(script: string, args: (string | number)[]): Promise<unknown> {
  const r = await run('python3', ['-c', script, ...args.map(String)]);
  assert.equal(r.code, 0, `python failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return JSON.parse(r.stdout);
}

function b64(buf: Buffer): string {
  return buf.toString('base64');
}

/** First bytes the server sends on a fresh connection. */
function greeting(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    let got = '';
    s.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\r\n')) {
        s.end('x LOGOUT\r\n');
        resolve(got);
      }
    });
    s.on('error', reject);
    s.setTimeout(5000, () => {
      s.destroy();
      reject(new Error(`no greeting on ${port}`));
    });
  });
}

async function tmpFile(name: string, content: Buffer | string): Promise<string> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'mailgate-e2e-client-'));
  const f = path.join(dir, name);
  await fsp.writeFile(f, content);
  return f;
}

const IMAP_SCRIPT = String.raw`
import imaplib, json, sys, base64
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {}
M = imaplib.IMAP4(host, port)
out['greeting'] = M.welcome.decode()
imaplib.Commands['ID'] = ('NONAUTH', 'AUTH', 'SELECTED')
typ, data = M._simple_command('ID', '("x-originating-ip" "203.0.113.77" "x-originating-port" "40123" "x-connected-ip" "127.0.0.1")')
out['id'] = typ
try:
    M.login(user, 'definitely-wrong')
    out['wrong_login'] = 'OK'
except imaplib.IMAP4.error as e:
    out['wrong_login'] = str(e)
typ, data = M.login(user, pw)
out['login'] = typ
typ, boxes = M.list()
out['list'] = sorted(b.decode() for b in boxes)
out['mailboxes'] = {}
out['uidvalidity'] = {}
for box in ['INBOX', 'Archive']:
    typ, data = M.select(box, readonly=True)
    if typ != 'OK':
        continue
    n = int(data[0])
    typ, uv = M.response('UIDVALIDITY')
    out['uidvalidity'][box] = int(uv[0])
    msgs = []
    for i in range(1, n + 1):
        typ, d = M.fetch(str(i), '(BODY.PEEK[])')
        msgs.append(base64.b64encode(d[0][1]).decode())
    out['mailboxes'][box] = msgs
M.logout()
print(json.dumps(out))
`;

const POP3_SCRIPT = String.raw`
import poplib, json, sys, base64
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
P = poplib.POP3(host, port)
out = {'greeting': P.getwelcome().decode()}
P.user(user)
out['pass'] = P.pass_(pw).decode()
count, size = P.stat()
msgs = []
for i in range(1, count + 1):
    resp, lines, octets = P.retr(i)
    msgs.append(base64.b64encode(b'\r\n'.join(lines) + b'\r\n').decode())
out['messages'] = msgs
out['uidl'] = [u.decode() for u in P.uidl()[1]]
P.quit()
print(json.dumps(out))
`;

const PREAUTH_SCRIPT = String.raw`
import imaplib, json, sys, base64
M = imaplib.IMAP4(sys.argv[1], int(sys.argv[2]))
out = {'greeting': M.welcome.decode(), 'state': M.state}
typ, data = M.select('INBOX', readonly=True)
typ, d = M.fetch('2', '(BODY.PEEK[])')
out['message'] = base64.b64encode(d[0][1]).decode()
M.logout()
print(json.dumps(out))
`;

const SMTP_XCLIENT_SCRIPT = String.raw`
import smtplib, json, sys
host, port, user, pw, mail_from, rcpt, data_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
out = {}
s = smtplib.SMTP(host, port)
s.ehlo('gateway.e2e.test')
out['xclient_advertised'] = s.has_extn('xclient')
code, msg = s.docmd('XCLIENT', 'ADDR=203.0.113.9 NAME=client.example.net HELO=client-helo.example.net')
out['xclient'] = [code, msg.decode()]
s.ehlo('client-helo.example.net')
if user:
    s.login(user, pw)
with open(data_file, 'rb') as f:
    data = f.read()
refused = s.sendmail(mail_from, [rcpt], data)
out['refused'] = list(refused.keys())
s.quit()
print(json.dumps(out))
`;

test('Dovecot: imaplib and poplib log in and read the pre-filled messages byte-exact', async (t) => {
  const dovecot = await startDovecot();
  t.after(() => dovecot.stop());
  t.diagnostic(`startDovecot: ${dovecot.startupMs} ms (imap ${dovecot.imapPort}, pop3 ${dovecot.pop3Port})`);
  assert.equal(dovecot.host, '127.0.0.1');
  assert.equal(dovecot.imapPort, dovecot.loginImapPort);
  for (const name of ['alice', 'bob', 'carol']) assert.ok(dovecot.users.some((u) => u.name === name), name);
  assert.equal(new Set(dovecot.users.map((u) => u.password)).size, dovecot.users.length, 'distinct passwords');

  const alice = userByName('alice');
  const imap = (await python(IMAP_SCRIPT, ['127.0.0.1', dovecot.imapPort, alice.name, alice.password])) as {
    greeting: string;
    id: string;
    wrong_login: string;
    login: string;
    list: string[];
    mailboxes: Record<string, string[]>;
    uidvalidity: Record<string, number>;
  };
  assert.match(imap.greeting, /^\* OK /);
  assert.equal(imap.id, 'OK');
  assert.match(imap.wrong_login, /AUTHENTICATIONFAILED|Authentication failed/);
  assert.equal(imap.login, 'OK');
  assert.ok(imap.list.some((l) => l.endsWith(' INBOX') || l.endsWith(' "INBOX"')), imap.list.join('\n'));
  assert.ok(imap.list.some((l) => /Archive"?$/.test(l)), imap.list.join('\n'));
  assert.deepEqual(imap.mailboxes['INBOX'], mailboxBytes('alice', 'INBOX').map(b64));
  assert.deepEqual(imap.mailboxes['Archive'], mailboxBytes('alice', 'Archive').map(b64));
  assert.equal(imap.uidvalidity['INBOX'], FIXTURE_UIDVALIDITY);
  const tenK = mailboxBytes('alice', 'INBOX')[1];
  assert.equal(tenK?.length, 10240);

  const logs = await waitFor('Dovecot to log the login and the mismatch', async () => {
    const t = await dovecot.logs();
    return /Login: user=<alice>/.test(t) && /Password mismatch/.test(t) && t;
  });
  assert.match(logs, /imap-login: Info: Login: user=<alice>, method=PLAIN, rip=203\.0\.113\.77, rport=40123, lip=127\.0\.0\.1, .*real_rip=127\.0\.0\.1/);
  assert.match(logs, /ID sent: .*x-originating-ip=203\.0\.113\.77/);
  assert.match(logs, /passwd-file\(alice,203\.0\.113\.77.*Password mismatch/);

  const pop = (await python(POP3_SCRIPT, ['127.0.0.1', dovecot.pop3Port, alice.name, alice.password])) as {
    greeting: string;
    pass: string;
    messages: string[];
    uidl: string[];
  };
  assert.match(pop.greeting, /^\+OK /);
  assert.match(pop.pass, /^\+OK/);
  assert.deepEqual(pop.messages, mailboxBytes('alice', 'INBOX').map(b64));
  assert.equal(pop.uidl.length, 3);

  // the user with a password containing space, quote and backslash
  const dave = userByName('dave');
  const davePop = (await python(POP3_SCRIPT, ['127.0.0.1', dovecot.pop3Port, dave.name, dave.password])) as { messages: string[] };
  assert.deepEqual(davePop.messages, mailboxBytes('dave', 'INBOX').map(b64));
  const daveImap = (await python(IMAP_SCRIPT, ['127.0.0.1', dovecot.imapPort, dave.name, dave.password])) as { mailboxes: Record<string, string[]> };
  assert.deepEqual(daveImap.mailboxes['INBOX'], mailboxBytes('dave', 'INBOX').map(b64));
  // carol's INBOX is empty
  const carol = userByName('carol');
  const carolPop = (await python(POP3_SCRIPT, ['127.0.0.1', dovecot.pop3Port, carol.name, carol.password])) as { messages: string[] };
  assert.deepEqual(carolPop.messages, []);
});

test('Dovecot: preauth: true greets with PREAUTH (real Dovecot imap for alice)', async (t) => {
  const dovecot = await startDovecot({ preauth: true });
  t.after(() => dovecot.stop());
  t.diagnostic(`startDovecot({preauth}): ${dovecot.startupMs} ms`);
  assert.equal(dovecot.preauthUser, 'alice');
  assert.notEqual(dovecot.imapPort, dovecot.loginImapPort);
  assert.match(await greeting(dovecot.imapPort), /^\* PREAUTH \[CAPABILITY IMAP4rev1 .*\] Logged in as alice\r\n/);
  assert.match(await greeting(dovecot.loginImapPort), /^\* OK \[CAPABILITY IMAP4rev1 .*\] Dovecot ready\.\r\n/);
  const r = (await python(PREAUTH_SCRIPT, ['127.0.0.1', dovecot.imapPort])) as { greeting: string; state: string; message: string };
  assert.equal(r.state, 'AUTH');
  assert.equal(r.message, b64(mailboxBytes('alice', 'INBOX')[1] ?? Buffer.alloc(0)));
});

test('nginx: curl downloads big.bin (sha256 matches), headers are logged and echoed', async (t) => {
  const nginx = await startNginx();
  t.after(() => nginx.stop());
  t.diagnostic(`startNginx: ${nginx.startupMs} ms (port ${nginx.port})`);
  const out = path.join(await fsp.mkdtemp(path.join(os.tmpdir(), 'mailgate-e2e-client-')), 'big.bin');
  t.after(() => fsp.rm(path.dirname(out), { recursive: true, force: true }));
  const r = await run('curl', ['-sS', '-o', out, '-w', '%{http_code} %{size_download}', `http://127.0.0.1:${nginx.port}/big.bin`]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, '200 1048576');
  const sha = createHash('sha256').update(await fsp.readFile(out)).digest('hex');
  assert.equal(sha, nginx.bigSha256);
  assert.equal(createHash('sha256').update(await fsp.readFile(path.join(nginx.root, 'big.bin'))).digest('hex'), sha);

  const idx = await run('curl', ['-sS', `http://127.0.0.1:${nginx.port}/`]);
  assert.equal(idx.stdout, nginx.indexHtml);

  const echo = await run('curl', [
    '-sS',
    '-H', 'X-Forwarded-For: 198.51.100.7',
    '-H', 'X-Forwarded-Proto: https',
    '-H', 'Host: www.e2e.test',
    `http://127.0.0.1:${nginx.port}/echo-headers`,
  ]);
  assert.equal(echo.code, 0, echo.stderr);
  assert.match(echo.stdout, /^remote-addr: 127\.0\.0\.1$/m);
  assert.match(echo.stdout, /^x-forwarded-for: 198\.51\.100\.7$/m);
  assert.match(echo.stdout, /^x-forwarded-proto: https$/m);
  assert.match(echo.stdout, /^host: www\.e2e\.test$/m);

  const logs = await waitFor('nginx to log both requests', async () => {
    const t = await nginx.logs();
    return /GET \/big\.bin/.test(t) && /GET \/echo-headers/.test(t) && t;
  });
  assert.match(logs, /^127\.0\.0\.1 xff="-" xfp="-" host="127\.0\.0\.1:\d+" .*"GET \/big\.bin HTTP\/1\.1" 200 1048576$/m);
  assert.match(logs, /^127\.0\.0\.1 xff="198\.51\.100\.7" xfp="https" host="www\.e2e\.test" .*"GET \/echo-headers HTTP\/1\.1" 200 /m);
  assert.doesNotMatch(logs, /__harness_ready/);
  const reqs = await nginx.requests();
  assert.equal(reqs.length, 3);
  assert.deepEqual(
    reqs.map((q) => [q['uri'], q['xff'], q['xfp'], q['status']]),
    [
      ['/big.bin', '', '', '200'],
      ['/', '', '', '200'],
      ['/echo-headers', '198.51.100.7', 'https', '200'],
    ],
  );
});

const TEST_MAIL = [
  'From: Alice <alice@e2e.test>',
  'To: Someone <someone@example.org>',
  'Subject: harness test message',
  'Message-ID: <harness-1@e2e.test>',
  'Date: Wed, 15 Nov 2023 12:00:00 +0000',
  '',
  'Hello,',
  '.a line starting with a dot',
  '.',
  '..',
  'x'.repeat(900),
  '',
  'Bye',
].join('\r\n');
/** swaks sends the --data file plus "\r\n.\r\n"; the DATA content is therefore the file + CRLF. */
const TEST_MAIL_RECEIVED = Buffer.from(TEST_MAIL + '\r\n');

test('smtp-sink: swaks delivers a message, captured byte-exact; XCLIENT announced and logged', async (t) => {
  const sink = await startSmtpSink();
  t.after(() => sink.stop());
  t.diagnostic(`startSmtpSink: ${sink.startupMs} ms (port ${sink.port})`);
  assert.deepEqual(sink.users, []);
  const file = await tmpFile('mail.eml', TEST_MAIL);
  t.after(() => fsp.rm(path.dirname(file), { recursive: true, force: true }));
  const r = await run('swaks', ['--server', `127.0.0.1:${sink.port}`, '--helo', 'client.e2e.test', '--from', 'alice@e2e.test', '--to', 'someone@example.org', '--data', `@${file}`]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /250-XCLIENT/);
  const msgs = await sink.waitForMessages(1);
  assert.equal(msgs.length, 1);
  assert.equal(msgs[0]?.toString('latin1'), TEST_MAIL_RECEIVED.toString('latin1'));
  assert.deepEqual(await sink.envelopes(), [{ from: '<alice@e2e.test>', to: ['<someone@example.org>'] }]);

  const mailFile = await tmpFile('mail2.eml', 'Subject: second\r\n\r\nsecond message\r\n');
  t.after(() => fsp.rm(path.dirname(mailFile), { recursive: true, force: true }));
  const x = (await python(SMTP_XCLIENT_SCRIPT, ['127.0.0.1', sink.port, '', '', 'bob@e2e.test', 'carol@e2e.test', mailFile])) as {
    xclient_advertised: boolean;
    xclient: [number, string];
  };
  assert.equal(x.xclient_advertised, true);
  assert.equal(x.xclient[0], 250);
  const two = await sink.waitForMessages(2);
  assert.equal(two[1]?.toString(), 'Subject: second\r\n\r\nsecond message\r\n');
  assert.match(await sink.logs(), /XCLIENT ADDR=203\.0\.113\.9 NAME=client\.example\.net/);

  const noX = await startSmtpSink({ xclient: false });
  t.after(() => noX.stop());
  const r2 = await run('swaks', ['--server', `127.0.0.1:${noX.port}`, '--quit-after', 'EHLO']);
  assert.equal(r2.code, 0, r2.stdout + r2.stderr);
  assert.doesNotMatch(r2.stdout, /XCLIENT/);
});

test('Postfix: AUTH checks passwords, accepted mail is delivered byte-exact, XCLIENT honoured', async (t) => {
  const postfix = await startPostfix();
  t.after(() => postfix.stop());
  t.diagnostic(`startPostfix: ${postfix.startupMs} ms (port ${postfix.port})`);
  const alice = userByName('alice');
  const file = await tmpFile('mail.eml', TEST_MAIL);
  t.after(() => fsp.rm(path.dirname(file), { recursive: true, force: true }));
  const swaks = (...extra: string[]) =>
    run('swaks', ['--server', `127.0.0.1:${postfix.port}`, '--helo', 'client.e2e.test', '--from', 'alice@e2e.test', '--to', 'someone@example.org', '--data', `@${file}`, ...extra]);

  // wrong password -> 535, nothing delivered
  const bad = await swaks('--auth', 'PLAIN', '--auth-user', alice.name, '--auth-password', 'wrong-password');
  assert.notEqual(bad.code, 0);
  assert.match(bad.stdout, /<\*\* +535 5\.7\.8 Error: authentication failed/);

  // no AUTH -> relaying to a foreign domain is refused
  const noAuth = await swaks();
  assert.notEqual(noAuth.code, 0);
  assert.match(noAuth.stdout, /554 5\.7\.1 .*Relay access denied/);

  // correct password -> accepted and delivered byte-exact
  const good = await swaks('--auth', 'PLAIN', '--auth-user', alice.name, '--auth-password', alice.password);
  assert.equal(good.code, 0, good.stdout + good.stderr);
  assert.match(good.stdout, /235 2\.7\.0 Authentication successful/);
  assert.match(good.stdout, /250 2\.0\.0 Ok: queued as/);
  const msgs = await postfix.waitForMessages(1);
  assert.equal(msgs.length, 1);
  assert.equal(msgs[0]?.toString('latin1'), TEST_MAIL_RECEIVED.toString('latin1'));
  const raw = (await postfix.rawMessages())[0]?.toString('latin1') ?? '';
  assert.match(raw, /^Received: from client\.e2e\.test \(unknown \[127\.0\.0\.1\]\)\r\n\t\(Authenticated sender: alice\)\r\n\tby postfix\.e2e\.test \(Postfix\) with ESMTPA id /);
  assert.ok(raw.endsWith(TEST_MAIL_RECEIVED.toString('latin1')));
  assert.deepEqual(await postfix.envelopes(), [{ from: 'alice@e2e.test', to: ['someone@example.org'] }]);

  // AUTH LOGIN with dave's hard-to-quote password
  const dave = userByName('dave');
  const daveRun = await swaks('--auth', 'LOGIN', '--auth-user', dave.name, '--auth-password', dave.password);
  assert.equal(daveRun.code, 0, daveRun.stdout);
  await postfix.waitForMessages(2);

  // XCLIENT from 127.0.0.1 is honoured (then AUTH again for relaying)
  const mailFile = await tmpFile('mail2.eml', 'Subject: via xclient\r\n\r\nhello\r\n');
  t.after(() => fsp.rm(path.dirname(mailFile), { recursive: true, force: true }));
  const x = (await python(SMTP_XCLIENT_SCRIPT, ['127.0.0.1', postfix.port, alice.name, alice.password, 'alice@e2e.test', 'bob@example.org', mailFile])) as {
    xclient_advertised: boolean;
    xclient: [number, string];
    refused: string[];
  };
  assert.equal(x.xclient_advertised, true);
  assert.equal(x.xclient[0], 220, x.xclient[1]);
  assert.deepEqual(x.refused, []);
  const three = await postfix.waitForMessages(3);
  assert.equal(three[2]?.toString(), 'Subject: via xclient\r\n\r\nhello\r\n');
  const raw3 = (await postfix.rawMessages())[2]?.toString('latin1') ?? '';
  assert.match(raw3, /^Received: from client-helo\.example\.net \(client\.example\.net \[203\.0\.113\.9\]\)/);
  const logs = await waitFor('Postfix to log the login and the mismatch', async () => {
    const t = await postfix.logs();
    return /sasl_username=alice/.test(t) && /Password mismatch/.test(t) && t;
  });
  assert.match(logs, /client=client\.example\.net\[203\.0\.113\.9\], sasl_method=PLAIN, sasl_username=alice/);
  assert.match(logs, /passwd-file\(alice,127\.0\.0\.1\): Password mismatch/);

  // mail to the local domain needs no AUTH
  const local = await run('swaks', ['--server', `127.0.0.1:${postfix.port}`, '--from', 'someone@example.org', '--to', 'bob@e2e.test', '--data', `@${file}`]);
  assert.equal(local.code, 0, local.stdout);
  await postfix.waitForMessages(4);
});

test('stop() kills everything, removes the folder, is idempotent; logs() survives stop()', async () => {
  const dovecot = await startDovecot({ preauth: true });
  const sink = await startSmtpSink();
  const postfix = await startPostfix();
  const nginx = await startNginx();
  const dirs = [dovecot.dir, sink.dir, postfix.dir, nginx.dir];
  for (const d of dirs) assert.ok(fs.existsSync(d), d);
  await Promise.all([dovecot.stop(), sink.stop(), postfix.stop(), nginx.stop()]);
  await Promise.all([dovecot.stop(), sink.stop(), postfix.stop(), nginx.stop()]);
  for (const d of dirs) assert.ok(!fs.existsSync(d), `${d} removed`);
  // nothing that ran from those folders survives (zombies awaiting a reaper don't count)
  const ps = await run('ps', ['-eo', 'stat=,args=']);
  const alive = ps.stdout
    .split('\n')
    .filter((l) => !l.trim().startsWith('Z'))
    .filter((l) => dirs.some((d) => l.includes(path.basename(d))));
  assert.deepEqual(alive, []);
  for (const p of [dovecot.imapPort, dovecot.loginImapPort, dovecot.pop3Port, sink.port, postfix.port, nginx.port]) {
    await assert.rejects(greeting(p), `port ${p} closed`);
  }
  assert.match(await dovecot.logs(), /starting up for imap, pop3/);
  assert.match(await postfix.logs(), /daemon started/);
});

test('freePort returns distinct bindable ports', async () => {
  const ports = await Promise.all(Array.from({ length: 20 }, () => freePort()));
  assert.equal(new Set(ports).size, ports.length);
  for (const p of ports) assert.ok(p > 1024 && p < 65536);
});
