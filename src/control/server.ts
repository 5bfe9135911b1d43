/**
 * The control socket: a local Unix socket speaking control/protocol.ts.
 *
 * - Access is the socket file's mode and group (socket-file.ts): never
 *   reachable with looser permissions; a stale file is replaced, a live one
 *   refused; the file is removed at stop.
 * - Subscribers get a snapshot, then one `events` batch per flush interval
 *   (200 ms): discrete events in order, absolute counters, and, once a
 *   second, one coalesced update per session whose bytes or state changed.
 *   A batch holds a bounded number of events; the rest are counted as
 *   dropped (clients then ask for a fresh snapshot).
 * - Every client has a bound on what may wait in its socket's write buffer;
 *   a client that does not read is dropped, so the daemon's memory stays flat.
 * - Request lines are bounded; arguments are validated before a handler runs;
 *   handlers are looked up by name in a table others can add to.
 */
import { BlockList, createServer, isIP, type Server, type Socket } from 'node:net';
import type { z } from 'zod';
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { formatHostPort, normalizeIp } from '../net/address.ts';
import { liveFields, sameLiveFields, sessionInfo, type LiveFields } from '../session/record.ts';
import type { CertInfo } from '../tls/cert-store.ts';
import {
  commandArgs,
  COMMAND_NAME,
  decodeRequest,
  encode,
  LineDecoder,
  MAX_REQUEST_LINE,
  PROTOCOL_VERSION,
  ProtocolError,
  type Ban,
  type BuiltinCommand,
  type CertStatus,
  type CommandResults,
  type ControlEvent,
  type ErrorCode,
  type EventBatch,
  type ListenerStatus,
  type ReloadOutcome,
  type Reply,
  type RequestId,
  type Snapshot,
  type StatusInfo,
  type TlsReportStatus,
} from './protocol.ts';
import type { TlsReportLog } from '../discovery/tlsrpt.ts';
import { bindSocketFile, removeSocketFile } from './socket-file.ts';
import type { GatewayStats } from './stats.ts';
import { poolStatus } from './pools.ts';
import type { BanTarget, ControlTarget } from './target.ts';
import { VERSION } from './version.ts';

/** Events kept for the snapshot's `recent`. */
const RECENT_MAX = 100;
/** Ends that are no news: not kept in `recent`. */
const ROUTINE_CLOSE = new Set(['client-quit', 'client-closed', 'backend-closed', 'idle-timeout', 'shutdown']);

export interface ControlServerOptions {
  /** Absolute path of the socket. */
  socketPath: string;
  mode: number;
  /** Group id to give the socket, when one is configured. */
  gid?: number | undefined;
  flushIntervalMs?: number;
  /** How often live sessions are scanned for changed bytes/state (one coalesced update per changed session). */
  updateIntervalMs?: number;
  /** Bytes that may wait in one client's write buffer before it is dropped as too slow. */
  maxClientBuffer?: number;
  maxClients?: number;
  /** Discrete events per batch; past it they are counted as dropped. */
  maxEventsPerFlush?: number;
  /** Requests one client may have running at once. */
  maxInFlight?: number;
}

const DEFAULTS = {
  flushIntervalMs: 200,
  updateIntervalMs: 1000,
  maxClientBuffer: 8 * 1024 * 1024,
  maxClients: 64,
  maxEventsPerFlush: 2000,
  maxInFlight: 16,
};

/** An error a command handler throws to answer with a specific code (and, optionally, a result). */
export class CommandError extends Error {
  readonly code: ErrorCode;
  readonly result: unknown;
  constructor(code: ErrorCode, message: string, result?: unknown) {
    super(message);
    this.name = 'CommandError';
    this.code = code;
    this.result = result;
  }
}

export interface CommandContext {
  /** Subscribes the asking client: it gets a snapshot now and event batches from then on. */
  subscribe(): number;
  unsubscribe(): void;
}

type Handler = (args: never, ctx: CommandContext) => unknown;

interface Command {
  schema: z.ZodType;
  handler: Handler;
  /** May take a while (answers with a promise): bounded per client by maxInFlight. */
  slow: boolean;
}

interface Client {
  readonly socket: Socket;
  readonly decoder: LineDecoder;
  subscribed: boolean;
  /** Events with seq at or below this are already in the client's snapshot. */
  snapshotSeq: number;
  inFlight: number;
  closed: boolean;
}


export class ControlServer {
  private readonly target: ControlTarget;
  private readonly stats: GatewayStats;
  private readonly log: Logger;
  private readonly opts: Required<Omit<ControlServerOptions, 'gid'>> & { gid: number | undefined };
  private readonly server: Server;
  private readonly clients = new Set<Client>();
  private readonly commands = new Map<string, Command>();
  private readonly queue: { seq: number; event: ControlEvent }[] = [];
  /** Kept for the snapshot, so a dashboard that connects late still sees what happened. */
  private readonly recent: ControlEvent[] = [];
  private readonly signatures = new Map<string, LiveFields>();
  private readonly cleanups: (() => void)[] = [];
  private banUnsubscribe: (() => void) | undefined;
  private seq = 0;
  private droppedEvents = 0;
  private droppedClients = 0;
  private timer: NodeJS.Timeout | undefined;
  private socketIno: number | undefined;
  private lastReload: (ReloadOutcome & { at: number }) | null = null;
  private closing: Promise<void> | undefined;

  private constructor(target: ControlTarget, stats: GatewayStats, opts: ControlServerOptions, log: Logger) {
    this.target = target;
    this.stats = stats;
    this.log = log;
    this.opts = {
      socketPath: opts.socketPath,
      mode: opts.mode,
      gid: opts.gid,
      flushIntervalMs: opts.flushIntervalMs ?? DEFAULTS.flushIntervalMs,
      updateIntervalMs: opts.updateIntervalMs ?? DEFAULTS.updateIntervalMs,
      maxClientBuffer: opts.maxClientBuffer ?? DEFAULTS.maxClientBuffer,
      maxClients: opts.maxClients ?? DEFAULTS.maxClients,
      maxEventsPerFlush: opts.maxEventsPerFlush ?? DEFAULTS.maxEventsPerFlush,
      maxInFlight: opts.maxInFlight ?? DEFAULTS.maxInFlight,
    };
    this.server = createServer({ allowHalfOpen: false }, (socket) => this.accept(socket));
    this.server.on('error', (err) => this.log.error({ err: errorMessage(err) }, 'control socket error'));
    this.registerBuiltins();
  }

  /** Binds the socket (see the file comment) and starts the event flow. */
  static async start(target: ControlTarget, stats: GatewayStats, opts: ControlServerOptions, log: Logger): Promise<ControlServer> {
    const s = new ControlServer(target, stats, opts, log);
    await s.bind();
    s.watch();
    s.timer = setInterval(() => s.flush(), s.opts.flushIntervalMs);
    s.timer.unref();
    log.info({ socket: opts.socketPath, mode: `0${opts.mode.toString(8)}`, gid: opts.gid }, 'control socket up');
    return s;
  }

  get socketPath(): string {
    return this.opts.socketPath;
  }

  get clientCount(): number {
    return this.clients.size;
  }

  get droppedClientCount(): number {
    return this.droppedClients;
  }

  /**
   * Adds a command (e.g. `certs.renew` from the ACME part). Arguments are
   * validated with `schema` (use z.strictObject) before the handler runs; a
   * handler answers by returning (or resolving to) a JSON-able result, or by
   * throwing a CommandError. Commands that answer at once may say
   * `{ slow: false }` so that they are never refused as BUSY.
   */
  register<S extends z.ZodType>(
    name: string,
    schema: S,
    handler: (args: z.output<S>, ctx: CommandContext) => unknown,
    opts: { slow?: boolean } = {},
  ): void {
    if (!COMMAND_NAME.test(name)) throw new MailgateError('CONTROL', `"${name}" is not a valid command name`);
    if (this.commands.has(name)) throw new MailgateError('CONTROL', `command "${name}" is already registered`);
    this.commands.set(name, { schema, handler: handler as Handler, slow: opts.slow ?? true });
  }

  /** Queues an event for subscribers (other parts may publish, e.g. certificate renewals). */
  publish(event: ControlEvent): void {
    this.seq++;
    if (event.type !== 'opened' && event.type !== 'authenticated' && event.type !== 'update' && !(event.type === 'closed' && ROUTINE_CLOSE.has(event.reason))) {
      this.recent.push(event);
      if (this.recent.length > RECENT_MAX) this.recent.shift();
    }
    if (!this.hasSubscribers()) return;
    if (this.queue.length >= this.opts.maxEventsPerFlush) {
      this.droppedEvents++;
      return;
    }
    this.queue.push({ seq: this.seq, event });
  }

  // ---- socket file ----------------------------------------------------------

  private async bind(): Promise<void> {
    this.socketIno = await bindSocketFile(this.server, this.opts.socketPath, this.opts.mode, this.opts.gid);
  }


  // ---- event sources --------------------------------------------------------------

  private watch(): void {
    const { registry, certificates } = this.target;
    this.cleanups.push(
      registry.on('opened', (r) => {
        this.signatures.set(r.id, liveFields(r));
        this.publish({ type: 'opened', at: Date.now(), session: sessionInfo(r) });
      }),
      registry.on('authenticated', (r) => {
        this.signatures.set(r.id, liveFields(r));
        this.publish({ type: 'authenticated', at: Date.now(), session: sessionInfo(r) });
      }),
      registry.on('closed', (r) => {
        this.signatures.delete(r.id);
        this.publish({
          type: 'closed',
          at: Date.now(),
          id: r.id,
          listener: r.listener,
          clientIp: r.clientIp,
          user: r.user,
          backend: r.backend,
          reason: r.closeReason ?? 'unknown',
          bytesIn: r.bytesIn,
          bytesOut: r.bytesOut,
          durationMs: r.durationMs,
        });
      }),
      registry.on('refused', (e) => this.publish({ type: 'refused', at: e.at, listener: e.listener, clientIp: e.clientIp, code: e.code, reason: e.reason })),
      registry.on('authFailed', (e) =>
        this.publish({ type: 'auth-failed', at: e.at, id: e.id, listener: e.listener, clientIp: e.clientIp, user: e.user }),
      ),
      certificates.onChange((info) => this.publish({ type: 'cert', at: Date.now(), cert: this.certStatus(info) })),
      ...(this.target.tlsReports
        ? [
            this.target.tlsReports.onReport((r) =>
              this.publish(
                r.ok
                  ? { type: 'tls-report', at: r.at, ok: true, organization: r.organization, success: sum(r.domains, 'success'), failure: sum(r.domains, 'failure') }
                  : { type: 'tls-report', at: r.at, ok: false, organization: '', success: 0, failure: 0, reason: r.reason },
              ),
            ),
          ]
        : []),
      this.target.onReload((result) => {
        this.lastReload = { ...result, at: Date.now() };
        this.publish({ type: 'reload', at: Date.now(), ...result });
        // A reload replaces the certificate store's contents without a change event per certificate.
        for (const info of this.target.certificates.list()) this.publish({ type: 'cert', at: Date.now(), cert: this.certStatus(info) });
        this.watchBans();
      }),
    );
    this.watchBans();
  }

  /** Bans the policy engine makes on its own (failed logins) reach subscribers through its onChange. */
  private watchBans(): void {
    this.banUnsubscribe?.();
    this.banUnsubscribe = this.target.bans?.onChange?.((change) => {
      if (change.kind === 'banned') this.publish({ type: 'banned', at: Date.now(), ban: change.ban, killed: 0 });
      else this.publish({ type: 'unbanned', at: Date.now(), ip: change.ip, ...(change.id === undefined ? {} : { id: change.id }), ...(change.user === undefined ? {} : { user: change.user }) });
    });
  }

  // ---- clients ----------------------------------------------------------------

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const client: Client = { socket, decoder: new LineDecoder(MAX_REQUEST_LINE), subscribed: false, snapshotSeq: 0, inFlight: 0, closed: false };
    socket.on('error', (err) => this.log.debug({ err: errorMessage(err) }, 'control client socket error'));
    socket.on('close', () => {
      client.closed = true;
      this.clients.delete(client);
    });
    if (this.clients.size >= this.opts.maxClients) {
      this.log.warn({ max: this.opts.maxClients }, 'control socket: too many clients, refusing one');
      socket.end(encode({ type: 'bye', reason: 'too-many-clients' }));
      return;
    }
    this.clients.add(client);
    this.send(client, encode({ type: 'hello', protocol: PROTOCOL_VERSION, server: 'mailgate', version: VERSION, pid: process.pid, startedAt: this.target.startedAt }));
    socket.on('data', (chunk: Buffer) => this.data(client, chunk));
  }

  private data(client: Client, chunk: Buffer): void {
    if (client.closed) return;
    let lines: string[];
    try {
      lines = client.decoder.push(chunk);
    } catch (err) {
      const code = err instanceof ProtocolError ? err.code : 'BAD_REQUEST';
      this.reply(client, { type: 'reply', id: null, ok: false, error: { code, message: errorMessage(err) } });
      this.log.warn({ err: errorMessage(err) }, 'control client sent an over-long line, closing it');
      client.closed = true;
      client.socket.end();
      return;
    }
    for (const line of lines) {
      if (client.closed) return;
      if (line.trim() === '') continue;
      this.request(client, line);
    }
  }

  private request(client: Client, line: string): void {
    let id: RequestId | null = null;
    try {
      const req = decodeRequest(line);
      id = req.id;
      const command = this.commands.get(req.cmd);
      if (!command) throw new CommandError('UNKNOWN_COMMAND', `unknown command "${req.cmd}"`);
      const parsed = command.schema.safeParse(req.args ?? {});
      if (!parsed.success) throw new CommandError('BAD_REQUEST', `${req.cmd}: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'args'}: ${i.message}`).join('; ')}`);
      if (command.slow && client.inFlight >= this.opts.maxInFlight) throw new CommandError('BUSY', `more than ${this.opts.maxInFlight} requests in flight`);
      const reqId = req.id;
      const ctx: CommandContext = {
        subscribe: () => this.subscribe(client),
        unsubscribe: () => {
          client.subscribed = false;
        },
      };
      let result: unknown;
      try {
        result = command.handler(parsed.data as never, ctx);
      } catch (err) {
        this.reply(client, errorReply(reqId, err, this.log, req.cmd));
        return;
      }
      if (!(result instanceof Promise)) {
        // Most commands answer at once, in order.
        this.reply(client, { type: 'reply', id: reqId, ok: true, result: result ?? {} });
        return;
      }
      // Slow ones (reload, certificate renewal) are bounded per client.
      client.inFlight++;
      result
        .then(
          (value: unknown) => this.reply(client, { type: 'reply', id: reqId, ok: true, result: value ?? {} }),
          (err: unknown) => this.reply(client, errorReply(reqId, err, this.log, req.cmd)),
        )
        .finally(() => {
          client.inFlight--;
        });
    } catch (err) {
      const requestId = err instanceof ProtocolError ? err.requestId : id;
      this.reply(client, errorReply(requestId, err, this.log, undefined));
    }
  }

  private reply(client: Client, reply: Reply): void {
    this.send(client, encode(reply));
  }

  /** Writes, then drops the client if its unread output has grown past the bound. */
  private send(client: Client, line: string): void {
    if (client.closed || client.socket.destroyed) return;
    client.socket.write(line);
    if (client.socket.writableLength > this.opts.maxClientBuffer) {
      client.closed = true;
      this.clients.delete(client);
      this.droppedClients++;
      this.log.warn({ buffered: client.socket.writableLength, max: this.opts.maxClientBuffer }, 'control client does not read its output, dropped');
      client.socket.destroy();
    }
  }

  private subscribe(client: Client): number {
    const first = !this.hasSubscribers();
    if (first) {
      // Nothing was tracked while nobody listened: start the per-session change tracking from now.
      this.signatures.clear();
      for (const r of this.target.registry.list()) this.signatures.set(r.id, liveFields(r));
    }
    client.subscribed = true;
    client.snapshotSeq = this.seq;
    this.send(client, encode(this.snapshot()));
    return this.seq;
  }

  // ---- flushing -------------------------------------------------------------------

  private hasSubscribers(): boolean {
    for (const c of this.clients) if (c.subscribed && !c.closed) return true;
    return false;
  }

  /** One batch per interval to every subscriber; the batch is serialised once. */
  flush(): void {
    const subscribers = [...this.clients].filter((c) => c.subscribed && !c.closed);
    if (subscribers.length === 0) {
      this.queue.length = 0;
      this.droppedEvents = 0;
      return;
    }
    const now = Date.now();
    let updates: ControlEvent[] = [];
    if (now - this.lastScanAt >= this.opts.updateIntervalMs) {
      this.lastScanAt = now;
      updates = this.changedSessions();
    }
    const queued = this.queue.splice(0);
    const dropped = this.droppedEvents;
    this.droppedEvents = 0;
    if (queued.length === 0 && updates.length === 0 && dropped === 0 && !this.countersDue()) return;
    const counters = this.stats.counters(this.target.currentConfig.listeners.map((l) => l.name));
    const at = now;
    const batch = (events: ControlEvent[]): EventBatch => ({ type: 'events', seq: this.seq, at, events, dropped, counters });
    const shared = encode(batch([...queued.map((q) => q.event), ...updates]));
    for (const c of subscribers) {
      // A client that subscribed during this interval already has the earlier events in its snapshot.
      const line = queued.length > 0 && queued[0]!.seq <= c.snapshotSeq ? encode(batch([...queued.filter((q) => q.seq > c.snapshotSeq).map((q) => q.event), ...updates])) : shared;
      this.send(c, line);
    }
  }

  private lastCountersAt = 0;
  private lastScanAt = 0;

  /** Even when nothing happened, counters go out once a second so that rates fall to zero on the dashboard. */
  private countersDue(): boolean {
    const now = Date.now();
    if (now - this.lastCountersAt < 1000) return false;
    this.lastCountersAt = now;
    return true;
  }

  private changedSessions(): ControlEvent[] {
    const out: ControlEvent[] = [];
    for (const r of this.target.registry.list()) {
      const prev = this.signatures.get(r.id);
      if (prev && sameLiveFields(prev, r)) continue;
      const live = liveFields(r);
      this.signatures.set(r.id, live);
      out.push({ type: 'update', id: r.id, ...live });
    }
    return out;
  }

  // ---- descriptions ------------------------------------------------------------

  status(): StatusInfo {
    const config = this.target.currentConfig;
    const bound = this.target.addresses();
    const names = config.listeners.map((l) => l.name);
    const pools = poolStatus(config, this.target.health, this.target.registry.list());
    const listeners: ListenerStatus[] = config.listeners.map((l) => {
      const addresses = [...(bound[l.name] ?? [])];
      const pool = pools.get(l.name);
      return {
        ...(pool ? { pool } : {}),
        name: l.name,
        protocol: l.protocol,
        tls: l.tls,
        listen: l.listen.map(formatHostPort),
        addresses,
        up: addresses.length > 0,
        backend: formatHostPort(l.backend),
        backendHealth: this.stats.for(l.name).backendHealth,
      };
    });
    const now = Date.now();
    const bans = this.target.bans;
    return {
      protocol: PROTOCOL_VERSION,
      version: VERSION,
      pid: process.pid,
      ...(this.target.workers ? { workers: this.target.workers() } : {}),
      hostname: config.hostname,
      configFile: config.file,
      startedAt: this.target.startedAt,
      now,
      uptimeMs: now - this.target.startedAt,
      listeners,
      sessions: this.target.registry.size,
      counters: this.stats.counters(names),
      certs: this.certs(),
      bans: { supported: bans !== undefined, count: bans ? bans.list().length : 0 },
      control: { clients: this.clients.size, dropped: this.droppedClients },
      lastReload: this.lastReload,
      ...(this.target.currentConfig.discovery?.tls_rpt?.receive && this.target.tlsReports ? { tlsReports: tlsReportStatus(this.target.tlsReports) } : {}),
    };
  }

  snapshot(): Snapshot {
    return {
      type: 'snapshot',
      seq: this.seq,
      at: Date.now(),
      status: this.status(),
      sessions: this.target.registry.list().map(sessionInfo),
      bans: this.target.bans?.list() ?? [],
      recent: [...this.recent],
    };
  }

  certs(): CertStatus[] {
    return this.target.certificates.list().map((c) => this.certStatus(c));
  }

  private certStatus(info: CertInfo): CertStatus {
    return certStatus(info, this.target.certRenewal?.(info) ?? null);
  }

  // ---- commands --------------------------------------------------------------------

  private builtin<C extends BuiltinCommand>(name: C, handler: (args: z.output<(typeof commandArgs)[C]>, ctx: CommandContext) => CommandResults[C] | Promise<CommandResults[C]>): void {
    this.register(name, commandArgs[name], handler as (args: unknown, ctx: CommandContext) => unknown, { slow: name === 'reload' });
  }

  private registerBuiltins(): void {
    this.builtin('status', () => this.status());
    const sessions = (args: { listener?: string | undefined; limit?: number | undefined }) => {
      let list = this.target.registry.list();
      if (args.listener !== undefined) list = list.filter((r) => r.listener === args.listener);
      if (args.limit !== undefined) list = list.slice(0, args.limit);
      return list.map(sessionInfo);
    };
    // Mirrored records (a cluster primary) are refreshed first, so that a snapshot is exact.
    const refresh = this.target.refresh?.bind(this.target);
    this.builtin('sessions', (args) => (refresh ? refresh().then(() => sessions(args)) : sessions(args)));
    this.builtin('kill', (args) => {
      if (!this.target.registry.kill(args.id, 'killed')) throw new CommandError('NOT_FOUND', `no session ${args.id}`);
      this.log.info({ conn: args.id }, 'session killed from the control socket');
      return { id: args.id };
    });
    this.builtin('ban', (args) => {
      const bans = this.requireBans();
      const target: BanTarget = {
        ...(args.ip === undefined ? {} : { ip: normalizeIp(args.ip) }),
        ...(args.user === undefined ? {} : { user: args.user }),
      };
      // An address check that a ban admin without `covers` relies on (and a clear error for a bad block).
      const match = target.ip === undefined ? undefined : blockFor(target.ip);
      const reason = args.reason ?? 'Banned by the administrator';
      let made: Ban[];
      try {
        // An address or range alone goes as a string: every ban admin takes that form.
        made = bans.ban(target.user === undefined && target.ip !== undefined ? target.ip : target, args.seconds, reason) ?? [];
      } catch (err) {
        throw new CommandError('BAD_REQUEST', `ban ${describeTarget(target)}: ${errorMessage(err)}`);
      }
      let killed = 0;
      if (args.kill !== false) {
        for (const r of this.target.registry.list()) {
          const hit = bans.covers ? bans.covers(target, r.clientIp, r.user) : match !== undefined && matches(match, r.clientIp);
          if (hit && this.target.registry.kill(r.id, 'killed')) killed++;
        }
      }
      const now = Date.now();
      if (made.length === 0) {
        const listed = bans.list().find((b) => b.ip === (target.ip ?? null) && (target.user === undefined || b.user !== undefined));
        made = [listed ?? { ip: target.ip ?? null, reason, createdAt: now, expiresAt: now + args.seconds * 1000, source: 'manual' }];
      }
      this.log.info({ ip: target.ip, user: target.user, seconds: args.seconds, reason, killed }, 'banned from the control socket');
      if (!bans.onChange) for (const ban of made) this.publish({ type: 'banned', at: now, ban, killed });
      return { ban: made[0]!, bans: made, killed };
    });
    this.builtin('unban', (args) => {
      const bans = this.requireBans();
      const ip = args.ip === undefined ? undefined : normalizeIp(args.ip);
      // An address or range alone goes as a string, as to `ban`.
      const target = args.id !== undefined ? { id: args.id } : args.user === undefined && ip !== undefined ? ip : { ...(ip === undefined ? {} : { ip }), ...(args.user === undefined ? {} : { user: args.user }) };
      const removed = bans.unban(target);
      if (removed) {
        this.log.info({ ip, user: args.user, id: args.id }, 'ban removed from the control socket');
        if (!bans.onChange) this.publish({ type: 'unbanned', at: Date.now(), ip: ip ?? null });
      }
      return { removed };
    });
    this.builtin('bans', () => this.requireBans().list());
    this.builtin('reload', async () => {
      const result = await this.target.reload();
      if (!result.ok) throw new CommandError('FAILED', result.error ?? 'reload failed', result);
      return result;
    });
    this.builtin('certs', () => this.certs());
    this.builtin('subscribe', (_args, ctx) => (refresh ? refresh().then(() => ({ seq: ctx.subscribe() })) : { seq: ctx.subscribe() }));
    this.builtin('unsubscribe', (_args, ctx) => {
      ctx.unsubscribe();
      return {};
    });
  }

  private requireBans() {
    const bans = this.target.bans;
    if (!bans) throw new CommandError('UNSUPPORTED', 'this gateway has no ban list (the policy engine provides none)');
    return bans;
  }

  // ---- stop -------------------------------------------------------------------------

  /** Says goodbye to every client, closes the socket and removes its file. Safe to call twice. */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    clearInterval(this.timer);
    for (const c of this.cleanups.splice(0)) c();
    this.banUnsubscribe?.();
    this.flush();
    for (const c of [...this.clients]) {
      c.closed = true;
      c.socket.end(encode({ type: 'bye', reason: 'shutdown' }));
      c.socket.destroySoon();
    }
    await new Promise<void>((resolveClose) => this.server.close(() => resolveClose()));
    try {
      if (this.socketIno !== undefined) removeSocketFile(this.opts.socketPath, this.socketIno);
    } catch (err) {
      this.log.warn({ err: errorMessage(err), socket: this.opts.socketPath }, 'could not remove the control socket file');
    }
    this.log.info({ socket: this.opts.socketPath }, 'control socket closed');
  }
}

export { controlSocketPath, resolveGroup } from './socket-file.ts';

// ---- helpers -------------------------------------------------------------------------

function errorReply(id: RequestId | null, err: unknown, log: Logger, cmd: string | undefined): Reply {
  if (err instanceof CommandError) {
    const reply: Reply = { type: 'reply', id, ok: false, error: { code: err.code, message: err.message } };
    if (err.result !== undefined) reply.result = err.result;
    return reply;
  }
  if (err instanceof ProtocolError) return { type: 'reply', id, ok: false, error: { code: err.code, message: err.message } };
  log.error({ cmd, err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'control command failed');
  return { type: 'reply', id, ok: false, error: { code: 'FAILED', message: errorMessage(err) } };
}

export function certStatus(info: CertInfo, renewal: CertStatus['renewal'], now = Date.now()): CertStatus {
  return {
    names: info.names,
    source: info.source,
    issuer: info.issuer,
    subject: info.subject,
    notBefore: info.notBefore.getTime(),
    notAfter: info.notAfter.getTime(),
    daysLeft: Math.floor((info.notAfter.getTime() - now) / 86_400_000),
    fingerprint256: info.fingerprint256,
    certFile: info.certFile ?? null,
    renewal,
  };
}



function sum<K extends 'success' | 'failure'>(domains: readonly Record<K, number>[], key: K): number {
  return domains.reduce((n, d) => n + d[key], 0);
}

function tlsReportStatus(log: TlsReportLog): TlsReportStatus {
  const t = log.totals();
  return { accepted: t.reports.accepted, refused: t.reports.refused, success: sum(t.domains, 'success'), failure: sum(t.domains, 'failure') };
}

function describeTarget(t: BanTarget): string {
  return [t.user === undefined ? '' : `user ${t.user}`, t.ip ?? ''].filter(Boolean).join(' from ');
}

/** A BlockList for a CIDR block, or the address itself. */
function blockFor(ip: string): BlockList | string {
  const slash = ip.indexOf('/');
  if (slash < 0) {
    if (isIP(ip) === 0) throw new CommandError('BAD_REQUEST', `"${ip}" is not an IP address`);
    return ip;
  }
  const addr = ip.slice(0, slash);
  const prefix = Number(ip.slice(slash + 1));
  const family = isIP(addr);
  if (family === 0 || prefix > (family === 4 ? 32 : 128)) throw new CommandError('BAD_REQUEST', `"${ip}" is not a CIDR block`);
  const list = new BlockList();
  list.addSubnet(addr, prefix, family === 4 ? 'ipv4' : 'ipv6');
  return list;
}

function matches(block: BlockList | string, ip: string): boolean {
  if (typeof block === 'string') return block === ip;
  const family = isIP(ip);
  return family !== 0 && block.check(ip, family === 4 ? 'ipv4' : 'ipv6');
}




