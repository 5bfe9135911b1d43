/**
 * The bench's instruments: the compiled load client (loadgen.c), wrk, the
 * certificate, and /proc readings of a process group's CPU time and memory.
 */
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { HOST } from './backends.ts';

const run = promisify(execFile);
const HERE = path.dirname(new URL(import.meta.url).pathname);
const CLK_TCK = 100; // Linux USER_HZ: /proc/<pid>/stat counts in 1/100 s on every mainstream kernel

// ---- /proc ------------------------------------------------------------------

/** Live members of a process group. */
export function groupPids(pgid: number): number[] {
  const out: number[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const f = statFields(Number(e));
    if (f && Number(f[2]) === pgid && f[0] !== 'Z') out.push(Number(e));
  }
  return out;
}

/** The fields of /proc/PID/stat after "(comm) ": state is [0], pgrp [2], utime [11], stime [12]. */
function statFields(pid: number): string[] | undefined {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/**
 * CPU time of every process in the group, seconds: utime + stime (all
 * threads), plus cutime + cstime, where a process (Postfix's master, Dovecot's)
 * accumulates the children it has reaped, so the total does not drop when a
 * short-lived worker exits.
 */
export function groupCpuSeconds(pgid: number): number {
  let ticks = 0;
  for (const pid of groupPids(pgid)) {
    const f = statFields(pid);
    if (f) ticks += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
  }
  return ticks / CLK_TCK;
}

/** Resident memory of every process in the group, bytes. */
export function groupRssBytes(pgid: number): number {
  let kib = 0;
  for (const pid of groupPids(pgid)) {
    try {
      const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (m?.[1]) kib += Number(m[1]);
    } catch {
      /* exited meanwhile */
    }
  }
  return kib * 1024;
}

/** Busy and total CPU time of the whole machine so far (all cores), seconds, from /proc/stat. */
export function machineCpu(): { busy: number; total: number } {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  const busy = user + nice + system + irq + softirq + steal;
  return { busy: busy / CLK_TCK, total: (busy + idle + iowait) / CLK_TCK };
}

// ---- certificate ----------------------------------------------------------------

export async function makeCertificate(dir: string, name: string): Promise<{ cert: string; key: string; combined: string }> {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  const combined = path.join(dir, 'combined.pem');
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '7', '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`,
  ]);
  await fsp.chmod(key, 0o600);
  await fsp.writeFile(combined, (await fsp.readFile(cert, 'utf8')) + (await fsp.readFile(key, 'utf8')), { mode: 0o600 });
  return { cert, key, combined };
}

/**
 * An OpenSSL config for wrk: the same offer as the load client (TLS 1.3,
 * TLS_AES_256_GCM_SHA384, X25519), so every server negotiates the same suite.
 */
export async function writeClientOpensslConf(dir: string): Promise<string> {
  const file = path.join(dir, 'client-openssl.cnf');
  await fsp.writeFile(
    file,
    `openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_256_GCM_SHA384
Groups = X25519
`,
  );
  return file;
}

// ---- loadgen ----------------------------------------------------------------------

export async function buildLoadgen(dir: string): Promise<string> {
  const out = path.join(dir, 'loadgen');
  try {
    await run('cc', ['-O2', '-o', out, path.join(HERE, 'loadgen.c'), '-lssl', '-lcrypto']);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`building the load client failed (is libssl-dev installed? bash bench/install-deps.sh):\n${e.stderr ?? e.message}`);
  }
  return out;
}

export interface LatencyStats {
  n: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface LoadResult {
  elapsed: number;
  sessions: number;
  ops: number;
  errors: number;
  handshakes: number;
  resumed: number;
  bytes_in: number;
  bytes_out: number;
  client_cpu_s: number;
  /** CPU seconds of each --cpu-pgid group over the window. */
  cpu_s: number[];
  tls: { version: string; cipher: string; group: string };
  lat_session_us: LatencyStats | null;
  lat_op_us: LatencyStats | null;
  first_error: string;
}

export type Step = ['S' | 'E' | 'F', string] | ['R'] | ['H'];

export interface LoadSpec {
  port: number;
  tls: boolean;
  script: Step[];
  conc: number;
  duration: number;
  warmup?: number;
  maxSessions?: number;
  users?: number;
  resume?: boolean;
  /** Process groups whose CPU is read at the window's edges. */
  cpuPgids?: number[];
}

let scriptSeq = 0;

async function writeScript(dir: string, steps: Step[]): Promise<string> {
  const file = path.join(dir, `script-${process.pid}-${++scriptSeq}.txt`);
  const esc = (s: string) => s.replace(/\\/g, '\\\\').replace(/\r/g, '\\r').replace(/\n/g, '\\n').replace(/\t/g, '\\t');
  await fsp.writeFile(file, steps.map((s) => (s.length === 1 ? s[0] : `${s[0]} ${s[0] === 'F' ? s[1] : esc(s[1])}`)).join('\n') + '\n');
  return file;
}

function loadArgs(spec: LoadSpec, script: string, sni: string): string[] {
  const args = ['--host', HOST, '--port', String(spec.port), '--script', script, '--conc', String(spec.conc), '--duration', String(spec.duration)];
  if (spec.tls) args.push('--tls', '--sni', sni);
  if (spec.warmup !== undefined) args.push('--warmup', String(spec.warmup));
  if (spec.maxSessions) args.push('--max-sessions', String(spec.maxSessions));
  if (spec.users) args.push('--users', String(spec.users));
  if (spec.resume) args.push('--resume');
  if (spec.cpuPgids?.length) args.push('--cpu-pgid', spec.cpuPgids.join(','));
  return args;
}

export class Loadgen {
  readonly bin: string;
  readonly dir: string;
  readonly sni: string;

  constructor(bin: string, dir: string, sni: string) {
    this.bin = bin;
    this.dir = dir;
    this.sni = sni;
  }

  async run(spec: LoadSpec): Promise<LoadResult> {
    const script = await writeScript(this.dir, spec.script);
    const timeout = Math.round(((spec.warmup ?? 0.5) + spec.duration + 30) * 1000);
    try {
      const { stdout } = await run(this.bin, loadArgs(spec, script, this.sni), { timeout, maxBuffer: 1 << 20 });
      return JSON.parse(stdout.trim().split('\n').pop() ?? '') as LoadResult;
    } catch (err) {
      const e = err as { stderr?: string; stdout?: string; message: string };
      throw new Error(`loadgen failed: ${e.message}\n${e.stderr ?? ''}${e.stdout ?? ''}`);
    } finally {
      await fsp.rm(script, { force: true });
    }
  }

  /**
   * Opens `conc` connections in `steps` equal steps, running the script up to
   * its H step on each; after each step (all of its connections held) calls
   * `atStep(held)`. Closes them all at the end.
   */
  async hold<T>(spec: LoadSpec & { ramp?: number; steps?: number }, atStep: (held: number) => Promise<T>): Promise<{ held: number; setupSeconds: number; value: T }[]> {
    const script = await writeScript(this.dir, spec.script);
    const steps = spec.steps ?? 1;
    const args = [...loadArgs(spec, script, this.sni), '--hold', '--hold-steps', String(steps), '--ramp', String(spec.ramp ?? 64)];
    const child = spawn(this.bin, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number>((resolve) => child.once('exit', (code) => resolve(code ?? -1)));
    const lines: string[] = [];
    let partial = '';
    let wake: (() => void) | undefined;
    child.stdout.on('data', (d: Buffer) => {
      partial += d.toString();
      for (let nl = partial.indexOf('\n'); nl >= 0; nl = partial.indexOf('\n')) {
        lines.push(partial.slice(0, nl));
        partial = partial.slice(nl + 1);
      }
      wake?.();
    });
    let gone = false;
    void exited.then(() => {
      gone = true;
      wake?.();
    });
    const nextLine = async (): Promise<string> => {
      while (lines.length === 0) {
        if (gone) throw new Error(`loadgen --hold exited before holding: ${partial}${err}`);
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
      return lines.shift() as string;
    };
    const results: { held: number; setupSeconds: number; value: T }[] = [];
    try {
      for (let i = 0; i < steps; i++) {
        const info = JSON.parse(await nextLine()) as { held: number; goal: number; errors: number; setup_s: number; first_error: string };
        if (info.held !== info.goal) throw new Error(`loadgen held ${info.held} of ${info.goal} connections (${info.errors} errors, first: ${info.first_error})`);
        results.push({ held: info.held, setupSeconds: info.setup_s, value: await atStep(info.held) });
        if (i + 1 < steps) child.stdin.write('\n');
      }
      return results;
    } finally {
      child.stdin.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
      await fsp.rm(script, { force: true });
    }
  }
}

// ---- wrk ----------------------------------------------------------------------------

export interface WrkResult {
  requests: number;
  bytes: number;
  seconds: number;
  errors: number;
  p50_us: number;
  p99_us: number;
  /** CPU seconds of each pgid over the run (read before and after wrk). */
  cpu_s: number[];
  client_cpu_s: number;
}

const WRK_LUA = `done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"bytes":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
`;

export class Wrk {
  private readonly lua: string;
  private readonly opensslConf: string;

  private constructor(lua: string, opensslConf: string) {
    this.lua = lua;
    this.opensslConf = opensslConf;
  }

  static async create(dir: string): Promise<Wrk> {
    const lua = path.join(dir, 'wrk-json.lua');
    await fsp.writeFile(lua, WRK_LUA);
    return new Wrk(lua, await writeClientOpensslConf(dir));
  }

  async run(url: string, conc: number, seconds: number, cpuPgids: number[]): Promise<WrkResult> {
    const args = ['-t1', `-c${conc}`, `-d${seconds}s`, '--timeout', '20s', '-s', this.lua, url];
    const { code, out, err, cpu, clientCpu } = await measuredRun('wrk', args, this.opensslConf, cpuPgids);
    const line = out.split('\n').filter((l) => l.startsWith('{')).pop();
    if (code !== 0 || !line) throw new Error(`wrk ${args.join(' ')} failed (${code}):\n${out}${err}`);
    const r = JSON.parse(line) as { requests: number; bytes: number; duration_us: number; errors: number; p50_us: number; p99_us: number };
    return {
      requests: r.requests,
      bytes: r.bytes,
      seconds: r.duration_us / 1e6,
      errors: r.errors,
      p50_us: r.p50_us,
      p99_us: r.p99_us,
      cpu_s: cpu,
      client_cpu_s: clientCpu,
    };
  }
}

/**
 * Runs a load tool with the client OpenSSL offer and reads its output, and
 * the CPU the measured process groups and the tool itself used meanwhile
 * (the tool's CPU appears in this process' cutime/cstime once it is reaped;
 * nothing else exits meanwhile).
 */
async function measuredRun(cmd: string, args: string[], opensslConf: string, cpuPgids: number[]): Promise<{ code: number; out: string; err: string; cpu: number[]; clientCpu: number }> {
  const before = cpuPgids.map(groupCpuSeconds);
  const clientBefore = childrenCpuSeconds();
  const child = spawn(cmd, args, { env: { ...process.env, OPENSSL_CONF: opensslConf }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const code = await new Promise<number>((resolve) => child.once('exit', (c) => resolve(c ?? -1)));
  const cpu = cpuPgids.map((pgid, i) => groupCpuSeconds(pgid) - (before[i] ?? 0));
  return { code, out, err, cpu, clientCpu: childrenCpuSeconds() - clientBefore };
}

/** cutime + cstime of this process: CPU of reaped children (wrk, loadgen). */
export function childrenCpuSeconds(): number {
  const f = statFields(process.pid);
  return f ? (Number(f[13]) + Number(f[14])) / CLK_TCK : 0;
}

// ---- h2load ------------------------------------------------------------------------

export interface H2loadResult {
  requests: number;
  seconds: number;
  errors: number;
  cpu_s: number[];
  client_cpu_s: number;
}

/**
 * nghttp2's h2load (Debian: nghttp2-client): HTTP/2 over TLS, one or more
 * connections with many concurrent streams each. Same OpenSSL offer as wrk.
 */
export class H2load {
  private readonly opensslConf: string;

  private constructor(opensslConf: string) {
    this.opensslConf = opensslConf;
  }

  static async create(dir: string): Promise<H2load> {
    return new H2load(await writeClientOpensslConf(dir));
  }

  async run(url: string, clients: number, streams: number, seconds: number, cpuPgids: number[]): Promise<H2loadResult> {
    const args = ['-c', String(clients), '-m', String(streams), '-D', String(seconds), '-T', '20', url];
    const { code, out, err, cpu, clientCpu } = await measuredRun('h2load', args, this.opensslConf, cpuPgids);
    // "finished in 2.00s, 12345.60 req/s, 13.45MB/s" and "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    const fin = /finished in ([\d.]+)(m?s), ([\d.]+) req\/s/.exec(out);
    const req = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out);
    if (code !== 0 || !fin || !req) throw new Error(`h2load ${args.join(' ')} failed (${code}):\n${out.slice(-1500)}${err.slice(-500)}`);
    const seconds_ = Number(fin[1]) / (fin[2] === 'ms' ? 1000 : 1);
    const succeeded = Number(req[4]);
    if (succeeded === 0) throw new Error(`h2load: no request succeeded:\n${out.slice(-1500)}`);
    return {
      requests: succeeded,
      seconds: seconds_,
      errors: Number(req[5]) + Number(req[6]),
      cpu_s: cpu,
      client_cpu_s: clientCpu,
    };
  }
}
