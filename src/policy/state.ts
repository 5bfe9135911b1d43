/**
 * What policy remembers between decisions, and keeps across reloads: the
 * counters and bans (memory or Redis), sessions open per address and per
 * user, and short local blocks for limits that must answer synchronously.
 * Counting lives here too: hits of window limits (a limit reached blocks
 * its key), failed logins and the bans they lead to.
 *
 * One PolicyState lives as long as the gateway; every engine built from a
 * (re)loaded config uses it, so bans and counts survive a reload, and a
 * session that started under the old engine still releases its slot here.
 *
 * In a cluster (src/cluster/policy-link.ts) each process has one, and the
 * session counts of the other processes are added through SharedSessions.
 */
import { Redis } from 'ioredis';
import type { PolicySections } from '../config/schema-policy.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { MemoryInFlight, RedisInFlight, type InFlightStore } from './attempts.ts';
import { banId, MemoryBanStore, RedisBanStore, type Ban, type BanKind, type BanStore } from './bans.ts';
import { CounterStore, DEFAULT_MAX_KEYS, StoreErrors, type Count, type SharedLimiter, type WindowCounter } from './counters.ts';
import type { AddressSet } from '../net/cidr.ts';

/** The config's policy_store; `max_keys` may be left out (DEFAULT_MAX_KEYS). */
export type StoreConfig = Omit<PolicySections['policy_store'], 'max_keys'> & { max_keys?: number };

/** Brute-force protection as configured: thresholds per address, address+user and user, and addresses never counted. */
export interface BruteForce {
  readonly settings: PolicySections['brute_force'];
  readonly exempt: AddressSet;
}

/** A window limit as counted: its name in the store, its window and the count that reaches it. */
export interface WindowLimit {
  readonly name: string;
  readonly windowMs: number;
  readonly max: number;
}

/** A threshold's count for one login: failures counted in its window, and attempts in flight (this one included). */
export interface AttemptLoad {
  failures: number;
  inFlight: number;
}

/**
 * What a login attempt meets when it starts: per address, per address and
 * user (the busiest of the user's keys), and per user (the busiest of the
 * keys this address has failed for; undefined when it has failed for none,
 * as a per-user ban only holds there).
 */
export interface AttemptLoads {
  address: AttemptLoad;
  pair: AttemptLoad | undefined;
  user: AttemptLoad | undefined;
}

/** A login attempt from its start to its verdict (or deadline). */
export interface Attempt {
  readonly id: string;
  /** Its keys in the in-flight store; empty when it is not counted (brute force off, an exempt address). */
  readonly keys: readonly string[];
  readonly until: number;
  /** What the attempt met when it started; undefined when no other attempt was in flight (nothing to add up). */
  readonly loads: AttemptLoads | undefined;
  ended: boolean;
}

/** Failed logins counted in the current windows for an address and/or user. */
export interface FailureCounts {
  address: number;
  pair: number | null;
  user: number | null;
}

type Threshold = PolicySections['brute_force']['per_address'];

/** The store a config means: without a URL there is no Redis to use. */
export function storeKind(store: StoreConfig): 'memory' | 'redis' {
  return store.type === 'memory' || store.url === undefined ? 'memory' : 'redis';
}

/** Sessions open per address ("open"), logged in per user ("login"). */
export type SessionKind = 'open' | 'login';

/** Session counts kept by other processes (cluster workers), added to this process's own. */
export interface SharedSessions {
  /** This process's count for `key` on `listener` changed by `delta`. */
  changed(kind: SessionKind, key: string, listener: string, delta: number): void;
  /** The other processes' counts for `key`, per listener (synchronously: the connect-time check reads them). */
  others(kind: SessionKind, key: string): ReadonlyMap<string, number> | undefined;
  /** This process blocked a limit key until `until` (a window limit was reached): the others should block it too. */
  blocked?(key: string, until: number): void;
}

export interface PolicyStateOptions {
  store: StoreConfig;
  log: Logger;
  /** Injected for tests; ms since epoch. */
  clock?: () => number;
  /** Cluster: the other processes' sessions. */
  sessions?: SharedSessions;
  /** Cluster with the memory store: counters, bans and attempts in flight kept by the primary instead of this process alone. */
  memory?: { limiter?: SharedLimiter; bans?: BanStore; attempts?: InFlightStore };
}

/** Local blocks and session maps never grow past this many keys. */
const MAX_BLOCKS = 100_000;

export class PolicyState {
  readonly clock: () => number;
  readonly counters: CounterStore;
  readonly bans: BanStore;
  /** Login attempts between their start and their verdict (src/policy/attempts.ts). */
  readonly attempts: InFlightStore;
  readonly storeType: 'memory' | 'redis';
  readonly log: Logger;
  private readonly redis: Redis | undefined;
  private readonly shared: SharedSessions | undefined;
  /** address → listener → sessions open. */
  private readonly open = new Map<string, Map<string, number>>();
  /** user → listener → sessions logged in. */
  private readonly logins = new Map<string, Map<string, number>>();
  /** session id → the user slot it holds. */
  private readonly sessions = new Map<string, { user: string; listener: string }>();
  /** session id → the login waiting for its verdict: its attempt, and the slot it takes once the verdict is good. */
  private readonly pending = new Map<string, PendingLogin>();
  private attemptSeq = 0;
  private lastPrune = 0;
  private readonly attemptPrefix = `${process.pid.toString(36)}.${Math.random().toString(36).slice(2, 8)}`;
  /** limit key → blocked until (ms). */
  private readonly blocks = new Map<string, number>();
  private readonly background = new Set<Promise<unknown>>();
  private closed = false;

  private constructor(opts: {
    clock: () => number;
    counters: CounterStore;
    bans: BanStore;
    attempts: InFlightStore;
    storeType: 'memory' | 'redis';
    log: Logger;
    redis?: Redis;
    shared?: SharedSessions | undefined;
  }) {
    this.clock = opts.clock;
    this.counters = opts.counters;
    this.bans = opts.bans;
    this.attempts = opts.attempts;
    this.storeType = opts.storeType;
    this.log = opts.log;
    this.redis = opts.redis;
    this.shared = opts.shared;
  }

  static async create(opts: PolicyStateOptions): Promise<PolicyState> {
    const clock = opts.clock ?? Date.now;
    const log = opts.log.child({ part: 'policy' });
    const errors = new StoreErrors(log);
    const { store } = opts;
    const maxKeys = store.max_keys ?? DEFAULT_MAX_KEYS;
    const shared = opts.sessions;
    if (store.type === 'memory' || store.url === undefined) {
      return new PolicyState({
        clock,
        counters: new CounterStore({ shared: opts.memory?.limiter, prefix: store.prefix, errors, maxKeys, log }),
        bans: opts.memory?.bans ?? new MemoryBanStore(maxKeys),
        attempts: opts.memory?.attempts ?? new MemoryInFlight(maxKeys),
        storeType: 'memory',
        log,
        shared,
      });
    }
    const redis = new Redis(store.url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      commandTimeout: store.timeout,
      connectTimeout: store.timeout,
      retryStrategy: (times) => Math.min(times * 250, 5_000),
    });
    redis.on('error', (err: Error) => errors.report('redis connection', err));
    try {
      await redis.connect();
      log.info({ store: 'redis', prefix: store.prefix }, 'policy store connected');
    } catch (err) {
      // Start anyway: counters and bans work per gateway until Redis answers (the client keeps reconnecting).
      log.warn({ err: errorMessage(err) }, 'policy store: Redis is not reachable, starting with this gateway\'s memory');
    }
    const bans = await RedisBanStore.open(redis, store.prefix, errors, log, clock);
    return new PolicyState({
      clock,
      counters: new CounterStore({ redis, prefix: store.prefix, errors, maxKeys, log }),
      bans,
      attempts: new RedisInFlight(redis, store.prefix, errors),
      storeType: 'redis',
      log,
      redis,
      shared,
    });
  }

  // ---- sessions open per address ------------------------------------------------

  connectionOpened(listener: string, address: string): void {
    this.count('open', address, listener, 1);
  }

  connectionClosed(listener: string, address: string): void {
    this.count('open', address, listener, -1);
  }

  /** Sessions open from `address`, on the listeners `scope` admits (all when undefined). */
  openFrom(address: string, scope?: (listener: string) => boolean): number {
    return sum(this.open.get(address), scope) + sum(this.shared?.others('open', address), scope);
  }

  // ---- sessions logged in per user -------------------------------------------------

  /** The session now counts for `user` (a session holds one slot; a second login moves it). */
  loginStarted(session: string, listener: string, user: string): void {
    this.loginEnded(session);
    this.sessions.set(session, { user, listener });
    this.count('login', user, listener, 1);
  }

  loginEnded(session: string): void {
    const s = this.sessions.get(session);
    if (!s) return;
    this.sessions.delete(session);
    this.count('login', s.user, s.listener, -1);
  }

  loggedIn(user: string, scope?: (listener: string) => boolean): number {
    return sum(this.logins.get(user), scope) + sum(this.shared?.others('login', user), scope);
  }

  private count(kind: SessionKind, key: string, listener: string, delta: number): void {
    const applied = bump(kind === 'open' ? this.open : this.logins, key, listener, delta);
    // Only real changes travel: a close without an open (never counted) must not lower the others' view.
    if (applied !== 0) this.shared?.changed(kind, key, listener, applied);
  }

  // ---- local blocks ----------------------------------------------------------------

  block(key: string, until: number): void {
    // A worker that reached a limit tells the others: the next connection may land on any of them.
    if (this.setBlock(key, until)) this.shared?.blocked?.(key, until);
  }

  /** A block another process set (a cluster worker's, through the primary): kept here, not passed on again. */
  blockFromElsewhere(key: string, until: number): void {
    this.setBlock(key, until);
  }

  /** True when the block is new or now lasts longer. */
  private setBlock(key: string, until: number): boolean {
    const before = this.blocks.get(key) ?? 0;
    if (until <= before) return false;
    if (this.blocks.size >= MAX_BLOCKS) {
      const now = this.clock();
      for (const [k, t] of this.blocks) if (t <= now) this.blocks.delete(k);
      if (this.blocks.size >= MAX_BLOCKS) return false;
    }
    this.blocks.set(key, until);
    return true;
  }

  blockedUntil(key: string, now: number): number | undefined {
    const t = this.blocks.get(key);
    if (t === undefined) return undefined;
    if (t <= now) {
      this.blocks.delete(key);
      return undefined;
    }
    return t;
  }

  // ---- window limits -----------------------------------------------------------------

  /**
   * Makes the counters of a config's limits and brute-force thresholds now,
   * not at their first hit: in a cluster worker each one first greets the
   * primary (rate-limiter-flexible's init), which would delay the first
   * counts, and with them the block a limit reached sets.
   */
  prepare(limits: readonly WindowLimit[], bf: BruteForce): void {
    for (const l of limits) this.counters.counter(l.name, l.windowMs);
    this.failureCounters(bf.settings);
  }

  /** Counts `n` hits of a limit's key; when the count reaches the maximum, the key is blocked here until the window ends. */
  async hit(limit: WindowLimit, key: string, n = 1): Promise<Count> {
    const res = await this.counters.counter(limit.name, limit.windowMs).hit(key, n);
    if (res.count >= limit.max) this.block(`${limit.name}|${key}`, this.clock() + Math.max(res.resetMs, 1));
    return res;
  }

  /** The current count of a limit's key, without adding to it. */
  peek(limit: WindowLimit, key: string): Promise<Count> {
    return this.counters.counter(limit.name, limit.windowMs).peek(key);
  }

  // ---- failed logins and bans ----------------------------------------------------------

  /** A ban on the address (or a range holding it), from this gateway's view: for decisions that cannot wait. */
  addressBan(address: string, now: number): Ban | undefined {
    return this.bans.cached(banId('address', address, null), now) ?? this.bans.rangeBanFor(address, now);
  }

  /**
   * The ban that stops a login before its password is looked at, from the
   * store: the address, a range, the user from this address, or the user's
   * own ban (an administrator's everywhere; a brute-force one only where this
   * address has failed for the user, so a locked user still logs in from an
   * address that has not). `keys`: the login's keys (username_format), each
   * checked.
   */
  async loginBan(address: string, keys: readonly string[], now: number, bf: BruteForce): Promise<Ban | undefined> {
    const [addr, ...rest] = await Promise.all([
      this.bans.check(banId('address', address, null), now),
      ...keys.map((k) => this.bans.check(banId('pair', address, k), now)),
      ...keys.map((k) => this.bans.check(banId('user', null, k), now)),
    ]);
    const pairs = rest.slice(0, keys.length);
    const own = rest.slice(keys.length);
    const hit = addr ?? this.bans.rangeBanFor(address, now) ?? pairs.find((b) => b !== undefined);
    if (hit) return hit;
    for (let i = 0; i < keys.length; i++) {
      const ban = own[i];
      if (!ban) continue;
      if (ban.source === 'manual') return ban;
      const failed = await this.failureCounters(bf.settings).pair.peek(pairKey(address, keys[i]!));
      if (failed.count > 0) return ban;
    }
    return undefined;
  }

  /** Counts one failed login (the address once, the user under each of its keys) and bans where a threshold is reached. */
  async loginFailed(address: string, keys: readonly string[], bf: BruteForce): Promise<void> {
    if (!bf.settings.enabled || bf.exempt.has(address)) return;
    const counters = this.failureCounters(bf.settings);
    const [a, ...rest] = await Promise.all([
      counters.address.hit(address),
      ...keys.map((k) => counters.pair.hit(pairKey(address, k))),
      ...keys.map((k) => counters.user.hit(k)),
    ]);
    const pairs = rest.slice(0, keys.length);
    const users = rest.slice(keys.length);
    const most = (counts: Count[]) => (counts.length === 0 ? undefined : Math.max(...counts.map((c) => c.count)));
    this.log.info({ client: address, user: keys[0] ?? null, failures: { address: a!.count, pair: most(pairs), user: most(users) } }, 'failed login counted');
    const { per_address, per_address_user, per_user } = bf.settings;
    const now = this.clock();
    if (a!.count >= per_address.failures) await this.autoBan('address', address, null, per_address, a!.count, now);
    for (let i = 0; i < keys.length; i++) {
      const p = pairs[i]!.count;
      const u = users[i]!.count;
      if (p >= per_address_user.failures) await this.autoBan('pair', address, keys[i]!, per_address_user, p, now);
      if (u >= per_user.failures) await this.autoBan('user', null, keys[i]!, per_user, u, now);
    }
  }

  /** A login from this address succeeded: its failures for the user (under every key) are forgiven. */
  async loginSucceeded(address: string, keys: readonly string[], bf: BruteForce): Promise<void> {
    const pair = this.failureCounters(bf.settings).pair;
    await Promise.all(keys.map((k) => pair.reset(pairKey(address, k))));
  }

  // ---- login attempts in flight ------------------------------------------------------

  /**
   * A login attempt starts: it counts as in flight under the address and the
   * user's keys until its verdict or `ttlMs`. When others are in flight too,
   * the failures already counted are read, so that the decision can add them
   * up (the failures are read after the attempt is added: an attempt that
   * fails meanwhile is counted twice rather than not at all).
   */
  async attemptStarted(address: string, keys: readonly string[], ttlMs: number, bf: BruteForce): Promise<Attempt> {
    const now = this.clock();
    const id = `${this.attemptPrefix}.${(++this.attemptSeq).toString(36)}`;
    const until = now + ttlMs;
    if (!bf.settings.enabled || bf.exempt.has(address)) return { id, keys: [], until, loads: undefined, ended: false };
    const storeKeys = [`address|${address}`, ...keys.map((k) => `pair|${pairKey(address, k)}`), ...keys.map((k) => `user|${k}`)];
    const counts = await this.attempts.start(storeKeys, id, until, now);
    const attempt: Attempt = { id, keys: storeKeys, until, loads: undefined, ended: false };
    if (!counts.some((n) => n > 1)) return attempt;
    const c = this.failureCounters(bf.settings);
    const [a, ...rest] = await Promise.all([
      c.address.peek(address),
      ...keys.map((k) => c.pair.peek(pairKey(address, k))),
      ...keys.map((k) => c.user.peek(k)),
    ]);
    const load = (failures: number, i: number): AttemptLoad => ({ failures, inFlight: counts[i] ?? 1 });
    const busiest = (loads: AttemptLoad[]) => loads.reduce<AttemptLoad | undefined>((m, x) => (m === undefined || x.failures + x.inFlight > m.failures + m.inFlight ? x : m), undefined);
    const pairs = keys.map((_, i) => load(rest[i]!.count, 1 + i));
    // A per-user count holds only where this address has failed for the user (as a per-user ban does).
    const users = keys.map((_, i) => load(rest[keys.length + i]!.count, 1 + keys.length + i)).filter((_, i) => (rest[i]?.count ?? 0) > 0);
    return { ...attempt, loads: { address: load(a!.count, 0), pair: busiest(pairs), user: busiest(users) } };
  }

  /** The attempt is over: it no longer counts as in flight (safe to call twice). */
  attemptEnded(attempt: Attempt): Promise<void> {
    if (attempt.ended || attempt.keys.length === 0) {
      attempt.ended = true;
      return Promise.resolve();
    }
    attempt.ended = true;
    return this.attempts.end(attempt.keys, attempt.id);
  }

  /**
   * The session's login waits for its verdict (onAuthResult): its attempt,
   * and the user slot it takes if the verdict is good. A session has one.
   */
  loginPending(session: string, login: Omit<PendingLogin, 'live'>): void {
    const now = this.clock();
    if (this.pending.size >= MAX_BLOCKS) this.prunePending(now);
    const before = this.pending.get(session);
    if (before) this.track('end an attempt', this.attemptEnded(before.attempt));
    this.pending.set(session, { ...login, live: true });
  }

  /** The session's login that waited for its verdict, taken (once); undefined when there is none. */
  takePending(session: string): PendingLogin | undefined {
    const p = this.pending.get(session);
    if (p) this.pending.delete(session);
    return p;
  }

  /**
   * The session has ended. A login still waiting for its verdict keeps its
   * attempt in flight (the verdict may still come, or its deadline ends it)
   * but will take no user slot.
   */
  sessionEnded(session: string): void {
    this.loginEnded(session);
    const p = this.pending.get(session);
    if (p) p.live = false;
    // Logins whose verdict never came (their sessions died) go at their deadline: looked for once a second at most.
    const now = this.clock();
    if (this.pending.size > 0 && now - this.lastPrune >= 1000) this.prunePending(now);
  }

  private prunePending(now: number): void {
    this.lastPrune = now;
    for (const [session, p] of this.pending) {
      if (p.attempt.until > now) continue;
      this.pending.delete(session);
      this.track('end an attempt', this.attemptEnded(p.attempt));
    }
  }

  /** Failed logins counted in the current windows (an address, a user's keys, or both; the most of the keys). */
  async failures(query: { address?: string; keys?: readonly string[] }, settings: BruteForce['settings']): Promise<FailureCounts | null> {
    const counters = this.failureCounters(settings);
    const { address, keys } = query;
    const most = async (counts: Promise<Count>[]) => Math.max(0, ...(await Promise.all(counts)).map((c) => c.count));
    if (address !== undefined) {
      return {
        address: (await counters.address.peek(address)).count,
        pair: keys === undefined ? null : await most(keys.map((k) => counters.pair.peek(pairKey(address, k)))),
        user: keys === undefined ? null : await most(keys.map((k) => counters.user.peek(k))),
      };
    }
    if (keys !== undefined) return { address: 0, pair: null, user: await most(keys.map((k) => counters.user.peek(k))) };
    return null;
  }

  private failureCounters(s: BruteForce['settings']): { address: WindowCounter; pair: WindowCounter; user: WindowCounter } {
    return {
      address: this.counters.counter('fail:address', s.per_address.window),
      pair: this.counters.counter('fail:pair', s.per_address_user.window),
      user: this.counters.counter('fail:user', s.per_user.window),
    };
  }

  private async autoBan(kind: BanKind, address: string | null, user: string | null, t: Threshold, count: number, now: number): Promise<void> {
    const id = banId(kind, address, user);
    if (this.bans.cached(id, now)) return;
    const ban: Ban = {
      id,
      kind,
      address,
      user,
      until: now + t.ban,
      createdAt: now,
      reason: `${count} failed logins within ${Math.round(t.window / 1000)}s`,
      source: 'brute-force',
    };
    await this.bans.add(ban, now);
    this.log.warn({ ban: kind, client: address, user, until: new Date(ban.until).toISOString(), failures: count }, 'banned after failed logins');
  }

  // ---- background work ---------------------------------------------------------------

  /** Runs store work a synchronous hook started; failures are logged, never thrown. */
  track(what: string, work: Promise<unknown>): void {
    const p = work.catch((err: unknown) => this.log.error({ what, err: errorMessage(err) }, 'policy background task failed'));
    this.background.add(p);
    void p.finally(() => this.background.delete(p));
  }

  /** Resolves when the background work started so far is done (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.background.size > 0) await Promise.all([...this.background]);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.settled();
    await this.bans.close();
    if (this.redis) {
      try {
        await this.redis.quit();
      } catch (err) {
        this.log.debug({ err: errorMessage(err) }, 'Redis quit failed; disconnecting');
        this.redis.disconnect();
      }
    }
  }
}

/** Adds `delta` to a key's count on a listener (never below 0, deleting what reaches 0); returns what was applied. */
export function bump(map: Map<string, Map<string, number>>, key: string, listener: string, delta: number): number {
  let inner = map.get(key);
  if (!inner) {
    if (delta <= 0) return 0;
    inner = new Map();
    map.set(key, inner);
  }
  const before = inner.get(listener) ?? 0;
  const n = Math.max(0, before + delta);
  if (n > 0) inner.set(listener, n);
  else inner.delete(listener);
  if (inner.size === 0) map.delete(key);
  return n - before;
}

/** A login between its start and its verdict, as the state keeps it per session. */
export interface PendingLogin {
  readonly attempt: Attempt;
  /** The user slot to take when the verdict is good: the account and the listener. */
  readonly account: string | null;
  readonly listener: string;
  /** False once the session has ended: a late good verdict takes no slot. */
  live: boolean;
}

function pairKey(address: string, user: string): string {
  return `${address}|${user}`;
}

function sum(inner: ReadonlyMap<string, number> | undefined, scope?: (listener: string) => boolean): number {
  if (!inner) return 0;
  let n = 0;
  for (const [listener, count] of inner) if (!scope || scope(listener)) n += count;
  return n;
}
