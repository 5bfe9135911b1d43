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
import { RateLimiterMemory, RateLimiterRedis, type IRateLimiterOptions, type RateLimiterAbstract, type RateLimiterRes } from 'rate-limiter-flexible';
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

/** Keys one memory counter keeps by default (policy_store.max_keys). */
export const DEFAULT_MAX_KEYS = 100_000;

/**
 * rate-limiter-flexible's memory limiter, with at most `maxKeys` keys.
 *
 * The library keeps each key until its window ends (a record and a timer,
 * about 460 bytes of heap each, measured on the cluster primary), however
 * many keys there are: 40,000 client addresses within a minute grew a
 * primary's heap by 18 MB, and failed logins keep theirs for up to an hour.
 * Here the keys are kept in the order their windows started (one window
 * length per limiter, so also the order they end); when a new key would pass
 * the bound, the key whose window started longest ago is deleted first (its
 * count starts again). Only the library's public API is used.
 */
export class BoundedMemoryLimiter extends RateLimiterMemory {
  /** key → when its window ends (ms), oldest first. */
  private readonly windows = new Map<string, number>();
  private readonly maxKeys: number;
  private readonly onFull: (() => void) | undefined;

  constructor(opts: IRateLimiterOptions, maxKeys = DEFAULT_MAX_KEYS, onFull?: () => void) {
    super(opts);
    this.maxKeys = Math.max(1, maxKeys);
    this.onFull = onFull;
  }

  /** Keys counted now (tests, and the bound). */
  get size(): number {
    this.expire(Date.now());
    return this.windows.size;
  }

  override async consume(key: string | number, points?: number, options?: { [key: string]: unknown }): Promise<RateLimiterRes> {
    const k = String(key);
    const now = Date.now();
    this.expire(now);
    const fresh = !this.windows.has(k);
    if (fresh) {
      let evicted = false;
      while (this.windows.size >= this.maxKeys) {
        const oldest = this.windows.keys().next();
        if (oldest.done) break;
        this.windows.delete(oldest.value);
        await super.delete(oldest.value);
        evicted = true;
      }
      if (evicted) this.onFull?.();
    }
    const res = await super.consume(key, points, options);
    if (fresh) this.windows.set(k, now + Math.max(0, res.msBeforeNext));
    return res;
  }

  override async delete(key: string | number, options?: { [key: string]: unknown }): Promise<boolean> {
    this.windows.delete(String(key));
    return super.delete(key, options);
  }

  /** Forgets keys whose window has ended (the library drops their records itself). */
  private expire(now: number): void {
    for (const [k, until] of this.windows) {
      if (until > now) break;
      this.windows.delete(k);
    }
  }
}

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

  private readonly maxKeys: number;
  private readonly log: Logger | undefined;
  private lastFull = 0;

  /** `shared` is used when there is no `redis`; `maxKeys` bounds each memory counter (policy_store.max_keys). */
  constructor(opts: { redis?: Redis | undefined; shared?: SharedLimiter | undefined; prefix: string; errors: StoreErrors; maxKeys?: number; log?: Logger }) {
    this.redis = opts.redis;
    this.shared = opts.shared;
    this.prefix = opts.prefix;
    this.errors = opts.errors;
    this.maxKeys = opts.maxKeys ?? DEFAULT_MAX_KEYS;
    this.log = opts.log;
  }

  /** A memory counter reached its bound and forgot its oldest counts: logged at most every STORE_LOG_INTERVAL_MS. */
  private full(name: string): void {
    const now = Date.now();
    if (now - this.lastFull < STORE_LOG_INTERVAL_MS) return;
    this.lastFull = now;
    this.log?.warn({ counter: name, maxKeys: this.maxKeys }, 'policy counter full: the counts that started longest ago are forgotten (policy_store.max_keys)');
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
    const memory = new BoundedMemoryLimiter({ keyPrefix, points: UNLIMITED, duration: seconds }, this.maxKeys, () => this.full(keyPrefix));
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
