/**
 * The HTTPS front door end to end: the real daemon in front of the harness'
 * real nginx, driven by curl, h2load, Node's WebSocket client and raw TLS
 * sockets. A byte-capturing backend (node:http with a tap on each socket)
 * stands beside nginx where bytes are compared; a small WebSocket echo
 * backend answers the WebSocket test.
 *
 * - smuggling corpus: every refusal as raw bytes over TLS; nginx never sees
 *   the request smuggled behind it;
 * - differential fuzz: generated requests through the fast path and straight
 *   to the backend give the same bytes at the backend, modulo the forwarded
 *   headers, and nginx answers both the same;
 * - 100 pipelined requests, byte-exact; a 10 MiB chunked upload, byte-exact;
 * - a client that stops reading: the daemon's memory stays bounded;
 * - HTTP/2 with curl --http2 and h2load (X-Forwarded-* seen by nginx), rapid
 *   reset and CONTINUATION floods;
 * - WebSocket echo with a real client;
 * - no DeprecationWarning on the daemon's output after all of it.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import { constants as h2c } from 'node:http2';
import type { Socket } from 'node:net';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import fc from 'fast-check';
import { run } from './harness/clients.ts';
import { startGateway, type Gateway } from './harness/gateway.ts';
import { makeTempDir, removeTempDir } from '../helpers/proc.ts';
import { NGINX_INDEX_HTML, startNginx, type Nginx } from './harness/servers.ts';

let nginx: Nginx;
let gw: Gateway;
let capture: Capture;
let echo: { port: number; seenFor: string[]; close(): Promise<void> };
let dir = '';

// ---- backends ----------------------------------------------------------------------

interface Capture {
  port: number;
  /** Raw bytes received per backend connection, in order of arrival. */
  connections: Buffer[][];
  /** SHA-256 and length of each request body node:http decoded. */
  bodies: { sha256: string; length: number }[];
  close(): Promise<void>;
}

/** node:http (an independent parser) answers each request with a short fixed body; a tap records every raw byte. */
async function startCapture(): Promise<Capture> {
  const connections: Buffer[][] = [];
  const bodies: Capture['bodies'] = [];
  const server: Server = createServer((req, res) => {
    const hash = createHash('sha256');
    let length = 0;
    req.on('data', (d: Buffer) => {
      hash.update(d);
      length += d.length;
    });
    req.on('end', () => {
      bodies.push({ sha256: hash.digest('hex'), length });
      res.setHeader('Content-Type', 'text/plain');
      res.end(`seen ${req.method} ${req.url}\n`);
    });
  });
  server.on('connection', (s: Socket) => {
    const got: Buffer[] = [];
    connections.push(got);
    s.on('data', (d: Buffer) => got.push(d));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    connections,
    bodies,
    close: () => {
      server.closeAllConnections();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

/** A WebSocket echo backend: the handshake, then every text or binary frame sent back (small frames, as the test sends). */
async function startEcho(): Promise<{ port: number; seenFor: string[]; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const seenFor: string[] = [];
  const server = createServer((_req, res) => res.end('not a websocket\n'));
  server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
    sockets.add(socket);
    seenFor.push(String(req.headers['x-forwarded-for']));
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    const accept = createHash('sha1').update(`${String(req.headers['sec-websocket-key'])}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
    socket.write(
      `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n` +
        `X-Seen-For: ${String(req.headers['x-forwarded-for'])}\r\n\r\n`,
    );
    let buf = head;
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 6) {
        const opcode = buf[0]! & 0x0f;
        const len = buf[1]! & 0x7f;
        if (len > 125) return socket.destroy();
        if (buf.length < 6 + len) return;
        const mask = buf.subarray(2, 6);
        const payload = Buffer.from(buf.subarray(6, 6 + len).map((b, i) => b ^ mask[i % 4]!));
        buf = buf.subarray(6 + len);
        if (opcode === 8) return socket.end(Buffer.concat([Buffer.from([0x88, payload.length]), payload]));
        socket.write(Buffer.concat([Buffer.from([0x80 | opcode, payload.length]), payload]));
      }
    };
    socket.on('data', onData);
    onData(Buffer.alloc(0));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as { port: number }).port,
    seenFor,
    close: () => {
      for (const s of sockets) s.destroy();
      server.closeAllConnections();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

before(async () => {
  dir = await makeTempDir('http-front');
  nginx = await startNginx();
  capture = await startCapture();
  echo = await startEcho();
  gw = await startGateway({
    listeners: [
      { name: 'https', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${nginx.port}`, hsts: 600 },
      { name: 'capture', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${capture.port}` },
      { name: 'ws', protocol: 'http', tls: 'implicit', backend: `127.0.0.1:${echo.port}` },
    ],
  });
});

after(async () => {
  await gw?.stop();
  await nginx?.stop();
  await capture?.close();
  await echo?.close();
  if (dir) await removeTempDir(dir);
});

// ---- clients -------------------------------------------------------------------------

interface RawResult {
  bytes: Buffer;
  /** The gateway closed the connection (rather than the deadline ending the wait). */
  closed: boolean;
}

/** Raw bytes over TLS (ALPN http/1.1); collects what comes back until the peer closes, `until` is satisfied, or 10 s. */
function rawTls(port: number, data: Buffer | string, until?: (got: Buffer) => boolean): Promise<RawResult> {
  return new Promise((resolve) => {
    const s = tlsConnect({ host: '127.0.0.1', port, servername: gw.hostname, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
    const got: Buffer[] = [];
    let done = false;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ bytes: Buffer.concat(got), closed });
    };
    const timer = setTimeout(() => finish(false), 10_000);
    s.on('data', (d: Buffer) => {
      got.push(d);
      if (until?.(Buffer.concat(got))) finish(false);
    });
    s.on('error', () => undefined);
    s.on('close', () => finish(true));
    s.once('secureConnect', () => s.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data));
  });
}

/** Raw bytes over plain TCP, for the direct comparison with the backend. */
async function rawTcp(port: number, data: Buffer, until: (got: Buffer) => boolean): Promise<Buffer> {
  const { connect } = await import('node:net');
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    const got: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      resolve(Buffer.concat(got));
    }, 10_000);
    s.on('data', (d: Buffer) => {
      got.push(d);
      if (until(Buffer.concat(got))) {
        clearTimeout(timer);
        s.destroy();
        resolve(Buffer.concat(got));
      }
    });
    s.on('error', () => undefined);
    s.write(data);
  });
}

/** Complete HTTP/1.1 responses (Content-Length framed, as nginx and node:http answer these requests) in `bytes`. */
function responses(bytes: Buffer, headOnly = false): { status: number; head: string; body: Buffer }[] {
  const out: { status: number; head: string; body: Buffer }[] = [];
  let at = 0;
  for (;;) {
    const end = bytes.indexOf('\r\n\r\n', at, 'latin1');
    if (end < 0) return out;
    const head = bytes.toString('latin1', at, end);
    const length = headOnly ? 0 : Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0);
    if (bytes.length < end + 4 + length) return out;
    out.push({ status: Number(head.slice(9, 12)), head, body: bytes.subarray(end + 4, end + 4 + length) });
    at = end + 4 + length;
  }
}

const FORWARDED_LINE = /^(X-Forwarded-For|X-Real-IP|X-Forwarded-Proto|X-Forwarded-Port|X-Forwarded-Host): [^\r\n]*\r\n/gim;

/** What a backend received, without the lines the gateway adds to every request head. */
function withoutForwarded(bytes: Buffer): string {
  return bytes.toString('latin1').replace(FORWARDED_LINE, '');
}

function curl(args: string[]) {
  return run('curl', ['-sS', '--max-time', '20', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${gw.ports.https}:127.0.0.1`, ...args], { encoding: 'latin1', timeoutMs: 30_000 });
}

async function nginxUris(): Promise<string[]> {
  return (await nginx.requests()).map((r) => r.uri ?? '');
}

// ---- the smuggling corpus -----------------------------------------------------------------

const HOST = 'Host: mail.e2e.test\r\n';
/** Each case: bytes that carry a first request the gateway must refuse, and a second one behind it. */
const CORPUS: [string, (second: string) => string, number][] = [
  ['cl-and-te', (s) => `POST /first?case=cl-and-te HTTP/1.1\r\n${HOST}Content-Length: ${5 + s.length}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${s}`, 400],
  ['te-and-cl', (s) => `POST /first?case=te-and-cl HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n${s}0\r\n\r\n`, 400],
  ['duplicate-cl', (s) => `POST /first?case=duplicate-cl HTTP/1.1\r\n${HOST}Content-Length: 0\r\nContent-Length: 0\r\n\r\n${s}`, 400],
  ['differing-cl', (s) => `POST /first?case=differing-cl HTTP/1.1\r\n${HOST}Content-Length: 0\r\nContent-Length: ${s.length}\r\n\r\n${s}`, 400],
  ['cl-list', (s) => `POST /first?case=cl-list HTTP/1.1\r\n${HOST}Content-Length: 0, ${s.length}\r\n\r\n${s}`, 400],
  ['te-gzip-chunked', (s) => `POST /first?case=te-gzip-chunked HTTP/1.1\r\n${HOST}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n${s}`, 400],
  ['te-xchunked', (s) => `POST /first?case=te-xchunked HTTP/1.1\r\n${HOST}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n${s}`, 400],
  ['te-twice', (s) => `POST /first?case=te-twice HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n${s}`, 400],
  ['te-on-http10', (s) => `POST /first?case=te-on-http10 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${s}`, 400],
  ['obs-fold', (s) => `POST /first?case=obs-fold HTTP/1.1\r\n${HOST}X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n${s}`, 400],
  ['bare-lf', (s) => `GET /first?case=bare-lf HTTP/1.1\n${HOST}\r\n${s}`, 400],
  ['bare-lf-end', (s) => `GET /first?case=bare-lf-end HTTP/1.1\r\n${HOST}X-A: b\n\n${s}`, 400],
  ['bare-cr', (s) => `POST /first?case=bare-cr HTTP/1.1\r\n${HOST}X-A: a\rTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n${s}`, 400],
  ['space-before-colon', (s) => `POST /first?case=space-before-colon HTTP/1.1\r\n${HOST}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n${s}`, 400],
  ['nul', (s) => `GET /first?case=nul HTTP/1.1\r\n${HOST}X-A: a\0b\r\n\r\n${s}`, 400],
  ['oversized-head', (s) => `GET /first?case=oversized-head HTTP/1.1\r\n${HOST}X-Big: ${'a'.repeat(20_000)}\r\n\r\n${s}`, 431],
  ['oversized-chunk-line', (s) => `POST /first?case=oversized-chunk-line HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n5;${'e'.repeat(5000)}\r\nhello\r\n0\r\n\r\n${s}`, 400],
  ['bad-chunk-size', (s) => `POST /first?case=bad-chunk-size HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\nzz\r\n${s}0\r\n\r\n`, 400],
  ['chunk-without-crlf', (s) => `POST /first?case=chunk-without-crlf HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n${s}0\r\n\r\n`, 400],
  ['absolute-form', (s) => `GET http://other.example/first?case=absolute-form HTTP/1.1\r\n${HOST}\r\n${s}`, 400],
  ['connect', (s) => `CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n${s}`, 400],
];

test('smuggling corpus: every ambiguous request is answered 400 (431) and closed, and nginx never sees the request behind it', async () => {
  for (const [name, build, status] of CORPUS) {
    const second = `GET /second?case=${name} HTTP/1.1\r\n${HOST}\r\n`;
    const r = await rawTls(gw.ports.https!, build(second));
    const text = r.bytes.toString('latin1');
    // A body-framing fault comes after the head went to nginx: the answer is the gateway's 400 unless nginx answered first.
    assert.match(text, new RegExp(`^HTTP/1\\.1 ${status} `), `${name}: ${JSON.stringify(text.slice(0, 80))}`);
    assert.equal((text.match(/HTTP\/1\.1 \d{3} /g) ?? []).length, 1, `${name}: exactly one response`);
    assert.ok(r.closed, `${name}: the gateway closed the connection`);
  }
  // nginx logs each request as it ends; the ones cut mid-body end when the gateway drops their connection.
  await new Promise((r) => setTimeout(r, 300));
  const uris = await nginxUris();
  for (const [name] of CORPUS) assert.ok(!uris.includes(`/second?case=${name}`), `${name}: nginx saw the smuggled request`);
  const reached = uris.filter((u) => u.startsWith('/first?case='));
  assert.ok(
    reached.every((u) => /case=(oversized-chunk-line|bad-chunk-size|chunk-without-crlf)$/.test(u)),
    `only requests whose body framing broke after a valid head may reach nginx (cut short): ${reached.join(' ')}`,
  );
  const gwLog = await gw.logs();
  assert.ok(gwLog.some((l) => l.msg === 'session end' && l.reason === 'protocol-error'));
  assert.ok(gwLog.some((l) => l.msg === 'session end' && l.reason === 'line-too-long'));
});

// ---- differential fuzz ---------------------------------------------------------------------

const TOKEN_CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_';
const PATH_CHARS = `${TOKEN_CHARS}/.~%!$&'()*+,;=:@?`;
/** Header names a generated request may carry: none the gateway drops or writes itself. */
const name = fc
  .string({ unit: fc.constantFrom(...TOKEN_CHARS.split('')), minLength: 1, maxLength: 12 })
  .map((n) => `X-${n}`)
  .filter((n) => !/^x-(forwarded|real-ip|original-url|rewrite-url|cluster-client-ip|client-ip|url-scheme)/i.test(n));
const value = fc.string({ unit: fc.constantFrom(...' abcXYZ019-_.;:,/()="*\t'.split('')), maxLength: 30 }).map((v) => v.trim());
const generated = fc
  .record({
    method: fc.constantFrom('GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'),
    path: fc.string({ unit: fc.constantFrom(...PATH_CHARS.split('')), maxLength: 40 }),
    headers: fc.array(fc.tuple(name, value), { maxLength: 6 }),
    body: fc.oneof(fc.constant(null), fc.uint8Array({ minLength: 0, maxLength: 3000 })),
    chunks: fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 5 }),
    chunked: fc.boolean(),
  })
  .map(({ method, path: p, headers, body, chunks, chunked }) => {
    let head = `${method} /${p} HTTP/1.1\r\n${HOST}${headers.map(([n, v]) => `${n}: ${v}\r\n`).join('')}`;
    let rest = Buffer.alloc(0);
    if (body !== null && method !== 'GET' && method !== 'HEAD') {
      const b = Buffer.from(body);
      if (chunked) {
        head += 'Transfer-Encoding: chunked\r\n';
        const parts: Buffer[] = [];
        let at = 0;
        for (let i = 0; at < b.length; i++) {
          const n = Math.min(chunks[i % chunks.length]!, b.length - at);
          parts.push(Buffer.from(`${n.toString(16)}\r\n`), b.subarray(at, at + n), Buffer.from('\r\n'));
          at += n;
        }
        parts.push(Buffer.from('0\r\n\r\n'));
        rest = Buffer.concat(parts);
      } else {
        head += `Content-Length: ${b.length}\r\n`;
        rest = b;
      }
    }
    return Buffer.concat([Buffer.from(`${head}\r\n`, 'latin1'), rest]);
  });

test('differential fuzz: a generated request reaches the backend with the same bytes through the fast path as sent straight, forwarded headers aside', async () => {
  const oneResponse = (got: Buffer) => responses(got).length >= 1;
  const viaHead = (req: Buffer) => (req.toString('latin1').startsWith('HEAD') ? (got: Buffer) => got.includes('\r\n\r\n') : oneResponse);
  await fc.assert(
    fc.asyncProperty(generated, async (req) => {
      const before = capture.connections.length;
      await rawTcp(capture.port, req, viaHead(req));
      const direct = capture.connections[before];
      assert.ok(direct);
      const via = await rawTls(gw.ports.capture!, req, viaHead(req));
      assert.match(via.bytes.toString('latin1'), /^HTTP\/1\.1 200 /);
      const proxied = capture.connections.at(-1);
      assert.ok(proxied && proxied !== direct);
      const sent = Buffer.concat(direct).toString('latin1');
      assert.equal(sent, req.toString('latin1'), 'the capture backend records what it is sent');
      assert.equal(withoutForwarded(Buffer.concat(proxied)), sent);
      const forwarded = Buffer.concat(proxied).toString('latin1');
      assert.match(forwarded, /\r\nX-Forwarded-For: 127\.0\.0\.1\r\n/);
      assert.match(forwarded, /\r\nX-Forwarded-Proto: https\r\n/);
    }),
    { numRuns: Number(process.env.FUZZ_RUNS ?? 60), seed: Number(process.env.FUZZ_SEED ?? Date.now() % 1e9) },
  );
});

test('differential: nginx answers requests through the gateway as it answers them straight (status, length, body)', async () => {
  const paths = ['/', '/index.html', '/big.bin', '/missing', '/echo-headers?x=1', '/%2e%2e/etc/passwd', '/a//b/../index.html'];
  for (const p of paths) {
    for (const method of ['GET', 'HEAD', 'POST']) {
      const req = Buffer.from(`${method} ${p} HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 'latin1');
      const one = (got: Buffer) => responses(got, method === 'HEAD').length >= 1;
      const direct = await rawTcp(nginx.port, req, one);
      const via = await rawTls(gw.ports.https!, req, one);
      const a = responses(direct, method === 'HEAD')[0];
      const b = responses(via.bytes, method === 'HEAD')[0];
      assert.ok(a && b, `${method} ${p}: a response each way`);
      assert.equal(b.status, a.status, `${method} ${p}`);
      // /echo-headers shows the request's headers, which differ by the forwarded ones on purpose.
      if (p === '/echo-headers?x=1') continue;
      assert.deepEqual(b.body, a.body, `${method} ${p}: same body`);
      assert.equal(/content-length: (\d+)/i.exec(b.head)?.[1], /content-length: (\d+)/i.exec(a.head)?.[1]);
    }
  }
});

// ---- pipelining, uploads, a client that stops reading ------------------------------------------

test('100 pipelined requests: answered in order, byte for byte, and the backend gets exactly the 100 heads', async () => {
  const heads = Array.from({ length: 100 }, (_, i) => `GET /index.html?n=${i} HTTP/1.1\r\n${HOST}X-N: ${i}\r\n\r\n`);
  const r = await rawTls(gw.ports.https!, heads.join(''), (got) => responses(got).length >= 100);
  const got = responses(r.bytes);
  assert.equal(got.length, 100);
  for (const res of got) {
    assert.equal(res.status, 200);
    assert.equal(res.body.toString('latin1'), NGINX_INDEX_HTML);
    assert.match(res.head, /\r\nstrict-transport-security: max-age=600/i);
  }
  const uris = (await nginxUris()).filter((u) => u.startsWith('/index.html?n='));
  assert.deepEqual(uris.slice(-100), heads.map((_, i) => `/index.html?n=${i}`), 'nginx saw them all, in order');

  // Byte for byte at a capture backend: the 100 heads, each followed only by the forwarded lines.
  const before = capture.connections.length;
  const c = await rawTls(gw.ports.capture!, heads.join(''), (b) => responses(b).length >= 100);
  const answers = responses(c.bytes);
  assert.deepEqual(answers.map((a) => a.body.toString()), heads.map((_, i) => `seen GET /index.html?n=${i}\n`));
  assert.equal(capture.connections.length, before + 1, 'one pinned backend connection');
  assert.equal(withoutForwarded(Buffer.concat(capture.connections.at(-1)!)), heads.join(''));
});

test('a 10 MiB chunked upload (curl) reaches the backend byte for byte', async () => {
  const file = path.join(dir, 'upload.bin');
  const data = randomBytes(10 * 1024 * 1024);
  await fsp.writeFile(file, data);
  const before = capture.bodies.length;
  const r = await run(
    'curl',
    ['-sS', '--http1.1', '--max-time', '60', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${gw.ports.capture}:127.0.0.1`,
      '-H', 'Transfer-Encoding: chunked', '--data-binary', `@${file}`, `https://${gw.hostname}:${gw.ports.capture}/upload`],
    { timeoutMs: 90_000 },
  );
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, 'seen POST /upload\n');
  const body = capture.bodies[before];
  assert.deepEqual(body, { sha256: createHash('sha256').update(data).digest('hex'), length: data.length });
  const raw = Buffer.concat(capture.connections.at(-1)!).toString('latin1');
  assert.match(raw, /^POST \/upload HTTP\/1\.1\r\n[^]*\r\nTransfer-Encoding: chunked\r\n/);
});

/** Resident memory of the daemon's processes (the primary and its workers), KiB. */
async function daemonRssKiB(): Promise<number> {
  const pids = [gw.proc.pid];
  const children = await run('pgrep', ['-P', String(gw.proc.pid)]);
  pids.push(...children.stdout.split('\n').filter(Boolean).map(Number));
  let total = 0;
  for (const pid of pids) {
    const status = await fsp.readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
    total += Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  }
  return total;
}

test('a client that asks for 64 MiB and stops reading keeps the daemon\'s memory bounded', async () => {
  const rssBefore = await daemonRssKiB();
  const s = tlsConnect({ host: '127.0.0.1', port: gw.ports.https!, servername: gw.hostname, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
  s.on('error', () => undefined);
  await new Promise<void>((r) => s.once('secureConnect', () => r()));
  s.pause();
  s.write(`GET /big.bin HTTP/1.1\r\n${HOST}\r\n`.repeat(64));
  // Let the gateway fill whatever buffers it will fill; sampled, not timed.
  let peak = 0;
  for (let i = 0; i < 15; i++) {
    await new Promise((r) => setTimeout(r, 200));
    peak = Math.max(peak, await daemonRssKiB());
  }
  const grown = peak - rssBefore;
  assert.ok(grown < 24 * 1024, `the daemon grew by ${grown} KiB for a client that reads nothing (64 MiB asked)`);
  // The connection is still there, just stalled; reading resumes it.
  let got = 0;
  s.on('data', (d: Buffer) => (got += d.length));
  s.resume();
  await new Promise<void>((resolve) => {
    const t = setInterval(() => {
      if (got > 4 * 1024 * 1024) {
        clearInterval(t);
        resolve();
      }
    }, 20);
  });
  s.destroy();
});

// ---- HTTP/2 ---------------------------------------------------------------------------------

test('HTTP/2: curl --http2 gets nginx\'s page with HSTS, and nginx sees X-Forwarded-* and the Host', async () => {
  const r = await curl(['--http2', '-i', '-H', 'X-Forwarded-For: 6.6.6.6', `https://${gw.hostname}:${gw.ports.https}/echo-headers?h2=1`]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^HTTP\/2 200/);
  assert.match(r.stdout, /\r\nstrict-transport-security: max-age=600\r\n/);
  assert.match(r.stdout, /^x-forwarded-for: 127\.0\.0\.1$/m);
  assert.match(r.stdout, /^x-forwarded-proto: https$/m);
  assert.match(r.stdout, new RegExp(`^host: ${gw.hostname.replace(/\./g, '\\.')}:${gw.ports.https}$`, 'm'));
  const seen = (await nginx.requests()).find((l) => l.uri === '/echo-headers?h2=1');
  assert.ok(seen);
  assert.equal(seen.xff, '127.0.0.1');
  assert.equal(seen.xfp, 'https');
  assert.equal(seen.protocol, 'HTTP/1.1', 'the backend stays HTTP/1.1');
  const big = await run('curl', ['-sS', '--http2', '--cacert', gw.certFile, '--resolve', `${gw.hostname}:${gw.ports.https}:127.0.0.1`, `https://${gw.hostname}:${gw.ports.https}/big.bin`], { encoding: 'latin1' });
  assert.equal(createHash('sha256').update(Buffer.from(big.stdout, 'latin1')).digest('hex'), nginx.bigSha256);
});

test('HTTP/2: h2load, one connection and 10 streams at once, 300 requests all answered, all seen by nginx with X-Forwarded-*', async () => {
  const before = (await nginx.requests()).filter((l) => l.uri === '/index.html?h2load').length;
  const r = await run('h2load', ['-n', '300', '-c', '1', '-m', '10', `https://127.0.0.1:${gw.ports.https}/index.html?h2load`], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /Application protocol: h2/);
  assert.match(r.stdout, /requests: 300 total, 300 started, 300 done, 300 succeeded, 0 failed/);
  const seen = (await nginx.requests()).filter((l) => l.uri === '/index.html?h2load');
  assert.equal(seen.length - before, 300);
  assert.ok(seen.every((l) => l.xff === '127.0.0.1' && l.xfp === 'https' && l.status === '200'));
});

/** One HTTP/2 frame. */
function frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h[3] = type;
  h[4] = flags;
  h.writeUInt32BE(stream, 5);
  return Buffer.concat([h, payload]);
}

/** An HPACK literal header field without indexing, new name (RFC 7541 §6.2.2), short strings only. */
function literal(n: string, v: string): Buffer {
  return Buffer.concat([Buffer.from([0x00, n.length]), Buffer.from(n), Buffer.from([v.length]), Buffer.from(v)]);
}

/** The frame types in `bytes` (a server's side of an HTTP/2 connection), and the GOAWAY error code if one came. */
function frameTypes(bytes: Buffer): { types: Set<number>; goaway: number | undefined } {
  const types = new Set<number>();
  let goaway: number | undefined;
  let at = 0;
  while (at + 9 <= bytes.length) {
    const len = bytes.readUIntBE(at, 3);
    types.add(bytes[at + 3]!);
    if (bytes[at + 3] === 7 && at + 17 <= bytes.length) goaway = bytes.readUInt32BE(at + 13);
    at += 9 + len;
  }
  return { types, goaway };
}

/** A TLS connection that chose h2, with the client preface and an empty SETTINGS frame sent. */
async function h2Raw(): Promise<{ s: TLSSocket; got: Buffer[]; closed: Promise<void> }> {
  const s: TLSSocket = tlsConnect({ host: '127.0.0.1', port: gw.ports.https!, servername: gw.hostname, rejectUnauthorized: false, ALPNProtocols: ['h2'] });
  s.on('error', () => undefined);
  await new Promise<void>((r) => s.once('secureConnect', () => r()));
  assert.equal(s.alpnProtocol, 'h2');
  const got: Buffer[] = [];
  s.on('data', (d: Buffer) => got.push(d));
  const closed = new Promise<void>((r) => s.once('close', () => r()));
  s.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), frame(4, 0, 0, Buffer.alloc(0))]));
  return { s, got, closed };
}

test('HTTP/2 rapid reset: a client that opens and cancels streams without end gets GOAWAY and is cut off; the gateway keeps serving', async () => {
  const { s, got, closed } = await h2Raw();
  // HEADERS (END_STREAM | END_HEADERS) for GET /index.html?reset, then RST_STREAM (CANCEL) at once, stream after stream.
  const block = Buffer.concat([Buffer.from([0x82, 0x87]), literal(':path', '/index.html?reset'), literal(':authority', 'mail.e2e.test')]);
  const cancel = Buffer.alloc(4);
  cancel.writeUInt32BE(h2c.NGHTTP2_CANCEL);
  let sent = 0;
  // In batches, reading between them, so the GOAWAY is read before the gateway's close (a close with unread input
  // is a TCP reset, which can discard what the client had not read yet).
  for (let i = 0; i < 20_000 && s.writable && !frameTypes(Buffer.concat(got)).types.has(7); i++) {
    const id = 1 + 2 * i;
    s.write(Buffer.concat([frame(1, 0x5, id, block), frame(3, 0, id, cancel)]));
    sent++;
    if (i % 100 === 99) await new Promise((r) => setTimeout(r, 20));
  }
  await Promise.race([closed, new Promise((r) => setTimeout(r, 10_000))]);
  assert.ok(s.destroyed || s.readableEnded, `the gateway ended the connection (${sent} streams sent)`);
  assert.ok(frameTypes(Buffer.concat(got)).types.has(7), 'a GOAWAY frame came first');
  s.destroy();
  const reached = (await nginx.requests()).filter((l) => l.uri === '/index.html?reset').length;
  assert.ok(reached < 1_000, `${reached} of the reset streams reached nginx`);
  const ok = await curl(['--http2', '-o', '/dev/null', '-w', '%{http_code}', `https://${gw.hostname}:${gw.ports.https}/`]);
  assert.equal(ok.stdout, '200');
});

test('HTTP/2 CONTINUATION flood: a header block that never ends is cut off, memory stays bounded, the gateway keeps serving', async () => {
  const rssBefore = await daemonRssKiB();
  const { s, got, closed } = await h2Raw();
  const headers = Buffer.concat([Buffer.from([0x82, 0x87, 0x84]), literal(':authority', 'mail.e2e.test')]); // GET, https, /
  // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
  s.write(frame(1, 0x1, 1, headers));
  let sent = 0;
  // In batches, reading between them and stopping at the GOAWAY, as in the rapid-reset test: a close with unread
  // input is a TCP reset, which can discard the GOAWAY before the client read it (seen on a loaded machine).
  for (let i = 0; i < 20_000 && !s.destroyed && s.writable && !frameTypes(Buffer.concat(got)).types.has(7); i++) {
    // CONTINUATION frames (type 9) without END_HEADERS, each with another field.
    s.write(frame(9, 0, 1, literal(`x-flood-${i % 100}`, 'a'.repeat(100))));
    sent++;
    if (i % 200 === 199) await new Promise((r) => setTimeout(r, 20));
  }
  await Promise.race([closed, new Promise((r) => setTimeout(r, 10_000))]);
  assert.ok(s.destroyed || s.readableEnded, 'the gateway ended the connection');
  assert.ok(frameTypes(Buffer.concat(got)).types.has(7), `a GOAWAY after ${sent} CONTINUATION frames`);
  assert.ok((await daemonRssKiB()) - rssBefore < 24 * 1024, 'memory stayed bounded');
  s.destroy();
  const ok = await curl(['--http2', '-o', '/dev/null', '-w', '%{http_code}', `https://${gw.hostname}:${gw.ports.https}/`]);
  assert.equal(ok.stdout, '200');
});

// ---- WebSocket ------------------------------------------------------------------------------

test('WebSocket: Node\'s WebSocket client echoes through the gateway, and the backend sees the real client', async () => {
  // A separate node process runs the client: Node's global WebSocket (undici's), over TLS with ALPN http/1.1.
  const script = `
    const ws = new WebSocket(process.argv[1]);
    const out = [];
    ws.onopen = () => { ws.send('hello over the gateway'); ws.send('second message'); };
    ws.onmessage = (m) => { out.push(String(m.data)); if (out.length === 2) ws.close(1000); };
    ws.onclose = (e) => { console.log(JSON.stringify({ out, code: e.code })); };
    ws.onerror = (e) => { console.log(JSON.stringify({ error: String(e.message ?? e.type) })); };
    setTimeout(() => process.exit(2), 10000).unref();
  `;
  // The gateway's certificate names mail.e2e.test, which does not resolve here; the client connects to 127.0.0.1 and, for
  // this test process only, does not verify the certificate (the TLS and ALPN handshake is still the client's own).
  const child = spawn(process.execPath, ['-e', script, `wss://127.0.0.1:${gw.ports.ws}/socket`], {
    env: { ...process.env, NODE_TLS_REJECT_UNAUTHORIZED: '0', NODE_NO_WARNINGS: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((r) => child.once('exit', () => r()));
  const result = JSON.parse(out.trim().split('\n').pop() ?? '{}') as { out?: string[]; code?: number; error?: string };
  assert.deepEqual(result.out, ['hello over the gateway', 'second message'], out);
  assert.equal(result.code, 1000);
  assert.deepEqual(echo.seenFor, ['127.0.0.1'], 'X-Forwarded-For set by the gateway on the handshake');
  const end = await gw.waitForLog((l) => l.msg === 'session end' && l.listener === 'ws');
  assert.ok(Number(end.bytesIn) > 0 && Number(end.bytesOut) > 0, 'application bytes counted both ways');
});

// ---- warnings -------------------------------------------------------------------------------

test('after all of the above (HTTP/1.1, HTTP/2, WebSocket, refusals), the daemon printed no DeprecationWarning', async () => {
  const text = await gw.rawLogs();
  assert.doesNotMatch(text, /DeprecationWarning|\[DEP\d+\]/);
  assert.ok(text.split('\n').filter(Boolean).every((l) => l.startsWith('{')), 'every line the daemon wrote is a JSON log line');
});
