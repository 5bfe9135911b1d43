/**
 * Policy state across cluster workers: one PolicyAuthority and worker states
 * over in-memory links that deliver like IPC (later, in order, as a JSON
 * copy); then the Redis store; then a real node:cluster with two workers.
 */
import assert from 'node:assert/strict';
import cluster, { type Worker } from 'node:cluster';
import { once } from 'node:events';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { RateLimiterMemory } from 'rate-limiter-flexible';
import { PolicyAdmin } from '../../../src/control/bans.ts';
import { envelope, unwrap, type Message, type PrimaryLink, type WorkerLink } from '../../../src/cluster/link.ts';
import { createWorkerPolicyState, PolicyAuthority, type PolicySync, type WorkerPolicy } from '../../../src/cluster/policy-link.ts';
import { errorCode } from '../../../src/core/errors.ts';
import type { Logger } from '../../../src/core/log.ts';
import { banId, type Ban, type BanChange } from '../../../src/policy/bans.ts';
import type { SharedLimiter } from '../../../src/policy/counters.ts';
import type { StoreConfig } from '../../../src/policy/state.ts';
import { redisMissing, startRedis, type RedisServer } from '../../helpers/redis.ts';
import { configFrom, connect, engineOn, memoryLog, silentLog } from '../policy/helpers.ts';
import { waitFor } from '../../helpers/wait.ts';

const MEMORY: StoreConfig = { type: 'memory', prefix: 'mailgate', timeout: 1000 };

function ban(kind: 'address' | 'range', address: string, ms = 3_600_000): Ban {
  const now = Date.now();
  return { id: banId(kind, address, null), kind, address, user: null, until: now + ms, createdAt: now, reason: 'test', source: 'manual' };
}

interface FakeWorker {
  link: WorkerLink;
  policy: WorkerPolicy;
  /** Every ban change this worker's view told its listeners. */
  changes: BanChange[];
}

/** One primary and its workers over in-memory links. */
class FakeCluster {
  readonly authority: PolicyAuthority;
  readonly workers = new Map<number, FakeWorker>();
  private readonly store: StoreConfig;
  /** Stands in for the primary's cluster limiters (those need node:cluster's channel; the last test has one). */
  private readonly limiters = new Map<string, RateLimiterMemory>();
  private inFlight = 0;

  private constructor(authority: PolicyAuthority, store: StoreConfig) {
    this.authority = authority;
    this.store = store;
  }

  static async start(n: number, store: StoreConfig = MEMORY): Promise<FakeCluster> {
    let c: FakeCluster | undefined;
    const authority = await PolicyAuthority.create({ store, log: silentLog, workers: () => (c ? [...c.workers.values()].map((w) => w.link) : []) });
    c = new FakeCluster(authority, store);
    for (let i = 1; i <= n; i++) await c.add(i);
    await c.quiet();
    return c;
  }

  /** Like node:cluster's channel: serialised, delivered later, in order. */
  private deliver(msg: Message, to: (m: Message) => void): void {
    const copy = JSON.parse(JSON.stringify(msg)) as Message;
    this.inFlight++;
    setImmediate(() => {
      this.inFlight--;
      to(copy);
    });
  }

  /** A worker in slot `index`; `initial` replaces the sync it would get now (a stale one, say). */
  async add(index: number, opts: { initial?: PolicySync; pid?: number } = {}): Promise<FakeWorker> {
    let target: FakeWorker | undefined;
    const link: WorkerLink = {
      index,
      pid: opts.pid ?? 10_000 + index,
      // Messages before the worker's state exists are lost, as with a lifecycle that routes late.
      send: (msg) => this.deliver(msg, (m) => target?.policy.handle(m)),
    };
    const toPrimary: PrimaryLink = { send: (msg) => this.deliver(msg, (m) => assert.ok(this.authority.handle(link, m), `the authority did not take ${m.t}`)) };
    const initial = opts.initial ?? this.authority.syncFor(link);
    const limiter: SharedLimiter = (o) => {
      let l = this.limiters.get(o.keyPrefix);
      if (!l) this.limiters.set(o.keyPrefix, (l = new RateLimiterMemory(o)));
      return l;
    };
    // Reports at the end of each turn (not every 20 ms) so that quiet() sees them through; the batching has its own test.
    const policy = await createWorkerPolicyState({ store: this.store, log: silentLog, link: toPrimary, initial, limiter, reportMs: 0 });
    const changes: BanChange[] = [];
    policy.state.bans.onChange((c) => changes.push(c));
    target = { link, policy, changes };
    this.workers.set(index, target);
    return target;
  }

  w(index: number): FakeWorker {
    const w = this.workers.get(index);
    if (!w) throw new Error(`no worker ${index}`);
    return w;
  }

  /** The worker process in slot `index` exits. */
  async gone(index: number): Promise<void> {
    const w = this.w(index);
    this.workers.delete(index);
    await w.policy.close();
    this.authority.workerGone(w.link);
  }

  /** Until nothing is in flight for a few turns (session reports wait one turn before they leave). */
  async quiet(): Promise<void> {
    let calm = 0;
    for (let turn = 0; turn < 1000; turn++) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      calm = this.inFlight === 0 ? calm + 1 : 0;
      if (calm >= 3) return;
    }
    throw new Error(`still ${this.inFlight} messages in flight after 1000 turns`);
  }

  async close(): Promise<void> {
    for (const w of this.workers.values()) await w.policy.close();
    await this.authority.close();
  }
}

/** A cluster for one test, closed when it ends. */
async function fakeCluster(t: { after(fn: () => Promise<void>): void }, n = 2, store?: StoreConfig): Promise<FakeCluster> {
  const c = await FakeCluster.start(n, store);
  t.after(() => c.close());
  return c;
}

// ---- bans (memory store) -------------------------------------------------------------------

test('a ban added in one worker is in every view and fires the other workers\' onChange', async (t) => {
  const c = await fakeCluster(t);
  const b = ban('address', '192.0.2.7');
  await c.w(1).policy.state.bans.add(b, Date.now());
  assert.equal(c.w(1).policy.state.bans.cached(b.id, Date.now())?.id, b.id, 'the asker\'s view has it when add resolves');
  assert.equal(c.authority.state.bans.cached(b.id, Date.now())?.id, b.id, 'the primary is the authority');
  await c.quiet();
  assert.equal(c.w(2).policy.state.bans.cached(b.id, Date.now())?.reason, 'test');
  assert.equal((await c.w(2).policy.state.bans.check(b.id, Date.now()))?.id, b.id);
  assert.deepEqual(c.w(2).changes, [{ kind: 'banned', ban: b }]);
  assert.deepEqual(c.w(1).changes, [{ kind: 'banned', ban: b }], 'the asker hears of it once');
});

test('an unban in one worker lifts the ban in every view', async (t) => {
  const c = await fakeCluster(t);
  const b = ban('address', '192.0.2.8');
  await c.w(1).policy.state.bans.add(b, Date.now());
  await c.quiet();
  assert.equal(await c.w(2).policy.state.bans.remove(b.id), true);
  assert.equal(c.w(2).policy.state.bans.cached(b.id, Date.now()), undefined, 'the asker\'s view when remove resolves');
  await c.quiet();
  assert.equal(c.w(1).policy.state.bans.cached(b.id, Date.now()), undefined);
  assert.equal(c.authority.state.bans.cached(b.id, Date.now()), undefined);
  assert.deepEqual(
    c.w(1).changes.map((x) => x.kind),
    ['banned', 'unbanned'],
  );
  assert.equal(await c.w(1).policy.state.bans.remove(b.id), false, 'nothing left to remove');
});

test('an admin\'s ban in the primary (control socket) reaches every worker, ranges included', async (t) => {
  const c = await fakeCluster(t);
  const config = configFrom('');
  const admin = new PolicyAdmin(c.authority.state, config.brute_force, silentLog);
  await admin.addBan({ kind: 'range', address: '198.51.100.0/24', durationMs: 60_000, reason: 'admin' });
  await c.quiet();
  for (const i of [1, 2]) {
    assert.equal(c.w(i).policy.state.bans.rangeBanFor('198.51.100.9', Date.now())?.reason, 'admin', `worker ${i}`);
    assert.equal(c.w(i).changes.length, 1, `worker ${i}'s onChange`);
  }
  assert.equal(admin.banList().unban('198.51.100.0/24'), true);
  await c.authority.state.settled();
  await c.quiet();
  for (const i of [1, 2]) assert.equal(c.w(i).policy.state.bans.rangeBanFor('198.51.100.9', Date.now()), undefined, `worker ${i} after unban`);
});

test('a worker refuses a connection before the greeting once another worker banned the address', async (t) => {
  const c = await fakeCluster(t);
  const config = configFrom('');
  const engine = engineOn(config, c.w(2).policy.state);
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.9')).action, 'allow');
  await c.w(1).policy.state.bans.add(ban('address', '192.0.2.9'), Date.now());
  await c.quiet();
  assert.equal(engine.onConnect(connect(config, 'imaps', '192.0.2.9')).action, 'tempfail');
});

// ---- session counts ----------------------------------------------------------------------------

test('sessions opened in one worker count in the others and in the primary\'s totals', async (t) => {
  const c = await fakeCluster(t);
  const [w1, w2] = [c.w(1).policy.state, c.w(2).policy.state];
  w1.connectionOpened('imaps', '192.0.2.1');
  w1.connectionOpened('imaps', '192.0.2.1');
  w2.connectionOpened('pop3s', '192.0.2.1');
  assert.equal(w2.openFrom('192.0.2.1'), 1, 'before the reports arrive, only its own');
  await c.quiet();
  for (const [name, s] of [['worker 1', w1], ['worker 2', w2], ['primary', c.authority.state]] as const) {
    assert.equal(s.openFrom('192.0.2.1'), 3, name);
    assert.equal(s.openFrom('192.0.2.1', (l) => l === 'imaps'), 2, `${name}, imaps only`);
    assert.equal(s.openFrom('192.0.2.2'), 0, `${name}, another address`);
  }
  w1.connectionClosed('imaps', '192.0.2.1');
  await c.quiet();
  assert.equal(w2.openFrom('192.0.2.1'), 2);
  assert.equal(c.authority.state.openFrom('192.0.2.1'), 2);
  w1.connectionClosed('imaps', '192.0.2.1');
  w2.connectionClosed('pop3s', '192.0.2.1');
  w2.connectionClosed('pop3s', '192.0.2.1'); // one too many: not counted, must not lower anyone's view
  await c.quiet();
  for (const s of [w1, w2, c.authority.state]) assert.equal(s.openFrom('192.0.2.1'), 0);
  assert.deepEqual(c.authority.syncFor({ index: 9, pid: 9, send: () => {} }).sessions, [], 'no key is kept for counts of 0');
});

test('a limit one worker reaches blocks its key in every worker, and is not passed round again', async (t) => {
  const c = await fakeCluster(t);
  const [w1, w2] = [c.w(1).policy.state, c.w(2).policy.state];
  const now = Date.now();
  w1.block('connections:address:192.0.2.9', now + 60_000);
  assert.equal(w2.blockedUntil('connections:address:192.0.2.9', now), undefined, 'not before the message arrives');
  await c.quiet();
  assert.equal(w2.blockedUntil('connections:address:192.0.2.9', now), now + 60_000);
  assert.equal(w1.blockedUntil('connections:address:192.0.2.9', now), now + 60_000);
  // A shorter block changes nothing; a block received from elsewhere is not sent on (no echo back to worker 1).
  const sent: string[] = [];
  const spy = c.w(2).link.send;
  c.w(2).link.send = (m) => {
    sent.push(m.t);
    spy(m);
  };
  w1.block('connections:address:192.0.2.9', now + 1_000);
  await c.quiet();
  assert.deepEqual(sent, [], 'nothing new for worker 2');
  assert.equal(w2.blockedUntil('connections:address:192.0.2.9', now + 70_000), undefined, 'blocks end');
});

test('logins count per user across workers; a login moved or ended frees its slot everywhere', async (t) => {
  const c = await fakeCluster(t);
  const [w1, w2] = [c.w(1).policy.state, c.w(2).policy.state];
  w1.loginStarted('s1', 'imaps', 'alice');
  w2.loginStarted('s2', 'smtps', 'alice');
  await c.quiet();
  for (const s of [w1, w2, c.authority.state]) {
    assert.equal(s.loggedIn('alice'), 2);
    assert.equal(s.loggedIn('alice', (l) => l === 'smtps'), 1);
  }
  w1.loginStarted('s1', 'imaps', 'bob');
  await c.quiet();
  assert.equal(w2.loggedIn('alice'), 1, 'the session moved to bob');
  assert.equal(w2.loggedIn('bob'), 1);
  w1.loginEnded('s1');
  await c.quiet();
  assert.equal(w2.loggedIn('bob'), 0);
  assert.equal(c.authority.state.loggedIn('alice'), 1);
});

test('parallel guesses spread over workers count as in flight in the primary: no more reach the backend than the threshold', async (t) => {
  const c = await fakeCluster(t);
  const config = configFrom('brute_force: { per_address_user: { failures: 3, window: 10m, ban: 10m } }\n');
  const [e1, e2] = [engineOn(config, c.w(1).policy.state), engineOn(config, c.w(2).policy.state)];
  const cr = { user: 'dave', password: 'guess', mechanism: 'PLAIN' as const };
  const tries = Array.from({ length: 10 }, (_, i) => {
    const s = connect(config, 'imaps', '192.0.2.1', `p${i}`);
    return (i % 2 ? e1 : e2).onAuth({ ...s, user: 'dave', mechanism: 'PLAIN' }, cr);
  });
  const verdicts = await Promise.all(tries);
  const allowed = verdicts.filter((v) => v.action === 'allow').length;
  assert.equal(allowed, 3, verdicts.map((v) => (v.action === 'allow' ? 'allow' : v.code)).join(','));
  assert.ok(verdicts.every((v) => v.action === 'allow' || v.code === 'login-attempts'));
  await c.quiet();
});

test('a concurrent-sessions limit holds across workers', async (t) => {
  const c = await fakeCluster(t);
  const config = configFrom('rate_limits:\n  - { limit: concurrent, per: address, max: 2 }');
  const e1 = engineOn(config, c.w(1).policy.state);
  const e2 = engineOn(config, c.w(2).policy.state);
  const first = connect(config, 'imaps', '192.0.2.3');
  assert.equal(e1.onConnect(first).action, 'allow');
  await c.quiet();
  assert.equal(e2.onConnect(connect(config, 'imaps', '192.0.2.3')).action, 'allow');
  await c.quiet();
  assert.deepEqual(e1.onConnect(connect(config, 'pop3s', '192.0.2.3')), { action: 'tempfail', code: 'concurrent-address', text: 'Too many connections from your address' });
  e1.onDisconnect(first);
  await c.quiet();
  assert.equal(e2.onConnect(connect(config, 'imaps', '192.0.2.3')).action, 'allow', 'the slot freed in worker 1 counts in worker 2');
});

test('a worker that is gone no longer counts anywhere', async (t) => {
  const c = await fakeCluster(t, 3);
  c.w(1).policy.state.connectionOpened('imaps', '192.0.2.4');
  c.w(1).policy.state.loginStarted('s1', 'imaps', 'carol');
  c.w(2).policy.state.connectionOpened('imaps', '192.0.2.4');
  await c.quiet();
  assert.equal(c.w(3).policy.state.openFrom('192.0.2.4'), 2);
  await c.gone(1);
  await c.quiet();
  for (const s of [c.w(2).policy.state, c.w(3).policy.state, c.authority.state]) {
    assert.equal(s.openFrom('192.0.2.4'), 1);
    assert.equal(s.loggedIn('carol'), 0);
  }
});

test('a new process in a slot whose old one was not reported gone replaces its counts', async (t) => {
  const c = await fakeCluster(t);
  c.w(1).policy.state.connectionOpened('imaps', '192.0.2.5');
  await c.quiet();
  assert.equal(c.w(2).policy.state.openFrom('192.0.2.5'), 1);
  // Slot 1 restarts with another pid, and nobody called workerGone for the old one.
  const old = c.w(1);
  c.workers.delete(1);
  await old.policy.close();
  const fresh = await c.add(1, { pid: 20_001 });
  fresh.policy.state.connectionOpened('imaps', '192.0.2.6');
  await c.quiet();
  for (const [name, s] of [['worker 2', c.w(2).policy.state], ['the new worker 1', fresh.policy.state], ['primary', c.authority.state]] as const) {
    assert.equal(s.openFrom('192.0.2.5'), 0, `${name}: the old process's session is gone`);
  }
  assert.equal(c.w(2).policy.state.openFrom('192.0.2.6'), 1, 'the new process counts');
  c.authority.workerGone(old.link);
  assert.equal(c.authority.state.openFrom('192.0.2.6'), 1, 'a late workerGone for the old pid leaves the new one alone');
});

// ---- start-up -------------------------------------------------------------------------------------

test('a new worker starts with the current bans and the other workers\' counts', async (t) => {
  const c = await fakeCluster(t);
  const b = ban('address', '192.0.2.10');
  await c.w(1).policy.state.bans.add(b, Date.now());
  c.w(1).policy.state.connectionOpened('imaps', '192.0.2.11');
  c.w(2).policy.state.loginStarted('s1', 'imaps', 'dave');
  await c.quiet();
  const mine = c.authority.syncFor(c.w(1).link);
  assert.deepEqual(mine.sessions, [['login', 'dave', [['imaps', 1]]]], 'a worker\'s own counts are not in its sync');
  const w3 = await c.add(3);
  // Synchronously, before any message: the connect-time check must be right from the start.
  assert.equal(w3.policy.state.bans.cached(b.id, Date.now())?.id, b.id);
  assert.equal(w3.policy.state.openFrom('192.0.2.11'), 1);
  assert.equal(w3.policy.state.loggedIn('dave'), 1);
});

test('messages a worker missed before it could listen are made good by the sync answering its hello', async (t) => {
  const c = await fakeCluster(t);
  const stale = c.authority.syncFor({ index: 3, pid: 10_003, send: () => {} });
  const b = ban('address', '192.0.2.12');
  await c.w(1).policy.state.bans.add(b, Date.now());
  c.w(1).policy.state.connectionOpened('imaps', '192.0.2.13');
  await c.quiet();
  const w3 = await c.add(3, { initial: stale });
  assert.equal(w3.policy.state.bans.cached(b.id, Date.now()), undefined, 'the stale start');
  await c.quiet();
  assert.equal(w3.policy.state.bans.cached(b.id, Date.now())?.id, b.id);
  assert.equal(w3.policy.state.openFrom('192.0.2.13'), 1);
  assert.deepEqual(w3.changes.map((x) => x.kind), ['banned'], 'the view caught up through its listeners');
});

test('a worker refuses a sync for another store type', async () => {
  await assert.rejects(
    createWorkerPolicyState({ store: MEMORY, log: silentLog, link: { send: () => {} }, initial: { store: 'redis', bans: [], sessions: [] } }),
    (err: unknown) => errorCode(err) === 'POLICY_STORE',
  );
});

test('session changes are reported in one message per 20 ms, and a connection that opens and closes within it in none', async () => {
  const sent: Message[] = [];
  const policy = await loneWorker({ timeoutMs: 1000, sent, reportMs: undefined });
  try {
    const reports = () => sent.filter((m) => m.t === 'policy.sessions') as (Message & { changes: unknown[] })[];
    policy.state.connectionOpened('imaps', '192.0.2.1');
    await sleep(2);
    policy.state.connectionOpened('imaps', '192.0.2.2');
    policy.state.connectionOpened('imaps', '192.0.2.3');
    policy.state.connectionClosed('imaps', '192.0.2.3');
    await sleep(5);
    assert.equal(reports().length, 0, 'nothing before the 20 ms are up');
    await sleep(40);
    assert.equal(reports().length, 1, 'one message for the burst');
    assert.deepEqual(reports()[0]!.changes, [
      ['open', '192.0.2.1', 'imaps', 1],
      ['open', '192.0.2.2', 'imaps', 1],
    ]);
  } finally {
    await policy.close();
  }
});

// ---- requests without an answer ---------------------------------------------------------------------

/** A worker whose primary link only records what it is sent. */
function loneWorker(opts: { log?: Logger; timeoutMs: number; sent?: Message[]; reportMs?: number | undefined }): Promise<WorkerPolicy> {
  return createWorkerPolicyState({
    ...(opts.reportMs === undefined ? {} : { reportMs: opts.reportMs }),
    store: MEMORY,
    log: opts.log ?? silentLog,
    link: { send: (m) => opts.sent?.push(m) },
    initial: { store: 'memory', bans: [], sessions: [] },
    timeoutMs: opts.timeoutMs,
    limiter: (o) => new RateLimiterMemory(o),
  });
}

test('a ban request the primary does not answer fails after the timeout, and a late answer is only logged', async () => {
  const sent: Message[] = [];
  const { log, lines } = memoryLog();
  const policy = await loneWorker({ log, timeoutMs: 50, sent });
  try {
    const b = ban('address', '192.0.2.14');
    const started = Date.now();
    await assert.rejects(policy.state.bans.add(b, Date.now()), (err: unknown) => {
      assert.equal(errorCode(err), 'POLICY_STORE');
      assert.match((err as Error).message, /192\.0\.2\.14/, 'the error names the ban');
      return true;
    });
    assert.ok(Date.now() - started >= 45, 'it waited for the timeout');
    const req = sent.find((m) => m.t === 'policy.ban.add') as { req: number } | undefined;
    assert.ok(req, 'the request was sent');
    assert.equal(policy.handle({ t: 'policy.ban.reply', req: req.req } as Message), true);
    assert.ok(lines.some((l) => String(l.msg).includes('after its timeout')), 'the late answer is logged');
  } finally {
    await policy.close();
  }
});

test('closing a worker\'s state fails the ban requests still waiting', async () => {
  const policy = await loneWorker({ timeoutMs: 60_000 });
  const pending = policy.state.bans.remove(banId('address', '192.0.2.15', null));
  const closing = policy.close();
  await assert.rejects(pending, (err: unknown) => errorCode(err) === 'POLICY_STORE');
  await closing;
});

test('cluster counters: one process listener for all limiters, and this process\'s memory when the primary does not answer', async (t) => {
  // A stand-in channel that nobody answers (node:test gives this process none).
  const sent: { channel?: string; type?: string }[] = [];
  process.send = ((m: { channel?: string }) => sent.push(m) > 0) as typeof process.send;
  t.after(() => {
    delete process.send;
  });
  const listeners = process.listenerCount('message');
  const max = process.getMaxListeners();
  const { log, lines } = memoryLog();
  const policy = await createWorkerPolicyState({
    store: MEMORY,
    log,
    link: { send: () => {} },
    initial: { store: 'memory', bans: [], sessions: [] },
    timeoutMs: 50,
  });
  try {
    for (let i = 0; i < 12; i++) policy.state.counters.counter(`c${i}`, 60_000);
    assert.equal(process.listenerCount('message') - listeners, 1, 'one listener for 12 limiters');
    assert.equal(process.getMaxListeners(), max, 'the listener limit is kept');
    assert.ok(sent.some((m) => m.channel === 'rate_limiter_flexible' && m.type === 'init'), 'the limiters introduced themselves to the primary');
    const counter = policy.state.counters.counter('c0', 60_000);
    assert.equal((await counter.hit('192.0.2.30')).count, 1);
    assert.equal((await counter.hit('192.0.2.30')).count, 2, 'the fallback keeps counting');
    assert.ok(lines.some((l) => l.level === 'warn' && String(l.err).includes('RateLimiterCluster timeout')), 'the fallback is logged');
  } finally {
    await policy.close();
  }
  assert.equal(process.listenerCount('message'), listeners, 'close detaches the limiters');
});

// ---- the Redis store -------------------------------------------------------------------------------

test('prerequisite: redis-server is installed (.ci/install-deps.sh)', () => {
  assert.equal(redisMissing, false, String(redisMissing));
});

let redis: RedisServer | undefined;

before(async () => {
  if (!redisMissing) redis = await startRedis();
});

after(async () => {
  await redis?.stop();
});

test('with Redis, bans travel through Redis and session counts through the primary', async (t) => {
  assert.ok(redis, 'redis-server started');
  const store: StoreConfig = { type: 'redis', url: redis.url, prefix: `pl${process.pid}`, timeout: 1000 };
  const c = await fakeCluster(t, 2, store);
  assert.deepEqual(c.authority.syncFor(c.w(1).link).bans, [], 'workers read bans from Redis, not from the sync');
  // The ban stores subscribe in the background: a ban published before worker 2 listens is not pushed to it.
  await waitFor('the primary and both workers subscribe to ban changes', async () => {
    const client = new Redis(redis!.url);
    try {
      const [, n] = (await client.pubsub('NUMSUB', `${store.prefix}:bans:events`)) as [string, number];
      return n >= 3;
    } finally {
      client.disconnect();
    }
  });
  const b = ban('address', '192.0.2.16');
  await c.w(1).policy.state.bans.add(b, Date.now());
  await waitFor('worker 2 hears of the ban', async () => c.w(2).policy.state.bans.cached(b.id, Date.now()) !== undefined);
  assert.equal(c.w(2).policy.state.bans.cached(b.id, Date.now())?.id, b.id, 'worker 2 heard of it from Redis');
  c.w(1).policy.state.connectionOpened('imaps', '192.0.2.17');
  await c.quiet();
  assert.equal(c.w(2).policy.state.openFrom('192.0.2.17'), 1);
  assert.equal(c.authority.state.openFrom('192.0.2.17'), 1);
});

// ---- a real node:cluster -----------------------------------------------------------------------------

const FIXTURE = fileURLToPath(new URL('./fixtures/policy-worker.ts', import.meta.url));

/** `p`, or a failure naming `what` after `ms`; the timer does not outlive the race. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** One request to a fixture worker, answered within `ms`. */
async function ask(worker: Worker, req: { t: string; [k: string]: unknown }, ms = 5_000): Promise<unknown> {
  let onMessage!: (raw: unknown) => void;
  const answer = new Promise<unknown>((resolve, reject) => {
    onMessage = (raw) => {
      const m = unwrap(raw) as (Message & { value?: unknown; error?: string }) | undefined;
      if (m?.t === 'test.done') resolve(m.value);
      else if (m?.t === 'test.failed') reject(new Error(`worker ${worker.id} failed ${req.t}: ${m.error}`));
    };
    worker.on('message', onMessage);
  });
  worker.send(envelope(req));
  try {
    return await within(answer, ms, `worker ${worker.id}, ${req.t}`);
  } finally {
    worker.off('message', onMessage);
  }
}

test('real cluster: two workers count in the primary\'s memory, see each other\'s sessions and bans', { timeout: 30_000 }, async () => {
  const links = new Map<number, WorkerLink>();
  const authority = await PolicyAuthority.create({ store: MEMORY, log: silentLog, workers: () => links.values() });
  const route = (worker: Worker, raw: unknown) => {
    const m = unwrap(raw);
    const link = links.get(worker.id);
    if (m && link) authority.handle(link, m);
  };
  cluster.on('message', route);
  cluster.setupPrimary({ exec: FIXTURE, execArgv: [] });
  const workers: Worker[] = [];
  try {
    for (let i = 0; i < 2; i++) {
      const worker = cluster.fork();
      workers.push(worker);
      await within(once(worker, 'online'), 10_000, 'a worker coming online');
      const link: WorkerLink = { index: worker.id, pid: worker.process.pid ?? 0, send: (m) => worker.send(envelope(m)) };
      links.set(worker.id, link);
      await ask(worker, { t: 'test.start', sync: authority.syncFor(link), counters: 12 }, 10_000);
    }
    const [a, b] = workers as [Worker, Worker];

    assert.equal(await ask(a, { t: 'test.hit', key: '192.0.2.20', n: 3 }), 3);
    assert.equal(await ask(b, { t: 'test.hit', key: '192.0.2.20', n: 2 }), 5, 'worker 2 counts on from worker 1\'s hits');
    const seen = await authority.state.counters.counter('test', 60_000).peek('192.0.2.20');
    assert.equal(seen.count, 5, 'the primary\'s own counter reads the same memory');

    await ask(a, { t: 'test.open', listener: 'imaps', address: '192.0.2.21' });
    await waitFor('the primary counts worker 1\'s session', async () => authority.state.openFrom('192.0.2.21') > 0);
    assert.equal(authority.state.openFrom('192.0.2.21'), 1, 'the primary\'s total');
    // The primary told worker 2 in the same turn it counted; this request follows on the same channel.
    assert.equal(await ask(b, { t: 'test.open-from', address: '192.0.2.21' }), 1);

    const banned = ban('address', '192.0.2.22');
    await ask(a, { t: 'test.ban', ban: banned });
    assert.equal(await ask(b, { t: 'test.banned', id: banned.id }), true);

    const listeners = await ask(b, { t: 'test.listeners' });
    assert.deepEqual(listeners, { added: 1, max: 10, warnings: [] }, 'one listener for 13 limiters, the listener limit kept, no warning');
  } finally {
    cluster.off('message', route);
    for (const w of workers) {
      if (w.isDead()) continue;
      const exited = once(w, 'exit');
      w.process.kill('SIGKILL');
      await within(exited, 5_000, `worker ${w.id} exiting after SIGKILL`);
    }
    await authority.close();
  }
});
