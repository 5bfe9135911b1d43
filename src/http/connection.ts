/**
 * One accepted TCP connection on an HTTP listener, as the session registry
 * sees it: from accept (and TLS handshake) to close, across any number of
 * keep-alive requests or one WebSocket. `close(reason)` and `end(reason)`
 * are the only ways out; `finalize` runs once, records the reason, counts
 * the bytes and writes the one 'session end' line.
 */
import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Listener } from '../config/load.ts';
import type { Logger } from '../core/log.ts';
import { normalizeIp } from '../net/address.ts';
import { proxyHeader } from '../net/proxy-protocol.ts';
import type { ConnectFacts, Policy, Verdict } from '../policy/engine.ts';
import type { CloseReason } from '../protocols/types.ts';
import { newSessionRecord, type SessionRecord } from '../session/record.ts';
import type { SessionControl, SessionRegistry } from '../session/registry.ts';
import { BackendAgent } from './backend-agent.ts';

type HttpListener = Listener & { protocol: 'http' };

/** After end() asks politely (FIN, TLS close_notify), how long the socket gets before it is destroyed. */
const CLOSE_GRACE_MS = 2_000;

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
  /** The accepted TCP socket: byte counts come from here (what crossed the wire, TLS included). */
  readonly tcp: Socket;
  /** The socket HTTP is parsed from: the TLSSocket once secure, else the TCP socket. */
  app: Socket | undefined;
  readonly tls: boolean;
  readonly localPort: number;
  readonly connectFacts: ConnectFacts;
  verdict: Verdict = { action: 'allow' };
  requests = 0;
  draining = false;
  /** A WebSocket took the connection over; it runs until either side ends it. */
  upgraded = false;
  /** Requests whose backend response timer is armed: while any is, the client side's idle timer defers to it. */
  backendWaits = 0;
  private readonly deps: HttpConnectionDeps;
  private readonly live = new Set<ServerResponse>();
  private allowed = false;
  /** Why the connection will end if nothing more specific happens (a refused one after its 403). */
  private pendingReason: CloseReason | null = null;
  private privateAgent: BackendAgent | undefined;
  private graceTimer: NodeJS.Timeout | undefined;

  constructor(tcp: Socket, listener: HttpListener, id: string, deps: HttpConnectionDeps) {
    const now = Date.now();
    const clientIp = normalizeIp(tcp.remoteAddress);
    this.tcp = tcp;
    this.deps = deps;
    this.tls = listener.tls === 'implicit';
    this.localPort = tcp.localPort ?? 0;
    this.record = newSessionRecord(
      { id, listener: listener.name, protocol: 'http', clientIp, clientPort: tcp.remotePort ?? 0, state: this.tls ? 'handshake' : 'relaying' },
      now,
    );
    this.log = deps.log.child({ conn: id, client: clientIp });
    this.connectFacts = { listener, clientIp, tls: this.tls, now };
    tcp.on('close', () => this.finalize());
    if (!this.tls) this.app = tcp;
  }

  get closed(): boolean {
    return this.record.state === 'closing' || this.record.state === 'closed';
  }

  /** Per-request policy (requests per window); undefined when the policy has no such rule. */
  requestVerdict(method: string, path: string): Verdict | undefined {
    const verdict = this.deps.policy.onHttpRequest?.({ ...this.connectFacts, now: Date.now(), method, path });
    if (verdict && verdict.action !== 'allow') this.deps.registry.refused(this.record.listener, this.record.clientIp, verdict.code, verdict.text);
    return verdict;
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

  /** The TLS handshake is done: HTTP runs on `socket` from now on. */
  secured(socket: TLSSocket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    this.app = socket;
    this.record.state = 'relaying';
    this.record.tlsVersion = socket.getProtocol() ?? 'unknown';
    this.record.tlsCipher = socket.getCipher()?.name ?? 'unknown';
    this.record.lastActivity = Date.now();
    socket.on('close', () => this.finalize());
  }

  requestStarted(res: ServerResponse): void {
    this.requests++;
    this.live.add(res);
    this.record.lastActivity = Date.now();
    if (this.draining && !res.headersSent) res.setHeader('Connection', 'close');
  }

  requestEnded(res: ServerResponse): void {
    this.live.delete(res);
    this.record.lastActivity = Date.now();
    this.countBytes();
    if (this.draining && this.live.size === 0 && !this.upgraded) this.end('shutdown');
  }

  /** A response is being written (a late protocol error must not write a second one into it). */
  get busy(): boolean {
    return this.live.size > 0 || this.upgraded;
  }

  /** Sets the reason this connection will end with unless something more specific closes it first. */
  noteReason(reason: CloseReason): void {
    this.pendingReason ??= reason;
  }

  /**
   * The agent for this connection's backend requests when the listener sends
   * the PROXY protocol: the header names one client, so its backend
   * connections are private to this connection (and reused only by it).
   */
  agentFor(listener: HttpListener, connectTimeoutMs: () => number): BackendAgent | undefined {
    if (listener.proxy_protocol === false) return undefined;
    this.privateAgent ??= new BackendAgent({
      connectTimeoutMs,
      maxSockets: 2,
      maxFreeSockets: 1,
      prelude: proxyHeader(listener.proxy_protocol, {
        clientIp: this.record.clientIp,
        clientPort: this.record.clientPort,
        localIp: normalizeIp(this.tcp.localAddress),
        localPort: this.localPort,
      }),
    });
    return this.privateAgent;
  }

  kill(reason: CloseReason): void {
    this.close(reason);
  }

  /** Shutdown: an idle connection ends now, a busy one after its current response; a WebSocket waits for the drain deadline. */
  drain(): void {
    if (this.closed) return;
    this.draining = true;
    if (this.record.state === 'handshake') {
      this.close('shutdown');
      return;
    }
    if (this.upgraded) return;
    if (this.live.size === 0) {
      this.end('shutdown');
      return;
    }
    for (const res of this.live) if (!res.headersSent) res.setHeader('Connection', 'close');
  }

  /** The hard way out: both sockets destroyed now. */
  close(reason: CloseReason): void {
    if (this.closed) return;
    this.record.state = 'closing';
    this.record.closeReason = reason;
    this.app?.destroy();
    this.tcp.destroy();
  }

  /** The polite way out: FIN (and close_notify) now, destroyed if still open after a grace period. */
  end(reason: CloseReason): void {
    if (this.closed) return;
    this.record.state = 'closing';
    this.record.closeReason = reason;
    (this.app ?? this.tcp).end();
    this.graceTimer = setTimeout(() => {
      this.app?.destroy();
      this.tcp.destroy();
    }, CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  private countBytes(): void {
    this.record.bytesIn = this.tcp.bytesRead;
    this.record.bytesOut = this.tcp.bytesWritten;
  }

  private finalize(): void {
    if (this.record.state === 'closed') return;
    const r = this.record;
    if (r.closeReason === null) r.closeReason = this.pendingReason ?? (this.deps.listenerClosing() ? 'shutdown' : 'client-closed');
    r.state = 'closed';
    clearTimeout(this.graceTimer);
    this.app?.destroy();
    this.privateAgent?.destroy();
    this.countBytes();
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
