/**
 * Login attempts in flight: an attempt counts from the moment its
 * credentials go to be checked (by mailgate or the backend) until its
 * verdict, under the client's address and each key of the user (pair and
 * user). Failed logins are counted when the verdict comes, so without this a
 * burst of parallel guesses would all be checked before the first failure
 * is counted; with it, the policy refuses new attempts while the ones in
 * flight and the failures already counted reach a threshold.
 *
 * Every attempt has a deadline (the longest the session waits for its
 * verdict), after which it no longer counts even if its end was never
 * reported (a session that died, a process that was killed), so nothing
 * here outlives its deadline.
 *
 *   MemoryInFlight  this process (and a cluster primary for its workers)
 *   RedisInFlight   one sorted set per key in Redis (member: attempt id,
 *                   score: deadline), so gateways sharing Redis count
 *                   together; this process's memory when Redis fails
 */
import type { Redis } from 'ioredis';
import type { StoreErrors } from './counters.ts';

export interface InFlightStore {
  /** Adds attempt `id` under each key until `until` (ms since epoch); the attempts in flight per key, this one included. */
  start(keys: readonly string[], id: string, until: number, now: number): Promise<number[]>;
  /** The attempt is over (its verdict is in, or it was refused before any check). */
  end(keys: readonly string[], id: string): Promise<void>;
}

/** Keys kept at most; past it the oldest key is dropped (its attempts stop counting early). */
export const MAX_IN_FLIGHT_KEYS = 100_000;

export class MemoryInFlight implements InFlightStore {
  /** key → attempt id → deadline. Keys in the order they were made. */
  private readonly byKey = new Map<string, Map<string, number>>();
  private readonly max: number;

  constructor(max = MAX_IN_FLIGHT_KEYS) {
    this.max = max;
  }

  async start(keys: readonly string[], id: string, until: number, now: number): Promise<number[]> {
    return this.startNow(keys, id, until, now);
  }

  startNow(keys: readonly string[], id: string, until: number, now: number): number[] {
    return keys.map((key) => {
      let ids = this.byKey.get(key);
      if (!ids) {
        if (this.byKey.size >= this.max) this.makeRoom(now);
        ids = new Map();
        this.byKey.set(key, ids);
      } else {
        for (const [other, t] of ids) if (t <= now) ids.delete(other);
      }
      ids.set(id, until);
      return ids.size;
    });
  }

  async end(keys: readonly string[], id: string): Promise<void> {
    this.endNow(keys, id);
  }

  endNow(keys: readonly string[], id: string): void {
    for (const key of keys) {
      const ids = this.byKey.get(key);
      if (!ids) continue;
      ids.delete(id);
      if (ids.size === 0) this.byKey.delete(key);
    }
  }

  /** Keys held now (tests, and the bound). */
  get size(): number {
    return this.byKey.size;
  }

  private makeRoom(now: number): void {
    for (const [key, ids] of this.byKey) {
      for (const [id, t] of ids) if (t <= now) ids.delete(id);
      if (ids.size === 0) this.byKey.delete(key);
    }
    // Still full: the oldest key goes.
    while (this.byKey.size >= this.max) {
      const oldest = this.byKey.keys().next();
      if (oldest.done) break;
      this.byKey.delete(oldest.value);
    }
  }
}

export class RedisInFlight implements InFlightStore {
  private readonly redis: Redis;
  private readonly prefix: string;
  private readonly errors: StoreErrors;
  /** Where attempts count while Redis fails. */
  private readonly memory = new MemoryInFlight();

  constructor(redis: Redis, prefix: string, errors: StoreErrors) {
    this.redis = redis;
    this.prefix = prefix;
    this.errors = errors;
  }

  private key(key: string): string {
    return `${this.prefix}:inflight:${key}`;
  }

  async start(keys: readonly string[], id: string, until: number, now: number): Promise<number[]> {
    try {
      // One transaction: each attempt sees every attempt added before it, whichever gateway added it.
      const multi = this.redis.multi();
      for (const k of keys) {
        const rk = this.key(k);
        multi.zremrangebyscore(rk, '-inf', now).zadd(rk, until, id).zcard(rk).pexpire(rk, Math.max(1, until - now) + 1000);
      }
      const res = await multi.exec();
      if (!res) throw new Error('the transaction was aborted');
      return keys.map((_, i) => {
        const [err, n] = res[i * 4 + 2] ?? [new Error('no reply'), 0];
        if (err) throw err;
        return Number(n);
      });
    } catch (err) {
      this.errors.report('count a login attempt', err);
      return this.memory.startNow(keys, id, until, now);
    }
  }

  async end(keys: readonly string[], id: string): Promise<void> {
    this.memory.endNow(keys, id);
    try {
      const multi = this.redis.multi();
      for (const k of keys) multi.zrem(this.key(k), id);
      await multi.exec();
    } catch (err) {
      // The attempt stops counting at its deadline (the sorted set's entries carry it).
      this.errors.report('end a login attempt', err);
    }
  }
}
