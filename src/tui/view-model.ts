/**
 * The dashboard's state and everything it derives, without a terminal:
 * applies snapshots and event batches, keeps rates and their history per
 * listener, sorts and filters sessions (cached, recomputed only when
 * something changed), keeps the selection on the same session across
 * re-sorts, and keeps a bounded event log. dashboard.ts draws it; the unit
 * tests drive it directly.
 */
import type { Ban, ControlEvent, EventBatch, ListenerCounters, SessionInfo, Snapshot, StatusInfo } from '../control/protocol.ts';

export const SORT_KEYS = ['age', 'idle', 'id', 'listener', 'client', 'user', 'backend', 'tls', 'in', 'out', 'state'] as const;
export type SortKey = (typeof SORT_KEYS)[number];

export interface SessionView extends SessionInfo {
  /** Lower-cased text the filter searches (id, listener, client, user, backend, state, TLS version). */
  haystack: string;
}

export type LogLevel = 'info' | 'warn' | 'error';

export interface LogEntry {
  at: number;
  level: LogLevel;
  text: string;
}

export interface ListenerRow {
  name: string;
  protocol: string;
  up: boolean;
  sessions: number;
  newPerSec: number;
  authOk: number;
  authFail: number;
  refused: number;
  inPerSec: number;
  outPerSec: number;
  /** Bytes per second (both ways) for each of the last seconds, oldest first. */
  history: number[];
}

export type Connection =
  | { kind: 'connecting'; since: number }
  | { kind: 'connected'; since: number; pid: number }
  | { kind: 'disconnected'; since: number; error: string };

interface Sample {
  at: number;
  counters: Map<string, ListenerCounters>;
}

const LOG_MAX = 500;
const HISTORY_SECONDS = 60;
const SAMPLE_WINDOW_MS = 65_000;

/** Close reasons that are the normal end of a session and do not go into the event log. */
const ROUTINE_CLOSE = new Set(['client-quit', 'client-closed', 'backend-closed', 'idle-timeout', 'shutdown']);

export class DashboardModel {
  connection: Connection = { kind: 'connecting', since: 0 };
  status: StatusInfo | null = null;
  readonly sessions = new Map<string, SessionView>();
  bans: Ban[] = [];
  readonly log: LogEntry[] = [];
  /** Latest absolute counters per listener. */
  counters = new Map<string, ListenerCounters>();

  sortKey: SortKey = 'age';
  /** Descending by default for numbers where bigger is more interesting; age ascending = newest first would be odd, so oldest first. */
  sortDesc = false;
  filter = '';
  private filterTerms: string[] = [];

  selectedId: string | null = null;
  selectedIndex = 0;
  scrollTop = 0;
  /** The bans view's selection (a ban's id, or its address from a daemon without ids). */
  selectedBanId: string | null = null;
  banIndex = 0;

  private samples: Sample[] = [];
  private readonly history = new Map<string, number[]>();
  private historySecond = 0;
  private lastPid: number | null = null;
  private rowsCache: SessionView[] | null = null;
  private lastLoggedAt = 0;
  private replaying = false;

  // ---- feeding ------------------------------------------------------------------

  connecting(now: number): void {
    if (this.connection.kind !== 'disconnected') this.connection = { kind: 'connecting', since: now };
  }

  disconnected(error: string, now: number): void {
    if (this.connection.kind === 'connected') this.addLog(now, 'error', `disconnected from the daemon: ${error}; reconnecting`);
    if (this.connection.kind !== 'disconnected') this.connection = { kind: 'disconnected', since: now, error };
    else this.connection.error = error;
  }

  applySnapshot(s: Snapshot, now: number): void {
    // What happened before this client connected (or while it was away), once.
    this.replaying = true;
    for (const e of s.recent ?? []) this.logEvent(e);
    this.replaying = false;
    const pid = s.status.pid;
    if (this.lastPid === null) this.addLog(now, 'info', `connected to mailgate ${s.status.version} (pid ${pid})`);
    else if (this.lastPid !== pid) this.addLog(now, 'warn', `the daemon restarted (pid ${this.lastPid} → ${pid}); reconnected`);
    else if (this.connection.kind !== 'connected') this.addLog(now, 'info', 'reconnected');
    if (this.lastPid !== pid) {
      // Counters start again from zero in a new daemon: old samples would give negative rates.
      this.samples = [];
      this.history.clear();
    }
    this.lastPid = pid;
    this.connection = { kind: 'connected', since: now, pid };
    this.status = s.status;
    this.bans = s.bans;
    this.banSelection();
    this.sessions.clear();
    for (const info of s.sessions) this.sessions.set(info.id, view(info));
    this.rowsCache = null;
    this.addSample(s.at, s.status.counters);
  }

  /** A fresh `status` reply (after a reload: listeners and certificates may have changed). */
  applyStatus(status: StatusInfo): void {
    this.status = status;
  }

  applyBatch(b: EventBatch, now: number): void {
    for (const e of b.events) this.applyEvent(e);
    if (b.dropped > 0) this.addLog(now, 'warn', `${b.dropped} events were dropped by the daemon (too many at once); resynchronising`);
    this.addSample(b.at, b.counters);
  }

  private applyEvent(e: ControlEvent): void {
    switch (e.type) {
      case 'opened':
      case 'authenticated':
        this.sessions.set(e.session.id, view(e.session));
        this.rowsCache = null;
        break;
      case 'update': {
        const s = this.sessions.get(e.id);
        if (!s) return;
        const { type: _type, ...fields } = e;
        Object.assign(s, fields);
        s.haystack = haystack(s);
        this.rowsCache = null;
        return;
      }
      case 'closed':
        if (this.sessions.delete(e.id)) this.rowsCache = null;
        break;
      case 'banned':
        this.bans = [...this.bans.filter((b) => banKey(b) !== banKey(e.ban)), e.ban];
        this.banSelection();
        break;
      case 'unbanned':
        // A daemon that names the ban by id lifts that one; else every ban of the address.
        this.bans = this.bans.filter((b) => (e.id !== undefined ? banKey(b) !== e.id : b.ip !== e.ip));
        this.banSelection();
        break;
      case 'cert':
        if (this.status) {
          const rest = this.status.certs.filter((c) => c.fingerprint256 !== e.cert.fingerprint256 && !c.names.some((n) => e.cert.names.includes(n)));
          this.status = { ...this.status, certs: [...rest, e.cert] };
        }
        break;
      case 'tls-report': {
        const t = this.status?.tlsReports;
        if (this.status && t) {
          const next = e.ok
            ? { ...t, accepted: t.accepted + 1, success: t.success + e.success, failure: t.failure + e.failure }
            : { ...t, refused: t.refused + 1 };
          this.status = { ...this.status, tlsReports: next };
        }
        break;
      }
      case 'refused':
      case 'auth-failed':
      case 'reload':
        break;
      default: {
        const never: never = e;
        throw new Error(`unknown event ${JSON.stringify(never)}`);
      }
    }
    this.logEvent(e);
  }

  /** Puts what an admin acts on into the log (refusals, failed logins, unusual ends, bans, certificates, reloads). */
  private logEvent(e: ControlEvent): void {
    if (e.type === 'update') return;
    if (e.at <= this.lastLoggedAt && this.replaying) return;
    this.lastLoggedAt = Math.max(this.lastLoggedAt, e.at);
    const d = describe(e);
    if (d) this.addLog(e.at, d.level, d.text);
  }

  addLog(at: number, level: LogLevel, text: string): void {
    this.log.push({ at, level, text: sanitize(text) });
    if (this.log.length > LOG_MAX) this.log.splice(0, this.log.length - LOG_MAX);
  }

  // ---- rates -------------------------------------------------------------------

  private addSample(at: number, counters: ListenerCounters[]): void {
    const map = new Map(counters.map((c) => [c.listener, c]));
    this.counters = map;
    const prev = this.samples.at(-1);
    if (prev && at <= prev.at) return;
    this.samples.push({ at, counters: map });
    while (this.samples.length > 2 && this.samples[0]!.at < at - SAMPLE_WINDOW_MS) this.samples.shift();
    // One history point per whole second: the byte rate over the second that just ended.
    const second = Math.floor(at / 1000);
    if (this.historySecond === 0) this.historySecond = second;
    if (second > this.historySecond) {
      const gap = Math.min(second - this.historySecond, HISTORY_SECONDS);
      for (const c of counters) {
        const h = this.history.get(c.listener) ?? [];
        const r = this.rate(c.listener, (x) => x.bytesIn + x.bytesOut, 1000);
        for (let i = 0; i < gap; i++) h.push(i === gap - 1 ? r : 0);
        if (h.length > HISTORY_SECONDS) h.splice(0, h.length - HISTORY_SECONDS);
        this.history.set(c.listener, h);
      }
      this.historySecond = second;
    }
  }

  /** Per-second rate of a counter over about `windowMs` (the newest sample against one at least that much older). */
  rate(listener: string, pick: (c: ListenerCounters) => number, windowMs = 2000): number {
    const last = this.samples.at(-1);
    if (!last) return 0;
    const now = last.counters.get(listener);
    if (!now) return 0;
    let ref: Sample | undefined;
    for (let i = this.samples.length - 2; i >= 0; i--) {
      ref = this.samples[i];
      if (ref && last.at - ref.at >= windowMs) break;
    }
    if (!ref) return 0;
    const then = ref.counters.get(listener);
    const dt = (last.at - ref.at) / 1000;
    if (!then || dt <= 0) return 0;
    return Math.max(0, (pick(now) - pick(then)) / dt);
  }

  listenerRows(): ListenerRow[] {
    const names = this.status?.listeners.map((l) => l.name) ?? [];
    for (const n of this.counters.keys()) if (!names.includes(n)) names.push(n);
    return names.map((name) => {
      const c = this.counters.get(name);
      const l = this.status?.listeners.find((x) => x.name === name);
      return {
        name,
        protocol: l?.protocol ?? '?',
        up: l?.up ?? false,
        sessions: c?.sessions ?? 0,
        newPerSec: this.rate(name, (x) => x.accepted),
        authOk: c?.authOk ?? 0,
        authFail: c?.authFail ?? 0,
        refused: c?.refused ?? 0,
        inPerSec: this.rate(name, (x) => x.bytesIn),
        outPerSec: this.rate(name, (x) => x.bytesOut),
        history: this.history.get(name) ?? [],
      };
    });
  }

  totals(): { sessions: number; authenticated: number; accepted: number; authOk: number; authFail: number; refused: number } {
    let accepted = 0;
    let authOk = 0;
    let authFail = 0;
    let refused = 0;
    for (const c of this.counters.values()) {
      accepted += c.accepted;
      authOk += c.authOk;
      authFail += c.authFail;
      refused += c.refused;
    }
    let authenticated = 0;
    for (const s of this.sessions.values()) if (s.user !== null) authenticated++;
    return { sessions: this.sessions.size, authenticated, accepted, authOk, authFail, refused };
  }

  // ---- sorting, filtering, selection -------------------------------------------------

  setSort(key: SortKey): void {
    if (this.sortKey === key) this.sortDesc = !this.sortDesc;
    else {
      this.sortKey = key;
      this.sortDesc = key === 'in' || key === 'out' || key === 'idle';
    }
    this.rowsCache = null;
  }

  cycleSort(): void {
    const i = SORT_KEYS.indexOf(this.sortKey);
    const next = SORT_KEYS[(i + 1) % SORT_KEYS.length]!;
    this.sortKey = next;
    this.sortDesc = next === 'in' || next === 'out' || next === 'idle';
    this.rowsCache = null;
  }

  reverseSort(): void {
    this.sortDesc = !this.sortDesc;
    this.rowsCache = null;
  }

  setFilter(text: string): void {
    this.filter = text;
    this.filterTerms = text.toLowerCase().split(/\s+/).filter(Boolean);
    this.rowsCache = null;
  }

  /** The sessions to show, filtered and sorted; cached until something changes. */
  rows(): SessionView[] {
    if (this.rowsCache) return this.rowsCache;
    const terms = this.filterTerms;
    const list: SessionView[] = [];
    for (const s of this.sessions.values()) {
      if (terms.length === 0 || terms.every((t) => s.haystack.includes(t))) list.push(s);
    }
    const cmp = comparator(this.sortKey);
    const dir = this.sortDesc ? -1 : 1;
    list.sort((a, b) => dir * cmp(a, b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    this.rowsCache = list;
    this.reselect(list);
    return list;
  }

  private reselect(list: SessionView[]): void {
    if (this.selectedId !== null) {
      const i = list.findIndex((s) => s.id === this.selectedId);
      if (i >= 0) {
        this.selectedIndex = i;
        return;
      }
    }
    this.selectedIndex = Math.max(0, Math.min(this.selectedIndex, list.length - 1));
    this.selectedId = list[this.selectedIndex]?.id ?? null;
  }

  selected(): SessionView | undefined {
    const rows = this.rows();
    return rows[this.selectedIndex];
  }

  move(delta: number): void {
    const rows = this.rows();
    if (rows.length === 0) return;
    this.selectedIndex = Math.max(0, Math.min(rows.length - 1, this.selectedIndex + delta));
    this.selectedId = rows[this.selectedIndex]!.id;
  }

  moveTo(index: number): void {
    this.move(index - this.selectedIndex);
  }

  /** The rows that fit in `height` lines, scrolled so that the selection is visible. */
  window(height: number): { start: number; rows: SessionView[] } {
    const rows = this.rows();
    const h = Math.max(1, height);
    if (this.selectedIndex < this.scrollTop) this.scrollTop = this.selectedIndex;
    if (this.selectedIndex >= this.scrollTop + h) this.scrollTop = this.selectedIndex - h + 1;
    this.scrollTop = Math.max(0, Math.min(this.scrollTop, Math.max(0, rows.length - h)));
    return { start: this.scrollTop, rows: rows.slice(this.scrollTop, this.scrollTop + h) };
  }

  // ---- the bans view -------------------------------------------------------------------

  /** Bans as the bans view lists them: soonest to end first, then by kind and who. */
  banRows(): Ban[] {
    return [...this.bans].sort((a, b) => (a.expiresAt ?? Infinity) - (b.expiresAt ?? Infinity) || banKey(a).localeCompare(banKey(b)));
  }

  selectedBan(): Ban | undefined {
    return this.banRows().find((b) => banKey(b) === this.selectedBanId) ?? this.banRows()[this.banIndex];
  }

  moveBan(delta: number): void {
    const rows = this.banRows();
    if (rows.length === 0) return;
    const at = Math.max(0, rows.findIndex((b) => banKey(b) === this.selectedBanId));
    this.banIndex = Math.max(0, Math.min(rows.length - 1, at + delta));
    this.selectedBanId = banKey(rows[this.banIndex]!);
  }

  /** Keeps the ban selection on a ban that exists (the one chosen, else the one now at its place). */
  private banSelection(): void {
    const rows = this.banRows();
    const at = rows.findIndex((b) => banKey(b) === this.selectedBanId);
    if (at >= 0) {
      this.banIndex = at;
      return;
    }
    this.banIndex = Math.max(0, Math.min(this.banIndex, rows.length - 1));
    this.selectedBanId = rows[this.banIndex] ? banKey(rows[this.banIndex]!) : null;
  }

  /** Live sessions from one address (what a ban would end). */
  sessionsFrom(ip: string): number {
    return this.sessionsCovered({ ip });
  }

  /** Live sessions a ban of an address, a user, or a user from an address would end (the user as logged in). */
  sessionsCovered(target: { ip?: string; user?: string }): number {
    let n = 0;
    for (const s of this.sessions.values()) {
      if (target.ip !== undefined && s.clientIp !== target.ip) continue;
      if (target.user !== undefined && s.user?.toLowerCase() !== target.user.toLowerCase()) continue;
      n++;
    }
    return n;
  }
}

// ---- helpers -------------------------------------------------------------------------

function view(info: SessionInfo): SessionView {
  const s = { ...info, haystack: '' };
  s.haystack = haystack(s);
  return s;
}

function haystack(s: SessionInfo): string {
  return [s.id, s.listener, s.clientIp, s.user ?? '', s.backend ?? '', s.state, s.tlsVersion ?? '', s.protocol].join(' ').toLowerCase();
}

type Cmp = (a: SessionView, b: SessionView) => number;

function byString(pick: (s: SessionView) => string | null): Cmp {
  return (a, b) => {
    const x = pick(a) ?? '';
    const y = pick(b) ?? '';
    return x < y ? -1 : x > y ? 1 : 0;
  };
}

function byNumber(pick: (s: SessionView) => number): Cmp {
  return (a, b) => pick(a) - pick(b);
}

const STATE_ORDER: Record<string, number> = { handshake: 0, starttls: 1, preauth: 2, authenticating: 3, relaying: 4, closing: 5, closed: 6 };

function comparator(key: SortKey): Cmp {
  switch (key) {
    case 'age':
      // Oldest first ascending: age grows as startedAt shrinks.
      return byNumber((s) => -s.startedAt);
    case 'idle':
      return byNumber((s) => -s.lastActivity);
    case 'id':
      return byNumber((s) => idNumber(s.id));
    case 'listener':
      return byString((s) => s.listener);
    case 'client':
      return byString((s) => s.clientIp);
    case 'user':
      return byString((s) => s.user);
    case 'backend':
      return byString((s) => s.backend);
    case 'tls':
      return byString((s) => s.tlsVersion);
    case 'in':
      return byNumber((s) => s.bytesIn);
    case 'out':
      return byNumber((s) => s.bytesOut);
    case 'state':
      return byNumber((s) => STATE_ORDER[s.state] ?? 9);
    default: {
      const never: never = key;
      throw new Error(`unknown sort key ${String(never)}`);
    }
  }
}

/** Session ids are "<pid base36>-<counter base36>": order by the counter. */
function idNumber(id: string): number {
  const dash = id.lastIndexOf('-');
  const n = parseInt(id.slice(dash + 1), 36);
  return Number.isFinite(n) ? n : 0;
}

/** The log line for an event, or null for the routine ones. */
export function describe(e: ControlEvent): { level: LogLevel; text: string } | null {
  switch (e.type) {
    case 'opened':
    case 'authenticated':
    case 'update':
      return null;
    case 'closed':
      if (ROUTINE_CLOSE.has(e.reason)) return null;
      return {
        level: e.reason.startsWith('backend') || e.reason === 'internal-error' ? 'error' : 'warn',
        text: `${e.reason}: ${e.id} ${who(e.user, e.clientIp)} on ${e.listener}${e.backend ? ` → ${e.backend}` : ''}`,
      };
    case 'refused':
      return { level: 'warn', text: `refused ${e.clientIp} on ${e.listener}: ${e.reason}` };
    case 'auth-failed':
      return { level: 'warn', text: `login failed: ${who(e.user, e.clientIp)} on ${e.listener}` };
    case 'banned':
      return {
        level: 'warn',
        text: `banned ${banTarget(e.ban)}${e.ban.expiresAt ? ` until ${clock(e.ban.expiresAt)}` : ''} (${e.ban.reason})${e.killed ? `, ${e.killed} session${e.killed === 1 ? '' : 's'} ended` : ''}`,
      };
    case 'unbanned':
      return { level: 'info', text: `unbanned ${banTarget({ ip: e.ip, user: e.user ?? null })}` };
    case 'cert':
      return { level: 'info', text: `certificate ${e.cert.names.join(', ')}: valid until ${day(e.cert.notAfter)} (${e.cert.source})` };
    case 'tls-report':
      if (!e.ok) return { level: 'warn', text: `TLS report refused (${e.reason ?? 'unknown'})` };
      return {
        level: e.failure > 0 ? 'warn' : 'info',
        text: `TLS report from ${e.organization || 'an unnamed sender'}: ${e.success} sessions ok, ${e.failure} failed`,
      };
    case 'reload': {
      if (!e.ok) return { level: 'error', text: `reload refused: ${e.error ?? 'unknown error'}` };
      const parts = [e.started.length ? `started ${e.started.join(', ')}` : '', e.stopped.length ? `stopped ${e.stopped.join(', ')}` : ''].filter(Boolean);
      return { level: 'info', text: `configuration reloaded${parts.length ? `: ${parts.join('; ')}` : ''}` };
    }
    default: {
      const never: never = e;
      throw new Error(`unknown event ${JSON.stringify(never)}`);
    }
  }
}

/** A ban's key in the dashboard: its id, or its address from a daemon without ids. */
export function banKey(b: Ban): string {
  return b.id ?? b.ip ?? '';
}

/** Who a ban stops, in words: "192.0.2.7", "user alice", "user alice from 192.0.2.7". */
export function banTarget(b: Pick<Ban, 'ip' | 'user'>): string {
  if (b.user) return b.ip ? `user ${b.user} from ${b.ip}` : `user ${b.user}`;
  return b.ip ?? '?';
}

function who(user: string | null, ip: string): string {
  return user ? `${user} from ${ip}` : ip;
}

/**
 * Strings that come from clients (user names) must not reach the terminal
 * raw: control characters would be terminal escape sequences.
 */
export function sanitize(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');
}

function clock(ms: number): string {
  return new Date(ms).toTimeString().slice(0, 5);
}

function day(ms: number): string {
  return new Date(ms).toISOString().slice(0, 10);
}
