/**
 * Faults around the running daemon: backends that refuse, stall, reset,
 * babble or crawl; a config file that goes bad; a disk that is full when a
 * certificate is written. Each time the client gets an answer in its
 * protocol's words, the log says why, everyone else keeps being served, and
 * nothing on disk is left half-written.
 *
 * Covered elsewhere: an invalid config key refused at SIGHUP with file:line
 * (lifecycle.test.ts); the plain "backend down" answers per protocol
 * (imap/pop3/smtp/http.test.ts, here with their log lines); the ACME server
 * being down (acme tests).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { CLI, startGateway, type Gateway, type LogLine } from './harness/gateway.ts';
import { LineClient, run } from './harness/clients.ts';
import { startFakeImap, startFakePop3, startFakeSmtp, startRawBackend, type FakeBackend } from '../helpers/fake-backends.ts';
import { freePort, makeTempDir, removeTempDir, sleep } from '../helpers/proc.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

const alice = userByName('alice');
let dovecot: Dovecot;
let silent: FakeBackend;
let garbage: FakeBackend;
let overlong: FakeBackend;
let resetImap: FakeBackend;
let resetSmtp: FakeBackend & { messages: Buffer[] };
let slowImap: FakeBackend;
let slowPop3: FakeBackend;
let gw: Gateway;

const SHORT = { timeouts: { backend_connect: '1s', login_replay: '1s', postauth_idle: '1s' } };
const GARBAGE = Buffer.from('\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage \x00\xff\r\nHTTP/1.1 200 OK\r\n\x1b[2J\r\n', 'latin1');

before(async () => {
  dovecot = await startDovecot();
  silent = await startRawBackend(() => undefined);
  garbage = await startRawBackend((s) => {
    s.write(GARBAGE);
    s.on('data', () => s.write(GARBAGE));
  });
  overlong = await startRawBackend((s) => s.write(Buffer.alloc(20_000, 0x41)));
  resetImap = await startFakeImap({ users: { [alice.name]: alice.password } });
  resetSmtp = await startFakeSmtp({ users: { [alice.name]: alice.password } });
  slowImap = await startFakeImap({ users: { [alice.name]: alice.password }, delayMs: 300 });
  slowPop3 = await startFakePop3({ users: { [alice.name]: alice.password }, delayMs: 300 });
  const dead = await freePort();
  const at = (port: number) => `127.0.0.1:${port}`;
  gw = await startGateway({
    extra: { brute_force: { enabled: false } },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: at(dovecot.imapPort) },
      { name: 'dead-imap', protocol: 'imap', tls: 'implicit', backend: at(dead) },
      { name: 'dead-pop3', protocol: 'pop3', tls: 'implicit', backend: at(dead) },
      { name: 'dead-smtp', protocol: 'smtp', tls: 'implicit', backend: at(dead), auth: 'required' },
      { name: 'dead-http', protocol: 'http', tls: 'implicit', backend: at(dead) },
      { name: 'silent-imap', protocol: 'imap', tls: 'implicit', backend: at(silent.port), ...SHORT },
      { name: 'silent-pop3', protocol: 'pop3', tls: 'implicit', backend: at(silent.port), ...SHORT },
      { name: 'silent-smtp', protocol: 'smtp', tls: 'implicit', backend: at(silent.port), auth: 'required', ...SHORT },
      { name: 'silent-http', protocol: 'http', tls: 'implicit', backend: at(silent.port), ...SHORT },
      { name: 'garbage-imap', protocol: 'imap', tls: 'implicit', backend: at(garbage.port), ...SHORT },
      { name: 'garbage-pop3', protocol: 'pop3', tls: 'implicit', backend: at(garbage.port), ...SHORT },
      { name: 'garbage-smtp', protocol: 'smtp', tls: 'implicit', backend: at(garbage.port), auth: 'required', ...SHORT },
      { name: 'garbage-http', protocol: 'http', tls: 'implicit', backend: at(garbage.port), ...SHORT },
      { name: 'overlong-imap', protocol: 'imap', tls: 'implicit', backend: at(overlong.port), ...SHORT },
      { name: 'reset-imap', protocol: 'imap', tls: 'implicit', backend: at(resetImap.port) },
      { name: 'reset-smtp', protocol: 'smtp', tls: 'implicit', backend: at(resetSmtp.port), auth: 'required' },
      { name: 'slow-imap', protocol: 'imap', tls: 'implicit', backend: at(slowImap.port) },
      { name: 'slow-pop3', protocol: 'pop3', tls: 'implicit', backend: at(slowPop3.port) },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await dovecot?.stop();
  for (const b of [silent, garbage, overlong, resetImap, resetSmtp, slowImap, slowPop3]) await b?.close();
});

// ---- helpers ---------------------------------------------------------------------------

/** Everyone else keeps being served: a real login through the healthy listener. */
async function othersServed(): Promise<void> {
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
  assert.match(await c.readLine(), /^\* OK /);
  c.write(`h LOGIN ${alice.name} ${alice.password}\r\nh2 LOGOUT\r\n`);
  assert.match((await c.readUntil(/^h /)).at(-1)!, /^h OK/, 'a healthy listener still logs in');
  await c.waitClosed();
}

/** The session-end line of the one session on `listener` that matches, and the warn/error lines about it. */
async function sessionEnd(listener: string, reason: string): Promise<LogLine> {
  return gw.waitForLog((l) => l.msg === 'session end' && l.listener === listener && l.reason === reason);
}

async function loginImap(listener: string, pass = alice.password): Promise<{ c: LineClient; lines: string[] }> {
  const c = await LineClient.connect(gw.ports[listener]!, { tls: true });
  assert.match(await c.readLine(5000), /^\* OK /);
  c.write(`a LOGIN ${alice.name} ${pass}\r\n`);
  return { c, lines: await c.readUntil(/^a /, 8000) };
}

function curlStatus(port: number): Promise<string> {
  return run('curl', ['-sk', '--max-time', '10', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${port}/`]).then((r) => r.stdout);
}

/** Waits until one more log line than before matches `pred` after `action`, and returns it. */
async function nextLog(pred: (l: LogLine) => boolean, action: () => void | Promise<void>, timeoutMs = 10_000): Promise<LogLine> {
  const before = (await gw.logs()).filter(pred).length;
  await action();
  return waitFor('a new matching log line', async () => (await gw.logs()).filter(pred)[before], { timeoutMs, detail: async () => `log:\n${(await gw.rawLogs()).slice(-3000)}` });
}

// ---- backends ------------------------------------------------------------------------------

describe('backend refuses connections', () => {
  test('each protocol answers in its own words, logs "backend unavailable", and closes for backend-unavailable', async () => {
    const imap = await loginImap('dead-imap');
    assert.match(imap.lines.join('\n'), /^\* BYE \[UNAVAILABLE\][\s\S]*^a NO \[UNAVAILABLE\]/m);
    const pop = await LineClient.connect(gw.ports['dead-pop3']!, { tls: true });
    await pop.readLine();
    pop.write(`USER ${alice.name}\r\nPASS x\r\n`);
    await pop.readLine();
    assert.match(await pop.readLine(), /^-ERR \[SYS\/TEMP\]/);
    const smtp = await LineClient.connect(gw.ports['dead-smtp']!, { tls: true });
    await smtp.readLine();
    smtp.write(`EHLO x\r\nAUTH PLAIN ${Buffer.from(`\0${alice.name}\0x`).toString('base64')}\r\n`);
    await smtp.readUntil(/^250 /);
    assert.match(await smtp.readLine(), /^421 4\.4\.1/);
    assert.equal(await curlStatus(gw.ports['dead-http']!), '502');
    for (const l of ['dead-imap', 'dead-pop3', 'dead-smtp']) {
      await sessionEnd(l, 'backend-unavailable');
      await gw.waitForLog((x) => x.msg === 'backend unavailable' && x.listener === l && /ECONNREFUSED/.test(String(x.err)));
    }
    await gw.waitForLog((x) => x.msg === 'backend unavailable' && x.listener === 'dead-http');
    await othersServed();
  });
});

describe('backend accepts but never says a word', () => {
  test('IMAP: greeted after backend_connect with defaults; the login ends at login_replay with BYE/NO [UNAVAILABLE]', async () => {
    const { c, lines } = await loginImap('silent-imap');
    assert.match(lines.join('\n'), /^\* BYE \[UNAVAILABLE\]/m);
    assert.match(lines.at(-1)!, /^a NO \[UNAVAILABLE\]/);
    assert.ok(await c.waitClosed());
    const warn = await gw.waitForLog((l) => l.msg === 'backend login replay failed' && l.listener === 'silent-imap');
    assert.equal(warn.code, 'BACKEND_TIMEOUT');
    await sessionEnd('silent-imap', 'backend-timeout');
  });

  test('POP3 and SMTP: -ERR [SYS/TEMP] and 421, reason backend-timeout; HTTPS: 504', async () => {
    const pop = await LineClient.connect(gw.ports['silent-pop3']!, { tls: true });
    assert.match(await pop.readLine(5000), /^\+OK/);
    pop.write(`USER ${alice.name}\r\nPASS x\r\n`);
    await pop.readLine();
    assert.match(await pop.readLine(5000), /^-ERR \[SYS\/TEMP\]/);
    const smtp = await LineClient.connect(gw.ports['silent-smtp']!, { tls: true });
    assert.match(await smtp.readLine(5000), /^220 /);
    smtp.write(`EHLO x\r\nAUTH PLAIN ${Buffer.from(`\0${alice.name}\0x`).toString('base64')}\r\n`);
    await smtp.readUntil(/^250 /);
    assert.match(await smtp.readLine(5000), /^421 4\.4\.1/);
    await sessionEnd('silent-pop3', 'backend-timeout');
    await sessionEnd('silent-smtp', 'backend-timeout');
    assert.equal(await curlStatus(gw.ports['silent-http']!), '504');
    await gw.waitForLog((l) => l.msg === 'backend timed out' && l.listener === 'silent-http');
    await othersServed();
  });
});

describe('backend sends garbage', () => {
  test('IMAP, POP3, SMTP: a clean refusal and BACKEND_PROTOCOL in the log; HTTPS: 502', async () => {
    const { c, lines } = await loginImap('garbage-imap');
    assert.match(lines.at(-1)!, /^a NO \[UNAVAILABLE\]/);
    for (const l of lines) assert.doesNotMatch(l, /garbage|HTTP\/1\.1|\x1b/, 'no backend byte reaches the client before login');
    assert.ok(await c.waitClosed());
    const pop = await LineClient.connect(gw.ports['garbage-pop3']!, { tls: true });
    assert.match(await pop.readLine(5000), /^\+OK/);
    pop.write(`USER ${alice.name}\r\nPASS x\r\n`);
    await pop.readLine();
    assert.match(await pop.readLine(5000), /^-ERR \[SYS\/TEMP\]/);
    const smtp = await LineClient.connect(gw.ports['garbage-smtp']!, { tls: true });
    assert.match(await smtp.readLine(5000), /^220 /);
    smtp.write(`EHLO x\r\nAUTH PLAIN ${Buffer.from(`\0${alice.name}\0x`).toString('base64')}\r\n`);
    await smtp.readUntil(/^250 /);
    assert.match(await smtp.readLine(5000), /^421 /);
    for (const l of ['garbage-imap', 'garbage-pop3', 'garbage-smtp']) {
      const warn = await gw.waitForLog((x) => x.msg === 'backend login replay failed' && x.listener === l);
      assert.equal(warn.code, 'BACKEND_PROTOCOL', `${l}: ${String(warn.err)}`);
      await sessionEnd(l, 'backend-error');
    }
    assert.equal(await curlStatus(gw.ports['garbage-http']!), '502');
    await othersServed();
  });

  test('a backend line longer than max_line is refused as BACKEND_PROTOCOL, not buffered', async () => {
    const { lines } = await loginImap('overlong-imap');
    assert.match(lines.at(-1)!, /^a NO \[UNAVAILABLE\]/);
    const warn = await gw.waitForLog((x) => x.msg === 'backend login replay failed' && x.listener === 'overlong-imap');
    assert.match(String(warn.err), /overlong/);
  });
});

describe('backend resets mid-session', () => {
  test('IMAP: the logged-in client sees a close, the log says backend-closed with the user', async () => {
    const { c, lines } = await loginImap('reset-imap');
    assert.match(lines.at(-1)!, /^a OK/);
    c.write('b NOOP\r\n');
    assert.match(await c.readLine(), /^b OK/);
    const conn = resetImap.open().find((x) => x.user === alice.name);
    assert.ok(conn, 'the backend session is open');
    conn.socket.resetAndDestroy();
    assert.ok(await c.waitClosed(), 'the client is closed too');
    const end = await sessionEnd('reset-imap', 'backend-closed');
    assert.equal(end.user, alice.name);
    await othersServed();
  });

  test('SMTP: a reset during DATA closes the client; no partial message is taken for a whole one', async () => {
    const c = await LineClient.connect(gw.ports['reset-smtp']!, { tls: true });
    await c.readLine();
    c.write(`EHLO x\r\nAUTH PLAIN ${Buffer.from(`\0${alice.name}\0${alice.password}`).toString('base64')}\r\n`);
    await c.readUntil(/^250 /);
    assert.match(await c.readLine(), /^235 /);
    c.write('MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n');
    await c.readLine();
    await c.readLine();
    assert.match(await c.readLine(), /^354/);
    c.write('Subject: half\r\n\r\nfirst half');
    await sleep(100);
    resetSmtp.open().find((x) => x.user === alice.name)?.socket.resetAndDestroy();
    assert.ok(await c.waitClosed());
    await sessionEnd('reset-smtp', 'backend-closed');
    assert.equal(resetSmtp.messages.length, 0);
  });
});

test('a slow backend within the limits still works (300 ms per answer)', async () => {
  const { c, lines } = await loginImap('slow-imap');
  assert.match(lines.at(-1)!, /^a OK/);
  c.write('b SELECT INBOX\r\n');
  assert.match(await c.readLine(5000), /^b OK/);
  c.close();
  const p = await LineClient.connect(gw.ports['slow-pop3']!, { tls: true });
  await p.readLine(5000);
  p.write(`USER ${alice.name}\r\nPASS ${alice.password}\r\nSTAT\r\n`);
  assert.equal(await p.readLine(5000), '+OK');
  assert.match(await p.readLine(5000), /^\+OK Logged in/);
  assert.match(await p.readLine(5000), /^\+OK 0 0/);
  p.close();
});

// ---- config and disk -------------------------------------------------------------------------

describe('the config file goes bad while running', () => {
  test('deleted, or broken YAML: SIGHUP is refused with the reason, the old config keeps serving; a good file is taken again', async () => {
    await rm(gw.configFile);
    const gone = await nextLog((l) => l.msg === 'reload refused, keeping the running configuration', () => gw.signal('SIGHUP'));
    assert.match(String(gone.err), /ENOENT/);
    await othersServed();
    await gw.writeRaw('listeners:\n  - name: imaps\n    protocol: [imap\n');
    const broken = await nextLog((l) => l.msg === 'reload refused, keeping the running configuration', () => gw.signal('SIGHUP'));
    assert.match(String(broken.err), /mailgate\.yaml:\d+:\d+/);
    await othersServed();
    await gw.rewrite(() => undefined);
    await nextLog((l) => l.msg === 'configuration reloaded', () => gw.signal('SIGHUP'));
    await othersServed();
  });
});

/**
 * A 16 KiB tmpfs at `dir`, filled to the last byte: a real full disk (ENOSPC).
 * The suite runs as root; a machine that cannot mount one fails here, by name,
 * rather than testing some other fault instead.
 */
async function fullDisk(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16k,mode=0755', 'tmpfs', dir], { stdio: 'pipe' });
  } catch (err) {
    throw new Error(`cannot mount a 16 KiB tmpfs at ${dir} to fill (the e2e suite runs as root): ${String(err)}`);
  }
  let n = 0;
  try {
    for (;;) await writeFile(join(dir, 'filler'), Buffer.alloc(++n * 1024, 0x61));
  } catch (err) {
    // The write that no longer fits: the disk is full, as wanted.
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  }
}

describe('the disk is full when a certificate is written', () => {
  test('at reload: refused with the cause, the old certificate and config keep serving, nothing half-written', async () => {
    const dir = join(gw.dir, 'full');
    await fullDisk(dir);
    try {
      await gw.rewrite((c) => {
        c.hostname = 'new.e2e.test';
        c.tls = { dir };
      });
      const refused = await nextLog((l) => l.msg === 'reload refused, keeping the running configuration', () => gw.signal('SIGHUP'), 20_000);
      assert.match(String(refused.err), /cannot write the self-signed certificate/);
      assert.match(String(refused.err), /ENOSPC|no space/i);
      const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
      assert.match(await c.readLine(), /mail\.e2e\.test IMAP ready/, 'still the old host name and certificate');
      assert.equal((c.socket as TLSSocket).getPeerCertificate().subject?.CN, 'mail.e2e.test');
      c.close();
      await othersServed();
      assert.deepEqual((await readdir(dir)).sort(), ['filler'], 'no temporary or partial file');
    } finally {
      execFileSync('umount', [dir], { stdio: 'ignore' });
      await gw.rewrite(() => undefined);
    }
  });

  test('at first start: the daemon exits 1 with the cause in its log, and writes nothing', async (t) => {
    const dir = await makeTempDir('fullstart');
    t.after(() => removeTempDir(dir));
    const certs = join(dir, 'certs');
    await fullDisk(certs);
    try {
      const port = await freePort();
      const file = join(dir, 'mailgate.yaml');
      await writeFile(file, `hostname: mail.e2e.test\ntls: { dir: ./certs }\ncontrol: { enabled: false }\nlisteners:\n  - { name: imaps, protocol: imap, listen: "127.0.0.1:${port}", tls: implicit, backend: "127.0.0.1:${dovecot.imapPort}" }\n`);
      const r = await run(process.execPath, [CLI, 'run', '-c', file], { timeoutMs: 30_000 });
      assert.equal(r.code, 1);
      const fatal = r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as LogLine).find((l) => l.msg === 'start failed');
      assert.ok(fatal, r.stdout + r.stderr);
      assert.match(String(fatal.err), /cannot write the self-signed certificate.*(ENOSPC|no space)/i);
      assert.deepEqual((await readdir(certs)).sort(), ['filler']);
      // Nothing listens: the daemon is gone.
      await assert.rejects(new Promise<void>((resolve, reject) => net.connect(port, '127.0.0.1', () => resolve()).on('error', reject)));
    } finally {
      execFileSync('umount', [certs], { stdio: 'ignore' });
    }
  });
});
