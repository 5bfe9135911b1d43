import assert from 'node:assert/strict';
import { lstatSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { z } from 'zod';
import { ControlClient, ControlRequestError } from '../../../src/control/client.ts';
import { encode, MAX_REQUEST_LINE, type ControlEvent, type EventBatch } from '../../../src/control/protocol.ts';
import { CommandError, ControlServer, type ControlServerOptions } from '../../../src/control/server.ts';
import { GatewayStats } from '../../../src/control/stats.ts';
import { PolicyAdmin } from '../../../src/control/bans.ts';
import { PolicyState } from '../../../src/policy/state.ts';
import { FakeBans, FakeSession, fakeTarget, silentLog, tempDir, testConfig, type FakeTarget } from './fake-gateway.ts';
import { waitFor } from '../../helpers/wait.ts';

const tmp = tempDir();
after(() => tmp.remove());

let n = 0;
async function start(target: FakeTarget, opts: Partial<ControlServerOptions> = {}) {
  const socketPath = join(tmp.dir, `c${++n}.sock`);
  const stats = new GatewayStats(target.registry);
  const server = await ControlServer.start(target, stats, { socketPath, mode: 0o600, flushIntervalMs: 20, updateIntervalMs: 20, ...opts }, silentLog);
  return { server, socketPath, stats };
}

/** Collects every event a client receives. */
function collect(client: ControlClient): { events: ControlEvent[]; batches: EventBatch[] } {
  const out = { events: [] as ControlEvent[], batches: [] as EventBatch[] };
  client.onEvents((b) => {
    out.batches.push(b);
    out.events.push(...b.events);
  });
  return out;
}

test('the socket is created with the configured mode and removed at close', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t, { mode: 0o660 });
  const st = lstatSync(socketPath);
  assert.ok(st.isSocket(), 'a socket file exists');
  assert.equal(st.mode & 0o777, 0o660);
  await server.close();
  await server.close();
  assert.throws(() => lstatSync(socketPath), /ENOENT/, 'the socket file is removed at stop');
});

test('a stale socket file is replaced; a live one or a regular file is refused', async () => {
  const t = fakeTarget();
  // stale: a socket file nobody listens on
  const stalePath = join(tmp.dir, 'stale.sock');
  // A daemon that exits without cleaning up leaves its socket file behind.
  const crashed = spawnSync(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(stalePath)}, () => process.exit(0))`]);
  assert.equal(crashed.status, 0);
  assert.ok(lstatSync(stalePath).isSocket());
  const s1 = await ControlServer.start(t, new GatewayStats(t.registry), { socketPath: stalePath, mode: 0o600 }, silentLog);
  const c = await ControlClient.connect(stalePath);
  c.close();

  // live: a second daemon on the same path is refused, the first keeps its socket
  await assert.rejects(
    ControlServer.start(t, new GatewayStats(t.registry), { socketPath: stalePath, mode: 0o600 }, silentLog),
    (err: Error & { code?: string }) => err.code === 'CONTROL' && /already answering/.test(err.message),
  );
  const c2 = await ControlClient.connect(stalePath);
  c2.close();
  await s1.close();

  const filePath = join(tmp.dir, 'not-a-socket');
  writeFileSync(filePath, 'data');
  await assert.rejects(
    ControlServer.start(t, new GatewayStats(t.registry), { socketPath: filePath, mode: 0o600 }, silentLog),
    (err: Error & { code?: string }) => err.code === 'CONTROL' && /not a socket/.test(err.message),
  );
  assert.ok(statSync(filePath).isFile(), 'the regular file is left alone');
});

test('hello, snapshot, then events that follow what the sessions did', async () => {
  const t = fakeTarget();
  const early = new FakeSession(t.registry, { clientIp: '192.0.2.1' }).open();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  assert.equal(c.hello.protocol, 1);
  assert.equal(c.hello.server, 'mailgate');
  const got = collect(c);
  const snap = await c.subscribe();
  assert.deepEqual(
    snap.sessions.map((s) => [s.id, s.clientIp, s.state]),
    [[early.record.id, '192.0.2.1', 'preauth']],
  );
  assert.deepEqual(snap.status.listeners.map((l) => [l.name, l.up]), [
    ['imaps', true],
    ['pop3s', true],
  ]);

  const s = new FakeSession(t.registry, { clientIp: '198.51.100.7', listener: 'pop3s', protocol: 'pop3' }).open();
  s.login('alice');
  // Many byte changes inside one flush interval: one update for the session.
  for (let i = 0; i < 50; i++) s.record.bytesIn += 10;
  s.record.bytesOut = 1234;
  await waitFor('the update', () => got.events.find((e) => e.type === 'update' && e.id === s.record.id && e.bytesIn === 500), { timeoutMs: 3000 });
  s.end('client-quit');
  const closed = await waitFor('the close', () => got.events.find((e) => e.type === 'closed' && e.id === s.record.id), { timeoutMs: 3000 });

  const mine = got.events.filter((e) => ('id' in e ? e.id : 'session' in e ? e.session.id : null) === s.record.id);
  assert.deepEqual(
    mine.map((e) => e.type),
    ['opened', 'authenticated', 'update', 'closed'],
    'the events of the session in order, byte changes coalesced to one update',
  );
  assert.equal(closed.type === 'closed' && closed.reason, 'client-quit');
  assert.equal(closed.type === 'closed' && closed.bytesIn, 500);
  assert.equal(closed.type === 'closed' && closed.bytesOut, 1234);
  assert.equal(closed.type === 'closed' && closed.user, 'alice');
  const last = got.batches.at(-1)!;
  const pop = last.counters.find((x) => x.listener === 'pop3s')!;
  assert.deepEqual({ accepted: pop.accepted, authOk: pop.authOk, bytesIn: pop.bytesIn, sessions: pop.sessions }, { accepted: 1, authOk: 1, bytesIn: 500, sessions: 0 });
  c.close();
  await server.close();
});

test('a session opened before its TLS handshake gets its TLS version and cipher in an update once the handshake is done', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  const got = collect(c);
  await c.subscribe();
  const s = new FakeSession(t.registry, { state: 'handshake', tlsVersion: null, tlsCipher: null }).open();
  const opened = await waitFor('the opened event', () => got.events.find((e) => e.type === 'opened' && e.session.id === s.record.id));
  assert.deepEqual(opened.type === 'opened' && [opened.session.tlsVersion, opened.session.tlsCipher], [null, null]);
  s.record.state = 'preauth';
  s.record.tlsVersion = 'TLSv1.3';
  s.record.tlsCipher = 'TLS_AES_128_GCM_SHA256';
  const update = await waitFor('the update with the cipher', () => got.events.find((e) => e.type === 'update' && e.id === s.record.id));
  assert.deepEqual(update.type === 'update' && [update.state, update.tlsVersion, update.tlsCipher], ['preauth', 'TLSv1.3', 'TLS_AES_128_GCM_SHA256']);
  // A change of the cipher alone is a change too.
  s.record.tlsCipher = 'TLS_CHACHA20_POLY1305_SHA256';
  await waitFor('an update with the new cipher', () => got.events.find((e) => e.type === 'update' && e.id === s.record.id && e.tlsCipher === 'TLS_CHACHA20_POLY1305_SHA256'));
  c.close();
  await server.close();
});

test('refusals, failed logins, reloads and certificate changes become events', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  const got = collect(c);
  await c.subscribe();
  t.registry.refused('imaps', '203.0.113.5', 'max_connections');
  const s = new FakeSession(t.registry).open();
  t.registry.authFailed(s.record, 'mallory');
  t.nextReload = { ok: false, error: 'mailgate.yaml:3:1: bad', started: [], stopped: [], updated: [] };
  await assert.rejects(c.request('reload', {}), (err: ControlRequestError) => {
    assert.equal(err.code, 'FAILED');
    assert.match(err.message, /mailgate.yaml:3:1: bad/);
    assert.deepEqual((err.result as { ok: boolean }).ok, false);
    return true;
  });
  await waitFor('the reload event', () => got.events.find((e) => e.type === 'reload'), { timeoutMs: 3000 });
  const types = got.events.map((e) => e.type);
  assert.ok(types.includes('refused') && types.includes('auth-failed') && types.includes('reload'), `got ${types.join(',')}`);
  const af = got.events.find((e) => e.type === 'auth-failed');
  assert.equal(af?.type === 'auth-failed' && af.user, 'mallory');
  const status = await c.request('status', {});
  assert.equal(status.lastReload?.ok, false);
  c.close();
  await server.close();
});

test('kill ends the session through the registry; an unknown id is NOT_FOUND', async () => {
  const t = fakeTarget();
  const s = new FakeSession(t.registry).open().login('bob');
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  assert.deepEqual(await c.request('kill', { id: s.record.id }), { id: s.record.id });
  assert.equal(s.killedWith, 'killed');
  assert.equal(t.registry.get(s.record.id), undefined);
  await assert.rejects(c.request('kill', { id: s.record.id }), (e: ControlRequestError) => e.code === 'NOT_FOUND');
  c.close();
  await server.close();
});

test('ban goes to the ban admin and ends the live sessions of that address; unban and bans', async () => {
  const bans = new FakeBans();
  const t = fakeTarget({ bans });
  const a = new FakeSession(t.registry, { clientIp: '192.0.2.66' }).open();
  const b = new FakeSession(t.registry, { clientIp: '192.0.2.67' }).open();
  const v6 = new FakeSession(t.registry, { clientIp: '2001:db8::5' }).open();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  const got = collect(c);
  await c.subscribe();
  const r = await c.request('ban', { ip: '192.0.2.66', seconds: 600 });
  assert.equal(r.killed, 1);
  assert.equal(r.ban.ip, '192.0.2.66');
  assert.equal(a.killedWith, 'killed');
  assert.equal(b.killedWith, null, 'other addresses are untouched');
  assert.ok(bans.bans.has('192.0.2.66'));
  const r6 = await c.request('ban', { ip: '2001:db8::/32', seconds: 60, kill: true });
  assert.equal(r6.killed, 1);
  assert.equal(v6.killedWith, 'killed');
  assert.deepEqual((await c.request('bans', {})).map((x) => x.ip).sort(), ['192.0.2.66', '2001:db8::/32']);
  assert.deepEqual(await c.request('unban', { ip: '192.0.2.66' }), { removed: true });
  assert.deepEqual(await c.request('unban', { ip: '192.0.2.66' }), { removed: false });
  await waitFor('the unbanned event', () => got.events.find((e) => e.type === 'unbanned'), { timeoutMs: 3000 });
  const banned = got.events.find((e) => e.type === 'banned');
  assert.equal(banned?.type === 'banned' && banned.killed, 1);
  await assert.rejects(c.request('ban', { ip: 'not-an-ip', seconds: 5 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST');
  await assert.rejects(c.request('ban', { ip: '192.0.2.1', seconds: -5 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST');
  c.close();
  await server.close();
});

test('every ban kind through the socket (policy ban list): a user, a user from an address; listed with id and kind, lifted by target or id; the sessions they cover end', async () => {
  const state = await PolicyState.create({ store: { type: 'memory', prefix: 'mailgate', timeout: 1000 }, log: silentLog });
  const bans = new PolicyAdmin(state, testConfig().brute_force, silentLog).banList();
  const t = fakeTarget({ bans });
  const mallory = new FakeSession(t.registry, { clientIp: '192.0.2.70' }).open().login('Mallory@Example.org');
  const other = new FakeSession(t.registry, { clientIp: '192.0.2.70' }).open().login('alice');
  const bob = new FakeSession(t.registry, { clientIp: '192.0.2.71' }).open().login('bob');
  const bobElsewhere = new FakeSession(t.registry, { clientIp: '192.0.2.72' }).open().login('bob@example.org');
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  const got = collect(c);
  await c.subscribe();

  const r = await c.request('ban', { user: 'mallory', seconds: 600, reason: 'compromised' });
  assert.equal(r.killed, 1, 'the session whose login maps to the banned key');
  assert.equal(mallory.killedWith, 'killed');
  assert.equal(other.killedWith, null, 'another user from the same address stays');
  assert.deepEqual(r.bans.map((b) => [b.id, b.kind, b.ip, b.user]), [['user:mallory', 'user', null, 'mallory']]);

  const p = await c.request('ban', { ip: '192.0.2.71', user: 'bob@example.org', seconds: 600 });
  assert.equal(p.killed, 1);
  assert.equal(bob.killedWith, 'killed', 'bob logged in as "bob" shares the key "bob" with bob@example.org');
  assert.equal(bobElsewhere.killedWith, null, 'bob at another address stays');
  assert.deepEqual(p.bans.map((b) => b.id), ['pair:192.0.2.71|bob@example.org', 'pair:192.0.2.71|bob']);
  await c.request('ban', { ip: '192.0.2.0/28', seconds: 60, kill: false });

  const listed = await c.request('bans', {});
  assert.deepEqual(listed.map((b) => `${b.kind} ${b.id}`).sort(), [
    'pair pair:192.0.2.71|bob',
    'pair pair:192.0.2.71|bob@example.org',
    'range range:192.0.2.0/28',
    'user user:mallory',
  ]);
  assert.equal(listed.find((b) => b.kind === 'user')?.reason, 'compromised');
  assert.equal((await c.request('status', {})).bans.count, 4, 'status counts every kind');

  assert.deepEqual(await c.request('unban', { id: 'pair:192.0.2.71|bob' }), { removed: true });
  assert.deepEqual(await c.request('unban', { ip: '192.0.2.71', user: 'bob@example.org' }), { removed: true });
  assert.deepEqual(await c.request('unban', { user: 'Mallory' }), { removed: true });
  assert.deepEqual(await c.request('unban', { user: 'Mallory' }), { removed: false });
  await waitFor('the bans lifted', async () => ((await c.request('bans', {})).length === 1 ? true : undefined), { timeoutMs: 3000 });
  await waitFor('an unbanned event for the user', () => got.events.find((e) => e.type === 'unbanned' && e.user === 'mallory'), { timeoutMs: 3000 });
  await assert.rejects(c.request('ban', { ip: '192.0.2.0/28', user: 'bob', seconds: 60 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST', 'a user from a range');
  await assert.rejects(c.request('ban', { seconds: 60 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST', 'nobody named');
  await assert.rejects(c.request('unban', { id: 'address:1.2.3.4', ip: '1.2.3.4' }), (e: ControlRequestError) => e.code === 'BAD_REQUEST', 'an id or a target, not both');
  await assert.rejects(c.request('ban', { user: 'evil\r\nname', seconds: 60 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST');
  c.close();
  await server.close();
  await state.close();
});

test('without a ban list, ban/unban/bans answer UNSUPPORTED and nothing is killed', async () => {
  const t = fakeTarget();
  const s = new FakeSession(t.registry, { clientIp: '192.0.2.66' }).open();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  await assert.rejects(c.request('ban', { ip: '192.0.2.66', seconds: 60 }), (e: ControlRequestError) => e.code === 'UNSUPPORTED');
  await assert.rejects(c.request('bans', {}), (e: ControlRequestError) => e.code === 'UNSUPPORTED');
  assert.equal(s.killedWith, null);
  assert.equal((await c.request('status', {})).bans.supported, false);
  c.close();
  await server.close();
});

test('bad requests get coded errors; commands can be registered; unknown ones are refused', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  server.register('certs.renew', z.strictObject({ name: z.string() }), (args) => {
    if (args.name === 'broken.example') throw new CommandError('FAILED', 'ACME said no');
    return { renewed: args.name };
  });
  assert.throws(() => server.register('certs.renew', z.strictObject({}), () => 1), /already registered/);
  assert.throws(() => server.register('Bad Name', z.strictObject({}), () => 1), /not a valid command name/);
  const c = await ControlClient.connect(socketPath);
  assert.deepEqual(await c.request('certs.renew', { name: 'mail.example' }), { renewed: 'mail.example' });
  await assert.rejects(c.request('certs.renew', { name: 'broken.example' }), (e: ControlRequestError) => e.code === 'FAILED' && e.message === 'ACME said no');
  await assert.rejects(c.request('certs.renew', {}), (e: ControlRequestError) => e.code === 'BAD_REQUEST');
  await assert.rejects(c.request('nope', {}), (e: ControlRequestError) => e.code === 'UNKNOWN_COMMAND');
  await assert.rejects(c.request('status', { extra: 1 }), (e: ControlRequestError) => e.code === 'BAD_REQUEST');
  c.close();
  await server.close();
});

/** A raw client that reads replies line by line. */
function raw(path: string): Promise<{ socket: Socket; lines: string[]; closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const socket = createConnection({ path });
    const lines: string[] = [];
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    });
    const closed = new Promise<void>((r) => socket.on('close', () => r()));
    socket.once('connect', () => resolve({ socket, lines, closed }));
    socket.once('error', reject);
  });
}

test('a request line past the bound is answered TOO_LONG and the client is closed', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  const r = await raw(socketPath);
  r.socket.write('{"id":1,"cmd":"status","args":{"x":"' + 'a'.repeat(MAX_REQUEST_LINE) + '"}}\n');
  await r.closed;
  const reply = r.lines.map((l) => JSON.parse(l)).find((m) => m.type === 'reply');
  assert.equal(reply.error.code, 'TOO_LONG');
  // The server is fine afterwards.
  const c = await ControlClient.connect(socketPath);
  assert.equal((await c.request('status', {})).sessions, 0);
  c.close();
  await server.close();
});

test('garbage lines get BAD_REQUEST with the id when it can be read', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  const r = await raw(socketPath);
  r.socket.write('not json\n{"id":7,"cmd":"BAD!"}\n{"id":8}\n' + encode({ id: 9, cmd: 'status' }));
  await waitFor('four replies after the hello', () => r.lines.length >= 5, { timeoutMs: 3000 });
  const replies = r.lines.slice(1).map((l) => JSON.parse(l));
  assert.deepEqual(
    replies.map((x) => [x.id, x.ok, x.error?.code]),
    [
      [null, false, 'BAD_REQUEST'],
      [7, false, 'BAD_REQUEST'],
      [8, false, 'BAD_REQUEST'],
      [9, true, undefined],
    ],
  );
  r.socket.destroy();
  await server.close();
});

test('a client that does not read is dropped; the others and the registry are unaffected', async () => {
  const t = fakeTarget();
  for (let i = 0; i < 200; i++) new FakeSession(t.registry, { clientIp: `10.0.${i >> 8}.${i & 255}`, user: `user${i}` }).open();
  const { server, socketPath } = await start(t, { maxClientBuffer: 256 * 1024 });
  const good = await ControlClient.connect(socketPath);
  const got = collect(good);
  await good.subscribe();
  const slow = await raw(socketPath);
  slow.socket.pause();
  // Ask for far more than the bound and never read it.
  const many = Array.from({ length: 400 }, (_, i) => encode({ id: i, cmd: 'sessions', args: {} })).join('');
  slow.socket.write(many);
  await waitFor('the slow client to be dropped', () => server.droppedClientCount === 1, { timeoutMs: 5000 });
  // It never read, so it learns of the drop only when it reads again.
  slow.socket.resume();
  await slow.closed;
  // The good client still gets events and answers.
  const s = new FakeSession(t.registry).open();
  await waitFor('the opened event on the good client', () => got.events.find((e) => e.type === 'opened' && e.session.id === s.record.id), { timeoutMs: 3000 });
  const st = await good.request('status', {});
  assert.equal(st.sessions, 201);
  assert.equal(st.control.dropped, 1);
  good.close();
  await server.close();
});

test('too many events in one interval: a bounded batch with a dropped count', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t, { maxEventsPerFlush: 10, flushIntervalMs: 200 });
  const c = await ControlClient.connect(socketPath);
  const got = collect(c);
  await c.subscribe();
  for (let i = 0; i < 50; i++) t.registry.refused('imaps', '192.0.2.1', 'test');
  const b = await waitFor('a batch with drops', () => got.batches.find((x) => x.dropped > 0), { timeoutMs: 3000 });
  assert.equal(b.events.filter((e) => e.type === 'refused').length, 10);
  assert.equal(b.dropped, 40);
  assert.equal(b.counters.find((x) => x.listener === 'imaps')?.refused, 50, 'counters stay exact');
  c.close();
  await server.close();
});

test('a subscriber gets nothing twice: events before its snapshot are not replayed', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t, { flushIntervalMs: 300 });
  const first = await ControlClient.connect(socketPath);
  await first.subscribe();
  const s = new FakeSession(t.registry).open();
  const second = await ControlClient.connect(socketPath);
  const got = collect(second);
  const snap = await second.subscribe();
  assert.ok(snap.sessions.some((x) => x.id === s.record.id));
  await waitFor('a batch', () => got.batches.length > 0, { timeoutMs: 3000 });
  assert.equal(got.events.filter((e) => e.type === 'opened').length, 0, 'the opened event is already in the snapshot');
  first.close();
  second.close();
  await server.close();
});

test('close says bye to clients', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  const c = await ControlClient.connect(socketPath);
  const closed = new Promise<Error | undefined>((r) => c.onClose(r));
  await server.close();
  assert.equal(await closed, undefined, 'a shutdown is not an error');
  assert.equal(c.bye, 'shutdown');
});


test('slow commands are bounded per client (BUSY) while quick ones still answer', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t, { maxInFlight: 2 });
  const gates: (() => void)[] = [];
  server.register('slow', z.strictObject({}), () => new Promise<string>((r) => gates.push(() => r('done'))));
  const c = await ControlClient.connect(socketPath);
  const first = c.request('slow', {});
  const second = c.request('slow', {});
  await assert.rejects(c.request('slow', {}), (e: ControlRequestError) => e.code === 'BUSY');
  assert.equal((await c.request('status', {})).sessions, 0, 'quick commands are not held up');
  await waitFor('both slow handlers', () => gates.length === 2, { timeoutMs: 1000 });
  for (const g of gates) g();
  assert.deepEqual(await Promise.all([first, second]), ['done', 'done']);
  c.close();
  await server.close();
});

test('the snapshot carries recent events worth logging, not routine ones', async () => {
  const t = fakeTarget();
  const { server, socketPath } = await start(t);
  t.registry.refused('imaps', '203.0.113.8', 'denied by rule');
  new FakeSession(t.registry).open().end('client-quit');
  new FakeSession(t.registry).open().end('backend-unavailable');
  const c = await ControlClient.connect(socketPath);
  const snap = await c.subscribe();
  assert.deepEqual(
    snap.recent.map((e) => (e.type === 'closed' ? `closed ${e.reason}` : e.type)),
    ['refused', 'closed backend-unavailable'],
  );
  c.close();
  await server.close();
});
