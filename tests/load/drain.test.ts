/**
 * Lifecycle: SIGTERM while an SMTP client is in the middle of DATA. The
 * message the client finishes sending during the drain reaches the real
 * Postfix byte-exact; a client that then lingers is told 421 at the drain
 * deadline, at a command boundary, and the daemon exits 0.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { LineClient } from '../e2e/harness/clients.ts';
import { startGateway } from '../e2e/harness/gateway.ts';
import { sleep } from '../helpers/proc.ts';
import { startPostfix, userByName, type Postfix } from '../e2e/harness/servers.ts';
import { waitFor } from '../helpers/wait.ts';

const alice = userByName('alice');
let postfix: Postfix;

before(async () => {
  postfix = await startPostfix();
});

after(async () => {
  await postfix?.stop();
});

/** About 600 KiB of message with dot-leading lines, 8-bit text and long lines, CRLF throughout. */
function bigMessage(marker: string): Buffer {
  const lines = [`From: alice@e2e.test`, `To: someone@elsewhere.example`, `Subject: drain ${marker}`, `Message-ID: <${marker}@e2e.test>`, ''];
  for (let i = 0; i < 8000; i++) lines.push(i % 97 === 0 ? `.dot line ${i}` : `${i} ${randomBytes(30).toString('base64')} Gr\xfc\xdfe`);
  lines.push('');
  return Buffer.from(lines.join('\r\n'), 'latin1');
}

/** What goes on the wire for `msg` after DATA: dot-stuffed (RFC 5321 §4.5.2). */
function stuffed(msg: Buffer): Buffer {
  return Buffer.from(msg.toString('latin1').replace(/^\./gm, '..'), 'latin1');
}

async function inData(port: number): Promise<LineClient> {
  const c = await LineClient.connect(port, { tls: true });
  assert.match(await c.readLine(), /^220 /);
  c.write('EHLO client.example\r\n');
  await c.readUntil(/^250 /);
  c.write(`AUTH PLAIN ${Buffer.from(`\0${alice.name}\0${alice.password}`).toString('base64')}\r\n`);
  assert.match(await c.readLine(), /^235 /);
  c.write('MAIL FROM:<alice@e2e.test>\r\nRCPT TO:<someone@elsewhere.example>\r\nDATA\r\n');
  assert.match(await c.readLine(), /^250/);
  assert.match(await c.readLine(), /^250/);
  assert.match(await c.readLine(), /^354/);
  return c;
}

function delivered(marker: string): Promise<Buffer> {
  return waitFor(`message ${marker} to be delivered`, async () => (await postfix.messages()).find((m) => m.includes(marker)), { timeoutMs: 15_000, intervalMs: 50 });
}

test('SIGTERM during DATA: the message finished during the drain arrives intact, QUIT gets 221, exit 0', async () => {
  const gw = await startGateway({
    extra: { timeouts: { shutdown_drain: '20s' } },
    listeners: [{ name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' }],
  });
  try {
    const marker = `drain-${randomBytes(4).toString('hex')}`;
    const msg = bigMessage(marker);
    const wire = stuffed(msg);
    const c = await inData(gw.ports.smtps!);
    const half = Math.floor(wire.length / 2);
    c.write(wire.subarray(0, half));
    await sleep(200);
    gw.signal('SIGTERM');
    await gw.waitForLog((l) => l.msg === 'shutting down');
    await sleep(300);
    c.write(wire.subarray(half));
    c.write('.\r\n');
    assert.match(await c.readLine(15_000), /^250 /, 'the backend accepted the message during the drain');
    c.write('QUIT\r\n');
    assert.match(await c.readLine(), /^221 /);
    assert.ok(await c.waitClosed());
    assert.deepEqual(await delivered(marker), msg, 'delivered byte-exact');
    assert.equal((await gw.proc.exited).code, 0);
    const logs = await gw.logs();
    assert.ok(!logs.some((l) => l.msg === 'drain deadline reached, closing remaining sessions'), 'the session finished before the deadline');
    const end = logs.find((l) => l.msg === 'session end' && l.listener === 'smtps');
    assert.equal(end?.messages, 1);
  } finally {
    await gw.stop();
  }
});

test('SIGTERM during DATA with a short drain: the message still arrives; the lingering client gets 421 at the deadline', async () => {
  const gw = await startGateway({
    extra: { timeouts: { shutdown_drain: '2s' } },
    listeners: [{ name: 'smtps', protocol: 'smtp', tls: 'implicit', backend: `127.0.0.1:${postfix.port}`, auth: 'required' }],
  });
  try {
    const marker = `drain-short-${randomBytes(4).toString('hex')}`;
    const msg = bigMessage(marker);
    const wire = stuffed(msg);
    const c = await inData(gw.ports.smtps!);
    c.write(wire.subarray(0, 1000));
    gw.signal('SIGTERM');
    await gw.waitForLog((l) => l.msg === 'shutting down');
    c.write(wire.subarray(1000));
    c.write('.\r\n');
    assert.match(await c.readLine(15_000), /^250 /);
    // The client says nothing more: at the drain deadline the gateway ends it with 421 (never inside a reply).
    assert.match(await c.readLine(10_000), /^421 4\.3\.2 /);
    assert.ok(await c.waitClosed());
    assert.deepEqual(await delivered(marker), msg);
    assert.equal((await gw.proc.exited).code, 0);
  } finally {
    await gw.stop();
  }
});
