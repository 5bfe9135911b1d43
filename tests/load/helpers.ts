/**
 * Helpers for the load suites: the load client in its own process, the
 * daemon's heap measured through its inspector (after a forced full GC) and
 * its RSS from /proc, and two EC certificates to swap.
 */
import { execFileSync, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Gateway } from '../e2e/harness/gateway.ts';

const CLIENT = fileURLToPath(new URL('./client.ts', import.meta.url));

/** Source addresses for client connections: many 4-tuples, so 100,000 sessions never run out of ports. */
export const SOURCES = Array.from({ length: 40 }, (_, i) => `127.0.0.${i + 2}`);

export interface ClientRun {
  /** Every JSON line the client printed so far. */
  lines: Record<string, unknown>[];
  /** Resolves with the final line (`done: true`). */
  done: Promise<Record<string, unknown>>;
  /** hold mode: log out every held session and finish. */
  stop(): void;
  /** Ends the client at once (a failed test must not leave it holding sessions). */
  kill(): void;
  /** Resolves once a line matching `pred` was printed. */
  waitFor(pred: (l: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/** Clients still running; killed when the test process exits, whatever the test's outcome. */
const live = new Set<() => void>();
process.on('exit', () => {
  for (const kill of live) kill();
});

export function runClient(options: Record<string, unknown>): ClientRun {
  const child = spawn(process.execPath, [CLIENT, JSON.stringify(options)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines: Record<string, unknown>[] = [];
  const watchers = new Set<() => void>();
  let buf = '';
  child.stdout.on('data', (d: Buffer) => {
    buf += d.toString();
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.startsWith('{')) lines.push(JSON.parse(line) as Record<string, unknown>);
    }
    for (const w of watchers) w();
  });
  const done = new Promise<Record<string, unknown>>((resolve, reject) => {
    child.on('close', (code) => {
      const last = lines.at(-1);
      if (last?.done) resolve(last);
      else reject(new Error(`load client exited ${code} without a result: ${JSON.stringify(lines)}`));
    });
  });
  const waitFor = (pred: (l: Record<string, unknown>) => boolean, timeoutMs = 120_000) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const check = () => {
        const hit = lines.find(pred);
        if (hit) {
          watchers.delete(check);
          clearTimeout(t);
          resolve(hit);
        }
      };
      const t = setTimeout(() => {
        watchers.delete(check);
        reject(new Error(`load client: no matching line within ${timeoutMs} ms: ${JSON.stringify(lines)}`));
      }, timeoutMs);
      watchers.add(check);
      check();
    });
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  live.add(kill);
  child.on('close', () => live.delete(kill));
  return { lines, done, stop: () => child.stdin.write('stop\n'), kill, waitFor };
}

export interface Memory {
  heapUsed: number;
  rss: number;
}

/**
 * Forces two full GCs in the daemon through its inspector (started with
 * --inspect=127.0.0.1:0) and returns its heap in use and its RSS (/proc).
 */
export async function daemonMemory(gw: Gateway): Promise<Memory> {
  const url = /ws:\/\/127\.0\.0\.1:\d+\/[0-9a-f-]+/.exec(await gw.rawLogs())?.[0];
  if (!url) throw new Error('the daemon was not started with --inspect');
  const ws = new WebSocket(url);
  const pending = new Map<number, (v: unknown) => void>();
  ws.onmessage = (e) => {
    const m = JSON.parse(String(e.data)) as { id?: number; result?: unknown };
    if (m.id !== undefined) pending.get(m.id)?.(m.result);
  };
  await new Promise<void>((resolve, reject) => {
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error(`cannot reach the inspector at ${url}`));
  });
  let id = 0;
  const call = (method: string, params: unknown = {}) =>
    new Promise<unknown>((resolve) => {
      const i = ++id;
      pending.set(i, resolve);
      ws.send(JSON.stringify({ id: i, method, params }));
    });
  try {
    await call('HeapProfiler.collectGarbage');
    await new Promise((r) => setTimeout(r, 200));
    await call('HeapProfiler.collectGarbage');
    const r = (await call('Runtime.evaluate', { expression: 'process.memoryUsage().heapUsed', returnByValue: true })) as { result: { value: number } };
    return { heapUsed: r.result.value, rss: rssBytes(gw.proc.pid) };
  } finally {
    ws.close();
  }
}

export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

export const mb = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MB`;

/** An EC P-256 certificate for the host name in `dir` (fast handshakes, unlike the RSA bootstrap one). */
export function ecCertificate(dir: string, stem: string, hostname: string): { cert: string; key: string; fingerprint: string } {
  const cert = join(dir, `${stem}.crt`);
  const key = join(dir, `${stem}.key`);
  execFileSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${hostname}`, '-addext', `subjectAltName=DNS:${hostname}`],
    { stdio: 'ignore' },
  );
  const fingerprint = execFileSync('openssl', ['x509', '-in', cert, '-noout', '-fingerprint', '-sha256']).toString().trim().split('=')[1] ?? '';
  return { cert, key, fingerprint };
}
