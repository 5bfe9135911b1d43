/**
 * What a primary settles before its workers start, and hands them: the ports
 * (port 0 resolved once, kept across reloads, a taken port refused even when
 * its owner shares it with SO_REUSEPORT), the per-worker config, and the
 * certificate store as PEM with shared session ticket keys (a ticket from one
 * worker's store resumes on another's).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { connect, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { planPorts, workerConfig } from '../../../src/cluster/ports.ts';
import type { Config } from '../../../src/config/load.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { loadOrCreateSelfSigned } from '../../../src/tls/self-signed.ts';
import { listener } from '../../helpers/adapters.ts';

function listen(server: Server, opts: { port: number; reusePort?: boolean }): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: opts.port, reusePort: opts.reusePort ?? false }, () => {
      const a = server.address();
      resolve(a && typeof a === 'object' ? a.port : 0);
    });
  });
}

test('port 0 becomes one real port; unchanged listeners keep theirs at a reload, changed ones get new ones', async () => {
  const a = listener('imap', { name: 'a', listen: [{ host: '127.0.0.1', port: 0 }, { host: '127.0.0.1', port: 0 }] });
  const b = listener('pop3', { name: 'b' });
  const plan = await planPorts([a, b]);
  assert.equal(plan.a?.length, 2);
  for (const p of [...plan.a!, ...plan.b!]) assert.ok(p > 0, `a real port, got ${p}`);
  assert.notEqual(plan.a![0], plan.a![1]);
  // The probe let go of the ports: a worker can bind them.
  const s = createServer();
  assert.equal(await listen(s, { port: plan.b![0]!, reusePort: true }), plan.b![0]);
  // Reload: "a" unchanged keeps its ports (the workers still hold them, so a probe would fail); "b" moved to another protocol.
  const b2 = listener('smtp', { name: 'b' });
  const next = await planPorts([a, b2], { plan, listeners: [a, b] });
  assert.deepEqual(next.a, plan.a);
  assert.notEqual(next.b![0], plan.b![0], 'b is bound anew, not on the port a worker of the old b still holds');
  s.close();
});

test('a reload may hand a port our workers hold to another listener (a swap): no probe, no refusal', async () => {
  // Two sockets stand in for the workers' listeners, as SO_REUSEPORT binds them.
  const held = [createServer(), createServer()];
  const [p1, p2] = [await listen(held[0]!, { port: 0, reusePort: true }), await listen(held[1]!, { port: 0, reusePort: true })];
  try {
    const a = listener('imap', { name: 'a', listen: [{ host: '127.0.0.1', port: p1 }] });
    const b = listener('pop3', { name: 'b', listen: [{ host: '127.0.0.1', port: p2 }] });
    const plan = { a: [p1], b: [p2] };
    const swapped = await planPorts(
      [listener('imap', { name: 'a', listen: [{ host: '127.0.0.1', port: p2 }] }), listener('pop3', { name: 'b', listen: [{ host: '127.0.0.1', port: p1 }] })],
      { plan, listeners: [a, b] },
    );
    assert.deepEqual(swapped, { a: [p2], b: [p1] });
  } finally {
    for (const h of held) h.close();
  }
});

test('a port another socket holds is refused with the listener name, even one shared with SO_REUSEPORT', async () => {
  for (const reusePort of [false, true]) {
    const taken = createServer();
    const port = await listen(taken, { port: 0, reusePort });
    try {
      await assert.rejects(planPorts([listener('imap', { name: 'imaps', listen: [{ host: '127.0.0.1', port }] })]), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'LISTEN_FAILED');
        assert.match(err.message, new RegExp(`listener "imaps" cannot bind 127\\.0\\.0\\.1:${port}`));
        return true;
      });
    } finally {
      taken.close();
    }
  }
});

test('a worker runs the plan\'s ports and its share of max_connections', () => {
  const l = listener('imap', { name: 'imaps', limits: { ...listener('imap').limits, max_connections: 1001 } });
  const config = { listeners: [l] } as unknown as Config;
  const w = workerConfig(config, { ports: { imaps: [9931] }, workers: 4 });
  assert.equal(w.listeners[0]!.listen[0]!.port, 9931);
  assert.equal(w.listeners[0]!.limits.max_connections, 251);
  assert.equal(l.listen[0]!.port, 0, 'the original is untouched');
});

test('a snapshot loads into another store: same certificates, same default, challenges included', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-certs-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const one = await loadOrCreateSelfSigned(dir, 'one.example.org');
  const two = await loadOrCreateSelfSigned(dir, 'two.example.org');
  const primary = new CertStore('TLSv1.3');
  primary.put(one.cert, one.key, 'self-signed', { certFile: one.certFile });
  primary.put(two.cert, two.key, 'file', { certFile: two.certFile, makeDefault: true });
  primary.setChallenge('acme.example.org', one.cert, one.key);
  const snap = JSON.parse(JSON.stringify(primary.snapshot())) as ReturnType<CertStore['snapshot']>;
  const worker = new CertStore('TLSv1.2');
  worker.load(snap);
  assert.deepEqual(
    worker.list().map((c) => [c.names, c.source, c.certFile]).sort(),
    primary.list().map((c) => [c.names, c.source, c.certFile]).sort(),
  );
  assert.deepEqual(worker.defaultInfo()?.names, ['two.example.org']);
  assert.equal(worker.snapshot().minVersion, 'TLSv1.3', 'the primary\'s TLS floor comes along');
  assert.equal(worker.snapshot().challenges.length, 1);
  // A later snapshot replaces the whole content (a removed certificate is gone).
  const only = new CertStore('TLSv1.3');
  only.put(two.cert, two.key, 'file');
  worker.load(only.snapshot());
  assert.equal(worker.has('one.example.org'), false);
  assert.equal(worker.snapshot().challenges.length, 0);
});

async function handshake(port: number, session?: Buffer): Promise<{ reused: boolean; session: Buffer | undefined }> {
  return new Promise((resolve, reject) => {
    let ticket: Buffer | undefined;
    const s: TLSSocket = connect({ host: '127.0.0.1', port, rejectUnauthorized: false, servername: 'one.example.org', ...(session ? { session } : {}) });
    s.on('session', (b: Buffer) => (ticket = b));
    s.once('error', reject);
    s.once('data', () => {
      const reused = s.isSessionReused();
      // Let the ticket arrive (TLS 1.3 sends it after the handshake).
      setTimeout(() => {
        s.end();
        resolve({ reused, session: ticket });
      }, 20);
    });
  });
}

test('two stores with the same ticket keys resume each other\'s tickets; other keys do not', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'mailgate-certs-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const pair = await loadOrCreateSelfSigned(dir, 'one.example.org');
  const keys = randomBytes(48);
  const serve = async (ticketKeys: Buffer) => {
    const store = new CertStore('TLSv1.2');
    store.setTicketKeys(ticketKeys);
    store.put(pair.cert, pair.key, 'self-signed');
    const server = createTlsServer({ SNICallback: store.sniCallback }, (s) => s.end('* OK\r\n'));
    // As the listeners do: each handshake starts on the store's current default context, whose keys encrypt tickets.
    server.prependListener('connection', () => {
      (server as unknown as { _sharedCreds: unknown })._sharedCreds = store.contextFor(undefined);
    });
    const port = await listen(server as unknown as Server, { port: 0 });
    t.after(() => server.close());
    return { store, port };
  };
  const a = await serve(keys);
  const b = await serve(keys);
  const c = await serve(randomBytes(48));
  const first = await handshake(a.port);
  assert.equal(first.reused, false);
  assert.ok(first.session, 'a ticket was issued');
  assert.equal((await handshake(b.port, first.session)).reused, true, 'the other worker resumes it');
  assert.equal((await handshake(c.port, first.session)).reused, false, 'a store with other keys does not');
  // Rotation: with new keys, the old ticket no longer resumes.
  b.store.setTicketKeys(randomBytes(48));
  assert.equal((await handshake(b.port, first.session)).reused, false);
});
