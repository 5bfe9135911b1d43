/**
 * One mail session, start to end: TLS, greeting, the adapter's pre-auth
 * dialogue, the policy decision, the backend login replay, then the splice.
 * The session owns both sockets; `close(reason)` is the only way out and it
 * records why. Every event handler first checks for the terminal state.
 */
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Listener } from '../config/load.ts';
import { errorCode, errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { connectBackend } from '../backend/connector.ts';
import type { CapabilityCache } from '../backend/capabilities.ts';
import { SocketLink } from '../backend/link.ts';
import { formatHostPort, normalizeIp } from '../net/address.ts';
import { LINE_TOO_LONG, LineReader } from '../net/line-reader.ts';
import type { AuthFacts, ConnectFacts, Policy } from '../policy/engine.ts';
import type {
  BackendCapabilities,
  CloseReason,
  Credentials,
  MailAdapter,
  ProtocolModule,
  Refusal,
  RelayFilter,
  RelayHost,
  RelayUnit,
  SessionFacts,
  Step,
} from '../protocols/types.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { alpnSelector } from '../tls/options.ts';
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
}

/** After close() ends both sockets politely, how long they get to flush before being destroyed. */
const CLOSE_GRACE_MS = 2_000;

export class MailSession implements SessionControl {
  readonly record: SessionRecord;
  private readonly raw: Socket;
  private client: Socket;
  private readonly listener: Listener;
  private readonly deps: MailSessionDeps;
  private readonly log: Logger;
  private readonly reader: LineReader;
  private readonly facts: SessionFacts;
  private readonly connectFacts: ConnectFacts;
  private adapter: MailAdapter | undefined;
  private caps: BackendCapabilities | undefined;
  private backend: Socket | undefined;
  /** The protocol's filter for the spliced stream (SMTP), if it has one. */
  private relay: RelayFilter | undefined;
  /** The login's facts, for the limits counted in the spliced stream. */
  private authFacts: AuthFacts | undefined;
  /** The relay is waiting for the backend's last replies before it ends the session; past this deadline the driver ends it. */
  private closingTimer: NodeJS.Timeout | undefined;
  private literalBytes: number | undefined;
  private busy = false;
  private greeted = false;
  private allowed = false;
  private authFailures = 0;
  private draining = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private totalTimer: NodeJS.Timeout | undefined;
  private graceTimer: NodeJS.Timeout | undefined;
  private readonly onClientData = (chunk: Buffer) => this.clientData(chunk);
  private readonly onTimeout = () => this.idle();
  private idleMs = 0;

  constructor(raw: Socket, listener: Listener, deps: MailSessionDeps) {
    this.raw = raw;
    this.client = raw;
    this.listener = listener;
    this.deps = deps;
    const now = Date.now();
    const clientIp = normalizeIp(raw.remoteAddress);
    this.record = newSessionRecord(
      { id: deps.registry.nextId(), listener: listener.name, protocol: deps.module.protocol, clientIp, clientPort: raw.remotePort ?? 0, state: 'handshake' },
      now,
    );
    this.log = deps.log.child({ conn: this.record.id, listener: listener.name, client: clientIp });
    this.reader = new LineReader(listener.limits.max_line);
    const record = this.record;
    this.facts = {
      id: record.id,
      listener,
      hostname: deps.hostname,
      clientIp,
      clientPort: record.clientPort,
      localIp: normalizeIp(raw.localAddress),
      localPort: raw.localPort ?? 0,
      tls: () => record.tlsVersion !== null,
    };
    this.connectFacts = { listener, clientIp, tls: false, now, session: this.record.id };
  }

  get state(): SessionState {
    return this.record.state;
  }

  private get closed(): boolean {
    return this.record.state === 'closing' || this.record.state === 'closed';
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
      const refuse = () => this.close(verdict.action === 'deny' ? 'policy-denied' : 'policy-tempfail', this.adapterFor().refusal(why, verdict.text));
      if (this.listener.tls === 'implicit') this.startTls(refuse);
      else refuse();
      return;
    }
    this.allowed = true;
    if (this.listener.tls === 'implicit') this.startTls(() => this.greet());
    else this.greet();
  }

  kill(reason: CloseReason): void {
    if (this.closed) return;
    const notice = this.record.state === 'relaying' ? this.spliceGoodbye() : this.adapter?.refusal(reason === 'shutdown' ? 'shutdown' : 'internal-error');
    this.close(reason, notice);
  }

  drain(): void {
    if (this.closed) return;
    this.draining = true;
    // Before login nothing is lost by ending now; a spliced session runs until it ends or the drain deadline kills it.
    if (this.record.state === 'preauth' || this.record.state === 'handshake' || this.record.state === 'starttls') {
      this.close('shutdown', this.adapter?.refusal('shutdown'));
    }
  }

  // ---- TLS -------------------------------------------------------------

  private startTls(then: () => void): void {
    this.record.state = this.record.state === 'handshake' ? 'handshake' : 'starttls';
    const tls = new TLSSocket(this.raw, {
      isServer: true,
      secureContext: this.deps.certs.contextFor(undefined),
      SNICallback: this.deps.certs.sniCallback,
      ALPNCallback: alpnSelector(this.deps.module.protocol),
    });
    this.client = tls;
    // The TLS socket reads the connection from now on, so activity (and the idle timer) is tracked there.
    tls.on('close', () => this.finalize());
    tls.on('timeout', this.onTimeout);
    if (this.idleMs > 0) this.setIdle(this.idleMs);
    this.handshakeTimer = setTimeout(() => {
      this.log.debug('TLS handshake timed out');
      this.close('tls-handshake-timeout');
    }, this.listener.timeouts.tls_handshake);
    tls.on('error', (err) => {
      if (this.record.tlsVersion === null) {
        this.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'TLS handshake failed');
        this.close('tls-handshake-failed');
      } else {
        this.socketError('client', err);
      }
    });
    tls.once('secure', () => {
      clearTimeout(this.handshakeTimer);
      if (this.closed) return;
      this.record.tlsVersion = tls.getProtocol() ?? 'unknown';
      this.record.tlsCipher = tls.getCipher()?.name ?? 'unknown';
      this.connectFacts.tls = true;
      then();
    });
  }

  // ---- pre-auth dialogue --------------------------------------------------

  private adapterFor(): MailAdapter {
    this.adapter ??= this.deps.module.createAdapter(this.facts, this.caps);
    return this.adapter;
  }

  private greet(): void {
    if (this.closed) return;
    this.record.state = 'preauth';
    this.client.on('data', this.onClientData);
    this.setIdle(this.listener.timeouts.preauth_idle);
    const l = this.listener;
    const target = {
      module: this.deps.module,
      backend: l.backend,
      proxyProtocol: l.proxy_protocol,
      connectTimeoutMs: l.timeouts.backend_connect,
      replayTimeoutMs: l.timeouts.login_replay,
      maxLine: l.limits.max_line,
    };
    const greetDelay = l.protocol === 'smtp' ? l.greet_delay : 0;
    // The common case: capabilities already known and no greet delay, so no promise or timer per connection.
    const known = greetDelay > 0 ? undefined : this.deps.capabilities.peek(target);
    if (known) {
      this.caps = known;
      // After a TLS handshake, one event loop turn later: OpenSSL writes the TLS 1.3 session tickets
      // once this handler returns, and they should precede the greeting, so that a client reading
      // the greeting has them (resumption) and has nothing unread when it hangs up. Not for SMTP:
      // bytes that came with the client's Finished would meet an ungreeted session (early talker).
      if (this.record.tlsVersion !== null && l.protocol !== 'smtp') setImmediate(MailSession.greetNow, this);
      else this.sendGreeting();
      return;
    }
    // A hung backend must not hold the greeting: past backend_connect, greet with defaults.
    const capsOrDefaults = withDeadline(this.deps.capabilities.get(target), l.timeouts.backend_connect);
    Promise.all([capsOrDefaults, delay(greetDelay)]).then(
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
    if (this.closed) return;
    this.write(this.adapterFor().greeting());
    this.greeted = true;
    this.process();
  }

  private clientData(chunk: Buffer): void {
    if (this.closed || this.record.state !== 'preauth' && this.record.state !== 'authenticating') return;
    this.record.bytesIn += chunk.length;
    this.record.lastActivity = Date.now();
    if (!this.greeted && this.deps.module.protocol === 'smtp') {
      // RFC 5321 §4.3.1: a client must wait for the greeting; one that does not is a spam engine.
      this.close('early-talker', this.adapterFor().refusal('early-talker'));
      return;
    }
    this.reader.push(chunk);
    const l = this.listener.limits;
    if (this.reader.buffered > l.max_line + l.max_literal) {
      this.close('line-too-long', this.adapterFor().refusal('line-too-long'));
      return;
    }
    this.process();
  }

  private process(): void {
    const adapter = this.adapterFor();
    while (!this.busy && this.greeted && this.record.state === 'preauth') {
      let step: Step;
      if (this.literalBytes !== undefined) {
        const data = this.reader.takeBytes(this.literalBytes);
        if (!data) return;
        this.literalBytes = undefined;
        step = adapter.onLiteral(data);
      } else {
        const line = this.reader.nextLine();
        if (line === null) return;
        if (line === LINE_TOO_LONG) {
          this.close('line-too-long', adapter.refusal('line-too-long'));
          return;
        }
        step = adapter.onLine(line);
      }
      this.handle(step);
    }
  }

  private handle(step: Step): void {
    switch (step.kind) {
      case 'reply':
        this.write(step.data);
        return;
      case 'literal':
        this.write(step.data);
        this.literalBytes = step.size;
        return;
      case 'starttls':
        this.write(step.data);
        // Anything the client sent after STARTTLS came in plaintext: discard it (CVE-2011-0411).
        this.client.off('data', this.onClientData);
        this.reader.drain();
        this.busy = true;
        this.startTls(() => {
          this.busy = false;
          this.adapterFor().tlsStarted();
          this.record.state = 'preauth';
          this.client.on('data', this.onClientData);
          this.process();
        });
        return;
      case 'login':
        this.busy = true;
        this.client.pause();
        this.login(step.credentials).then(
          () => undefined,
          (err: unknown) => this.internalError('login', err),
        );
        return;
      case 'close':
        this.close(step.reason, step.data);
        return;
      default: {
        const never: never = step;
        throw new Error(`unknown step ${JSON.stringify(never)}`);
      }
    }
  }

  // ---- authentication and backend ----------------------------------------

  private async login(credentials: Credentials | null): Promise<void> {
    const adapter = this.adapterFor();
    const l = this.listener;
    this.record.state = 'authenticating';
    const facts: AuthFacts = {
      ...this.connectFacts,
      now: Date.now(),
      user: credentials?.user ?? null,
      mechanism: credentials?.mechanism ?? null,
    };
    const decision = await this.deps.policy.onAuth(facts, credentials);
    if (this.closed) return;
    if (decision.action !== 'allow') {
      this.log.info({ user: facts.user, reason: decision.text, code: decision.code }, 'login refused by policy');
      this.deps.registry.refused(l.name, this.record.clientIp, decision.code, decision.text);
      this.loginFailed(adapter.loginRefusal(decision.action === 'deny' ? 'denied' : 'tempfail', decision.text));
      return;
    }
    const backendName = formatHostPort(decision.backend);
    let socket: Socket;
    const connectStartedAt = performance.now(); // metrics: backend connect latency (control/stats.ts)
    try {
      socket = await connectBackend(decision.backend, {
        timeoutMs: l.timeouts.backend_connect,
        proxyProtocol: l.proxy_protocol,
        endpoints: {
          clientIp: this.record.clientIp,
          clientPort: this.record.clientPort,
          localIp: this.facts.localIp,
          localPort: this.facts.localPort,
        },
      });
    } catch (err) {
      this.log.warn({ backend: backendName, err: errorMessage(err) }, 'backend unavailable');
      if (this.closed) return;
      const reason = errorCode(err) === 'BACKEND_TIMEOUT' ? 'backend-timeout' : 'backend-unavailable';
      this.close(reason, adapter.loginRefusal('backend-unavailable'));
      return;
    }
    if (this.closed) {
      socket.destroy();
      return;
    }
    this.backend = socket;
    this.deps.registry.backendConnected(this.record, backendName, performance.now() - connectStartedAt); // metrics: backend connect latency
    this.record.backend = backendName;
    const link = new SocketLink(socket, { maxLine: l.limits.max_line, timeoutMs: l.timeouts.login_replay });
    let result;
    try {
      result = await adapter.login(link, decision.credentials, this.caps);
    } catch (err) {
      link.destroy();
      this.backend = undefined;
      if (this.closed) return;
      const code = errorCode(err);
      this.log.warn({ backend: backendName, user: facts.user, err: errorMessage(err), code }, 'backend login replay failed');
      // A backend without AUTH behind a passthrough listener is a configuration error, told apart from an outage (issue 17).
      this.close(code === 'BACKEND_TIMEOUT' ? 'backend-timeout' : code === 'BACKEND_NO_AUTH' ? 'backend-no-auth' : 'backend-error', adapter.loginRefusal('backend-unavailable'));
      return;
    }
    if (this.closed) {
      link.destroy();
      return;
    }
    this.deps.policy.onAuthResult(facts, result.ok);
    if (!result.ok) {
      this.deps.registry.authFailed(this.record, facts.user); // control socket + metrics: failed login
      link.destroy();
      this.backend = undefined;
      this.record.backend = null;
      this.log.info({ user: facts.user, backend: backendName }, 'login failed');
      this.loginFailed(result.reply);
      return;
    }
    this.record.user = facts.user;
    this.authFacts = facts;
    const { leftover } = link.release();
    this.write(result.reply);
    this.log.info({ user: facts.user, backend: backendName }, 'login ok');
    this.deps.registry.authenticated(this.record);
    this.splice(socket, leftover);
  }

  private loginFailed(reply: string): void {
    this.authFailures++;
    if (this.authFailures >= this.listener.limits.max_auth_attempts) {
      this.close('too-many-auth-failures', reply + this.adapterFor().refusal('too-many-auth-failures'));
      return;
    }
    this.write(reply);
    if (this.draining) {
      this.close('shutdown', this.adapterFor().refusal('shutdown'));
      return;
    }
    this.record.state = 'preauth';
    this.busy = false;
    this.client.resume();
    this.process();
  }

  // ---- splice ---------------------------------------------------------------

  private splice(backend: Socket, leftover: Buffer): void {
    const client = this.client;
    const record = this.record;
    record.state = 'relaying';
    clearTimeout(this.totalTimer);
    client.off('data', this.onClientData);
    this.setIdle(this.listener.timeouts.postauth_idle);
    const relay = this.adapterFor().relay?.(this.relayHost(client, backend));
    this.relay = relay;

    backend.on('error', (err) => this.socketError('backend', err));
    backend.on('close', () => this.close('backend-closed'));
    client.on('end', () => this.close('client-closed'));

    // Bytes each side sent past the login exchange belong to the other side, in order.
    const pending = this.reader.drain();
    if (leftover.length > 0) this.fromBackend(leftover);
    if (pending.length > 0) this.fromClient(pending);

    client.on('data', (chunk: Buffer) => {
      if (this.closed) return;
      record.bytesIn += chunk.length;
      record.lastActivity = Date.now();
      this.fromClient(chunk);
    });
    backend.on('data', (chunk: Buffer) => {
      if (this.closed) return;
      record.lastActivity = Date.now();
      this.fromBackend(chunk);
    });
    backend.on('drain', () => this.flow());
    client.on('drain', () => backend.resume());
    this.flow();
  }

  private fromClient(chunk: Buffer): void {
    const backend = this.backend;
    if (!backend) return;
    if (this.relay) this.relay.fromClient(chunk);
    else backend.write(chunk);
    this.flow();
  }

  private fromBackend(chunk: Buffer): void {
    if (this.relay) this.relay.fromBackend(chunk);
    else this.forward(chunk);
    if (this.client.writableNeedDrain) this.backend?.pause();
    // A reply can end a wait of the relay's (the answer to DATA).
    this.flow();
  }

  /** Backend bytes to the client, counted. */
  private forward(data: Buffer | string): void {
    if (this.closed || this.client.destroyed) return;
    this.record.bytesOut += data.length;
    if (typeof data === 'string') this.client.write(data, 'latin1');
    else this.client.write(data);
  }

  /** Reads the client while the relay takes its bytes and the backend keeps up; pauses it otherwise. */
  private flow(): void {
    if (this.closed || !this.backend) return;
    if (this.relay?.holding() || this.backend.writableNeedDrain) this.client.pause();
    else this.client.resume();
  }

  // ---- the relay's host: counts, limits, the end --------------------------------------
  //
  // Policy counts recipients before they are forwarded and messages once the
  // backend accepted them; the relay waits for a verdict when a limit counts
  // them (the client is paused meanwhile). How a refusal or a limit is said,
  // and when the session may end, is the protocol's (smtp-relay.ts).

  private relayHost(client: Socket, backend: Socket): RelayHost {
    return {
      toBackend: (data) => {
        if (!this.closed) backend.write(data);
      },
      toClient: (data) => this.forward(data),
      count: (unit) => this.count(unit),
      refused: (what) => this.log.info({ user: this.record.user, what }, 'refused after login'),
      closing: (reason, words) => {
        clearTimeout(this.closingTimer);
        // A backend that does not answer the replies it owes gets as long as a login replay.
        this.closingTimer = setTimeout(() => this.close(reason, words), this.listener.timeouts.login_replay);
        this.closingTimer.unref();
        client.pause();
      },
      close: (reason, words) => this.close(reason, words),
    };
  }

  private count(unit: RelayUnit): 'go' | 'wait' {
    const policy = this.deps.policy;
    const facts = this.authFacts;
    const asked = facts && (unit === 'recipient' ? policy.onSmtpRecipient?.({ ...facts, now: Date.now() }) : policy.onSmtpMessage?.({ ...facts, now: Date.now() }));
    if (!asked) {
      this.counted(unit);
      return 'go';
    }
    asked.then(
      (verdict) => {
        if (this.closed) return;
        if (verdict.action === 'allow' || unit === 'message') this.counted(unit);
        if (verdict.action !== 'allow') {
          this.log.info({ user: facts.user, reason: verdict.text, code: verdict.code, unit }, unit === 'message' ? 'message limit reached, ending the session' : 'recipient refused by a limit');
        }
        this.relay?.verdict(unit, verdict.action === 'allow' ? { ok: true } : { ok: false, reason: verdict.text });
        this.flow();
      },
      (err: unknown) => this.internalError(`${unit} limit`, err),
    );
    return 'wait';
  }

  private counted(unit: RelayUnit): void {
    if (unit === 'recipient') this.record.recipients++;
    else this.record.messages++;
  }

  private spliceGoodbye(): string | undefined {
    if (this.relay && !this.relay.atBoundary()) return undefined;
    return this.adapter?.shutdownNotice();
  }

  // ---- timers, errors, close --------------------------------------------------

  private idle(): void {
    if (this.closed) return;
    switch (this.record.state) {
      case 'preauth':
      case 'handshake':
      case 'starttls':
        this.close('idle-timeout', this.adapter && this.greeted ? this.adapter.refusal('idle-timeout') : undefined);
        return;
      case 'relaying':
        this.close('idle-timeout', this.spliceGoodbye());
        return;
      case 'authenticating':
        // Bounded by backend_connect and login_replay; the client is paused meanwhile.
        return;
      default:
        return;
    }
  }

  private setIdle(ms: number): void {
    this.idleMs = ms;
    this.client.setTimeout(ms);
  }

  private preauthExpired(): void {
    if (this.closed || this.record.state === 'relaying') return;
    this.close('idle-timeout', this.adapter && this.greeted ? this.adapter.refusal('idle-timeout') : undefined);
  }

  private socketError(side: 'client' | 'backend', err: Error): void {
    if (this.closed) return;
    this.log.debug({ side, err: errorMessage(err), code: errorCode(err) }, 'socket error');
    this.close(side === 'client' ? 'client-closed' : 'backend-closed');
  }

  private internalError(where: string, err: unknown): void {
    this.log.error({ where, err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'internal error');
    if (!this.closed) this.close('internal-error', this.adapter?.refusal('internal-error'));
  }

  private write(data: string): void {
    if (data && !this.client.destroyed && this.client.writable) {
      this.record.bytesOut += data.length;
      this.client.write(data, 'latin1');
    }
  }

  /** The one way out. Ends both sides politely, then destroys them if they do not go. */
  close(reason: CloseReason, finalWords?: string): void {
    if (this.closed) return;
    if (finalWords) this.write(finalWords);
    this.record.state = 'closing';
    this.record.closeReason = reason;
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.totalTimer);
    clearTimeout(this.closingTimer);
    this.client.end();
    this.backend?.end();
    this.graceTimer = setTimeout(() => {
      this.client.destroy();
      this.raw.destroy();
      this.backend?.destroy();
    }, CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  private finalize(): void {
    if (this.record.state === 'closed') return;
    if (this.record.state !== 'closing') this.record.closeReason = 'client-closed';
    this.record.state = 'closed';
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.totalTimer);
    clearTimeout(this.graceTimer);
    clearTimeout(this.closingTimer);
    // Whichever socket reported the close, the others must go too: a failed TLS
    // handshake closes the TLS socket while the half-closed TCP one stays open.
    this.client.destroy();
    this.raw.destroy();
    this.backend?.destroy();
    this.deps.registry.remove(this.record.id);
    if (this.allowed) this.deps.policy.onDisconnect(this.connectFacts);
    const r = this.record;
    this.log.info(
      {
        user: r.user,
        backend: r.backend,
        tls: r.tlsVersion,
        cipher: r.tlsCipher,
        bytesIn: r.bytesIn,
        bytesOut: r.bytesOut,
        messages: this.relay ? r.messages : undefined,
        recipients: this.relay ? r.recipients : undefined,
        durationMs: Date.now() - r.startedAt,
        reason: r.closeReason,
      },
      'session end',
    );
  }
}

function delay(ms: number): Promise<void> {
  return ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms)) : Promise.resolve();
}

/** The promise's value, or undefined once `ms` have passed (the promise is left to settle on its own). */
function withDeadline<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
