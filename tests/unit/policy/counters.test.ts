/** The memory counters' bound (policy_store.max_keys): a flood of new keys cannot grow memory past it. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BoundedMemoryLimiter, CounterStore, StoreErrors } from '../../../src/policy/counters.ts';
import { configFrom, memoryLog } from './helpers.ts';

test('a bounded memory limiter keeps at most max keys: the key whose window started first goes first', async (t) => {
  t.mock.timers.enable({ apis: ['Date', 'setTimeout'], now: 1_700_000_000_000 });
  let full = 0;
  const l = new BoundedMemoryLimiter({ keyPrefix: 't', points: 1_000, duration: 60 }, 3, () => full++);
  for (const k of ['a', 'b', 'c']) await l.consume(k);
  await l.consume('b');
  assert.equal(l.size, 3);
  assert.equal(full, 0);
  await l.consume('d');
  assert.equal(l.size, 3, 'still three keys');
  assert.equal(full, 1, 'the bound was reached, and said so');
  assert.equal(await l.get('a'), null, 'a, the oldest, was forgotten');
  assert.equal((await l.get('b'))?.consumedPoints, 2, 'b keeps its count');
  assert.equal((await l.get('d'))?.consumedPoints, 1);
  await l.delete('b');
  assert.equal(l.size, 2);
  // Windows that end take their keys with them.
  t.mock.timers.tick(60_001);
  assert.equal(l.size, 0);
  for (let i = 0; i < 1_000; i++) await l.consume(`k${i}`);
  assert.equal(l.size, 3, 'a thousand new keys, three kept');
});

test('the counter store bounds every memory counter with policy_store.max_keys, and logs when one is full', async () => {
  const { log, lines } = memoryLog();
  const store = new CounterStore({ prefix: 'mailgate', errors: new StoreErrors(log), maxKeys: 100, log });
  const c = store.counter('connections:address:x', 60_000);
  for (let i = 0; i < 1_000; i++) await c.hit(`192.0.2.${i}`);
  assert.equal((await c.peek('192.0.2.999')).count, 1);
  assert.equal((await c.peek('192.0.2.0')).count, 0, 'the first address was forgotten');
  assert.equal(lines.filter((l) => l.msg === 'policy counter full: the counts that started longest ago are forgotten (policy_store.max_keys)').length, 1, 'said once, not a thousand times');
  assert.equal(configFrom('').policy_store.max_keys, 100_000);
  assert.equal(configFrom('policy_store: { max_keys: 5000 }\n').policy_store.max_keys, 5000);
  assert.throws(() => configFrom('policy_store: { max_keys: 10 }\n'), /policy_store\.max_keys/);
});
