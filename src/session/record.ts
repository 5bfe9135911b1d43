/**
 * A session's record, defined once: the fields fixed when it opens, the live
 * fields that change while it runs, and what the control socket sends of
 * them. The registry keeps records of this shape; the control protocol's
 * SessionInfo and `update` events, a worker's reports to its primary and the
 * dashboard's rows are all derived from LIVE_FIELDS and SessionInfo here.
 */
import type { CloseReason } from '../protocols/types.ts';

export type SessionState = 'handshake' | 'preauth' | 'starttls' | 'authenticating' | 'relaying' | 'closing' | 'closed';

/** Who and where: set when the session opens, never changed. */
export interface SessionOrigin {
  readonly id: string;
  readonly listener: string;
  readonly protocol: 'imap' | 'pop3' | 'smtp' | 'http';
  readonly clientIp: string;
  readonly clientPort: number;
  /** ms since the epoch */
  readonly startedAt: number;
}

/** The fields that change while the session lives, in the order they are compared and sent. */
export const LIVE_FIELDS = ['state', 'lastActivity', 'bytesIn', 'bytesOut', 'user', 'backend', 'tlsVersion', 'tlsCipher', 'messages', 'recipients'] as const;
export type LiveField = (typeof LIVE_FIELDS)[number];

export interface LiveFields {
  state: SessionState;
  lastActivity: number;
  /** From the client, and to it (TLS included where the session counts the wire). */
  bytesIn: number;
  bytesOut: number;
  user: string | null;
  backend: string | null;
  /** Set once the TLS handshake is done. */
  tlsVersion: string | null;
  tlsCipher: string | null;
  /** SMTP only: messages and recipients seen after authentication. */
  messages: number;
  recipients: number;
}

/** What the control socket says about a live session: where it comes from and its live fields. */
export type SessionInfo = SessionOrigin & LiveFields;

/** The registry's record: the session as the control socket sees it, and why it ended once it has. */
export interface SessionRecord extends SessionInfo {
  closeReason: CloseReason | null;
}

/** A record as a session opens: who and where, nothing moved yet. */
export function newSessionRecord(opened: Omit<SessionOrigin, 'startedAt'> & Pick<LiveFields, 'state'>, now = Date.now()): SessionRecord {
  return {
    ...opened,
    startedAt: now,
    lastActivity: now,
    bytesIn: 0,
    bytesOut: 0,
    user: null,
    backend: null,
    tlsVersion: null,
    tlsCipher: null,
    messages: 0,
    recipients: 0,
    closeReason: null,
  };
}

/** A copy of the live fields, to tell later what changed (control socket updates, a worker's reports). */
export function liveFields(r: LiveFields): LiveFields {
  const copy = {} as Record<LiveField, unknown>;
  for (const f of LIVE_FIELDS) copy[f] = r[f];
  return copy as LiveFields;
}

export function sameLiveFields(a: LiveFields, b: LiveFields): boolean {
  return LIVE_FIELDS.every((f) => a[f] === b[f]);
}

/** The record as the control socket sends it (without the close reason, which has an event of its own). */
export function sessionInfo(r: SessionInfo): SessionInfo {
  return {
    id: r.id,
    listener: r.listener,
    protocol: r.protocol,
    clientIp: r.clientIp,
    clientPort: r.clientPort,
    startedAt: r.startedAt,
    ...liveFields(r),
  };
}
