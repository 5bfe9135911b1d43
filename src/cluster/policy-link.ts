/**
 * Policy state across cluster workers: each worker has its own PolicyState
 * (the connect-time checks read it synchronously), and the primary keeps what
 * must be one for all of them.
 *
 * - Counters, memory store: rate-limiter-flexible's cluster limiters; every
 *   worker counts in the primary's memory (RateLimiterClusterMaster), and a
 *   worker whose primary does not answer in time counts in its own memory
 *   (CounterStore's fallback). Redis store: every process counts in Redis.
 * - Bans, memory store: the primary's MemoryBanStore is the authority; a
 *   worker asks it to add or remove (ClusterBanStore), and every change, a
 *   worker's or an admin's in the primary, is broadcast to every worker's
 *   local view. Redis store: Redis and its pub/sub, as between gateways.
 * - Login attempts in flight, memory store: the primary's MemoryInFlight; a
 *   worker asks it to add an attempt and gets the counts back (ClusterInFlight),
 *   or counts in its own memory when the primary does not answer in time.
 *   Redis store: Redis, as between gateways.
 * - Sessions open per address and logged in per user, both stores: a worker
 *   reports its changes every REPORT_MS; the primary keeps each
 *   worker's counts and answers every other worker with its new view of the
 *   keys that changed (absolute counts, so a view is right after any one
 *   message). The primary's own state answers the totals (control socket).
 *   A view lags by a round trip: sessions accepted at the same moment in
 *   two workers can pass a concurrency limit by one per other worker.
 *
 * Every message here has a `t` starting with `policy.` (see link.ts).
 */
import { errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { MemoryInFlight, type InFlightStore } from '../policy/attempts.ts';
import { ViewedBanStore, type Ban, type BanChange } from '../policy/bans.ts';
import type { SharedLimiter } from '../policy/counters.ts';
import { bump, PolicyState, storeKind, type SessionKind, type SharedSessions, type StoreConfig } from '../policy/state.ts';
import { masterLimiter, WorkerLimiters } from './limiters.ts';
import type { Message, PrimaryLink, WorkerLink } from './link.ts';

/**
 * How often a worker reports its session count changes. Each report is an IPC
 * message, and an answer to every other worker; batching them for 20 ms (not
 * per event-loop turn) keeps that cost flat under load, while a concurrent
 * limit still sees the other workers' sessions within a few tens of ms.
 */
const REPORT_MS = 20;

/** How long a worker waits for the primary (ban changes, counters) before it fails or falls back. */
const PRIMARY_TIMEOUT_MS = 1000;

// ---- messages ---------------------------------------------------------------------------

/** A change in one worker's sessions: [kind, key (address or user), listener, delta]. */
export type SessionDelta = [SessionKind, string, string, number];

/** The sessions in the other workers for one key, per listener; an empty list means none. */
export type SessionCounts = [SessionKind, string, [string, number][]];

/** What a worker needs from the primary at start (and gets again when it says hello). Plain data: it crosses IPC. */
export interface PolicySync {
  store: 'memory' | 'redis';
  /** The current bans (memory store; with Redis each worker reads them from Redis). */
  bans: Ban[];
  /** The sessions in the other workers. */
  sessions: SessionCounts[];
}

export type PolicyMessage =
  // worker → primary
  /** The worker's state is ready: answered with a fresh policy.sync, covering anything sent before it could listen. */
  | { t: 'policy.hello' }
  | { t: 'policy.sessions'; changes: SessionDelta[] }
  | { t: 'policy.ban.add'; req: number; ban: Ban }
  | { t: 'policy.ban.remove'; req: number; id: string }
  /** A window limit was reached in this worker: the others block the key too (passed on at once, not batched). */
  | { t: 'policy.block'; key: string; until: number }
  /** A login attempt starts (answered with policy.attempt.counts) or ends (no answer). */
  | { t: 'policy.attempt.start'; req: number; keys: string[]; id: string; until: number }
  | { t: 'policy.attempt.end'; keys: string[]; id: string }
  // primary → worker
  | { t: 'policy.sync'; sync: PolicySync }
  | { t: 'policy.others'; counts: SessionCounts[] }
  | { t: 'policy.banned'; ban: Ban }
  | { t: 'policy.unbanned'; id: string }
  | { t: 'policy.blocked'; key: string; until: number }
  /** Sent after the broadcast of the change, so the asker's view has it when its request settles. */
  | { t: 'policy.ban.reply'; req: number; removed?: boolean; error?: string }
  /** The attempts in flight per key, the new one included. */
  | { t: 'policy.attempt.counts'; req: number; counts: number[] };

function isPolicy(msg: Message): msg is PolicyMessage {
  return msg.t.startsWith('policy.');
}

// ---- worker side ----------------------------------------------------------------------------

export interface WorkerPolicy {
  state: PolicyState;
  /** True when `msg` was a policy.* message (handled, or logged when it makes no sense here). */
  handle(msg: Message): boolean;
  /**
   * Asks the primary for a fresh sync. Creation does this once; call it again
   * when messages may have gone unrouted since (a router installed later).
   */
  resync(): void;
  close(): Promise<void>;
}

export interface WorkerPolicyOptions {
  store: StoreConfig;
  log: Logger;
  link: PrimaryLink;
  /** From PolicyAuthority.syncFor, in the worker's start message. */
  initial: PolicySync;
  /** How long to wait for the primary; default PRIMARY_TIMEOUT_MS (tests). */
  timeoutMs?: number;
  /** Injected for tests; ms since epoch. */
  clock?: () => number;
  /** How often session count changes are reported; 0 = at the end of each event-loop turn (tests). Default REPORT_MS. */
  reportMs?: number;
  /** Tests: the memory store's shared limiter, instead of the cluster limiters (they need node:cluster's channel). */
  limiter?: SharedLimiter;
}

/**
 * The policy state of a worker. The lifecycle routes the primary's policy.*
 * messages to `handle` from the moment this resolves; what the primary sent
 * before is covered by the fresh sync that answers this worker's hello (sent
 * now, and again by `resync()`).
 */
export async function createWorkerPolicyState(opts: WorkerPolicyOptions): Promise<WorkerPolicy> {
  const { link, log } = opts;
  const kind = storeKind(opts.store);
  if (opts.initial.store !== kind) {
    throw new MailgateError('POLICY_STORE', `policy link: the primary keeps a ${opts.initial.store} policy store, this worker was given ${kind}`);
  }
  const timeoutMs = opts.timeoutMs ?? PRIMARY_TIMEOUT_MS;
  const sessions = new WorkerSessions(link, log, opts.reportMs ?? REPORT_MS);
  const bans = kind === 'memory' ? new ClusterBanStore(link, log, timeoutMs) : undefined;
  const limiters = kind === 'memory' && !opts.limiter ? new WorkerLimiters(timeoutMs) : undefined;
  const attempts = kind === 'memory' ? new ClusterInFlight(link, log, timeoutMs) : undefined;
  const limiter = opts.limiter ?? limiters?.make;
  let state: PolicyState;
  try {
    state = await PolicyState.create({
      store: opts.store,
      log,
      sessions,
      ...(opts.clock ? { clock: opts.clock } : {}),
      ...(bans && limiter ? { memory: { bans, limiter, ...(attempts ? { attempts } : {}) } } : {}),
    });
  } catch (err) {
    limiters?.close();
    await bans?.close();
    throw err;
  }
  const sync = (s: PolicySync) => {
    sessions.replace(s.sessions);
    bans?.replace(s.bans, state.clock());
  };
  sync(opts.initial);

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    sessions.close();
    attempts?.close();
    await state.close(); // also closes the ban store, failing requests still waiting
    // Last: counter hits still in flight during state.close() get their answers.
    limiters?.close();
  };

  const handle = (msg: Message): boolean => {
    if (!isPolicy(msg)) return false;
    if (closed) {
      log.debug({ t: msg.t }, 'policy link: message after close; ignored');
      return true;
    }
    switch (msg.t) {
      case 'policy.sync':
        sync(msg.sync);
        break;
      case 'policy.others':
        sessions.apply(msg.counts);
        break;
      case 'policy.banned':
        if (bans) bans.local.put(msg.ban, state.clock());
        else log.warn({ t: msg.t }, 'policy link: a ban broadcast reached a worker with the Redis store; ignored');
        break;
      case 'policy.unbanned':
        if (bans) bans.local.forget(msg.id);
        else log.warn({ t: msg.t }, 'policy link: a ban broadcast reached a worker with the Redis store; ignored');
        break;
      case 'policy.blocked':
        state.blockFromElsewhere(msg.key, msg.until);
        break;
      case 'policy.ban.reply':
        if (bans) bans.settle(msg);
        else log.warn({ t: msg.t }, 'policy link: a ban reply reached a worker with the Redis store; ignored');
        break;
      case 'policy.attempt.counts':
        if (attempts) attempts.settle(msg);
        else log.warn({ t: msg.t }, 'policy link: attempt counts reached a worker with the Redis store; ignored');
        break;
      case 'policy.hello':
      case 'policy.sessions':
      case 'policy.ban.add':
      case 'policy.ban.remove':
      case 'policy.block':
      case 'policy.attempt.start':
      case 'policy.attempt.end':
        log.warn({ t: msg.t }, 'policy link: a message for the primary reached a worker; ignored');
        break;
      default: {
        const unknown: never = msg;
        log.warn({ t: (unknown as Message).t }, 'policy link: unknown message; ignored');
      }
    }
    return true;
  };

  const hello: PolicyMessage = { t: 'policy.hello' };
  const resync = () => {
    if (!closed) link.send(hello);
  };
  try {
    resync();
  } catch (err) {
    await close();
    throw new MailgateError('POLICY_STORE', 'policy link: could not greet the primary', { cause: err });
  }
  return { state, handle, resync, close };
}

/** This worker's session changes go to the primary; the other workers' counts come back. */
class WorkerSessions implements SharedSessions {
  private readonly link: PrimaryLink;
  private readonly log: Logger;
  /** The other workers' counts: only keys with sessions, so as many as there are sessions elsewhere. */
  private readonly elsewhere: Record<SessionKind, Map<string, Map<string, number>>> = { open: new Map(), login: new Map() };
  /** Changes not yet reported; at most REPORT_MS worth. */
  private readonly pending = new Map<string, SessionDelta>();
  private flush: (() => void) | undefined;
  private readonly reportMs: number;
  private closed = false;

  constructor(link: PrimaryLink, log: Logger, reportMs: number) {
    this.link = link;
    this.log = log;
    this.reportMs = reportMs;
  }

  changed(kind: SessionKind, key: string, listener: string, delta: number): void {
    if (this.closed) return;
    const id = JSON.stringify([kind, key, listener]);
    const d = this.pending.get(id);
    if (!d) this.pending.set(id, [kind, key, listener, delta]);
    else if (d[3] + delta === 0) this.pending.delete(id);
    else d[3] += delta;
    // One message per reportMs: a burst of connections is one IPC message, not one each, and a
    // connection that opens and closes within it costs none (its changes cancel out).
    if (this.flush) return;
    if (this.reportMs > 0) {
      const t = setTimeout(() => this.report(), this.reportMs);
      this.flush = () => clearTimeout(t);
    } else {
      const i = setImmediate(() => this.report());
      this.flush = () => clearImmediate(i);
    }
  }

  others(kind: SessionKind, key: string): ReadonlyMap<string, number> | undefined {
    return this.elsewhere[kind].get(key);
  }

  blocked(key: string, until: number): void {
    if (this.closed) return;
    const msg: PolicyMessage = { t: 'policy.block', key, until };
    this.link.send(msg);
  }

  apply(counts: SessionCounts[]): void {
    for (const [kind, key, perListener] of counts) {
      const map = this.elsewhere[kind];
      const nonzero = perListener.filter(([, n]) => n > 0);
      if (nonzero.length === 0) map.delete(key);
      else map.set(key, new Map(nonzero));
    }
  }

  replace(counts: SessionCounts[]): void {
    this.elsewhere.open.clear();
    this.elsewhere.login.clear();
    this.apply(counts);
  }

  /** Unreported changes are dropped: the primary forgets this worker's counts when it is gone (workerGone). */
  close(): void {
    this.closed = true;
    this.flush?.();
    this.flush = undefined;
    this.pending.clear();
  }

  private report(): void {
    this.flush = undefined;
    if (this.pending.size === 0) return;
    const msg: PolicyMessage = { t: 'policy.sessions', changes: [...this.pending.values()] };
    this.pending.clear();
    try {
      this.link.send(msg);
    } catch (err) {
      // The other workers' views miss these until the primary hears of this worker again (or it is gone).
      this.log.error({ err: errorMessage(err), changes: msg.changes.length }, 'policy link: could not report session counts to the primary');
    }
  }
}

/**
 * A worker's login attempts in flight with the memory store: counted in the
 * primary, so parallel guesses spread over workers see each other. When the
 * primary does not answer in time the attempt counts in this worker's memory
 * (as counters do), and the wait is logged.
 */
export class ClusterInFlight implements InFlightStore {
  private readonly link: PrimaryLink;
  private readonly log: Logger;
  private readonly timeoutMs: number;
  private readonly memory = new MemoryInFlight();
  private readonly waiting = new Map<number, { resolve(counts: number[]): void; fallback(): void; timer: NodeJS.Timeout }>();
  private nextReq = 0;
  private closed = false;

  constructor(link: PrimaryLink, log: Logger, timeoutMs: number) {
    this.link = link;
    this.log = log;
    this.timeoutMs = timeoutMs;
  }

  start(keys: readonly string[], id: string, until: number, now: number): Promise<number[]> {
    const local = () => this.memory.startNow(keys, id, until, now);
    if (this.closed) return Promise.resolve(local());
    return new Promise((resolve) => {
      const req = ++this.nextReq;
      const fallback = () => {
        this.waiting.delete(req);
        resolve(local());
      };
      const timer = setTimeout(() => {
        this.log.warn({ timeoutMs: this.timeoutMs }, 'policy link: the primary did not count a login attempt in time; counting it in this worker');
        fallback();
      }, this.timeoutMs);
      this.waiting.set(req, { resolve, fallback, timer });
      try {
        const msg: PolicyMessage = { t: 'policy.attempt.start', req, keys: [...keys], id, until };
        this.link.send(msg);
      } catch (err) {
        clearTimeout(timer);
        this.log.warn({ err: errorMessage(err) }, 'policy link: could not ask the primary to count a login attempt; counting it in this worker');
        fallback();
      }
    });
  }

  async end(keys: readonly string[], id: string): Promise<void> {
    this.memory.endNow(keys, id);
    if (this.closed) return;
    try {
      const msg: PolicyMessage = { t: 'policy.attempt.end', keys: [...keys], id };
      this.link.send(msg);
    } catch (err) {
      // The primary drops the attempt at its deadline.
      this.log.warn({ err: errorMessage(err) }, 'policy link: could not tell the primary a login attempt ended');
    }
  }

  settle(msg: Extract<PolicyMessage, { t: 'policy.attempt.counts' }>): void {
    const w = this.waiting.get(msg.req);
    if (!w) {
      this.log.debug({ req: msg.req }, 'policy link: attempt counts after their timeout; ignored');
      return;
    }
    this.waiting.delete(msg.req);
    clearTimeout(w.timer);
    w.resolve(msg.counts);
  }

  /** Requests still waiting count in this worker's memory. */
  close(): void {
    this.closed = true;
    for (const w of [...this.waiting.values()]) {
      clearTimeout(w.timer);
      w.fallback();
    }
  }
}

interface PendingRequest {
  what: string;
  resolve(reply: Extract<PolicyMessage, { t: 'policy.ban.reply' }>): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * A worker's bans with the memory store: its local view answers everything
 * synchronously (and check/list too: the view follows the primary within a
 * message); changes are the primary's to make, and come back as broadcasts.
 */
export class ClusterBanStore extends ViewedBanStore {
  private readonly link: PrimaryLink;
  private readonly log: Logger;
  private readonly timeoutMs: number;
  private readonly pending = new Map<number, PendingRequest>();
  private nextReq = 0;
  private closed = false;

  constructor(link: PrimaryLink, log: Logger, timeoutMs: number) {
    super();
    this.link = link;
    this.log = log;
    this.timeoutMs = timeoutMs;
  }

  async check(id: string, now: number): Promise<Ban | undefined> {
    return this.local.cached(id, now);
  }

  /** Resolves once the primary has the ban and this worker's view too. */
  async add(ban: Ban, now: number): Promise<void> {
    if (ban.until <= now) return;
    await this.ask(`add ban ${ban.id}`, (req) => ({ t: 'policy.ban.add', req, ban }));
  }

  async remove(id: string): Promise<boolean> {
    const reply = await this.ask(`remove ban ${id}`, (req) => ({ t: 'policy.ban.remove', req, id }));
    return reply.removed === true;
  }

  async list(now: number): Promise<Ban[]> {
    return this.local.cachedList(now);
  }

  /** Makes the view the primary's bans (at start, and on a fresh sync). */
  replace(bans: Ban[], now: number): void {
    const ids = new Set(bans.map((b) => b.id));
    for (const b of this.local.cachedList(now)) if (!ids.has(b.id)) this.local.forget(b.id);
    for (const b of bans) this.local.put(b, now);
  }

  settle(reply: Extract<PolicyMessage, { t: 'policy.ban.reply' }>): void {
    const p = this.pending.get(reply.req);
    if (!p) {
      // Its request already failed with a timeout; the change itself arrived as a broadcast.
      this.log.warn({ req: reply.req, error: reply.error }, 'policy link: the primary answered a ban request after its timeout');
      return;
    }
    this.pending.delete(reply.req);
    clearTimeout(p.timer);
    if (reply.error !== undefined) p.reject(new MailgateError('POLICY_STORE', `policy link: the primary could not ${p.what}: ${reply.error}`));
    else p.resolve(reply);
  }

  private ask(what: string, make: (req: number) => PolicyMessage): Promise<Extract<PolicyMessage, { t: 'policy.ban.reply' }>> {
    if (this.closed) return Promise.reject(new MailgateError('POLICY_STORE', `policy link: cannot ${what}: the policy state is closed`));
    return new Promise((resolve, reject) => {
      const req = ++this.nextReq;
      // Not unref'd: a request in flight is work the process is waiting for, and it ends within timeoutMs.
      const timer = setTimeout(() => {
        this.pending.delete(req);
        reject(new MailgateError('POLICY_STORE', `policy link: the primary did not answer "${what}" within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(req, { what, resolve, reject, timer });
      try {
        this.link.send(make(req));
      } catch (err) {
        this.pending.delete(req);
        clearTimeout(timer);
        reject(new MailgateError('POLICY_STORE', `policy link: could not ask the primary to ${what}`, { cause: err }));
      }
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const [req, p] of this.pending) {
      this.pending.delete(req);
      clearTimeout(p.timer);
      p.reject(new MailgateError('POLICY_STORE', `policy link: ${p.what}: the policy state closed before the primary answered`));
    }
    await this.local.close();
  }
}

// ---- primary side -------------------------------------------------------------------------------

type Counts = Record<SessionKind, Map<string, Map<string, number>>>;
type Keys = Record<SessionKind, Set<string>>;

function noCounts(): Counts {
  return { open: new Map(), login: new Map() };
}

function noKeys(): Keys {
  return { open: new Set(), login: new Set() };
}

/**
 * Each worker's session counts and their totals, kept equal to the sum
 * (counts of 0 are deleted): as many entries as there are sessions.
 */
class SessionTally implements SharedSessions {
  readonly totals = noCounts();
  private readonly workers = new Map<number, { pid: number; counts: Counts }>();

  /** The primary serves no sessions; its own counts (if any) stay in its PolicyState. */
  changed(): void {}

  others(kind: SessionKind, key: string): ReadonlyMap<string, number> | undefined {
    return this.totals[kind].get(key);
  }

  pidOf(index: number): number | undefined {
    return this.workers.get(index)?.pid;
  }

  /** A worker's changes; returns the keys whose counts changed. */
  apply(from: WorkerLink, changes: SessionDelta[], log: Logger): Keys {
    let w = this.workers.get(from.index);
    if (!w) {
      w = { pid: from.pid, counts: noCounts() };
      this.workers.set(from.index, w);
    }
    const keys = noKeys();
    for (const change of changes) {
      const [kind, key, listener, delta] = change;
      if ((kind !== 'open' && kind !== 'login') || typeof key !== 'string' || typeof listener !== 'string' || !Number.isInteger(delta)) {
        log.warn({ worker: from.index, change }, 'policy link: ignoring a malformed session change');
        continue;
      }
      const applied = bump(w.counts[kind], key, listener, delta);
      if (applied === 0) continue;
      bump(this.totals[kind], key, listener, applied);
      keys[kind].add(key);
    }
    return keys;
  }

  /** Forgets a worker process's counts; returns the keys whose totals changed. */
  drop(index: number, pid: number): Keys {
    const keys = noKeys();
    const w = this.workers.get(index);
    if (!w || w.pid !== pid) return keys;
    this.workers.delete(index);
    for (const kind of ['open', 'login'] as const) {
      for (const [key, perListener] of w.counts[kind]) {
        for (const [listener, n] of perListener) bump(this.totals[kind], key, listener, -n);
        keys[kind].add(key);
      }
    }
    return keys;
  }

  /** The sessions outside `link`'s worker for one key. */
  othersFor(link: WorkerLink, kind: SessionKind, key: string): [string, number][] {
    const total = this.totals[kind].get(key);
    if (!total) return [];
    const w = this.workers.get(link.index);
    const mine = w?.pid === link.pid ? w.counts[kind].get(key) : undefined;
    const out: [string, number][] = [];
    for (const [listener, n] of total) {
      const rest = n - (mine?.get(listener) ?? 0);
      if (rest > 0) out.push([listener, rest]);
    }
    return out;
  }

  countsFor(link: WorkerLink, keys: Keys): SessionCounts[] {
    const out: SessionCounts[] = [];
    for (const kind of ['open', 'login'] as const) for (const key of keys[kind]) out.push([kind, key, this.othersFor(link, kind, key)]);
    return out;
  }

  allKeys(): Keys {
    return { open: new Set(this.totals.open.keys()), login: new Set(this.totals.login.keys()) };
  }
}

/** Logs, at most every 10 s, that one of the primary's counters forgot its oldest counts. */
function counterFull(log: Logger, maxKeys: number | undefined): (keyPrefix: string) => void {
  let last = 0;
  return (counter) => {
    const now = Date.now();
    if (now - last < 10_000) return;
    last = now;
    log.warn({ counter, maxKeys }, 'policy counter full: the counts that started longest ago are forgotten (policy_store.max_keys)');
  };
}

/** An attempt as a worker names it: its keys (the address, a pair and a user per key of username_format) and id. */
function validAttempt(keys: unknown, id: unknown): keys is string[] {
  return Array.isArray(keys) && keys.length <= 16 && keys.every((k) => typeof k === 'string' && k.length <= 1024) && typeof id === 'string' && id.length <= 64;
}

function isEmpty(keys: Keys): boolean {
  return keys.open.size === 0 && keys.login.size === 0;
}

export interface PolicyAuthorityOptions {
  store: StoreConfig;
  log: Logger;
  /** The workers running now (for broadcasts). */
  workers: () => Iterable<WorkerLink>;
  /** Injected for tests; ms since epoch. */
  clock?: () => number;
}

/** The primary's side: the authority for memory bans and counters, and the tally of every worker's sessions. */
export class PolicyAuthority {
  /** The primary's state: its bans are the authority (memory store); openFrom/loggedIn answer all workers' totals. */
  readonly state: PolicyState;
  private readonly log: Logger;
  private readonly workers: () => Iterable<WorkerLink>;
  private readonly tally: SessionTally;
  private readonly kind: 'memory' | 'redis';
  private readonly unsubscribe: () => void;
  private closed = false;

  private constructor(state: PolicyState, tally: SessionTally, opts: PolicyAuthorityOptions) {
    this.state = state;
    this.tally = tally;
    this.log = opts.log;
    this.workers = opts.workers;
    this.kind = storeKind(opts.store);
    // With Redis, workers hear of ban changes from Redis; with memory, only from here.
    this.unsubscribe = this.kind === 'memory' ? state.bans.onChange((change) => this.broadcastBan(change)) : () => {};
  }

  static async create(opts: PolicyAuthorityOptions): Promise<PolicyAuthority> {
    const tally = new SessionTally();
    const memory = storeKind(opts.store) === 'memory';
    const state = await PolicyState.create({
      store: opts.store,
      log: opts.log,
      sessions: tally,
      ...(opts.clock ? { clock: opts.clock } : {}),
      ...(memory ? { memory: { limiter: masterLimiter(opts.store.max_keys, counterFull(opts.log, opts.store.max_keys)) } } : {}),
    });
    return new PolicyAuthority(state, tally, opts);
  }

  /** For a worker's start message. */
  syncFor(link: WorkerLink): PolicySync {
    return {
      store: this.kind,
      bans: this.kind === 'memory' ? this.state.bans.cachedList(this.state.clock()) : [],
      sessions: this.tally.countsFor(link, this.tally.allKeys()).filter(([, , perListener]) => perListener.length > 0),
    };
  }

  /** A message from a worker; true when it was a policy.* message. */
  handle(from: WorkerLink, msg: Message): boolean {
    if (!isPolicy(msg)) return false;
    if (this.closed) {
      this.log.debug({ t: msg.t, worker: from.index }, 'policy link: message after close; ignored');
      return true;
    }
    switch (msg.t) {
      case 'policy.hello':
        this.send(from, { t: 'policy.sync', sync: this.syncFor(from) });
        break;
      case 'policy.sessions': {
        const known = this.tally.pidOf(from.index);
        // A new process in the slot before workerGone for the old one: the old counts go, and everyone hears.
        if (known !== undefined && known !== from.pid) this.forget(from.index, known, undefined);
        this.tell(this.tally.apply(from, msg.changes, this.log), from);
        break;
      }
      case 'policy.ban.add':
        this.answer(from, msg.req, `add ban ${msg.ban.id}`, async () => {
          await this.state.bans.add(msg.ban, this.state.clock());
          return {};
        });
        break;
      case 'policy.ban.remove':
        this.answer(from, msg.req, `remove ban ${msg.id}`, async () => ({ removed: await this.state.bans.remove(msg.id) }));
        break;
      case 'policy.block':
        this.state.blockFromElsewhere(msg.key, msg.until);
        for (const link of this.workers()) if (link.pid !== from.pid) this.send(link, { t: 'policy.blocked', key: msg.key, until: msg.until });
        break;
      case 'policy.attempt.start':
        this.attemptStart(from, msg);
        break;
      case 'policy.attempt.end':
        if (validAttempt(msg.keys, msg.id)) this.state.track('end an attempt', this.state.attempts.end(msg.keys, msg.id));
        else this.log.warn({ worker: from.index }, 'policy link: ignoring a malformed attempt end');
        break;
      case 'policy.attempt.counts':
      case 'policy.sync':
      case 'policy.others':
      case 'policy.banned':
      case 'policy.unbanned':
      case 'policy.blocked':
      case 'policy.ban.reply':
        this.log.warn({ t: msg.t, worker: from.index }, 'policy link: a message for workers reached the primary; ignored');
        break;
      default: {
        const unknown: never = msg;
        this.log.warn({ t: (unknown as Message).t, worker: from.index }, 'policy link: unknown message; ignored');
      }
    }
    return true;
  }

  private attemptStart(from: WorkerLink, msg: Extract<PolicyMessage, { t: 'policy.attempt.start' }>): void {
    if (this.kind !== 'memory' || !validAttempt(msg.keys, msg.id) || !Number.isFinite(msg.until)) {
      this.log.warn({ worker: from.index }, 'policy link: ignoring a malformed or misplaced attempt start');
      return;
    }
    this.state.track(
      `count an attempt for worker ${from.index}`,
      this.state.attempts.start(msg.keys, msg.id, msg.until, this.state.clock()).then((counts) => this.send(from, { t: 'policy.attempt.counts', req: msg.req, counts })),
    );
  }

  /** A worker process has exited: its sessions no longer count anywhere. */
  workerGone(link: WorkerLink): void {
    this.forget(link.index, link.pid, link);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribe();
    await this.state.close();
  }

  private forget(index: number, pid: number, except: WorkerLink | undefined): void {
    this.tell(this.tally.drop(index, pid), except);
  }

  /** Every worker but `except` gets its view of the keys that changed. */
  private tell(keys: Keys, except: WorkerLink | undefined): void {
    if (isEmpty(keys)) return;
    for (const link of this.workers()) {
      if (except && link.index === except.index) continue;
      this.send(link, { t: 'policy.others', counts: this.tally.countsFor(link, keys) });
    }
  }

  private broadcastBan(change: BanChange): void {
    const msg: PolicyMessage = change.kind === 'banned' ? { t: 'policy.banned', ban: change.ban } : { t: 'policy.unbanned', id: change.ban.id };
    for (const link of this.workers()) this.send(link, msg);
  }

  private answer(from: WorkerLink, req: number, what: string, work: () => Promise<{ removed?: boolean }>): void {
    if (this.kind !== 'memory') {
      this.send(from, { t: 'policy.ban.reply', req, error: 'bans are kept in Redis, not by the primary' });
      return;
    }
    this.state.track(
      `${what} for worker ${from.index}`,
      work().then(
        (res) => this.send(from, { t: 'policy.ban.reply', req, ...res }),
        (err: unknown) => {
          this.log.error({ worker: from.index, err: errorMessage(err) }, `policy link: could not ${what}`);
          this.send(from, { t: 'policy.ban.reply', req, error: errorMessage(err) });
        },
      ),
    );
  }

  private send(link: WorkerLink, msg: PolicyMessage): void {
    try {
      link.send(msg);
    } catch (err) {
      // A worker on its way out; workerGone follows. The others still get theirs.
      this.log.warn({ worker: link.index, pid: link.pid, t: msg.t, err: errorMessage(err) }, 'policy link: could not send to a worker');
    }
  }
}
