/**
 * The adapter over rate-limiter-flexible's cluster limiters
 * (src/cluster/limiters.ts), against the installed library: one process
 * plays primary and worker, with node:cluster's channel replaced by a loop,
 * so the library's own messages run both ways. A library that renames its
 * channel, moves the master's limiters or adds listeners differently fails
 * here.
 */
import assert from 'node:assert/strict';
import cluster, { type Worker } from 'node:cluster';
import { after, before, test } from 'node:test';
import { LIMITER_CHANNEL, masterLimiter, WorkerLimiters } from '../../../src/cluster/limiters.ts';
import { BoundedMemoryLimiter } from '../../../src/policy/counters.ts';

const sent: unknown[] = [];
const original = process.send;

before(() => {
  // The worker side sends to the "primary": delivered to cluster's 'message' listeners, answered through this fake worker.
  const worker = { send: (reply: unknown) => setImmediate(() => process.emit('message', reply as never, undefined as never)) } as unknown as Worker;
  process.send = ((msg: unknown) => {
    sent.push(msg);
    setImmediate(() => cluster.emit('message', worker, msg));
    return true;
  }) as typeof process.send;
});

after(() => {
  process.send = original;
});

test('a worker\'s limiter counts in the primary\'s limiter for the same prefix, over the library\'s own messages', async () => {
  const shared = masterLimiter();
  const workers = new WorkerLimiters(1_000);
  try {
    const opts = { keyPrefix: 'test:limiters:1', points: 1_000, duration: 60 };
    const limiter = workers.make(opts);
    const res = await limiter.consume('192.0.2.1', 3);
    assert.equal(res.consumedPoints, 3);
    assert.equal((await shared(opts).get('192.0.2.1'))?.consumedPoints, 3, 'the primary reads the count the worker made');
    await shared(opts).consume('192.0.2.1', 2);
    assert.equal((await limiter.consume('192.0.2.1', 1)).consumedPoints, 6, 'and the worker counts on from the primary\'s');
    assert.ok(sent.length > 0 && sent.every((m) => (m as { channel?: unknown }).channel === LIMITER_CHANNEL), 'the library speaks on the channel the dispatcher passes on');
  } finally {
    workers.close();
  }
});

test('many worker limiters hang off one process listener, the listener limit stays, and close() detaches it', () => {
  const before = process.listenerCount('message');
  const max = process.getMaxListeners();
  const workers = new WorkerLimiters(1_000);
  for (let i = 0; i < 12; i++) workers.make({ keyPrefix: `test:limiters:many:${i}`, points: 10, duration: 60 });
  assert.equal(process.listenerCount('message') - before, 1);
  assert.equal(process.getMaxListeners(), max);
  workers.close();
  assert.equal(process.listenerCount('message'), before);
});

test('the primary\'s limiters are bounded (policy_store.max_keys), also the ones the library makes for a worker\'s init', async () => {
  const full: string[] = [];
  const shared = masterLimiter(3, (prefix) => full.push(prefix));
  const workers = new WorkerLimiters(1_000);
  try {
    // A prefix the primary never asked for: the library's master makes its limiter when the worker's init arrives.
    const opts = { keyPrefix: 'test:limiters:bounded', points: 1_000, duration: 60 };
    const limiter = workers.make(opts);
    for (let i = 0; i < 10; i++) await limiter.consume(`192.0.2.${i}`);
    const kept = shared(opts);
    assert.ok(kept instanceof BoundedMemoryLimiter, 'the master keeps a bounded limiter');
    assert.equal(kept.size, 3);
    assert.equal(await kept.get('192.0.2.0'), null, 'the oldest counts were forgotten');
    assert.equal((await kept.get('192.0.2.9'))?.consumedPoints, 1);
    assert.deepEqual([...new Set(full)], ['test:limiters:bounded']);
  } finally {
    workers.close();
    masterLimiter();
  }
});
