/**
 * Attacks from the literature against the running daemon, each with the
 * bytes an attacker sends and what the gateway must (not) do. Real Dovecot
 * and Postfix's smtp-sink where their logs are the evidence; small fake
 * backends where the backend itself is the attacker or its received bytes
 * are the evidence.
 *
 * Covered elsewhere (not repeated here): client-side STARTTLS command
 * injection for IMAP and POP3 (imap.test.ts, pop3.test.ts), PREAUTH on an
 * implicit-TLS listener (imap.test.ts), an HTTPS client on IMAPS and an IMAP
 * ALPN client on 443 (imap.test.ts, http.test.ts), an SMTP early talker on a
 * STARTTLS port with greet_delay (smtp.test.ts), a stalled TLS handshake and
 * a silent client (imap.test.ts).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { LineClient, run } from './harness/clients.ts';
import { startFakeImap, startFakePop3, startFakeSmtp, startRawBackend, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { sleep } from '../helpers/proc.ts';
import { startDovecot, startSmtpSink, userByName, type Dovecot, type SmtpServer } from './harness/servers.ts';

const alice = userByName('alice');
let dovecot: Dovecot;
let preauth: Dovecot;
let sink: SmtpServer;
let evilImap: FakeBackend;
let evilPop3: FakeBackend;
let evilSmtp: FakeBackend;
let capturePop3: FakeBackend;
let captureImap: FakeBackend;
let slowSmtp: FakeBackend;
let captureSmtp: FakeBackend & { messages: Buffer[] };
let web: FakeBackend;
let gw: Gateway;

const TIGHT = { timeouts: { tls_handshake: '1s', preauth_idle: '1s', preauth_total: '2500ms' }, limits: { max_sasl: 1024 } };

/** Lines a malicious backend adds to everything it says, hoping the gateway passes them on to a client after its TLS switch. */
const INJECT_IMAP = '* OK injected-untagged\r\n* CAPABILITY INJECTED\r\na OK injected-tagged\r\n';

before(async () => {
  dovecot = await startDovecot();
  preauth = await startDovecot({ preauth: true });
  sink = await startSmtpSink({ xclient: true });
  evilImap = await startFakeImap({
    greeting: `* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN {5} "x" X]Y LITERAL+] evil ready\r\n${INJECT_IMAP}`,
    override: (line) => {
      const tag = line.split(' ')[0];
      if (/^P1 CAPABILITY/i.test(line)) return `* CAPABILITY IMAP4rev1 STARTTLS {7} X\rY "q" AUTH=PLAIN\r\n${INJECT_IMAP}P1 OK\r\n`;
      if (/^M2 /.test(line)) return `${INJECT_IMAP}M2 NO [AUTHENTICATIONFAILED] no\r\n`;
      return `${INJECT_IMAP}${tag} OK\r\n`;
    },
  });
  evilPop3 = await startFakePop3({
    greeting: '+OK evil ready\r\n+OK injected\r\n',
    override: (line) => (/^CAPA/i.test(line) ? '+OK\r\nTOP\r\n.injected\r\n\r\n+OK injected\r\nSTLS\r\nUSER\r\nX\rY\r\n.\r\n+OK injected\r\n' : undefined),
  });
  evilSmtp = await startFakeSmtp({ greeting: '220 evil ESMTP\r\n250 injected\r\n', capabilities: ['STARTTLS', 'AUTH PLAIN', 'XCLIENT ADDR', 'X\rINJECTED'] });
  // No SASL: the gateway replays USER/PASS, so the bytes the client typed are what the backend gets.
  capturePop3 = await startFakePop3({ capabilities: ['XCLIENT'], sasl: false });
  captureImap = await startFakeImap({ override: (line) => (line.startsWith('PROXY ') ? '' : undefined) });
  captureSmtp = await startFakeSmtp({ users: { [alice.name]: alice.password } });
  slowSmtp = await startRawBackend((socket) => {
    setTimeout(() => socket.write('220 slow ESMTP\r\n'), 1500);
    socket.on('data', (d: Buffer) => {
      if (/^EHLO/im.test(d.toString())) socket.write('250-slow\r\n250 PIPELINING\r\n');
      if (/^QUIT/im.test(d.toString())) socket.end('221 bye\r\n');
    });
  });
  web = await startRawBackend((socket) => {
    socket.on('data', () => socket.end('HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n'));
  });
  const d = `127.0.0.1:${dovecot.imapPort}`;
  const p = `127.0.0.1:${dovecot.pop3Port}`;
  const s = `127.0.0.1:${sink.port}`;
  gw = await startGateway({
    extra: { brute_force: { enabled: false } },
    listeners: [
      { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: d },
      { name: 'imap', protocol: 'imap', tls: 'starttls', backend: d },
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: p },
      { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: s, auth: 'required' },
      { name: 'submission', protocol: 'smtp', tls: 'starttls', backend: s, auth: 'required' },
      { name: 'mx', protocol: 'smtp', tls: 'starttls', backend: s, auth: 'none', xclient: true },
      { name: 'mx-capture', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${captureSmtp.port}`, auth: 'none', xclient: true },
      { name: 'smtps-capture', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${captureSmtp.port}`, auth: 'required' },
      { name: 'smtps-delay', protocol: 'smtp', tls: 'implicit', backend: s, auth: 'required', greet_delay: '1s' },
      { name: 'smtp-slowprobe', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${slowSmtp.port}`, auth: 'none', timeouts: { backend_connect: '3s' } },
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${web.port}` },
      { name: 'evil-imap', protocol: 'imap', tls: 'starttls', backend: `127.0.0.1:${evilImap.port}` },
      { name: 'evil-pop3', protocol: 'pop3', tls: 'starttls', backend: `127.0.0.1:${evilPop3.port}` },
      { name: 'evil-smtp', protocol: 'smtp', tls: 'starttls', backend: `127.0.0.1:${evilSmtp.port}`, auth: 'required' },
      { name: 'preauth-starttls', protocol: 'imap', tls: 'starttls', backend: `127.0.0.1:${preauth.imapPort}` },
      { name: 'capture-pop3', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${capturePop3.port}` },
      { name: 'proxy-imap', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${captureImap.port}`, proxy_protocol: 'v1', imap_id: false },
      { name: 'tight', protocol: 'imap', tls: 'implicit', backend: d, ...TIGHT },
      { name: 'tight-starttls', protocol: 'imap', tls: 'starttls', backend: d, ...TIGHT },
      { name: 'tight-pop3', protocol: 'pop3', tls: 'implicit', backend: p, ...TIGHT },
      { name: 'tight-smtp', protocol: 'smtp', tls: 'implicit', backend: s, auth: 'required', ...TIGHT },
      { name: 'tight-https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${web.port}`, timeouts: { tls_handshake: '1s', preauth_idle: '1500ms' } },
      { name: 'flood', protocol: 'imap', tls: 'starttls', backend: d },
      { name: 'small', protocol: 'imap', tls: 'starttls', backend: d, limits: { max_connections: 20 } },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await Promise.allSettled([dovecot?.stop(), preauth?.stop(), sink?.stop()]);
  for (const b of [evilImap, evilPop3, evilSmtp, capturePop3, captureImap, captureSmtp, slowSmtp, web]) await b?.close();
});

// ---- helpers ------------------------------------------------------------------------

/** The first flight of a real TLS client (its ClientHello), captured from a local socket. */
async function clientHello(): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as net.AddressInfo).port;
  const got = new Promise<Buffer>((resolve) => server.once('connection', (s) => s.once('data', (d: Buffer) => (resolve(d), s.destroy()))));
  const c = tls.connect({ port, host: '127.0.0.1', servername: 'mail.e2e.test', rejectUnauthorized: false });
  c.on('error', () => undefined);
  const hello = await got;
  c.destroy();
  server.close();
  return hello;
}

interface Trickle {
  closed: boolean;
  received: string;
  bytesSent: number;
}

/**
 * Slowloris: after `prefix` (sent at once, optionally over TLS), sends
 * `drip` one byte every `everyMs` until the server closes or `limitMs` pass.
 */
function trickle(port: number, opts: { prefix?: string; drip: Buffer; everyMs: number; limitMs: number; tls?: boolean; waitFor?: RegExp }): Promise<Trickle> {
  return new Promise((resolve) => {
    const socket: net.Socket = opts.tls ? tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false, servername: 'mail.e2e.test' }) : net.connect({ port, host: '127.0.0.1' });
    let received = '';
    let sent = 0;
    let timer: NodeJS.Timeout | undefined;
    let done = false;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearInterval(timer);
      clearTimeout(limit);
      socket.destroy();
      resolve({ closed, received, bytesSent: sent });
    };
    const limit = setTimeout(() => finish(false), opts.limitMs);
    socket.on('data', (d: Buffer) => {
      received += d.toString('latin1');
      if (opts.waitFor && !timer && opts.waitFor.test(received)) start();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => finish(true));
    const start = () => {
      if (opts.prefix) socket.write(opts.prefix);
      timer = setInterval(() => {
        if (socket.destroyed) return;
        socket.write(opts.drip.subarray(sent % opts.drip.length, (sent % opts.drip.length) + 1));
        sent++;
      }, opts.everyMs);
    };
    socket.once(opts.tls ? 'secureConnect' : 'connect', () => {
      if (!opts.waitFor) start();
    });
  });
}

/** openssl s_client with a script: waits for `ready` on stdout, writes `input`, collects output for `ms`. */
function sClient(args: string[], ready: RegExp, input: string, ms: number): Promise<string> {
  return new Promise((resolve) => {
    const child = spawn('openssl', ['s_client', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let sent = false;
    const onData = (d: Buffer) => {
      out += d.toString('latin1');
      if (!sent && ready.test(out)) {
        sent = true;
        child.stdin.write(input);
        setTimeout(() => child.kill('SIGTERM'), ms);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', () => undefined);
    const hard = setTimeout(() => child.kill('SIGKILL'), ms + 10_000);
    child.on('close', () => {
      clearTimeout(hard);
      resolve(out);
    });
  });
}

const b64 = (s: string) => Buffer.from(s, 'latin1').toString('base64');

// ---- STARTTLS injection -------------------------------------------------------------

describe('STARTTLS response injection from the backend side', () => {
  test('IMAP: a backend that injects lines and non-atom capabilities gets none of them in front of the client', async () => {
    const c = await LineClient.connect(gw.ports['evil-imap']!);
    const greeting = await c.readLine();
    assert.match(greeting, /^\* OK \[CAPABILITY [^\]]*\] mail\.e2e\.test IMAP ready$/);
    c.write('a STARTTLS\r\n');
    assert.equal(await c.readLine(), 'a OK Begin TLS negotiation now');
    await c.startTls();
    c.write('b CAPABILITY\r\n');
    const capa = await c.readUntil(/^b /);
    assert.equal(capa.length, 2, `only the gateway's answer: ${JSON.stringify(capa)}`);
    assert.match(capa[0]!, /^\* CAPABILITY IMAP4rev1 [\x21-\x7e ]+$/);
    for (const atom of capa[0]!.slice('* CAPABILITY '.length).split(' ')) assert.match(atom, /^[^(){%*"\\\]]+$/, atom);
    assert.doesNotMatch(capa[0]!, /STARTTLS|LOGINDISABLED|INJECTED/);
    assert.equal(await c.readFor(200), '', 'nothing else arrives');
    c.write(`c LOGIN ${alice.name} wrong\r\n`);
    const login = await c.readUntil(/^c /);
    assert.match(login.at(-1)!, /^c NO /);
    for (const l of login) assert.doesNotMatch(l, /injected-tagged|^a OK/, 'a forged tagged answer never reaches the client');
    c.close();
    // The client's own pre-login commands never reached the backend.
    for (const t of evilImap.transcripts()) assert.doesNotMatch(t, /STARTTLS|b CAPABILITY/);
  });

  test('POP3: CAPA lines that would end or forge the list are dropped; injected status lines never reach the client', async () => {
    const c = await LineClient.connect(gw.ports['evil-pop3']!);
    assert.equal(await c.readLine(), '+OK mail.e2e.test POP3 ready');
    c.write('STLS\r\n');
    assert.equal(await c.readLine(), '+OK Begin TLS negotiation');
    await c.startTls();
    c.write('CAPA\r\n');
    const lines = await c.readUntil(/^\.$/);
    assert.equal(lines[0], '+OK Capability list follows');
    assert.deepEqual(lines.slice(1, -1).sort(), ['SASL PLAIN LOGIN', 'TOP', 'USER'].sort(), `CAPA: ${JSON.stringify(lines)}`);
    assert.equal(await c.readFor(200), '');
    c.close();
  });

  test('SMTP: a backend that injects a reply in its greeting and dirty EHLO keywords: clean EHLO for the client, clean failure at login', async () => {
    const c = await LineClient.connect(gw.ports['evil-smtp']!);
    assert.match(await c.readLine(), /^220 mail\.e2e\.test /);
    c.write('EHLO client.example\r\n');
    const before = await c.readUntil(/^250 /);
    assert.equal(before.filter((l) => /STARTTLS/.test(l)).length, 1);
    c.write('STARTTLS\r\n');
    assert.match(await c.readLine(), /^220 2\.0\.0/);
    await c.startTls();
    c.write('EHLO client.example\r\n');
    const ehlo = await c.readUntil(/^250 /);
    assert.ok(!ehlo.some((l) => /STARTTLS|INJECTED|injected|XCLIENT/.test(l)), JSON.stringify(ehlo));
    assert.ok(ehlo.some((l) => /^250[ -]AUTH PLAIN LOGIN$/.test(l)));
    // The injected "250" desynchronises the replay: the gateway must notice and refuse cleanly, not log the client in.
    c.write(`AUTH PLAIN ${b64(`\0${alice.name}\0secret`)}\r\n`);
    const answer = await c.readLine();
    assert.match(answer, /^(421|535|454) /, answer);
    c.close();
  });
});

describe('STARTTLS command injection (CVE-2011-0411) on SMTP', () => {
  test('MX: a MAIL FROM pipelined with STARTTLS is discarded; the envelope the backend gets is the one sent over TLS', async () => {
    const c = await LineClient.connect(gw.ports.mx!);
    await c.readLine();
    c.write('EHLO client.example\r\n');
    await c.readUntil(/^250 /);
    c.write('STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<victim@e2e.test>\r\n');
    assert.match(await c.readLine(), /^220 2\.0\.0 Ready to start TLS$/);
    await c.startTls();
    assert.equal(await c.readFor(300), '', 'nothing answers the injected commands');
    c.write('EHLO client.example\r\n');
    await c.readUntil(/^250 /);
    const marker = `cve-2011-0411-${Date.now()}`;
    c.write('MAIL FROM:<real@sender.example>\r\n');
    assert.match(await c.readLine(), /^250/);
    c.write('RCPT TO:<b@e2e.test>\r\nDATA\r\n');
    assert.match(await c.readLine(), /^250/);
    assert.match(await c.readLine(), /^354/);
    c.write(`Subject: ${marker}\r\n\r\nbody\r\n.\r\nQUIT\r\n`);
    assert.match(await c.readLine(), /^250/);
    const msgs = await sink.waitForMessages(1);
    const idx = msgs.findIndex((m) => m.includes(marker));
    assert.ok(idx >= 0);
    const env = (await sink.envelopes())[idx]!;
    assert.match(env.from, /real@sender\.example/);
    assert.doesNotMatch(JSON.stringify(await sink.envelopes()), /injected@evil/);
    c.close();
  });

  test('submission: AUTH pipelined with STARTTLS is discarded, not answered after TLS', async () => {
    const c = await LineClient.connect(gw.ports.submission!);
    await c.readLine();
    c.write('EHLO client.example\r\n');
    await c.readUntil(/^250 /);
    c.write(`STARTTLS\r\nAUTH PLAIN ${b64(`\0${alice.name}\0x`)}\r\n`);
    assert.match(await c.readLine(), /^220 /);
    await c.startTls();
    assert.equal(await c.readFor(300), '');
    c.write('NOOP\r\n');
    assert.match(await c.readLine(), /^250 /);
    c.close();
  });
});

test('PREAUTH downgrade on a STARTTLS port: the client gets * OK with STARTTLS, never PREAUTH, and no logged-in session', async () => {
  const c = await LineClient.connect(gw.ports['preauth-starttls']!);
  const greeting = await c.readLine();
  assert.match(greeting, /^\* OK \[CAPABILITY .*STARTTLS.*LOGINDISABLED.*\]/);
  c.write('a SELECT INBOX\r\n');
  assert.match(await c.readLine(), /^a BAD Command SELECT is not valid before login/);
  c.write('b STARTTLS\r\n');
  await c.readLine();
  await c.startTls();
  c.write(`c LOGIN ${alice.name} ${alice.password}\r\n`);
  const lines = await c.readUntil(/^c /);
  assert.doesNotMatch(lines.join('\n'), /PREAUTH/);
  assert.match(lines.at(-1)!, /^c NO \[UNAVAILABLE\]/);
  await gw.waitForLog((l) => l.msg === 'backend login replay failed' && l.listener === 'preauth-starttls' && /PREAUTH/.test(String(l.err)));
});

// ---- ALPACA ----------------------------------------------------------------------------

describe('ALPACA cross-protocol', () => {
  test('curl (an HTTPS client) is refused at the handshake on IMAPS, POP3S and SMTPS', async () => {
    for (const name of ['imaps', 'pop3s', 'smtps']) {
      const r = await run('curl', ['-sS', '-k', '--max-time', '5', `https://127.0.0.1:${gw.ports[name]}/`]);
      assert.notEqual(r.code, 0, `${name}: curl must fail`);
      assert.match(r.stderr, /no application protocol|alert|SSL/i, `${name}: ${r.stderr}`);
      assert.doesNotMatch(r.stdout, /HTTP\//);
    }
    await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'smtps' && l.reason === 'tls-handshake-failed');
  });

  test('an HTTP request over TLS without ALPN on IMAPS gets IMAP errors, never an HTTP response, and the bound ends it', async () => {
    const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
    await c.readLine();
    c.write('GET / HTTP/1.1\r\nHost: mail.e2e.test\r\nUser-Agent: <script>alert(1)</script>\r\n\r\n');
    const lines = [await c.readLine(), await c.readLine(), await c.readLine(), await c.readLine()];
    for (const l of lines) assert.match(l, /^(\S+|\*) BAD /, l);
    assert.ok(!lines.some((l) => /^HTTP\//.test(l)));
    assert.ok(!lines.some((l) => /<script>/i.test(l.replace(/^\S+ /, ''))), `the client's text is not reflected: ${JSON.stringify(lines)}`);
    c.close();
  });

  test('an IMAP client without ALPN on the HTTPS port gets 400 Bad Request and a close', async () => {
    const c = await LineClient.connect(gw.ports.https!, { tls: true });
    c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
    assert.match(await c.readLine(), /^HTTP\/1\.1 400 /);
    assert.ok(await c.waitClosed());
  });
});

// ---- SMTP early talkers and pipelining ----------------------------------------------------

describe('SMTP talking before the greeting', () => {
  test('implicit TLS with greet_delay: EHLO right after the handshake is refused with 554', async () => {
    const c = await LineClient.connect(gw.ports['smtps-delay']!, { tls: true });
    c.write('EHLO too.early\r\n');
    assert.match(await c.readLine(), /^554 5\.5\.1/);
    assert.ok(await c.waitClosed());
    await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'smtps-delay' && l.reason === 'early-talker');
  });

  test('no greet_delay, but the greeting waits for a slow backend probe: a client that does not wait is refused', async () => {
    const c = await LineClient.connect(gw.ports['smtp-slowprobe']!);
    c.write('EHLO pipelining.spam\r\nMAIL FROM:<a@b>\r\n');
    assert.match(await c.readLine(4000), /^554 5\.5\.1/);
    assert.ok(await c.waitClosed());
  });

  test('RFC 2920 pipelining after the greeting works: AUTH, MAIL, RCPT, DATA and the message in one write', async () => {
    const c = await LineClient.connect(gw.ports['smtps-capture']!, { tls: true });
    await c.readLine();
    c.write('EHLO client.example\r\n');
    await c.readUntil(/^250 /);
    const marker = `pipelined-${Date.now()}`;
    c.write(`AUTH PLAIN ${b64(`\0${alice.name}\0${alice.password}`)}\r\nMAIL FROM:<alice@e2e.test>\r\nRCPT TO:<b@e2e.test>\r\nDATA\r\n`);
    assert.match(await c.readLine(), /^235 /);
    assert.match(await c.readLine(), /^250/);
    assert.match(await c.readLine(), /^250/);
    assert.match(await c.readLine(), /^354/);
    c.write(`Subject: ${marker}\r\n\r\nhi\r\n.\r\nQUIT\r\n`);
    assert.match(await c.readLine(), /^250/);
    assert.match(await c.readLine(), /^221/);
    assert.ok(captureSmtp.messages.some((m) => m.includes(marker)));
  });
});

// ---- CR/LF/NUL in logins ------------------------------------------------------------------

describe('CR, LF and NUL in logins never reach XCLIENT, ID or PROXY', () => {
  test('IMAP: a user name or ID value with CR/LF/NUL is refused or cleaned; Dovecot logs the real address only', async () => {
    const c = await LineClient.connect(gw.ports.imaps!, { tls: true, localAddress: '127.0.0.6' });
    await c.readLine();
    const evil = `alice\r\nM9 LOGIN bob secret`;
    c.write(`a LOGIN {${evil.length}+}\r\n${evil} pw\r\n`);
    assert.match(await c.readLine(), /^a BAD /);
    c.write('b LOGIN "alice\rx" pw\r\n');
    assert.match(await c.readLine(), /^b BAD /);
    c.write(`c AUTHENTICATE PLAIN ${b64('\0alice\0pw\0x')}\r\n`);
    assert.match(await c.readLine(), /^c BAD /);
    const idValue = 'TB" "x-originating-ip" "6.6.6.6\r\nM1 OK';
    c.write(`d ID ("name" {${idValue.length}+}\r\n${idValue} "x-originating-ip" "6.6.6.6")\r\n`);
    assert.match((await c.readUntil(/^d /)).at(-1)!, /^d OK/);
    c.write(`e LOGIN ${alice.name} ${alice.password}\r\n`);
    assert.match((await c.readUntil(/^e /)).at(-1)!, /^e OK/);
    c.write('f LOGOUT\r\n');
    await c.waitClosed();
    let logs = '';
    const deadline = Date.now() + 5000;
    // The ID line comes first; wait for the login line itself.
    while (Date.now() < deadline && !/Login: user=<alice>.*rip=127\.0\.0\.6/.test(logs)) {
      logs = await dovecot.logs();
      await new Promise((r) => setTimeout(r, 25));
    }
    assert.match(logs, /Login: user=<alice>.*rip=127\.0\.0\.6/);
    const id = logs.split('\n').find((l) => /ID sent: .*x-originating-ip=127\.0\.0\.6/.test(l));
    assert.ok(id, 'Dovecot logged the ID the gateway sent');
    // The client's value stays one quoted value (CR/LF removed), its own x-originating-ip key is dropped.
    assert.equal((id.match(/x-originating-ip=/g) ?? []).length, 1, id);
    assert.match(id, /name=TB" "x-originating-ip" "6\.6\.6\.6M1 OK, x-originating-ip=127\.0\.0\.6,/);
    assert.doesNotMatch(logs, /x-originating-ip=6\.6\.6\.6|rip=6\.6\.6\.6|user=<bob>/);
  });

  test('POP3: a bare CR or NUL in USER/PASS is refused; the backend gets XCLIENT with the real address and clean commands', async () => {
    // Without SASL in CAPA, the login is replayed as USER/PASS: the client's text goes to the backend as typed.
    const before = capturePop3.connections.length;
    const c = await LineClient.connect(gw.ports['capture-pop3']!, { tls: true, localAddress: '127.0.0.7' });
    await c.readLine();
    c.write('USER alice\rXCLIENT ADDR=6.6.6.6\r\n');
    assert.match(await c.readLine(), /^-ERR /);
    c.write('USER alice\r\nPASS se\0cret\r\n');
    assert.equal(await c.readLine(), '+OK');
    assert.match(await c.readLine(), /^-ERR /);
    c.write('USER alice\r\nPASS secret\r\n');
    assert.equal(await c.readLine(), '+OK');
    assert.match(await c.readLine(), /^\+OK/);
    c.write('QUIT\r\n');
    await c.waitClosed();
    const sent = capturePop3.connections.slice(before).map((x) => x.text()).join('');
    assert.doesNotMatch(sent, /6\.6\.6\.6/);
    assert.doesNotMatch(sent, /\0/);
    for (const line of sent.split('\r\n')) assert.doesNotMatch(line, /\r/, JSON.stringify(line));
    assert.match(sent, /XCLIENT ADDR=127\.0\.0\.7 PORT=\d+\r\n/);
  });

  test('SMTP: an EHLO name with CR and a fake ADDR reaches XCLIENT as one clean HELO value, ADDR is the real address', async () => {
    const before = captureSmtp.connections.length;
    const c = await LineClient.connect(gw.ports['mx-capture']!, { localAddress: '127.0.0.8' });
    await c.readLine();
    c.write('EHLO evil\rXCLIENT ADDR=6.6.6.6\r\n');
    await c.readUntil(/^250 /);
    c.write(`AUTH PLAIN ${b64('\0al\r\nice\0pw')}\r\n`);
    assert.match(await c.readLine(), /^503 /, 'no AUTH on an MX listener');
    c.write('MAIL FROM:<a\0b@x>\r\n');
    assert.match(await c.readLine(), /^501 /);
    c.write('MAIL FROM:<crlf@sender.example>\r\n');
    assert.match(await c.readLine(), /^250/);
    c.write('QUIT\r\n');
    await c.waitClosed();
    const sent = captureSmtp.connections.slice(before).map((x) => x.text()).join('');
    const xclient = sent.split('\r\n').filter((l) => l.startsWith('XCLIENT '));
    assert.deepEqual(xclient.length, 1, sent);
    assert.match(xclient[0]!, /^XCLIENT PROTO=ESMTP HELO=evilXCLIENT ADDR=127\.0\.0\.8 PORT=\d+$/);
    for (const line of sent.split('\r\n')) assert.doesNotMatch(line, /[\r\0]/);
    assert.doesNotMatch(sent, /6\.6\.6\.6/);
  });

  test('SMTP: Postfix\'s smtp-sink logs the same clean HELO (its XCLIENT takes HELO only)', async () => {
    const c = await LineClient.connect(gw.ports.mx!);
    await c.readLine();
    c.write('EHLO evil2\rXCLIENT ADDR=6.6.6.6\r\nMAIL FROM:<sink@sender.example>\r\n');
    await c.readUntil(/^250 /);
    assert.match(await c.readLine(), /^250/);
    c.write('QUIT\r\n');
    await c.waitClosed();
    let logs = '';
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && !/XCLIENT HELO=evil2XCLIENT/.test(logs)) logs = await sink.logs();
    assert.match(logs, /: XCLIENT HELO=evil2XCLIENT\n/);
    assert.doesNotMatch(logs, /ADDR=6\.6\.6\.6/);
  });

  test('PROXY v1: the backend\'s first bytes name the real client, whatever the client typed', async () => {
    const before = captureImap.connections.length;
    const c = await LineClient.connect(gw.ports['proxy-imap']!, { tls: true, localAddress: '127.0.0.9' });
    await c.readLine();
    c.write('a LOGIN "alice\rPROXY TCP4 6.6.6.6 6.6.6.6 1 1" x\r\n');
    assert.match(await c.readLine(), /^a BAD /);
    c.write('b LOGIN alice secret\r\n');
    assert.match((await c.readUntil(/^b /)).at(-1)!, /^b OK/);
    c.close();
    const sessions = captureImap.connections.slice(before).map((x) => x.text()).filter((t) => /AUTHENTICATE|LOGIN/.test(t));
    assert.equal(sessions.length, 1);
    assert.match(sessions[0]!, new RegExp(`^PROXY TCP4 127\\.0\\.0\\.9 127\\.0\\.0\\.1 \\d+ ${gw.ports['proxy-imap']}\\r\\n`));
    assert.doesNotMatch(sessions[0]!, /6\.6\.6\.6/);
  });
});

// ---- TLS renegotiation and compression -------------------------------------------------------

describe('TLS renegotiation and compression', () => {
  const cases: [string, string[], RegExp][] = [
    ['imaps', [], /\* OK /],
    ['https', [], /Verification|Verify return code/],
    ['submission', ['-starttls', 'smtp'], /250 /],
  ];
  for (const [name, extra, ready] of cases) {
    test(`${name}: a client-initiated renegotiation on TLS 1.2 is refused (no_renegotiation), compression is off`, async () => {
      const out = await sClient(['-connect', `127.0.0.1:${gw.ports[name]}`, '-tls1_2', '-servername', 'mail.e2e.test', '-msg', ...extra], ready, 'R\n', 1500);
      assert.match(out, /Compression: NONE/);
      assert.match(out, /RENEGOTIATING/);
      const after = out.slice(out.indexOf('RENEGOTIATING'));
      assert.match(after, /no[_ ]renegotiation|handshake failure|alert/i, 'the server refuses the new handshake');
      assert.doesNotMatch(after, /<<< TLS 1\.2, Handshake \[length [0-9a-f]+\], ServerHello/, 'no second ServerHello');
    });
  }
});

// ---- oversized SASL ----------------------------------------------------------------------------

describe('oversized SASL exchanges', () => {
  test('IMAP: a SASL response over max_sasl gets BAD, one over max_line ends the session', async () => {
    const c = await LineClient.connect(gw.ports.tight!, { tls: true });
    await c.readLine();
    c.write('a AUTHENTICATE PLAIN\r\n');
    assert.equal(await c.readLine(), '+ ');
    c.write(`${'QUFB'.repeat(500)}\r\n`);
    assert.equal(await c.readLine(), 'a BAD Authentication exchange line is too long');
    c.write(`b AUTHENTICATE PLAIN ${'QUFB'.repeat(500)}\r\n`);
    assert.equal(await c.readLine(), 'b BAD Authentication exchange line is too long');
    c.write('c AUTHENTICATE PLAIN\r\n');
    await c.readLine();
    c.write(`${'QUFB'.repeat(5000)}\r\n`);
    assert.equal(await c.readLine(), '* BYE [TOOBIG] Line too long');
    assert.ok(await c.waitClosed());
  });

  test('POP3 and SMTP: the same bound, in their own words', async () => {
    const p = await LineClient.connect(gw.ports['tight-pop3']!, { tls: true });
    await p.readLine();
    p.write(`AUTH PLAIN ${'QUFB'.repeat(500)}\r\n`);
    assert.match(await p.readLine(), /^-ERR Authentication exchange line is too long/);
    p.close();
    const s = await LineClient.connect(gw.ports['tight-smtp']!, { tls: true });
    await s.readLine();
    s.write('EHLO x\r\nAUTH PLAIN\r\n');
    await s.readUntil(/^250 /);
    assert.match(await s.readLine(), /^334 /);
    s.write(`${'QUFB'.repeat(500)}\r\n`);
    assert.match(await s.readLine(), /^500 5\.5\.6/);
    s.close();
  });
});

// ---- slowloris ------------------------------------------------------------------------------

test('slowloris: one byte every 250 ms is cut off in every pre-auth state (handshake, command, SASL, literal, USER, EHLO, HTTP headers)', async () => {
  const hello = await clientHello();
  const drip = Buffer.from('a'.repeat(200));
  const every = 250;
  const limitMs = 8000;
  const runs: Record<string, Promise<Trickle>> = {
    'tls handshake (imaps)': trickle(gw.ports.tight!, { drip: hello, everyMs: every, limitMs }),
    'tls handshake (https)': trickle(gw.ports['tight-https']!, { drip: hello, everyMs: every, limitMs }),
    'imap command': trickle(gw.ports.tight!, { tls: true, waitFor: /^\* OK/m, prefix: 'a NOOP', drip, everyMs: every, limitMs }),
    'imap sasl': trickle(gw.ports.tight!, { tls: true, waitFor: /^\* OK/m, prefix: 'a AUTHENTICATE PLAIN\r\n', drip, everyMs: every, limitMs }),
    'imap literal': trickle(gw.ports.tight!, { tls: true, waitFor: /^\* OK/m, prefix: 'a LOGIN {500}\r\n', drip, everyMs: every, limitMs }),
    'pop3 after USER': trickle(gw.ports['tight-pop3']!, { tls: true, waitFor: /^\+OK/m, prefix: 'USER alice\r\nPASS ', drip, everyMs: every, limitMs }),
    'smtp after EHLO': trickle(gw.ports['tight-smtp']!, { tls: true, waitFor: /^220 /m, prefix: 'EHLO x\r\nAUTH PLAIN ', drip, everyMs: every, limitMs }),
    'http headers': trickle(gw.ports['tight-https']!, { tls: true, prefix: 'GET / HTTP/1.1\r\nHost: mail.e2e.test\r\nX-Slow: ', drip, everyMs: every, limitMs }),
  };
  const results = Object.fromEntries(await Promise.all(Object.entries(runs).map(async ([k, p]) => [k, await p] as const)));
  for (const [what, r] of Object.entries(results)) {
    assert.ok(r.closed, `${what}: still open after ${limitMs} ms (${r.bytesSent} bytes trickled)`);
  }
  assert.match(results['imap command']!.received, /\* BYE Idle timeout/);
  assert.match(results['smtp after EHLO']!.received, /421 4\.4\.2/);
  assert.match(results['pop3 after USER']!.received, /-ERR Disconnected for inactivity/);
  assert.match(results['http headers']!.received, /^$|^HTTP\/1\.1 408 /);
  await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'tight' && l.reason === 'tls-handshake-timeout');
  await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'tight-https' && (l.reason === 'tls-handshake-timeout' || l.reason === 'tls-handshake-failed'));
});

test('slowloris: a ClientHello trickled after STARTTLS is cut off by the handshake deadline', async () => {
  const hello = await clientHello();
  const socket = net.connect({ port: gw.ports['tight-starttls']!, host: '127.0.0.1' });
  let received = '';
  socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
  socket.on('error', () => undefined);
  const closed = new Promise<void>((r) => socket.once('close', () => r()));
  while (!/^\* OK/m.test(received)) await sleep(20);
  socket.write('a STARTTLS\r\n');
  while (!/a OK Begin TLS/.test(received)) await sleep(20);
  let i = 0;
  const timer = setInterval(() => {
    if (!socket.destroyed && i < hello.length) socket.write(hello.subarray(i, ++i));
  }, 250);
  const cut = await Promise.race([closed.then(() => true), sleep(6000).then(() => false)]);
  clearInterval(timer);
  socket.destroy();
  assert.ok(cut, 'closed by the 1 s handshake deadline');
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'tight-starttls');
  assert.ok(['tls-handshake-timeout', 'idle-timeout'].includes(String(end.reason)), `closed for ${String(end.reason)}`);
});

// ---- many connections from one address -------------------------------------------------------

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0);
}

/** Opens a connection, waits for the first line (or a close), and closes. */
function greetOnce(port: number): Promise<'greeted' | 'dropped'> {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    const t = setTimeout(() => (s.destroy(), resolve('dropped')), 10_000);
    s.once('data', () => {
      clearTimeout(t);
      s.destroy();
      resolve('greeted');
    });
    s.on('error', () => undefined);
    s.once('close', () => {
      clearTimeout(t);
      resolve('dropped');
    });
  });
}

test('2,000 quick connections from one address: every one greeted, the daemon stays responsive and its memory bounded', async () => {
  const before = rssKb(gw.proc.pid);
  let greeted = 0;
  let next = 0;
  const total = 2000;
  const worker = async () => {
    while (next < total) {
      next++;
      if ((await greetOnce(gw.ports.flood!)) === 'greeted') greeted++;
    }
  };
  await Promise.all(Array.from({ length: 50 }, worker));
  assert.equal(greeted, total);
  const c = await LineClient.connect(gw.ports.imaps!, { tls: true });
  await c.readLine();
  c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
  assert.match((await c.readUntil(/^a /)).at(-1)!, /^a OK/, 'a normal login still works');
  c.close();
  const afterKb = rssKb(gw.proc.pid);
  process.stdout.write(`# flood: 2000 connections, daemon RSS ${before} kB -> ${afterKb} kB\n`);
  assert.ok(afterKb - before < 150 * 1024, `RSS grew by ${afterKb - before} kB`);
});

test('max_connections: with 20 allowed, 40 held at once gives 20 greetings and 20 drops, logged; then new ones are served again', async () => {
  const sockets: net.Socket[] = [];
  const outcomes = await Promise.all(
    Array.from({ length: 40 }, (_, i) =>
      new Promise<'greeted' | 'dropped'>((resolve) => {
        // Staggered a little, so the first 20 are registered before the rest arrive.
        setTimeout(() => {
          const s = net.connect({ port: gw.ports.small!, host: '127.0.0.1' });
          sockets.push(s);
          s.on('error', () => undefined);
          s.once('data', () => resolve('greeted'));
          s.once('close', () => resolve('dropped'));
        }, i * 10);
      }),
    ),
  );
  assert.equal(outcomes.filter((o) => o === 'greeted').length, 20);
  assert.equal(outcomes.filter((o) => o === 'dropped').length, 20);
  await gw.waitForLog((l) => l.msg === 'connection limit reached, dropping' && l.listener === 'small');
  for (const s of sockets) s.destroy();
  const deadline = Date.now() + 5000;
  let again: 'greeted' | 'dropped' = 'dropped';
  while (Date.now() < deadline && again !== 'greeted') {
    again = await greetOnce(gw.ports.small!);
    if (again !== 'greeted') await sleep(100);
  }
  assert.equal(again, 'greeted');
});
