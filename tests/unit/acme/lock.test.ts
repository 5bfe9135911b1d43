/**
 * The Redis ordering lock (src/acme/lock.ts) against a real redis-server,
 * started here on a free loopback port in a temp folder, without persistence:
 * exclusive between two gateways, kept alive while held, lost by a holder that
 * stops refreshing, never removed by a non-holder, and replaced by the file
 * lock (with a warning) when Redis cannot be reached.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { FileOrderLock, orderLockFor, RedisOrderLock, type HeldLock, type RedisLockOptions } from '../../../src/acme/lock.ts';
import { acmeSettings } from '../../../src/acme/settings.ts';
import { AcmeStorage } from '../../../src/acme/storage.ts';
import { parseConfig } from '../../../src/config/load.ts';
import { ConfigError } from '../../../src/core/errors.ts';
import { freePort } from '../../helpers/proc.ts';
import { redisMissing, startRedis, type RedisServer } from '../../helpers/redis.ts';
import { memoryLog, silentLog } from '../policy/helpers.ts';

test('prerequisite: redis-server is installed (.ci/install-deps.sh)', () => {
  assert.equal(redisMissing, false, String(redisMissing));
});

const DIRECTORY = 'https://ca.test/dir';

const root = mkdtempSync(join(tmpdir(), 'mailgate-acme-redis-lock-'));
let redis: RedisServer | undefined;
let port = 0;
let client: Redis | undefined;

before(async () => {
  redis = await startRedis();
  port = redis.port;
  client = new Redis({ port, host: '127.0.0.1', maxRetriesPerRequest: 0 });
});

after(async () => {
  client?.disconnect();
  await redis?.stop();
  rmSync(root, { recursive: true, force: true });
});

function fileLock(sub: string): FileOrderLock {
  return new FileOrderLock(new AcmeStorage(join(root, sub), DIRECTORY));
}

function redisLock(prefix: string, extra: Partial<RedisLockOptions> = {}): RedisOrderLock {
  return new RedisOrderLock({
    url: `redis://127.0.0.1:${port}/0`,
    prefix,
    timeoutMs: 500,
    directory: DIRECTORY,
    fallback: fileLock(`files-${prefix}`),
    log: silentLog,
    pollMinMs: 20,
    pollMaxMs: 100,
    ...extra,
  });
}

function settled<T>(p: Promise<T>): () => boolean {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  return () => done;
}

test('acme.lock: auto follows policy_store, file forces the file lock, redis without a Redis policy store is refused at its line', () => {
  const listeners = 'listeners:\n  - { name: https, protocol: http, listen: "127.0.0.1:0", tls: implicit, backend: "127.0.0.1:80" }\n';
  const store = 'policy_store: { type: redis, url: "redis://10.0.0.5:6379/1", prefix: gw, timeout: 2s }\n';
  const cfg = (acme: string, rest = '') => parseConfig(`hostname: mail.example.org\nacme:\n  accept_terms: true\n${acme}${rest}${listeners}`, '/etc/mailgate/mailgate.yaml');
  assert.deepEqual(acmeSettings(cfg('', store))?.lock, { type: 'redis', url: 'redis://10.0.0.5:6379/1', prefix: 'gw', timeoutMs: 2000 });
  assert.deepEqual(acmeSettings(cfg('  lock: redis\n', store))?.lock.type, 'redis');
  assert.deepEqual(acmeSettings(cfg(''))?.lock, { type: 'file' }, 'memory policy store: the file lock');
  assert.deepEqual(acmeSettings(cfg('  lock: file\n', store))?.lock, { type: 'file' });
  const s = acmeSettings(cfg('', store));
  assert.ok(s);
  assert.equal(orderLockFor(s, new AcmeStorage(root, DIRECTORY), silentLog).kind, 'redis');
  assert.throws(
    () => cfg('  lock: redis\n'),
    (err: unknown) => err instanceof ConfigError && err.problems.some((p) => p.path === 'acme.lock' && p.line === 4 && /policy_store/.test(p.message)),
  );
});

test('two gateways, one name: the second waits until the first releases, then holds it', async () => {
  const a = redisLock('t1');
  const b = redisLock('t1');
  const key = a.key('Mail.Example.org');
  assert.equal(key, 't1:acme:lock:ca.test-dir:mail.example.org');
  const held = await a.acquire('mail.example.org', { waitMs: 1_000 });
  const holders: string[] = [];
  const second = b.acquire('mail.example.org', { waitMs: 10_000, onWait: (h) => holders.push(h) });
  const done = settled(second);
  await sleep(400);
  assert.equal(done(), false, 'the second gateway still waits while the first holds the lock');
  assert.equal(holders.length, 1, 'told once that it waits');
  assert.match(holders[0] ?? '', /"pid":/);
  const ownerA = await client?.get(key);
  const t = Date.now();
  await held.release();
  const got = await second;
  assert.ok(Date.now() - t < 1_000, 'taken soon after the release');
  const ownerB = await client?.get(key);
  assert.ok(ownerB && ownerB !== ownerA, 'the key now holds the second gateway\'s token');
  const ttl = (await client?.pttl(key)) ?? -1;
  assert.ok(ttl > 0 && ttl <= 120_000, `the lock has a TTL (${ttl} ms)`);
  await got.release();
  assert.equal(await client?.exists(key), 0, 'released: the key is gone');
  await got.release(); // twice is fine
});

test('a refreshed lock outlives its TTL; a waiter gives up after lock_wait with ACME_LOCK', async () => {
  const a = redisLock('t2', { ttlMs: 300, refreshMs: 80 });
  const held = await a.acquire('x.test', { waitMs: 1_000 });
  const errors: unknown[] = [];
  const t = Date.now();
  await assert.rejects(redisLock('t2').acquire('x.test', { waitMs: 900, onRefreshError: (e) => errors.push(e) }), { code: 'ACME_LOCK' });
  assert.ok(Date.now() - t >= 850, 'waited for lock_wait, three times the TTL');
  await held.release();
  assert.equal(await client?.exists(a.key('x.test')), 0);
});

test('a holder that stops refreshing loses the lock after the TTL; its late release and refresh leave the new holder alone', async () => {
  const lost: unknown[] = [];
  // Refreshes far too late for its TTL: as good as dead.
  const dead = await redisLock('t3', { ttlMs: 300, refreshMs: 1_000 }).acquire('y.test', { waitMs: 1_000, onRefreshError: (e) => lost.push(e) });
  const taker = redisLock('t3', { ttlMs: 10_000 });
  const key = taker.key('y.test');
  const t = Date.now();
  const held: HeldLock = await taker.acquire('y.test', { waitMs: 5_000 });
  const waited = Date.now() - t;
  assert.ok(waited >= 200 && waited < 2_000, `taken over once the TTL ran out (after ${waited} ms)`);
  const owner = await client?.get(key);
  await sleep(1_000 - waited + 200);
  assert.equal(lost.length, 1, 'the dead holder\'s refresh found the lock gone and said so');
  assert.equal((lost[0] as { code?: string }).code, 'ACME_LOCK');
  assert.ok(((await client?.pttl(key)) ?? 0) > 8_000, 'its refresh did not touch the new holder\'s TTL');
  await dead.release(); // a non-holder's release
  assert.equal(await client?.get(key), owner, 'the new holder keeps its lock');
  await held.release();
  assert.equal(await client?.exists(key), 0);
});

test('Redis unreachable: the file lock in storage is taken instead, with a warning, and stays exclusive', async () => {
  const { log, lines } = memoryLog();
  const closed = await freePort(); // nothing listens there
  const storage = new AcmeStorage(join(root, 'down'), DIRECTORY);
  const down = (): RedisOrderLock =>
    new RedisOrderLock({ url: `redis://127.0.0.1:${closed}/0`, prefix: 't4', timeoutMs: 300, directory: DIRECTORY, fallback: new FileOrderLock(storage), log });
  const held = await down().acquire('z.test', { waitMs: 2_000 });
  assert.ok(existsSync(storage.lockFile('z.test')), 'the file lock is held');
  const warned = lines.filter((l) => l.level === 'warn' && l.msg === 'ordering lock: Redis is not reachable; using the file lock in the storage folder instead');
  assert.equal(warned.length, 1);
  assert.equal(warned[0]?.name, 'z.test');
  await assert.rejects(down().acquire('z.test', { waitMs: 300 }), { code: 'ACME_LOCK' }, 'a second gateway without Redis waits on the same file lock');
  await held.release();
  assert.ok(!existsSync(storage.lockFile('z.test')), 'released');
});
