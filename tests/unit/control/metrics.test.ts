import assert from 'node:assert/strict';
import { request } from 'node:http';
import { test } from 'node:test';
import { GatewayMetrics, MetricsServer } from '../../../src/control/metrics.ts';
import { GatewayStats } from '../../../src/control/stats.ts';
import { backendState } from '../../../src/control/cli-verbs.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { generateSelfSigned } from '../../../src/tls/self-signed.ts';
import { FakeBans, FakeSession, fakeTarget, silentLog } from './fake-gateway.ts';

/** `name{b="2",a="1"}` as `name{a="1",b="2"}`: the order of labels in a sample means nothing. */
export function sortedLabels(key: string): string {
  const m = /^([^{]+)\{(.*)\}$/.exec(key);
  if (!m) return key;
  const pairs = m[2]!.match(/[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"/g) ?? [];
  return `${m[1]}{${pairs.sort().join(',')}}`;
}

/** Parses an exposition into `name{labels}` (labels sorted) → value, checking every line's syntax and HELP/TYPE pairs. */
export function parseExposition(text: string): Map<string, number> {
  const out = new Map<string, number>();
  const typed = new Set<string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line);
    if (meta) {
      if (meta[1] === 'TYPE') {
        assert.ok(!typed.has(meta[2]!), `TYPE given twice for ${meta[2]}`);
        assert.match(meta[3]!, /^(counter|gauge|histogram|summary|untyped)$/);
        typed.add(meta[2]!);
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$/.exec(line);
    assert.ok(m, `not a valid sample line: ${line}`);
    const family = m[1]!.replace(/_(bucket|sum|count)$/, '');
    assert.ok(typed.has(m[1]!) || typed.has(family), `sample without TYPE: ${line}`);
    out.set(sortedLabels(`${m[1]}${m[2] ?? ''}`), Number(m[3]));
  }
  return out;
}

test('metrics follow known traffic: sessions by state, accepts, auth results, refusals, bytes, handshakes, latency, certificates', async () => {
  const pem = await generateSelfSigned('metrics.test', 30);
  const certs = new CertStore('TLSv1.2');
  const info = certs.put(pem.cert, pem.key, 'self-signed');
  const bans = new FakeBans();
  bans.ban('203.0.113.9', 60, 'test');
  const t = fakeTarget({ certs, bans });
  const stats = new GatewayStats(t.registry, (l) => t.onReload(l));

  const a = new FakeSession(t.registry).open().login('alice');
  a.record.bytesIn = 100;
  a.record.bytesOut = 2000;
  const b = new FakeSession(t.registry).open().login('bob');
  b.record.bytesIn = 50;
  b.record.bytesOut = 500;
  b.end('client-quit');
  const f = new FakeSession(t.registry).open();
  t.registry.backendConnected(f.record, '127.0.0.1:143', 30);
  t.registry.authFailed(f.record, 'carol');
  new FakeSession(t.registry, { state: 'handshake' }).open().end('tls-handshake-failed');
  new FakeSession(t.registry, { listener: 'pop3s', protocol: 'pop3' }).open();
  t.registry.refused('imaps', '203.0.113.1', 'max_connections');
  t.registry.refused('imaps', '203.0.113.1', 'max_connections');
  t.registry.refused('imaps', '203.0.113.2', 'concurrent-address', 'Too many connections from your address');
  await t.reload();

  const text = await new GatewayMetrics(t, stats, { controlClients: () => 2, controlDropped: () => 1 }).text();
  const m = parseExposition(text);
  const v = (k: string) => {
    assert.ok(m.has(sortedLabels(k)), `missing ${k}\n${text}`);
    return m.get(sortedLabels(k));
  };
  assert.equal(v('mailgate_sessions{listener="imaps",state="relaying"}'), 1);
  assert.equal(v('mailgate_sessions{listener="imaps",state="preauth"}'), 1);
  assert.equal(v('mailgate_sessions{listener="pop3s",state="preauth"}'), 1);
  assert.equal(v('mailgate_sessions_accepted_total{listener="imaps"}'), 4);
  assert.equal(v('mailgate_auth_total{listener="imaps",result="ok"}'), 2);
  assert.equal(v('mailgate_auth_total{listener="imaps",result="fail"}'), 1);
  assert.equal(v('mailgate_refused_total{listener="imaps",reason="max_connections"}'), 2);
  assert.equal(v('mailgate_refused_total{listener="imaps",reason="concurrent-address"}'), 1, 'a policy refusal is labelled by its code');
  assert.doesNotMatch(text, /Too many connections/, 'never by the text the client saw');
  assert.equal(v('mailgate_sessions_closed_total{listener="imaps",reason="client-quit"}'), 1);
  assert.equal(v('mailgate_tls_handshake_errors_total{listener="imaps",kind="failed"}'), 1);
  assert.equal(v('mailgate_bytes_total{listener="imaps",direction="in"}'), 150, 'closed and live sessions');
  assert.equal(v('mailgate_bytes_total{listener="imaps",direction="out"}'), 2500);
  assert.equal(v('mailgate_backend_connect_seconds_count{listener="imaps"}'), 3);
  assert.equal(v('mailgate_backend_connect_seconds_bucket{listener="imaps",le="0.0025"}'), 2, 'the two 1.5 ms connects');
  assert.equal(v('mailgate_backend_connect_seconds_bucket{listener="imaps",le="0.05"}'), 3);
  assert.equal(v('mailgate_backend_connect_seconds_bucket{listener="imaps",le="+Inf"}'), 3);
  assert.ok(Math.abs(v('mailgate_backend_connect_seconds_sum{listener="imaps"}')! - 0.033) < 1e-9);
  assert.equal(v('mailgate_backend_up{listener="imaps"}'), 1);
  assert.equal(v('mailgate_certificate_expiry_timestamp_seconds{name="metrics.test",names="metrics.test",source="self-signed"}'), Math.floor(info.notAfter.getTime() / 1000));
  assert.equal(v('mailgate_bans'), 1);
  assert.equal(v('mailgate_reloads_total{result="ok"}'), 1);
  assert.equal(v('mailgate_reloads_total{result="failed"}'), 0);
  assert.equal(v('mailgate_control_clients'), 2);
  assert.equal(v('mailgate_listener_up{listener="pop3s"}'), 1);
  stats.close();
});

test('a backend without AUTH behind passthrough is misconfigured, not down: health, status line, metrics; an outage is down', async () => {
  const t = fakeTarget();
  const stats = new GatewayStats(t.registry);
  const s = new FakeSession(t.registry, { listener: 'imaps' }).open();
  t.registry.backendConnected(s.record, '127.0.0.1:25', 2);
  s.end('backend-no-auth');
  const h = stats.for('imaps').backendHealth!;
  assert.deepEqual([h.ok, h.state, h.error, h.latencyMs], [false, 'misconfigured', 'backend-no-auth', 2]);
  assert.equal(backendState(h), 'MISCONFIGURED (backend offers no AUTH; use authentication: local, or enable AUTH on the backend)');
  const down = new FakeSession(t.registry, { listener: 'pop3s', protocol: 'pop3' }).open();
  down.end('backend-unavailable');
  assert.equal(backendState(stats.for('pop3s').backendHealth!), 'DOWN (backend-unavailable)');
  const m = parseExposition(await new GatewayMetrics(t, stats, { controlClients: () => 0, controlDropped: () => 0 }).text());
  assert.equal(m.get('mailgate_backend_up{listener="imaps"}'), 1, 'the backend answers');
  assert.equal(m.get('mailgate_backend_misconfigured{listener="imaps"}'), 1);
  assert.equal(m.get('mailgate_backend_up{listener="pop3s"}'), 0);
  assert.equal(m.get('mailgate_backend_misconfigured{listener="pop3s"}'), 0);
});

test('label values are escaped', async () => {
  const t = fakeTarget();
  const stats = new GatewayStats(t.registry);
  t.registry.refused('imaps', '203.0.113.1', 'a"b\\c\nd');
  const text = await new GatewayMetrics(t, stats, { controlClients: () => 0, controlDropped: () => 0 }).text();
  assert.match(text, /^mailgate_refused_total\{listener="imaps",reason="a\\"b\\\\c\\nd"\} 1$/m);
  stats.close();
});

test('the endpoint serves /metrics with the exposition content type, 404 elsewhere, 405 for POST', async () => {
  const srv = await MetricsServer.start({ host: '127.0.0.1', port: 0 }, () => '# HELP x y\n# TYPE x gauge\nx 1\n', silentLog);
  const port = Number(srv.address.split(':').at(-1));
  const get = (path: string, method = 'GET') =>
    new Promise<{ status: number; type: string | undefined; body: string }>((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, path, method }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body }));
      });
      req.on('error', reject);
      req.end();
    });
  const ok = await get('/metrics');
  assert.equal(ok.status, 200);
  assert.equal(ok.type, 'text/plain; version=0.0.4; charset=utf-8');
  assert.equal(ok.body, '# HELP x y\n# TYPE x gauge\nx 1\n');
  assert.equal((await get('/other')).status, 404);
  assert.equal((await get('/metrics', 'POST')).status, 405);
  await srv.close();
  await srv.close();
});
