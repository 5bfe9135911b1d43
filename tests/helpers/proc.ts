// Child-process plumbing for the tests (the e2e harness, Redis for unit tests, the bench): temp folders, free ports,
// spawning servers in their own process group, readiness probes, and making
// sure nothing outlives the test process.
//
// Leak protection, in three layers:
//  1. stop() of every server (SIGTERM to its process group, SIGKILL after a grace period);
//  2. a process 'exit' handler that SIGKILLs every still-registered process group
//     and removes the registered temp folders;
//  3. a tiny detached `sh` watchdog (one per test process) that notices when the
//     test process died without running its 'exit' handler (SIGKILL, SIGTERM from
//     the test runner, ...) and then kills the groups / removes the folders listed
//     in its registry file.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

export const HOST = '127.0.0.1' as const;
export const TEMP_PREFIX = 'mailgate-e2e-';

// ---------------------------------------------------------------------------
// registry of live process groups and temp folders

const liveGroups = new Set<number>();
const liveDirs = new Set<string>();
let exitHookInstalled = false;
let watchdogStarted = false;
const registryFile = path.join(os.tmpdir(), `${TEMP_PREFIX}reaper-${process.pid}.list`);

function writeRegistry(): void {
  try {
    if (liveGroups.size === 0 && liveDirs.size === 0) {
      fs.rmSync(registryFile, { force: true });
      return;
    }
    const lines: string[] = [];
    for (const g of liveGroups) lines.push(`pgid ${g}`);
    for (const d of liveDirs) lines.push(`dir ${d}`);
    fs.writeFileSync(registryFile + '.tmp', lines.join('\n') + '\n');
    fs.renameSync(registryFile + '.tmp', registryFile);
  } catch {
    // best effort only
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const g of liveGroups) {
      try {
        process.kill(-g, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
    for (const d of liveDirs) {
      try {
        fs.rmSync(d, { recursive: true, force: true });
      } catch {
        /* ignore */
      }
    }
    liveGroups.clear();
    liveDirs.clear();
    try {
      fs.rmSync(registryFile, { force: true });
    } catch {
      /* ignore */
    }
  });
}

function startWatchdog(): void {
  if (watchdogStarted) return;
  watchdogStarted = true;
  const tmp = os.tmpdir().replace(/\/+$/, '');
  // Only folders directly below os.tmpdir() with our prefix are ever removed.
  // (POSIX sh / dash: "kill -9 -PGID" signals a process group; "--" is not accepted.)
  const script = `
parent=$1; list=$2; tmp=$3; prefix=$4
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
[ -f "$list" ] || exit 0
while read -r kind value; do
  case "$kind" in
    pgid) case "$value" in ''|*[!0-9]*) ;; *) kill -9 "-$value" 2>/dev/null ;; esac ;;
  esac
done < "$list"
sleep 0.2
while read -r kind value; do
  case "$kind" in
    dir) case "$value" in "$tmp/$prefix"*) case "$value" in */../*) ;; *) rm -rf -- "$value" ;; esac ;; esac ;;
  esac
done < "$list"
rm -f -- "$list"
`;
  try {
    const child = spawn('/bin/sh', ['-c', script, 'mailgate-e2e-watchdog', String(process.pid), registryFile, tmp, TEMP_PREFIX], {
      detached: true,
      stdio: 'ignore',
    });
    child.on('error', () => {});
    child.unref();
  } catch {
    // the exit hook still protects against ordinary failures
  }
}

function registerGroup(pgid: number): void {
  installExitHook();
  startWatchdog();
  liveGroups.add(pgid);
  writeRegistry();
}

function unregisterGroup(pgid: number): void {
  liveGroups.delete(pgid);
  writeRegistry();
}

// ---------------------------------------------------------------------------
// temp folders

/** A fresh temp folder (mode 0755 so unprivileged server processes can traverse it). */
export async function makeTempDir(kind: string): Promise<string> {
  installExitHook();
  startWatchdog();
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `${TEMP_PREFIX}${kind}-`));
  await fsp.chmod(dir, 0o755);
  liveDirs.add(dir);
  writeRegistry();
  return dir;
}

export async function removeTempDir(dir: string): Promise<void> {
  await fsp.rm(dir, { recursive: true, force: true, maxRetries: 3, retryDelay: 50 });
  liveDirs.delete(dir);
  writeRegistry();
}

// ---------------------------------------------------------------------------
// users

export interface SysUser {
  name: string;
  uid: number;
  gid: number;
}

/** Look up a system user in /etc/passwd (no NSS needed for the system users we use). */
export function systemUser(name: string): SysUser {
  const passwd = fs.readFileSync('/etc/passwd', 'utf8');
  for (const line of passwd.split('\n')) {
    const f = line.split(':');
    if (f[0] === name && f[2] !== undefined && f[3] !== undefined) {
      return { name, uid: Number(f[2]), gid: Number(f[3]) };
    }
  }
  throw new Error(`system user ${name} not found in /etc/passwd`);
}

export function assertRoot(what: string): void {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    throw new Error(`${what}: the e2e harness must run as root (it starts Dovecot/Postfix/nginx as root, which then drop privileges)`);
  }
}

export async function chownR(p: string, uid: number, gid: number): Promise<void> {
  await fsp.chown(p, uid, gid);
  const st = await fsp.lstat(p);
  if (st.isDirectory()) {
    for (const e of await fsp.readdir(p)) await chownR(path.join(p, e), uid, gid);
  }
}

// ---------------------------------------------------------------------------
// ports

const handedOut = new Set<number>();

/**
 * Test files run in parallel processes: a port one of them has picked but not
 * yet bound (a daemon takes a second to start) looks free to the others. A
 * file per port in a shared folder, created exclusively, claims it across
 * processes; claims older than PORT_CLAIM_MS are stale (a run that died).
 */
const PORT_CLAIMS = path.join(os.tmpdir(), 'mailgate-e2e-ports');
const PORT_CLAIM_MS = 10 * 60 * 1000;

function claim(port: number): boolean {
  const file = path.join(PORT_CLAIMS, String(port));
  try {
    fs.mkdirSync(PORT_CLAIMS, { recursive: true });
    fs.writeFileSync(file, String(process.pid), { flag: 'wx' });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    try {
      if (Date.now() - fs.statSync(file).mtimeMs < PORT_CLAIM_MS) return false;
      fs.writeFileSync(file, String(process.pid));
      return true;
    } catch {
      return false;
    }
  }
}

function tryBind(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.unref();
    s.once('error', () => resolve(false));
    s.listen({ port, host: HOST, exclusive: true }, () => s.close(() => resolve(true)));
  });
}

function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (lo && hi) return [lo, hi];
  } catch {
    /* not linux */
  }
  return [32768, 60999];
}

/**
 * A free TCP port on 127.0.0.1. Ports are picked at random from 20000..(start of
 * the kernel's ephemeral range) so they cannot collide with outgoing connections'
 * source ports or port-0 listeners, are checked by binding, and are never handed
 * out twice, by this process or (claims, above) by another test process.
 */
export async function freePort(): Promise<number> {
  const [ephLo] = ephemeralRange();
  const lo = 20000;
  const hi = ephLo - 1;
  if (hi - lo > 1000) {
    for (let i = 0; i < 200; i++) {
      const port = lo + Math.floor(Math.random() * (hi - lo));
      if (handedOut.has(port)) continue;
      if ((await tryBind(port)) && claim(port)) {
        handedOut.add(port);
        return port;
      }
    }
  }
  // fallback: let the kernel choose
  for (let i = 0; i < 50; i++) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = net.createServer();
      s.unref();
      s.once('error', reject);
      s.listen(0, HOST, () => {
        const a = s.address() as net.AddressInfo;
        s.close(() => resolve(a.port));
      });
    });
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error('freePort: could not find a free port');
}

// ---------------------------------------------------------------------------
// processes

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  error?: Error;
}

export interface ManagedProcess {
  readonly name: string;
  readonly pid: number;
  readonly child: ChildProcess;
  /** File receiving the process' stdout and stderr. */
  readonly outputFile: string;
  readonly exited: Promise<ExitInfo>;
  exitInfo(): ExitInfo | undefined;
  /** SIGTERM the whole process group, SIGKILL after graceMs; idempotent. */
  stop(graceMs?: number): Promise<void>;
}

export interface SpawnOptions {
  cwd: string;
  env?: NodeJS.ProcessEnv;
  outputFile: string;
}

/** Spawn a server in its own session/process group, stdout+stderr appended to outputFile. */
export function spawnServer(name: string, command: string, args: string[], opts: SpawnOptions): ManagedProcess {
  const fd = fs.openSync(opts.outputFile, 'a');
  let child: ChildProcess;
  try {
    child = spawn(command, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      detached: true, // setsid(): own process group, so we can kill the whole tree
      stdio: ['ignore', fd, fd],
    });
  } finally {
    fs.closeSync(fd);
  }
  // The servers must not keep the test process alive on their own; the exit
  // hook kills them if a test forgets to stop() them.
  child.unref();
  let info: ExitInfo | undefined;
  const exited = new Promise<ExitInfo>((resolve) => {
    child.once('error', (error) => {
      info ??= { code: null, signal: null, error };
      resolve(info);
    });
    child.once('exit', (code, signal) => {
      info ??= { code, signal };
      resolve(info);
    });
  });
  const pid = child.pid ?? -1;
  if (pid > 0) registerGroup(pid);
  let stopping: Promise<void> | undefined;
  const proc: ManagedProcess = {
    name,
    pid,
    child,
    outputFile: opts.outputFile,
    exited,
    exitInfo: () => info,
    stop(graceMs = 3000) {
      stopping ??= (async () => {
        if (pid <= 0) return;
        killGroup(pid, 'SIGTERM');
        // a ref'd timer keeps the event loop alive while we wait (child is unref'd)
        const timedOut = await raceTimeout(exited, graceMs);
        if (timedOut) {
          killGroup(pid, 'SIGKILL');
          await raceTimeout(exited, 2000);
        }
        // the leader is gone; make sure no other member of its group survives
        if (await groupAlive(pid, 300)) {
          killGroup(pid, 'SIGKILL');
          await groupAlive(pid, 1000);
        }
        unregisterGroup(pid);
      })();
      return stopping;
    },
  };
  return proc;
}

function killGroup(pgid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pgid, sig);
  } catch {
    /* ESRCH: group already gone */
  }
}

/** Resolves true if the timeout hit first. */
async function raceTimeout(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  try {
    return await Promise.race([p.then(() => false), t]);
  } finally {
    clearTimeout(timer);
  }
}

/** Non-zombie members of a process group (via /proc). */
function groupMembers(pgid: number): number[] {
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    try {
      process.kill(-pgid, 0);
      return [pgid];
    } catch {
      return [];
    }
  }
  const out: number[] = [];
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
    } catch {
      continue;
    }
    // pid (comm) state ppid pgrp ...   comm may contain spaces/parens
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const state = rest[0];
    const pgrp = Number(rest[2]);
    if (pgrp === pgid && state !== 'Z' && state !== 'X') out.push(Number(e));
  }
  return out;
}

/** Waits up to ms for the group to be empty; returns true if members remain. */
async function groupAlive(pgid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (groupMembers(pgid).length === 0) return false;
    if (Date.now() >= deadline) return true;
    await sleep(20);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------
// logs

export async function readIfExists(file: string): Promise<string> {
  try {
    return await fsp.readFile(file, 'utf8');
  } catch {
    return '';
  }
}

export function tailLines(text: string, n = 40): string {
  const lines = text.replace(/\n+$/, '').split('\n');
  return lines.slice(-n).join('\n');
}

/** "==> file <==" sections with the tails of the given files (for error messages). */
export async function describeFiles(files: string[], n = 40): Promise<string> {
  const parts: string[] = [];
  for (const f of files) {
    const text = await readIfExists(f);
    parts.push(`==> ${f} <==\n${text ? tailLines(text, n) : '(empty or missing)'}`);
  }
  return parts.join('\n');
}

/** Runs a short command and returns its combined output (never rejects; for diagnostics). */
export function commandOutput(cmd: string, args: string[], timeoutMs = 5000): Promise<string> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      const out = `${stdout}${stderr}`.trim();
      resolve(err ? `${out}${out ? '\n' : ''}(${cmd} ${args.join(' ')}: ${err.message.split('\n')[0]})` : out || '(no output)');
    });
  });
}

// ---------------------------------------------------------------------------
// readiness

export interface ProbeOptions {
  port?: number;
  host?: string;
  /** unix socket path instead of host/port */
  path?: string;
  /** written right after connecting (e.g. an HTTP request) */
  request?: string;
  /** what the server must answer (greeting) */
  expect: RegExp;
  /** written after a successful match, before closing (e.g. "QUIT\r\n") */
  bye?: string;
  /**
   * Every TCP port the server binds. If the server exits early and one of them
   * is taken, the error says "Address already in use" (Postfix's master, for
   * one, only reports that to syslog), so retryOnAddrInUse() can retry.
   */
  ports?: number[];
}

function probeOnce(o: ProbeOptions, timeoutMs: number): Promise<{ ok: boolean; received: string; error?: string }> {
  return new Promise((resolve) => {
    let received = '';
    let done = false;
    const sock = o.path !== undefined ? net.connect({ path: o.path }) : net.connect({ port: o.port ?? 0, host: o.host ?? HOST });
    const finish = (ok: boolean, error?: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (ok && o.bye) {
        sock.end(o.bye);
        setTimeout(() => sock.destroy(), 200).unref();
      } else {
        sock.destroy();
      }
      resolve({ ok, received, ...(error !== undefined ? { error } : {}) });
    };
    const timer = setTimeout(() => finish(false, 'probe timeout'), timeoutMs);
    sock.on('connect', () => {
      if (o.request) sock.write(o.request);
    });
    sock.on('data', (d: Buffer) => {
      received += d.toString('latin1');
      if (o.expect.test(received)) finish(true);
    });
    sock.on('error', (e) => finish(false, e.message));
    sock.on('close', () => finish(false, 'connection closed'));
  });
}

/**
 * Polls until the server answers with the expected greeting. Rejects early if
 * any of the processes exits, and after timeoutMs; the error includes describe().
 */
export async function waitUntilReady(
  what: string,
  procs: ManagedProcess[],
  probe: ProbeOptions,
  describe: () => Promise<string>,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    for (const p of procs) {
      const info = p.exitInfo();
      if (info) {
        const why = info.error ? `failed to start: ${info.error.message}` : `exited (code ${info.code}, signal ${info.signal})`;
        const taken: number[] = [];
        for (const port of probe.ports ?? (probe.port !== undefined ? [probe.port] : [])) {
          if (!(await tryBind(port))) taken.push(port);
        }
        const inUse = taken.length ? ` (${taken.map((x) => `${HOST}:${x}`).join(', ')}: Address already in use)` : '';
        throw new Error(`${what}: ${p.name} ${why} before it became ready${inUse}\n${await describe()}`);
      }
    }
    const r = await probeOnce(probe, Math.max(100, Math.min(2000, deadline - Date.now())));
    if (r.ok) return;
    last = r.error ? `${r.error}${r.received ? `; received ${JSON.stringify(r.received.slice(0, 200))}` : ''}` : JSON.stringify(r.received);
    if (Date.now() >= deadline) {
      const where = probe.path ?? `${probe.host ?? HOST}:${probe.port}`;
      throw new Error(`${what}: not ready on ${where} after ${timeoutMs} ms (last probe: ${last})\n${await describe()}`);
    }
    await sleep(20);
  }
}

export function isAddrInUse(err: unknown): boolean {
  return /address already in use|EADDRINUSE/i.test(String(err instanceof Error ? err.message : err));
}

/** Runs start() up to `attempts` times while it fails with "address already in use". */
export async function retryOnAddrInUse<T>(start: () => Promise<T>, attempts = 3): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await start();
    } catch (e) {
      if (i >= attempts || !isAddrInUse(e)) throw e;
    }
  }
}
