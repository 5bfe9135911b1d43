/**
 * The ordering lock: several gateways sharing one certificate store must not
 * order the same name at once. One small contract, two kinds:
 *
 *   - file:  `acme/locks/<name>.lock` in the storage folder (storage.ts);
 *   - redis: `<prefix>:acme:lock:<ca>:<name>` in the policy store's Redis,
 *            set with `SET NX PX <ttl>`, kept alive by a compare-and-PEXPIRE
 *            script while the order runs, removed by compare-and-delete, so
 *            a holder only ever extends or removes its own lock. A holder that
 *            dies stops refreshing and loses the lock after the TTL.
 *
 * When Redis cannot be reached, the Redis kind takes the file lock instead and
 * says so in a warning: ordering never runs unlocked without a word.
 * Each acquisition opens its own short-lived connection (orders are rare), so
 * there is nothing to close when the lock or the gateway goes away.
 */
import { randomBytes } from 'node:crypto';
import { hostname as osHostname } from 'node:os';
import { Redis } from 'ioredis';
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { AcmeSettings, LockSettings } from './settings.ts';
import { acquireLock, caKey, LOCK_REFRESH_MS, LOCK_STALE_MS, type AcmeStorage } from './storage.ts';

export interface HeldLock {
  /** Removes the lock if it is still ours; safe to call twice. */
  release(): Promise<void>;
}

export interface AcquireOptions {
  /** Give up (ACME_LOCK error) after waiting this long for another holder. */
  waitMs: number;
  /** Stop waiting when this says so (gateway stopping, name removed). */
  cancelled?: () => boolean;
  /** Told once when the lock is busy and we start waiting, with what the holder wrote. */
  onWait?: (holder: string) => void;
  /** Keeping the lock alive failed, or it was lost; reported, not fatal (the CA tolerates a duplicate order). */
  onRefreshError?: (err: unknown) => void;
}

export interface OrderLock {
  readonly kind: 'file' | 'redis';
  acquire(name: string, opts: AcquireOptions): Promise<HeldLock>;
}

export class FileOrderLock implements OrderLock {
  readonly kind = 'file';
  private readonly storage: AcmeStorage;

  constructor(storage: AcmeStorage) {
    this.storage = storage;
  }

  acquire(name: string, opts: AcquireOptions): Promise<HeldLock> {
    return acquireLock(this.storage.lockFile(name), opts);
  }
}

export interface RedisLockOptions {
  url: string;
  prefix: string;
  /** Connect and command deadline. */
  timeoutMs: number;
  /** The CA's directory URL: locks are per CA, like storage. */
  directory: string;
  /** Taken when Redis cannot be reached. */
  fallback: OrderLock;
  log: Logger;
  /** How long a lock lives without a refresh (a dead holder's lock frees itself after this). */
  ttlMs?: number;
  refreshMs?: number;
  /** Retry delays while another gateway holds the lock: doubling from min to max, with jitter. */
  pollMinMs?: number;
  pollMaxMs?: number;
}

/** Extends the key's life only while it still holds our token. */
const REFRESH_SCRIPT = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end`;
/** Deletes the key only while it still holds our token. */
const RELEASE_SCRIPT = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;

export class RedisOrderLock implements OrderLock {
  readonly kind = 'redis';
  private readonly opts: RedisLockOptions;
  private readonly ttlMs: number;
  private readonly refreshMs: number;
  private readonly pollMinMs: number;
  private readonly pollMaxMs: number;

  constructor(opts: RedisLockOptions) {
    this.opts = opts;
    this.ttlMs = opts.ttlMs ?? LOCK_STALE_MS;
    this.refreshMs = opts.refreshMs ?? LOCK_REFRESH_MS;
    this.pollMinMs = opts.pollMinMs ?? 250;
    this.pollMaxMs = opts.pollMaxMs ?? 5_000;
  }

  key(name: string): string {
    return `${this.opts.prefix}:acme:lock:${caKey(this.opts.directory)}:${name.toLowerCase()}`;
  }

  async acquire(name: string, opts: AcquireOptions): Promise<HeldLock> {
    const deadline = Date.now() + opts.waitMs;
    const key = this.key(name);
    const log = this.opts.log;
    let holding = false;
    const redis = new Redis(this.opts.url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      connectTimeout: this.opts.timeoutMs,
      commandTimeout: this.opts.timeoutMs,
      // Until the lock is ours a lost connection means the file lock; once held, the client reconnects so refreshes and the release get through.
      retryStrategy: (times) => (holding ? Math.min(times * 250, 2_000) : null),
    });
    // Connection errors reach the caller through the failing command; this only keeps a record.
    redis.on('error', (err: Error) => log.debug({ name, key, err: errorMessage(err) }, 'ordering lock: Redis connection error'));
    try {
      await redis.connect();
      const held = await this.take(redis, key, opts, deadline);
      holding = true;
      return held;
    } catch (err) {
      if (redis.status !== 'end') redis.disconnect();
      if (err instanceof MailgateError && err.code === 'ACME_LOCK') throw err;
      log.warn({ name, key, err: errorMessage(err) }, 'ordering lock: Redis is not reachable; using the file lock in the storage folder instead');
      return this.opts.fallback.acquire(name, { ...opts, waitMs: Math.max(0, deadline - Date.now()) });
    }
  }

  /** SET NX until it is ours or the wait is over. Redis errors are thrown as they are (the caller falls back). */
  private async take(redis: Redis, key: string, opts: AcquireOptions, deadline: number): Promise<HeldLock> {
    const token = JSON.stringify({ pid: process.pid, host: osHostname(), token: randomBytes(12).toString('hex'), at: new Date().toISOString() });
    let told = false;
    for (let attempt = 0; ; attempt++) {
      if ((await redis.set(key, token, 'PX', this.ttlMs, 'NX')) === 'OK') break;
      if (!told) {
        told = true;
        opts.onWait?.((await redis.get(key)) ?? 'unknown');
      }
      const left = deadline - Date.now();
      if (left <= 0 || opts.cancelled?.()) {
        throw new MailgateError('ACME_LOCK', `${key} is held by another gateway (waited ${Math.round(opts.waitMs / 1000)}s)`);
      }
      const step = Math.min(this.pollMaxMs, this.pollMinMs * 2 ** Math.min(attempt, 20));
      await new Promise((r) => setTimeout(r, Math.max(1, Math.min(left, step / 2 + (Math.random() * step) / 2))));
    }
    return this.held(redis, key, token, opts);
  }

  private held(redis: Redis, key: string, token: string, opts: AcquireOptions): HeldLock {
    const log = this.opts.log;
    let lost = false;
    const refresh = setInterval(() => {
      redis.eval(REFRESH_SCRIPT, 1, key, token, String(this.ttlMs)).then(
        (r) => {
          if (r === 1 || lost) return;
          lost = true;
          opts.onRefreshError?.(new MailgateError('ACME_LOCK', `${key} expired before it was refreshed; another gateway may hold it now`));
        },
        (err: unknown) => opts.onRefreshError?.(err),
      );
    }, this.refreshMs);
    refresh.unref();
    let released: Promise<void> | undefined;
    return {
      release: () => {
        released ??= (async () => {
          clearInterval(refresh);
          try {
            await redis.eval(RELEASE_SCRIPT, 1, key, token);
          } catch (err) {
            throw new MailgateError('ACME_LOCK', `cannot release ${key} (it expires by itself): ${errorMessage(err)}`, { cause: err });
          } finally {
            await redis.quit().catch((err: unknown) => {
              log.debug({ key, err: errorMessage(err) }, 'ordering lock: Redis quit failed; disconnecting');
              redis.disconnect();
            });
          }
        })();
        return released;
      },
    };
  }
}

/** The lock the settings ask for: Redis when the policy store is Redis (and acme.lock is not `file`), else the file lock. */
export function orderLockFor(s: Pick<AcmeSettings, 'lock' | 'directory'>, storage: AcmeStorage, log: Logger): OrderLock {
  const file = new FileOrderLock(storage);
  const l: LockSettings = s.lock;
  if (l.type === 'file') return file;
  return new RedisOrderLock({ url: l.url, prefix: l.prefix, timeoutMs: l.timeoutMs, directory: s.directory, fallback: file, log });
}
