/**
 * The IPC seam between the primary and its workers (node:cluster's channel).
 *
 * Every mailgate message travels in an envelope `{ mailgate: msg }` so it
 * never collides with other users of the channel (rate-limiter-flexible's
 * cluster limiters share it). A message's `t` names its part by prefix:
 * `policy.*` (policy-link.ts), `registry.*` (registry-link.ts), the rest
 * is the lifecycle (messages.ts). Each part exposes a `handle(msg)` that
 * ignores what is not its own, so a router is a loop over parts.
 */

/** Any mailgate message: a discriminated union per part, all with `t`. */
export interface Message {
  readonly t: string;
}

/** The primary's handle on one worker, as the parts see it. */
export interface WorkerLink {
  /** 1-based, stable across restarts of the same slot. */
  readonly index: number;
  /** Process id of the worker's current process. */
  readonly pid: number;
  send(msg: Message): void;
}

/** A worker's handle on the primary. */
export interface PrimaryLink {
  send(msg: Message): void;
}

export function envelope(msg: Message): { mailgate: Message } {
  return { mailgate: msg };
}

/** The mailgate message inside a raw IPC message, or undefined when it is someone else's. */
export function unwrap(raw: unknown): Message | undefined {
  if (typeof raw !== 'object' || raw === null || !('mailgate' in raw)) return undefined;
  const m = (raw as { mailgate: unknown }).mailgate;
  return typeof m === 'object' && m !== null && typeof (m as { t?: unknown }).t === 'string' ? (m as Message) : undefined;
}
