/**
 * The registry of live sessions: the one place that knows who is connected,
 * to what, as whom, and how much has moved. Typed events feed the control
 * socket, metrics and the dashboard; `kill` and `drain` reach every session.
 */
import { EventEmitter } from 'node:events';
import type { CloseReason } from '../protocols/types.ts';
import type { SessionRecord } from './record.ts';

/** What the registry can ask of a live session. */
export interface SessionControl {
  readonly record: SessionRecord;
  kill(reason: CloseReason): void;
  /** Shutdown: finish politely if idle at a command boundary, else at the deadline. */
  drain(): void;
}

export interface RegistryEvents {
  opened: SessionRecord;
  authenticated: SessionRecord;
  closed: SessionRecord & { durationMs: number };
  /** `code`: why, for metrics (a policy verdict's code, or max_connections); `reason`: the text the client was given. */
  refused: { listener: string; clientIp: string; code: string; reason: string; at: number };
  /** A login the backend (or local auth) rejected; for the control socket and metrics. */
  authFailed: { id: string; listener: string; clientIp: string; user: string | null; at: number };
  /** A backend connection was opened for a session, after `ms` (metrics: backend connect latency). */
  backendConnected: { id: string; listener: string; backend: string; ms: number; at: number };
}

export class SessionRegistry {
  private readonly sessions = new Map<string, SessionControl>();
  /** Live sessions per listener, kept on add/remove: countFor runs at every accept, with thousands of sessions live. */
  private readonly perListener = new Map<string, number>();
  private readonly events = new EventEmitter();
  private counter = 0;
  private readonly prefix = process.pid.toString(36);

  constructor() {
    // Dashboards and metrics subscribe; more than ten is legitimate, not a leak.
    this.events.setMaxListeners(0);
  }

  nextId(): string {
    return `${this.prefix}-${(++this.counter).toString(36)}`;
  }

  add(session: SessionControl): void {
    const { id, listener } = session.record;
    if (!this.sessions.has(id)) this.perListener.set(listener, (this.perListener.get(listener) ?? 0) + 1);
    this.sessions.set(id, session);
    this.emit('opened', session.record);
  }

  authenticated(record: SessionRecord): void {
    this.emit('authenticated', record);
  }

  remove(id: string): void {
    const s = this.sessions.get(id);
    if (!s) return;
    this.sessions.delete(id);
    const left = (this.perListener.get(s.record.listener) ?? 1) - 1;
    if (left > 0) this.perListener.set(s.record.listener, left);
    else this.perListener.delete(s.record.listener);
    this.emit('closed', { ...s.record, durationMs: Date.now() - s.record.startedAt });
  }

  // `at` is given when the event happened elsewhere (a worker's, replayed by the cluster mirror).
  refused(listener: string, clientIp: string, code: string, reason = code, at = Date.now()): void {
    this.emit('refused', { listener, clientIp, code, reason, at });
  }

  authFailed(record: Pick<SessionRecord, 'id' | 'listener' | 'clientIp'>, user: string | null, at = Date.now()): void {
    this.emit('authFailed', { id: record.id, listener: record.listener, clientIp: record.clientIp, user, at });
  }

  backendConnected(record: Pick<SessionRecord, 'id' | 'listener'>, backend: string, ms: number, at = Date.now()): void {
    this.emit('backendConnected', { id: record.id, listener: record.listener, backend, ms, at });
  }

  get size(): number {
    return this.sessions.size;
  }

  get(id: string): SessionControl | undefined {
    return this.sessions.get(id);
  }

  list(): SessionRecord[] {
    return [...this.sessions.values()].map((s) => s.record);
  }

  countFor(listener: string): number {
    return this.perListener.get(listener) ?? 0;
  }

  kill(id: string, reason: CloseReason = 'killed'): boolean {
    const s = this.sessions.get(id);
    if (!s) return false;
    s.kill(reason);
    return true;
  }

  drainAll(): void {
    for (const s of [...this.sessions.values()]) s.drain();
  }

  killAll(reason: CloseReason): void {
    for (const s of [...this.sessions.values()]) s.kill(reason);
  }

  on<K extends keyof RegistryEvents>(event: K, listener: (e: RegistryEvents[K]) => void): () => void {
    this.events.on(event, listener);
    return () => this.events.off(event, listener);
  }

  private emit<K extends keyof RegistryEvents>(event: K, payload: RegistryEvents[K]): void {
    this.events.emit(event, payload);
  }
}
