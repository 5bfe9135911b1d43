/**
 * The Redis policy store against a real redis-server (started here, on a free
 * loopback port, in a temp folder, without persistence): two gateways'
 * engines share failure counts, bans and connection limits.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config } from '../../../src/config/load.ts';
import type { PolicyAdmin } from '../../../src/control/bans.ts';
import type { PolicyEngine } from '../../../src/policy/engine.ts';
import type { PolicyState } from '../../../src/policy/state.ts';
import { redisMissing, startRedis, type RedisServer } from '../../helpers/redis.ts';
import { waitFor } from '../../helpers/wait.ts';
import { cheapScrypt, configFrom, connect, creds, engineFor, login, memoryLog } from './helpers.ts';

test('prerequisite: redis-server is installed (.ci/install-deps.sh)', () => {
  assert.equal(redisMissing, false, String(redisMissing));
});


let redis: RedisServer | undefined;
let port = 0;
const states: PolicyState[] = [];

before(async () => {
  redis = await startRedis();
  port = redis.port;
});

after(async () => {
  await Promise.all(states.map((s) => s.close()));
  await redis?.stop();
});

const PW = cheapScrypt('right');

function redisConfig(prefix: string, extra = ''): Config {
  return configFrom(`
policy_store: { type: redis, url: "redis://127.0.0.1:${port}/0", prefix: ${prefix} }
users:
  list:
    - { name: alice, password_hash: "${PW}" }
brute_force:
  per_address: { failures: 4, window: 1m, ban: 1h }
  per_address_user: { failures: 3, window: 1m, ban: 2s }
  per_user: { failures: 100, window: 1m, ban: 1m }
${extra}
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:143", authentication: local }
`);
}

async function gateways(prefix: string, extra = ''): Promise<{ config: Config; a: PolicyEngine; b: PolicyEngine; admin: { a: PolicyAdmin; b: PolicyAdmin } }> {
  const config = redisConfig(prefix, extra);
  const one = await engineFor(config);
  const two = await engineFor(config);
  states.push(one.state, two.state);
  return { config, a: one.engine, b: two.engine, admin: { a: one.admin, b: two.admin } };
}

async function attempt(engine: PolicyEngine, config: Config, ip: string, password: string) {
  const c = connect(config, 'imaps', ip);
  const cr = creds('alice', password);
  return engine.onAuth(login(c, cr), cr);
}

test('failed logins on two gateways add up to one ban that both enforce, and it expires in Redis', async () => {
  const { config, a, b, admin } = await gateways('t1');
  assert.equal((await attempt(a, config, '192.0.2.1', 'wrong')).action, 'deny');
  assert.equal((await attempt(b, config, '192.0.2.1', 'wrong')).action, 'deny');
  assert.equal((await attempt(a, config, '192.0.2.1', 'wrong')).action, 'deny');
  assert.equal((await attempt(b, config, '192.0.2.1', 'right')).action, 'tempfail', 'gateway B refuses the right password after failures on both');
  assert.deepEqual((await admin.b.inspect({ address: '192.0.2.1', user: 'alice' })).failures, { address: 3, pair: 3, user: 3 });
  await sleep(2_100);
  assert.equal((await attempt(b, config, '192.0.2.1', 'right')).action, 'allow', 'the ban ended (Redis TTL)');
});

test('an address ban made on one gateway refuses connections on the other before the greeting', async () => {
  const { config, a, b, admin } = await gateways('t2');
  for (const ip of ['192.0.2.9', '192.0.2.9', '192.0.2.9', '192.0.2.9']) {
    const c = connect(config, 'imaps', ip);
    const cr = creds(`u${Math.random()}`, 'x');
    await a.onAuth(login(c, cr), cr);
  }
  assert.equal(a.onConnect(connect(config, 'imaps', '192.0.2.9')).action, 'tempfail');
  await waitFor('gateway B hears of the ban', () => b.onConnect(connect(config, 'imaps', '192.0.2.9')).action === 'tempfail');
  assert.ok(admin.b.banList().list().some((x) => x.ip === '192.0.2.9' && x.source === 'auto'));
  // Lifting it on B lifts it on A.
  assert.equal(admin.b.banList().unban('192.0.2.9'), true);
  await waitFor('gateway A hears of the unban', () => a.onConnect(connect(config, 'imaps', '192.0.2.9')).action === 'allow');
});

test('manual bans are shared and listed by both gateways', async () => {
  const { config, a, b, admin } = await gateways('t3');
  await admin.a.addBan({ kind: 'pair', address: '192.0.2.40', user: 'alice', durationMs: 60_000, reason: 'test' });
  assert.deepEqual((await admin.b.listBans()).map((x) => x.id), ['pair:192.0.2.40|alice']);
  assert.equal((await attempt(b, config, '192.0.2.40', 'right')).action, 'tempfail');
  assert.equal(await admin.b.removeBan('pair:192.0.2.40|alice'), true);
  assert.equal((await attempt(a, config, '192.0.2.40', 'right')).action, 'allow');
});

test('a connection limit is counted across gateways', async () => {
  const { config, a, b, admin } = await gateways('t4', 'rate_limits:\n  - { limit: connections, per: address, max: 3, window: 1m }\n');
  assert.equal(a.onConnect(connect(config, 'imaps', '192.0.2.7')).action, 'allow');
  await a.settled();
  assert.equal(a.onConnect(connect(config, 'imaps', '192.0.2.7')).action, 'allow');
  await a.settled();
  assert.equal(b.onConnect(connect(config, 'imaps', '192.0.2.7')).action, 'allow', 'the third, on B');
  await b.settled();
  const v = b.onConnect(connect(config, 'imaps', '192.0.2.7'));
  assert.equal(v.action, 'tempfail', 'B saw one connection itself, but the shared count is at the limit');
  assert.ok(v.action === 'tempfail' && v.retryAfterMs !== undefined && v.retryAfterMs > 50_000);
});

test('when Redis is gone, limits carry on in memory and the failure is logged', async () => {
  const { log, lines } = memoryLog();
  const config = redisConfig('t5');
  const { engine, state } = await engineFor(config, { log });
  states.push(state);
  assert.equal((await attempt(engine, config, '192.0.2.60', 'wrong')).action, 'deny');
  await redis?.stop();
  const started = Date.now();
  for (let i = 0; i < 3; i++) assert.equal((await attempt(engine, config, '192.0.2.60', 'wrong')).action, 'deny');
  assert.equal((await attempt(engine, config, '192.0.2.60', 'right')).action, 'tempfail', 'counted and banned in this gateway\'s memory');
  assert.ok(Date.now() - started < 5_000, 'no long waits on a dead store');
  assert.ok(lines.some((l) => l.msg === "policy store failed, using this gateway's memory"));
});
