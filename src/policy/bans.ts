/**
 * Bans: an address, a user, or a user from one address, refused until a
 * moment in time. Set by brute-force protection or by an admin (control
 * socket, dashboard); listed and lifted through the engine's BanAdmin.
 *
 * Every gateway keeps a local view it can read synchronously (the connect-time
 * check, before the greeting). With Redis the bans themselves live in Redis
 * (a key with a TTL per ban plus a sorted index for listing) and changes are
 * published, so other gateways' local views follow within a round trip; the
 * login-time check always asks Redis.
 */
import type { Redis } from 'ioredis';
import { errorMessage } from '../core/errors.ts';
import { AddressSet, parseCidr } from '../net/cidr.ts';
import type { Logger } from '../core/log.ts';
import type { StoreErrors } from './counters.ts';

/** A listing returns at most this many bans (the soonest to expire first). */
const LIST_MAX = 10_000;

/** One address, an address range (CIDR), a user everywhere, or a user from one address. */
export type BanKind = 'address' | 'range' | 'user' | 'pair';

export interface Ban {
  /** "address:192.0.2.7", "range:192.0.2.0/24", "user:alice@example.org", "pair:192.0.2.7|alice@example.org" */
  readonly id: string;
  readonly kind: BanKind;
  /** The address, or the range for kind "range". */
  readonly address: string | null;
  readonly user: string | null;
  /** ms since epoch. */
  readonly until: number;
  readonly createdAt: number;
  readonly reason: string;
  readonly source: 'brute-force' | 'manual';
}

export function banId(kind: BanKind, address: string | null, user: string | null): string {
  switch (kind) {
    case 'address':
      return `address:${address ?? ''}`;
    case 'range':
      return `range:${address ?? ''}`;
    case 'user':
      return `user:${user ?? ''}`;
    case 'pair':
      return `pair:${address ?? ''}|${user ?? ''}`;
    default: {
      const never: never = kind;
      throw new Error(`unknown ban kind ${String(never)}`);
    }
  }
}

export type BanChange = { kind: 'banned'; ban: Ban } | { kind: 'unbanned'; ban: Ban };

export interface BanStore {
  /** This gateway's view, synchronously: for decisions that cannot wait (before the greeting). */
  cached(id: string, now: number): Ban | undefined;
  /** A range ban covering `ip`, from this gateway's view. */
  rangeBanFor(ip: string, now: number): Ban | undefined;
  /** Every ban in this gateway's view, soonest to expire first. */
  cachedList(now: number): Ban[];
  /** Told of every change, including those other gateways publish. */
  onChange(listener: (change: BanChange) => void): () => void;
  /** The authoritative answer (Redis when configured). */
  check(id: string, now: number): Promise<Ban | undefined>;
  add(ban: Ban, now: number): Promise<void>;
  remove(id: string): Promise<boolean>;
  list(now: number): Promise<Ban[]>;
  close(): Promise<void>;
}

/** Bans kept in memory; bounded, expired ones pruned as they are met. */
export class MemoryBanStore implements BanStore {
  private readonly bans = new Map<string, Ban>();
  private readonly rangeIds = new Set<string>();
  private ranges: { set: AddressSet; bans: { ban: Ban; set: AddressSet }[] } | undefined;
  private readonly listeners = new Set<(change: BanChange) => void>();
  private readonly max: number;

  constructor(max = 100_000) {
    this.max = max;
  }

  cached(id: string, now: number): Ban | undefined {
    const b = this.bans.get(id);
    if (!b) return undefined;
    if (b.until <= now) {
      this.drop(id);
      return undefined;
    }
    return b;
  }

  rangeBanFor(ip: string, now: number): Ban | undefined {
    if (this.rangeIds.size === 0) return undefined;
    if (!this.ranges) {
      const bans: { ban: Ban; set: AddressSet }[] = [];
      for (const id of this.rangeIds) {
        const ban = this.bans.get(id);
        const cidr = ban?.address ? parseCidr(ban.address) : undefined;
        if (ban && cidr && typeof cidr !== 'string') bans.push({ ban, set: new AddressSet([cidr]) });
      }
      this.ranges = { set: new AddressSet(bans.flatMap((b) => b.set.ranges)), bans };
    }
    if (!this.ranges.set.has(ip)) return undefined;
    return this.ranges.bans.find((b) => b.ban.until > now && b.set.has(ip))?.ban;
  }

  async check(id: string, now: number): Promise<Ban | undefined> {
    return this.cached(id, now);
  }

  async add(ban: Ban, now: number): Promise<void> {
    this.put(ban, now);
  }

  /** Records a ban locally (also what the Redis store does on a published change). */
  put(ban: Ban, now: number): void {
    if (ban.until <= now) return;
    const prev = this.bans.get(ban.id);
    if (!prev && this.bans.size >= this.max) {
      this.prune(now);
      if (this.bans.size >= this.max) {
        // Still full: the ban that ends soonest makes room.
        let soonest: Ban | undefined;
        for (const b of this.bans.values()) if (!soonest || b.until < soonest.until) soonest = b;
        if (soonest) this.drop(soonest.id);
      }
    }
    this.bans.set(ban.id, ban);
    if (ban.kind === 'range') {
      this.rangeIds.add(ban.id);
      this.ranges = undefined;
    }
    if (prev?.until !== ban.until || prev.reason !== ban.reason) this.emit({ kind: 'banned', ban });
  }

  /** Forgets a ban locally; true when there was one. */
  forget(id: string): boolean {
    const ban = this.bans.get(id);
    if (!ban) return false;
    this.drop(id);
    this.emit({ kind: 'unbanned', ban });
    return true;
  }

  private drop(id: string): void {
    this.bans.delete(id);
    if (this.rangeIds.delete(id)) this.ranges = undefined;
  }

  async remove(id: string): Promise<boolean> {
    return this.forget(id);
  }

  cachedList(now: number): Ban[] {
    this.prune(now);
    return [...this.bans.values()].sort((a, b) => a.until - b.until);
  }

  async list(now: number): Promise<Ban[]> {
    return this.cachedList(now);
  }

  private prune(now: number): void {
    for (const [id, b] of this.bans) if (b.until <= now) this.drop(id);
  }

  onChange(listener: (change: BanChange) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(change: BanChange): void {
    for (const l of this.listeners) l(change);
  }

  async close(): Promise<void> {
    this.listeners.clear();
  }
}

/**
 * A store whose synchronous answers come from a local view kept in step with
 * an authority elsewhere (Redis, or a cluster primary: src/cluster/policy-link.ts).
 */
export abstract class ViewedBanStore implements BanStore {
  /** The view; the subclass keeps it in step (published changes, broadcasts). */
  readonly local = new MemoryBanStore();

  cached(id: string, now: number): Ban | undefined {
    return this.local.cached(id, now);
  }

  rangeBanFor(ip: string, now: number): Ban | undefined {
    return this.local.rangeBanFor(ip, now);
  }

  cachedList(now: number): Ban[] {
    return this.local.cachedList(now);
  }

  onChange(listener: (change: BanChange) => void): () => void {
    return this.local.onChange(listener);
  }

  abstract check(id: string, now: number): Promise<Ban | undefined>;
  abstract add(ban: Ban, now: number): Promise<void>;
  abstract remove(id: string): Promise<boolean>;
  abstract list(now: number): Promise<Ban[]>;
  abstract close(): Promise<void>;
}

interface BanEvent {
  op: 'add' | 'remove';
  id: string;
  ban?: Ban;
  /** The publishing gateway, so it ignores its own echo. */
  from: string;
}

export class RedisBanStore extends ViewedBanStore {
  private readonly redis: Redis;
  private readonly subscriber: Redis;
  private readonly prefix: string;
  private readonly channel: string;
  private readonly index: string;
  private readonly errors: StoreErrors;
  private readonly log: Logger;
  private readonly self = `${process.pid}-${Math.random().toString(36).slice(2)}`;

  private constructor(redis: Redis, subscriber: Redis, prefix: string, errors: StoreErrors, log: Logger) {
    super();
    this.redis = redis;
    this.subscriber = subscriber;
    this.prefix = prefix;
    this.channel = `${prefix}:bans:events`;
    this.index = `${prefix}:bans:index`;
    this.errors = errors;
    this.log = log;
  }

  /** Subscribes to ban changes and loads the current bans into the local view (both best effort, logged). */
  static async open(redis: Redis, prefix: string, errors: StoreErrors, log: Logger, clock: () => number): Promise<RedisBanStore> {
    // The subscription may wait for the connection (and is renewed on reconnect); commands elsewhere fail fast.
    const subscriber = redis.duplicate({ lazyConnect: false, enableOfflineQueue: true });
    const store = new RedisBanStore(redis, subscriber, prefix, errors, log);
    subscriber.on('error', (err: Error) => errors.report('ban subscription', err));
    subscriber.on('message', (_channel: string, text: string) => store.onEvent(text, clock()));
    // Not awaited: with Redis down at start the subscription waits for it, the gateway does not.
    subscriber.subscribe(store.channel).catch((err: unknown) => errors.report('ban subscription', err));
    await store.list(clock());
    return store;
  }

  private key(id: string): string {
    return `${this.prefix}:ban:${id}`;
  }

  private onEvent(text: string, now: number): void {
    let e: BanEvent;
    try {
      e = JSON.parse(text) as BanEvent;
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, 'ignoring a malformed ban event from Redis');
      return;
    }
    if (e.from === this.self) return;
    if (e.op === 'add' && e.ban) this.local.put(e.ban, now);
    else if (e.op === 'remove') this.local.forget(e.id);
  }

  async check(id: string, now: number): Promise<Ban | undefined> {
    try {
      const text = await this.redis.get(this.key(id));
      if (text === null) {
        this.local.forget(id);
        return undefined;
      }
      const ban = JSON.parse(text) as Ban;
      this.local.put(ban, now);
      return ban.until > now ? ban : undefined;
    } catch (err) {
      this.errors.report('ban check', err);
      return this.local.cached(id, now);
    }
  }

  async add(ban: Ban, now: number): Promise<void> {
    this.local.put(ban, now);
    const ttl = ban.until - now;
    if (ttl <= 0) return;
    try {
      await this.redis
        .multi()
        .set(this.key(ban.id), JSON.stringify(ban), 'PX', ttl)
        .zadd(this.index, ban.until, ban.id)
        .publish(this.channel, JSON.stringify({ op: 'add', id: ban.id, ban, from: this.self } satisfies BanEvent))
        .exec();
    } catch (err) {
      this.errors.report('ban add', err);
    }
  }

  async remove(id: string): Promise<boolean> {
    const here = this.local.forget(id);
    try {
      const res = await this.redis
        .multi()
        .del(this.key(id))
        .zrem(this.index, id)
        .publish(this.channel, JSON.stringify({ op: 'remove', id, from: this.self } satisfies BanEvent))
        .exec();
      const deleted = res?.[0]?.[1];
      return here || deleted === 1;
    } catch (err) {
      this.errors.report('ban remove', err);
      return here;
    }
  }

  async list(now: number): Promise<Ban[]> {
    try {
      await this.redis.zremrangebyscore(this.index, '-inf', now);
      const ids = await this.redis.zrangebyscore(this.index, now, '+inf', 'LIMIT', 0, LIST_MAX);
      if (ids.length === 0) return [];
      const texts = await this.redis.mget(...ids.map((id) => this.key(id)));
      const bans: Ban[] = [];
      for (const t of texts) {
        if (t === null) continue;
        const ban = JSON.parse(t) as Ban;
        if (ban.until <= now) continue;
        this.local.put(ban, now);
        bans.push(ban);
      }
      return bans.sort((a, b) => a.until - b.until);
    } catch (err) {
      this.errors.report('ban list', err);
      return this.local.list(now);
    }
  }

  async close(): Promise<void> {
    this.subscriber.disconnect();
    await this.local.close();
  }
}
