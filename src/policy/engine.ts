/**
 * The policy seam. The session driver asks when a client connects and when
 * credentials are ready, reports the backend's verdict on a login and the end
 * of a session; the HTTP listener asks per request and the SMTP splice per
 * message. Policy never touches a socket.
 *
 * PolicyEngine is the configured policy, in steps: it takes a snapshot of the
 * policy state, asks the pure decision (decide.ts), checks a local user's
 * password (users.ts) where the listener says so, routes the login
 * (routes.ts), and records what followed in the state (counts, failed
 * logins, bans, open sessions). The state outlives the engine, so a reload
 * builds a new engine on the same state. PassthroughPolicy is the do-nothing
 * policy for tests and tools.
 *
 * Connect-time and per-request answers are synchronous: they read this
 * gateway's view of bans and blocks, and count in the store afterwards (a
 * limit reached sets a local block, so the next connection is refused). With
 * Redis another gateway's counts arrive at the next block; the login-time
 * checks always ask the store.
 */
import type { Config, Listener } from '../config/load.ts';
import type { BackendLogin } from '../config/schema-policy.ts';
import type { Logger } from '../core/log.ts';
import type { HostPort } from '../net/address.ts';
import type { Credentials } from '../protocols/types.ts';
import type { Ban } from './bans.ts';
import type { Count } from './counters.ts';
import { ALLOW, blockKey, deny, limitKey, MAX_USER, PolicyRules, tempfail, type CompiledLimit, type Refusal, type Snapshot, type Verdict } from './decide.ts';
import { AuthHttpClient } from './auth-http.ts';
import type { PolicyFiles } from './files.ts';
import { BackendSecrets, Router } from './routes.ts';
import type { Attempt, AttemptLoads, PolicyState, WindowLimit } from './state.ts';
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
  /** Which login on this connection this is (1, 2, …), when the caller counts them (auth_http's Auth-Login-Attempt). */
  attempt?: number;
}

/** One HTTP request on a connection that passed onConnect. */
export interface HttpRequestFacts extends ConnectFacts {
  method?: string;
  path?: string;
}

export type { RefusalCode, Verdict } from './decide.ts';

/**
 * A login's verdict: allowed with the backend to use (and, for a pool, every
 * member: the driver picks one, src/backend/pools.ts) and the credentials to
 * replay there, or refused.
 */
export type AuthDecision = { action: 'allow'; backend: HostPort; pool?: readonly HostPort[] | undefined; credentials: Credentials | null } | Refusal;

export interface Policy {
  onConnect(facts: ConnectFacts): Verdict;
  onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision>;
  /** The backend's (or local) verdict on a login, for failure counting and bans. */
  onAuthResult(facts: AuthFacts, ok: boolean): void;
  /**
   * A login policy allowed got no verdict: the backend could not be reached or
   * broke off the replay. Nothing was learnt about the password, so nothing is
   * counted; the attempt stops counting as in flight.
   */
  onAuthUnanswered?(facts: AuthFacts): void;
  /** A session that passed onConnect has ended (concurrency accounting). */
  onDisconnect(facts: ConnectFacts): void;
  /** Per HTTP request (requests per window): `tempfail` is answered with 429 and Retry-After. */
  onHttpRequest?(facts: HttpRequestFacts): Verdict;
  /**
   * A recipient in a spliced SMTP session, before it goes to the backend
   * (recipients per window): `tempfail` refuses it (452), the session goes on.
   * Undefined when no limit counts recipients here (the relay need not wait).
   */
  onSmtpRecipient?(facts: AuthFacts): Promise<Verdict> | undefined;
  /**
   * A message the backend accepted in a spliced SMTP session (messages per
   * window): `tempfail` means the limit is reached, and the session ends at
   * the next command with the protocol's temporary failure (421). Undefined
   * when no limit counts messages here.
   */
  onSmtpMessage?(facts: AuthFacts): Promise<Verdict> | undefined;
}

export class PassthroughPolicy implements Policy {
  onConnect(): Verdict {
    return ALLOW;
  }

  async onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision> {
    const pool = facts.listener.pool;
    return { action: 'allow', backend: facts.listener.backend, ...(pool ? { pool } : {}), credentials };
  }

  onAuthResult(): void {}

  onDisconnect(): void {}
}

// ---- the configured engine ---------------------------------------------------------

export class PolicyEngine implements Policy {
  private readonly rules: PolicyRules;
  private readonly state: PolicyState;
  private readonly log: Logger;
  private readonly users: UserDirectory;
  private readonly router: Router;
  private readonly secrets: BackendSecrets;
  /** The auth_http service's client (authentication: http listeners), when configured. */
  private readonly authHttp: AuthHttpClient | undefined;

  /** `files`: what the config's users and password files hold (src/policy/files.ts). Throws for a bad user entry. */
  constructor(config: Config, files: PolicyFiles, state: PolicyState, log: Logger) {
    this.rules = new PolicyRules(config);
    this.state = state;
    this.log = log.child({ part: 'policy' });
    this.users = UserDirectory.fromConfig(config.users, files);
    this.router = new Router(config.routes);
    this.secrets = new BackendSecrets(files, config.baseDir);
    this.authHttp = config.auth_http && config.listeners.some(isHttpAuth) ? new AuthHttpClient(config.auth_http, log) : undefined;
    state.prepare(this.rules.limits.filter((c) => c.spec.window !== undefined).map(windowOf), this.rules.bruteForce);
    for (const l of config.listeners) {
      if (isLocal(l) && this.users.size === 0) {
        this.log.warn({ listener: l.name }, 'authentication is local but no users are configured: every login will fail');
      }
    }
  }

  /** Finishes the store work started by synchronous hooks (tests). */
  settled(): Promise<void> {
    return this.state.settled();
  }

  // ---- connect and requests ----------------------------------------------------------

  onConnect(facts: ConnectFacts): Verdict {
    const l = facts.listener;
    const address = facts.clientIp;
    const verdict = this.rules.decide({ stage: 'connect', listener: l, clientIp: address }, this.snapshot(this.state.addressBan(address, this.state.clock())));
    if (verdict.action !== 'allow') return verdict;
    this.state.connectionOpened(l.name, address);
    for (const c of this.rules.connectLimits(l.name, address)) if (c.spec.limit === 'connections') this.countLater(c, limitKey(c, address, l.name));
    return verdict;
  }

  onDisconnect(facts: ConnectFacts): void {
    this.state.connectionClosed(facts.listener.name, facts.clientIp);
    // A login still waiting for its verdict stays in flight until the verdict or its deadline, and takes no slot.
    if (facts.session !== undefined) this.state.sessionEnded(facts.session);
  }

  onHttpRequest(facts: HttpRequestFacts): Verdict {
    const l = facts.listener;
    const verdict = this.rules.decide({ stage: 'request', listener: l, clientIp: facts.clientIp }, this.snapshot(this.state.addressBan(facts.clientIp, this.state.clock())));
    if (verdict.action !== 'allow') return verdict;
    for (const c of this.rules.requestLimits(l.name, facts.clientIp)) this.countLater(c, limitKey(c, facts.clientIp, l.name));
    return verdict;
  }

  // ---- login --------------------------------------------------------------------------

  async onAuth(facts: AuthFacts, credentials: Credentials | null): Promise<AuthDecision> {
    const l = facts.listener;
    const address = facts.clientIp;
    const bf = this.rules.bruteForce;
    // The keys the login is counted and banned under (username_format): every spelling of the account.
    const keys = credentials && credentials.user.length <= MAX_USER ? this.rules.names.keys(credentials.user) : [];

    // 1. The credentials as sent: names that are not names, bans, attempts in flight (before the password is looked at).
    const ban = await this.state.loginBan(address, keys, this.state.clock(), bf);
    const credentialFacts = { stage: 'credentials' as const, listener: l, clientIp: address, user: credentials?.user ?? null, authzid: credentials?.authzid ?? null };
    const first = this.rules.decide(credentialFacts, this.snapshot(ban));
    if (first.action !== 'allow') return first;
    // From here the attempt counts as in flight until its verdict: parallel guesses see each other.
    const attempt = credentials ? await this.state.attemptStarted(address, keys, attemptDeadline(l), bf) : undefined;
    const decision = await this.authorize(facts, credentials, keys, attempt);
    if (attempt && !(decision.action === 'allow' && this.waitsForVerdict(facts, attempt, decision))) this.state.track('end an attempt', this.state.attemptEnded(attempt));
    return decision;
  }

  /** onAuth past the ban check: attempts in flight, the password where mailgate checks it, rules and limits, the route. */
  private async authorize(facts: AuthFacts, credentials: Credentials | null, keys: string[], attempt: Attempt | undefined): Promise<AuthDecision> {
    const l = facts.listener;
    const address = facts.clientIp;
    const bf = this.rules.bruteForce;
    if (attempt?.loads) {
      const credentialFacts = { stage: 'credentials' as const, listener: l, clientIp: address, user: credentials?.user ?? null, authzid: credentials?.authzid ?? null };
      const busy = this.rules.decide(credentialFacts, this.snapshot(undefined, NO_COUNTS, attempt.loads));
      if (busy.action !== 'allow') {
        this.log.info({ client: address, user: credentials?.user, load: attempt.loads }, 'login attempt refused: too many in flight');
        return busy;
      }
    }

    // 2. The password, where mailgate checks it.
    let verified: LocalUser | undefined;
    if (isLocal(l) && credentials) {
      const checked = await this.users.check(credentials);
      if (checked === 'busy') return tempfail('auth-busy', 5_000);
      if (checked === 'other-user') return deny('bad-login');
      if (checked === 'wrong-password') {
        await this.state.loginFailed(address, keys, bf);
        return deny('bad-login');
      }
      verified = checked;
      await this.state.loginSucceeded(address, keys, bf);
    }
    // …or where the auth_http service checks it (src/policy/auth-http.ts): it also names the backend.
    let fromService: { backend: HostPort; credentials: Credentials } | undefined;
    if (isHttpAuth(l) && credentials && l.protocol !== 'http') {
      const answer = this.authHttp
        ? await this.authHttp.check({ protocol: l.protocol, credentials, clientIp: address, attempt: facts.attempt ?? 1, tls: facts.tls })
        : ({ kind: 'unavailable', why: 'no auth_http section' } as const);
      if (answer.kind === 'unavailable') return tempfail('auth-unavailable', 5_000);
      if (answer.kind === 'refused') {
        if (answer.temporary) return tempfail('auth-unavailable', 5_000);
        await this.state.loginFailed(address, keys, bf);
        return deny('bad-login');
      }
      fromService = answer;
    }

    // 3. The login as it acts (a PLAIN authorization id, when the backend allows one): rules and limits.
    const identity = verified?.name ?? (credentials ? credentials.authzid || credentials.user : null);
    const groups = this.users.groupsOf(identity);
    const counts = await this.messageCounts(l, identity, address);
    const verdict = this.rules.decide({ stage: 'login', listener: l, clientIp: address, tls: facts.tls, identity, groups, authenticated: credentials !== null }, this.snapshot(undefined, counts));
    if (verdict.action !== 'allow') return verdict;

    // 4. Where it goes, and what the backend is told.
    let backend = l.backend;
    let pool = l.pool;
    let replay: Credentials | null = credentials;
    if (fromService) {
      backend = fromService.backend;
      pool = undefined;
      replay = fromService.credentials;
    } else if (identity !== null) {
      const target = this.router.route({ listener: l.name, protocol: l.protocol, defaultBackend: l.backend, defaultPool: l.pool, user: identity, groups });
      backend = target.backend;
      pool = target.pool;
      if (verified && credentials) replay = this.secrets.credentials(target.login ?? listenerLogin(l), credentials, verified.name);
    } else if (isLocal(l)) {
      // SMTP without AUTH on a local listener: nothing to replay.
      replay = null;
    }
    // The user's session slot is taken when the login succeeds (onAuthResult), not by an attempt.
    if (facts.session !== undefined && identity !== null && attempt) {
      this.state.loginPending(facts.session, { attempt, account: this.rules.names.account(identity), listener: l.name });
    }
    return { action: 'allow', backend, ...(pool ? { pool } : {}), credentials: replay };
  }

  /** Whether an allowed login's attempt stays in flight until the backend's verdict (passthrough, with a session to match it). */
  private waitsForVerdict(facts: AuthFacts, attempt: Attempt, decision: AuthDecision): boolean {
    return decision.action === 'allow' && !isLocal(facts.listener) && facts.session !== undefined && !attempt.ended;
  }

  onAuthResult(facts: AuthFacts, ok: boolean): void {
    const pending = facts.session === undefined ? undefined : this.state.takePending(facts.session);
    if (!ok && facts.session !== undefined) this.state.loginEnded(facts.session);
    if (ok && pending?.live && pending.account !== null && facts.session !== undefined) this.state.loginStarted(facts.session, pending.listener, pending.account);
    if (facts.user === null) {
      if (pending) this.state.track('end an attempt', this.state.attemptEnded(pending.attempt));
      return;
    }
    if (isLocal(facts.listener)) {
      if (pending) this.state.track('end an attempt', this.state.attemptEnded(pending.attempt));
      // mailgate verified the password; a refusal now is the backend's configuration (backend_login), not the client.
      if (!ok) this.log.warn({ listener: facts.listener.name, user: facts.user }, 'the backend refused a login mailgate had verified (check backend_login)');
      return;
    }
    const keys = this.rules.names.keys(facts.user);
    const bf = this.rules.bruteForce;
    // The verdict is counted first, then the attempt leaves the in-flight count: a reader in between counts it twice, never not at all.
    const counted = ok ? this.state.loginSucceeded(facts.clientIp, keys, bf) : this.state.loginFailed(facts.clientIp, keys, bf);
    this.state.track(ok ? 'reset failures' : 'count failure', pending ? counted.finally(() => this.state.attemptEnded(pending.attempt)) : counted);
  }

  onAuthUnanswered(facts: AuthFacts): void {
    if (facts.session === undefined) return;
    const pending = this.state.takePending(facts.session);
    if (pending) this.state.track('end an attempt', this.state.attemptEnded(pending.attempt));
  }

  // ---- SMTP recipients and messages ----------------------------------------------------

  onSmtpRecipient(facts: AuthFacts): Promise<Verdict> | undefined {
    return this.countSmtp(facts, 'recipients');
  }

  onSmtpMessage(facts: AuthFacts): Promise<Verdict> | undefined {
    return this.countSmtp(facts, 'messages');
  }

  /** One recipient or message against the limits that count them here; undefined when none does. */
  private countSmtp(facts: AuthFacts, limit: 'messages' | 'recipients'): Promise<Verdict> | undefined {
    const userKey = facts.user === null ? null : this.rules.names.account(facts.user);
    const counts: { c: CompiledLimit; key: string }[] = [];
    for (const c of this.rules.messageLimits(facts.listener.name, facts.clientIp)) {
      if (c.spec.limit !== limit) continue;
      const key = c.spec.per === 'user' ? userKey : facts.clientIp;
      if (key !== null) counts.push({ c, key });
    }
    return counts.length === 0 ? undefined : this.hitSmtp(facts, limit, counts);
  }

  private async hitSmtp(facts: AuthFacts, limit: 'messages' | 'recipients', counts: { c: CompiledLimit; key: string }[]): Promise<Verdict> {
    let reached: Verdict | undefined;
    for (const { c, key } of counts) {
      // The state blocks the key (logins are refused) once the count reaches the maximum.
      const count = await this.state.hit(windowOf(c), key);
      // A message is counted once accepted, so the one that reaches the maximum went through; a recipient is asked about first.
      const over = limit === 'messages' ? c.spec.max : c.spec.max + 1;
      if (count.count < over) continue;
      reached ??= tempfail(limit === 'messages' ? 'message-rate' : 'recipient-rate', count.resetMs);
      if (count.count === over) {
        const what = limit === 'messages' ? 'message limit reached' : 'recipient limit reached';
        this.log.info({ listener: facts.listener.name, user: facts.user, client: facts.clientIp, limit, count: count.count, max: c.spec.max }, what);
      }
    }
    return reached ?? ALLOW;
  }

  // ---- the snapshot and counting ----------------------------------------------------------

  /** What the state holds now, for decide(); `ban`, `counts` and `attempts` as read for this decision. */
  private snapshot(ban: Ban | undefined, counts: ReadonlyMap<string, Count> = NO_COUNTS, attempts?: AttemptLoads): Snapshot {
    const state = this.state;
    const now = state.clock();
    return {
      now,
      ban,
      attempts,
      blockedUntil: (key) => state.blockedUntil(key, now),
      openFrom: (address, scope) => state.openFrom(address, scope),
      loggedIn: (user, scope) => state.loggedIn(user, scope),
      count: (key) => counts.get(key),
    };
  }

  /** The message and recipient counts a login is checked against, read from the store. */
  private async messageCounts(l: Listener, identity: string | null, address: string): Promise<ReadonlyMap<string, Count>> {
    const limits = this.rules.messageLimits(l.name, address);
    if (limits.length === 0) return NO_COUNTS;
    const identityKey = identity === null ? null : this.rules.names.account(identity);
    const counts = new Map<string, Count>();
    for (const c of limits) {
      const key = c.spec.per === 'user' ? identityKey : address;
      if (key !== null) counts.set(blockKey(c, key), await this.state.peek(windowOf(c), key));
    }
    return counts;
  }

  /** Counts one hit in the background; a limit reached blocks its key locally (the next decision sees it). */
  private countLater(c: CompiledLimit, key: string): void {
    if (c.spec.window === undefined) return;
    this.state.track(`count ${c.name}`, this.state.hit(windowOf(c), key));
  }
}

/** Throws what building an engine for this config would (a user defined twice, a hash that is not one), without building one. */
export function checkPolicy(config: Config, files: PolicyFiles): void {
  UserDirectory.fromConfig(config.users, files);
  new PolicyRules(config);
}

// ---- helpers ------------------------------------------------------------------------------

const NO_COUNTS: ReadonlyMap<string, Count> = new Map();

function isLocal(l: Listener): boolean {
  return 'authentication' in l && l.authentication === 'local';
}

function isHttpAuth(l: Listener): boolean {
  return 'authentication' in l && l.authentication === 'http';
}

function listenerLogin(l: Listener): BackendLogin {
  return ('backend_login' in l ? l.backend_login : undefined) ?? 'replay';
}

/**
 * How long a login attempt may count as in flight: the longest the session
 * waits for the backend (connect, then the login replay), and a second more.
 */
function attemptDeadline(l: Listener): number {
  return l.timeouts.backend_connect + l.timeouts.login_replay + 1000;
}

function windowOf(c: CompiledLimit): WindowLimit {
  return { name: c.name, windowMs: c.spec.window ?? 0, max: c.spec.max };
}
