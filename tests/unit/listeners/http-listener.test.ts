/**
 * The HTTP listener in-process, in front of a local echo backend, driven by
 * the real curl binary and node's https/tls clients. Everything stays on
 * 127.0.0.1 with port 0 listeners; every test closes what it started.
 */
import { after, before, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { parseCidr, type Cidr } from '../../../src/net/cidr.ts';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect as netConnect, createServer as createNetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import type { Listener } from '../../../src/config/load.ts';
import { DEFAULT_TIMEOUTS } from '../../../src/config/schema.ts';
import { createLogger } from '../../../src/core/log.ts';
import { hostWithoutPort, httpsRedirectLocation, isPlainOriginForm, isWebSocketUpgrade, logPath, stripHopByHop } from '../../../src/http/headers.ts';
import { WellKnownRegistry } from '../../../src/http/well-known.ts';
import { startHttpListener, type HttpListener, type HttpListenerHandle } from '../../../src/listeners/http-listener.ts';
import { PassthroughPolicy, type Policy, type Verdict } from '../../../src/policy/engine.ts';
import type { SessionRecord } from '../../../src/session/record.ts';
import { SessionRegistry } from '../../../src/session/registry.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { httpListener as defaultHttpListener } from '../../helpers/adapters.ts';
import { waitFor } from '../../helpers/wait.ts';

const HOST = 'gw.test';
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
let dir = '';
let certFile = '';
let keyFile = '';

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mailgate-http-'));
  certFile = join(dir, 'cert.pem');
  keyFile = join(dir, 'key.pem');
  const r = await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', `/CN=${HOST}`, '-addext', `subjectAltName=DNS:${HOST}`,
  ]);
  assert.equal(r.code, 0, `openssl failed: ${r.stderr}`);
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

// ---- helpers ---------------------------------------------------------------------

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], stdin?: string): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: 15_000, encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
    child.stdin?.end(stdin ?? '');
  });
}

interface CurlResult {
  code: number;
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** curl with headers dumped first (-D -), parsed into the final response's status, headers and body. */
async function curl(args: string[], stdin?: string): Promise<CurlResult> {
  const r = await run('curl', ['-sS', '-D', '-', '--max-time', '10', ...args], stdin);
  const text = r.stdout;
  // The last header block wins (a 100 Continue may precede it).
  let rest = text;
  let head = '';
  for (;;) {
    const end = rest.indexOf('\r\n\r\n');
    if (end < 0 || !rest.startsWith('HTTP/')) break;
    head = rest.slice(0, end);
    rest = rest.slice(end + 4);
  }
  const lines = head.split('\r\n');
  const status = Number(/^HTTP\/[\d.]+ (\d{3})/.exec(lines[0] ?? '')?.[1] ?? 0);
  const headers: Record<string, string> = {};
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return { code: r.code, status, headers, body: rest };
}

interface Backend {
  port: number;
  requests: { method: string; url: string; headers: IncomingHttpHeaders }[];
}

/** Echoes method, url and headers as JSON; answers a WebSocket handshake and echoes its frames' bytes. */
async function startBackend(t: TestContext): Promise<Backend> {
  const requests: Backend['requests'] = [];
  const upgraded = new Set<Socket>();
  const server = createServer((req, res) => {
    requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    req.resume();
    req.on('end', () => {
      res.setHeader('Content-Type', 'application/json');
      res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers }));
    });
  });
  server.on('upgrade', (req, socket: Socket, head: Buffer) => {
    requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    upgraded.add(socket);
    socket.on('close', () => upgraded.delete(socket));
    socket.on('error', () => socket.destroy());
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key'] ?? ''}${WS_GUID}`).digest('base64');
    socket.write(
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        `Sec-WebSocket-Accept: ${accept}\r\nX-Seen-For: ${String(req.headers['x-forwarded-for'])}\r\n` +
        `X-Seen-Proto: ${String(req.headers['x-forwarded-proto'])}\r\n\r\n`,
    );
    if (head.length > 0) socket.write(head);
    socket.on('data', (chunk: Buffer) => socket.write(chunk));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => closeHttpServer(server, upgraded));
  return { port: portOf(server), requests };
}

function closeHttpServer(server: Server, extra: Set<Socket> = new Set()): Promise<void> {
  for (const s of extra) s.destroy();
  server.closeAllConnections();
  return new Promise((resolve) => server.close(() => resolve()));
}

function portOf(server: { address(): unknown }): number {
  const a = server.address();
  assert.ok(a && typeof a === 'object' && 'port' in a && typeof a.port === 'number');
  return a.port;
}

/** A port nothing listens on: bound once, then released. */
async function deadPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = portOf(s);
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

interface Gateway {
  handle: HttpListenerHandle;
  certs: CertStore;
  port: number;
  registry: SessionRegistry;
  opened: SessionRecord[];
  closed: (SessionRecord & { durationMs: number })[];
  refused: { reason: string; clientIp: string }[];
  logs: string[];
  url(path: string): string;
  resolve: string[];
  /** What the listener's ACME HTTP-01 dependency answers (undefined: no challenge pending). */
  setChallengeResponder(responder: ((token: string) => string | undefined) | undefined): void;
}

function httpListener(backendPort: number, overrides: Partial<HttpListener> = {}): HttpListener {
  return defaultHttpListener({ backend: { host: '127.0.0.1', port: backendPort }, tls: 'implicit', ...overrides });
}

async function startGateway(t: TestContext, listener: HttpListener, policy: Policy = new PassthroughPolicy(), wellKnown?: WellKnownRegistry): Promise<Gateway> {
  const logs: string[] = [];
  const log = createLogger('debug', { write: (line: string) => void logs.push(line) });
  const certs = new CertStore('TLSv1.2');
  certs.loadFiles(certFile, keyFile);
  const registry = new SessionRegistry();
  const opened: SessionRecord[] = [];
  const closed: Gateway['closed'] = [];
  const refused: Gateway['refused'] = [];
  registry.on('opened', (r) => opened.push({ ...r }));
  registry.on('closed', (r) => closed.push({ ...r }));
  registry.on('refused', (r) => refused.push({ reason: r.reason, clientIp: r.clientIp }));
  let challenge: ((token: string) => string | undefined) | undefined;
  const acmeHttp01 = (token: string) => challenge?.(token);
  const handle = await startHttpListener(listener, { hostname: 'gateway.example', certs, registry, policy: () => policy, log, minVersion: 'TLSv1.2', acmeHttp01, ...(wellKnown ? { wellKnown } : {}) });
  t.after(async () => {
    await handle.close();
    registry.killAll('shutdown');
    await waitFor('sessions to end', () => registry.size === 0);
  });
  const port = Number(/:(\d+)$/.exec(handle.addresses[0] ?? '')?.[1]);
  const scheme = listener.tls === 'implicit' ? 'https' : 'http';
  return {
    handle,
    certs,
    port,
    registry,
    opened,
    closed,
    refused,
    logs,
    url: (path) => `${scheme}://${HOST}:${port}${path}`,
    resolve: ['--resolve', `${HOST}:${port}:127.0.0.1`],
    setChallengeResponder: (r) => (challenge = r),
  };
}

function json(body: string): { method: string; url: string; headers: IncomingHttpHeaders } {
  return JSON.parse(body) as { method: string; url: string; headers: IncomingHttpHeaders };
}

// ---- tests -------------------------------------------------------------------------

test('GET over https reaches the backend with the Host kept and X-Forwarded-* set by the gateway', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const r = await curl([
    '-k', ...gw.resolve,
    '-H', 'X-Forwarded-For: 6.6.6.6',
    '-H', 'X-Real-IP: 6.6.6.6',
    '-H', 'X-Forwarded-Proto: http',
    '-H', 'X-Forwarded-Host: evil.example',
    '-H', 'Forwarded: for=6.6.6.6',
    '-H', 'X-Forwarded-Ssl: on',
    gw.url('/hello?x=1'),
  ]);
  assert.equal(r.code, 0);
  assert.equal(r.status, 200);
  const seen = json(r.body);
  assert.equal(seen.method, 'GET');
  assert.equal(seen.url, '/hello?x=1');
  assert.equal(seen.headers.host, `${HOST}:${gw.port}`, 'Host is the one the client sent');
  assert.equal(seen.headers['x-forwarded-for'], '127.0.0.1', 'a forged X-Forwarded-For is replaced by the real client');
  assert.equal(seen.headers['x-real-ip'], '127.0.0.1');
  assert.equal(seen.headers['x-forwarded-proto'], 'https');
  assert.equal(seen.headers['x-forwarded-host'], `${HOST}:${gw.port}`);
  assert.equal(seen.headers['x-forwarded-port'], String(gw.port));
  assert.equal(seen.headers.forwarded, undefined, 'a forged Forwarded header does not reach the backend');
  assert.equal(seen.headers['x-forwarded-ssl'], undefined);
  assert.equal(r.headers['strict-transport-security'], undefined, 'no HSTS unless configured');
});

test('with trust_forwarded listing the client, it is appended to the X-Forwarded-For chain; a client outside the list cannot set it', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { trust_forwarded: [parseCidr('127.0.0.0/8') as Cidr] }));
  const r = await curl(['-k', ...gw.resolve, '-H', 'X-Forwarded-For: 10.0.0.1', '-H', 'X-Forwarded-Proto: https', gw.url('/')]);
  assert.equal(r.status, 200);
  const seen = json(r.body);
  assert.equal(seen.headers['x-forwarded-for'], '10.0.0.1, 127.0.0.1');
  assert.equal(seen.headers['x-real-ip'], '127.0.0.1');
  const other = await startGateway(t, httpListener(backend.port, { trust_forwarded: [parseCidr('192.0.2.10/32') as Cidr] }));
  const r2 = await curl(['-k', ...other.resolve, '-H', 'X-Forwarded-For: 10.0.0.1', '-H', 'X-Real-IP: 10.0.0.1', other.url('/')]);
  assert.equal(json(r2.body).headers['x-forwarded-for'], '127.0.0.1');
  assert.equal(json(r2.body).headers['x-real-ip'], '127.0.0.1');
});

test('HSTS is added to responses when configured', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { hsts: 31_536_000 }));
  const r = await curl(['-k', ...gw.resolve, gw.url('/')]);
  assert.equal(r.status, 200);
  assert.equal(r.headers['strict-transport-security'], 'max-age=31536000');
});

test('a client without SNI (IP address in the URL) gets the default certificate', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const r = await curl(['-k', `https://127.0.0.1:${gw.port}/ip`]);
  assert.equal(r.code, 0);
  assert.equal(r.status, 200);
  assert.equal(json(r.body).url, '/ip');
});

test('backend down answers 502 with a short text body, logged at warn, and the gateway keeps serving', async (t) => {
  const gw = await startGateway(t, httpListener(await deadPort()));
  const r = await curl(['-k', ...gw.resolve, gw.url('/down')]);
  assert.equal(r.status, 502);
  assert.match(r.body, /Bad Gateway/);
  const warn = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'backend unavailable');
  assert.ok(warn, 'a warn line names the failure');
  assert.equal(warn.level, 'warn');
  assert.equal(warn.code, 'ECONNREFUSED');
  const again = await curl(['-k', ...gw.resolve, gw.url('/down'), gw.url('/down')]);
  assert.equal(again.status, 502, 'still answering after failures');
});

test('a backend that accepts but never answers gets 504 after postauth_idle', async (t) => {
  const silent: Socket[] = [];
  const server = createServer();
  server.on('connection', (s) => silent.push(s));
  server.on('request', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of silent) s.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const gw = await startGateway(t, httpListener(portOf(server), { timeouts: { ...DEFAULT_TIMEOUTS, postauth_idle: 300 } }));
  const started = Date.now();
  const r = await curl(['-k', ...gw.resolve, gw.url('/slow')]);
  assert.equal(r.status, 504);
  assert.match(r.body, /Gateway Timeout/);
  assert.ok(Date.now() - started < 5_000);
});

test('response_timeout: a backend that accepts and never answers gets 504 after it, though postauth_idle is long', async (t) => {
  const silent: Socket[] = [];
  const server = createServer();
  server.on('connection', (s) => silent.push(s));
  server.on('request', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of silent) s.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const gw = await startGateway(t, httpListener(portOf(server), { response_timeout: 300, timeouts: { ...DEFAULT_TIMEOUTS, postauth_idle: 1_800_000 } }));
  for (const proto of ['--http1.1', '--http2']) {
    const r = await curl(['-k', proto, ...gw.resolve, gw.url('/slow')]);
    assert.equal(r.status, 504, proto);
    assert.match(r.body, /Gateway Timeout/);
  }
  const warn = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.msg === 'backend timed out');
  assert.equal(warn.length, 2, 'logged once per request, at warn');
});

test('HTTP/2: a client that stops reading a large response is cut after postauth_idle of silence, with its backend connection', async (t) => {
  const big = Buffer.alloc(8 * 1024 * 1024, 0x61);
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'Content-Length': big.length });
    res.end(big);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => closeHttpServer(server));
  const gw = await startGateway(t, httpListener(portOf(server), { timeouts: { ...DEFAULT_TIMEOUTS, preauth_idle: 200, postauth_idle: 1_000 } }));
  const { connect } = await import('node:http2');
  const session = connect(`https://127.0.0.1:${gw.port}`, { rejectUnauthorized: false, servername: HOST });
  session.on('error', () => undefined);
  t.after(() => void session.destroy());
  const req = session.request({ ':path': '/big', ':authority': HOST });
  req.on('error', () => undefined);
  // Read the head, then nothing: flow control stalls the stream and, behind it, the backend.
  await new Promise<void>((resolve) => req.once('response', () => resolve()));
  req.pause();
  await waitFor('the stalled session to be closed', () => gw.closed.length === 1, { timeoutMs: 5_000 });
  assert.equal(gw.closed[0]?.closeReason, 'idle-timeout');
});

test('pipelined requests the gateway answers itself (redirects) stop being read while the client reads no answers', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none', redirect_https: true }));
  const s = netConnect(gw.port, '127.0.0.1');
  s.on('error', () => undefined);
  t.after(() => void s.destroy());
  await new Promise<void>((resolve) => s.once('connect', () => resolve()));
  s.pause();
  const n = 20_000;
  s.write(`GET /a-rather-long-path/to/make/each/answer/longer?x=1 HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`.repeat(n));
  await waitFor('the session', () => gw.registry.size === 1);
  await new Promise((r) => setTimeout(r, 500));
  const conn = gw.registry.get(gw.registry.list()[0]!.id) as unknown as { client: Socket };
  assert.ok(conn.client.writableLength < 256 * 1024, `the gateway queued ${conn.client.writableLength} bytes for a client that reads nothing`);
  // Reading resumes it: every answer arrives, in order.
  let got = '';
  s.on('data', (d: Buffer) => (got += d.toString('latin1')));
  s.resume();
  await waitFor('every answer', () => (got.match(/HTTP\/1\.1 301 /g) ?? []).length === n, { timeoutMs: 20_000 });
  assert.equal(backend.requests.length, 0);
});

test('pipelined requests: the gateway\'s own 429s come in order between the backend\'s answers, and the refused requests never reach it', async (t) => {
  const backend = await startBackend(t);
  let n = 0;
  const policy: Policy = {
    onConnect: () => ({ action: 'allow' }),
    onAuth: async () => ({ action: 'deny', code: 'access-denied', text: 'unused' }),
    onAuthResult: () => undefined,
    onDisconnect: () => undefined,
    // Every third request is over the limit.
    onHttpRequest: () => (++n % 3 === 0 ? { action: 'tempfail', code: 'request-rate', text: 'window', retryAfterMs: 5_000 } : { action: 'allow' }),
  };
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none' }), policy);
  const heads = Array.from({ length: 12 }, (_, i) => `GET /r${i} HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`);
  const statuses = await rawRequests(gw.port, heads);
  assert.deepEqual(statuses, heads.map((_, i) => ((i + 1) % 3 === 0 ? 'HTTP/1.1 429' : 'HTTP/1.1 200')));
  assert.deepEqual(backend.requests.map((r) => r.url), heads.map((_, i) => `/r${i}`).filter((_, i) => (i + 1) % 3 !== 0));
});

test('a WebSocket upgrade round-trips through the gateway with the forwarded headers', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const key = Buffer.from('0123456789abcdef').toString('base64');
  const { headers, socket } = await new Promise<{ headers: IncomingHttpHeaders; socket: Socket }>((resolve, reject) => {
    const req = httpsRequest({
      host: '127.0.0.1',
      port: gw.port,
      servername: HOST,
      path: '/ws',
      rejectUnauthorized: false,
      headers: {
        Host: `${HOST}:${gw.port}`,
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': key,
        'X-Forwarded-For': '6.6.6.6',
      },
    });
    req.on('upgrade', (res, s: Socket) => resolve({ headers: res.headers, socket: s }));
    req.on('response', (res) => reject(new Error(`no upgrade: ${res.statusCode}`)));
    req.on('error', reject);
    req.end();
  });
  t.after(() => void socket.destroy());
  assert.equal(headers['sec-websocket-accept'], createHash('sha1').update(`${key}${WS_GUID}`).digest('base64'));
  assert.equal(headers['x-seen-for'], '127.0.0.1');
  assert.equal(headers['x-seen-proto'], 'https');
  const echoed = await new Promise<string>((resolve) => {
    socket.once('data', (d: Buffer) => resolve(d.toString()));
    socket.write('ping over the gateway');
  });
  assert.equal(echoed, 'ping over the gateway');
  socket.end();
  await waitFor('the WebSocket session to end', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'client-closed');
  assert.ok((gw.closed[0]?.bytesIn ?? 0) > 0);
});

test('a client offering only the imap ALPN id is refused at the handshake (ALPACA)', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const err = await new Promise<NodeJS.ErrnoException>((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port: gw.port, servername: HOST, ALPNProtocols: ['imap'], rejectUnauthorized: false });
    s.on('secureConnect', () => {
      s.destroy();
      reject(new Error('handshake succeeded'));
    });
    s.on('error', resolve);
  });
  assert.equal(err.code, 'ERR_SSL_TLSV1_ALERT_NO_APPLICATION_PROTOCOL');
  await waitFor('the refused session to close', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'tls-handshake-failed');
  assert.equal(gw.closed[0]?.tlsVersion, null);
  assert.equal(backend.requests.length, 0);
  // The same port speaks to an HTTP client offering http/1.1.
  const ok = await curl(['-k', ...gw.resolve, gw.url('/')]);
  assert.equal(ok.status, 200);
});

test('TLS 1.1 is refused by the server', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  // SECLEVEL=0 lets the client library offer TLS 1.1 at all, so the refusal is the server's.
  const err = await new Promise<NodeJS.ErrnoException>((resolve, reject) => {
    const s = tlsConnect({
      host: '127.0.0.1', port: gw.port, servername: HOST, rejectUnauthorized: false,
      minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0',
    });
    s.on('secureConnect', () => {
      s.destroy();
      reject(new Error('TLS 1.1 handshake succeeded'));
    });
    s.on('error', resolve);
  });
  assert.match(String(err.code), /PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|NO_PROTOCOLS/);
  await waitFor('the refused session to close', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'tls-handshake-failed');
  const c = await curl(['-k', ...gw.resolve, '--tls-max', '1.1', '--ciphers', 'DEFAULT@SECLEVEL=0', gw.url('/')]);
  assert.notEqual(c.code, 0, 'curl --tls-max 1.1 fails');
  assert.equal(backend.requests.length, 0);
});

test('redirect_https answers with a redirect to https and never reaches the backend; ACME challenges come first', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none', redirect_https: true }));
  const get = await curl([...gw.resolve, gw.url('/a/b?c=1')]);
  assert.equal(get.status, 301);
  assert.equal(get.headers.location, `https://${HOST}/a/b?c=1`);
  const post = await curl([...gw.resolve, '-X', 'POST', '-d', 'x=1', gw.url('/form')]);
  assert.equal(post.status, 308, 'a redirect that keeps the method');
  assert.equal(post.headers.location, `https://${HOST}/form`);
  const forged = await curl([...gw.resolve, '-H', 'Host: bad_host!<x>', gw.url('/p')]);
  assert.equal(forged.status, 301);
  assert.equal(forged.headers.location, 'https://gateway.example/p', 'an implausible Host falls back to the gateway name');

  gw.setChallengeResponder((token) => (token === 'tok-123' ? 'tok-123.thumbprint' : undefined));
  const challenge = await curl([...gw.resolve, gw.url('/.well-known/acme-challenge/tok-123')]);
  assert.equal(challenge.status, 200);
  assert.equal(challenge.body, 'tok-123.thumbprint');
  const unknown = await curl([...gw.resolve, gw.url('/.well-known/acme-challenge/other')]);
  assert.equal(unknown.status, 404);
  gw.setChallengeResponder(undefined);
  const off = await curl([...gw.resolve, gw.url('/.well-known/acme-challenge/tok-123')]);
  assert.equal(off.status, 404);
  assert.equal(backend.requests.length, 0);
});

test('the registry sees each connection open and close with its TLS details and byte counts', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  // Two requests on one kept-alive connection: one session.
  const r = await curl(['-k', ...gw.resolve, gw.url('/one'), gw.url('/two')]);
  assert.equal(r.code, 0);
  await waitFor('the session to close', () => gw.closed.length === 1);
  assert.equal(gw.opened.length, 1);
  const opened = gw.opened[0];
  const closed = gw.closed[0];
  assert.ok(opened && closed);
  assert.equal(opened.protocol, 'http');
  assert.equal(opened.listener, 'web');
  assert.equal(opened.clientIp, '127.0.0.1');
  assert.equal(opened.state, 'handshake');
  assert.equal(closed.id, opened.id);
  assert.equal(closed.state, 'closed');
  assert.equal(closed.closeReason, 'client-closed');
  assert.equal(closed.backend, `127.0.0.1:${backend.port}`);
  assert.match(closed.tlsVersion ?? '', /^TLSv1\.[23]$/);
  assert.ok(closed.tlsCipher);
  assert.ok(closed.bytesIn > 200, `bytesIn ${closed.bytesIn}`);
  assert.ok(closed.bytesOut > 200, `bytesOut ${closed.bytesOut}`);
  assert.equal(gw.registry.size, 0);
  const end = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'session end');
  assert.ok(end);
  assert.equal(end.level, 'info');
  assert.equal(end.conn, opened.id);
  assert.equal(end.listener, 'web');
  assert.equal(end.client, '127.0.0.1');
  assert.equal(end.requests, 2);
  assert.equal(end.reason, 'client-closed');
  for (const field of ['backend', 'tls', 'cipher', 'bytesIn', 'bytesOut', 'durationMs']) assert.ok(field in end, `session end has ${field}`);
});

test('Authorization, Cookie and query strings never reach the logs', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const r = await curl([
    '-k', ...gw.resolve,
    '-H', 'Authorization: Bearer sekrit-token-123',
    '-H', 'Cookie: sid=cookie-secret-456',
    '-u', 'alice:hunter2-password',
    gw.url('/private/page?api_key=query-secret-789'),
  ]);
  assert.equal(r.status, 200);
  assert.ok(json(r.body).headers.authorization, 'the backend still gets the credentials');
  await waitFor('the session to close', () => gw.closed.length === 1);
  const all = gw.logs.join('\n');
  for (const secret of ['sekrit-token-123', 'cookie-secret-456', 'hunter2-password', 'YWxpY2U6aHVudGVyMi1wYXNzd29yZA', 'query-secret-789']) {
    assert.ok(!all.includes(secret), `${secret} leaked into the logs`);
  }
  const access = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'request');
  assert.ok(access, 'an access line at debug');
  assert.equal(access.level, 'debug');
  assert.equal(access.path, '/private/page');
  assert.equal(access.method, 'GET');
  assert.equal(access.status, 200);
  assert.equal(typeof access.durationMs, 'number');
});

test('policy deny answers 403, tempfail 429 with Retry-After, and both are reported as refused', async (t) => {
  const backend = await startBackend(t);
  let verdict: Verdict = { action: 'deny', code: 'access-denied', text: 'blocked network' };
  let disconnects = 0;
  const policy: Policy = {
    onConnect: () => verdict,
    onAuth: async () => ({ action: 'deny', code: 'access-denied', text: 'unused' }),
    onAuthResult: () => undefined,
    onDisconnect: () => void disconnects++,
  };
  const gw = await startGateway(t, httpListener(backend.port), policy);
  const denied = await curl(['-k', ...gw.resolve, gw.url('/')]);
  assert.equal(denied.status, 403);
  verdict = { action: 'tempfail', code: 'request-rate', text: 'rate', retryAfterMs: 30_000 };
  const limited = await curl(['-k', ...gw.resolve, gw.url('/')]);
  assert.equal(limited.status, 429);
  assert.equal(limited.headers['retry-after'], '30');
  await waitFor('both sessions to close', () => gw.closed.length === 2);
  assert.deepEqual(gw.closed.map((c) => c.closeReason).sort(), ['policy-denied', 'policy-tempfail']);
  assert.deepEqual(gw.refused.map((r) => r.reason), ['blocked network', 'rate']);
  assert.equal(disconnects, 0, 'onDisconnect only for connections that were allowed');
  assert.equal(backend.requests.length, 0);
  verdict = { action: 'allow' };
  const ok = await curl(['-k', ...gw.resolve, gw.url('/')]);
  assert.equal(ok.status, 200);
  await waitFor('the allowed session to close', () => gw.closed.length === 3);
  assert.equal(disconnects, 1);
});

test('drain ends an idle kept-alive connection, kill ends a busy one, each with its reason', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none' }));
  const open = () =>
    new Promise<Socket>((resolve) => {
      const s = netConnect(gw.port, '127.0.0.1', () => resolve(s));
      s.on('error', () => undefined);
    });
  const get = (s: Socket) =>
    new Promise<string>((resolve) => {
      let text = '';
      const onData = (d: Buffer) => {
        text += d.toString();
        if (text.includes('}')) {
          s.off('data', onData);
          resolve(text);
        }
      };
      s.on('data', onData);
      s.write(`GET / HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`);
    });
  const a = await open();
  const b = await open();
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  assert.match(await get(a), /^HTTP\/1\.1 200/);
  assert.match(await get(b), /^HTTP\/1\.1 200/);
  await waitFor('both sessions registered', () => gw.registry.size === 2);
  const [first, second] = gw.registry.list();
  assert.ok(first && second);
  gw.registry.get(first.id)?.drain();
  gw.registry.kill(second.id, 'killed');
  await waitFor('both sessions to close', () => gw.closed.length === 2);
  const reasons = new Map(gw.closed.map((c) => [c.id, c.closeReason]));
  assert.equal(reasons.get(first.id), 'shutdown');
  assert.equal(reasons.get(second.id), 'killed');
});

test('a connection that sends nothing is closed after preauth_idle', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none', timeouts: { ...DEFAULT_TIMEOUTS, preauth_idle: 200 } }));
  const s = netConnect(gw.port, '127.0.0.1');
  s.on('error', () => undefined);
  t.after(() => void s.destroy());
  const started = Date.now();
  await new Promise<void>((resolve) => s.on('close', () => resolve()));
  assert.ok(Date.now() - started < 3_000);
  await waitFor('the session to close', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'idle-timeout');
});

test('update() sends new requests to the new backend; close() is safe twice', async (t) => {
  const one = await startBackend(t);
  const two = await startBackend(t);
  const listener = httpListener(one.port, { tls: 'none' });
  const gw = await startGateway(t, listener);
  assert.equal((await curl([...gw.resolve, gw.url('/a')])).status, 200);
  gw.handle.update({ ...listener, backend: { host: '127.0.0.1', port: two.port } } as Listener);
  assert.equal((await curl([...gw.resolve, gw.url('/b')])).status, 200);
  assert.deepEqual(one.requests.map((r) => r.url), ['/a']);
  assert.deepEqual(two.requests.map((r) => r.url), ['/b']);
  await Promise.all([gw.handle.close(), gw.handle.close()]);
  await gw.handle.close();
  const refused = await curl([...gw.resolve, gw.url('/c')]);
  assert.notEqual(refused.code, 0, 'nothing listens after close()');
});

test('a WebSocket handshake to a backend that is down gets 502 and the socket is closed', async (t) => {
  const gw = await startGateway(t, httpListener(await deadPort()));
  const status = await new Promise<number>((resolve, reject) => {
    const req = httpsRequest({
      host: '127.0.0.1', port: gw.port, servername: HOST, path: '/ws', rejectUnauthorized: false,
      headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==' },
    });
    req.on('upgrade', () => reject(new Error('upgraded to a dead backend')));
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end();
  });
  assert.equal(status, 502);
  await waitFor('the session to close', () => gw.closed.length === 1);
  assert.equal(gw.registry.size, 0);
});

test('a backend that dies mid-body makes the gateway cut the client too', async (t) => {
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'Content-Length': '1000' });
    res.write('only the beginning');
    setTimeout(() => res.destroy(), 50);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => closeHttpServer(server));
  const gw = await startGateway(t, httpListener(portOf(server)));
  const r = await curl(['-k', ...gw.resolve, gw.url('/partial')]);
  assert.equal(r.status, 200);
  assert.notEqual(r.code, 0, 'curl notices the truncated body');
  assert.equal(r.body, 'only the beginning');
  const warn = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'backend response cut short');
  assert.ok(warn);
});

test('request headers beyond 16 KiB are answered 431 and the connection closed', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const r = await curl(['-k', ...gw.resolve, '-H', `X-Big: ${'a'.repeat(20_000)}`, gw.url('/')]);
  assert.equal(r.status, 431);
  await waitFor('the session to close', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'line-too-long');
  assert.equal(backend.requests.length, 0);
});

test('a TLS client that never finishes its handshake is cut after tls_handshake', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { timeouts: { ...DEFAULT_TIMEOUTS, tls_handshake: 200 } }));
  const s = netConnect(gw.port, '127.0.0.1');
  s.on('error', () => undefined);
  t.after(() => void s.destroy());
  await new Promise<void>((resolve) => s.on('close', () => resolve()));
  await waitFor('the session to close', () => gw.closed.length === 1);
  assert.equal(gw.closed[0]?.closeReason, 'tls-handshake-timeout');
});

test('an h2c upgrade request is served as plain HTTP/1.1 without its hop-by-hop headers', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none' }));
  const r = await curl([...gw.resolve, '--http2', '-H', 'Keep-Alive: timeout=5', gw.url('/h2c')]);
  assert.equal(r.status, 200);
  const seen = json(r.body);
  assert.equal(seen.headers.upgrade, undefined);
  assert.equal(seen.headers['http2-settings'], undefined, 'headers named in Connection are hop-by-hop too');
  assert.equal(seen.headers['keep-alive'], undefined);
  assert.equal(seen.headers['x-forwarded-proto'], 'http');
});

test('with proxy_protocol v1 each backend connection starts with the client\'s PROXY line', async (t) => {
  const sockets = new Set<Socket>();
  const server = createNetServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    let text = '';
    s.on('data', (d: Buffer) => {
      text += d.toString('latin1');
      if (!text.includes('\r\n\r\n')) return;
      const first = text.slice(0, text.indexOf('\r\n'));
      s.end(`HTTP/1.1 200 OK\r\nContent-Length: ${first.length}\r\nConnection: close\r\n\r\n${first}`);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const gw = await startGateway(t, httpListener(portOf(server), { tls: 'none', proxy_protocol: 'v1' }));
  const r = await curl([...gw.resolve, gw.url('/')]);
  assert.equal(r.status, 200);
  assert.match(r.body, new RegExp(`^PROXY TCP4 127\\.0\\.0\\.1 127\\.0\\.0\\.1 \\d+ ${gw.port}$`));
});

/** Sends raw requests on one kept-alive connection and returns the status line of each response, in order. */
async function rawRequests(port: number, heads: string[]): Promise<string[]> {
  const s = netConnect(port, '127.0.0.1');
  s.on('error', () => undefined);
  let text = '';
  s.on('data', (d: Buffer) => (text += d.toString('latin1')));
  s.write(heads.join(''));
  // Bodies (JSON) end without a newline, so the next status line follows them on the same line.
  const statusLines = () => text.match(/HTTP\/1\.1 \d{3}/g) ?? [];
  await waitFor('all responses', () => statusLines().length >= heads.length);
  s.destroy();
  return statusLines();
}

test('request targets reach the backend byte for byte as the client sent them; absolute-form is refused with 400', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port, { tls: 'none' }));
  // The fast path passes origin-form targets on unchanged (http-proxy 1.18 collapsed '//' and cut '#' fragments).
  const cases = ['/plain/p.bin?q=1&r=%20x', '/quote"s\'and<angles>{braces}|^`', '/p?q=1#frag', '/a\\b?c=\\d', '//double//slash?x=//y', '/a//b', '/'];
  const heads = cases.map((target) => `GET ${target} HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`);
  const statuses = await rawRequests(gw.port, heads);
  assert.deepEqual(statuses, cases.map(() => 'HTTP/1.1 200'));
  assert.deepEqual(
    backend.requests.map((r) => r.url),
    cases,
  );
  // mailgate is never a forward proxy: an absolute-form target is answered 400 and the connection closed.
  const absolute = await rawRequests(gw.port, [`GET http://other.example/abs?z=1 HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`]);
  assert.deepEqual(absolute, ['HTTP/1.1 400']);
  assert.equal(backend.requests.length, cases.length, 'the backend never saw the absolute-form request');
});

test('a client that leaves before its response is complete frees the backend connection at once', async (t) => {
  // The backend answers /partial with a head and one chunk, /silent not at all; it reports each connection's close.
  const sockets = new Set<Socket>();
  const requested: string[] = [];
  const closedAfter: string[] = [];
  const server = createNetServer((s) => {
    sockets.add(s);
    let text = '';
    let path = '';
    s.on('data', (d: Buffer) => {
      text += d.toString('latin1');
      if (path !== '' || !text.includes('\r\n\r\n')) return;
      path = text.split(' ')[1] ?? '';
      requested.push(path);
      if (path === '/partial') s.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n');
    });
    s.on('error', () => undefined);
    s.on('close', () => {
      sockets.delete(s);
      closedAfter.push(path);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const gw = await startGateway(t, httpListener(portOf(server), { tls: 'none', timeouts: { ...DEFAULT_TIMEOUTS, postauth_idle: 60_000 } }));
  for (const path of ['/silent', '/partial']) {
    const c = netConnect(gw.port, '127.0.0.1');
    c.on('error', () => undefined);
    let got = '';
    c.on('data', (d: Buffer) => (got += d.toString('latin1')));
    c.write(`GET ${path} HTTP/1.1\r\nHost: ${HOST}\r\n\r\n`);
    await waitFor(`the backend to get ${path}`, () => requested.includes(path));
    if (path === '/partial') await waitFor('the head and first chunk at the client', () => got.includes('hello'));
    c.destroy();
    await waitFor(`the backend connection of ${path} to be closed`, () => closedAfter.includes(path), { timeoutMs: 2_000 });
  }
});

test('header helpers: host without port, origin-form targets, log paths, hop-by-hop', () => {
  assert.equal(hostWithoutPort('Example.COM:8443'), 'example.com');
  assert.equal(hostWithoutPort('[::1]:8080'), '[::1]');
  assert.equal(hostWithoutPort('192.0.2.1'), '192.0.2.1');
  assert.equal(hostWithoutPort('bad_host'), undefined);
  assert.equal(hostWithoutPort('a.example:99999999'), undefined);
  assert.equal(hostWithoutPort('[nope]:1'), undefined);
  assert.equal(httpsRedirectLocation('other.example', 'http://foo.example/p?q=1', 'gw'), 'https://other.example/p?q=1');
  assert.equal(httpsRedirectLocation(undefined, '*', 'gw.example'), 'https://gw.example/');
  assert.equal(httpsRedirectLocation('h.example', '/caf\u00e9 x', 'gw'), 'https://h.example/caf%C3%A9%20x');
  assert.equal(logPath('/a/b?token=1#frag'), '/a/b');
  assert.equal(logPath(`/${'x'.repeat(300)}`).length, 259);
  const headers: IncomingHttpHeaders = { connection: 'keep-alive, X-Secret-Hop', 'x-secret-hop': '1', 'keep-alive': 'timeout=5', te: 'trailers', host: 'h' };
  stripHopByHop(headers, false);
  assert.deepEqual(headers, { host: 'h' });
  const ws: IncomingHttpHeaders = { connection: 'Upgrade', upgrade: 'websocket', te: 'trailers' };
  stripHopByHop(ws, true);
  assert.deepEqual(ws, { connection: 'Upgrade', upgrade: 'websocket' });
  assert.equal(isWebSocketUpgrade('GET', { upgrade: 'websocket' }), true);
  assert.equal(isWebSocketUpgrade('POST', { upgrade: 'websocket' }), false);
  assert.equal(isWebSocketUpgrade('GET', { upgrade: 'h2c' }), false);
  assert.equal(isPlainOriginForm('/a/b.bin?x=1&y=%2F'), true);
  for (const odd of ['/p#frag', '/a\\b', '/u@h', '/`@', '//host/p', 'http://h/p', '*', '', undefined, '/caf\u00e9', '/a b']) {
    assert.equal(isPlainOriginForm(odd), false, `${JSON.stringify(odd)} must go through url.parse`);
  }
});

test('a POST with Expect: 100-continue and a large body is proxied whole', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  const r = await curl(['-k', ...gw.resolve, '-H', 'Expect: 100-continue', '--data-binary', `@-`, gw.url('/upload')], 'z'.repeat(2_000_000));
  assert.equal(r.code, 0);
  assert.equal(r.status, 200);
  assert.equal(json(r.body).method, 'POST');
});

test('an ACME TLS-ALPN-01 validation handshake is closed by the gateway without any HTTP', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port));
  gw.certs.setChallenge(HOST, readFileSync(certFile, 'utf8'), readFileSync(keyFile, 'utf8'));
  const alpn = await new Promise<string | false>((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port: gw.port, servername: HOST, ALPNProtocols: ['acme-tls/1'], rejectUnauthorized: false, minVersion: 'TLSv1.3' });
    let negotiated: string | false = false;
    s.on('secureConnect', () => {
      negotiated = s.alpnProtocol ?? false;
    });
    s.on('error', reject);
    s.on('close', () => resolve(negotiated));
    s.resume();
  });
  assert.equal(alpn, 'acme-tls/1');
  await waitFor('the validation session to close', () => gw.closed.length === 1);
  assert.equal(backend.requests.length, 0);
});

// ---- endpoints of the gateway's own (the well-known seam) ----------------------------------

/** An endpoint on one host that reads the body and echoes its SHA-256 and length as bytes (UTF-8 text with a non-ASCII letter). */
function echoEndpoint(host: string): WellKnownRegistry {
  const r = new WellKnownRegistry();
  r.register({
    path: '/intake',
    methods: ['POST'],
    hosts: [host],
    tlsOnly: true,
    handle: () => ({
      read: 4096,
      respond: (body) => ({ status: 200, contentType: 'application/x-test', body: Buffer.from(`ü ${body.length} ${createHash('sha256').update(body).digest('hex')}`, 'utf8') }),
    }),
  });
  r.register({ path: '/Case/Blind.xml', caseInsensitive: true, methods: ['GET'], tlsOnly: true, handle: () => ({ status: 200, body: 'folded\n' }) });
  return r;
}

test('a well-known endpoint that reads the body: HTTP/1.1 with a length, 100-continue and a pipelined request after it; HTTP/2; bounds', async (t) => {
  const backend = await startBackend(t);
  const gw = await startGateway(t, httpListener(backend.port), new PassthroughPolicy(), echoEndpoint(HOST));
  const body = 'x'.repeat(3000);
  const want = `ü ${body.length} ${createHash('sha256').update(body).digest('hex')}`;
  const h1 = await curl(['-k', ...gw.resolve, '--http1.1', '-H', 'Expect: 100-continue', '--data-binary', '@-', gw.url('/intake')], body);
  assert.equal(h1.status, 200);
  assert.equal(h1.headers['content-type'], 'application/x-test');
  assert.equal(h1.body, want, 'the whole body reached the endpoint, the answer is UTF-8 bytes');
  assert.equal(Number(h1.headers['content-length']), Buffer.byteLength(want));
  const h2 = await curl(['-k', ...gw.resolve, '--http2', '--data-binary', '@-', gw.url('/intake')], body);
  assert.equal(h2.status, 200);
  assert.equal(h2.body, want, 'the same over HTTP/2');
  assert.equal((await curl(['-k', ...gw.resolve, gw.url('/case/blind.XML')])).body, 'folded\n', 'a path compared without case');
  assert.equal(backend.requests.length, 0, 'nothing reached the backend');

  // Two requests in one write: the body is read whole, answered, and the next request goes on to the backend.
  const raw = await new Promise<string>((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port: gw.port, servername: HOST, rejectUnauthorized: false }, () => {
      s.write(`POST /intake HTTP/1.1\r\nHost: ${HOST}\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: ${HOST}\r\nConnection: close\r\n\r\n`);
    });
    let out = '';
    s.on('data', (c: Buffer) => (out += c.toString('utf8')));
    s.on('end', () => resolve(out));
    s.on('error', reject);
  });
  assert.match(raw, /^HTTP\/1\.1 200 OK\r\n/);
  assert.ok(raw.includes(`ü 5 ${createHash('sha256').update('hello').digest('hex')}`));
  assert.match(raw, /"url":"\/next"/, 'the pipelined request after the body was proxied');

  const big = await curl(['-k', ...gw.resolve, '--http1.1', '--data-binary', '@-', gw.url('/intake')], 'y'.repeat(5000));
  assert.equal(big.status, 413, 'a body over the bound is refused unread');
  const chunked = await curl(['-k', ...gw.resolve, '--http1.1', '-H', 'Transfer-Encoding: chunked', '--data-binary', '@-', gw.url('/intake')], 'z');
  assert.equal(chunked.status, 411);
  const big2 = await curl(['-k', ...gw.resolve, '--http2', '--data-binary', '@-', gw.url('/intake')], 'y'.repeat(5000));
  assert.equal(big2.status, 413, 'the bound holds over HTTP/2 too');
  const otherHost = await curl(['-k', '--resolve', `other.test:${gw.port}:127.0.0.1`, '--data-binary', 'q', `https://other.test:${gw.port}/intake`]);
  assert.equal(json(otherHost.body).url, '/intake', 'another Host goes to the backend');
});
