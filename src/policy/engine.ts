/**
 * The policy seam. The session driver asks when a client connects and when
 * credentials are ready, reports the backend's verdict on a login and the end
 * of a session; the HTTP listener asks per request and the SMTP splice per
 * message. Policy is a decision on facts: it never touches a socket.
 *
 * PolicyEngine is the configured policy: access rules, local users, per-user
 * routes, rate limits and brute-force bans (src/policy/*). Its memory (counts,
 * bans, open sessions) is a PolicyState that outlives the engine, so a reload
 * builds a new engine on the same state. PassthroughPolicy is the do-nothing
 * policy for tests and tools.
 *
 * Connect-time and per-request answers are synchronous: they read this
 * gateway's view of bans and blocks, and count in the store afterwards (a
 * limit reached sets a local block, so the next connection is refused). With
 * Redis another gateway's counts arrive at the next block; the login-time
 * checks always ask the store.
 */
import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import type { Config, Listener } from '../config/load.ts';
import type { BackendLogin, PolicySections, RateLimit } from '../config/schema-policy.ts';
import type { BanAdmin, Ban as ControlBan } from '../control/target.ts';
import { errorCode, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { normalizeIp, type HostPort } from '../net/address.ts';
import type { Credentials } from '../protocols/types.ts';
import { banId, type Ban, type BanKind } from './bans.ts';
import { AddressSet, parseCidr } from '../net/cidr.ts';
import type { WindowCounter } from './counters.ts';
import { canonicalUser } from './names.ts';
import type { PolicyFiles } from './files.ts';
import { BackendSecrets, Router } from './routes.ts';
import { RuleSet, type RuleFacts } from './rules.ts';
import type { PolicyState } from './state.ts';
import { UserDirectory, type LocalUser } from './users.ts';

export interface ConnectFacts {
  listener: Listener;
  clientIp: string;
  tls: boolean;
  now: number;
  /** The session id (registry), when the caller has one: per-user session counts need it. */
  session?: string;
}

export interface AuthFacts extends ConnectFacts {
  user: string | null;
  mechanism: Credentials['mechanism'] | null;
}

/** One HTTP request on a connection that passed onConnect. */
export interface HttpRequestFacts extends ConnectFacts {
  method?: string;
  path?: string;
}

export type Verdict =
  | { action: 'allow' }
  | { action: 'deny'; reason: string }
  | { action: 'tempfail'; reason: string; retryAfterMs?: number };

export type AuthDecision =
  | { action: 'allow'; backend: HostPort; credentials: Credentials | null }
  | { action: 'deny'; reason: string }
  | { action: 'tempfail'; reason: string; retryAfterMs?: number };

export interface Policy {
  onConnect(facts: ConnectFacts): Verdict;
  onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision>;
  /** The backend's (or local) verdict on a login, for failure counting and bans. */
  onAuthResult(facts: AuthFacts, ok: boolean): void;
  /** A session that passed onConnect has ended (concurrency accounting). */
  onDisconnect(facts: ConnectFacts): void;
  /** Per HTTP request (requests per window): `tempfail` is answered with 429 and Retry-After. */
  onHttpRequest?(facts: HttpRequestFacts): Verdict;
  /**
   * An SMTP message went through a spliced session (messages and recipients
   * per window). `tempfail`: the limit is reached; the driver stops relaying
   * and ends the session with the protocol's temporary failure (421).
   */
  onSmtpMessage?(facts: AuthFacts, recipients: number): Promise<Verdict>;
}

export class PassthroughPolicy implements Policy {
  onConnect(): Verdict {
    return { action: 'allow' };
  }

  async onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision> {
    return { action: 'allow', backend: facts.listener.backend, credentials };
  }

  onAuthResult(): void {}

  onDisconnect(): void {}
}

// ---- the configured engine ---------------------------------------------------------

/** Texts the client sees. Fixed, short, and the same for a wrong password and an unknown user. */
const TEXT = {
  denied: 'Access denied',
  tempfail: 'Try again later',
  badLogin: 'Authentication failed',
  banned: 'Too many failed logins, try again later',
  connections: 'Too many connections, try again later',
  concurrent: 'Too many connections from your address',
  sessions: 'Too many sessions for this user',
  messages: 'Message limit reached, try again later',
  requests: 'Too many requests',
  busy: 'Authentication temporarily unavailable',
} as const;

/** Login names longer than this are refused without further work (they are not names). */
const MAX_USER = 320;

type BruteForce = PolicySections['brute_force'];
type Threshold = BruteForce['per_address'];

interface CompiledLimit {
  readonly spec: RateLimit;
  /** Counter (and local block) name: the same rule keeps its counts across reloads. */
  readonly name: string;
  readonly counter: WindowCounter | undefined;
  /** Whether a session on this listener counts (listeners/protocols scope). */
  readonly scope: (listener: string) => boolean;
}

export interface BanRequest {
  kind: BanKind;
  /** An address ("range": a CIDR); for "address", "range" and "pair". */
  address?: string;
  /** For "user" and "pair". */
  user?: string;
  durationMs: number;
  reason?: string;
}

export interface FailureCounts {
  address: number;
  pair: number | null;
  user: number | null;
}

/** The dashboard's and control socket's view of bans and counters (all kinds, from the store). */
export interface PolicyAdmin {
  listBans(): Promise<Ban[]>;
  addBan(req: BanRequest): Promise<Ban>;
  removeBan(id: string): Promise<boolean>;
  /** Failed logins counted in the current windows, and bans, for an address and/or user. */
  inspect(query: { address?: string; user?: string }): Promise<{ failures: FailureCounts | null; bans: Ban[] }>;
  /** Sessions open from an address, logged in for a user (this gateway). */
  open(query: { address?: string; user?: string }): { address: number | null; user: number | null };
}

export class PolicyEngine implements Policy {
  private readonly state: PolicyState;
  private readonly log: Logger;
  private readonly rules: RuleSet;
  private readonly users: UserDirectory;
  private readonly router: Router;
  private readonly secrets: BackendSecrets;
  private readonly bf: BruteForce;
  private readonly exempt: AddressSet;
  private readonly limits: CompiledLimit[];
  private readonly failures: { address: WindowCounter; pair: WindowCounter; user: WindowCounter };

  /** `files`: what the config's users and password files hold (src/policy/files.ts). Throws for a bad user entry. */
  constructor(config: Config, files: PolicyFiles, state: PolicyState, log: Logger) {
    this.state = state;
    this.log = log.child({ part: 'policy' });
    this.rules = new RuleSet(config.access.rules, config.access.default);
    this.users = UserDirectory.fromConfig(config.users, files);
    this.router = new Router(config.routes);
    this.secrets = new BackendSecrets(files, config.baseDir);
    this.bf = config.brute_force;
    this.exempt = new AddressSet(config.brute_force.exempt);
    const protocolOf = new Map(config.listeners.map((l) => [l.name, l.protocol as string]));
    this.limits = config.rate_limits.map((spec) => compileLimit(spec, protocolOf, state));
    this.failures = {
      address: state.counters.counter('fail:address', this.bf.per_address.window),
      pair: state.counters.counter('fail:pair', this.bf.per_address_user.window),
      user: state.counters.counter('fail:user', this.bf.per_user.window),
    };
    for (const l of config.listeners) {
      if ('authentication' in l && l.authentication === 'local' && this.users.size === 0) {
        this.log.warn({ listener: l.name }, 'authentication is local but no users are configured: every login will fail');
      }
    }
  }

  /** Finishes the store work started by synchronous hooks (tests). */
  settled(): Promise<void> {
    return this.state.settled();
  }

  // ---- connect ---------------------------------------------------------------------

  onConnect(facts: ConnectFacts): Verdict {
    const now = this.state.clock();
    const l = facts.listener;
    const address = facts.clientIp;
    const outcome = this.rules.evaluate(connectRuleFacts(l, address));
    if (outcome.decided && outcome.action !== 'allow') return ruleVerdict(outcome.action, outcome.reason);

    const ban = this.addressBan(address, now);
    if (ban) return tempfail(TEXT.banned, ban.until - now);

    const mine = this.limits.filter((c) => c.scope(l.name) && (c.spec.limit === 'connections' || (c.spec.limit === 'concurrent' && c.spec.per === 'address')));
    for (const c of mine) {
      if (c.spec.limit === 'connections') {
        const until = this.state.blockedUntil(blockKey(c, limitKey(c, address, l.name)), now);
        if (until !== undefined) return tempfail(TEXT.connections, until - now);
      } else if (this.state.openFrom(address, c.scope) >= c.spec.max) {
        return tempfail(TEXT.concurrent);
      }
    }
    this.state.connectionOpened(l.name, address);
    for (const c of mine) if (c.spec.limit === 'connections') this.count(c, limitKey(c, address, l.name), 1);
    return { action: 'allow' };
  }

  onDisconnect(facts: ConnectFacts): void {
    this.state.connectionClosed(facts.listener.name, facts.clientIp);
    if (facts.session !== undefined) this.state.loginEnded(facts.session);
  }

  onHttpRequest(facts: HttpRequestFacts): Verdict {
    const now = this.state.clock();
    const ban = this.addressBan(facts.clientIp, now);
    if (ban) return tempfail(TEXT.banned, ban.until - now);
    const mine = this.limits.filter((c) => c.spec.limit === 'http_requests' && c.scope(facts.listener.name));
    for (const c of mine) {
      const until = this.state.blockedUntil(blockKey(c, limitKey(c, facts.clientIp, facts.listener.name)), now);
      if (until !== undefined) return tempfail(TEXT.requests, until - now);
    }
    for (const c of mine) this.count(c, limitKey(c, facts.clientIp, facts.listener.name), 1);
    return { action: 'allow' };
  }

  // ---- login --------------------------------------------------------------------------

  async onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision> {
    const l = facts.listener;
    const address = facts.clientIp;
    const local = isLocal(l);
    if (credentials && (credentials.user.length > MAX_USER || (credentials.authzid?.length ?? 0) > MAX_USER)) return deny(TEXT.badLogin);
    const userKey = credentials ? canonicalUser(credentials.user) : null;

    const banned = await this.loginBan(address, userKey, this.state.clock());
    if (banned) return banned;

    let verified: LocalUser | undefined;
    if (local && credentials) {
      if (credentials.authzid && canonicalUser(credentials.authzid) !== userKey) {
        // Acting as another user is not something local users can do.
        return deny(TEXT.badLogin);
      }
      try {
        verified = await this.users.verify(credentials.user, credentials.password);
      } catch (err) {
        if (errorCode(err) === 'AUTH_BUSY') return tempfail(TEXT.busy, 5_000);
        throw err;
      }
      if (!verified) {
        await this.recordFailure(address, userKey);
        return deny(TEXT.badLogin);
      }
      await this.failures.pair.reset(pairKey(address, userKey ?? ''));
    }

    // Rules and routes see the identity the session acts as (a PLAIN authorization id, when the backend allows one).
    const identity = verified?.name ?? (credentials ? credentials.authzid || credentials.user : null);
    const groups = this.users.groupsOf(identity);
    const outcome = this.rules.evaluate({
      listener: l.name,
      protocol: l.protocol,
      address,
      tls: facts.tls,
      user: identity,
      groups,
      authenticated: credentials !== null,
    });
    if (!outcome.decided) throw new Error('rules left a login undecided');
    if (outcome.action !== 'allow') {
      return outcome.action === 'deny' ? deny(outcome.reason ?? (credentials ? TEXT.badLogin : TEXT.denied)) : tempfail(outcome.reason ?? TEXT.tempfail);
    }

    const now = this.state.clock();
    const identityKey = identity === null ? null : canonicalUser(identity);
    for (const c of this.limits) {
      if (!c.scope(l.name)) continue;
      if (c.spec.limit === 'concurrent' && c.spec.per === 'user' && identityKey !== null) {
        if (this.state.loggedIn(identityKey, c.scope) >= c.spec.max) return tempfail(TEXT.sessions);
      }
      if ((c.spec.limit === 'messages' || c.spec.limit === 'recipients') && l.protocol === 'smtp' && c.counter) {
        const key = c.spec.per === 'user' ? identityKey : address;
        if (key === null) continue;
        const until = this.state.blockedUntil(blockKey(c, key), now);
        if (until !== undefined) return tempfail(TEXT.messages, until - now);
        const n = await c.counter.peek(key);
        if (n.count >= c.spec.max) return tempfail(TEXT.messages, n.resetMs);
      }
    }

    let backend = l.backend;
    let replay: Credentials | null = credentials;
    if (identity !== null) {
      const target = this.router.route({ listener: l.name, protocol: l.protocol, defaultBackend: l.backend, user: identity, groups });
      backend = target.backend;
      if (verified && credentials) replay = this.secrets.credentials(target.login ?? listenerLogin(l), credentials, verified.name);
    } else if (local) {
      // SMTP without AUTH on a local listener: nothing to replay.
      replay = null;
    }
    if (facts.session !== undefined && identityKey !== null) this.state.loginStarted(facts.session, l.name, identityKey);
    return { action: 'allow', backend, credentials: replay };
  }

  onAuthResult(facts: AuthFacts, ok: boolean): void {
    if (!ok && facts.session !== undefined) this.state.loginEnded(facts.session);
    if (facts.user === null) return;
    if (isLocal(facts.listener)) {
      // mailgate verified the password; a refusal now is the backend's configuration (backend_login), not the client.
      if (!ok) this.log.warn({ listener: facts.listener.name, user: facts.user }, 'the backend refused a login mailgate had verified (check backend_login)');
      return;
    }
    const userKey = canonicalUser(facts.user);
    if (ok) this.state.track('reset failures', this.failures.pair.reset(pairKey(facts.clientIp, userKey)));
    else this.state.track('count failure', this.recordFailure(facts.clientIp, userKey));
  }

  async onSmtpMessage(facts: AuthFacts, recipients: number): Promise<Verdict> {
    const l = facts.listener;
    const now = this.state.clock();
    const userKey = facts.user === null ? null : canonicalUser(facts.user);
    let reached: Verdict | undefined;
    for (const c of this.limits) {
      if ((c.spec.limit !== 'messages' && c.spec.limit !== 'recipients') || !c.scope(l.name) || !c.counter) continue;
      const key = c.spec.per === 'user' ? userKey : facts.clientIp;
      if (key === null) continue;
      const n = c.spec.limit === 'messages' ? 1 : recipients;
      if (n <= 0) continue;
      const count = await c.counter.hit(key, n);
      if (count.count >= c.spec.max) {
        this.state.block(blockKey(c, key), now + count.resetMs);
        reached ??= tempfail(TEXT.messages, count.resetMs);
        this.log.info({ listener: l.name, user: facts.user, client: facts.clientIp, limit: c.spec.limit, count: count.count, max: c.spec.max }, 'message limit reached');
      }
    }
    return reached ?? { action: 'allow' };
  }

  // ---- brute force ------------------------------------------------------------------

  private addressBan(address: string, now: number): Ban | undefined {
    return this.state.bans.cached(banId('address', address, null), now) ?? this.state.bans.rangeBanFor(address, now);
  }

  /** Bans that stop a login before its password is looked at. */
  private async loginBan(address: string, userKey: string | null, now: number): Promise<AuthDecision | undefined> {
    const bans = this.state.bans;
    const [addr, pair, user] = await Promise.all([
      bans.check(banId('address', address, null), now),
      userKey === null ? undefined : bans.check(banId('pair', address, userKey), now),
      userKey === null ? undefined : bans.check(banId('user', null, userKey), now),
    ]);
    const hit = addr ?? bans.rangeBanFor(address, now) ?? pair;
    if (hit) return tempfail(TEXT.banned, hit.until - now);
    if (user && userKey !== null) {
      // A locked user still logs in from an address that has not failed for it.
      const failed = await this.failures.pair.peek(pairKey(address, userKey));
      if (failed.count > 0) return tempfail(TEXT.banned, user.until - now);
    }
    return undefined;
  }

  /** Counts one failed login and bans when a threshold is reached. */
  private async recordFailure(address: string, userKey: string | null): Promise<void> {
    if (!this.bf.enabled || this.exempt.has(address)) return;
    const [a, p, u] = await Promise.all([
      this.failures.address.hit(address),
      userKey === null ? undefined : this.failures.pair.hit(pairKey(address, userKey)),
      userKey === null ? undefined : this.failures.user.hit(userKey),
    ]);
    this.log.info({ client: address, user: userKey, failures: { address: a.count, pair: p?.count, user: u?.count } }, 'failed login counted');
    const now = this.state.clock();
    if (a.count >= this.bf.per_address.failures) await this.autoBan('address', address, null, this.bf.per_address, a.count, now);
    if (p && userKey !== null && p.count >= this.bf.per_address_user.failures) {
      await this.autoBan('pair', address, userKey, this.bf.per_address_user, p.count, now);
    }
    if (u && userKey !== null && u.count >= this.bf.per_user.failures) await this.autoBan('user', null, userKey, this.bf.per_user, u.count, now);
  }

  private async autoBan(kind: BanKind, address: string | null, user: string | null, t: Threshold, count: number, now: number): Promise<void> {
    const id = banId(kind, address, user);
    if (this.state.bans.cached(id, now)) return;
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
    await this.state.bans.add(ban, now);
    this.log.warn({ ban: kind, client: address, user, until: new Date(ban.until).toISOString(), failures: count }, 'banned after failed logins');
  }

  // ---- counting helpers ----------------------------------------------------------------

  /** Counts in the store; when the count reaches the maximum, later callers are blocked locally until the window ends. */
  private count(c: CompiledLimit, key: string, n: number): void {
    if (!c.counter) return;
    const counter = c.counter;
    this.state.track(
      `count ${c.name}`,
      counter.hit(key, n).then((res) => {
        if (res.count >= c.spec.max) this.state.block(blockKey(c, key), this.state.clock() + Math.max(res.resetMs, 1));
      }),
    );
  }

  // ---- admin ---------------------------------------------------------------------------

  /** Bans and counters for the dashboard (all ban kinds, authoritative). */
  get admin(): PolicyAdmin {
    const state = this.state;
    return {
      listBans: () => state.bans.list(state.clock()),
      addBan: async (req) => {
        const now = state.clock();
        const ban = makeBan(req, now);
        await state.bans.add(ban, now);
        this.log.info({ ban: ban.kind, client: ban.address, user: ban.user, until: new Date(ban.until).toISOString() }, 'ban added');
        return ban;
      },
      removeBan: async (id) => {
        const removed = await state.bans.remove(id);
        if (removed) this.log.info({ ban: id }, 'ban removed');
        return removed;
      },
      inspect: async (q) => {
        const now = state.clock();
        const address = q.address === undefined ? undefined : normalizeIp(q.address);
        const user = q.user === undefined ? undefined : canonicalUser(q.user);
        let failures: FailureCounts | null = null;
        if (address !== undefined) {
          failures = {
            address: (await this.failures.address.peek(address)).count,
            pair: user === undefined ? null : (await this.failures.pair.peek(pairKey(address, user))).count,
            user: user === undefined ? null : (await this.failures.user.peek(user)).count,
          };
        } else if (user !== undefined) {
          failures = { address: 0, pair: null, user: (await this.failures.user.peek(user)).count };
        }
        const bans = (await state.bans.list(now)).filter(
          (b) => (address !== undefined && b.address === address) || (user !== undefined && b.user === user),
        );
        return { failures, bans };
      },
      open: (q) => ({
        address: q.address === undefined ? null : state.openFrom(normalizeIp(q.address)),
        user: q.user === undefined ? null : state.loggedIn(canonicalUser(q.user)),
      }),
    };
  }

  /** The control socket's address ban list (src/control/target.ts): addresses, ranges, and user-from-address bans. */
  get bans(): BanAdmin {
    const state = this.state;
    const admin = this.admin;
    const shown = (b: Ban) => b.kind !== 'user' && b.address !== null;
    return {
      list: () => state.bans.cachedList(state.clock()).filter(shown).map(toControlBan),
      ban: (ip, seconds, reason) => {
        const kind: BanKind = ip.includes('/') ? 'range' : 'address';
        const req: BanRequest = { kind, address: ip, durationMs: seconds * 1000, reason };
        makeBan(req, state.clock()); // validates now, so a bad address is the caller's error
        state.track('ban', admin.addBan(req));
      },
      unban: (ip) => {
        const address = ip.includes('/') ? ip : normalizeIp(ip);
        const ids = state.bans
          .cachedList(state.clock())
          .filter((b) => b.address === address && b.kind !== 'user')
          .map((b) => b.id);
        for (const id of ids) state.track('unban', admin.removeBan(id));
        return ids.length > 0;
      },
      onChange: (listener) =>
        state.bans.onChange((change) => {
          const b = change.ban;
          if (!shown(b) || b.address === null) return;
          if (change.kind === 'banned') listener({ kind: 'banned', ban: toControlBan(b) });
          else listener({ kind: 'unbanned', ip: b.address });
        }),
    };
  }
}

// ---- helpers ------------------------------------------------------------------------------

function isLocal(l: Listener): boolean {
  return 'authentication' in l && l.authentication === 'local';
}

function listenerLogin(l: Listener): BackendLogin {
  return ('backend_login' in l ? l.backend_login : undefined) ?? 'replay';
}

/** What is known at connect: TLS only on implicit-TLS (or plain) listeners; HTTP has no login, so everything is known. */
function connectRuleFacts(l: Listener, address: string): RuleFacts {
  const http = l.protocol === 'http';
  return {
    listener: l.name,
    protocol: l.protocol,
    address,
    tls: l.tls === 'implicit' ? true : l.tls === 'none' ? false : undefined,
    user: http ? null : undefined,
    groups: http ? new Set() : undefined,
    authenticated: http ? false : undefined,
  };
}

function ruleVerdict(action: 'deny' | 'tempfail', reason: string | undefined): Verdict {
  return action === 'deny' ? { action, reason: reason ?? TEXT.denied } : { action, reason: reason ?? TEXT.tempfail };
}

function deny(reason: string): { action: 'deny'; reason: string } {
  return { action: 'deny', reason };
}

function tempfail(reason: string, retryAfterMs?: number): { action: 'tempfail'; reason: string; retryAfterMs?: number } {
  return retryAfterMs === undefined ? { action: 'tempfail', reason } : { action: 'tempfail', reason, retryAfterMs: Math.max(0, Math.ceil(retryAfterMs)) };
}

function pairKey(address: string, userKey: string): string {
  return `${address}|${userKey}`;
}

function limitKey(c: CompiledLimit, address: string, listener: string): string {
  return c.spec.per === 'listener' ? listener : address;
}

function blockKey(c: CompiledLimit, key: string): string {
  return `${c.name}|${key}`;
}

function compileLimit(spec: RateLimit, protocolOf: ReadonlyMap<string, string>, state: PolicyState): CompiledLimit {
  const listeners = spec.listeners && new Set(spec.listeners);
  const protocols = spec.protocols && new Set<string>(spec.protocols);
  // messages and recipients only mean something on SMTP listeners.
  const implied = spec.limit === 'messages' || spec.limit === 'recipients' ? 'smtp' : spec.limit === 'http_requests' ? 'http' : undefined;
  const scope = (listener: string) => {
    if (listeners && !listeners.has(listener)) return false;
    const p = protocolOf.get(listener);
    if (protocols && (p === undefined || !protocols.has(p))) return false;
    if (implied && p !== implied) return false;
    return true;
  };
  const sig = createHash('sha256')
    .update(JSON.stringify([spec.listeners?.toSorted() ?? null, spec.protocols?.toSorted() ?? null]))
    .digest('hex')
    .slice(0, 8);
  const name = `${spec.limit}:${spec.per}:${sig}`;
  const counter = spec.window === undefined ? undefined : state.counters.counter(name, spec.window);
  return { spec, name, counter, scope };
}

const MAX_BAN_MS = 10 * 365 * 86_400_000;

function makeBan(req: BanRequest, now: number): Ban {
  if (!Number.isFinite(req.durationMs) || req.durationMs < 1000 || req.durationMs > MAX_BAN_MS) {
    throw new MailgateError('BAN_INVALID', 'a ban lasts from 1 second to 10 years');
  }
  let address: string | null = null;
  let user: string | null = null;
  if (req.kind === 'range') {
    const cidr = req.address === undefined ? 'missing' : parseCidr(req.address);
    if (typeof cidr === 'string') throw new MailgateError('BAN_INVALID', `not an address range: ${cidr}`);
    address = cidr.text;
  } else if (req.kind === 'address' || req.kind === 'pair') {
    const a = normalizeIp(req.address);
    if (isIP(a) === 0) throw new MailgateError('BAN_INVALID', `"${req.address ?? ''}" is not an IP address`);
    address = a;
  }
  if (req.kind === 'user' || req.kind === 'pair') {
    if (!req.user || req.user.length > MAX_USER) throw new MailgateError('BAN_INVALID', 'a user ban needs a user name');
    user = canonicalUser(req.user);
  }
  return {
    id: banId(req.kind, address, user),
    kind: req.kind,
    address,
    user,
    until: now + req.durationMs,
    createdAt: now,
    reason: req.reason ?? 'banned by an administrator',
    source: 'manual',
  };
}

function toControlBan(b: Ban): ControlBan {
  return {
    ip: b.address ?? '',
    reason: b.kind === 'pair' ? `user ${b.user ?? ''}: ${b.reason}` : b.reason,
    createdAt: b.createdAt,
    expiresAt: b.until,
    source: b.source === 'manual' ? 'manual' : 'auto',
  };
}

