/**
 * What the fast path does not take goes through the proxy library,
 * `http-proxy-3` (http-proxy's maintained successor, same API):
 *
 *   - WebSocket handshakes from HTTP/1.1 clients: the fast path hands over
 *     the socket with the handshake it parsed (as an IncomingMessage);
 *   - HTTP/2 streams (h2.ts): the compatibility API's request and response
 *     objects, proxied to the HTTP/1.1 backend.
 *
 * One error path for both: 502 when the backend is down, 504 when it misses
 * the response deadline (response_timeout, postauth_idle when shorter).
 */
import { IncomingMessage, type ClientRequest, type IncomingHttpHeaders, type ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { ProxyServer } from 'http-proxy-3';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { formatHostPort, normalizeIp, type HostPort } from '../net/address.ts';
import { proxyHeader } from '../net/proxy-protocol.ts';
import { BackendAgent } from './backend-agent.ts';
import type { HttpConnection } from './connection.ts';
import type { RequestHead } from './head-parser.ts';
import { applyForwardedHeaders, headerBytes, logPath, stripHopByHop } from './headers.ts';
import { rawResponse, sendText } from './responses.ts';

/** Connections per backend from the shared agent, and how many idle ones it keeps. */
const BACKEND_MAX_SOCKETS = 256;
const BACKEND_MAX_FREE_SOCKETS = 256;
/** Fields an HTTP/2 response must not carry (RFC 9113 §8.2.2); the backend's HTTP/1.1 ones are dropped. */
const H2_FORBIDDEN = ['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te'];

type AnyRequest = IncomingMessage | Http2ServerRequest;
type AnyResponse = ServerResponse | Http2ServerResponse;

/** What one proxied request (or WebSocket handshake) needs in the proxy's event handlers. */
interface Exchange {
  conn: HttpConnection;
  backend: string;
  /** The error path ran (or the response was cut): later errors only make sure the client is gone. */
  settled: boolean;
  /** WebSocket: the backend answered (101 or otherwise) and the proxy is piping it to the client. */
  answered: boolean;
  status: number;
  started: number;
}

export interface LibraryPathDeps {
  log: Logger;
  /** Host for an HTTP/1.0 handshake without one. */
  hostname: string;
}

export class LibraryPath {
  private readonly deps: LibraryPathDeps;
  private readonly proxy: ProxyServer;
  private readonly agents = new Map<string, BackendAgent>();
  private readonly privateAgents = new WeakMap<HttpConnection, BackendAgent>();
  private readonly exchanges = new WeakMap<object, Exchange>();

  constructor(deps: LibraryPathDeps) {
    this.deps = deps;
    this.proxy = new ProxyServer({ xfwd: false, changeOrigin: false, ws: true });
    this.proxy.on('proxyReq', (proxyReq, req, res) => this.onProxyReq(proxyReq, req, res));
    this.proxy.on('proxyReqWs', (proxyReq, req, socket) => this.onProxyReqWs(proxyReq, req, socket));
    this.proxy.on('proxyRes', (proxyRes, req, res) => this.onProxyRes(proxyRes, req, res));
    this.proxy.on('error', (err, req, target) => this.onError(err, req, target));
  }

  /**
   * A WebSocket handshake the fast path read and checked: the proxy library
   * gets it as an IncomingMessage built from that head, and `rest` (bytes the
   * client sent after it) as the upgrade's head bytes.
   */
  handoff(conn: HttpConnection, socket: Socket, head: RequestHead, rest: Buffer): void {
    conn.attach({
      // A WebSocket runs until either side ends it, or the drain deadline.
      drain: () => undefined,
      teardown: () => this.privateAgents.get(conn)?.destroy(),
    });
    const req = new IncomingMessage(socket);
    req.method = head.method;
    req.url = head.target;
    req.httpVersion = `1.${head.minor}`;
    req.httpVersionMajor = 1;
    req.httpVersionMinor = head.minor;
    req.headers = headersOf(head);
    this.onUpgrade(conn, req, socket, rest);
  }

  /** A request (an HTTP/2 stream, or a plain request on a handed-over socket) proxied by the library. */
  web(conn: HttpConnection, req: AnyRequest, res: AnyResponse): void {
    const s = conn.settings;
    const ex = this.exchangeFor(conn, req);
    this.prepare(conn, req.headers, false);
    res.once('close', () => {
      if (conn.log.isLevelEnabled('debug')) conn.log.debug({ method: req.method, path: logPath(req.url), status: ex.status || res.statusCode, durationMs: Date.now() - ex.started }, 'request');
    });
    this.proxy.web(req as IncomingMessage, res as ServerResponse, { target: target(s.backend), agent: this.agentFor(conn), toProxy: true }, (err, r, t) => this.onError(err, r, t));
    // Counted once the proxy piped the body on (a 'data' listener before that would start the flow).
    req.on('data', (chunk: Buffer) => conn.countIn(chunk.length));
  }

  private onUpgrade(conn: HttpConnection, req: IncomingMessage, socket: Socket, head: Buffer): void {
    const s = conn.settings;
    const ex = this.exchangeFor(conn, req);
    this.prepare(conn, req.headers, true);
    socket.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error'));
    socket.once('close', () => conn.log.debug({ method: req.method, path: logPath(req.url), status: ex.status, durationMs: Date.now() - ex.started }, 'request'));
    this.proxy.ws(req, socket, head, { target: target(s.backend), agent: this.agentFor(conn), toProxy: true }, (err, r, t) => this.onError(err, r, t));
    // The proxy clears the client socket's timeout; a WebSocket is bounded by postauth_idle like any relayed session.
    socket.setTimeout(s.timeouts.postauth_idle);
    socket.on('timeout', () => conn.close('idle-timeout'));
  }

  private exchangeFor(conn: HttpConnection, req: AnyRequest): Exchange {
    const backend = formatHostPort(conn.settings.backend);
    conn.record.backend = backend;
    const ex: Exchange = { conn, backend, settled: false, answered: false, status: 0, started: Date.now() };
    this.exchanges.set(req, ex);
    return ex;
  }

  private prepare(conn: HttpConnection, headers: AnyRequest['headers'], upgrade: boolean): void {
    const h = headers as IncomingMessage['headers'];
    const authority = (headers as Record<string, string | string[] | undefined>)[':authority'];
    if (h.host === undefined) h.host = typeof authority === 'string' ? authority : this.deps.hostname;
    stripHopByHop(h, upgrade);
    applyForwardedHeaders(h, { clientIp: conn.record.clientIp, proto: conn.tls ? 'https' : 'http', localPort: conn.localPort, trust: conn.trustForwarded });
  }

  /**
   * The shared keep-alive agent per backend; with the PROXY protocol, one
   * private to the connection (the header names one client).
   */
  private agentFor(conn: HttpConnection): BackendAgent {
    const s = conn.settings;
    if (s.proxy_protocol !== false) {
      let a = this.privateAgents.get(conn);
      if (!a) {
        a = new BackendAgent({
          connectTimeoutMs: () => s.timeouts.backend_connect,
          maxSockets: 8,
          maxFreeSockets: 2,
          prelude: proxyHeader(s.proxy_protocol, {
            clientIp: conn.record.clientIp,
            clientPort: conn.record.clientPort,
            localIp: conn.localIp,
            localPort: conn.localPort,
          }),
        });
        this.privateAgents.set(conn, a);
      }
      return a;
    }
    const key = formatHostPort(s.backend);
    let a = this.agents.get(key);
    if (!a) {
      a = new BackendAgent({ connectTimeoutMs: () => s.timeouts.backend_connect, maxSockets: BACKEND_MAX_SOCKETS, maxFreeSockets: BACKEND_MAX_FREE_SOCKETS });
      this.agents.set(key, a);
    }
    return a;
  }

  // ---- the proxy's hooks ------------------------------------------------------

  /** The wait for the backend's answer: response_timeout, or postauth_idle when shorter; then 504. */
  private armResponseTimer(proxyReq: ClientRequest, ex: Exchange): void {
    const s = ex.conn.settings;
    const ms = Math.min(s.response_timeout, s.timeouts.postauth_idle);
    const timer = setTimeout(() => proxyReq.destroy(new MailgateError('BACKEND_TIMEOUT', `backend ${ex.backend} sent no response head within ${ms} ms`)), ms);
    const done = () => clearTimeout(timer);
    proxyReq.once('response', done);
    proxyReq.once('upgrade', done);
    proxyReq.once('close', done);
  }

  private onProxyReq(proxyReq: ClientRequest, req: AnyRequest, _res: AnyResponse): void {
    const ex = this.exchanges.get(req);
    if (ex) this.armResponseTimer(proxyReq, ex);
  }

  private onProxyReqWs(proxyReq: ClientRequest, req: AnyRequest, socket: Duplex): void {
    const ex = this.exchanges.get(req);
    if (!ex) return;
    this.armResponseTimer(proxyReq, ex);
    proxyReq.once('response', (res) => {
      ex.answered = true;
      ex.status = res.statusCode ?? 502;
    });
    proxyReq.once('upgrade', (res, backendSocket) => {
      ex.answered = true;
      ex.status = res.statusCode ?? 101;
      socket.on('data', (chunk: Buffer) => ex.conn.countIn(chunk.length));
      backendSocket.on('data', (chunk: Buffer) => ex.conn.countOut(chunk.length));
      // The proxy pipes both ways; the two lifetimes are tied together here, errors included.
      socket.once('close', () => backendSocket.destroy());
      backendSocket.once('close', () => socket.destroy());
    });
  }

  private onProxyRes(proxyRes: IncomingMessage, req: AnyRequest, res: AnyResponse): void {
    const ex = this.exchanges.get(req);
    if (!ex) return;
    ex.status = proxyRes.statusCode ?? 0;
    const s = ex.conn.settings;
    if (req.httpVersionMajor >= 2) {
      for (const name of H2_FORBIDDEN) delete proxyRes.headers[name];
      ex.conn.countOut(headerBytes(proxyRes.rawHeaders));
    }
    if (ex.conn.tls && s.hsts > 0 && proxyRes.headers['strict-transport-security'] === undefined) proxyRes.headers['strict-transport-security'] = `max-age=${s.hsts}`;
    proxyRes.on('data', (chunk: Buffer) => ex.conn.countOut(chunk.length));
    proxyRes.once('close', () => {
      if (proxyRes.complete || ex.settled) return;
      // The backend went away (or timed out) mid-body: cut the client too, it must not take this for a whole response.
      ex.settled = true;
      ex.conn.log.warn({ backend: ex.backend }, 'backend response cut short');
      if ('stream' in res) res.stream.close(0x2);
      else res.destroy();
    });
  }

  /** The one error path, web and WebSocket alike; reached at most once per exchange with effect. */
  private onError(err: Error, req: AnyRequest, target: AnyResponse | Duplex | Socket): void {
    const ex = this.exchanges.get(req);
    const isResponse = 'setHeader' in target;
    if (!ex || ex.settled) {
      if (!isResponse) target.destroy();
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
    if (isResponse) {
      if (clientGone) target.destroy();
      else sendText(target, status, body);
      return;
    }
    if (ex.answered || clientGone || !target.writable) {
      target.destroy();
      return;
    }
    ex.conn.close(timeout ? 'backend-timeout' : 'backend-unavailable', rawResponse(status, body));
  }

  /** The listener closed and its last connection ended: idle backend connections go. */
  close(): void {
    for (const a of this.agents.values()) a.destroy();
    this.agents.clear();
  }
}

function target(b: HostPort): { protocol: string; host: string; port: number } {
  return { protocol: 'http:', host: b.host, port: b.port };
}

/** A parsed head's fields as node:http would present them: lower-case names, repeats joined (set-cookie kept apart). */
function headersOf(head: RequestHead): IncomingHttpHeaders {
  const out: Record<string, string | string[]> = {};
  for (const f of head.fields) {
    const prev = out[f.name];
    if (prev === undefined) out[f.name] = f.name === 'set-cookie' ? [f.value] : f.value;
    else if (Array.isArray(prev)) prev.push(f.value);
    else out[f.name] = f.name === 'cookie' ? `${prev}; ${f.value}` : `${prev}, ${f.value}`;
  }
  return out;
}
