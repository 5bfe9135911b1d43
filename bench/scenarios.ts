/**
 * What each row of the bench does to one target, and the figures it yields.
 * A target is the direct backend (plaintext, the no-proxy limit) or a proxy
 * (TLS 1.3 in front of the same backends).
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BENCH_PASSWORD, BULK_USER } from './backends.ts';
import type { Ports } from './proxies.ts';
import type { H2load, Loadgen, LoadResult, Step, Wrk } from './tools.ts';
import { groupRssBytes } from './tools.ts';

export interface Target {
  name: string;
  /** Plaintext backend, or a TLS proxy. */
  direct: boolean;
  ports: Ports;
  /** The proxy's process group (CPU, RSS); none for the direct backend. */
  pgid: number | undefined;
}

export interface Settings {
  /** Seconds of counting per measure. */
  duration: number;
  /** Seconds of load before counting starts. */
  warmup: number;
  /** IMAP users the session row cycles through. */
  users: number;
  /** Connections held open for the idle-memory row. */
  idleConns: number;
  /** Sequential connections for the single-connection latency row (at most). */
  singleConns: number;
  /** Backend process groups whose CPU is recorded alongside (informational). */
  backendPgids: number[];
}

/** One measure's figures, keyed by metric id; `client` is the load client's share of one core. */
export interface Sample {
  values: Record<string, number>;
  client?: number;
  /** Cores busy on the whole machine during the measure (everything: proxy, client, backends, other users). */
  machine?: number;
  warnings: string[];
}

export interface Ctx {
  loadgen: Loadgen;
  wrk: Wrk;
  h2load: H2load;
  settings: Settings;
  /** The 10 KiB SMTP message, dot-terminated. */
  smtpMessageFile: string;
}

export interface Scenario {
  id: string;
  title: string;
  run(t: Target, ctx: Ctx): Promise<Sample>;
}

// ---- scripts ---------------------------------------------------------------------

const GREETING: Step[] = [['E', '* OK']];

const IMAP_SESSION: Step[] = [
  ['E', '* OK'],
  ['S', `a LOGIN u%U ${BENCH_PASSWORD}\r\n`],
  ['E', 'a OK'],
  ['S', 'b SELECT INBOX\r\n'],
  ['E', 'b OK'],
  ['S', 'c FETCH 1 BODY.PEEK[]\r\n'],
  ['E', 'c OK'],
  ['S', 'd LOGOUT\r\n'],
  ['E', 'd OK'],
];

const IMAP_FETCH_BULK: Step[] = [
  ['E', '* OK'],
  ['S', `a LOGIN ${BULK_USER} ${BENCH_PASSWORD}\r\n`],
  ['E', 'a OK'],
  ['S', 'b SELECT INBOX\r\n'],
  ['E', 'b OK'],
  ['R'],
  ['S', 'c FETCH 1 BODY.PEEK[]\r\n'],
  ['E', 'c OK'],
];

const IMAP_NOOP: Step[] = [
  ['E', '* OK'],
  ['S', `a LOGIN u%U ${BENCH_PASSWORD}\r\n`],
  ['E', 'a OK'],
  ['S', 'b SELECT INBOX\r\n'],
  ['E', 'b OK'],
  ['R'],
  ['S', 'n NOOP\r\n'],
  ['E', 'n OK'],
];

const IDLE_HOLD: Step[] = [['E', '* OK'], ['H']];


function smtpSession(messageFile: string): Step[] {
  const plain = Buffer.from(`\0u0001\0${BENCH_PASSWORD}`).toString('base64');
  return [
    ['E', '220 '],
    ['S', 'EHLO client.bench.test\r\n'],
    ['E', '250 '],
    ['S', `AUTH PLAIN ${plain}\r\n`],
    ['E', '2?? '],
    ['S', 'MAIL FROM:<sender@bench.test>\r\n'],
    ['E', '250 '],
    ['S', 'RCPT TO:<rcpt@bench.test>\r\n'],
    ['E', '250 '],
    ['S', 'DATA\r\n'],
    ['E', '354 '],
    ['F', messageFile],
    ['E', '250 '],
    ['S', 'QUIT\r\n'],
    ['E', '221 '],
  ];
}

/** Exactly 10 KiB of message (CRLF lines, none starting with a dot), then the terminating dot line. */
export async function writeSmtpMessage(dir: string): Promise<string> {
  const head = ['From: sender@bench.test', 'To: rcpt@bench.test', 'Subject: bench 10 KiB', 'Message-ID: <bench-10k@bench.test>', ''];
  const lines = [...head];
  const size = () => Buffer.byteLength(lines.join('\r\n') + '\r\n');
  for (let i = 0; size() < 10240 - 80; i++) lines.push(`line ${String(i).padStart(4, '0')} the quick brown fox jumps over the lazy dog 0123456789`);
  const missing = 10240 - size() - 2;
  lines.push('x'.repeat(Math.max(1, missing)));
  const body = Buffer.from(lines.join('\r\n') + '\r\n', 'latin1');
  if (body.length !== 10240) throw new Error(`SMTP message is ${body.length} bytes, not 10240`);
  const file = path.join(dir, 'message-10k.eml');
  await fsp.writeFile(file, Buffer.concat([body, Buffer.from('.\r\n')]));
  return file;
}

// ---- helpers ------------------------------------------------------------------------

function pgids(t: Target, ctx: Ctx): number[] {
  return [t.pgid ?? 0, ...ctx.settings.backendPgids];
}

function check(r: LoadResult, what: string, count: number): string[] {
  const w: string[] = [];
  if (count === 0) w.push(`${what}: nothing completed${r.first_error ? ` (${r.first_error})` : ''}`);
  else if (r.errors > Math.max(2, count * 0.01)) w.push(`${what}: ${r.errors} errors for ${count} completed (${r.first_error})`);
  return w;
}

function proxyCpuPerOp(t: Target, cpu: number[], ops: number): Record<string, number> {
  if (t.direct || ops === 0) return {};
  return { cpu_us: ((cpu[0] ?? 0) / ops) * 1e6 };
}

function backendCpu(cpu: number[], ops: number): Record<string, number> {
  const b = cpu.slice(1).reduce((a, x) => a + x, 0);
  return ops > 0 ? { backend_cpu_us: (b / ops) * 1e6 } : {};
}

/** Sessions per second, and the proxy's and the backends' CPU per session. */
function perSession(t: Target, r: { sessions: number; elapsed: number; cpu_s: number[] }): Record<string, number> {
  return { rate: r.sessions / r.elapsed, ...proxyCpuPerOp(t, r.cpu_s, r.sessions), ...backendCpu(r.cpu_s, r.sessions) };
}

/** The load client's CPU as a share of one core over the window. */
function clientShare(r: { client_cpu_s: number }, seconds: number): number {
  return seconds > 0 ? r.client_cpu_s / seconds : 0;
}

// ---- scenarios -------------------------------------------------------------------------

export const SCENARIOS: Scenario[] = [
  {
    id: 'handshake',
    title: 'TLS full handshake + IMAP greeting, 64 concurrent',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({ port: t.ports.imap, tls: !t.direct, script: GREETING, conc: 64, duration: s.duration, warmup: s.warmup, cpuPgids: pgids(t, ctx) });
      return {
        values: perSession(t, r),
        client: clientShare(r, r.elapsed),
        warnings: [...check(r, 'handshake', r.sessions), ...tlsCheck(t, r)],
      };
    },
  },
  {
    id: 'resume',
    title: 'TLS resumed handshake (session ticket) + IMAP greeting, 64 concurrent',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({ port: t.ports.imap, tls: !t.direct, script: GREETING, conc: 64, duration: s.duration, warmup: s.warmup, resume: true, cpuPgids: pgids(t, ctx) });
      const values: Record<string, number> = { rate: r.sessions / r.elapsed, ...proxyCpuPerOp(t, r.cpu_s, r.sessions) };
      if (!t.direct) values.resumed_pct = r.handshakes > 0 ? (100 * r.resumed) / r.handshakes : 0;
      return { values, client: clientShare(r, r.elapsed), warnings: check(r, 'resume', r.sessions) };
    },
  },
  {
    id: 'imap_session',
    title: 'IMAP session (connect, TLS, LOGIN, SELECT, FETCH, LOGOUT), 32 concurrent',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({
        port: t.ports.imap,
        tls: !t.direct,
        script: IMAP_SESSION,
        conc: 32,
        users: s.users,
        duration: s.duration,
        warmup: s.warmup,
        cpuPgids: pgids(t, ctx),
      });
      return {
        values: perSession(t, r),
        client: clientShare(r, r.elapsed),
        warnings: check(r, 'imap session', r.sessions),
      };
    },
  },
  {
    id: 'fetch',
    title: 'IMAP FETCH of a 10 MiB message, one connection',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({ port: t.ports.imap, tls: !t.direct, script: IMAP_FETCH_BULK, conc: 1, duration: s.duration, warmup: s.warmup, cpuPgids: pgids(t, ctx) });
      const mb = r.bytes_in / 1e6;
      return {
        values: { mbps: mb / r.elapsed, ...(t.direct || mb === 0 ? {} : { cpu_us_per_mb: ((r.cpu_s[0] ?? 0) / mb) * 1e6 }) },
        client: clientShare(r, r.elapsed),
        warnings: check(r, 'fetch', r.ops),
      };
    },
  },
  {
    id: 'https_bulk',
    title: 'HTTPS GET of a 100 MiB file, one connection (wrk)',
    async run(t, ctx) {
      const s = ctx.settings;
      const url = `${t.direct ? 'http' : 'https'}://127.0.0.1:${t.ports.http}/big.bin`;
      const r = await ctx.wrk.run(url, 1, Math.max(1, Math.round(s.duration + s.warmup)), [t.pgid ?? 0]);
      const mb = r.bytes / 1e6;
      return {
        values: { mbps: mb / r.seconds, ...(t.direct || mb === 0 ? {} : { cpu_us_per_mb: ((r.cpu_s[0] ?? 0) / mb) * 1e6 }) },
        client: clientShare(r, r.seconds),
        warnings: r.errors > 0 ? [`https bulk: ${r.errors} errors`] : [],
      };
    },
  },
  {
    id: 'https_small',
    title: 'HTTPS GET of 1 KiB, keep-alive, 32 connections (wrk)',
    async run(t, ctx) {
      const s = ctx.settings;
      const url = `${t.direct ? 'http' : 'https'}://127.0.0.1:${t.ports.http}/1k.bin`;
      const r = await ctx.wrk.run(url, 32, Math.max(1, Math.round(s.duration + s.warmup)), [t.pgid ?? 0]);
      return {
        values: { rps: r.requests / r.seconds, p99_ms: r.p99_us / 1000, ...proxyCpuPerOp(t, r.cpu_s, r.requests) },
        client: clientShare(r, r.seconds),
        warnings: r.errors > 0 ? [`https small: ${r.errors} errors`] : [],
      };
    },
  },
  {
    id: 'https_h2',
    title: 'HTTP/2 GET of 1 KiB, one connection, 100 concurrent streams (h2load)',
    async run(t, ctx) {
      // The plaintext backend speaks no HTTP/2, and HAProxy here terminates TLS in TCP mode (no ALPN h2).
      if (t.direct || t.name.startsWith('haproxy')) return { values: {}, warnings: [] };
      const s = ctx.settings;
      const r = await ctx.h2load.run(`https://127.0.0.1:${t.ports.http}/1k.bin`, 1, 100, Math.max(1, Math.round(s.duration + s.warmup)), [t.pgid ?? 0]);
      return {
        values: { rps: r.requests / r.seconds, ...proxyCpuPerOp(t, r.cpu_s, r.requests) },
        client: clientShare(r, r.seconds),
        warnings: r.errors > 0 ? [`h2: ${r.errors} errors`] : [],
      };
    },
  },
  {
    id: 'noop',
    title: 'IMAP NOOP round trip, one logged-in connection',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({ port: t.ports.imap, tls: !t.direct, script: IMAP_NOOP, conc: 1, users: 1, duration: s.duration, warmup: s.warmup });
      const l = r.lat_op_us;
      const values: Record<string, number> = l ? { p50_us: l.p50, p99_us: l.p99 } : {};
      return { values, client: clientShare(r, r.elapsed), warnings: check(r, 'noop', r.ops) };
    },
  },
  {
    id: 'smtp',
    title: 'SMTPS session with one 10 KiB message (EHLO, AUTH, MAIL, RCPT, DATA, QUIT), 16 concurrent',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({
        port: t.ports.smtp,
        tls: !t.direct,
        script: smtpSession(ctx.smtpMessageFile),
        conc: 16,
        duration: s.duration,
        warmup: s.warmup,
        cpuPgids: pgids(t, ctx),
      });
      return {
        values: perSession(t, r),
        client: clientShare(r, r.elapsed),
        warnings: check(r, 'smtp', r.sessions),
      };
    },
  },
  {
    id: 'single',
    title: 'connect + TLS + IMAP greeting, one connection at a time',
    async run(t, ctx) {
      const s = ctx.settings;
      const r = await ctx.loadgen.run({
        port: t.ports.imap,
        tls: !t.direct,
        script: GREETING,
        conc: 1,
        duration: Math.max(2, s.duration),
        warmup: 0,
        maxSessions: s.singleConns,
      });
      const l = r.lat_session_us;
      const values: Record<string, number> = l ? { p50_ms: l.p50 / 1000, p99_ms: l.p99 / 1000 } : {};
      return { values, client: clientShare(r, r.elapsed), warnings: check(r, 'single', r.sessions) };
    },
  },
];

function tlsCheck(t: Target, r: LoadResult): string[] {
  if (t.direct || !r.tls.version) return [];
  const ok = r.tls.version === 'TLSv1.3' && r.tls.cipher === 'TLS_AES_256_GCM_SHA384' && r.tls.group === 'X25519';
  return ok ? [] : [`${t.name} negotiated ${r.tls.version} ${r.tls.cipher} ${r.tls.group}`];
}

/**
 * Row 5: the proxy's resident memory per idle TLS IMAP connection (greeted,
 * waiting for LOGIN). The connections are opened in two steps, n/2 then n;
 * the figure is the slope between the two (what each further connection
 * costs), which is not fooled by memory the process had already reserved
 * during earlier rows. The JSON also keeps the plain (RSS(n) - RSS(0)) / n.
 */
export async function idleMemory(t: Target, ctx: Ctx): Promise<Sample> {
  if (t.direct || t.pgid === undefined) return { values: {}, warnings: [] };
  const pgid = t.pgid;
  const n = ctx.settings.idleConns;
  await settle();
  const before = groupRssBytes(pgid);
  const steps = await ctx.loadgen.hold({ port: t.ports.imap, tls: true, script: IDLE_HOLD, conc: n, duration: 120, ramp: 64, steps: 2 }, async () => {
    await settle();
    return groupRssBytes(pgid);
  });
  // Let the proxy close everything before the next measure.
  await new Promise((r) => setTimeout(r, 1500));
  const [half, full] = steps;
  if (!half || !full) return { values: {}, warnings: ['idle memory: no reading'] };
  return {
    values: {
      kib_per_conn: (full.value - half.value) / 1024 / (full.held - half.held),
      kib_per_conn_from_start: (full.value - before) / 1024 / full.held,
      rss_before_mib: before / 2 ** 20,
      rss_full_mib: full.value / 2 ** 20,
      setup_s: half.setupSeconds + full.setupSeconds,
    },
    warnings: [],
  };
}

/** Lets timers fire and garbage be collected before memory is read. */
async function settle(): Promise<void> {
  await new Promise((r) => setTimeout(r, 2000));
}
