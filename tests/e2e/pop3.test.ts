/** POP3 through the gateway against a real Dovecot: poplib, curl and a byte-level client. */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LineClient, python, run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { freePort, mailboxBytes, startDovecot, userByName, type Dovecot } from './harness/servers.ts';

let dovecot: Dovecot;
let gw: Gateway;
const bob = userByName('bob');
const alice = userByName('alice');

before(async () => {
  dovecot = await startDovecot();
  const dead = await freePort();
  gw = await startGateway({
    listeners: [
      { name: 'pop3s', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dovecot.pop3Port}` },
      { name: 'pop3', protocol: 'pop3', tls: 'starttls', backend: `127.0.0.1:${dovecot.pop3Port}` },
      { name: 'dead', protocol: 'pop3', tls: 'implicit', backend: `127.0.0.1:${dead}` },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await dovecot?.stop();
});

test('poplib over POP3S: USER/PASS, STAT, RETR every message byte-exact, QUIT', async () => {
  const r = await python<{ stat: number[]; messages: string[]; quit: string }>(
    `
import poplib
p = poplib.POP3_SSL('127.0.0.1', int(sys.argv[1]), context=ctx())
p.user(sys.argv[2]); p.pass_(sys.argv[3])
count, size = p.stat()
msgs = []
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    msgs.append(base64.b64encode(b'\\r\\n'.join(lines) + b'\\r\\n').decode())
out({'stat': [count, size], 'messages': msgs, 'quit': p.quit().decode()})
`,
    [gw.ports.pop3s!, bob.name, bob.password],
  );
  // poplib undoes dot-stuffing and splits lines, which is what a mail client sees.
  const want = mailboxBytes('bob').map((b) => b.toString('base64'));
  assert.equal(r.stat[0], want.length);
  assert.deepEqual(r.messages, want);
  assert.match(r.quit, /^\+OK/);
});

test('STLS listener: CAPA offers STLS and no USER before TLS; AUTH PLAIN after TLS logs in', async () => {
  const r = await python<{ before: string[]; after: string[]; auth: string }>(
    `
import poplib
p = poplib.POP3('127.0.0.1', int(sys.argv[1]))
before = list(p.capa().keys())
p.stls(context=ctx())
after = list(p.capa().keys())
resp = p._shortcmd('AUTH PLAIN ' + base64.b64encode(('\\0' + sys.argv[2] + '\\0' + sys.argv[3]).encode()).decode())
p.quit()
out({'before': before, 'after': after, 'auth': resp.decode()})
`,
    [gw.ports.pop3!, alice.name, alice.password],
  );
  assert.ok(r.before.includes('STLS'));
  assert.ok(!r.before.includes('USER'));
  assert.ok(r.after.includes('USER') && !r.after.includes('STLS'));
  assert.match(r.auth, /^\+OK/);
});

test('curl pop3s lists and retrieves; pop3 with --ssl-reqd uses STLS', async () => {
  const base = ['-s', '-k', '-u', `${bob.name}:${bob.password}`];
  const list = await run('curl', [...base, `pop3s://127.0.0.1:${gw.ports.pop3s}/`]);
  assert.equal(list.code, 0, list.stderr);
  assert.equal(list.stdout.trim().split('\n').length, mailboxBytes('bob').length);
  const retr = await run('curl', [...base, '--ssl-reqd', `pop3://127.0.0.1:${gw.ports.pop3}/1`], { encoding: 'latin1' });
  assert.equal(retr.code, 0, retr.stderr);
  assert.equal(retr.stdout.replace(/\r\n/g, '\n'), mailboxBytes('bob')[0]!.toString('latin1').replace(/\r\n/g, '\n'));
});

test('a wrong password is refused with -ERR [AUTH] and the client may try again', async () => {
  const c = await LineClient.connect(gw.ports.pop3s!, { tls: true });
  assert.match(await c.readLine(), /^\+OK/);
  c.write(`USER ${bob.name}\r\nPASS wrong\r\n`);
  assert.equal(await c.readLine(), '+OK');
  assert.match(await c.readLine(), /^-ERR \[AUTH\]/);
  c.write(`USER ${bob.name}\r\nPASS ${bob.password}\r\nSTAT\r\n`);
  assert.equal(await c.readLine(), '+OK');
  assert.match(await c.readLine(), /^\+OK/);
  assert.match(await c.readLine(), /^\+OK \d+ \d+/, 'a command pipelined after PASS reaches the backend');
  c.close();
});

test('a dead backend gives -ERR [SYS/TEMP] and closes', async () => {
  const c = await LineClient.connect(gw.ports.dead!, { tls: true });
  await c.readLine();
  c.write(`USER ${bob.name}\r\nPASS ${bob.password}\r\n`);
  assert.equal(await c.readLine(), '+OK');
  assert.match(await c.readLine(), /^-ERR \[SYS\/TEMP\]/);
  assert.ok(await c.waitClosed());
});

test('STLS injection: a command sent with STLS in plaintext is discarded', async () => {
  const c = await LineClient.connect(gw.ports.pop3!);
  await c.readLine();
  c.write('STLS\r\nCAPA\r\n');
  assert.equal(await c.readLine(), '+OK Begin TLS negotiation');
  await c.startTls();
  assert.equal(await c.readFor(300), '');
  c.write('QUIT\r\n');
  assert.equal(await c.readLine(), '+OK Bye');
});
