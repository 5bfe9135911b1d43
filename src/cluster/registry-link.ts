/**
 * Sessions across processes: every worker's SessionRegistry mirrored into
 * the primary's, so that the control socket, stats and metrics on the
 * primary see the whole gateway without knowing about workers.
 *
 * - Worker side (RegistryForwarder): registry events go to the primary in
 *   order, batched per event-loop turn (`registry.events`); once per update
 *   interval, the fields of live sessions that changed since last sent
 *   (`registry.update`). Bytes are never reported per chunk.
 * - Primary side (RegistryMirror): replays the events on its registry with a
 *   stand-in SessionControl per session whose `kill` goes back to the owning
 *   worker (`registry.kill`); when a worker exits, its sessions end there.
 */
import type { CloseReason } from '../protocols/types.ts';
import { LIVE_FIELDS, liveFields, type LiveField, type LiveFields, type SessionRecord } from '../session/record.ts';
import type { RegistryEvents, SessionControl, SessionRegistry } from '../session/registry.ts';
import type { Message, PrimaryLink, WorkerLink } from './link.ts';


/** One registry event, as it happened on a worker. */
export type RegistryEvent = { [K in keyof RegistryEvents]: { e: K; p: RegistryEvents[K] } }[keyof RegistryEvents];

/** The fields of one live session that changed since the last update. */
export type SessionChanges = { id: string } & Partial<LiveFields>;

export interface EventsMessage extends Message {
  t: 'registry.events';
  events: RegistryEvent[];
}

export interface UpdateMessage extends Message {
  t: 'registry.update';
  sessions: SessionChanges[];
}

export interface KillMessage extends Message {
  t: 'registry.kill';
  id: string;
  reason: CloseReason;
}

/** The primary wants every live session's current fields now (a dashboard's snapshot, a scrape). */
export interface RefreshMessage extends Message {
  t: 'registry.refresh';
  req: number;
}

/** Sent after the refreshed updates, on the same ordered channel: when it arrives, they are applied. */
export interface RefreshedMessage extends Message {
  t: 'registry.refreshed';
  req: number;
}

/** Events or updates per IPC message: one message per turn, but never one unbounded string to serialise. */
const MAX_BATCH = 1000;
/** Exited workers remembered, so that a message still in the channel cannot bring one of their sessions back. */
const GONE_MAX = 64;

export interface ForwarderOptions {
  /** Delay before queued events go out; 0 (default) sends them at the end of the current event-loop turn. */
  flushMs?: number;
  /** How often live sessions are scanned for changed fields. */
  updateMs?: number;
}

export class RegistryForwarder {
  private readonly registry: SessionRegistry;
  private readonly link: PrimaryLink;
  private readonly flushMs: number;
  private readonly queue: RegistryEvent[] = [];
  /** What the primary holds of each live session's mutable fields: updates carry only the difference. */
  private readonly sent = new Map<string, LiveFields>();
  private readonly unsubscribe: (() => void)[];
  private readonly updateTimer: NodeJS.Timeout;
  /** Cancels the scheduled flush; set while events wait. */
  private cancelFlush: (() => void) | undefined;
  private closed = false;

  constructor(registry: SessionRegistry, link: PrimaryLink, opts: ForwarderOptions = {}) {
    this.registry = registry;
    this.link = link;
    this.flushMs = opts.flushMs ?? 0;
    // Started after sessions opened (it should not be, but then): the primary must still hear of them.
    for (const r of registry.list()) this.record('opened', r);
    this.unsubscribe = [
      registry.on('opened', (r) => this.record('opened', r)),
      registry.on('authenticated', (r) => this.record('authenticated', r)),
      registry.on('closed', (p) => {
        this.sent.delete(p.id);
        this.push({ e: 'closed', p });
      }),
      registry.on('refused', (p) => this.push({ e: 'refused', p })),
      registry.on('authFailed', (p) => this.push({ e: 'authFailed', p })),
      registry.on('backendConnected', (p) => this.push({ e: 'backendConnected', p })),
    ];
    this.updateTimer = setInterval(() => this.sendUpdates(), opts.updateMs ?? 1000);
    this.updateTimer.unref();
  }

  /** Sessions whose last-sent fields are kept: the live ones, no more (closed ones are forgotten). */
  get tracked(): number {
    return this.sent.size;
  }

  /** Applies what the primary asks of this worker's sessions; false for messages that are not ours. */
  handle(msg: Message): boolean {
    if (msg.t === 'registry.refresh') {
      this.sendUpdates();
      const reply: RefreshedMessage = { t: 'registry.refreshed', req: (msg as RefreshMessage).req };
      this.link.send(reply);
      return true;
    }
    if (msg.t !== 'registry.kill') return false;
    const { id, reason } = msg as KillMessage;
    // An unknown id is a session that ended meanwhile: its closed event is already on the way.
    this.registry.kill(id, reason);
    return true;
  }

  /** Sends what is queued and stops. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.updateTimer);
    for (const u of this.unsubscribe.splice(0)) u();
    this.flush();
    this.sent.clear();
  }

  /** opened/authenticated: the registry hands out the live record, so it is copied as it is now. */
  private record(e: 'opened' | 'authenticated', r: SessionRecord): void {
    this.sent.set(r.id, liveFields(r));
    this.push({ e, p: { ...r } });
  }

  private push(event: RegistryEvent): void {
    this.queue.push(event);
    if (this.cancelFlush) return;
    if (this.flushMs > 0) {
      const timer = setTimeout(() => this.flush(), this.flushMs).unref();
      this.cancelFlush = () => clearTimeout(timer);
    } else {
      const immediate = setImmediate(() => this.flush()).unref();
      this.cancelFlush = () => clearImmediate(immediate);
    }
  }

  private flush(): void {
    this.cancelFlush?.();
    this.cancelFlush = undefined;
    while (this.queue.length > 0) {
      const msg: EventsMessage = { t: 'registry.events', events: this.queue.splice(0, MAX_BATCH) };
      this.link.send(msg);
    }
  }

  private sendUpdates(): void {
    // Queued events first: an update that overtook its session's `opened` would be dropped by the mirror.
    this.flush();
    const sessions: SessionChanges[] = [];
    for (const r of this.registry.list()) {
      const sent = this.sent.get(r.id);
      if (!sent) continue;
      const changed: Partial<LiveFields> = {};
      let any = false;
      for (const f of LIVE_FIELDS) any = copyIfChanged(sent, r, changed, f) || any;
      if (any) sessions.push({ id: r.id, ...changed });
    }
    for (let i = 0; i < sessions.length; i += MAX_BATCH) {
      const msg: UpdateMessage = { t: 'registry.update', sessions: sessions.slice(i, i + MAX_BATCH) };
      this.link.send(msg);
    }
  }
}

/** A worker's session as the primary's registry holds it. */
class MirroredSession implements SessionControl {
  readonly record: SessionRecord;
  readonly owner: WorkerLink;

  constructor(record: SessionRecord, owner: WorkerLink) {
    this.record = record;
    this.owner = owner;
  }

  /** The worker ends the session; its closed event removes it here. */
  kill(reason: CloseReason): void {
    const msg: KillMessage = { t: 'registry.kill', id: this.record.id, reason };
    this.owner.send(msg);
  }

  /** Workers drain their own sessions when they are told to stop. */
  drain(): void {}
}

export class RegistryMirror {
  private readonly registry: SessionRegistry;
  private readonly sessions = new Map<string, MirroredSession>();
  /** Pids of recently exited workers, oldest first. */
  private readonly gone = new Set<number>();

  /** Refresh requests waiting for their workers' answers. */
  private readonly refreshes = new Map<number, { waiting: Set<number>; done: () => void }>();
  private nextRefresh = 1;

  constructor(registry: SessionRegistry) {
    this.registry = registry;
  }

  /**
   * Brings every mirrored record up to date (updates are otherwise sent once
   * a second): resolves when each worker has answered, or after `timeoutMs`
   * with what has arrived. A snapshot taken then is exact.
   */
  refresh(workers: Iterable<WorkerLink>, timeoutMs = 250): Promise<void> {
    const links = [...workers];
    if (links.length === 0) return Promise.resolve();
    const req = this.nextRefresh++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => finish(), timeoutMs);
      timer.unref();
      const finish = () => {
        clearTimeout(timer);
        this.refreshes.delete(req);
        resolve();
      };
      this.refreshes.set(req, { waiting: new Set(links.map((l) => l.pid)), done: finish });
      const msg: RefreshMessage = { t: 'registry.refresh', req };
      for (const l of links) l.send(msg);
    });
  }

  /** Applies a worker's events and updates; false for messages that are not ours. */
  handle(from: WorkerLink, msg: Message): boolean {
    if (msg.t === 'registry.refreshed') {
      const r = this.refreshes.get((msg as RefreshedMessage).req);
      if (r) {
        r.waiting.delete(from.pid);
        if (r.waiting.size === 0) r.done();
      }
      return true;
    }
    if (msg.t === 'registry.events') {
      for (const event of (msg as EventsMessage).events) this.apply(from, event);
      return true;
    }
    if (msg.t === 'registry.update') {
      // Unknown ids are sessions whose closed event came first.
      for (const u of (msg as UpdateMessage).sessions) {
        const s = this.sessions.get(u.id);
        if (s) assign(s.record, u);
      }
      return true;
    }
    return false;
  }

  /** The worker process exited: its sessions are gone with it. */
  workerGone(link: WorkerLink): void {
    this.gone.add(link.pid);
    if (this.gone.size > GONE_MAX) this.gone.delete(this.gone.values().next().value!);
    for (const [id, s] of this.sessions) {
      if (s.owner.pid !== link.pid) continue;
      s.record.state = 'closed';
      s.record.closeReason = 'worker-exit';
      this.sessions.delete(id);
      this.registry.remove(id);
    }
  }

  private apply(from: WorkerLink, event: RegistryEvent): void {
    switch (event.e) {
      case 'opened': {
        if (this.gone.has(from.pid)) return;
        // A copy of its own: the mirror updates it in place, as a session does its record.
        const s = new MirroredSession({ ...event.p }, from);
        this.sessions.set(s.record.id, s);
        this.registry.add(s);
        return;
      }
      case 'authenticated': {
        const s = this.sessions.get(event.p.id);
        if (!s) return;
        assign(s.record, event.p);
        this.registry.authenticated(s.record);
        return;
      }
      case 'closed': {
        const s = this.sessions.get(event.p.id);
        // Already ended here by workerGone.
        if (!s) return;
        assign(s.record, event.p);
        s.record.closeReason = event.p.closeReason;
        this.sessions.delete(s.record.id);
        this.registry.remove(s.record.id);
        return;
      }
      case 'refused':
        this.registry.refused(event.p.listener, event.p.clientIp, event.p.code, event.p.reason, event.p.at);
        return;
      case 'authFailed':
        this.registry.authFailed(event.p, event.p.user, event.p.at);
        return;
      case 'backendConnected':
        this.registry.backendConnected(event.p, event.p.backend, event.p.ms, event.p.at);
        return;
      default:
        // Checked when compiled; at run time an unknown kind (a worker started from newer code) is skipped, not fatal to the primary.
        event satisfies never;
    }
  }
}


/** Puts field `k` of `now` into `out` and `sent` when it differs from what was sent. */
function copyIfChanged<K extends LiveField>(sent: LiveFields, now: LiveFields, out: Partial<LiveFields>, k: K): boolean {
  if (sent[k] === now[k]) return false;
  sent[k] = now[k];
  out[k] = now[k];
  return true;
}

/** Only the known mutable fields: a message never rewrites a session's id, listener or client. */
function assign(to: SessionRecord, from: Partial<LiveFields>): void {
  for (const f of LIVE_FIELDS) set(to, from, f);
}

function set<K extends LiveField>(to: LiveFields, from: Partial<LiveFields>, k: K): void {
  const v = from[k];
  if (v !== undefined) to[k] = v as LiveFields[K];
}
