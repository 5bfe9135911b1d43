/**
 * Active health checks of pool members: connect (with the listener's PROXY
 * header, if it sends one), then the protocol's greeting (`* OK`, `+OK`,
 * `220`) within backend_connect; then a polite goodbye. One checker per
 * gateway, in the runtime (src/main.ts): the workers get its results as
 * data (src/cluster/pool.ts) and report passive failures back, which makes
 * the checker look again at once. Results are keyed by protocol, address and
 * PROXY version, so two listeners sharing a pool share its checks.
 */
import type { Config, Listener } from '../config/load.ts';
import { DEFAULT_HEALTH_INTERVAL } from '../config/schema.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';
import { connectBackend } from './connector.ts';
import { SocketLink } from './link.ts';

export type MailProtocol = 'imap' | 'pop3' | 'smtp';

export interface CheckTarget {
  protocol: MailProtocol;
  backend: HostPort;
  proxyProtocol: false | 'v1' | 'v2';
  intervalMs: number;
  timeoutMs: number;
}

/** One member's last active check. */
export interface HealthState {
  up: boolean;
  /** When the check that decided `up` ended (ms since epoch). */
  checkedAt: number;
  /** When `up` last changed. */
  since: number;
  latencyMs: number | null;
  error: string | null;
}

/** Results by targetKey(). A member without one (not checked yet) counts as up. */
export type HealthSnapshot = Record<string, HealthState>;

export function targetKey(protocol: string, backend: HostPort, proxyProtocol: false | 'v1' | 'v2'): string {
  return `${protocol}|${formatHostPort(backend)}|${proxyProtocol || 'none'}`;
}

const GREETING: Record<MailProtocol, RegExp> = { imap: /^\* OK\b/i, pop3: /^\+OK\b/, smtp: /^220[ -]/ };
const GOODBYE: Record<MailProtocol, string> = { imap: 'h LOGOUT\r\n', pop3: 'QUIT\r\n', smtp: 'QUIT\r\n' };
/** A passive failure makes the checker look again, but not more often than this. */
const RECHECK_MIN_MS = 250;

/** A mail listener's pool members: its own backend list, and the list routes that apply to it (once each). */
export function poolMembers(config: Config, l: Listener): HostPort[] {
  if (l.protocol === 'http') return [];
  const out = new Map<string, HostPort>();
  for (const b of l.pool ?? []) out.set(formatHostPort(b), b);
  for (const r of config.routes) {
    if (!Array.isArray(r.backend) || r.backend.length < 2) continue;
    if (r.listeners && !r.listeners.includes(l.name)) continue;
    if (r.protocols && !(r.protocols as readonly string[]).includes(l.protocol)) continue;
    for (const b of r.backend) out.set(formatHostPort(b), b);
  }
  return [...out.values()];
}

/** Every pool member of a config, as the checker watches it: per mail listener, with its interval, PROXY header and timeout. */
export function healthTargets(config: Config): CheckTarget[] {
  const out: CheckTarget[] = [];
  for (const l of config.listeners) {
    if (l.protocol === 'http') continue;
    const intervalMs = l.health_check?.interval ?? DEFAULT_HEALTH_INTERVAL;
    for (const backend of poolMembers(config, l)) out.push({ protocol: l.protocol, backend, proxyProtocol: l.proxy_protocol, intervalMs, timeoutMs: l.timeouts.backend_connect });
  }
  return out;
}

interface Watched {
  target: CheckTarget;
  timer: NodeJS.Timeout | undefined;
  running: Promise<void> | undefined;
  lastStarted: number;
}

export class HealthChecker {
  private readonly log: Logger;
  private readonly watched = new Map<string, Watched>();
  private readonly states = new Map<string, HealthState>();
  private readonly listeners = new Set<(snapshot: HealthSnapshot) => void>();
  private stopped = false;

  constructor(log: Logger) {
    this.log = log.child({ part: 'health' });
  }

  /** The members to watch (a reload's new list): new ones are checked at once, gone ones forgotten. */
  setTargets(targets: readonly CheckTarget[]): void {
    const wanted = new Map<string, CheckTarget>();
    for (const t of targets) {
      const key = targetKey(t.protocol, t.backend, t.proxyProtocol);
      const seen = wanted.get(key);
      // Two listeners sharing a member: the shorter interval and deadline win.
      wanted.set(key, seen ? { ...t, intervalMs: Math.min(seen.intervalMs, t.intervalMs), timeoutMs: Math.min(seen.timeoutMs, t.timeoutMs) } : t);
    }
    for (const [key, w] of this.watched) {
      if (wanted.has(key)) continue;
      clearTimeout(w.timer);
      this.watched.delete(key);
      this.states.delete(key);
    }
    for (const [key, target] of wanted) {
      const w = this.watched.get(key);
      if (w) {
        w.target = target;
        continue;
      }
      const fresh: Watched = { target, timer: undefined, running: undefined, lastStarted: 0 };
      this.watched.set(key, fresh);
      this.run(key, fresh);
    }
  }

  /** A session could not connect to this member: look again now (the result reaches everyone). */
  recheck(key: string): void {
    const w = this.watched.get(key);
    if (!w || w.running || Date.now() - w.lastStarted < RECHECK_MIN_MS) return;
    clearTimeout(w.timer);
    this.run(key, w);
  }

  snapshot(): HealthSnapshot {
    return Object.fromEntries(this.states);
  }

  get(key: string): HealthState | undefined {
    return this.states.get(key);
  }

  /** Called with the whole snapshot whenever a member goes up or down. */
  onChange(listener: (snapshot: HealthSnapshot) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Waits for the checks in flight (tests). */
  async settled(): Promise<void> {
    await Promise.all([...this.watched.values()].map((w) => w.running));
  }

  stop(): void {
    this.stopped = true;
    for (const w of this.watched.values()) clearTimeout(w.timer);
    this.watched.clear();
  }

  private run(key: string, w: Watched): void {
    if (this.stopped) return;
    w.lastStarted = Date.now();
    w.running = this.check(w.target).then((result) => {
      w.running = undefined;
      if (this.stopped || this.watched.get(key) !== w) return;
      this.record(key, w.target, result);
      w.timer = setTimeout(() => this.run(key, w), w.target.intervalMs);
      w.timer.unref();
    });
  }

  private record(key: string, t: CheckTarget, r: { ok: boolean; latencyMs: number | null; error: string | null }): void {
    const now = Date.now();
    const before = this.states.get(key);
    const changed = before === undefined ? !r.ok : before.up !== r.ok;
    this.states.set(key, { up: r.ok, checkedAt: now, since: before && before.up === r.ok ? before.since : now, latencyMs: r.latencyMs, error: r.error });
    if (changed || before === undefined) {
      const fields = { backend: formatHostPort(t.backend), protocol: t.protocol, err: r.error ?? undefined };
      if (r.ok) this.log.info(fields, before === undefined ? 'pool member up' : 'pool member up again');
      else this.log.warn(fields, 'pool member down: new sessions go to the others');
    }
    // Every result goes out (not only changes): a worker's passive mark ends with a newer check that says up.
    const snapshot = this.snapshot();
    for (const l of this.listeners) l(snapshot);
  }

  /** Connect, greeting, goodbye. Never throws. */
  private async check(t: CheckTarget): Promise<{ ok: boolean; latencyMs: number | null; error: string | null }> {
    const started = performance.now();
    let link: SocketLink | undefined;
    try {
      const socket = await connectBackend(t.backend, { timeoutMs: t.timeoutMs, proxyProtocol: t.proxyProtocol });
      link = new SocketLink(socket, { maxLine: 4096, timeoutMs: t.timeoutMs });
      const greeting = await link.readLine();
      if (!GREETING[t.protocol].test(greeting)) return { ok: false, latencyMs: null, error: `unexpected greeting: ${greeting.slice(0, 80).replace(/[^\x20-\x7e]/g, '?')}` };
      // The goodbye goes out before the close (a backend then logs a clean logout, not a lost connection).
      const { socket: done } = link.release();
      link = undefined;
      done.end(GOODBYE[t.protocol]);
      setTimeout(() => done.destroy(), 1000).unref();
      return { ok: true, latencyMs: Math.round((performance.now() - started) * 10) / 10, error: null };
    } catch (err) {
      return { ok: false, latencyMs: null, error: errorMessage(err) };
    } finally {
      link?.destroy();
    }
  }
}
