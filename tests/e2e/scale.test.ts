/**
 * Beyond one box: two gateways behind a real HAProxy (TCP mode,
 * `send-proxy-v2`, round robin, started here on loopback high ports), sharing
 * a real redis-server. Clients on their own loopback addresses (127.0.0.66,
 * .77, .78, .79) reach the gateways only through HAProxy:
 *  - a brute force spread over both gateways is banned on both;
 *  - the client's address (not HAProxy's) reaches Dovecot through IMAP ID
 *    (login_trusted_networks) and Postfix through XCLIENT, nginx through
 *    X-Forwarded-For, and the gateways' own logs;
 *  - a PROXY header from an address outside accept_proxy_from, and a
 *    connection from HAProxy's address without one, are refused.
 * And trust_forwarded as a list, against real nginx's log: a client outside
 * it cannot set the X-Forwarded-For nginx sees, one inside can.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { existsSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { python, run } from './harness/clients.ts';
import { startGateway, type Gateway, type LogLine } from './harness/gateway.ts';
import { HAPROXY_BIN, startHaproxy, type Haproxy } from './harness/peers.ts';
import { startDovecot, startNginx, startPostfix, userByName, type Dovecot, type Nginx, type Postfix } from './harness/servers.ts';
import { proxyHeader } from '../../src/net/proxy-protocol.ts';
import { redisMissing, startRedis, type RedisServer } from '../helpers/redis.ts';
import { waitFor } from '../helpers/wait.ts';

let redis: RedisServer;
let dovecot: Dovecot;
let postfix: Postfix;
let nginx: Nginx;
let gws: Gateway[] = [];
let haproxy: Haproxy;
const alice = userByName('alice');

test('prerequisites: haproxy and redis-server are installed (.ci/install-deps.sh)', () => {
  assert.ok(existsSync(HAPROXY_BIN), `${HAPROXY_BIN} is missing`);
  assert.equal(redisMissing, false, String(redisMissing));
});

before(async () => {
  redis = await startRedis();
  [dovecot, postfix, nginx] = await Promise.all([startDovecot(), startPostfix(), startNginx()]);
  const behind = { accept_proxy_from: ['127.0.0.1/32'] };
  const listeners = [
    { name: 'imaps', protocol: 'imap' as const, tls: 'implicit' as const, backend: `127.0.0.1:${dovecot.imapPort}`, ...behind },
    { name: 'smtps', protocol: 'smtp' as const, tls: 'implicit' as const, backend: `127.0.0.1:${postfix.port}`, ...behind },
    { name: 'https', protocol: 'http' as const, tls: 'implicit' as const, backend: `127.0.0.1:${nginx.port}`, ...behind },
    // Not behind HAProxy: trust_forwarded as a list, client by client.
    { name: 'https-direct', protocol: 'http' as const, tls: 'implicit' as const, backend: `127.0.0.1:${nginx.port}`, trust_forwarded: ['127.0.0.10/32'] },
  ];
  const extra = {
    brute_force: { per_address_user: { failures: 3, window: '1m', ban: '1m' } },
    policy_store: { type: 'redis', url: redis.url, prefix: 'e2e-scale' },
  };
  gws = await Promise.all([startGateway({ listeners, extra }), startGateway({ listeners, extra })]);
  const servers = (name: string) => gws.map((g) => `127.0.0.1:${g.ports[name]}`);
  haproxy = await startHaproxy([
    { name: 'imaps', servers: servers('imaps') },
    { name: 'smtps', servers: servers('smtps') },
    { name: 'https', servers: servers('https') },
  ]);
});

after(async () => {
  await haproxy?.stop();
  await Promise.all(gws.map((g) => g.stop()));
  await Promise.all([dovecot?.stop(), postfix?.stop(), nginx?.stop()]);
  await redis?.stop();
});

/** An IMAPS login from `source` through HAProxy. */
function imapLogin(source: string, password: string): Promise<{ ok: boolean; error?: string }> {
  return python(
    `
import imaplib
class From(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        s = socket.create_connection((self.host, self.port), timeout, source_address=(sys.argv[1], 0))
        return self.ssl_context.wrap_socket(s, server_hostname=self.host)
m = From('127.0.0.1', int(sys.argv[2]), ssl_context=ctx(), timeout=10)
try:
    m.login(sys.argv[3], sys.argv[4])
    m.select('INBOX')
    m.logout()
    out({'ok': True})
except imaplib.IMAP4.error as e:
    out({'ok': False, 'error': str(e)})
`,
    [source, haproxy.ports.imaps!, alice.name, password],
  );
}

const from = (ip: string, msg: string) => (l: LogLine) => l.msg === msg && l.client === ip;

test('a brute force spread over both gateways is banned on both (shared Redis), the right password included', async () => {
  for (let i = 1; i <= 3; i++) assert.match((await imapLogin('127.0.0.66', `guess-${i}`)).error ?? '', /AUTHENTICATIONFAILED/);
  for (const g of gws) await g.waitForLog(from('127.0.0.66', 'login failed'));
  for (let i = 0; i < 2; i++) {
    const r = await imapLogin('127.0.0.66', alice.password);
    assert.equal(r.ok, false, 'the right password is refused through either gateway');
    assert.match(r.error ?? '', /Too many failed logins/);
  }
  for (const g of gws) await g.waitForLog((l) => l.msg === 'login refused by policy' && l.client === '127.0.0.66');
  assert.equal((await imapLogin('127.0.0.67', alice.password)).ok, true, 'another address still gets in');
});

test('the client\'s address reaches Dovecot through IMAP ID, and both gateways log it with HAProxy as `via`', async () => {
  for (let i = 0; i < 2; i++) assert.equal((await imapLogin('127.0.0.77', alice.password)).ok, true);
  for (const g of gws) {
    const line = await g.waitForLog(from('127.0.0.77', 'login ok'));
    assert.equal(line.via, '127.0.0.1');
  }
  assert.match(await dovecot.logs(), /Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.77,/);
});

test('the client\'s address reaches Postfix through XCLIENT', async () => {
  const r = await python<{ login: number; sent: object }>(
    `
import smtplib
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx(), timeout=10, source_address=('127.0.0.78', 0))
code, _ = s.login(sys.argv[2], sys.argv[3])
sent = s.sendmail('alice@e2e.test', ['bob@e2e.test'], 'Subject: behind haproxy\\r\\n\\r\\nhello\\r\\n')
s.quit()
out({'login': code, 'sent': sent})
`,
    [haproxy.ports.smtps!, alice.name, alice.password],
  );
  assert.equal(r.login, 235);
  assert.deepEqual(r.sent, {});
  await waitFor('Postfix\'s queue line', async () => /client=[^\s]*\[127\.0\.0\.78\], sasl_method=PLAIN, sasl_username=alice/.test(await postfix.logs()) || undefined);
});

test('the client\'s address reaches nginx as X-Forwarded-For through HAProxy', async () => {
  const r = await run('curl', ['-sS', '-k', '--interface', '127.0.0.79', '-H', 'X-Forwarded-For: 6.6.6.6', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${haproxy.ports.https}/`]);
  assert.equal(r.stdout, '200', r.stderr);
  const seen = await waitFor('nginx\'s log line', async () => (await nginx.requests()).find((q) => q.x_real_ip === '127.0.0.79'));
  assert.equal(seen.xff, '127.0.0.79', 'the client\'s own X-Forwarded-For was replaced, HAProxy is not in it');
});

test('a PROXY header from an address outside accept_proxy_from is refused; so is HAProxy\'s address without a header', async () => {
  const gw = gws[0]!;
  const untrusted = await closedWithout(gw.ports.imaps!, '127.0.0.2', proxyHeader('v2', { clientIp: '203.0.113.9', clientPort: 1, localIp: '127.0.0.1', localPort: 993 }));
  assert.equal(untrusted, '', 'not a byte for an untrusted peer');
  await gw.waitForLog((l) => l.msg.includes('outside accept_proxy_from refused') && l.client === '127.0.0.2' && l.listener === 'imaps');
  assert.equal(await closedWithout(gw.ports.imaps!, '127.0.0.1', Buffer.from('a1 CAPABILITY\r\n')), '');
  await gw.waitForLog((l) => l.msg.startsWith('PROXY protocol: no valid header') && l.client === '127.0.0.1');
  assert.ok(!(await gw.logs()).some((l) => l.client === '203.0.113.9'), 'the forged address was never a client');
});

test('trust_forwarded [127.0.0.10/32]: that client\'s X-Forwarded-For reaches nginx, extended; another client\'s is replaced', async () => {
  const get = (source: string) =>
    run('curl', ['-sS', '-k', '--interface', source, '-H', 'X-Forwarded-For: 198.51.100.1', '-H', 'X-Real-IP: 198.51.100.1', '-o', '/dev/null', '-w', '%{http_code}', `https://127.0.0.1:${gws[0]!.ports['https-direct']}/`]);
  assert.equal((await get('127.0.0.10')).stdout, '200');
  assert.equal((await get('127.0.0.11')).stdout, '200');
  const requests = await waitFor('both requests in nginx\'s log', async () => {
    const all = await nginx.requests();
    return all.some((q) => q.xff?.endsWith('127.0.0.11')) && all.some((q) => q.xff?.endsWith('127.0.0.10')) ? all : undefined;
  });
  const inside = requests.find((q) => q.xff?.endsWith('127.0.0.10'));
  const outside = requests.find((q) => q.xff?.endsWith('127.0.0.11'));
  assert.equal(inside?.xff, '198.51.100.1, 127.0.0.10');
  assert.equal(inside?.x_real_ip, '198.51.100.1');
  assert.equal(outside?.xff, '127.0.0.11');
  assert.equal(outside?.x_real_ip, '127.0.0.11');
});

/** Connects from `source`, sends `bytes`, and resolves with what came back once the gateway closed. */
function closedWithout(port: number, source: string, bytes: Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port, localAddress: source });
    let got = '';
    const timer = setTimeout(() => reject(new Error(`still open after 8 s: ${JSON.stringify(got)}`)), 8000);
    s.on('connect', () => s.write(bytes));
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', () => undefined);
    s.on('close', () => {
      clearTimeout(timer);
      resolve(got);
    });
  });
}
