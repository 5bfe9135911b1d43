/**
 * The CLI verbs that talk to a running daemon through its control socket:
 * `status`, `reload` (`certs`: certs-verb.ts; `top`: src/tui/top.ts). Exit codes as in cli.ts: 0 ok, 1 the
 * daemon refused or cannot be reached, 2 usage or configuration error.
 */
import { loadConfigFile } from '../config/load.ts';
import { configProblem, parseCommandArgs, type CommandArgs, type Options } from '../core/cli-args.ts';
import { errorMessage } from '../core/errors.ts';
import { humanBytes, humanDuration } from '../core/human.ts';
import { ControlClient, ControlRequestError } from './client.ts';
import type { BackendHealth, CertStatus, StatusInfo } from './protocol.ts';
import { controlSocketPath } from './server.ts';

export interface VerbOptions {
  /** -c: the daemon's configuration (to find the socket). */
  config: string;
  /** -s: the socket itself, overriding the config. */
  socket?: string | undefined;
  json?: boolean | undefined;
}

type Target = { socket: string; configFile: string | null } | number;

/** The socket to use: -s, else control.socket from the config file; a number is the exit code after a reported problem. */
export function target(opts: VerbOptions): Target {
  if (opts.socket) return { socket: opts.socket, configFile: null };
  try {
    const config = loadConfigFile(opts.config);
    if (!config.control.enabled) {
      process.stderr.write(`mailgate: the control socket is disabled in ${config.file} (control.enabled: false)\n`);
      return 2;
    }
    return { socket: controlSocketPath(config), configFile: config.file };
  } catch (err) {
    return configProblem(err, '(use -s SOCKET to name the control socket directly)\n');
  }
}

/**
 * Connects to the daemon `opts` names, runs `body`, closes. A connection or
 * request that fails is reported and exits 1; `body` may catch the errors it
 * has something better to say about.
 */
export async function withClient(opts: VerbOptions, body: (c: ControlClient) => Promise<number>, connect: { requestTimeoutMs?: number } = {}): Promise<number> {
  const t = target(opts);
  if (typeof t === 'number') return t;
  let client: ControlClient;
  try {
    client = await ControlClient.connect(t.socket, connect);
  } catch (err) {
    process.stderr.write(`mailgate: ${errorMessage(err)}\n`);
    return 1;
  }
  try {
    return await body(client);
  } catch (err) {
    process.stderr.write(`mailgate: ${errorMessage(err)}\n`);
    return 1;
  } finally {
    client.close();
  }
}

/** The options every control verb takes: which daemon (-c, -s) and --json. */
const CONTROL_OPTIONS: Options = {
  config: { type: 'string', short: 'c' },
  socket: { type: 'string', short: 's' },
  json: { type: 'boolean' },
};

/** A control verb's arguments: the common options and its own (see parseCommandArgs). */
export function parseVerbArgs(verb: string, argv: string[], own: Options, usage: string, allowPositionals: boolean): CommandArgs | number {
  return parseCommandArgs(verb, argv, { ...CONTROL_OPTIONS, ...own }, usage, allowPositionals);
}

/** -c and -s of parsed verb arguments, with the default config file. */
export function verbTarget(args: CommandArgs): VerbOptions {
  return { config: args.string('config') ?? 'config/mailgate.yaml', socket: args.string('socket'), json: args.values.json === true };
}

export function statusVerb(opts: VerbOptions): Promise<number> {
  return withClient(opts, async (c) => {
    const s = await c.request('status', {});
    process.stdout.write(opts.json ? `${JSON.stringify(s, null, 2)}\n` : formatStatus(s));
    return 0;
  });
}

export function reloadVerb(opts: VerbOptions): Promise<number> {
  return withClient(opts, async (c) => {
    try {
      const r = await c.request('reload', {});
      if (opts.json) process.stdout.write(`${JSON.stringify(r)}\n`);
      else {
        const parts = [
          r.started.length ? `started ${r.started.join(', ')}` : '',
          r.stopped.length ? `stopped ${r.stopped.join(', ')}` : '',
          r.updated.length ? `updated ${r.updated.join(', ')}` : '',
        ].filter(Boolean);
        process.stdout.write(`reloaded${parts.length ? `: ${parts.join('; ')}` : ''}\n`);
      }
      return 0;
    } catch (err) {
      if (err instanceof ControlRequestError && err.code === 'FAILED') {
        process.stderr.write(`mailgate: reload refused, the daemon keeps its running configuration:\n${err.message}\n`);
        return 1;
      }
      throw err;
    }
  });
}

// ---- text output ---------------------------------------------------------------------

export function certState(c: CertStatus): string {
  if (c.daysLeft < 0) return 'EXPIRED';
  if (c.renewal?.failing) return `renewal failing: ${c.renewal.lastError ?? 'unknown error'}`;
  if (c.daysLeft < 14) return 'expires soon';
  if (c.source === 'self-signed') return 'self-signed (clients will warn)';
  return 'ok';
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n') + '\n';
}

export function formatCerts(certs: CertStatus[]): string {
  if (certs.length === 0) return 'no certificates loaded\n';
  const rows = [['NAMES', 'SOURCE', 'NOT AFTER', 'DAYS', 'STATUS']];
  for (const c of certs) {
    rows.push([c.names.join(','), c.source, new Date(c.notAfter).toISOString().replace('T', ' ').slice(0, 16) + 'Z', String(c.daysLeft), certState(c)]);
  }
  return table(rows);
}

/** A backend's health in words: ok with its latency, DOWN (an outage) with why, MISCONFIGURED (a configuration error) with what to do. */
export function backendState(h: BackendHealth): string {
  if (h.ok) return `ok ${h.latencyMs ?? '?'}ms`;
  if (h.state === 'misconfigured') return `MISCONFIGURED (${h.detail ?? h.error ?? 'configuration error'})`;
  return `DOWN (${h.error ?? 'error'})`;
}

export function formatStatus(s: StatusInfo): string {
  const out: string[] = [];
  out.push(`mailgate ${s.version}  pid ${s.pid}  up ${humanDuration(s.uptimeMs)}  config ${s.configFile}`);
  if (s.workers) out.push(`workers ${s.workers.length}: ${s.workers.map((w) => `${w.index} pid ${w.pid} ${w.state}${w.restarts > 0 ? ` (restarted ${w.restarts}×)` : ''}`).join(', ')}`);
  const counters = new Map(s.counters.map((c) => [c.listener, c]));
  const rows = [['LISTENER', 'PROTO', 'TLS', 'ADDRESSES', 'STATE', 'SESSIONS', 'ACCEPTED', 'AUTH OK', 'FAIL', 'REFUSED', 'IN', 'OUT', 'BACKEND']];
  for (const l of s.listeners) {
    const c = counters.get(l.name);
    const h = l.backendHealth;
    const backend = `${l.backend}${h ? ` ${backendState(h)}` : ''}`;
    rows.push([
      l.name,
      l.protocol,
      l.tls,
      (l.up ? l.addresses : l.listen).join(','),
      l.up ? 'up' : 'DOWN',
      String(c?.sessions ?? 0),
      String(c?.accepted ?? 0),
      String(c?.authOk ?? 0),
      String(c?.authFail ?? 0),
      String(c?.refused ?? 0),
      humanBytes(c?.bytesIn ?? 0),
      humanBytes(c?.bytesOut ?? 0),
      backend,
    ]);
  }
  out.push('', table(rows).trimEnd(), '');
  const pools = s.listeners.filter((l) => l.pool && l.pool.length > 0);
  if (pools.length > 0) {
    const prow = [['POOL', 'MEMBER', 'STATE', 'SESSIONS', 'CHECKED', 'LAST CHECK']];
    for (const l of pools) {
      for (const m of l.pool ?? []) {
        const checked = m.checkedAt === null ? 'not yet' : `${humanDuration(Math.max(0, s.now - m.checkedAt))} ago`;
        prow.push([l.name, m.backend, m.up ? 'up' : 'DOWN', String(m.sessions), checked, m.up ? (m.latencyMs === null ? '-' : `${m.latencyMs}ms`) : (m.error ?? 'error')]);
      }
    }
    out.push(table(prow).trimEnd(), '');
  }
  out.push(formatCerts(s.certs).trimEnd());
  out.push('', `sessions ${s.sessions}  bans ${s.bans.supported ? s.bans.count : 'n/a'}  control clients ${s.control.clients}`);
  if (s.lastReload) out.push(`last reload ${new Date(s.lastReload.at).toISOString()}: ${s.lastReload.ok ? 'ok' : `refused: ${s.lastReload.error ?? ''}`}`);
  return `${out.join('\n')}\n`;
}
