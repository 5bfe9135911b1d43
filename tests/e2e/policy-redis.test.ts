/**
 * Two gateway processes sharing one Redis policy store (a real redis-server
 * started here on a loopback port, without persistence): failed logins on
 * both add up to one ban that both enforce, and a connection limit counts
 * connections to either gateway. Clients: Python's imaplib and curl.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { python, run } from './harness/clients.ts';
import { checksAt, storm, summary } from './policy-helpers.ts';
import { CLI, startGateway, type Gateway } from './harness/gateway.ts';
import { redisMissing, startRedis, type RedisServer } from '../helpers/redis.ts';
import { startDovecot, startNginx, userByName, type Dovecot, type Nginx } from './harness/servers.ts';

let redis: RedisServer | undefined;

test('prerequisite: redis-server is installed (.ci/install-deps.sh)', () => {
  assert.equal(redisMissing, false, String(redisMissing));
});
let dovecot: Dovecot;
let nginx: Nginx;
let one: Gateway;
let two: Gateway;
const alice = userByName('alice');

before(async () => {
  redis = await startRedis();
  // Dovecot delays its answer to a wrong password, as a real one does: parallel guesses stay in flight.
  [dovecot, nginx] = await Promise.all([startDovecot({ authFailureDelay: '2 secs' }), startNginx()]);
  const hash = await run(process.execPath, [CLI, 'hash-password'], { input: `${alice.password}\n` });
  const extra = {
    users: { list: [{ name: alice.name, password_hash: hash.stdout.trim() }] },
    brute_force: { per_address_user: { failures: 3, window: '1m', ban: '1m' } },
    rate_limits: [{ limit: 'connections', per: 'address', max: 2, window: '1m', listeners: ['https'] }],
    policy_store: { type: 'redis', url: redis.url, prefix: 'e2e' },
  };
  const listeners = [
    { name: 'imaps', protocol: 'imap' as const, tls: 'implicit' as const, backend: `127.0.0.1:${dovecot.imapPort}`, authentication: 'local' },
    { name: 'https', protocol: 'http' as const, tls: 'implicit' as const, backend: `127.0.0.1:${nginx.port}` },
    { name: 'imap-pass', protocol: 'imap' as const, tls: 'implicit' as const, backend: `127.0.0.1:${dovecot.imapPort}` },
  ];
  [one, two] = await Promise.all([startGateway({ listeners, extra }), startGateway({ listeners, extra })]);
});

after(async () => {
  await Promise.all([one?.stop(), two?.stop()]);
  await Promise.all([dovecot?.stop(), nginx?.stop()]);
  await redis?.stop();
});

function imapLogin(port: number, password: string): Promise<{ ok: boolean; error?: string }> {
  return python(
    `
import imaplib
m = imaplib.IMAP4_SSL('127.0.0.1', int(sys.argv[1]), ssl_context=ctx(), timeout=10)
try:
    m.login(sys.argv[2], sys.argv[3])
    m.logout()
    out({'ok': True})
except imaplib.IMAP4.error as e:
    out({'ok': False, 'error': str(e)})
`,
    [port, alice.name, password],
  );
}

test('failed logins on two gateways add up to one ban that both enforce', async () => {
  assert.match((await imapLogin(one.ports.imaps!, 'guess-1')).error ?? '', /AUTHENTICATIONFAILED/);
  assert.match((await imapLogin(two.ports.imaps!, 'guess-2')).error ?? '', /AUTHENTICATIONFAILED/);
  assert.match((await imapLogin(one.ports.imaps!, 'guess-3')).error ?? '', /AUTHENTICATIONFAILED/);
  for (const gw of [two, one]) {
    const r = await imapLogin(gw.ports.imaps!, alice.password);
    assert.equal(r.ok, false, 'the right password is refused on both gateways');
    assert.match(r.error ?? '', /Too many failed logins/);
  }
});

test('a connection limit counts connections to either gateway', async () => {
  const get = (gw: Gateway) =>
    run('curl', ['-sS', '-k', '--interface', '127.0.0.90', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${gw.ports.https}/`]);
  assert.equal((await get(one)).stdout, '200');
  assert.equal((await get(two)).stdout, '200');
  // Gateway two has seen one connection itself; the shared count (2) is at the limit.
  assert.equal((await get(two)).stdout, '429');
});

test('40 parallel wrong LOGINs spread over two gateways sharing Redis: no more reach Dovecot than the threshold', { timeout: 120_000 }, async () => {
  const bob = userByName('bob');
  const r = await storm([one.ports['imap-pass']!, two.ports['imap-pass']!], 40, 'bob', '127.0.0.91', { user: bob.name, password: bob.password, source: '127.0.0.92' });
  const checked = await checksAt(dovecot, 'bob', '127.0.0.91');
  assert.ok(checked >= 1, 'the first guesses did reach Dovecot');
  assert.ok(checked <= 3, `Dovecot checked ${checked} passwords for bob (threshold 3): ${summary(r.answers)}`);
  assert.ok(r.answers.every((a) => /AUTHENTICATIONFAILED|UNAVAILABLE/.test(a)), summary(r.answers));
  assert.equal(r.victim.ok, true, r.victim.error);
});
