/**
 * Prometheus metrics in the text exposition format (version 0.0.4) over
 * HTTP on a local address. Every value is read at scrape time from the
 * registry, the counters in stats.ts and the certificate store; nothing is
 * instrumented per byte. Written by hand: a dozen families derived at scrape
 * time need no client library (see README.md).
 */
import { createServer, type Server, type ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { HostPort } from '../net/address.ts';
import { closeServer, listenOn } from '../net/bind.ts';
import type { SessionStateName } from './protocol.ts';
import { LATENCY_BUCKETS, type GatewayStats } from './stats.ts';
import type { ControlTarget } from './target.ts';
import { VERSION } from './version.ts';

const LIVE_STATES: readonly SessionStateName[] = ['handshake', 'preauth', 'starttls', 'authenticating', 'relaying', 'closing'];

export interface MetricsExtras {
  controlClients(): number;
  controlDropped(): number;
}

type Labels = Record<string, string>;

/** Builds one exposition: families in a fixed order, HELP and TYPE once each. */
class Exposition {
  private readonly out: string[] = [];

  family(name: string, type: 'counter' | 'gauge' | 'histogram', help: string): this {
    this.out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    return this;
  }

  sample(name: string, labels: Labels, value: number): this {
    const keys = Object.keys(labels);
    const l = keys.length ? `{${keys.map((k) => `${k}="${escapeLabel(labels[k]!)}"`).join(',')}}` : '';
    this.out.push(`${name}${l} ${formatValue(value)}`);
    return this;
  }

  text(): string {
    return `${this.out.join('\n')}\n`;
  }
}

export function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

export function renderMetrics(target: ControlTarget, stats: GatewayStats, extras: MetricsExtras, now = Date.now()): string {
  const config = target.currentConfig;
  const configured = config.listeners.map((l) => l.name);
  const names = stats.listenerNames(configured);
  const bound = target.addresses();
  const e = new Exposition();

  e.family('mailgate_info', 'gauge', 'Version of the running mailgate.').sample('mailgate_info', { version: VERSION }, 1);
  e.family('mailgate_start_time_seconds', 'gauge', 'When the daemon started (Unix time).').sample('mailgate_start_time_seconds', {}, target.startedAt / 1000);

  e.family('mailgate_listener_up', 'gauge', 'Whether a configured listener is bound (1) or not (0).');
  for (const name of configured) e.sample('mailgate_listener_up', { listener: name }, (bound[name]?.length ?? 0) > 0 ? 1 : 0);

  const byState = new Map<string, number>();
  for (const r of target.registry.list()) {
    const k = `${r.listener}\u0000${r.state}`;
    byState.set(k, (byState.get(k) ?? 0) + 1);
  }
  e.family('mailgate_sessions', 'gauge', 'Live sessions by listener and state.');
  for (const name of names) {
    for (const state of LIVE_STATES) e.sample('mailgate_sessions', { listener: name, state }, byState.get(`${name}\u0000${state}`) ?? 0);
  }

  e.family('mailgate_sessions_accepted_total', 'counter', 'Connections accepted and registered as sessions.');
  for (const name of names) e.sample('mailgate_sessions_accepted_total', { listener: name }, stats.for(name).accepted);

  e.family('mailgate_auth_total', 'counter', 'Logins by result (ok: the backend or local auth accepted; fail: rejected).');
  for (const name of names) {
    const t = stats.for(name);
    e.sample('mailgate_auth_total', { listener: name, result: 'ok' }, t.authOk);
    e.sample('mailgate_auth_total', { listener: name, result: 'fail' }, t.authFail);
  }

  e.family('mailgate_refused_total', 'counter', 'Connections and logins refused by policy or limits, by reason.');
  for (const name of names) for (const [reason, n] of stats.for(name).refusedByReason) e.sample('mailgate_refused_total', { listener: name, reason }, n);

  e.family('mailgate_sessions_closed_total', 'counter', 'Sessions ended, by close reason.');
  for (const name of names) for (const [reason, n] of stats.for(name).closedByReason) e.sample('mailgate_sessions_closed_total', { listener: name, reason }, n);

  e.family('mailgate_tls_handshake_errors_total', 'counter', 'TLS handshakes that failed or timed out.');
  for (const name of names) {
    const closed = stats.for(name).closedByReason;
    e.sample('mailgate_tls_handshake_errors_total', { listener: name, kind: 'failed' }, closed.get('tls-handshake-failed') ?? 0);
    e.sample('mailgate_tls_handshake_errors_total', { listener: name, kind: 'timeout' }, closed.get('tls-handshake-timeout') ?? 0);
  }

  e.family('mailgate_bytes_total', 'counter', 'Bytes relayed, by direction (in: from clients, out: to clients); live sessions included.');
  const counters = stats.counters(configured);
  for (const c of counters) {
    e.sample('mailgate_bytes_total', { listener: c.listener, direction: 'in' }, c.bytesIn);
    e.sample('mailgate_bytes_total', { listener: c.listener, direction: 'out' }, c.bytesOut);
  }

  e.family('mailgate_backend_connect_seconds', 'histogram', 'Time to open the backend connection for a login.');
  for (const name of names) {
    const h = stats.for(name).backendConnect;
    const cumulative = h.cumulative();
    LATENCY_BUCKETS.forEach((le, i) => e.sample('mailgate_backend_connect_seconds_bucket', { listener: name, le: String(le) }, cumulative[i]!));
    e.sample('mailgate_backend_connect_seconds_bucket', { listener: name, le: '+Inf' }, h.count);
    e.sample('mailgate_backend_connect_seconds_sum', { listener: name }, h.sum);
    e.sample('mailgate_backend_connect_seconds_count', { listener: name }, h.count);
  }

  e.family('mailgate_backend_up', 'gauge', "Outcome of the listener's last backend connection (1 ok, 0 failed); absent until one was made.");
  for (const name of names) {
    const health = stats.for(name).backendHealth;
    if (health) e.sample('mailgate_backend_up', { listener: name }, health.ok ? 1 : 0);
  }

  e.family('mailgate_certificate_expiry_timestamp_seconds', 'gauge', 'notAfter of each served certificate (Unix time).');
  for (const c of target.certificates.list()) {
    e.sample('mailgate_certificate_expiry_timestamp_seconds', { name: c.names[0] ?? '', names: c.names.join(','), source: c.source }, Math.floor(c.notAfter.getTime() / 1000));
  }

  const bans = target.bans;
  if (bans) e.family('mailgate_bans', 'gauge', 'Addresses banned now.').sample('mailgate_bans', {}, bans.list().filter((b) => b.expiresAt === null || b.expiresAt > now).length);

  const workers = target.workers?.();
  if (workers) {
    e.family('mailgate_workers', 'gauge', 'Worker processes by state.');
    for (const state of ['starting', 'ready', 'stopping', 'dead'] as const) e.sample('mailgate_workers', { state }, workers.filter((w) => w.state === state).length);
    e.family('mailgate_worker_restarts_total', 'counter', 'Times a worker was started again after its process died.');
    for (const w of workers) e.sample('mailgate_worker_restarts_total', { worker: String(w.index) }, w.restarts);
  }

  e.family('mailgate_reloads_total', 'counter', 'Configuration reloads by result.');
  e.sample('mailgate_reloads_total', { result: 'ok' }, stats.reloads.ok);
  e.sample('mailgate_reloads_total', { result: 'failed' }, stats.reloads.failed);

  e.family('mailgate_control_clients', 'gauge', 'Clients connected to the control socket.').sample('mailgate_control_clients', {}, extras.controlClients());
  e.family('mailgate_control_clients_dropped_total', 'counter', 'Control clients dropped for not reading their output.').sample('mailgate_control_clients_dropped_total', {}, extras.controlDropped());
  return e.text();
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
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', 'cache-control': 'no-store' });
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
