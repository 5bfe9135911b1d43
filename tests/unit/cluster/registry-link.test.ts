import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Message, PrimaryLink, WorkerLink } from '../../../src/cluster/link.ts';
import { RegistryForwarder, RegistryMirror, type EventsMessage, type UpdateMessage } from '../../../src/cluster/registry-link.ts';
import { GatewayStats } from '../../../src/control/stats.ts';
import { SessionRegistry, type RegistryEvents } from '../../../src/session/registry.ts';
import { FakeSession } from '../control/fake-gateway.ts';
import { waitFor } from '../../helpers/wait.ts';

/** Like node:cluster's channel: serialised, delivered later, in order. */
function deliver(msg: Message, to: (m: Message) => void): void {
  const copy = JSON.parse(JSON.stringify(msg)) as Message;
  setImmediate(() => to(copy));
}

interface Worker {
  registry: SessionRegistry;
  forwarder: RegistryForwarder;
  link: WorkerLink;
  /** Every message the worker sent to the primary. */
  sent: Message[];
  /** Every message the primary sent to the worker. */
  received: Message[];
  /** A session on this worker; ids carry the worker's pid, as real ones do. */
  session(fields?: ConstructorParameters<typeof FakeSession>[1]): FakeSession;
}

function worker(mirror: RegistryMirror, pid: number, opts: { updateMs?: number; flushMs?: number } = {}): Worker {
  const registry = new SessionRegistry();
  const sent: Message[] = [];
  const received: Message[] = [];
  let forwarder: RegistryForwarder | undefined;
  const link: WorkerLink = {
    index: pid - 100,
    pid,
    send: (msg) => {
      received.push(msg);
      deliver(msg, (m) => assert.ok(forwarder!.handle(m), `worker ${pid} did not take ${m.t}`));
    },
  };
  const toPrimary: PrimaryLink = {
    send: (msg) => {
      sent.push(msg);
      deliver(msg, (m) => assert.ok(mirror.handle(link, m), `the mirror did not take ${m.t}`));
    },
  };
  forwarder = new RegistryForwarder(registry, toPrimary, { updateMs: opts.updateMs ?? 60_000, ...(opts.flushMs !== undefined ? { flushMs: opts.flushMs } : {}) });
  let n = 0;
  return {
    registry,
    forwarder,
    link,
    sent,
    received,
    session: (fields = {}) => new FakeSession(registry, { id: `${pid.toString(36)}-${(++n).toString(36)}`, ...fields }),
  };
}

/** Everything the primary's registry emits, in order, as `kind:id` (or `kind:listener` for refusals). */
function recorder(registry: SessionRegistry): { log: string[]; closed: RegistryEvents['closed'][] } {
  const log: string[] = [];
  const closed: RegistryEvents['closed'][] = [];
  registry.on('opened', (r) => log.push(`opened:${r.id}`));
  registry.on('authenticated', (r) => log.push(`authenticated:${r.id}:${r.user}`));
  registry.on('closed', (r) => {
    log.push(`closed:${r.id}:${r.closeReason}`);
    closed.push(r);
  });
  registry.on('refused', (e) => log.push(`refused:${e.listener}:${e.reason}`));
  registry.on('authFailed', (e) => log.push(`authFailed:${e.id}:${e.user}`));
  registry.on('backendConnected', (e) => log.push(`backendConnected:${e.id}:${e.backend}`));
  return { log, closed };
}

test('opened, authenticated and closed reach the primary registry in order, with the final record', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { log, closed } = recorder(primary);
  const w = worker(mirror, 101);
  const s = w.session({ clientIp: '192.0.2.7' }).open();
  s.login('alice');
  s.record.bytesIn = 120;
  s.record.bytesOut = 4000;
  s.end('client-quit');
  await waitFor('the closed event', () => closed.length === 1);
  const id = s.record.id;
  assert.deepEqual(log, [`opened:${id}`, `backendConnected:${id}:127.0.0.1:143`, `authenticated:${id}:alice`, `closed:${id}:client-quit`]);
  assert.equal(closed[0]!.clientIp, '192.0.2.7');
  assert.equal(closed[0]!.bytesIn, 120, 'the closed event carries the final bytes');
  assert.equal(closed[0]!.bytesOut, 4000);
  assert.equal(closed[0]!.state, 'closed');
  assert.equal(primary.size, 0);
  w.forwarder.close();
});

test('an event keeps the record as it was when it happened, not as it is at the flush', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const seen: string[] = [];
  primary.on('opened', (r) => seen.push(`opened:${r.state}:${r.user}`));
  primary.on('authenticated', (r) => seen.push(`authenticated:${r.state}:${r.user}`));
  const w = worker(mirror, 101);
  const s = w.session().open();
  s.login('alice');
  await waitFor('two events', () => seen.length === 2);
  assert.deepEqual(seen, ['opened:preauth:null', 'authenticated:relaying:alice']);
  w.forwarder.close();
});

test('byte and state changes reach the primary after an update tick, only the changed fields', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const w = worker(mirror, 101, { updateMs: 20 });
  const s = w.session().open();
  const quiet = w.session().open();
  await waitFor('both sessions on the primary', () => primary.size === 2);
  s.record.bytesIn = 512;
  s.record.state = 'authenticating';
  await waitFor('the byte count on the primary', () => primary.get(s.record.id)?.record.bytesIn === 512);
  assert.equal(primary.get(s.record.id)!.record.state, 'authenticating');
  const updates = w.sent.filter((m): m is UpdateMessage => m.t === 'registry.update');
  assert.equal(updates.length, 1, 'one update while one change happened');
  assert.deepEqual(updates[0]!.sessions, [{ id: s.record.id, state: 'authenticating', bytesIn: 512 }], 'only the changed fields of the changed session');
  assert.equal(primary.get(quiet.record.id)!.record.bytesIn, 0);
  w.forwarder.close();
});

test('kill from the primary registry reaches the session on its worker; drain stays on the primary', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { closed } = recorder(primary);
  const w = worker(mirror, 101);
  const s = w.session().open();
  const other = w.session().open();
  await waitFor('both sessions on the primary', () => primary.size === 2);
  primary.drainAll();
  assert.equal(primary.kill(s.record.id, 'killed'), true);
  await waitFor('the killed session to close on the primary', () => closed.length === 1);
  assert.equal(s.killedWith, 'killed');
  assert.equal(other.killedWith, null);
  assert.deepEqual(
    w.received.map((m) => m.t),
    ['registry.kill'],
    'drain sends nothing: workers drain their own sessions',
  );
  assert.equal(closed[0]!.id, s.record.id);
  assert.equal(closed[0]!.closeReason, 'killed');
  assert.deepEqual(primary.list().map((r) => r.id), [other.record.id]);
  w.forwarder.close();
});

test('a kill for a session that ended meanwhile is taken and does nothing', async () => {
  const w = worker(new RegistryMirror(new SessionRegistry()), 101);
  const s = w.session().open();
  s.end('client-closed');
  assert.equal(w.forwarder.handle({ t: 'registry.kill', id: s.record.id, reason: 'killed' } as Message), true);
  assert.equal(s.killedWith, null);
  w.forwarder.close();
});

test('workerGone ends that worker\'s sessions with worker-exit, and only that worker\'s', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { closed } = recorder(primary);
  const a = worker(mirror, 101);
  const b = worker(mirror, 102);
  const a1 = a.session({ listener: 'imaps' }).open();
  const a2 = a.session({ listener: 'pop3s' }).open();
  const b1 = b.session({ listener: 'imaps' }).open();
  await waitFor('three sessions on the primary', () => primary.size === 3);
  a2.record.bytesIn = 77;
  mirror.workerGone(a.link);
  assert.deepEqual(closed.map((r) => r.id).sort(), [a1.record.id, a2.record.id].sort());
  assert.ok(closed.every((r) => r.closeReason === 'worker-exit' && r.state === 'closed'));
  assert.deepEqual(primary.list().map((r) => r.id), [b1.record.id]);
  assert.equal(primary.countFor('imaps'), 1);
  assert.equal(primary.countFor('pop3s'), 0);
  a.forwarder.close();
  b.forwarder.close();
});

test('messages still in the channel after a worker exited do not bring its sessions back', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { log } = recorder(primary);
  const w = worker(mirror, 101);
  const s = w.session().open();
  const late = w.session().open();
  s.end('client-closed');
  // Exits before the primary has read the batch.
  mirror.workerGone(w.link);
  await waitFor('the batch to leave the worker', () => w.sent.length === 1);
  // Delivery is one more turn; leave it several.
  await sleep(20);
  assert.equal(primary.size, 0);
  assert.equal(primary.get(late.record.id), undefined);
  assert.deepEqual(log, [], 'no opened nor closed for sessions of an exited worker');
  w.forwarder.close();
});

test('many events in one turn go out as one message, in order', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { log } = recorder(primary);
  const w = worker(mirror, 101);
  const sessions = Array.from({ length: 50 }, () => w.session().open());
  for (const s of sessions) s.login('bob');
  w.registry.refused('imaps', '198.51.100.1', 'max_connections');
  await waitFor('every event on the primary', () => log.length === 50 * 3 + 1);
  assert.equal(w.sent.length, 1, `${w.sent.length} messages for one turn`);
  assert.equal((w.sent[0] as EventsMessage).events.length, 151);
  assert.deepEqual(log.slice(0, 3), [`opened:${sessions[0]!.record.id}`, `opened:${sessions[1]!.record.id}`, `opened:${sessions[2]!.record.id}`]);
  assert.equal(log[50], `backendConnected:${sessions[0]!.record.id}:127.0.0.1:143`);
  assert.equal(log[51], `authenticated:${sessions[0]!.record.id}:bob`);
  assert.equal(log.at(-1), 'refused:imaps:max_connections');
  w.forwarder.close();
});

test('a burst past the batch bound is split into bounded messages without losing or reordering events', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const w = worker(mirror, 101);
  const sessions = Array.from({ length: 2500 }, () => w.session().open());
  await waitFor('every session on the primary', () => primary.size === 2500);
  const sizes = w.sent.map((m) => (m as EventsMessage).events.length);
  assert.deepEqual(sizes, [1000, 1000, 500]);
  assert.deepEqual(primary.list().map((r) => r.id), sessions.map((s) => s.record.id));
  w.forwarder.close();
});

test('flushMs batches over a short interval instead of one turn', async () => {
  const primary = new SessionRegistry();
  const w = worker(new RegistryMirror(primary), 101, { flushMs: 200 });
  w.session().open();
  await sleep(1);
  w.session().open();
  assert.equal(w.sent.length, 0, 'nothing sent before flushMs');
  await waitFor('both sessions on the primary', () => primary.size === 2);
  assert.equal(w.sent.length, 1);
  w.forwarder.close();
});

test('an update tick sends the queued events first, so an update never overtakes its session\'s opened', async () => {
  const primary = new SessionRegistry();
  const w = worker(new RegistryMirror(primary), 101, { flushMs: 60_000, updateMs: 20 });
  const s = w.session().open();
  s.record.bytesIn = 64;
  await waitFor('the session and its bytes on the primary', () => primary.get(s.record.id)?.record.bytesIn === 64);
  assert.deepEqual(
    w.sent.map((m) => m.t),
    ['registry.events', 'registry.update'],
  );
  w.forwarder.close();
});

test('the forwarder keeps per-session state only for live sessions', async () => {
  const w = worker(new RegistryMirror(new SessionRegistry()), 101, { updateMs: 10 });
  const sessions = Array.from({ length: 20 }, () => w.session().open());
  assert.equal(w.forwarder.tracked, 20);
  for (const s of sessions.slice(0, 15)) s.end('client-quit');
  assert.equal(w.forwarder.tracked, 5);
  for (const s of sessions.slice(15)) s.kill('shutdown');
  assert.equal(w.forwarder.tracked, 0);
  w.forwarder.close();
});

test('a closed session\'s later update is ignored, and an update never creates a session', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { log } = recorder(primary);
  const w = worker(mirror, 101);
  const s = w.session().open();
  s.record.bytesIn = 10;
  s.end('client-quit');
  await waitFor('opened and closed on the primary', () => log.length === 2);
  const late: UpdateMessage = { t: 'registry.update', sessions: [{ id: s.record.id, bytesIn: 999, state: 'relaying' }, { id: 'zz-1', bytesIn: 1 }] };
  assert.equal(mirror.handle(w.link, late), true);
  assert.equal(primary.size, 0);
  assert.equal(primary.get(s.record.id), undefined);
  assert.equal(log.length, 2, 'no event from a stale update');
  w.forwarder.close();
});

test('a session that changed and closed between ticks sends no update: its closed event has the final values', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const { closed } = recorder(primary);
  const w = worker(mirror, 101, { updateMs: 20 });
  const s = w.session().open();
  await waitFor('the session on the primary', () => primary.size === 1);
  s.record.bytesOut = 300;
  s.end('backend-closed');
  await waitFor('the closed event', () => closed.length === 1);
  await sleep(60);
  assert.equal(closed[0]!.bytesOut, 300);
  assert.equal(w.sent.filter((m) => m.t === 'registry.update').length, 0);
  w.forwarder.close();
});

test('an update carries only known fields: a message cannot rewrite who a session is', () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const link: WorkerLink = { index: 1, pid: 101, send: () => undefined };
  const s = new FakeSession(new SessionRegistry(), { id: 'x-1', clientIp: '192.0.2.1' });
  mirror.handle(link, { t: 'registry.events', events: [{ e: 'opened', p: { ...s.record } }] } as EventsMessage);
  mirror.handle(link, { t: 'registry.update', sessions: [{ id: 'x-1', bytesIn: 5, clientIp: '203.0.113.66', listener: 'evil' }] } as Message);
  const r = primary.get('x-1')!.record;
  assert.equal(r.bytesIn, 5);
  assert.equal(r.clientIp, '192.0.2.1');
  assert.equal(r.listener, 'imaps');
});

test('refused, authFailed and backendConnected keep their payloads, including when they happened', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const got: unknown[] = [];
  primary.on('refused', (e) => got.push(e));
  primary.on('authFailed', (e) => got.push(e));
  primary.on('backendConnected', (e) => got.push(e));
  const w = worker(mirror, 101);
  const s = w.session({ listener: 'pop3s', clientIp: '198.51.100.9' }).open();
  const sent: unknown[] = [];
  w.registry.on('refused', (e) => sent.push(e));
  w.registry.on('authFailed', (e) => sent.push(e));
  w.registry.on('backendConnected', (e) => sent.push(e));
  w.registry.refused('pop3s', '198.51.100.9', 'banned', 'Too many failed logins, try again later', 1_000);
  w.registry.authFailed(s.record, 'mallory', 2_000);
  w.registry.backendConnected(s.record, '127.0.0.1:110', 3.25, 3_000);
  await waitFor('three events on the primary', () => got.length === 3);
  assert.deepEqual(got, sent);
  assert.deepEqual(got[1], { id: s.record.id, listener: 'pop3s', clientIp: '198.51.100.9', user: 'mallory', at: 2_000 });
  w.forwarder.close();
});

test('GatewayStats on the primary counts what every worker accepted, authenticated and closed', async () => {
  const primary = new SessionRegistry();
  const stats = new GatewayStats(primary);
  const mirror = new RegistryMirror(primary);
  const a = worker(mirror, 101, { updateMs: 20 });
  const b = worker(mirror, 102, { updateMs: 20 });
  const a1 = a.session().open().login('alice');
  const a2 = a.session().open();
  const b1 = b.session().open().login('bob');
  const b2 = b.session({ listener: 'pop3s' }).open();
  a.registry.authFailed(a2.record, 'eve');
  b.registry.refused('imaps', '203.0.113.5', 'banned');
  a1.record.bytesIn = 100;
  a1.end('client-quit');
  b1.record.bytesIn = 40;
  b1.record.bytesOut = 2;
  await waitFor('everything on the primary', () => primary.size === 3 && primary.get(a1.record.id) === undefined && stats.for('imaps').refusedByReason.size === 1);
  // b1 stays live: its bytes come with an update tick.
  b1.record.bytesIn = 41;
  await waitFor('live bytes of b1 through an update', () => stats.counters(['imaps'])[0]!.bytesIn === 141);
  const [imaps, pop3s] = stats.counters(['imaps', 'pop3s']);
  assert.deepEqual(imaps, { listener: 'imaps', sessions: 2, accepted: 3, authOk: 2, authFail: 1, refused: 1, bytesIn: 141, bytesOut: 2 });
  assert.equal(pop3s!.accepted, 1);
  assert.equal(pop3s!.sessions, 1);
  assert.equal(stats.for('imaps').closedByReason.get('client-quit'), 1);
  const connects = (await stats.backendConnectSeconds.get()).values.find((v) => v.metricName === 'mailgate_backend_connect_seconds_count' && v.labels.listener === 'imaps');
  assert.equal(connects?.value, 2);
  mirror.workerGone(b.link);
  const after = stats.counters(['imaps', 'pop3s']);
  assert.equal(after[0]!.sessions, 1);
  assert.equal(after[0]!.bytesIn, 141, 'bytes of sessions ended by a worker exit stay counted');
  assert.equal(stats.for('imaps').closedByReason.get('worker-exit'), 1);
  assert.equal(stats.for('pop3s').closedByReason.get('worker-exit'), 1);
  stats.close();
  a.forwarder.close();
  b.forwarder.close();
});

test('close sends what is queued at once and forwards nothing afterwards', async () => {
  const primary = new SessionRegistry();
  const w = worker(new RegistryMirror(primary), 101, { updateMs: 10 });
  const s = w.session().open();
  w.forwarder.close();
  assert.equal(w.sent.length, 1, 'the queued opened went out in close()');
  w.forwarder.close();
  w.session().open();
  s.record.bytesIn = 5;
  await sleep(40);
  assert.equal(w.sent.length, 1, 'no events nor updates after close');
  assert.equal(primary.size, 1);
});

test('a forwarder started after sessions opened announces them', async () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const early = new SessionRegistry();
  const s = new FakeSession(early, { id: 'e-1' }).open();
  const link: WorkerLink = { index: 1, pid: 101, send: () => undefined };
  const forwarder = new RegistryForwarder(early, { send: (m) => deliver(m, (x) => mirror.handle(link, x)) });
  await waitFor('the early session on the primary', () => primary.size === 1);
  assert.equal(primary.get('e-1')!.record.id, s.record.id);
  forwarder.close();
});

test('each side ignores messages that are not its own', () => {
  const primary = new SessionRegistry();
  const mirror = new RegistryMirror(primary);
  const w = worker(mirror, 101);
  const link: WorkerLink = { index: 1, pid: 101, send: () => undefined };
  assert.equal(mirror.handle(link, { t: 'registry.kill' }), false);
  assert.equal(mirror.handle(link, { t: 'policy.hit' }), false);
  assert.equal(w.forwarder.handle({ t: 'registry.events' }), false);
  assert.equal(w.forwarder.handle({ t: 'stop' }), false);
  w.forwarder.close();
});
