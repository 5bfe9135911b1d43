/**
 * The HTTP listener: https (or plain http) in front of a plaintext HTTP
 * backend, through one `http-proxy` instance with a keep-alive agent.
 *
 * Per TCP connection: a registry session, one policy decision, TLS with SNI
 * and an ALPN check (ALPACA), then keep-alive requests or one WebSocket.
 * Per request: X-Forwarded-* set by us (a client's own are replaced unless
 * trust_forwarded), HSTS when configured, 502/504 when the backend fails.
 * A plain listener with redirect_https answers every request with a redirect
 * to https, except ACME HTTP-01 challenges when a responder is set.
 *
 * Deadlines (all from the listener's config): tls_handshake; preauth_idle
 * for a connection that has sent no request yet, for the wait between
 * keep-alive requests and for receiving a request's headers; postauth_idle
 * for a request in progress, the backend's response and a WebSocket;
 * backend_connect for the TCP connect to the backend.
 */
import type { ClientRequest, IncomingMessage, ServerOptions as HttpServerOptions, ServerResponse } from 'node:http';
import { createServer as createHttpServer, ServerResponse as HttpServerResponse, type Server as HttpServer } from 'node:http';
import { createServer as createHttpsServer, type Server as HttpsServer, type ServerOptions as HttpsServerOptions } from 'node:https';
import { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import HttpProxy from 'http-proxy';
import type { Listener } from '../config/load.ts';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import { BackendAgent } from '../http/backend-agent.ts';
import { HttpConnection } from '../http/connection.ts';
import { applyForwardedHeaders, httpsRedirectLocation, isPlainOriginForm, isWebSocketUpgrade, logPath, originForm, stripHopByHop } from '../http/headers.ts';
import { rawResponse, sendText } from '../http/responses.ts';
import { closeServer, listenOn } from '../net/bind.ts';
import { formatHostPort, normalizeIp, type HostPort } from '../net/address.ts';
import type { CloseReason } from '../protocols/types.ts';
import type { CertStore } from '../tls/cert-store.ts';
import { ACME_TLS_ALPN } from '../tls/acme-alpn.ts';
import { alpnSelector, secureContextOptions } from '../tls/options.ts';
import type { ListenerDeps, ListenerHandle } from './types.ts';

export type HttpListener = Listener & { protocol: 'http' };

/** The path ACME HTTP-01 validation requests use (RFC 8555 §8.3). */
export const ACME_CHALLENGE_PREFIX = '/.well-known/acme-challenge/';

/** Answers an ACME HTTP-01 token with its key authorization, or undefined when the token is not ours. */
export type ChallengeResponder = (token: string) => string | undefined;

export interface HttpListenerHandle extends ListenerHandle {
  /**
   * Serves GET/HEAD under /.well-known/acme-challenge/ on a plain (tls: none)
   * listener before the redirect or the proxy. An unknown token is a 404 on a
   * redirect listener and goes to the backend on a proxying one. Pass
   * undefined to stop. Per listener handle, not global; kept across update().
   */
  setChallengeResponder(responder: ChallengeResponder | undefined): void;
}

/** Request head bound (request line plus all headers). */
export const MAX_HEADER_BYTES = 16 * 1024;
/** Connections per backend from the shared agent, and how many idle ones it keeps. */
const BACKEND_MAX_SOCKETS = 256;
const BACKEND_MAX_FREE_SOCKETS = 32;
/** How often node:http checks headersTimeout/requestTimeout. */
const CONNECTION_CHECK_MS = 1_000;
const ACME_TOKEN = /^[A-Za-z0-9_-]{1,256}$/;

/** What one proxied request (or WebSocket handshake) needs to know in the proxy's event handlers. */
interface Exchange {
  conn: HttpConnection;
  settings: HttpListener;
  backend: string;
  /** The error path ran (or the response was cut): later errors only make sure the client is gone. */
  settled: boolean;
  /** WebSocket: the backend answered (101 or otherwise) and the proxy is piping it to the client. */
  answered: boolean;
  status: number;
}

export async function startHttpListener(listener: HttpListener, deps: ListenerDeps): Promise<HttpListenerHandle> {
  let current = listener;
  let challenge: ChallengeResponder | undefined;
  let closing = false;
  let closed: Promise<void> | undefined;
  const name = listener.name;
  const log = deps.log.child({ listener: name });
  const tls = listener.tls === 'implicit';
  const conns = new Set<HttpConnection>();
  /** Keyed by the accepted TCP socket and by the socket HTTP reads (the TLSSocket on https). */
  const byTcp = new WeakMap<object, HttpConnection>();
  const byApp = new WeakMap<object, HttpConnection>();
  const exchanges = new WeakMap<IncomingMessage, Exchange>();

  const agent = new BackendAgent({
    connectTimeoutMs: () => current.timeouts.backend_connect,
    maxSockets: BACKEND_MAX_SOCKETS,
    maxFreeSockets: BACKEND_MAX_FREE_SOCKETS,
  });
  const proxy = HttpProxy.createProxyServer({ agent, xfwd: false, changeOrigin: false, ws: true });

  // ---- the proxy's hooks ------------------------------------------------------

  /** Arms the wait for the backend's answer (postauth_idle); while armed, the client's own idle timer defers to it. */
  const armBackendTimer = (proxyReq: ClientRequest, ex: Exchange) => {
    const ms = ex.settings.timeouts.postauth_idle;
    ex.conn.backendWaits++;
    proxyReq.once('close', () => {
      ex.conn.backendWaits--;
    });
    proxyReq.setTimeout(ms, () => {
      proxyReq.destroy(new MailgateError('BACKEND_TIMEOUT', `backend ${ex.backend} sent nothing for ${ms} ms`));
    });
  };

  proxy.on('proxyReq', (proxyReq, req, res) => {
    const ex = exchanges.get(req);
    if (!ex) return;
    armBackendTimer(proxyReq, ex);
    // A client that leaves before its response is complete frees the backend connection at once.
    res.once('close', () => {
      if (res.writableFinished || proxyReq.destroyed) return;
      ex.settled = true;
      proxyReq.destroy();
    });
  });
  proxy.on('proxyReqWs', (proxyReq, req, socket) => {
    const ex = exchanges.get(req);
    if (!ex) return;
    armBackendTimer(proxyReq, ex);
    proxyReq.once('response', (res) => {
      ex.answered = true;
      ex.status = res.statusCode ?? 502;
    });
    proxyReq.once('upgrade', (res, backendSocket) => {
      ex.answered = true;
      ex.status = res.statusCode ?? 101;
      // The proxy pipes both ways but does not tie the two lifetimes together on errors.
      socket.once('close', () => backendSocket.destroy());
      backendSocket.once('close', () => socket.destroy());
    });
  });
  proxy.on('proxyRes', (proxyRes, req, res) => {
    const ex = exchanges.get(req);
    if (!ex) return;
    ex.status = proxyRes.statusCode ?? 0;
    // The client's Connection header was stripped (hop-by-hop) before http-proxy saw it, so http-proxy would
    // answer "keep-alive" to a client that asked for close; node then keeps a connection the client gave up.
    if (ex.conn.draining || !res.shouldKeepAlive) proxyRes.headers.connection = 'close';
    proxyRes.once('close', () => {
      if (proxyRes.complete || ex.settled) return;
      // The backend went away (or timed out) mid-body: cut the client too, it must not take this for a whole response.
      ex.settled = true;
      ex.conn.log.warn({ backend: ex.backend }, 'backend response cut short');
      res.destroy();
    });
  });

  /** The one error path for http-proxy, web and WebSocket alike; reached at most once per exchange with effect. */
  const onProxyError = (err: Error, req: IncomingMessage, target: ServerResponse | Duplex) => {
    const ex = exchanges.get(req);
    if (!ex || ex.settled) {
      if (!(target instanceof HttpServerResponse)) target.destroy();
      else if (!target.writableEnded) target.destroy();
      return;
    }
    ex.settled = true;
    const timeout = errorCode(err) === 'BACKEND_TIMEOUT';
    const status = timeout ? 504 : 502;
    const clientGone = target.destroyed || ex.conn.closed;
    if (!clientGone) {
      ex.conn.log.warn(
        { backend: ex.backend, err: errorMessage(err), code: errorCode(err), method: req.method, path: logPath(req.url) },
        timeout ? 'backend timed out' : 'backend unavailable',
      );
    }
    ex.status = status;
    const body = timeout ? 'Gateway Timeout: the server behind this gateway did not answer in time.\n' : 'Bad Gateway: the server behind this gateway is unavailable.\n';
    if (target instanceof HttpServerResponse) {
      if (clientGone) target.destroy();
      else sendText(target, status, body);
      return;
    }
    if (ex.answered || clientGone || !target.writable) {
      target.destroy();
      return;
    }
    target.end(rawResponse(status, body), () => target.destroy());
  };
  proxy.on('error', onProxyError);

  const targetOf = (b: HostPort) => ({ protocol: 'http:', host: b.host, hostname: b.host, port: b.port });

  // ---- requests -------------------------------------------------------------------

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    const conn = byApp.get(req.socket);
    if (!conn || conn.closed) {
      res.destroy();
      return;
    }
    const settings = current;
    const started = Date.now();
    conn.requestStarted(res);
    res.once('close', () => {
      conn.requestEnded(res);
      conn.log.debug({ method: req.method, path: logPath(req.url), status: res.statusCode, durationMs: Date.now() - started }, 'request');
    });
    if (conn.record.state === 'relaying' && conn.requests === 1) req.socket.setTimeout(settings.timeouts.postauth_idle);
    if (tls && settings.hsts > 0) res.setHeader('Strict-Transport-Security', `max-age=${settings.hsts}`);

    const verdict = conn.verdict;
    if (verdict.action === 'deny') {
      sendText(res, 403, 'Forbidden\n', { Connection: 'close' });
      return;
    }
    if (verdict.action === 'tempfail') {
      sendText(res, 429, 'Too Many Requests\n', { Connection: 'close', 'Retry-After': retryAfterSeconds(verdict.retryAfterMs) });
      return;
    }

    if (!tls && (req.method === 'GET' || req.method === 'HEAD')) {
      const path = originForm(req.url);
      if (path.startsWith(ACME_CHALLENGE_PREFIX)) {
        const token = path.slice(ACME_CHALLENGE_PREFIX.length);
        const answer = challenge && ACME_TOKEN.test(token) ? challenge(token) : undefined;
        if (answer !== undefined) {
          sendText(res, 200, answer);
          return;
        }
        if (settings.redirect_https) {
          sendText(res, 404, 'Not Found\n');
          return;
        }
      }
    }
    if (!tls && settings.redirect_https) {
      const location = httpsRedirectLocation(req.headers.host, req.url, deps.hostname);
      const status = req.method === 'GET' || req.method === 'HEAD' ? 301 : 308;
      sendText(res, status, `Moved to ${location}\n`, { Location: location });
      return;
    }

    // Requests per window (policy rate_limits: http_requests), asked per request, not per connection.
    const perRequest = conn.requestVerdict(req.method ?? '', logPath(req.url));
    if (perRequest && perRequest.action !== 'allow') {
      if (perRequest.action === 'deny') sendText(res, 403, 'Forbidden\n');
      else sendText(res, 429, 'Too Many Requests\n', { 'Retry-After': retryAfterSeconds(perRequest.retryAfterMs) });
      return;
    }

    const ex = exchangeFor(conn, settings);
    exchanges.set(req, ex);
    prepareHeaders(req, conn, settings, false);
    const connAgent = conn.agentFor(settings, () => current.timeouts.backend_connect);
    // toProxy: http-proxy sends req.url as the backend path instead of url.parse(req.url).path. For a plain
    // origin-form target both are the same string, and the parse costs ~15-20 µs a request here (node checks the
    // caller's stack for its url.parse deprecation warning on every call made from node_modules).
    const toProxy = isPlainOriginForm(req.url);
    proxy.web(req, res, { target: targetOf(settings.backend), agent: connAgent ?? agent, toProxy }, (err, r, t) => onProxyError(err, r, t));
  };

  const onUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const conn = byApp.get(socket);
    if (!conn || conn.closed) {
      socket.destroy();
      return;
    }
    const settings = current;
    const started = Date.now();
    conn.requests++;
    conn.upgraded = true;
    conn.record.lastActivity = started;
    socket.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error'));
    const refuse = (status: number, body: string, headers: Record<string, string | number> = {}, reason?: CloseReason) => {
      if (reason) conn.noteReason(reason);
      conn.log.debug({ method: req.method, path: logPath(req.url), status, durationMs: 0 }, 'request');
      socket.end(rawResponse(status, body, headers), () => socket.destroy());
    };
    const verdict = conn.verdict;
    if (verdict.action === 'deny') return refuse(403, 'Forbidden\n');
    if (verdict.action === 'tempfail') return refuse(429, 'Too Many Requests\n', { 'Retry-After': retryAfterSeconds(verdict.retryAfterMs) });
    if (conn.draining) return refuse(503, 'Service Unavailable: shutting down\n', {}, 'shutdown');
    if (!tls && settings.redirect_https) {
      const location = httpsRedirectLocation(req.headers.host, req.url, deps.hostname);
      return refuse(301, `Moved to ${location}\n`, { Location: location });
    }

    const ex = exchangeFor(conn, settings);
    exchanges.set(req, ex);
    prepareHeaders(req, conn, settings, true);
    socket.once('close', () => {
      conn.log.debug({ method: req.method, path: logPath(req.url), status: ex.status, durationMs: Date.now() - started }, 'request');
    });
    const connAgent = conn.agentFor(settings, () => current.timeouts.backend_connect);
    proxy.ws(req, socket, head, { target: targetOf(settings.backend), agent: connAgent ?? agent }, (err, r, t) => onProxyError(err, r, t));
    // The proxy clears the client socket's timeout; a WebSocket is bounded by postauth_idle like any relayed session.
    if (socket instanceof Socket) {
      socket.setTimeout(settings.timeouts.postauth_idle);
      socket.on('timeout', () => conn.close('idle-timeout'));
    }
  };

  const exchangeFor = (conn: HttpConnection, settings: HttpListener): Exchange => {
    const backend = formatHostPort(settings.backend);
    conn.record.backend = backend;
    return { conn, settings, backend, settled: false, answered: false, status: 0 };
  };

  const prepareHeaders = (req: IncomingMessage, conn: HttpConnection, settings: HttpListener, upgrade: boolean) => {
    stripHopByHop(req.headers, upgrade);
    applyForwardedHeaders(req.headers, {
      clientIp: conn.record.clientIp,
      proto: tls ? 'https' : 'http',
      localPort: conn.localPort,
      trust: settings.trust_forwarded,
    });
  };

  // ---- connections ------------------------------------------------------------------

  const onConnection = (tcp: Socket) => {
    if (closing) {
      tcp.destroy();
      return;
    }
    if (deps.registry.countFor(name) >= current.limits.max_connections) {
      const ip = normalizeIp(tcp.remoteAddress);
      log.warn({ client: ip }, 'connection limit reached, dropping');
      deps.registry.refused(name, ip, 'max_connections');
      tcp.destroy();
      return;
    }
    const conn = new HttpConnection(tcp, current, deps.registry.nextId(), {
      registry: deps.registry,
      policy: deps.policy(),
      log,
      listenerClosing: () => closing,
      onClosed: (c) => {
        conns.delete(c);
        if (closing && conns.size === 0) agent.destroy();
      },
    });
    tcp.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error'));
    conns.add(conn);
    byTcp.set(tcp, conn);
    conn.start();
    if (!tls) {
      byApp.set(tcp, conn);
      tcp.setTimeout(current.timeouts.preauth_idle);
    }
  };

  const onSecureConnection = (socket: TLSSocket) => {
    const conn = connOfTls(socket);
    if (!conn) {
      socket.destroy();
      return;
    }
    byApp.set(socket, conn);
    conn.secured(socket);
    if (socket.alpnProtocol === ACME_TLS_ALPN) {
      // A TLS-ALPN-01 validation: the handshake was the whole exchange (RFC 8737 §3), no HTTP follows.
      conn.log.info('ACME TLS-ALPN-01 validation handshake');
      conn.end('client-closed');
      return;
    }
    // No request yet: the pre-auth bound, until the first request switches to postauth_idle.
    socket.setTimeout(current.timeouts.preauth_idle);
  };

  /** node:https keeps the accepted TCP socket as the TLSSocket's `_parent`; failing that, the four-tuple finds it. */
  const connOfTls = (socket: TLSSocket): HttpConnection | undefined => {
    const parent = (socket as unknown as { _parent?: unknown })._parent;
    if (parent instanceof Socket) {
      const c = byTcp.get(parent);
      if (c) return c;
    }
    if (socket.remotePort === undefined) return undefined;
    for (const c of conns) {
      if (c.tcp.remotePort === socket.remotePort && c.tcp.remoteAddress === socket.remoteAddress && c.tcp.localPort === socket.localPort) return c;
    }
    return undefined;
  };

  const onTlsClientError = (err: Error, socket: TLSSocket) => {
    const conn = connOfTls(socket);
    const code = errorCode(err);
    if (conn) {
      conn.log.debug({ err: errorMessage(err), code }, 'TLS handshake failed');
      conn.close(code === 'ERR_TLS_HANDSHAKE_TIMEOUT' ? 'tls-handshake-timeout' : 'tls-handshake-failed');
    }
    socket.destroy();
  };

  /** A request head node:http could not accept; answered as node would, with the reason recorded. */
  const onClientError = (err: Error & { code?: string }, socket: Duplex) => {
    const conn = byApp.get(socket);
    const code = errorCode(err);
    let reason: CloseReason = 'protocol-error';
    let status = 400;
    if (code === 'HPE_HEADER_OVERFLOW') {
      reason = 'line-too-long';
      status = 431;
    } else if (code === 'ERR_HTTP_REQUEST_TIMEOUT') {
      reason = 'idle-timeout';
      status = 408;
    } else if (code === 'ECONNRESET' || code === 'EPIPE') {
      reason = 'client-closed';
      status = 0;
    }
    if (status !== 0) conn?.log.debug({ err: errorMessage(err), code }, 'bad request from client');
    if (!conn) {
      socket.destroy();
      return;
    }
    if (status === 0 || conn.busy || !socket.writable) {
      conn.close(reason);
      return;
    }
    conn.noteReason(reason);
    socket.end(rawResponse(status, `${status === 431 ? 'Request Header Fields Too Large' : status === 408 ? 'Request Timeout' : 'Bad Request'}\n`), () => conn.close(reason));
  };

  /** Idle on the client side (node:http reports it here; answering it means node leaves the socket to us). */
  const onTimeout = (socket: Duplex) => {
    const conn = byApp.get(socket);
    if (!conn) {
      socket.destroy();
      return;
    }
    // Waiting on the backend is bounded by the backend timer, which answers 504 rather than cutting the client off.
    if (conn.backendWaits > 0) return;
    conn.close('idle-timeout');
  };

  // ---- servers ------------------------------------------------------------------------

  const servers: (HttpServer | HttpsServer)[] = [];
  const addresses: string[] = [];
  const create = (): HttpServer | HttpsServer => {
    const t = listener.timeouts;
    const common: HttpServerOptions = {
      maxHeaderSize: MAX_HEADER_BYTES,
      requireHostHeader: true,
      noDelay: true,
      connectionsCheckingInterval: CONNECTION_CHECK_MS,
      // Other upgrades (h2c) are served as plain HTTP/1.1 requests, their Upgrade header stripped.
      shouldUpgradeCallback: (req) => isWebSocketUpgrade(req.method, req.headers),
      ...serverTimeouts(listener),
    };
    let server: HttpServer | HttpsServer;
    if (tls) {
      const options: HttpsServerOptions = {
        ...common,
        ...secureContextOptions(deps.minVersion),
        SNICallback: deps.certs.sniCallback,
        ALPNCallback: alpnSelector('http'),
        handshakeTimeout: t.tls_handshake,
      };
      const s = createHttpsServer(options);
      useStoreDefaultForNoSni(s, deps.certs);
      s.on('secureConnection', onSecureConnection);
      s.on('tlsClientError', onTlsClientError);
      server = s;
    } else {
      server = createHttpServer(common);
    }
    applyServerBounds(server, listener);
    server.on('connection', onConnection);
    server.on('request', onRequest);
    server.on('upgrade', onUpgrade);
    server.on('clientError', onClientError);
    server.on('timeout', onTimeout);
    server.on('drop', (data?: { remoteAddress?: string }) => {
      const ip = normalizeIp(data?.remoteAddress);
      log.warn({ client: ip }, 'connection limit reached, dropping');
      deps.registry.refused(name, ip, 'max_connections');
    });
    return server;
  };

  try {
    for (const addr of listener.listen) {
      const server = create();
      servers.push(server);
      addresses.push(await listenOn(server, addr, name, deps.sharedPorts === true));
      server.on('error', (err) => log.error({ err: errorMessage(err), code: errorCode(err) }, 'listener error'));
    }
  } catch (err) {
    // Undo a partial start, newest first, before the error goes up.
    closing = true;
    await Promise.all(servers.map(closeServer));
    agent.destroy();
    throw err;
  }
  log.info({ protocol: 'http', tls: listener.tls, addresses, backend: formatHostPort(listener.backend), redirect: listener.redirect_https }, 'listener up');

  return {
    name,
    addresses,
    update(next: Listener) {
      if (next.protocol !== 'http' || next.name !== name) {
        log.error({ protocol: next.protocol, name: next.name }, 'update ignored: not this HTTP listener');
        return;
      }
      if (next.tls !== listener.tls) log.warn({ tls: next.tls }, 'tls mode changes need a restart of the listener; keeping the old one');
      current = { ...next, tls: listener.tls };
      for (const server of servers) applyServerBounds(server, current);
    },
    setChallengeResponder(responder) {
      challenge = responder;
    },
    close() {
      closed ??= (async () => {
        closing = true;
        // node:http also ends keep-alive connections that are idle right now; they end for 'shutdown'.
        await Promise.all(servers.map(closeServer));
        if (conns.size === 0) agent.destroy();
        log.info({ addresses }, 'listener closed');
      })();
      return closed;
    },
  };
}

function serverTimeouts(l: HttpListener): Pick<HttpServerOptions, 'headersTimeout' | 'requestTimeout' | 'keepAliveTimeout'> {
  const t = l.timeouts;
  return {
    headersTimeout: t.preauth_idle,
    // node requires requestTimeout >= headersTimeout; it bounds receiving a whole request, body included.
    requestTimeout: Math.max(t.preauth_idle, t.postauth_idle),
    keepAliveTimeout: t.preauth_idle,
  };
}

/** The bounds that can change on a live server (a reload): they apply to connections and requests from then on. */
function applyServerBounds(server: HttpServer | HttpsServer, l: HttpListener): void {
  const t = serverTimeouts(l);
  server.maxConnections = l.limits.max_connections;
  server.headersTimeout = t.headersTimeout ?? l.timeouts.preauth_idle;
  server.requestTimeout = t.requestTimeout ?? l.timeouts.postauth_idle;
  server.keepAliveTimeout = t.keepAliveTimeout ?? l.timeouts.preauth_idle;
  // Inactivity while a request is in progress; node re-applies it at each new request on a kept-alive connection.
  server.timeout = l.timeouts.postauth_idle;
}

/**
 * A client that sends no SNI (a URL with an IP address) is served from the
 * server's shared context, which node:https builds from PEM options we do not
 * hold. Before each handshake it is pointed at the store's current default,
 * so such clients get the default certificate (and its renewals). This uses
 * node's internal `_sharedCreds`; should that ever disappear, only SNI-less
 * clients are affected, and the listener logs nothing worse than failed
 * handshakes.
 */
function useStoreDefaultForNoSni(server: HttpsServer, certs: CertStore): void {
  const s = server as unknown as { _sharedCreds?: unknown };
  if (!('_sharedCreds' in s)) return;
  server.prependListener('connection', () => {
    const ctx = certs.contextFor(undefined);
    if (ctx) s._sharedCreds = ctx;
  });
}

function retryAfterSeconds(ms: number | undefined): number {
  return Math.max(1, Math.ceil((ms ?? 60_000) / 1000));
}

