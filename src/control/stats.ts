/**
 * Counters since start, per listener, fed by the session registry's events:
 * what the control socket sends with every event batch and what the metrics
 * endpoint exposes. Live values (sessions now, bytes of live sessions) are
 * read from the registry when asked, never tracked per byte.
 */
import { Histogram } from 'prom-client';
import type { SessionRegistry } from '../session/registry.ts';
import type { BackendHealth, ListenerCounters, ReloadOutcome } from './protocol.ts';

/** Upper bounds (seconds) of the backend connect latency histogram. */
export const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export interface ListenerTotals {
  accepted: number;
  authOk: number;
  authFail: number;
  /** By code (a policy verdict's, or max_connections), never by the text the client saw. */
  refusedByReason: Map<string, number>;
  closedByReason: Map<string, number>;
  /** Bytes of sessions that have ended (live ones are added from the registry). */
  closedBytesIn: number;
  closedBytesOut: number;
  backendHealth: BackendHealth | null;
}

/** Close reasons that mean the backend is down (unreachable, too slow, broken). */
const BACKEND_FAILURES = new Set(['backend-unavailable', 'backend-timeout', 'backend-error']);

/** Close reasons that mean the backend answers but is not configured for what the listener asks, and what to do. */
export const BACKEND_MISCONFIGURED: ReadonlyMap<string, string> = new Map([
  ['backend-no-auth', 'backend offers no AUTH; use authentication: local, or enable AUTH on the backend'],
]);

export class GatewayStats {
  /** Backend connect latency per listener, observed as connections are made (exposed by metrics.ts). */
  readonly backendConnectSeconds = new Histogram({
    name: 'mailgate_backend_connect_seconds',
    help: 'Time to open the backend connection for a login.',
    labelNames: ['listener'],
    buckets: LATENCY_BUCKETS,
    registers: [],
  });
  private readonly registry: SessionRegistry;
  private readonly totals = new Map<string, ListenerTotals>();
  private readonly unsubscribe: (() => void)[];
  reloads = { ok: 0, failed: 0 };

  constructor(registry: SessionRegistry, onReload?: (listener: (r: ReloadOutcome) => void) => () => void) {
    this.registry = registry;
    this.unsubscribe = [
      onReload?.((r) => {
        if (r.ok) this.reloads.ok++;
        else this.reloads.failed++;
      }) ?? (() => undefined),
      registry.on('opened', (r) => {
        this.for(r.listener).accepted++;
      }),
      registry.on('authenticated', (r) => {
        this.for(r.listener).authOk++;
      }),
      registry.on('authFailed', (e) => {
        this.for(e.listener).authFail++;
      }),
      registry.on('refused', (e) => {
        bump(this.for(e.listener).refusedByReason, e.code);
      }),
      registry.on('backendConnected', (e) => {
        const t = this.for(e.listener);
        this.backendConnectSeconds.observe({ listener: e.listener }, e.ms / 1000);
        t.backendHealth = { ok: true, at: e.at, latencyMs: Math.round(e.ms * 10) / 10, error: null, state: 'ok', detail: null };
      }),
      registry.on('closed', (r) => {
        const t = this.for(r.listener);
        const reason = r.closeReason ?? 'unknown';
        bump(t.closedByReason, reason);
        t.closedBytesIn += r.bytesIn;
        t.closedBytesOut += r.bytesOut;
        if (BACKEND_FAILURES.has(reason)) t.backendHealth = { ok: false, at: Date.now(), latencyMs: null, error: reason, state: 'down', detail: null };
        const misconfigured = BACKEND_MISCONFIGURED.get(reason);
        // The connection itself worked (its latency stays): the login cannot, whatever the client sends.
        if (misconfigured !== undefined) t.backendHealth = { ok: false, at: Date.now(), latencyMs: t.backendHealth?.latencyMs ?? null, error: reason, state: 'misconfigured', detail: misconfigured };
      }),
    ];
  }

  for(listener: string): ListenerTotals {
    let t = this.totals.get(listener);
    if (!t) {
      t = {
        accepted: 0,
        authOk: 0,
        authFail: 0,
        refusedByReason: new Map(),
        closedByReason: new Map(),
        closedBytesIn: 0,
        closedBytesOut: 0,
        backendHealth: null,
      };
      this.totals.set(listener, t);
      // Every listener with counters has its (empty) histogram too.
      this.backendConnectSeconds.zero({ listener });
    }
    return t;
  }

  /** Every listener with counters: the given ones first (in their order), then any others seen since start. */
  listenerNames(configured: readonly string[]): string[] {
    const names = [...configured];
    for (const n of this.totals.keys()) if (!names.includes(n)) names.push(n);
    return names;
  }

  /** Absolute counters, with live sessions and their bytes read from the registry now. */
  counters(configured: readonly string[]): ListenerCounters[] {
    const live = new Map<string, { sessions: number; bytesIn: number; bytesOut: number }>();
    for (const r of this.registry.list()) {
      const l = live.get(r.listener) ?? { sessions: 0, bytesIn: 0, bytesOut: 0 };
      l.sessions++;
      l.bytesIn += r.bytesIn;
      l.bytesOut += r.bytesOut;
      live.set(r.listener, l);
    }
    return this.listenerNames(configured).map((name) => {
      const t = this.for(name);
      const l = live.get(name);
      return {
        listener: name,
        sessions: l?.sessions ?? 0,
        accepted: t.accepted,
        authOk: t.authOk,
        authFail: t.authFail,
        refused: sum(t.refusedByReason),
        bytesIn: t.closedBytesIn + (l?.bytesIn ?? 0),
        bytesOut: t.closedBytesOut + (l?.bytesOut ?? 0),
      };
    });
  }

  close(): void {
    for (const u of this.unsubscribe) u();
    this.unsubscribe.length = 0;
  }
}

function bump(m: Map<string, number>, key: string): void {
  m.set(key, (m.get(key) ?? 0) + 1);
}

function sum(m: Map<string, number>): number {
  let n = 0;
  for (const v of m.values()) n += v;
  return n;
}
