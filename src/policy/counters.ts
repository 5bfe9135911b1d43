/**
 * Fixed-window counters (connections, failed logins, messages, requests per
 * key), kept by the `rate-limiter-flexible` library: in this process's memory,
 * or in Redis so that several gateways count together. The library only
 * counts here; what a count means (refuse, ban) is decided by the caller, so
 * a reload that changes a threshold keeps the counts.
 *
 * In a cluster (src/cluster/policy-link.ts) with the memory store, a `shared`
 * limiter takes Redis's place: the workers count in the primary's memory.
 *
 * When Redis (or the primary) fails or is slow, a counter carries on in memory
 * and the failure is logged (at most once per STORE_LOG_INTERVAL_MS): limits
 * keep working on each gateway alone rather than not at all.
 */
import type { Redis } from 'ioredis';
import { RateLimiterMemory, RateLimiterRedis, type RateLimiterAbstract } from 'rate-limiter-flexible';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';

export interface Count {
  /** Hits in the current window, including this one. */
  count: number;
  /** Until the window ends and the count starts again. */
  resetMs: number;
}

export interface WindowCounter {
  readonly windowMs: number;
  /** Counts `n` hits now. */
  hit(key: string, n?: number): Promise<Count>;
  /** The current count without adding to it (0 when there is none). */
  peek(key: string): Promise<Count>;
  reset(key: string): Promise<void>;
}

/** Makes the limiter that counts for every process; the options are the ones the memory limiter gets. */
export type SharedLimiter = (opts: { keyPrefix: string; points: number; duration: number }) => RateLimiterAbstract;

/** The library counts points up to this; the caller compares with its own maximum. */
const UNLIMITED = 2_000_000_000;
const STORE_LOG_INTERVAL_MS = 10_000;

/** Logs store failures, rate-limited so that a Redis outage is a line every few seconds, not a flood. */
export class StoreErrors {
  private last = 0;
  private suppressed = 0;
  private readonly log: Logger;

  constructor(log: Logger) {
    this.log = log;
  }

  report(what: string, err: unknown): void {
    const now = Date.now();
    if (now - this.last < STORE_LOG_INTERVAL_MS) {
      this.suppressed++;
      return;
    }
    this.log.warn({ what, err: errorMessage(err), suppressed: this.suppressed }, 'policy store failed, using this gateway\'s memory');
    this.last = now;
    this.suppressed = 0;
  }
}

export class CounterStore {
  private readonly counters = new Map<string, WindowCounter>();
  private readonly redis: Redis | undefined;
  private readonly shared: SharedLimiter | undefined;
  private readonly prefix: string;
  private readonly errors: StoreErrors;

  /** `shared` is used when there is no `redis`. */
  constructor(opts: { redis?: Redis | undefined; shared?: SharedLimiter | undefined; prefix: string; errors: StoreErrors }) {
    this.redis = opts.redis;
    this.shared = opts.shared;
    this.prefix = opts.prefix;
    this.errors = opts.errors;
  }

  /** The counter for `name` with this window; the same one (and its counts) each time it is asked for. */
  counter(name: string, windowMs: number): WindowCounter {
    const seconds = Math.max(1, Math.ceil(windowMs / 1000));
    const id = `${name}:${seconds}`;
    let c = this.counters.get(id);
    if (!c) {
      c = this.make(`${this.prefix}:c:${id}`, seconds);
      this.counters.set(id, c);
    }
    return c;
  }

  private make(keyPrefix: string, seconds: number): WindowCounter {
    const memory = new RateLimiterMemory({ keyPrefix, points: UNLIMITED, duration: seconds });
    const shared: RateLimiterAbstract | undefined = this.redis
      ? new RateLimiterRedis({ storeClient: this.redis, keyPrefix, points: UNLIMITED, duration: seconds, rejectIfRedisNotReady: true })
      : this.shared?.({ keyPrefix, points: UNLIMITED, duration: seconds });
    const errors = this.errors;
    const windowMs = seconds * 1000;
    const toCount = (res: { consumedPoints: number; msBeforeNext: number } | null): Count =>
      res ? { count: res.consumedPoints, resetMs: Math.max(0, res.msBeforeNext) } : { count: 0, resetMs: 0 };
    async function run<T>(what: string, redisOp: (l: RateLimiterAbstract) => Promise<T>, memoryOp: (l: RateLimiterAbstract) => Promise<T>): Promise<T> {
      if (shared) {
        try {
          return await redisOp(shared);
        } catch (err) {
          // The library rejects with an Error for store failures (a result object only when over `points`, which we never reach).
          errors.report(what, err);
        }
      }
      return memoryOp(memory);
    }
    return {
      windowMs,
      hit: (key, n = 1) =>
        run(
          'count',
          (l) => l.consume(key, n).then(toCount),
          (l) => l.consume(key, n).then(toCount),
        ),
      peek: (key) =>
        run(
          'read',
          (l) => l.get(key).then(toCount),
          (l) => l.get(key).then(toCount),
        ),
      reset: (key) =>
        run(
          'reset',
          async (l) => {
            await l.delete(key);
            await memory.delete(key);
          },
          async (l) => {
            await l.delete(key);
          },
        ),
    };
  }
}
