/**
 * One accepted TCP connection on an HTTP listener, as the session registry
 * sees it: from accept (and TLS handshake) to close, across any number of
 * keep-alive requests, HTTP/2 streams or one WebSocket. The protocol that
 * runs on it (fast path, HTTP/2, the proxy library) is its handler.
 *
 * `close(reason)` is the only way out: it records the reason, lets the
 * handler release its backend side and ends the client socket (after a last
 * answer, when one is given). `finalize` runs once, when the socket is gone,
 * and writes the one 'session end' line with the application-level byte
 * counts the handlers reported.
 */
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Listener } from '../config/load.ts';
import type { Logger } from '../core/log.ts';
import { socketPeer, type Peer } from '../net/proxy-inbound.ts';
import { trustsForwarded } from './forwarded-trust.ts';
import type { ConnectFacts, Policy, Verdict } from '../policy/engine.ts';
import type { CloseReason } from '../protocols/types.ts';
import { newSessionRecord, type SessionRecord } from '../session/record.ts';
import type { SessionControl, SessionRegistry } from '../session/registry.ts';

export type HttpListener = Listener & { protocol: 'http' };

/** After a last answer is written and the socket ended, how long it gets before it is destroyed. */
const CLOSE_GRACE_MS = 2_000;

/** What runs on a connection once it speaks HTTP: the fast path, an HTTP/2 session or the proxy library. */
export interface ConnectionHandler {
  /** Shutdown: finish what is in progress, then close the connection (a WebSocket waits for the drain deadline). */
  drain(): void;
  /** The connection is closing: release backend connections and timers. Called once, from close(). */
  teardown(): void;
}

export interface HttpConnectionDeps {
  registry: SessionRegistry;
  /** The policy in force when the connection arrived; onDisconnect goes to the same one. */
  policy: Policy;
  /** The listener's logger; the connection makes its child. */
  log: Logger;
  /** True once the listener stopped accepting: a connection ending without a reason then ends for 'shutdown'. */
  listenerClosing: () => boolean;
  onClosed: (conn: HttpConnection) => void;
}

export class HttpConnection implements SessionControl {
  readonly record: SessionRecord;
  readonly log: Logger;
  /** The accepted TCP socket. */
  readonly tcp: Socket;
  /** The socket HTTP is read from: the TLSSocket once secure, else the TCP socket. */
  client: Socket;
  readonly settings: HttpListener;
  readonly tls: boolean;
  /** The gateway address and port the client connected to (a balancer's, when its PROXY header named them). */
  readonly localIp: string;
  readonly localPort: number;
  /** The client is one of `trust_forwarded`'s proxies: its X-Forwarded-* chain is kept and extended. */
  readonly trustForwarded: boolean;
  readonly connectFacts: ConnectFacts;
  verdict: Verdict = { action: 'allow' };
  requests = 0;
  draining = false;
  private handler: ConnectionHandler | undefined;
  private readonly deps: HttpConnectionDeps;
  private allowed = false;
  /** Why the connection will end if nothing more specific happens (a refused one after its 403). */
  private pendingReason: CloseReason | null = null;
  private graceTimer: NodeJS.Timeout | undefined;

  /** `peer`: the socket's addresses, or the client a trusted balancer's PROXY header named (src/listeners/proxied.ts). */
  constructor(tcp: Socket, settings: HttpListener, id: string, deps: HttpConnectionDeps, peer: Peer = socketPeer(tcp)) {
    const now = Date.now();
    const clientIp = peer.clientIp;
    this.tcp = tcp;
    this.client = tcp;
    this.deps = deps;
    this.settings = settings;
    this.tls = settings.tls === 'implicit';
    this.localIp = peer.localIp;
    this.localPort = peer.localPort;
    this.trustForwarded = trustsForwarded(settings, clientIp);
    this.record = newSessionRecord(
      { id, listener: settings.name, protocol: 'http', clientIp, clientPort: peer.clientPort, state: this.tls ? 'handshake' : 'relaying' },
      now,
    );
    this.log = deps.log.child({ conn: id, client: clientIp, ...(peer.via === undefined ? {} : { via: peer.via }) });
    this.connectFacts = { listener: settings, clientIp, tls: this.tls, now };
    tcp.on('close', () => this.finalize());
  }

  get closed(): boolean {
    return this.record.state === 'closing' || this.record.state === 'closed';
  }

  /** Registers with the registry and asks the policy; a refusal is answered per request (403/429), then closed. */
  start(): void {
    this.deps.registry.add(this);
    const verdict = this.deps.policy.onConnect(this.connectFacts);
    this.verdict = verdict;
    if (verdict.action === 'allow') {
      this.allowed = true;
      return;
    }
    this.pendingReason = verdict.action === 'deny' ? 'policy-denied' : 'policy-tempfail';
    this.deps.registry.refused(this.record.listener, this.record.clientIp, verdict.code, verdict.text);
    this.log.info({ reason: verdict.text, code: verdict.code, action: verdict.action }, 'connection refused by policy');
  }

  /** Per-request policy (requests per window); undefined when the policy has no such rule. */
  requestVerdict(method: string, path: string): Verdict | undefined {
    const verdict = this.deps.policy.onHttpRequest?.({ ...this.connectFacts, now: Date.now(), method, path });
    if (verdict && verdict.action !== 'allow') this.deps.registry.refused(this.record.listener, this.record.clientIp, verdict.code, verdict.text);
    return verdict;
  }

  /** The TLS handshake is done: HTTP runs on `socket` from now on. */
  secured(socket: TLSSocket): void {
    this.client = socket;
    this.record.state = 'relaying';
    this.record.tlsVersion = socket.getProtocol() ?? 'unknown';
    this.record.tlsCipher = socket.getCipher()?.name ?? 'unknown';
    this.record.lastActivity = Date.now();
    socket.on('close', () => this.finalize());
  }

  /** The protocol that runs on the connection from now on. */
  attach(handler: ConnectionHandler): void {
    this.handler = handler;
  }

  /** Application-level bytes from the client (request heads and bodies, HTTP/2 frames' payloads, WebSocket bytes). */
  countIn(n: number): void {
    this.record.bytesIn += n;
  }

  /** Application-level bytes to the client. */
  countOut(n: number): void {
    this.record.bytesOut += n;
  }

  /** A request started: activity for the registry. */
  requestStarted(): void {
    this.requests++;
    this.record.lastActivity = Date.now();
  }

  /** The reason noted for this connection, else `fallback`. */
  reasonOr(fallback: CloseReason): CloseReason {
    return this.pendingReason ?? fallback;
  }

  /** Sets the reason this connection will end with unless something more specific closes it first. */
  noteReason(reason: CloseReason): void {
    this.pendingReason ??= reason;
  }

  kill(reason: CloseReason): void {
    this.close(reason);
  }

  /** Shutdown: a connection still in its handshake ends now; the handler finishes what is in progress. */
  drain(): void {
    if (this.closed) return;
    this.draining = true;
    if (this.record.state === 'handshake' || !this.handler) {
      this.close('shutdown');
      return;
    }
    this.handler.drain();
  }

  /**
   * The one way out. With `farewell`, those bytes (a last HTTP answer) are
   * written and the socket ended politely, destroyed if still open after a
   * grace period; without, both sockets are destroyed now.
   */
  close(reason: CloseReason, farewell?: string | Buffer): void {
    if (this.closed) return;
    this.record.state = 'closing';
    this.record.closeReason = reason;
    const handler = this.handler;
    this.handler = undefined;
    handler?.teardown();
    if (farewell !== undefined && this.client.writable) {
      this.countOut(typeof farewell === 'string' ? Buffer.byteLength(farewell, 'latin1') : farewell.length);
      this.client.end(farewell);
      this.graceTimer = setTimeout(() => this.destroySockets(), CLOSE_GRACE_MS);
      this.graceTimer.unref();
      return;
    }
    this.destroySockets();
  }

  private destroySockets(): void {
    this.client.destroy();
    this.tcp.destroy();
  }

  private finalize(): void {
    if (this.record.state === 'closed') return;
    const r = this.record;
    if (r.closeReason === null) r.closeReason = this.pendingReason ?? (this.deps.listenerClosing() || this.draining ? 'shutdown' : 'client-closed');
    r.state = 'closed';
    const handler = this.handler;
    this.handler = undefined;
    handler?.teardown();
    clearTimeout(this.graceTimer);
    this.destroySockets();
    this.deps.registry.remove(r.id);
    if (this.allowed) this.deps.policy.onDisconnect(this.connectFacts);
    this.log.info(
      {
        backend: r.backend,
        tls: r.tlsVersion,
        cipher: r.tlsCipher,
        bytesIn: r.bytesIn,
        bytesOut: r.bytesOut,
        durationMs: Date.now() - r.startedAt,
        requests: this.requests,
        reason: r.closeReason,
      },
      'session end',
    );
    this.deps.onClosed(this);
  }
}
