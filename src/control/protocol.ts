/**
 * The control socket's wire protocol: newline-delimited JSON, one message per
 * line, versioned. The daemon speaks first (`hello`); a client sends requests
 * `{ id, cmd, args }` and gets one `reply` per request. After `subscribe` the
 * daemon sends one `snapshot`, then `events` batches (every flush interval,
 * with absolute counters so a client never has to add events up to be right).
 *
 * Shared by the daemon (control/server.ts) and its clients (control/client.ts,
 * the dashboard, the CLI verbs); of the daemon it takes only the session
 * record's type (src/session/record.ts), so a session is described once.
 */
import { z } from 'zod';
import type { ReloadResult } from '../listeners/types.ts';
import type { LiveFields, SessionInfo } from '../session/record.ts';

/** Bumped on any incompatible change; a client refuses a daemon with another version. */
export const PROTOCOL_VERSION = 1;

/** Longest request line the daemon reads; past it the client is answered with an error and dropped. */
export const MAX_REQUEST_LINE = 64 * 1024;
/** Longest line a client reads (a snapshot of 10,000 sessions is about 3 MiB). */
export const MAX_MESSAGE_LINE = 64 * 1024 * 1024;

// ---- what the daemon describes --------------------------------------------

/** A live session's state, and the session as the daemon describes it (defined once, src/session/record.ts). */
export type { SessionInfo, SessionState as SessionStateName } from '../session/record.ts';

/** The live fields of a session that changed since the last update; sent coalesced, once per update interval. */
export type SessionUpdate = { type: 'update'; id: string } & LiveFields;

/** The last backend connection attempt seen on a listener. */
export interface BackendHealth {
  ok: boolean;
  at: number;
  latencyMs: number | null;
  /** The close reason of a failed attempt (backend-unavailable, backend-timeout, backend-no-auth). */
  error: string | null;
  /**
   * ok; down (unreachable, too slow, broken: an outage); or misconfigured (it
   * answers, but cannot do what the listener asks of it: a configuration
   * error). Absent from a daemon that predates it: ok, or down.
   */
  state?: 'ok' | 'down' | 'misconfigured';
  /** For misconfigured: what is wrong and what to do. */
  detail?: string | null;
}

/** One member of a listener's backend pool (its own, or a list route's that applies to it). */
export interface PoolMemberStatus {
  backend: string;
  /** From the last active check (up until the first one). */
  up: boolean;
  checkedAt: number | null;
  /** Since when `up` has held. */
  since: number | null;
  latencyMs: number | null;
  error: string | null;
  /** Live sessions of this listener on this member. */
  sessions: number;
}

export interface ListenerStatus {
  name: string;
  protocol: 'imap' | 'pop3' | 'smtp' | 'http';
  tls: string;
  /** The configured listen addresses. */
  listen: string[];
  /** The addresses actually bound; empty when the listener is down. */
  addresses: string[];
  up: boolean;
  backend: string;
  backendHealth: BackendHealth | null;
  /** The backend pool's members and their health, when the listener (or a route for it) names a pool. */
  pool?: PoolMemberStatus[];
}

/** Absolute counters since the daemon started, per listener. */
export interface ListenerCounters {
  listener: string;
  /** Live sessions now. */
  sessions: number;
  /** Sessions accepted (registered), including those refused afterwards. */
  accepted: number;
  authOk: number;
  authFail: number;
  refused: number;
  /** Bytes from clients / to clients, closed and live sessions together. */
  bytesIn: number;
  bytesOut: number;
}

export interface CertRenewal {
  failing: boolean;
  lastError: string | null;
  nextAttemptAt: number | null;
}

export interface CertStatus {
  names: string[];
  source: 'file' | 'self-signed' | 'acme';
  issuer: string;
  subject: string;
  notBefore: number;
  notAfter: number;
  /** Whole days until notAfter (negative once expired). */
  daysLeft: number;
  fingerprint256: string;
  certFile: string | null;
  /** Filled in by the ACME part when it renews this certificate. */
  renewal: CertRenewal | null;
}

export interface Ban {
  /**
   * The ban's id in the policy store ("address:192.0.2.7", "range:192.0.2.0/24",
   * "user:alice", "pair:192.0.2.7|alice"): `unban { id }` lifts exactly this one.
   */
  id?: string;
  /** An address, a range, a user everywhere, or a user from one address; absent: an address or range. */
  kind?: 'address' | 'range' | 'user' | 'pair';
  /** The address or CIDR block; null for a user banned everywhere. */
  ip: string | null;
  /** The user (one key of username_format) for user and pair bans. */
  user?: string | null;
  /** The administrator's words, or why the policy banned (shown to the client for a manual ban). */
  reason: string;
  createdAt: number;
  /** null: until removed */
  expiresAt: number | null;
  source: 'manual' | 'auto' | 'config';
}

/** What a reload did, as the control protocol carries it (the listeners' own result). */
export type ReloadOutcome = ReloadResult;

/** One worker process of a cluster primary. */
export interface WorkerStatus {
  index: number;
  pid: number;
  state: 'starting' | 'ready' | 'stopping' | 'dead';
  /** Times this worker slot was started again after its process died. */
  restarts: number;
}

/** TLS reports (RFC 8460) the gateway took since start, when it takes them (discovery.tls_rpt). */
export interface TlsReportStatus {
  accepted: number;
  refused: number;
  /** Sessions the reporting MTAs counted, over every report. */
  success: number;
  failure: number;
}

export interface StatusInfo {
  protocol: number;
  version: string;
  pid: number;
  /** Worker processes (a cluster primary answers); absent when one process serves everything. */
  workers?: WorkerStatus[];
  hostname: string;
  configFile: string;
  startedAt: number;
  now: number;
  uptimeMs: number;
  listeners: ListenerStatus[];
  sessions: number;
  counters: ListenerCounters[];
  certs: CertStatus[];
  bans: { supported: boolean; count: number };
  control: { clients: number; dropped: number };
  lastReload: (ReloadOutcome & { at: number }) | null;
  /** Present when the gateway takes TLS reports. */
  tlsReports?: TlsReportStatus;
}

// ---- events ------------------------------------------------------------------

export type ControlEvent =
  | { type: 'opened'; at: number; session: SessionInfo }
  | { type: 'authenticated'; at: number; session: SessionInfo }
  | SessionUpdate
  | {
      type: 'closed';
      at: number;
      id: string;
      listener: string;
      clientIp: string;
      user: string | null;
      backend: string | null;
      reason: string;
      bytesIn: number;
      bytesOut: number;
      durationMs: number;
    }
  /** `code`: why, as metrics count it; `reason`: what the client was told. */
  | { type: 'refused'; at: number; listener: string; clientIp: string; code?: string; reason: string }
  | { type: 'auth-failed'; at: number; id: string; listener: string; clientIp: string; user: string | null }
  | { type: 'banned'; at: number; ban: Ban; killed: number }
  | { type: 'unbanned'; at: number; ip: string | null; id?: string; user?: string | null }
  | { type: 'cert'; at: number; cert: CertStatus }
  /** A TLS report was posted: from whom (sender text, shown sanitised), and the sessions it counts; or refused, and why. */
  | { type: 'tls-report'; at: number; ok: boolean; organization: string; success: number; failure: number; reason?: string }
  | ({ type: 'reload'; at: number } & ReloadOutcome);

// ---- messages ------------------------------------------------------------------

export interface Hello {
  type: 'hello';
  protocol: number;
  server: 'mailgate';
  version: string;
  pid: number;
  startedAt: number;
}

export interface Snapshot {
  type: 'snapshot';
  /** Events with a higher seq come after this snapshot. */
  seq: number;
  at: number;
  status: StatusInfo;
  sessions: SessionInfo[];
  bans: Ban[];
  /** The last events worth a log line (refusals, failed logins, unusual ends, bans, reloads), oldest first. */
  recent: ControlEvent[];
}

export interface EventBatch {
  type: 'events';
  seq: number;
  at: number;
  events: ControlEvent[];
  /** Events left out of this batch because too many came in one flush interval. */
  dropped: number;
  counters: ListenerCounters[];
}

export type ErrorCode = 'BAD_REQUEST' | 'UNKNOWN_COMMAND' | 'NOT_FOUND' | 'UNSUPPORTED' | 'FAILED' | 'BUSY' | 'TOO_LONG';

export interface ReplyError {
  code: ErrorCode;
  message: string;
}

export type Reply =
  | { type: 'reply'; id: RequestId; ok: true; result: unknown }
  | { type: 'reply'; id: RequestId | null; ok: false; error: ReplyError; result?: unknown };

export interface Bye {
  type: 'bye';
  reason: 'shutdown' | 'too-slow' | 'too-many-clients' | 'protocol-error';
}

export type ServerMessage = Hello | Snapshot | EventBatch | Reply | Bye;

export type RequestId = number | string;

export interface Request {
  id: RequestId;
  cmd: string;
  args?: Record<string, unknown>;
}

// ---- commands ------------------------------------------------------------------

const ipOrCidr = z
  .string()
  .max(64)
  .regex(/^[0-9A-Fa-f.:]+(\/\d{1,3})?$/, 'an IPv4/IPv6 address or a CIDR block');

/** A login name as a ban names it: no control characters, as long as a login name may be. */
const banUser = z.string().min(1).max(320).regex(/^[^\0-\x1f\x7f]+$/, 'a user name without control characters');

const banId = z.string().min(1).max(400).regex(/^(address|range|user|pair):[^\0-\x1f\x7f]+$/, 'a ban id from the `bans` list');

/** Arguments of the built-in commands, validated by the daemon before a handler runs. */
export const commandArgs = {
  status: z.strictObject({}),
  sessions: z.strictObject({ listener: z.string().max(64).optional(), limit: z.number().int().positive().max(1_000_000).optional() }),
  kill: z.strictObject({ id: z.string().min(1).max(64) }),
  ban: z
    .strictObject({
      /** An address or range; with `user`, the user from that address. */
      ip: ipOrCidr.optional(),
      /** A user (everywhere, or from `ip`). */
      user: banUser.optional(),
      seconds: z.number().int().positive().max(10 * 365 * 86_400),
      /** Shown in the ban list and logs, and to the client that is refused (cleaned and cut to one short line). */
      reason: z.string().max(200).optional(),
      /** End the live sessions the ban covers too (default true). */
      kill: z.boolean().optional(),
    })
    .refine((a) => a.ip !== undefined || a.user !== undefined, 'name an ip, a user, or both'),
  unban: z
    .strictObject({ ip: ipOrCidr.optional(), user: banUser.optional(), id: banId.optional() })
    .refine((a) => (a.id !== undefined) !== (a.ip !== undefined || a.user !== undefined), 'name an ip and/or a user, or a ban id'),
  bans: z.strictObject({}),
  reload: z.strictObject({}),
  certs: z.strictObject({}),
  subscribe: z.strictObject({}),
  unsubscribe: z.strictObject({}),
} as const;

/** What each built-in command answers with. */
export interface CommandResults {
  status: StatusInfo;
  sessions: SessionInfo[];
  kill: { id: string };
  /** `ban`: the first of `bans` (a user name may be banned under several keys). */
  ban: { ban: Ban; bans: Ban[]; killed: number };
  unban: { removed: boolean };
  bans: Ban[];
  reload: ReloadOutcome;
  certs: CertStatus[];
  subscribe: { seq: number };
  unsubscribe: Record<string, never>;
}

export type BuiltinCommand = keyof typeof commandArgs;
export type CommandArgs<C extends BuiltinCommand> = z.input<(typeof commandArgs)[C]>;

/** Command names are looked up in a table, never turned into method names. */
export const COMMAND_NAME = /^[a-z][a-z0-9.-]{0,63}$/;

const requestSchema = z.strictObject({
  id: z.union([z.number().int().min(0).max(Number.MAX_SAFE_INTEGER), z.string().max(64)]),
  cmd: z.string().regex(COMMAND_NAME, 'not a command name'),
  args: z.record(z.string(), z.unknown()).optional(),
});

// ---- encoding --------------------------------------------------------------------

/** One message as one line. JSON.stringify escapes control characters, so the line has no inner newline. */
export function encode(msg: ServerMessage | Request): string {
  return `${JSON.stringify(msg)}\n`;
}

export class ProtocolError extends Error {
  readonly code: ErrorCode;
  /** The request's id, when it could be read. */
  readonly requestId: RequestId | null;
  constructor(code: ErrorCode, message: string, requestId: RequestId | null = null) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
    this.requestId = requestId;
  }
}

/** Parses one request line. Throws a ProtocolError (BAD_REQUEST) naming what is wrong. */
export function decodeRequest(line: string): Request {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    throw new ProtocolError('BAD_REQUEST', 'not JSON');
  }
  const r = requestSchema.safeParse(raw);
  if (!r.success) {
    const parsedId = raw && typeof raw === 'object' && 'id' in raw ? requestSchema.shape.id.safeParse(raw.id) : undefined;
    const id = parsedId?.success ? parsedId.data : null;
    throw new ProtocolError('BAD_REQUEST', z.prettifyError(r.error).replace(/\n\s*/g, ' '), id);
  }
  return r.data.args === undefined ? { id: r.data.id, cmd: r.data.cmd } : { id: r.data.id, cmd: r.data.cmd, args: r.data.args };
}

/**
 * Parses one daemon message. Only the envelope is checked (the daemon is
 * trusted; the version check in `hello` guards the shape of the rest).
 */
export function decodeServerMessage(line: string): ServerMessage {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    throw new ProtocolError('BAD_REQUEST', 'daemon sent a line that is not JSON');
  }
  if (!raw || typeof raw !== 'object' || !('type' in raw) || typeof raw.type !== 'string') {
    throw new ProtocolError('BAD_REQUEST', 'daemon sent a message without a type');
  }
  switch (raw.type) {
    case 'hello':
    case 'snapshot':
    case 'events':
    case 'reply':
    case 'bye':
      return raw as ServerMessage;
    default:
      throw new ProtocolError('BAD_REQUEST', `daemon sent an unknown message type "${raw.type}"`);
  }
}

/**
 * Splits a byte stream into lines with a bound. Chunks are kept as a list and
 * joined only when a newline arrives, so a multi-megabyte snapshot costs one
 * copy, not one per chunk.
 */
export class LineDecoder {
  private readonly maxLine: number;
  private parts: Buffer[] = [];
  private pending = 0;

  constructor(maxLine: number) {
    this.maxLine = maxLine;
  }

  /** Complete lines (without "\n", a trailing "\r" removed); throws TOO_LONG past the bound. */
  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (;;) {
      const lf = chunk.indexOf(0x0a, start);
      if (lf < 0) break;
      const piece = chunk.subarray(start, lf);
      if (this.pending + piece.length > this.maxLine) throw new ProtocolError('TOO_LONG', `line longer than ${this.maxLine} bytes`);
      const whole = this.parts.length === 0 ? piece : Buffer.concat([...this.parts, piece]);
      this.parts = [];
      this.pending = 0;
      const text = whole.toString('utf8');
      lines.push(text.endsWith('\r') ? text.slice(0, -1) : text);
      start = lf + 1;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      if (this.pending + rest.length > this.maxLine) throw new ProtocolError('TOO_LONG', `line longer than ${this.maxLine} bytes`);
      // Copy: the caller's buffer may be reused by the stream.
      this.parts.push(Buffer.from(rest));
      this.pending += rest.length;
    }
    return lines;
  }

  get buffered(): number {
    return this.pending;
  }
}
