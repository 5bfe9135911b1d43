/**
 * Prometheus metrics (text format 0.0.4) over HTTP on a local address,
 * through prom-client. Values are read when scraped from what the runtime
 * holds: the session registry (live sessions by state, live bytes), the
 * counters in stats.ts, the certificate store, the bans and the workers; the
 * backend connect histogram is observed as connections are made (stats.ts).
 * With workers the runtime's registry mirrors every worker's sessions
 * (src/cluster/registry-link.ts), so the primary's metrics are the whole
 * gateway's, and its counters stay monotonic when a worker is replaced;
 * prom-client's cluster aggregation (the sum of each worker's own registry)
 * is not used: README.md ("Metrics") says why.
 */
import { createServer, type Server, type ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { Counter, Gauge, Registry } from 'prom-client';
import { poolStatus } from './pools.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { HostPort } from '../net/address.ts';
import { closeServer, listenOn } from '../net/bind.ts';
import type { SessionStateName } from './protocol.ts';
import type { GatewayStats } from './stats.ts';
import type { ControlTarget } from './target.ts';
import { VERSION } from './version.ts';

const LIVE_STATES: readonly SessionStateName[] = ['handshake', 'preauth', 'starttls', 'authenticating', 'relaying', 'closing'];
const WORKER_STATES = ['starting', 'ready', 'stopping', 'dead'] as const;

export interface MetricsExtras {
  controlClients(): number;
  controlDropped(): number;
}

type Labels = Record<string, string>;

/** The gateway's metric families, in a fixed order, each read from the runtime when scraped. */
export class GatewayMetrics {
  readonly registry = new Registry();
  private readonly target: ControlTarget;
  private readonly stats: GatewayStats;

  constructor(target: ControlTarget, stats: GatewayStats, extras: MetricsExtras) {
    this.target = target;
    this.stats = stats;
    const configured = () => target.currentConfig.listeners.map((l) => l.name);
    const names = () => stats.listenerNames(configured());

    this.gauge('mailgate_info', 'Version of the running mailgate.', ['version'], (set) => set({ version: VERSION }, 1));
    this.gauge('mailgate_start_time_seconds', 'When the daemon started (Unix time).', [], (set) => set({}, target.startedAt / 1000));
    this.gauge('mailgate_listener_up', 'Whether a configured listener is bound (1) or not (0).', ['listener'], (set) => {
      const bound = target.addresses();
      for (const name of configured()) set({ listener: name }, (bound[name]?.length ?? 0) > 0 ? 1 : 0);
    });
    this.gauge('mailgate_sessions', 'Live sessions by listener and state.', ['listener', 'state'], (set) => {
      const byState = new Map<string, number>();
      for (const r of target.registry.list()) {
        const k = `${r.listener}\u0000${r.state}`;
        byState.set(k, (byState.get(k) ?? 0) + 1);
      }
      for (const name of names()) for (const state of LIVE_STATES) set({ listener: name, state }, byState.get(`${name}\u0000${state}`) ?? 0);
    });
    this.counter('mailgate_sessions_accepted_total', 'Connections accepted and registered as sessions.', ['listener'], (add) => {
      for (const name of names()) add({ listener: name }, stats.for(name).accepted);
    });
    this.counter('mailgate_auth_total', 'Logins by result (ok: the backend or local auth accepted; fail: rejected).', ['listener', 'result'], (add) => {
      for (const name of names()) {
        const t = stats.for(name);
        add({ listener: name, result: 'ok' }, t.authOk);
        add({ listener: name, result: 'fail' }, t.authFail);
      }
    });
    this.counter('mailgate_refused_total', 'Connections and logins refused by policy or limits, by reason (a code).', ['listener', 'reason'], (add) => {
      for (const name of names()) for (const [reason, n] of stats.for(name).refusedByReason) add({ listener: name, reason }, n);
    });
    this.counter('mailgate_sessions_closed_total', 'Sessions ended, by close reason.', ['listener', 'reason'], (add) => {
      for (const name of names()) for (const [reason, n] of stats.for(name).closedByReason) add({ listener: name, reason }, n);
    });
    this.counter('mailgate_tls_handshake_errors_total', 'TLS handshakes that failed or timed out.', ['listener', 'kind'], (add) => {
      for (const name of names()) {
        const closed = stats.for(name).closedByReason;
        add({ listener: name, kind: 'failed' }, closed.get('tls-handshake-failed') ?? 0);
        add({ listener: name, kind: 'timeout' }, closed.get('tls-handshake-timeout') ?? 0);
      }
    });
    this.counter('mailgate_bytes_total', 'Bytes relayed, by direction (in: from clients, out: to clients); live sessions included.', ['listener', 'direction'], (add) => {
      for (const c of stats.counters(configured())) {
        add({ listener: c.listener, direction: 'in' }, c.bytesIn);
        add({ listener: c.listener, direction: 'out' }, c.bytesOut);
      }
    });
    this.registry.registerMetric(stats.backendConnectSeconds);
    this.gauge('mailgate_backend_up', "Outcome of the listener's last backend connection (1 the backend answered, 0 it is down); absent until one was made.", ['listener'], (set) => {
      for (const name of names()) {
        const health = stats.for(name).backendHealth;
        if (health) set({ listener: name }, health.ok || health.state === 'misconfigured' ? 1 : 0);
      }
    });
    this.gauge(
      'mailgate_backend_misconfigured',
      "1 when the listener's last backend login failed on a configuration error (a passthrough listener whose backend offers no AUTH), else 0; absent until a backend connection was made.",
      ['listener'],
      (set) => {
        for (const name of names()) {
          const health = stats.for(name).backendHealth;
          if (health) set({ listener: name }, health.state === 'misconfigured' ? 1 : 0);
        }
      },
    );
    const pools = () => poolStatus(target.currentConfig, target.health, target.registry.list());
    this.gauge('mailgate_pool_member_up', 'Backend pool members by the last active check (1 up, 0 down).', ['listener', 'backend'], (set) => {
      for (const [listener, members] of pools()) for (const m of members) set({ listener, backend: m.backend }, m.up ? 1 : 0);
    });
    this.gauge('mailgate_pool_member_sessions', "Live sessions on each backend pool member, per listener.", ['listener', 'backend'], (set) => {
      for (const [listener, members] of pools()) for (const m of members) set({ listener, backend: m.backend }, m.sessions);
    });
    this.gauge('mailgate_certificate_expiry_timestamp_seconds', 'notAfter of each served certificate (Unix time).', ['name', 'names', 'source'], (set) => {
      for (const c of target.certificates.list()) set({ name: c.names[0] ?? '', names: c.names.join(','), source: c.source }, Math.floor(c.notAfter.getTime() / 1000));
    });
    if (target.bans) {
      const bans = target.bans;
      this.gauge('mailgate_bans', 'Bans in force now (addresses, ranges, users, users from an address).', [], (set) => {
        const now = Date.now();
        set({}, bans.list().filter((b) => b.expiresAt === null || b.expiresAt > now).length);
      });
    }
    if (target.workers) {
      const workers = target.workers.bind(target);
      this.gauge('mailgate_workers', 'Worker processes by state.', ['state'], (set) => {
        const all = workers();
        for (const state of WORKER_STATES) set({ state }, all.filter((w) => w.state === state).length);
      });
      this.counter('mailgate_worker_restarts_total', 'Times a worker was started again after its process died.', ['worker'], (add) => {
        for (const w of workers()) add({ worker: String(w.index) }, w.restarts);
      });
    }
    if (target.tlsReports) {
      const reports = target.tlsReports;
      this.counter('mailgate_tlsrpt_reports_total', 'TLS reports (RFC 8460) posted to the gateway, by result (accepted, refused).', ['result'], (add) => {
        const t = reports.totals();
        add({ result: 'accepted' }, t.reports.accepted);
        add({ result: 'refused' }, t.reports.refused);
      });
      this.counter('mailgate_tlsrpt_sessions_total', 'Sessions the reporting MTAs counted, by policy domain (ours, or "other") and result.', ['domain', 'result'], (add) => {
        for (const d of reports.totals().domains) {
          add({ domain: d.domain, result: 'success' }, d.success);
          add({ domain: d.domain, result: 'failure' }, d.failure);
        }
      });
      this.counter('mailgate_tlsrpt_failures_total', 'Failed sessions in TLS reports, by policy domain and result type (RFC 8460 registry, or "other").', ['domain', 'type'], (add) => {
        for (const d of reports.totals().domains) for (const [type, n] of Object.entries(d.failures)) add({ domain: d.domain, type }, n);
      });
    }
    this.counter('mailgate_reloads_total', 'Configuration reloads by result.', ['result'], (add) => {
      add({ result: 'ok' }, stats.reloads.ok);
      add({ result: 'failed' }, stats.reloads.failed);
    });
    this.gauge('mailgate_control_clients', 'Clients connected to the control socket.', [], (set) => set({}, extras.controlClients()));
    this.counter('mailgate_control_clients_dropped_total', 'Control clients dropped for not reading their output.', [], (add) => add({}, extras.controlDropped()));
  }

  /** One exposition; a cluster primary's mirrored sessions are brought up to date first (live byte counts). */
  async text(): Promise<string> {
    await this.target.refresh?.();
    // Every listener has its counters, and so its backend connect histogram, before anything is read.
    for (const name of this.stats.listenerNames(this.target.currentConfig.listeners.map((l) => l.name))) this.stats.for(name);
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** A gauge whose values are set from the runtime at each scrape. */
  private gauge(name: string, help: string, labelNames: string[], read: Reader): void {
    new Gauge({ name, help, labelNames, registers: [this.registry], collect: readEachScrape(read, (m, labels, v) => (m as Gauge).set(labels, v)) });
  }

  /** A counter whose (absolute, monotonic) values are read from the runtime's counters at each scrape. */
  private counter(name: string, help: string, labelNames: string[], read: Reader): void {
    new Counter({ name, help, labelNames, registers: [this.registry], collect: readEachScrape(read, (m, labels, v) => (m as Counter).inc(labels, v)) });
  }
}

type Reader = (put: (labels: Labels, value: number) => void) => void;

/** A collect() hook: the metric forgets its values and takes what `read` says now. */
function readEachScrape(read: Reader, put: (metric: Gauge | Counter, labels: Labels, value: number) => void) {
  return function (this: Gauge | Counter): void {
    this.reset();
    read((labels, value) => put(this, labels, value));
  };
}

export class MetricsServer {
  private readonly server: Server;
  readonly address: string;
  private closed = false;

  private constructor(server: Server, address: string) {
    this.server = server;
    this.address = address;
  }

  static async start(listen: HostPort, render: () => string | Promise<string>, log: Logger): Promise<MetricsServer> {
    const fail = (res: ServerResponse, err: unknown) => {
      log.error({ err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'metrics rendering failed');
      res.writeHead(500, { 'content-type': 'text/plain' }).end('metrics rendering failed\n');
    };
    const server = createServer((req, res) => {
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD' }).end();
        return;
      }
      const path = (req.url ?? '/').split('?')[0];
      if (path !== '/metrics' && path !== '/') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found; metrics are at /metrics\n');
        return;
      }
      const answer = (body: string) => {
        res.writeHead(200, { 'content-type': Registry.PROMETHEUS_CONTENT_TYPE, 'cache-control': 'no-store' });
        res.end(req.method === 'HEAD' ? undefined : body);
      };
      let body: string | Promise<string>;
      try {
        body = render();
      } catch (err) {
        fail(res, err);
        return;
      }
      if (typeof body === 'string') answer(body);
      else body.then(answer, (err: unknown) => fail(res, err));
    });
    server.keepAliveTimeout = 5_000;
    server.headersTimeout = 10_000;
    server.requestTimeout = 10_000;
    const address = await listenOn(server, listen, 'metrics');
    if (!isLoopback(listen.host)) log.warn({ address }, 'metrics are served on a non-loopback address; restrict access with a firewall');
    log.info({ address }, 'metrics up');
    return new MetricsServer(server, address);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.server.closeAllConnections();
    await closeServer(this.server);
  }
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || (isIP(host) === 4 && host.startsWith('127.'));
}
