/**
 * Secrets: every way to log in through the gateway (IMAP LOGIN, AUTHENTICATE
 * PLAIN with and without SASL-IR, AUTHENTICATE LOGIN, a literal; POP3
 * USER/PASS, AUTH PLAIN, AUTH LOGIN; SMTP AUTH PLAIN and LOGIN; HTTP Basic
 * and a token in the query string), right and wrong, with the daemon logging
 * at debug and at trace. The password, in every form it travelled in (plain,
 * JSON-escaped, base64 alone, inside a SASL PLAIN blob, inside a Basic
 * header), must appear in no log line and in nothing the gateway sends back.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LineClient, run } from './harness/clients.ts';
import { startFakeSmtp, startRawBackend, type FakeBackend } from '../helpers/fake-backends.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { startDovecot, userByName, type Dovecot } from './harness/servers.ts';

const alice = userByName('alice');
const dave = userByName('dave'); // a space, a quote and a backslash in the password
const WRONG = 'Wr0ng-Pa55-7c41e9';
const TOKEN = 'tok-8f1d2c9a3b';
let dovecot: Dovecot;
let smtp: FakeBackend;
let web: FakeBackend;

before(async () => {
  dovecot = await startDovecot();
  smtp = await startFakeSmtp({ users: { [alice.name]: alice.password, [dave.name]: dave.password } });
  web = await startRawBackend((s) => s.on('data', () => s.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')));
});

after(async () => {
  await dovecot?.stop();
  await smtp?.close();
  await web?.close();
});

const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64');

/** Every form a password travels in, for every user and wrong password used below. */
function secretForms(): string[] {
  const forms = new Set<string>();
  for (const [user, pass] of [
    [alice.name, alice.password],
    [dave.name, dave.password],
    [alice.name, WRONG],
  ] as const) {
    forms.add(pass);
    forms.add(JSON.stringify(pass).slice(1, -1));
    forms.add(b64(pass));
    forms.add(b64(`\0${user}\0${pass}`));
    forms.add(b64(`${user}:${pass}`));
  }
  forms.add(TOKEN);
  return [...forms];
}

/** A line client that keeps a transcript of everything the gateway sent it. */
async function client(port: number, transcript: string[]): Promise<{ c: LineClient; line(): Promise<string>; until(re: RegExp): Promise<string[]> }> {
  const c = await LineClient.connect(port, { tls: true });
  const line = async () => {
    const l = await c.readLine(8000);
    transcript.push(l);
    return l;
  };
  const until = async (re: RegExp) => {
    const ls = await c.readUntil(re, 8000);
    transcript.push(...ls);
    return ls;
  };
  return { c, line, until };
}

async function everyLogin(gw: Gateway, transcript: string[]): Promise<void> {
  // IMAP
  {
    const { c, line, until } = await client(gw.ports.imaps!, transcript);
    await line();
    c.write(`a LOGIN ${alice.name} ${WRONG}\r\n`);
    assert.match((await until(/^a /)).at(-1)!, /^a NO/);
    c.write(`b AUTHENTICATE PLAIN ${b64(`\0${alice.name}\0${WRONG}`)}\r\n`);
    assert.match((await until(/^b /)).at(-1)!, /^b NO/);
    c.write('c AUTHENTICATE LOGIN\r\n');
    await line();
    c.write(`${b64(alice.name)}\r\n`);
    await line();
    c.write(`${b64(alice.password)}\r\n`);
    assert.match((await until(/^c /)).at(-1)!, /^c OK/);
    c.write('d LOGOUT\r\n');
    await until(/^d /);
  }
  {
    const { c, line, until } = await client(gw.ports.imaps!, transcript);
    await line();
    c.write('a AUTHENTICATE PLAIN\r\n');
    await line();
    c.write(`${b64(`\0${alice.name}\0${alice.password}`)}\r\n`);
    assert.match((await until(/^a /)).at(-1)!, /^a OK/);
    c.close();
  }
  {
    const { c, line, until } = await client(gw.ports.imaps!, transcript);
    await line();
    const pw = Buffer.from(dave.password, 'utf8');
    c.write(`a LOGIN ${dave.name} {${pw.length}+}\r\n`);
    c.write(Buffer.concat([pw, Buffer.from('\r\n')]));
    assert.match((await until(/^a /)).at(-1)!, /^a OK/);
    c.close();
  }
  // POP3
  {
    const { c, line } = await client(gw.ports.pop3s!, transcript);
    await line();
    c.write(`USER ${alice.name}\r\nPASS ${WRONG}\r\n`);
    await line();
    assert.match(await line(), /^-ERR/);
    c.write(`AUTH PLAIN ${b64(`\0${alice.name}\0${WRONG}`)}\r\n`);
    assert.match(await line(), /^-ERR/);
    c.write('AUTH LOGIN\r\n');
    await line();
    c.write(`${b64(alice.name)}\r\n`);
    await line();
    c.write(`${b64(alice.password)}\r\n`);
    assert.match(await line(), /^\+OK/);
    c.write('QUIT\r\n');
    await line();
  }
  {
    const { c, line } = await client(gw.ports.pop3s!, transcript);
    await line();
    c.write(`USER ${dave.name}\r\nPASS ${dave.password}\r\n`);
    await line();
    assert.match(await line(), /^\+OK/);
    c.close();
  }
  // SMTP
  {
    const { c, line, until } = await client(gw.ports.smtps!, transcript);
    await line();
    c.write('EHLO client.example\r\n');
    await until(/^250 /);
    c.write(`AUTH PLAIN ${b64(`\0${alice.name}\0${WRONG}`)}\r\n`);
    assert.match(await line(), /^535 /);
    c.write('AUTH LOGIN\r\n');
    await line();
    c.write(`${b64(dave.name)}\r\n`);
    await line();
    c.write(`${b64(dave.password)}\r\n`);
    assert.match(await line(), /^235 /);
    c.write('QUIT\r\n');
    await line();
  }
  {
    const { c, line, until } = await client(gw.ports.smtps!, transcript);
    await line();
    c.write('EHLO client.example\r\n');
    await until(/^250 /);
    c.write('AUTH PLAIN\r\n');
    await line();
    c.write(`${b64(`\0${alice.name}\0${alice.password}`)}\r\n`);
    assert.match(await line(), /^235 /);
    c.close();
  }
  // HTTP: Basic auth (curl -u), a bearer-like token in the query string, and a broken request carrying the header.
  const url = `https://127.0.0.1:${gw.ports.https}`;
  for (const args of [['-u', `${alice.name}:${alice.password}`, `${url}/private`], ['-u', `${alice.name}:${WRONG}`, `${url}/private?token=${TOKEN}`]]) {
    const r = await run('curl', ['-sk', '-i', '--http1.1', '--max-time', '10', ...args]);
    transcript.push(r.stdout, r.stderr);
    assert.match(r.stdout, /^HTTP\/1\.1 401/);
  }
  {
    const { c, until } = await client(gw.ports.https!, transcript);
    c.write(`GET /x HTTP/1.1\r\nHost: mail.e2e.test\r\nAuthorization: Basic ${b64(`${alice.name}:${alice.password}`)}\r\nBad Header Line\r\n\r\n`);
    await until(/^HTTP\/1\.1 400/);
    c.close();
  }
}

for (const level of ['debug', 'trace']) {
  test(`at ${level} level no password, SASL blob, Basic header or token reaches a log line or a client`, async () => {
    const gw = await startGateway({
      logLevel: level,
      extra: { brute_force: { enabled: false } },
      listeners: [
        { name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` },
        { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
        { name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${smtp.port}`, auth: 'required' },
        { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${web.port}` },
      ],
    });
    try {
      const transcript: string[] = [];
      await everyLogin(gw, transcript);
      // The last sessions' end lines are in the log once their sockets closed.
      await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'smtps' && l.user === alice.name);
      const logs = await gw.rawLogs();
      assert.ok(logs.split('\n').length > 30, 'the log has lines to check');
      if (level === 'debug') assert.match(logs, /"level":"debug"/);
      assert.match(logs, /"user":"alice"/, 'user names are logged, passwords are not');
      const sent = transcript.join('\n');
      for (const secret of secretForms()) {
        assert.ok(!logs.includes(secret), `the log contains ${JSON.stringify(secret)}`);
        assert.ok(!sent.includes(secret), `a client was sent ${JSON.stringify(secret)}`);
      }
    } finally {
      await gw.stop();
    }
  });
}
