/**
 * Inbound PROXY protocol on a live mail listener (the real driver, in
 * process, in front of a fake IMAP backend): the client named by a trusted
 * balancer's header is the session's client, for the registry and for the
 * IMAP ID the backend gets, also when the header and the TLS ClientHello
 * or the first command arrive in one segment; an address outside
 * accept_proxy_from, a missing header and a header that never comes are
 * refused with a refusal event, a log line and a close.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { after, before, test } from 'node:test';
import { CapabilityCache } from '../../../src/backend/capabilities.ts';
import type { Listener } from '../../../src/config/load.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS } from '../../../src/config/schema.ts';
import { createLogger } from '../../../src/core/log.ts';
import { startMailListener } from '../../../src/listeners/mail-listener.ts';
import type { ListenerHandle } from '../../../src/listeners/types.ts';
import { parseCidr, type Cidr } from '../../../src/net/cidr.ts';
import { proxyHeader } from '../../../src/net/proxy-protocol.ts';
import { PassthroughPolicy } from '../../../src/policy/engine.ts';
import { imapProtocol } from '../../../src/protocols/imap.ts';
import { SessionRegistry } from '../../../src/session/registry.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { startFakeImap, type FakeBackend } from '../../helpers/fake-backends.ts';
import { waitFor } from '../../helpers/wait.ts';

const logs: string[] = [];
const log = createLogger('debug', { write: (l: string) => void logs.push(l) });
const registry = new SessionRegistry();
const certs = new CertStore('TLSv1.2');
const refused: { clientIp: string; code: string }[] = [];
const opened: string[] = [];
registry.on('refused', (e) => refused.push({ clientIp: e.clientIp, code: e.code }));
registry.on('opened', (r) => opened.push(`${r.listener}:${r.clientIp}`));
const handles: ListenerHandle[] = [];
const port: Record<string, number> = {};
let backend: FakeBackend;
let dir = '';

function cidrs(...list: string[]): Cidr[] {
  return list.map((t) => parseCidr(t) as Cidr);
}

function imapListener(name: string, tls: 'implicit' | 'none', from: Cidr[]): Listener {
  return {
    name,
    protocol: 'imap',
    listen: [{ host: '127.0.0.1', port: 0 }],
    backend: { host: '127.0.0.1', port: backend.port },
    proxy_protocol: false,
    accept_proxy_from: from,
    tls,
    timeouts: { ...DEFAULT_TIMEOUTS, proxy_header: 300, backend_connect: 2000, login_replay: 2000 },
    limits: { ...DEFAULT_LIMITS },
    imap_id: true,
    require_tls: false,
  } as unknown as Listener;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mailgate-proxied-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k.pem'), '-out', join(dir, 'c.pem'), '-days', '2', '-subj', '/CN=gw.test'], { stdio: 'ignore' });
  certs.loadFiles(join(dir, 'c.pem'), join(dir, 'k.pem'), true);
  backend = await startFakeImap();
  const deps = { hostname: 'gw.test', certs, registry, policy: () => new PassthroughPolicy(), log, minVersion: 'TLSv1.2' as const, capabilities: new CapabilityCache('gw.test', log) };
  for (const [name, tls, from] of [
    ['plain', 'none', cidrs('127.0.0.1/32')],
    ['tls', 'implicit', cidrs('127.0.0.0/8')],
    ['elsewhere', 'none', cidrs('10.0.0.0/8', '2001:db8::/32')],
  ] as const) {
    const h = await startMailListener(imapListener(name, tls, [...from]), imapProtocol, deps);
    handles.push(h);
    port[name] = Number(/:(\d+)$/.exec(h.addresses[0] ?? '')?.[1]);
  }
});

after(async () => {
  for (const h of handles) await h.close();
  registry.killAll('shutdown');
  await backend.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function readAll(socket: Socket, until: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => reject(new Error(`no ${until} in ${JSON.stringify(text)}`)), 5000);
    socket.on('data', (d: Buffer) => {
      text += d.toString('latin1');
      if (until.test(text)) {
        clearTimeout(timer);
        resolve(text);
      }
    });
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(text);
    });
    socket.on('error', () => undefined);
  });
}

const client = { clientIp: '203.0.113.77', clientPort: 40001, localIp: '198.51.100.1', localPort: 993 };

test('plain IMAP: header, greeting wait and LOGIN in one segment; the header\'s client is the session\'s and reaches the backend\'s ID', async () => {
  const s = connect(port.plain!, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  s.write(Buffer.concat([proxyHeader('v2', client), Buffer.from('a1 LOGIN alice secret\r\na2 LOGOUT\r\n')]));
  const text = await readAll(s, /a2 OK/);
  assert.match(text, /^\* OK .*\r\na1 OK /s);
  assert.ok(opened.includes('plain:203.0.113.77'));
  const conn = backend.connections.find((c) => c.text().includes('x-originating-ip'));
  assert.match(conn?.text() ?? '', /"x-originating-ip" "203\.0\.113\.77" "x-originating-port" "40001"/);
  s.destroy();
});

test('implicit TLS: a v1 header and the ClientHello in one segment; the handshake and login work, as the header\'s client', async () => {
  const raw = connect(port.tls!, '127.0.0.1');
  await new Promise((r) => raw.once('connect', r));
  // Cork: the header and the first TLS record leave in one write.
  raw.cork();
  raw.write(proxyHeader('v1', { ...client, clientIp: '192.0.2.55' }));
  const s = tlsConnect({ socket: raw, rejectUnauthorized: false, servername: 'gw.test' });
  process.nextTick(() => raw.uncork());
  await new Promise((r, j) => s.once('secureConnect', r).once('error', j));
  s.write('a1 LOGIN alice secret\r\na2 LOGOUT\r\n');
  const text = await readAll(s, /a2 OK/);
  assert.match(text, /a1 OK/);
  assert.ok(opened.includes('tls:192.0.2.55'));
  s.destroy();
});

test('a connection from an address outside accept_proxy_from is refused at once, with a log line and a refusal event', async () => {
  const s = connect(port.elsewhere!, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  s.write(proxyHeader('v2', client));
  const text = await readAll(s, /never/);
  assert.equal(text, '', 'nothing is said to an untrusted peer');
  await waitFor('the refusal', () => refused.find((e) => e.code === 'proxy-untrusted' && e.clientIp === '127.0.0.1'));
  assert.ok(logs.some((l) => l.includes('outside accept_proxy_from refused') && l.includes('"listener":"elsewhere"')));
  assert.ok(!opened.some((o) => o.startsWith('elsewhere:')), 'no session was opened on that listener');
});

test('a trusted peer without a header, or whose header does not come within proxy_header, is closed', async () => {
  const before = registry.size;
  const s = connect(port.plain!, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  s.write('a1 LOGIN alice secret\r\n');
  assert.equal(await readAll(s, /never/), '');
  await waitFor('the refusal', () => refused.find((e) => e.code === 'proxy-header'));
  assert.ok(logs.some((l) => l.includes('does not start with a PROXY protocol header')));
  const started = Date.now();
  const slow = connect(port.plain!, '127.0.0.1');
  await new Promise((r) => slow.once('connect', r));
  slow.write(proxyHeader('v2', client).subarray(0, 10));
  assert.equal(await readAll(slow, /never/), '');
  assert.ok(Date.now() - started >= 250, 'closed at the deadline, not before');
  assert.ok(logs.some((l) => l.includes('no header within 300 ms')));
  assert.equal(registry.size, before, 'no session was registered for either');
});
