/**
 * One mail session, start to end, over its sockets: TLS, the greeting, the
 * dialogue before login (preauth-loop.ts, which knows no socket), the policy
 * decision, the backend login, then the splice. Where the session is, is one
 * Phase; the record's `state` (registry, dashboard) is derived from it.
 * `close(reason)` is the only way out and records why; every event handler
 * first checks that the session is still open. Nothing here knows a
 * protocol: the adapter, its Dialogue rules and its relay speak for it.
 */
import type { Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import type { Listener } from '../config/load.ts';
import { errorCode, errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { connectBackend } from '../backend/connector.ts';
import type { CapabilityCache } from '../backend/capabilities.ts';
import type { BackendPools } from '../backend/pools.ts';
import { SocketLink } from '../backend/link.ts';
import { socketPeer, type Peer } from '../net/proxy-inbound.ts';
import { formatHostPort } from '../net/address.ts';
import { isRuleReason } from '../policy/decide.ts';
import type { AuthDecision, AuthFacts, ConnectFacts, Policy } from '../policy/engine.ts';
import {
  assertNever,
  type BackendCapabilities,
  type CloseReason,
  type Credentials,
  type Goodbye,
  type LoginResult,
  type ProtocolModule,
  type Refusal,
  type RelayFilter,
  type RelayHost,
  type RelayUnit,
  type SessionFacts,
} from '../protocols/types.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { alpnSelector } from '../tls/options.ts';
import { PreauthLoop, type PreauthHost } from './preauth-loop.ts';
import { newSessionRecord, type SessionRecord, type SessionState } from './record.ts';
import type { SessionControl, SessionRegistry } from './registry.ts';

export interface MailSessionDeps {
  hostname: string;
  certs: CertStore;
  registry: SessionRegistry;
  policy: Policy;
  log: Logger;
  capabilities: CapabilityCache;
  module: ProtocolModule;
  /** Pool choice and session counts (src/backend/pools.ts); without it a pool's first member is used. */
  pools?: BackendPools;
}

/** After close() ends both sockets politely, how long they get to flush before being destroyed. */
const CLOSE_GRACE_MS = 2_000;
/** How long a goodbye in a spliced stream waits for the response in flight to end (then the session ends without it). */
const GOODBYE_WAIT_MS = 1_000;

type Relaying = {
  kind: 'relaying';
  backend: Socket;
  /** The protocol's filter for the spliced stream, if it has one. */
  relay: RelayFilter | undefined;
  /** The login's facts, for the limits counted in the spliced stream. */
  facts: AuthFacts;
  /** The relay waits for the backend's last replies, or a goodbye for the end of a response; past this the driver ends it. */
  wait: NodeJS.Timeout | undefined;
};

type Phase =
  /** The TLS handshake of an implicit-TLS listener (on a plain one, the moment before the connect verdict). */
  | { kind: 'handshake'; timer: NodeJS.Timeout | undefined }
  /** Allowed in; the greeting waits for the backend's capabilities or the greet delay. */
  | { kind: 'greeting' }
  /** The dialogue before login: the loop reads the client. */
  | { kind: 'dialogue' }
  /** The TLS handshake after STARTTLS. */
  | { kind: 'starttls'; timer: NodeJS.Timeout }
  /** Credentials are with policy and the backend; the client is paused. `draining`: shutdown began meanwhile. */
  | { kind: 'login'; draining: boolean }
  /** Logged in: bytes spliced between client and backend. */
  | Relaying
  /** close() ran: both sides are ending, and are destroyed after a grace. `counts`: the relay counted units (the end log says how many). */
  | { kind: 'closing'; grace: NodeJS.Timeout; backend: Socket | undefined; counts: boolean }
  | { kind: 'closed' };

/** What the registry and the dashboard call each phase. */
const RECORD_STATE: Record<Phase['kind'], SessionState> = {
  handshake: 'handshake',
  greeting: 'preauth',
  dialogue: 'preauth',
  starttls: 'starttls',
  login: 'authenticating',
  relaying: 'relaying',
  closing: 'closing',
  closed: 'closed',
};

/** How a login replay ended: the backend's answer (its link still open), or no answer at all. */
type Replayed =
  | { kind: 'answered'; result: LoginResult; link: SocketLink; backend: string }
  | { kind: 'unavailable'; reason: 'backend-timeout' | 'backend-unavailable' | 'backend-error' | 'backend-no-auth' };

export class MailSession implements SessionControl {
  readonly record: SessionRecord;
  private readonly raw: Socket;
  private client: Socket;
  private readonly listener: Listener;
  private readonly deps: MailSessionDeps;
  private readonly log: Logger;
  private readonly loop: PreauthLoop;
  private readonly facts: SessionFacts;
  private readonly connectFacts: ConnectFacts;
  private phase: Phase = { kind: 'handshake', timer: undefined };
  private caps: BackendCapabilities | undefined;
  /** Gives back what policy counted at connect (set when it let the session in; run once, after any login in flight). */
  private release: (() => void) | undefined;
  /** A login in flight: it runs to the backend's verdict even when the client leaves, so that the guess is counted. */
  private loginRun: Promise<void> | undefined;
  private totalTimer: NodeJS.Timeout | undefined;
  private readonly onClientData = (chunk: Buffer) => this.clientData(chunk);
  private readonly onTimeout = () => this.idle();
  private idleMs = 0;
  /** Logins tried on this connection (auth_http's Auth-Login-Attempt). */
  private attempts = 0;
  /** Gives back the pool's count of this session's backend (set once spliced to a pool member). */
  private releaseBackend: (() => void) | undefined;

  /**
   * `peer`: who the connection speaks for, the socket's own addresses or the
   * client a trusted balancer's PROXY header named (src/listeners/proxied.ts).
   */
  constructor(raw: Socket, listener: Listener, deps: MailSessionDeps, peer: Peer = socketPeer(raw)) {
    this.raw = raw;
    this.client = raw;
    this.listener = listener;
    this.deps = deps;
    const now = Date.now();
    const clientIp = peer.clientIp;
    this.record = newSessionRecord(
      { id: deps.registry.nextId(), listener: listener.name, protocol: deps.module.protocol, clientIp, clientPort: peer.clientPort, state: 'handshake' },
      now,
    );
    this.log = deps.log.child({ conn: this.record.id, listener: listener.name, client: clientIp, ...(peer.via === undefined ? {} : { via: peer.via }) });
    const record = this.record;
    this.facts = {
      id: record.id,
      listener,
      hostname: deps.hostname,
      clientIp,
      clientPort: record.clientPort,
      localIp: peer.localIp,
      localPort: peer.localPort,
      tls: () => record.tlsVersion !== null,
    };
    this.connectFacts = { listener, clientIp, tls: false, now, session: this.record.id };
    this.loop = new PreauthLoop(deps.module, this.facts, this.loopHost());
  }

  get state(): SessionState {
    return this.record.state;
  }

  private get open(): boolean {
    return this.phase.kind !== 'closing' && this.phase.kind !== 'closed';
  }

  /** Moves to `next`, stopping the timers of the phase left. */
  private enter(next: Phase): void {
    const prev = this.phase;
    this.phase = next;
    this.record.state = RECORD_STATE[next.kind];
    switch (prev.kind) {
      case 'handshake':
      case 'starttls':
        clearTimeout(prev.timer);
        return;
      case 'relaying':
        clearTimeout(prev.wait);
        return;
      case 'closing':
        clearTimeout(prev.grace);
        return;
      case 'greeting':
      case 'dialogue':
      case 'login':
      case 'closed':
        return;
      default:
        assertNever(prev);
    }
  }

  start(): void {
    const raw = this.raw;
    raw.setNoDelay(true);
    raw.on('error', (err) => this.socketError('client', err));
    raw.on('close', () => this.finalize());
    raw.on('timeout', this.onTimeout);
    this.deps.registry.add(this);
    this.totalTimer = setTimeout(() => this.preauthExpired(), this.listener.timeouts.preauth_total);

    const verdict = this.deps.policy.onConnect(this.connectFacts);
    if (verdict.action !== 'allow') {
      const why: Refusal = verdict.action === 'deny' ? 'denied' : 'tempfail';
      this.deps.registry.refused(this.listener.name, this.record.clientIp, verdict.code, verdict.text);
      this.log.info({ reason: verdict.text, code: verdict.code }, 'connection refused by policy');
      // Deny before greeting: the client hears the refusal and nothing else (after TLS on implicit ports).
      const refuse = () => this.close(verdict.action === 'deny' ? 'policy-denied' : 'policy-tempfail', this.loop.adapter.refusal(why, verdict.text));
      if (this.listener.tls === 'implicit') this.startTls(refuse);
      else refuse();
      return;
    }
    const facts = this.connectFacts;
    this.release = () => this.deps.policy.onDisconnect(facts);
    if (this.listener.tls === 'implicit') this.startTls(() => this.greet());
    else this.greet();
  }

  kill(reason: CloseReason): void {
    if (!this.open) return;
    this.end(reason, goodbyeFor(reason));
  }

  drain(): void {
    if (!this.open) return;
    const phase = this.phase;
    // A login is answered first (a failed one is followed by the goodbye); a splice runs until it
    // ends or the drain deadline kills it; before login nothing is lost by ending now.
    if (phase.kind === 'login') phase.draining = true;
    else if (phase.kind !== 'relaying') this.end('shutdown', 'shutdown');
  }

  /**
   * Ends the session where it is, in the protocol's words for `why`: before
   * login at once (once the client was greeted), a spliced one between two
   * responses (goodbye()).
   */
  private end(reason: CloseReason, why: Goodbye): void {
    const phase = this.phase;
    switch (phase.kind) {
      case 'handshake':
      case 'greeting':
        this.close(reason);
        return;
      case 'dialogue':
      case 'starttls':
      case 'login':
        this.close(reason, this.loop.adapter.refusal(why));
        return;
      case 'relaying':
        this.goodbye(phase, reason, why);
        return;
      case 'closing':
      case 'closed':
        return;
      default:
        assertNever(phase);
    }
  }

  // ---- TLS -------------------------------------------------------------

  private startTls(then: () => void): void {
    const tls = this.deps.certs.accept(this.raw, alpnSelector(this.deps.module.protocol));
    this.client = tls;
    // The TLS socket reads the connection from now on, so activity (and the idle timer) is tracked there.
    tls.on('close', () => this.finalize());
    tls.on('timeout', this.onTimeout);
    if (this.idleMs > 0) this.setIdle(this.idleMs);
    const timer = setTimeout(() => {
      if (!this.open) return;
      this.log.debug('TLS handshake timed out');
      this.close('tls-handshake-timeout');
    }, this.listener.timeouts.tls_handshake);
    this.enter(this.phase.kind === 'handshake' ? { kind: 'handshake', timer } : { kind: 'starttls', timer });
    tls.on('error', (err) => {
      if (this.record.tlsVersion === null) {
        if (!this.open) return;
        this.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'TLS handshake failed');
        this.close('tls-handshake-failed');
      } else {
        this.socketError('client', err);
      }
    });
    tls.once('secure', () => {
      clearTimeout(timer);
      if (!this.open) return;
      this.record.tlsVersion = tls.getProtocol() ?? 'unknown';
      this.record.tlsCipher = tls.getCipher()?.name ?? 'unknown';
      this.connectFacts.tls = true;
      then();
    });
  }

  // ---- the dialogue before login --------------------------------------------

  private loopHost(): PreauthHost {
    return {
      write: (data) => this.write(data),
      startTls: () => {
        this.client.off('data', this.onClientData);
        this.startTls(() => {
          this.enter({ kind: 'dialogue' });
          this.client.on('data', this.onClientData);
          this.loop.tlsStarted();
        });
      },
      login: (credentials) => {
        this.enter({ kind: 'login', draining: false });
        this.client.pause();
        const run: Promise<void> = this.login(credentials)
          .then(
            () => undefined,
            (err: unknown) => this.internalError('login', err),
          )
          .finally(() => {
            if (this.loginRun === run) this.loginRun = undefined;
          });
        this.loginRun = run;
      },
      close: (reason, words) => this.close(reason, words),
    };
  }

  private greet(): void {
    if (!this.open) return;
    this.enter({ kind: 'greeting' });
    this.client.on('data', this.onClientData);
    this.setIdle(this.listener.timeouts.preauth_idle);
    const l = this.listener;
    // A pool's capabilities are those of the member new sessions would go to now.
    const probed = l.pool && this.deps.pools ? (this.deps.pools.peek(this.poolMember(), l.pool) ?? l.backend) : l.backend;
    const target = {
      module: this.deps.module,
      backend: probed,
      proxyProtocol: l.proxy_protocol,
      connectTimeoutMs: l.timeouts.backend_connect,
      replayTimeoutMs: l.timeouts.login_replay,
      maxLine: l.limits.max_line,
    };
    const rules = this.loop.rules;
    // The common case: capabilities already known and no greet delay, so no promise or timer per connection.
    const known = rules.greetDelayMs > 0 ? undefined : this.deps.capabilities.peek(target);
    if (known) {
      this.caps = known;
      // After a TLS handshake, one event loop turn later: OpenSSL writes the TLS 1.3 session tickets
      // once this handler returns, and they should precede the greeting, so that a client reading
      // the greeting has them (resumption) and has nothing unread when it hangs up. Not where early
      // talkers are refused: bytes that came with the client's Finished would meet an ungreeted session.
      if (this.record.tlsVersion !== null && !rules.refuseEarlyTalkers) setImmediate(MailSession.greetNow, this);
      else this.sendGreeting();
      return;
    }
    // A hung backend must not hold the greeting: past backend_connect, greet with defaults.
    const capsOrDefaults = withDeadline(this.deps.capabilities.get(target), l.timeouts.backend_connect);
    Promise.all([capsOrDefaults, delay(rules.greetDelayMs)]).then(
      ([caps]) => {
        this.caps = caps;
        this.sendGreeting();
      },
      (err: unknown) => this.internalError('capability lookup', err),
    );
  }

  private static greetNow(session: MailSession): void {
    session.sendGreeting();
  }

  private sendGreeting(): void {
    if (this.phase.kind !== 'greeting') return;
    this.enter({ kind: 'dialogue' });
    this.loop.greet(this.caps);
  }

  private clientData(chunk: Buffer): void {
    if (this.phase.kind !== 'greeting' && this.phase.kind !== 'dialogue' && this.phase.kind !== 'login') return;
    this.record.bytesIn += chunk.length;
    this.record.lastActivity = Date.now();
    this.loop.push(chunk);
  }

  // ---- authentication and backend ----------------------------------------

  private async login(credentials: Credentials | null): Promise<void> {
    const adapter = this.loop.adapter;
    const facts: AuthFacts = {
      ...this.connectFacts,
      now: Date.now(),
      user: credentials?.user ?? null,
      mechanism: credentials?.mechanism ?? null,
      attempt: ++this.attempts,
    };
    const decision = await this.deps.policy.onAuth(facts, credentials);
    if (decision.action !== 'allow') {
      if (this.phase.kind !== 'login') return;
      this.log.info({ user: facts.user, reason: decision.text, code: decision.code }, 'login refused by policy');
      this.deps.registry.refused(this.listener.name, this.record.clientIp, decision.code, decision.text);
      this.loginFailed(adapter.loginRefusal(decision.action === 'deny' ? 'denied' : 'tempfail', decision.text, isRuleReason(decision)));
      return;
    }
    // From here the login runs to the backend's verdict even if the client leaves meanwhile: a guess
    // whose client hangs up before the answer (which the backend may delay) is counted all the same.
    const replayed = await this.replay(decision, facts);
    if (replayed.kind === 'unavailable') {
      this.deps.policy.onAuthUnanswered?.(facts);
      if (this.phase.kind === 'login') this.close(replayed.reason, adapter.loginRefusal('backend-unavailable'));
      return;
    }
    const { result, link, backend } = replayed;
    const here = this.phase.kind === 'login';
    this.deps.policy.onAuthResult(facts, result.ok);
    if (!result.ok) {
      this.deps.registry.authFailed(this.record, facts.user); // control socket + metrics: failed login
      this.releasePool();
      link.destroy();
      this.record.backend = null;
      this.log.info({ user: facts.user, backend, clientGone: here ? undefined : true }, 'login failed');
      if (this.phase.kind === 'login') this.loginFailed(result.reply);
      return;
    }
    if (this.phase.kind !== 'login') {
      this.releasePool();
      link.destroy();
      this.log.info({ user: facts.user, backend }, 'login ok, but the client had gone');
      return;
    }
    this.record.user = facts.user;
    const { socket, leftover } = link.release();
    this.write(result.reply);
    this.log.info({ user: facts.user, backend }, 'login ok');
    this.deps.registry.authenticated(this.record);
    this.splice(socket, leftover, facts);
  }

  /** Connects to the backend policy named and replays the login there, within backend_connect and login_replay. */
  private async replay(decision: Extract<AuthDecision, { action: 'allow' }>, facts: AuthFacts): Promise<Replayed> {
    const l = this.listener;
    // A pool: its members in the order to try (healthy, fewest sessions first); a failed connect fails over to the next.
    const pools = decision.pool && decision.pool.length > 1 ? this.deps.pools : undefined;
    const candidates = pools && decision.pool ? pools.order(this.poolMember(), decision.pool) : [decision.backend];
    let socket: Socket | undefined;
    let chosen = decision.backend;
    let failure: 'backend-timeout' | 'backend-unavailable' = 'backend-unavailable';
    const connectStartedAt = performance.now(); // metrics: backend connect latency (control/stats.ts)
    for (const candidate of candidates) {
      try {
        socket = await connectBackend(candidate, {
          timeoutMs: l.timeouts.backend_connect,
          proxyProtocol: l.proxy_protocol,
          endpoints: { clientIp: this.record.clientIp, clientPort: this.record.clientPort, localIp: this.facts.localIp, localPort: this.facts.localPort },
        });
        chosen = candidate;
        break;
      } catch (err) {
        this.log.warn({ backend: formatHostPort(candidate), err: errorMessage(err), ...(pools ? { pool: true } : {}) }, 'backend unavailable');
        failure = errorCode(err) === 'BACKEND_TIMEOUT' ? 'backend-timeout' : 'backend-unavailable';
        pools?.failed(this.poolMember(), candidate);
      }
    }
    if (!socket) return { kind: 'unavailable', reason: failure };
    const backend = formatHostPort(chosen);
    if (pools) {
      this.releaseBackend?.();
      this.releaseBackend = pools.acquire(this.poolMember(), chosen);
    }
    this.deps.registry.backendConnected(this.record, backend, performance.now() - connectStartedAt);
    this.record.backend = backend;
    const link = new SocketLink(socket, { maxLine: l.limits.max_line, timeoutMs: l.timeouts.login_replay });
    try {
      return { kind: 'answered', result: await this.loop.adapter.login(link, decision.credentials, this.caps), link, backend };
    } catch (err) {
      this.releasePool();
      link.destroy();
      this.record.backend = null;
      const code = errorCode(err);
      this.log.warn({ backend, user: facts.user, err: errorMessage(err), code }, 'backend login replay failed');
      // A backend without AUTH behind a passthrough listener is a configuration error, told apart from an outage (issue 17).
      return { kind: 'unavailable', reason: code === 'BACKEND_TIMEOUT' ? 'backend-timeout' : code === 'BACKEND_NO_AUTH' ? 'backend-no-auth' : 'backend-error' };
    }
  }

  /** Which pool key space this session's backends are in: its protocol and PROXY version. */
  private poolMember(): { protocol: string; proxyProtocol: false | 'v1' | 'v2' } {
    return { protocol: this.deps.module.protocol, proxyProtocol: this.listener.proxy_protocol };
  }

  private releasePool(): void {
    const release = this.releaseBackend;
    this.releaseBackend = undefined;
    release?.();
  }

  private loginFailed(reply: string): void {
    if (this.phase.kind !== 'login') return;
    const draining = this.phase.draining;
    if (this.loop.loginFailed(reply) === 'closed') return;
    if (draining) {
      this.close('shutdown', this.loop.adapter.refusal('shutdown'));
      return;
    }
    this.enter({ kind: 'dialogue' });
    this.client.resume();
    this.loop.resume();
  }

  // ---- splice ---------------------------------------------------------------

  private splice(backend: Socket, leftover: Buffer, facts: AuthFacts): void {
    const client = this.client;
    const record = this.record;
    clearTimeout(this.totalTimer);
    client.off('data', this.onClientData);
    this.setIdle(this.listener.timeouts.postauth_idle);
    // Bytes the client sent past its login belong to the backend, in order.
    const pending = this.loop.handOver();
    const relay = this.loop.adapter.relay?.(this.relayHost(client, backend, facts));
    const phase: Relaying = { kind: 'relaying', backend, relay, facts, wait: undefined };
    this.enter(phase);

    backend.on('error', (err) => this.socketError('backend', err));
    backend.on('close', () => this.close('backend-closed'));
    client.on('end', () => this.close('client-closed'));

    if (leftover.length > 0) this.fromBackend(phase, leftover);
    if (pending.length > 0) this.fromClient(phase, pending);

    client.on('data', (chunk: Buffer) => {
      if (this.phase !== phase) return;
      record.bytesIn += chunk.length;
      record.lastActivity = Date.now();
      this.fromClient(phase, chunk);
    });
    backend.on('data', (chunk: Buffer) => {
      if (this.phase !== phase) return;
      record.lastActivity = Date.now();
      this.fromBackend(phase, chunk);
    });
    backend.on('drain', () => this.flow(phase));
    client.on('drain', () => backend.resume());
    this.flow(phase);
  }

  private fromClient(phase: Relaying, chunk: Buffer): void {
    if (phase.relay) phase.relay.fromClient(chunk);
    else phase.backend.write(chunk);
    this.flow(phase);
  }

  private fromBackend(phase: Relaying, chunk: Buffer): void {
    if (phase.relay) phase.relay.fromBackend(chunk);
    else this.forward(chunk);
    if (this.client.writableNeedDrain) phase.backend.pause();
    // A reply can end a wait of the relay's (the answer to DATA).
    this.flow(phase);
  }

  /** Backend bytes to the client, counted. */
  private forward(data: Buffer | string): void {
    if (!this.open || this.client.destroyed) return;
    this.record.bytesOut += data.length;
    if (typeof data === 'string') this.client.write(data, 'latin1');
    else this.client.write(data);
  }

  /** Reads the client while the relay takes its bytes and the backend keeps up; pauses it otherwise. */
  private flow(phase: Relaying): void {
    if (this.phase !== phase) return;
    if (phase.relay?.holding() || phase.backend.writableNeedDrain) this.client.pause();
    else this.client.resume();
  }

  /**
   * Ends a spliced session with the protocol's words where they cut nothing
   * in half: the relay says where a response ends (and waits for it, if it
   * can); past GOODBYE_WAIT_MS the session ends without them.
   */
  private goodbye(phase: Relaying, reason: CloseReason, why: Goodbye): void {
    const words = this.loop.adapter.goodbye(why);
    if (!phase.relay) {
      this.close(reason, words);
      return;
    }
    this.client.pause();
    phase.relay.goodbye(reason, words);
    if (this.phase !== phase) return;
    clearTimeout(phase.wait);
    phase.wait = setTimeout(() => this.close(reason), GOODBYE_WAIT_MS);
    phase.wait.unref();
  }

  // ---- the relay's host: counts, limits, the end --------------------------------------
  //
  // Policy counts recipients before they are forwarded and messages once the
  // backend accepted them; the relay waits for a verdict when a limit counts
  // them (the client is paused meanwhile). How a refusal or a limit is said,
  // and when the session may end, is the protocol's (smtp-relay.ts).

  private relayHost(client: Socket, backend: Socket, facts: AuthFacts): RelayHost {
    return {
      toBackend: (data) => {
        if (this.open) backend.write(data);
      },
      toClient: (data) => this.forward(data),
      count: (unit) => this.count(unit, facts),
      refused: (what) => this.log.info({ user: this.record.user, what }, 'refused after login'),
      closing: (reason, words) => {
        const phase = this.phase;
        if (phase.kind !== 'relaying') return;
        clearTimeout(phase.wait);
        // A backend that does not answer the replies it owes gets as long as a login replay.
        phase.wait = setTimeout(() => this.close(reason, words), this.listener.timeouts.login_replay);
        phase.wait.unref();
        client.pause();
      },
      close: (reason, words) => this.close(reason, words),
    };
  }

  private count(unit: RelayUnit, facts: AuthFacts): 'go' | 'wait' {
    const policy = this.deps.policy;
    const asked = unit === 'recipient' ? policy.onSmtpRecipient?.({ ...facts, now: Date.now() }) : policy.onSmtpMessage?.({ ...facts, now: Date.now() });
    if (!asked) {
      this.counted(unit);
      return 'go';
    }
    asked.then(
      (verdict) => {
        const phase = this.phase;
        if (phase.kind !== 'relaying') return;
        if (verdict.action === 'allow' || unit === 'message') this.counted(unit);
        if (verdict.action !== 'allow') {
          this.log.info({ user: facts.user, reason: verdict.text, code: verdict.code, unit }, unit === 'message' ? 'message limit reached, ending the session' : 'recipient refused by a limit');
        }
        phase.relay?.verdict(unit, verdict.action === 'allow' ? { ok: true } : { ok: false, reason: verdict.text });
        this.flow(phase);
      },
      (err: unknown) => this.internalError(`${unit} limit`, err),
    );
    return 'wait';
  }

  private counted(unit: RelayUnit): void {
    if (unit === 'recipient') this.record.recipients++;
    else this.record.messages++;
  }

  // ---- timers, errors, close --------------------------------------------------

  private idle(): void {
    if (!this.open) return;
    // A login is bounded by backend_connect and login_replay; the client is paused meanwhile.
    if (this.phase.kind !== 'login') this.end('idle-timeout', 'idle-timeout');
  }

  private setIdle(ms: number): void {
    this.idleMs = ms;
    this.client.setTimeout(ms);
  }

  private preauthExpired(): void {
    if (!this.open || this.phase.kind === 'relaying') return;
    this.end('idle-timeout', 'idle-timeout');
  }

  private socketError(side: 'client' | 'backend', err: Error): void {
    if (!this.open) return;
    this.log.debug({ side, err: errorMessage(err), code: errorCode(err) }, 'socket error');
    this.close(side === 'client' ? 'client-closed' : 'backend-closed');
  }

  private internalError(where: string, err: unknown): void {
    this.log.error({ where, err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'internal error');
    this.end('internal-error', 'internal-error');
  }

  private write(data: string): void {
    if (data && !this.client.destroyed && this.client.writable) {
      this.record.bytesOut += data.length;
      this.client.write(data, 'latin1');
    }
  }

  /** The one way out. Ends both sides politely, then destroys them if they do not go. */
  close(reason: CloseReason, finalWords?: string): void {
    if (!this.open) return;
    if (finalWords) this.write(finalWords);
    // A backend still in a login belongs to that login, which ends it once the verdict is in.
    const backend = this.phase.kind === 'relaying' ? this.phase.backend : undefined;
    const counts = this.phase.kind === 'relaying' && this.phase.relay?.counts === true;
    const grace = setTimeout(() => {
      this.client.destroy();
      this.raw.destroy();
      backend?.destroy();
    }, CLOSE_GRACE_MS);
    grace.unref();
    this.enter({ kind: 'closing', grace, backend, counts });
    this.record.closeReason = reason;
    clearTimeout(this.totalTimer);
    this.client.end();
    backend?.end();
  }

  private finalize(): void {
    const phase = this.phase;
    if (phase.kind === 'closed') return;
    if (phase.kind !== 'closing') this.record.closeReason = 'client-closed';
    const backend = phase.kind === 'closing' || phase.kind === 'relaying' ? phase.backend : undefined;
    this.enter({ kind: 'closed' });
    clearTimeout(this.totalTimer);
    // Whichever socket reported the close, the others must go too: a failed TLS
    // handshake closes the TLS socket while the half-closed TCP one stays open.
    this.client.destroy();
    this.raw.destroy();
    backend?.destroy();
    this.deps.registry.remove(this.record.id);
    this.releasePool();
    const release = this.release;
    this.release = undefined;
    // What policy counted for this connection is given back once a login in flight has its verdict.
    if (release && this.loginRun) void this.loginRun.finally(release);
    else release?.();
    const r = this.record;
    const counts = phase.kind === 'closing' ? phase.counts : phase.kind === 'relaying' && phase.relay?.counts === true;
    this.log.info(
      {
        user: r.user,
        backend: r.backend,
        tls: r.tlsVersion,
        cipher: r.tlsCipher,
        bytesIn: r.bytesIn,
        bytesOut: r.bytesOut,
        messages: counts ? r.messages : undefined,
        recipients: counts ? r.recipients : undefined,
        durationMs: Date.now() - r.startedAt,
        reason: r.closeReason,
      },
      'session end',
    );
  }
}

/** The words a kill or a timer ends a session with: a kill is never called an internal error unless it is one. */
function goodbyeFor(reason: CloseReason): Goodbye {
  switch (reason) {
    case 'shutdown':
    case 'idle-timeout':
    case 'internal-error':
      return reason;
    default:
      return 'killed';
  }
}

/** The promise's value, or undefined once `ms` have passed (the promise is left to settle on its own). */
function withDeadline<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
