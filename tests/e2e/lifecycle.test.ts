/**
 * Reload and shutdown with live sessions: SIGHUP keeps sessions running and
 * applies a new config to new ones (an invalid one is refused); SIGTERM stops
 * accepting, says goodbye to idle pre-login clients, and lets logged-in
 * sessions finish up to the drain deadline, whose goodbye never cuts a
 * response in half.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import * as net from 'node:net';
import { LineClient } from './harness/clients.ts';
import { waitFor } from '../helpers/wait.ts';
import { startGateway } from './harness/gateway.ts';
import { freePort, startDovecot, userByName, type Dovecot } from './harness/servers.ts';

let dovecot: Dovecot;
const alice = userByName('alice');

before(async () => {
  dovecot = await startDovecot();
});
after(async () => {
  await dovecot?.stop();
});

async function loggedIn(port: number): Promise<LineClient> {
  const c = await LineClient.connect(port, { tls: true });
  await c.readLine();
  c.write(`a LOGIN ${alice.name} ${alice.password}\r\n`);
  assert.match((await c.readUntil(/^a /)).at(-1)!, /^a OK/);
  return c;
}

test('SIGHUP: a live session survives, a new listener starts, an invalid file is refused and the old config stays', async () => {
  const gw = await startGateway({ listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }] });
  try {
    const live = await loggedIn(gw.ports.imaps!);
    const extraPort = await freePort();
    await gw.rewrite((c) => {
      (c.listeners as unknown[]).push({ name: 'imaps2', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}`, listen: `127.0.0.1:${extraPort}` });
    });
    gw.signal('SIGHUP');
    const done = await gw.waitForLog((l) => l.msg === 'configuration reloaded');
    assert.deepEqual(done.started, ['imaps2']);
    live.write('b NOOP\r\n');
    assert.match((await live.readUntil(/^b /)).at(-1)!, /^b OK/, 'the live session runs on');
    const fresh = await loggedIn(extraPort);
    fresh.close();

    await gw.writeRaw('listeners:\n  - name: broken\n    protocol: imap\n    surprise: true\n');
    gw.signal('SIGHUP');
    const refused = await gw.waitForLog((l) => l.msg === 'reload refused, keeping the running configuration');
    assert.match(String(refused.err), /surprise/);
    assert.match(String(refused.err), /:4:5/, 'the error names line and column');
    live.write('c NOOP\r\n');
    assert.match((await live.readUntil(/^c /)).at(-1)!, /^c OK/);
    const again = await loggedIn(gw.ports.imaps!);
    again.close();
    live.close();
  } finally {
    await gw.stop();
  }
});

test('SIGTERM: new connections refused, pre-login clients get BYE, a logged-in session may finish, then the process exits', async () => {
  const gw = await startGateway({ listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }] });
  try {
    const idle = await LineClient.connect(gw.ports.imaps!, { tls: true });
    await idle.readLine();
    const busy = await loggedIn(gw.ports.imaps!);
    gw.signal('SIGTERM');
    assert.equal(await idle.readLine(), '* BYE [UNAVAILABLE] Server shutting down');
    assert.ok(await idle.waitClosed());
    // The listener is closed: a new TCP connection is refused. With workers each closes its own listening
    // socket when the primary's stop reaches it, so every one of them must have begun shutting down.
    const primary = await gw.waitForLog((l) => l.msg === 'shutting down' && l.worker === undefined);
    const workers = typeof primary.workers === 'number' ? primary.workers : 0;
    await waitFor(`${workers} workers to begin shutting down`, async () => (await gw.logs()).filter((l) => l.msg === 'shutting down' && l.worker !== undefined).length >= workers, {
      timeoutMs: 10_000,
    });
    await assert.rejects(
      new Promise((resolve, reject) => {
        const s = net.connect(gw.ports.imaps!, '127.0.0.1', () => {
          s.destroy();
          resolve(undefined);
        });
        s.on('error', reject);
      }),
      /ECONNREFUSED/,
    );
    busy.write('b SELECT INBOX\r\n');
    assert.match((await busy.readUntil(/^b /)).at(-1)!, /^b OK/, 'the logged-in session still works during the drain');
    busy.write('c LOGOUT\r\n');
    assert.ok(await busy.waitClosed());
    const exit = await gw.proc.exited;
    assert.equal(exit.code, 0);
    const logs = await gw.logs();
    assert.ok(logs.some((l) => l.msg === 'stopped'));
    assert.ok(!logs.some((l) => l.msg === 'drain deadline reached, closing remaining sessions'), 'finished before the deadline');
  } finally {
    await gw.stop();
  }
});

test('SIGTERM: a session still open at the drain deadline gets BYE from the gateway', async () => {
  const gw = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: { timeouts: { shutdown_drain: '1s' } },
  });
  try {
    const c = await loggedIn(gw.ports.imaps!);
    gw.signal('SIGTERM');
    const lines = await c.readUntil(/^\* BYE/, 8000);
    assert.match(lines.at(-1)!, /^\* BYE \[UNAVAILABLE\] Server shutting down/);
    assert.ok(await c.waitClosed());
    assert.equal((await gw.proc.exited).code, 0);
  } finally {
    await gw.stop();
  }
});

test('SIGTERM during a large FETCH: the drain deadline never puts the BYE inside the literal (issue 17)', async () => {
  const gw = await startGateway({
    listeners: [{ name: 'imaps', protocol: 'imap', tls: 'implicit', backend: `127.0.0.1:${dovecot.imapPort}` }],
    extra: { timeouts: { shutdown_drain: '1s' } },
  });
  try {
    const c = await loggedIn(gw.ports.imaps!);
    // 32 MiB of base64 lines (no "* " in them): more than the socket buffers on the way hold.
    const line = `${randomBytes(57).toString('base64')}\r\n`;
    const msg = Buffer.from(`Subject: big\r\n\r\n${line.repeat(Math.ceil((32 << 20) / line.length))}`, 'latin1');
    c.write('b CREATE Big\r\n');
    await c.readUntil(/^b /);
    c.write(`c APPEND Big {${msg.length}+}\r\n`);
    c.write(msg);
    c.write('\r\n');
    assert.match((await c.readUntil(/^c /, 30_000)).at(-1)!, /^c OK/);
    c.write('d SELECT Big\r\n');
    await c.readUntil(/^d OK/);
    c.write('e FETCH 1 BODY.PEEK[]\r\n');
    const head = await c.readLine();
    const size = Number(/^\* 1 FETCH \(BODY\[\] \{(\d+)\}$/.exec(head)?.[1]);
    assert.equal(size, msg.length, head);
    // The client stops reading in the middle of the literal, and reads on once the drain deadline has passed.
    c.socket.pause();
    gw.signal('SIGTERM');
    await gw.waitForLog((l) => l.msg === 'drain deadline reached, closing remaining sessions');
    c.socket.resume();
    assert.ok(await c.waitClosed(15_000));
    const rest = await c.readFor(0);
    const bye = rest.indexOf('* BYE');
    assert.ok(bye < 0 || bye >= size, `a BYE at byte ${bye} of a ${size}-byte literal (the client got ${rest.length} bytes)`);
    if (rest.length > size) {
      // The literal came whole: the response ends, then the goodbye (or nothing).
      assert.match(rest.slice(size), /^\)\r\n(\* BYE \[UNAVAILABLE\] Server shutting down\r\n)?$/);
    }
    assert.equal((await gw.proc.exited).code, 0);
  } finally {
    await gw.stop();
  }
});
