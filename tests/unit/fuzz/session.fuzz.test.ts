/**
 * Fuzz: the real session driver (MailSession behind startMailListener, in
 * this process) with generated client streams sent over loopback in random
 * chunks, in front of small fake backends. Each run ends with the client's
 * FIN; the session must answer in its protocol's words and close, log no
 * internal error, and never let a byte that could split a command (bare CR,
 * NUL) reach the backend.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { CapabilityCache } from '../../../src/backend/capabilities.ts';
import type { Listener } from '../../../src/config/load.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS } from '../../../src/config/schema.ts';
import { createLogger } from '../../../src/core/log.ts';
import { startMailListener } from '../../../src/listeners/mail-listener.ts';
import type { ListenerHandle } from '../../../src/listeners/types.ts';
import { PassthroughPolicy } from '../../../src/policy/engine.ts';
import { imapProtocol } from '../../../src/protocols/imap.ts';
import { pop3Protocol } from '../../../src/protocols/pop3.ts';
import { smtpProtocol } from '../../../src/protocols/smtp.ts';
import type { ProtocolModule } from '../../../src/protocols/types.ts';
import { SessionRegistry } from '../../../src/session/registry.ts';
import { CertStore } from '../../../src/tls/cert-store.ts';
import { startFakeImap, startFakePop3, startFakeSmtp, type FakeBackend } from '../../helpers/fake-backends.ts';
import { count, crlfLines, cutsArb, params, split } from './helpers.ts';
import { imapStream, pop3Stream, smtpStream } from './streams.ts';
import { waitFor } from '../../helpers/wait.ts';

const logs: string[] = [];
const log = createLogger('debug', { write: (l: string) => void logs.push(l) });
const registry = new SessionRegistry();
const certs = new CertStore('TLSv1.2');
const handles: ListenerHandle[] = [];
const backends: FakeBackend[] = [];
const ports: Record<string, number> = {};
let dir = '';

function mailListener(name: string, protocol: 'imap' | 'pop3' | 'smtp', tls: 'starttls' | 'none', backendPort: number): Listener {
  return {
    name,
    protocol,
    listen: [{ host: '127.0.0.1', port: 0 }],
    backend: { host: '127.0.0.1', port: backendPort },
    proxy_protocol: false,
    tls,
    timeouts: { ...DEFAULT_TIMEOUTS, tls_handshake: 2000, preauth_idle: 3000, preauth_total: 5000, backend_connect: 2000, login_replay: 2000 },
    limits: { ...DEFAULT_LIMITS, max_line: 1024, max_literal: 600, max_sasl: 400, max_preauth_commands: 30, max_auth_attempts: 3 },
    imap_id: true,
    require_tls: false,
    auth: 'required',
    xclient: true,
    greet_delay: 0,
  } as unknown as Listener;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mailgate-fuzz-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k.pem'), '-out', join(dir, 'c.pem'), '-days', '2', '-subj', '/CN=gw.test'], { stdio: 'ignore' });
  certs.loadFiles(join(dir, 'c.pem'), join(dir, 'k.pem'), true);
  const imap = await startFakeImap();
  const pop3 = await startFakePop3({ capabilities: ['XCLIENT'] });
  const smtp = await startFakeSmtp();
  backends.push(imap, pop3, smtp);
  const capabilities = new CapabilityCache('gw.test', log);
  const deps = { hostname: 'gw.test', certs, registry, policy: () => new PassthroughPolicy(), log, minVersion: 'TLSv1.2' as const, capabilities };
  const specs: [string, ProtocolModule, 'starttls' | 'none', number][] = [
    ['imap', imapProtocol, 'none', imap.port],
    ['imap-starttls', imapProtocol, 'starttls', imap.port],
    ['pop3', pop3Protocol, 'none', pop3.port],
    ['smtp', smtpProtocol, 'none', smtp.port],
    ['smtp-starttls', smtpProtocol, 'starttls', smtp.port],
  ];
  for (const [name, module, tls, port] of specs) {
    const h = await startMailListener(mailListener(name, module.protocol, tls, port), module, deps);
    handles.push(h);
    ports[name] = Number(/:(\d+)$/.exec(h.addresses[0] ?? '')?.[1]);
  }
});

after(async () => {
  for (const h of handles) await h.close();
  registry.killAll('shutdown');
  for (const b of backends) await b.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Sends the chunks (a tick apart, so they tend to arrive apart), then FIN; resolves with all bytes received once closed. */
function exchange(port: number, chunks: Buffer[], smtp: boolean): Promise<{ out: string; closed: boolean }> {
  return new Promise((resolve) => {
    const s = connect({ port, host: '127.0.0.1', noDelay: true });
    const got: Buffer[] = [];
    let done = false;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ out: Buffer.concat(got).toString('latin1'), closed });
    };
    const timer = setTimeout(() => finish(false), 10_000);
    s.on('data', (d: Buffer) => got.push(d));
    s.on('error', () => undefined);
    s.on('close', () => finish(true));
    const send = (i: number) => {
      if (s.destroyed) return;
      if (i >= chunks.length) {
        s.end();
        return;
      }
      s.write(chunks[i]!);
      setImmediate(() => send(i + 1));
    };
    // SMTP clients must wait for the greeting (an early talker is refused, which would end every run at once).
    if (smtp) s.once('data', () => send(0));
    else s.once('connect', () => send(0));
  });
}

const IMAP_LINE = /^(\* (OK|NO|BAD|BYE|CAPABILITY|ID)\b|\+ |\+$|[^\s]+ (OK|NO|BAD)\b)/;
const POP3_LINE = /^(\+OK\b|-ERR\b|\+ |\.$|[A-Z][A-Z0-9-]*( [^\s]+)*$)/;
const SMTP_LINE = /^[2-5]\d\d[ -]/;

function noInternalErrors(): void {
  const bad = logs.filter((l) => /"msg":"(internal error|uncaught exception)"/.test(l));
  assert.deepEqual(bad, [], 'no internal error was logged');
}

/** What the backends received: command lines only, never one split by a bare CR or carrying a NUL. */
function cleanBackendBytes(): void {
  for (const b of backends) {
    for (const t of b.transcripts()) {
      for (const line of t.split('\r\n')) assert.doesNotMatch(line, /[\r\0]/, `a backend received ${JSON.stringify(line)}`);
    }
  }
}

async function fuzz(name: string, stream: fc.Arbitrary<Buffer>, grammar: RegExp, smtp: boolean, runs: number): Promise<void> {
  await fc.assert(
    fc.asyncProperty(stream, cutsArb, async (input, cuts) => {
      count(`session-${name}`);
      const r = await exchange(ports[name]!, split(input, cuts), smtp);
      assert.ok(r.closed, 'the session closed after the client did');
      // Bytes after a STARTTLS answer are a TLS handshake the client never made; only the plaintext before counts.
      const tlsAt = r.out.search(/^(\S+ OK Begin TLS|220 2\.0\.0 Ready to start TLS)[^\n]*\n/m);
      const plainText = tlsAt < 0 ? r.out : r.out.slice(0, r.out.indexOf('\n', tlsAt) + 1);
      for (const line of crlfLines(plainText)) assert.match(line, grammar, `not a ${name} line: ${JSON.stringify(line)}`);
    }),
    params(runs),
  );
  noInternalErrors();
  cleanBackendBytes();
}

test('fuzz: live IMAP sessions (plain and STARTTLS listeners)', async () => {
  await fuzz('imap', imapStream, IMAP_LINE, false, 40);
  await fuzz('imap-starttls', imapStream, IMAP_LINE, false, 20);
});

test('fuzz: live POP3 sessions', async () => {
  await fuzz('pop3', pop3Stream, POP3_LINE, false, 40);
});

test('fuzz: live SMTP sessions (plain and STARTTLS listeners)', async () => {
  await fuzz('smtp', smtpStream, SMTP_LINE, true, 40);
  await fuzz('smtp-starttls', smtpStream, SMTP_LINE, true, 20);
});

test('every fuzzed session ended and left the registry', async () => {
  await waitFor('every session to leave the registry', () => registry.size === 0, { detail: () => `sessions left: ${JSON.stringify(registry.list().map((r) => [r.listener, r.state]))}` });
  const ends = logs.filter((l) => l.includes('"msg":"session end"')).length;
  assert.ok(ends > 0);
});
