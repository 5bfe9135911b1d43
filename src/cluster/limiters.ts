/**
 * rate-limiter-flexible's cluster limiters, adapted: the one place mailgate
 * reaches past the library's API, each reach checked (a library that moved
 * it fails here, naming what moved; tests/unit/cluster/limiters.test.ts runs
 * both sides against the installed library).
 *
 * - Workers: each RateLimiterCluster adds its own process 'message'
 *   listener and lifts the process's listener limit for good
 *   (setMaxListeners(0)), which would hide real leaks. Here their listeners
 *   hang off one dispatcher that passes on only the library's messages (its
 *   `channel`), the limit is put back, and close() detaches them (a
 *   'message' listener keeps the IPC channel, and so the process, up).
 * - Primary: the RateLimiterClusterMaster keeps one memory limiter per key
 *   prefix (its `_rateLimiters`, not public API); the primary's own counters
 *   are those same limiters, so what the control socket reads includes
 *   every worker's hits. The master makes a plain RateLimiterMemory for a
 *   prefix a worker names first (its 'init'), which keeps every key until its
 *   window ends however many there are; `_rateLimiters` is therefore
 *   replaced by a proxy that turns each limiter stored in it into a
 *   BoundedMemoryLimiter (policy_store.max_keys).
 */
import cluster from 'node:cluster';
import { RateLimiterCluster, RateLimiterClusterMaster, RateLimiterMemory, type RateLimiterAbstract } from 'rate-limiter-flexible';
import { MailgateError } from '../core/errors.ts';
import { BoundedMemoryLimiter, DEFAULT_MAX_KEYS, type SharedLimiter } from '../policy/counters.ts';

/** rate-limiter-flexible's IPC messages carry this `channel` (lib/RateLimiterCluster.js). */
export const LIMITER_CHANNEL = 'rate_limiter_flexible';

function changed(what: string): MailgateError {
  return new MailgateError('POLICY_STORE', `policy link: ${what} (has rate-limiter-flexible changed? see src/cluster/limiters.ts)`);
}

/** A worker's limiters, counting in the primary's memory. */
export class WorkerLimiters {
  private readonly timeoutMs: number;
  private readonly listeners: ((msg: unknown) => void)[] = [];
  private attached = false;
  private readonly dispatch = (msg: unknown): void => {
    // Only the library's messages; ours travel in an envelope without `channel`.
    if (typeof msg !== 'object' || msg === null || (msg as { channel?: unknown }).channel !== LIMITER_CHANNEL) return;
    for (const l of this.listeners) l(msg);
  };

  constructor(timeoutMs: number) {
    // Here rather than at the first counter: a worker without the channel fails at start.
    if (typeof process.send !== 'function') {
      throw new MailgateError('POLICY_STORE', 'policy link: cluster counters need the IPC channel to the primary (this process is not a cluster worker)');
    }
    this.timeoutMs = timeoutMs;
  }

  readonly make: SharedLimiter = (opts) => {
    const before = new Set(process.listeners('message'));
    const max = process.getMaxListeners();
    const limiter = new RateLimiterCluster({ ...opts, timeoutMs: this.timeoutMs });
    process.setMaxListeners(max);
    const added = process.listeners('message').filter((l) => !before.has(l));
    const [listener] = added;
    if (added.length !== 1 || listener === undefined) throw changed(`RateLimiterCluster added ${added.length} process 'message' listeners, expected 1`);
    process.off('message', listener);
    this.listeners.push(listener as (msg: unknown) => void);
    if (!this.attached) {
      process.on('message', this.dispatch);
      this.attached = true;
    }
    return limiter;
  };

  /** The limiters stop hearing the primary: later hits time out and count in this process's memory. */
  close(): void {
    if (this.attached) process.off('message', this.dispatch);
    this.attached = false;
    this.listeners.length = 0;
  }
}

/** What the proxy over the master's limiters bounds them with: the latest masterLimiter() call's. */
const bounds: { maxKeys: number; onFull: ((keyPrefix: string) => void) | undefined } = { maxKeys: DEFAULT_MAX_KEYS, onFull: undefined };
const BOUNDED = Symbol('mailgate.bounded');

/** A limiter as the master keeps it: bounded, whoever made it. */
function bounded(prefix: string, limiter: unknown): unknown {
  if (!(limiter instanceof RateLimiterMemory) || limiter instanceof BoundedMemoryLimiter) return limiter;
  const onFull = bounds.onFull;
  return new BoundedMemoryLimiter({ keyPrefix: limiter.keyPrefix, points: limiter.points, duration: limiter.duration }, bounds.maxKeys, onFull && (() => onFull(prefix)));
}

/**
 * The primary's limiters: the very ones the library's master answers the
 * workers from, each bounded to `maxKeys` keys (policy_store.max_keys;
 * `onFull` hears when one forgets its oldest counts), whether the primary or
 * a worker's 'init' made it.
 */
export function masterLimiter(maxKeys = DEFAULT_MAX_KEYS, onFull?: (keyPrefix: string) => void): SharedLimiter {
  bounds.maxKeys = maxKeys;
  bounds.onFull = onFull;
  const max = cluster.getMaxListeners();
  // One per process (the library keeps a singleton); it listens on cluster 'message' for good.
  const master = new RateLimiterClusterMaster() as unknown as { _rateLimiters?: unknown };
  // The library lifts the limit for its one listener; keep it for everyone else's.
  cluster.setMaxListeners(max);
  const limiters = master._rateLimiters;
  if (typeof limiters !== 'object' || limiters === null) throw changed('RateLimiterClusterMaster has no _rateLimiters');
  let byPrefix = limiters as Record<string | symbol, unknown>;
  if (!byPrefix[BOUNDED]) {
    for (const [prefix, l] of Object.entries(byPrefix)) byPrefix[prefix] = bounded(prefix, l);
    byPrefix = new Proxy(byPrefix, {
      get: (target, prop) => (prop === BOUNDED ? true : target[prop]),
      set: (target, prop, value) => {
        target[prop] = typeof prop === 'string' ? bounded(prop, value) : value;
        return true;
      },
    });
    master._rateLimiters = byPrefix;
    if (master._rateLimiters !== byPrefix) throw changed('RateLimiterClusterMaster\'s _rateLimiters cannot be replaced');
  }
  const shared = byPrefix as Record<string, RateLimiterAbstract | undefined>;
  return (opts) => (shared[opts.keyPrefix] ??= new BoundedMemoryLimiter(opts, bounds.maxKeys, bounds.onFull && (() => bounds.onFull?.(opts.keyPrefix))));
}
