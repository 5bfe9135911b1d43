/**
 * Backend pools: the order a new session tries the members in (healthy
 * first, fewest sessions, ties in turn), passive marks that hold until a
 * newer check says up, and the active checker against small servers that
 * greet, greet wrongly, or are gone.
 */
import assert from 'node:assert/strict';
import { createServer, type AddressInfo, type Server } from 'node:net';
import { test } from 'node:test';
import { HealthChecker, healthTargets, targetKey, type HealthState } from '../../../src/backend/health.ts';
import { BackendPools } from '../../../src/backend/pools.ts';
import { parseConfig } from '../../../src/config/load.ts';
import { createLogger } from '../../../src/core/log.ts';
import type { HostPort } from '../../../src/net/address.ts';
import { waitFor } from '../../helpers/wait.ts';

const imap = { protocol: 'imap', proxyProtocol: false as const };
const a: HostPort = { host: '10.0.0.1', port: 143 };
const b: HostPort = { host: '10.0.0.2', port: 143 };
const c: HostPort = { host: '10.0.0.3', port: 143 };
const key = (x: HostPort) => targetKey('imap', x, false);

function viewOf(states: Record<string, HealthState>) {
  return { get: (k: string) => states[k] };
}

const up = (at = Date.now()): HealthState => ({ up: true, checkedAt: at, since: at, latencyMs: 1, error: null });
const down = (at = Date.now()): HealthState => ({ up: false, checkedAt: at, since: at, latencyMs: null, error: 'ECONNREFUSED' });

test('the fewest sessions first; equal counts take turns; a member found down goes last', () => {
  const states: Record<string, HealthState> = {};
  const pools = new BackendPools(viewOf(states));
  const firsts = [0, 1, 2, 3].map(() => pools.order(imap, [a, b, c])[0]);
  assert.deepEqual(new Set(firsts.map((x) => x?.host)).size, 3, 'ties rotate over the members');
  const releaseA = pools.acquire(imap, a);
  pools.acquire(imap, b);
  assert.deepEqual(pools.order(imap, [a, b, c])[0], c, 'c has no session');
  pools.acquire(imap, c);
  pools.acquire(imap, c);
  assert.deepEqual(pools.order(imap, [a, b, c]).slice(0, 2).map((x) => x.host).sort(), ['10.0.0.1', '10.0.0.2']);
  releaseA();
  releaseA();
  assert.equal(pools.sessions(imap, a), 0, 'a release counts once');
  states[key(a)] = down();
  const order = pools.order(imap, [a, b, c]);
  assert.deepEqual(order.at(-1), a, 'a member that is down is tried last');
});

test('a failed connection marks the member down at once, asks for a check, and holds until a check that ended later says up', () => {
  const states: Record<string, HealthState> = { [key(a)]: up(Date.now() - 1000) };
  const asked: string[] = [];
  const pools = new BackendPools(viewOf(states), (k) => asked.push(k));
  pools.failed(imap, a);
  assert.deepEqual(asked, [key(a)]);
  assert.equal(pools.healthy(key(a)), false, 'the older check does not lift the mark');
  assert.deepEqual(pools.order(imap, [a, b])[0], b);
  states[key(a)] = up(Date.now() + 1);
  assert.equal(pools.healthy(key(a)), true, 'a newer check that says up lifts it');
});

test('health targets: list backends of mail listeners and list routes that apply to them; one backend is not checked', () => {
  const config = parseConfig(
    `
listeners:
  - { name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, backend: ["10.0.0.1:143", "10.0.0.2:143"], health_check: { interval: 2s } }
  - { name: pop3s, protocol: pop3, listen: "127.0.0.1:0", tls: implicit, backend: "10.0.0.1:110" }
routes:
  - { users: [bob], protocols: [pop3], backend: ["10.0.1.1:110", "10.0.1.2:110"] }
`,
    '/etc/mailgate/x.yaml',
  );
  const imaps = config.listeners[0]!;
  assert.deepEqual(imaps.backend, { host: '10.0.0.1', port: 143 });
  assert.equal(imaps.pool?.length, 2);
  assert.equal(config.listeners[1]!.pool, undefined);
  const targets = healthTargets(config).map((t) => `${t.protocol} ${t.backend.host}:${t.backend.port} ${t.intervalMs}`);
  assert.deepEqual(targets, ['imap 10.0.0.1:143 2000', 'imap 10.0.0.2:143 2000', 'pop3 10.0.1.1:110 10000', 'pop3 10.0.1.2:110 10000']);
});

async function greeter(greeting: string): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => {
    s.on('error', () => undefined);
    s.resume();
    s.end(greeting);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as AddressInfo).port };
}

test('the checker: a greeting is up, a wrong greeting or no server is down, a recheck looks at once, a restarted member comes back', async () => {
  const good = await greeter('* OK ready\r\n');
  const bad = await greeter('-ERR not imap\r\n');
  const checker = new HealthChecker(createLogger('silent'));
  const at = (port: number): HostPort => ({ host: '127.0.0.1', port });
  const t = (port: number) => ({ protocol: 'imap' as const, backend: at(port), proxyProtocol: false as const, intervalMs: 60_000, timeoutMs: 1000 });
  const seen: number[] = [];
  checker.onChange(() => seen.push(Date.now()));
  try {
    checker.setTargets([t(good.port), t(bad.port), t(1)]);
    await checker.settled();
    assert.equal(checker.get(key(at(good.port)))?.up, true);
    assert.match(checker.get(key(at(bad.port)))?.error ?? '', /unexpected greeting/);
    assert.equal(checker.get(key(at(1)))?.up, false);
    await new Promise<void>((r) => good.server.close(() => r()));
    const before = seen.length;
    await new Promise((r) => setTimeout(r, 300));
    checker.recheck(key(at(good.port)));
    await waitFor('the recheck', () => (checker.get(key(at(good.port)))?.up === false ? true : undefined));
    assert.ok(seen.length > before, 'every result is published');
    await new Promise<void>((r) => good.server.listen(good.port, '127.0.0.1', r));
    await new Promise((r) => setTimeout(r, 300));
    checker.recheck(key(at(good.port)));
    await waitFor('up again', () => (checker.get(key(at(good.port)))?.up ? true : undefined));
    checker.setTargets([t(good.port)]);
    assert.equal(checker.get(key(at(bad.port))), undefined, 'a member no longer configured is forgotten');
  } finally {
    checker.stop();
    good.server.close();
    bad.server.close();
  }
});
