/**
 * The policy decision, pure: `decide(facts, snapshot) → verdict`. Facts say
 * who connects, logs in or asks where; the snapshot is what the policy state
 * holds at that moment (bans, limits reached, sessions open); the verdict
 * says allow, deny or tempfail, with a stable code and the text the client
 * sees. Nothing here counts, bans, reads a store or a clock: the engine
 * (engine.ts) takes the snapshot, asks, and records what follows.
 *
 * Metrics and logs name a refusal by its code; the text is for the client
 * (fixed, short, and the same for a wrong password and an unknown user).
 */
import { createHash } from 'node:crypto';
import type { Config, Listener } from '../config/load.ts';
import type { RateLimit } from '../config/schema-policy.ts';
import { AddressSet } from '../net/cidr.ts';
import type { Ban } from './bans.ts';
import type { Count } from './counters.ts';
import { UserKeys } from './names.ts';
import { RuleSet, type RuleFacts } from './rules.ts';
import type { AttemptLoad, AttemptLoads, BruteForce } from './state.ts';

/** Why a connection, login or request is refused, as metrics and logs name it. */
export type RefusalCode =
  | 'access-denied'
  | 'access-tempfail'
  | 'bad-login'
  | 'banned'
  | 'connection-rate'
  | 'concurrent-address'
  | 'concurrent-user'
  | 'message-rate'
  | 'recipient-rate'
  | 'request-rate'
  | 'auth-busy'
  | 'login-attempts'
  | 'auth-unavailable';

/** What the client is told for each code (an access rule may say its own `reason`). */
export const REFUSAL_TEXT: Record<RefusalCode, string> = {
  'access-denied': 'Access denied',
  'access-tempfail': 'Try again later',
  'bad-login': 'Authentication failed',
  banned: 'Too many failed logins, try again later',
  'connection-rate': 'Too many connections, try again later',
  'concurrent-address': 'Too many connections from your address',
  'concurrent-user': 'Too many sessions for this user',
  'message-rate': 'Message limit reached, try again later',
  'recipient-rate': 'Too many recipients, try again later',
  'request-rate': 'Too many requests',
  'auth-busy': 'Authentication temporarily unavailable',
  'login-attempts': 'Too many login attempts at once, try again later',
  'auth-unavailable': 'Authentication temporarily unavailable',
};

export type Refusal =
  | { action: 'deny'; code: RefusalCode; text: string }
  | { action: 'tempfail'; code: RefusalCode; text: string; retryAfterMs?: number };

export type Verdict = { action: 'allow' } | Refusal;

export const ALLOW: Verdict = Object.freeze({ action: 'allow' });

export function deny(code: RefusalCode, text = REFUSAL_TEXT[code]): Refusal {
  return { action: 'deny', code, text };
}

export function tempfail(code: RefusalCode, retryAfterMs?: number, text = REFUSAL_TEXT[code]): Refusal {
  return retryAfterMs === undefined ? { action: 'tempfail', code, text } : { action: 'tempfail', code, text, retryAfterMs: Math.max(0, Math.ceil(retryAfterMs)) };
}

/** The longest ban reason a client is shown; the rest is cut. */
export const MAX_CLIENT_REASON = 120;

/**
 * A ban's refusal: a ban set by hand tells the client the administrator's
 * reason, as one short line of printable ASCII (accents dropped, anything
 * else that could break a protocol line or a terminal replaced); a
 * brute-force ban, the fixed text.
 */
export function banned(ban: Ban, now: number): Refusal {
  const text = ban.source === 'manual' ? clientText(ban.reason) : undefined;
  return tempfail('banned', ban.until - now, text || REFUSAL_TEXT.banned);
}

/** Text from an administrator as a client may see it: one line of printable ASCII, at most MAX_CLIENT_REASON characters. */
export function clientText(text: string): string {
  const plain = text
    .normalize('NFKD')
    .replace(/[\u0300-\u036f]/g, '')
    .replace(/[^\x20-\x7e]+/g, ' ')
    .replace(/ {2,}/g, ' ')
    .trim();
  return plain.length <= MAX_CLIENT_REASON ? plain : `${plain.slice(0, MAX_CLIENT_REASON - 3).trimEnd()}...`;
}

/** Login names longer than this are refused without further work (they are not names). */
export const MAX_USER = 320;

export type Facts =
  /** A client connects (mail: before the greeting; HTTP: the connection). */
  | { stage: 'connect'; listener: Listener; clientIp: string }
  /** One HTTP request on a connection that was allowed. */
  | { stage: 'request'; listener: Listener; clientIp: string }
  /** Credentials arrived, before their password is looked at. */
  | { stage: 'credentials'; listener: Listener; clientIp: string; user: string | null; authzid: string | null }
  /** The login as it acts: the identity (verified, when mailgate checks passwords), its groups. */
  | { stage: 'login'; listener: Listener; clientIp: string; tls: boolean; identity: string | null; groups: ReadonlySet<string>; authenticated: boolean };

/** What the policy state holds now, as far as a decision needs it. */
export interface Snapshot {
  readonly now: number;
  /**
   * The ban that stops these facts, if any: the address or a range holding
   * it; for credentials also the user from this address, and the user's own
   * ban when this address failed for the user.
   */
  readonly ban: Ban | undefined;
  /** Until when a reached window limit blocks a key (blockKey). */
  blockedUntil(key: string): number | undefined;
  /** Sessions open from an address / logged in for a user, on the listeners `scope` admits. */
  openFrom(address: string, scope: (listener: string) => boolean): number;
  loggedIn(user: string, scope: (listener: string) => boolean): number;
  /** The current count of a window limit's key (message limits at login), when it was read. */
  count(key: string): Count | undefined;
  /**
   * For credentials: the failures counted and the attempts in flight (this
   * one included) per brute-force threshold, when other attempts were in
   * flight as this one started; undefined when none were.
   */
  readonly attempts?: AttemptLoads | undefined;
}

/** A rate limit of the config, compiled: what it counts and under which name its counts are kept. */
export interface CompiledLimit {
  readonly spec: RateLimit;
  /** Counter (and block) name: the same rule keeps its counts across reloads. */
  readonly name: string;
  /** Whether a session on this listener counts (listeners/protocols scope). */
  readonly scope: (listener: string) => boolean;
  /** Whether the limit leaves a client address alone (its `exempt` ranges): neither counted nor refused. */
  readonly exempts: (address: string) => boolean;
}

/** The config's rules and limits, compiled once per (re)load; `decide` is pure. */
export class PolicyRules {
  readonly limits: readonly CompiledLimit[];
  readonly bruteForce: BruteForce;
  /** How login names become the keys counts and bans are kept under (username_format). */
  readonly names: UserKeys;
  private readonly access: RuleSet;

  constructor(config: Config) {
    this.access = new RuleSet(config.access.rules, config.access.default);
    this.names = new UserKeys(config.username_format);
    this.bruteForce = { settings: config.brute_force, exempt: new AddressSet(config.brute_force.exempt) };
    const protocolOf = new Map(config.listeners.map((l) => [l.name, l.protocol as string]));
    this.limits = config.rate_limits.map((spec) => compileLimit(spec, protocolOf));
  }

  decide(facts: Facts, snapshot: Snapshot): Verdict {
    switch (facts.stage) {
      case 'connect':
        return this.connect(facts, snapshot);
      case 'request':
        return this.request(facts, snapshot);
      case 'credentials':
        return this.credentials(facts, snapshot);
      case 'login':
        return this.login(facts, snapshot);
      default: {
        const never: never = facts;
        throw new Error(`unknown policy stage ${JSON.stringify(never)}`);
      }
    }
  }

  /** Limits a connection from `address` (any address when not given) meets (connections per window, counted when allowed; concurrent ones are sessions, counted by the state). */
  connectLimits(listener: string, address?: string): CompiledLimit[] {
    return this.limits.filter((c) => c.scope(listener) && (c.spec.limit === 'connections' || (c.spec.limit === 'concurrent' && c.spec.per === 'address')) && (address === undefined || !c.exempts(address)));
  }

  requestLimits(listener: string, address?: string): CompiledLimit[] {
    return this.limits.filter((c) => c.spec.limit === 'http_requests' && c.scope(listener) && (address === undefined || !c.exempts(address)));
  }

  /** Window limits on SMTP messages and recipients for this listener and client address. */
  messageLimits(listener: string, address?: string): CompiledLimit[] {
    return this.limits.filter((c) => (c.spec.limit === 'messages' || c.spec.limit === 'recipients') && c.spec.window !== undefined && c.scope(listener) && (address === undefined || !c.exempts(address)));
  }

  private connect(f: Extract<Facts, { stage: 'connect' }>, s: Snapshot): Verdict {
    const outcome = this.access.evaluate(connectRuleFacts(f.listener, f.clientIp));
    if (outcome.decided && outcome.action !== 'allow') return ruleVerdict(outcome.action, outcome.reason, false);
    if (s.ban) return banned(s.ban, s.now);
    for (const c of this.connectLimits(f.listener.name, f.clientIp)) {
      if (c.spec.limit === 'connections') {
        const until = s.blockedUntil(blockKey(c, limitKey(c, f.clientIp, f.listener.name)));
        if (until !== undefined) return tempfail('connection-rate', until - s.now);
      } else if (s.openFrom(f.clientIp, c.scope) >= c.spec.max) {
        return tempfail('concurrent-address');
      }
    }
    return ALLOW;
  }

  private request(f: Extract<Facts, { stage: 'request' }>, s: Snapshot): Verdict {
    if (s.ban) return banned(s.ban, s.now);
    for (const c of this.requestLimits(f.listener.name, f.clientIp)) {
      const until = s.blockedUntil(blockKey(c, limitKey(c, f.clientIp, f.listener.name)));
      if (until !== undefined) return tempfail('request-rate', until - s.now);
    }
    return ALLOW;
  }

  /**
   * Credentials, before their password: names too long to be names, bans,
   * and attempts in flight. While other attempts are in flight, one whose
   * threshold's failures and attempts in flight (itself included) pass the
   * threshold is refused: parallel guesses cannot all be checked before the
   * first failure is counted. Alone, an attempt is left to the bans (a count
   * at the threshold has banned already).
   */
  private credentials(f: Extract<Facts, { stage: 'credentials' }>, s: Snapshot): Verdict {
    if ((f.user?.length ?? 0) > MAX_USER || (f.authzid?.length ?? 0) > MAX_USER) return deny('bad-login');
    if (s.ban) return banned(s.ban, s.now);
    const a = s.attempts;
    if (a) {
      const t = this.bruteForce.settings;
      const over = (load: AttemptLoad | undefined, failures: number) => load !== undefined && load.inFlight > 1 && load.failures + load.inFlight > failures;
      if (over(a.address, t.per_address.failures) || over(a.pair, t.per_address_user.failures) || over(a.user, t.per_user.failures)) return tempfail('login-attempts');
    }
    return ALLOW;
  }

  private login(f: Extract<Facts, { stage: 'login' }>, s: Snapshot): Verdict {
    const l = f.listener;
    const outcome = this.access.evaluate({
      listener: l.name,
      protocol: l.protocol,
      address: f.clientIp,
      tls: f.tls,
      user: f.identity,
      groups: f.groups,
      authenticated: f.authenticated,
    });
    if (!outcome.decided) throw new Error('rules left a login undecided');
    if (outcome.action !== 'allow') return ruleVerdict(outcome.action, outcome.reason, f.authenticated);
    const identityKey = f.identity === null ? null : this.names.account(f.identity);
    for (const c of this.limits) {
      if (!c.scope(l.name) || c.exempts(f.clientIp)) continue;
      if (c.spec.limit === 'concurrent' && c.spec.per === 'user' && identityKey !== null) {
        if (s.loggedIn(identityKey, c.scope) >= c.spec.max) return tempfail('concurrent-user');
      }
      if ((c.spec.limit === 'messages' || c.spec.limit === 'recipients') && c.spec.window !== undefined) {
        const key = c.spec.per === 'user' ? identityKey : f.clientIp;
        if (key === null) continue;
        const until = s.blockedUntil(blockKey(c, key));
        if (until !== undefined) return tempfail('message-rate', until - s.now);
        const n = s.count(blockKey(c, key));
        if (n && n.count >= c.spec.max) return tempfail('message-rate', n.resetMs);
      }
    }
    return ALLOW;
  }
}

/**
 * The refusal's text is an access rule's own `reason`, written by the admin
 * to be shown, rather than one of the fixed texts (a protocol that words its
 * other refusals alike, SMTP AUTH, shows only this one).
 */
export function isRuleReason(r: Refusal): boolean {
  return (r.code === 'access-denied' || r.code === 'access-tempfail') && !FIXED_TEXTS.has(r.text);
}

const FIXED_TEXTS: ReadonlySet<string> = new Set(Object.values(REFUSAL_TEXT));

/** A rule's refusal: its own reason, else the code's text (a login that named a user is told it failed). */
function ruleVerdict(action: 'deny' | 'tempfail', reason: string | undefined, authenticated: boolean): Refusal {
  if (action === 'tempfail') return tempfail('access-tempfail', undefined, reason ?? REFUSAL_TEXT['access-tempfail']);
  return deny('access-denied', reason ?? REFUSAL_TEXT[authenticated ? 'bad-login' : 'access-denied']);
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

/** The key a limit counts a session under: its listener, or the client's address. */
export function limitKey(c: CompiledLimit, address: string, listener: string): string {
  return c.spec.per === 'listener' ? listener : address;
}

/** The name of a limit's count for one key, in the store and among the state's blocks. */
export function blockKey(c: CompiledLimit, key: string): string {
  return `${c.name}|${key}`;
}

function compileLimit(spec: RateLimit, protocolOf: ReadonlyMap<string, string>): CompiledLimit {
  const listeners = spec.listeners && new Set(spec.listeners);
  const protocols = spec.protocols && new Set<string>(spec.protocols);
  // messages and recipients only mean something on SMTP listeners, requests on HTTP ones.
  const implied = spec.limit === 'messages' || spec.limit === 'recipients' ? 'smtp' : spec.limit === 'http_requests' ? 'http' : undefined;
  const scope = (listener: string) => {
    if (listeners && !listeners.has(listener)) return false;
    const p = protocolOf.get(listener);
    if (protocols && (p === undefined || !protocols.has(p))) return false;
    if (implied && p !== implied) return false;
    return true;
  };
  const exempt = spec.exempt.length > 0 ? new AddressSet(spec.exempt) : undefined;
  const exempts = (address: string) => exempt !== undefined && exempt.has(address);
  const sig = createHash('sha256')
    .update(JSON.stringify([spec.listeners?.toSorted() ?? null, spec.protocols?.toSorted() ?? null]))
    .digest('hex')
    .slice(0, 8);
  return { spec, name: `${spec.limit}:${spec.per}:${sig}`, scope, exempts };
}
