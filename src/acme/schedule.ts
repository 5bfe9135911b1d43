/**
 * When to renew and when to retry, as pure functions of the certificate's
 * dates, the clock and a random source (tests pass both).
 */

const DAY = 86_400_000;

export interface Validity {
  notBefore: Date;
  notAfter: Date;
}

/**
 * Without ARI: renew when a third of the lifetime is left, or half of it for
 * certificates that live less than 10 days (Let's Encrypt's 6-day
 * "shortlived" profile), so a short certificate has days, not hours, to
 * recover from a failing CA.
 */
export function fallbackRenewAt(v: Validity): Date {
  const lifetime = Math.max(0, v.notAfter.getTime() - v.notBefore.getTime());
  const share = lifetime < 10 * DAY ? 1 / 2 : 1 / 3;
  return new Date(v.notAfter.getTime() - Math.round(lifetime * share));
}

/**
 * Expiry is "approaching" once less than half of the fallback renewal window
 * is left (90-day certificate: 15 days; 6-day: 1.5 days). Reaching it with
 * renewal failing is an error, not a warning.
 */
export function criticalAt(v: Validity): Date {
  const window = v.notAfter.getTime() - fallbackRenewAt(v).getTime();
  return new Date(v.notAfter.getTime() - Math.round(window / 2));
}

export interface BackoffSettings {
  minMs: number;
  maxMs: number;
}

/**
 * The wait after the n-th consecutive failure (n >= 1): min·2^(n-1), capped
 * at max and at a tenth of the certificate's lifetime when there is one (a
 * 6-day certificate retries at least every ~14 hours), then "equal jitter":
 * between half and all of it, so gateways that failed together do not come
 * back together. A Retry-After from the CA is a floor.
 */
export function backoffDelay(failures: number, s: BackoffSettings, opts: { lifetimeMs?: number; retryAfterMs?: number; random?: () => number } = {}): number {
  const random = opts.random ?? Math.random;
  let cap = s.maxMs;
  if (opts.lifetimeMs !== undefined && opts.lifetimeMs > 0) cap = Math.min(cap, Math.max(s.minMs, Math.round(opts.lifetimeMs / 10)));
  const exp = Math.min(cap, s.minMs * 2 ** Math.min(30, Math.max(0, failures - 1)));
  const jittered = Math.round(exp / 2 + random() * (exp / 2));
  return Math.max(jittered, opts.retryAfterMs ?? 0);
}

/** setTimeout takes at most 2^31-1 ms; long waits are cut into check_interval steps anyway. */
export const MAX_TIMER_MS = 2 ** 31 - 1;
