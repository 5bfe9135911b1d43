/**
 * HTTP/2 to clients (ALPN h2 on a TLS listener); the backend stays
 * HTTP/1.1. Each stream is routed like an HTTP/1.1 request (router.ts) and,
 * when proxied, goes through the proxy library (library-path.ts).
 *
 * Limits and defences, on top of nghttp2's own checks (malformed fields,
 * connection-specific fields, content-length against DATA):
 *   - concurrent streams per connection: `http2_max_streams`;
 *   - header list: 16 KiB and 200 fields, like an HTTP/1.1 head;
 *   - rapid reset (CVE-2023-44487): at most a burst of RESET_BURST stream
 *     resets, then RESET_RATE per second, else GOAWAY and close;
 *   - CONTINUATION floods (CVE-2024-27983): nghttp2 refuses more than 8
 *     CONTINUATION frames for one header block; with the header list bound,
 *     a flood ends the connection;
 *   - invalid frames, refused streams, settings and pings: bounded counts;
 *   - session memory: bounded (nghttp2 answers ENHANCE_YOUR_CALM past it).
 */
import { constants, createServer, type Http2Server, type Http2ServerRequest, type Http2ServerResponse, type ServerHttp2Session } from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { errorCode, errorMessage } from '../core/errors.ts';
import type { HttpConnection } from './connection.ts';
import { headerBytes } from './headers.ts';
import { MAX_HEAD_BYTES, MAX_HEADERS } from './head-parser.ts';
import type { LibraryPath } from './library-path.ts';
import type { LocalAnswer, Router } from './router.ts';

/** Stream resets a client may send at once, then per second (nghttp2's defaults are 1000 and 33). */
export const RESET_BURST = 200;
export const RESET_RATE = 50;

export interface H2Deps {
  router: Router;
  library: LibraryPath;
  maxStreams: number;
}

export class H2Front {
  private readonly deps: H2Deps;
  private readonly server: Http2Server;
  private readonly sessions = new WeakMap<ServerHttp2Session, HttpConnection>();
  /** The connection whose socket is being handed to the server (its 'session' event follows at once). */
  private arriving: HttpConnection | undefined;

  constructor(deps: H2Deps) {
    this.deps = deps;
    // Never listens: sockets come from the listener after a TLS handshake that chose h2.
    this.server = createServer({
      settings: { maxConcurrentStreams: deps.maxStreams, maxHeaderListSize: MAX_HEAD_BYTES, enablePush: false },
      maxHeaderListPairs: MAX_HEADERS,
      maxSessionInvalidFrames: 100,
      maxSessionRejectedStreams: 100,
      maxSettings: 32,
      maxOutstandingPings: 10,
      maxSessionMemory: 10,
      streamResetBurst: RESET_BURST,
      streamResetRate: RESET_RATE,
    });
    this.server.on('session', (session: ServerHttp2Session) => {
      const conn = this.arriving;
      this.arriving = undefined;
      if (!conn) {
        session.destroy();
        return;
      }
      this.sessions.set(session, conn);
      this.attach(conn, session);
    });
    this.server.on('request', (req: Http2ServerRequest, res: Http2ServerResponse) => this.onRequest(req, res));
  }

  /** Serves HTTP/2 on a TLS socket whose handshake selected h2. */
  serve(conn: HttpConnection, socket: TLSSocket): void {
    this.arriving = conn;
    this.server.emit('connection', socket);
    // node:http2 starts a server session on a TLS socket at its 'secureConnect' event when the socket still says
    // it is connecting. Only sockets node's own tls.Server made stop saying so; one made with new TLSSocket (the
    // listener's, so that the connection is registered and policed before its handshake) never does, and the
    // session would wait forever. The handshake is over here: the documented event tells the session so.
    // The HTTP/2 tests (tests/e2e/http-front.test.ts, the unit tests that run curl --http2) fail should node change this.
    socket.emit('secureConnect');
    if (this.arriving === conn) {
      // No session was made (node refused the socket): nothing can run on it.
      this.arriving = undefined;
      conn.close('protocol-error');
    }
  }

  private attach(conn: HttpConnection, session: ServerHttp2Session): void {
    const s = conn.settings;
    let active = 0;
    let quiet = 0;
    session.on('stream', (stream) => {
      active++;
      quiet = 0;
      stream.once('close', () => active--);
    });
    session.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'HTTP/2 session error'));
    session.on('goaway', (code: number) => {
      if (code !== constants.NGHTTP2_NO_ERROR) conn.log.debug({ code }, 'HTTP/2 GOAWAY from the client');
    });
    session.on('frameError', (type: number, code: number) => conn.log.debug({ type, code }, 'HTTP/2 frame error'));
    session.once('close', () => {
      if (!conn.closed) conn.close(conn.draining ? 'shutdown' : conn.reasonOr('client-closed'), '');
    });
    // Idle without streams: preauth_idle, as between HTTP/1.1 requests. Streams waiting on the backend are bounded
    // by its response deadline; a connection quiet for postauth_idle altogether ends whatever it holds.
    session.on('timeout', () => {
      quiet += s.timeouts.preauth_idle;
      if (conn.closed) return;
      if (active > 0 && quiet < s.timeouts.postauth_idle) {
        // A fired session timer waits for activity to start again; with streams stalled there is none, so re-arm.
        session.setTimeout(s.timeouts.preauth_idle);
        return;
      }
      conn.close('idle-timeout');
    });
    session.setTimeout(s.timeouts.preauth_idle);
    conn.attach({
      drain: () => session.close(),
      teardown: () => {
        if (!session.destroyed) session.destroy();
      },
    });
  }

  private onRequest(req: Http2ServerRequest, res: Http2ServerResponse): void {
    const conn = this.sessions.get(req.stream.session as ServerHttp2Session);
    if (!conn || conn.closed) {
      req.stream.close(constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    conn.requestStarted();
    const size = headerBytes(req.rawHeaders);
    conn.countIn(size);
    res.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'HTTP/2 stream error'));
    // nghttp2 takes header lists past the size the gateway advertised; the same bound as an HTTP/1.1 head holds here.
    if (size > MAX_HEAD_BYTES) {
      conn.log.debug({ size }, 'bad request from client');
      this.answer(conn, req, res, { status: 431, body: 'Request Header Fields Too Large\n', close: 'line-too-long' });
      return;
    }
    const method = req.method;
    const target = req.url;
    const host = req.authority || (typeof req.headers.host === 'string' ? req.headers.host : undefined);
    // CONNECT (and its extended form) makes the gateway a tunnel: never. A stream without :authority has no host to forward.
    if (method === 'CONNECT' || !host || !(target.startsWith('/') || (target === '*' && method === 'OPTIONS'))) {
      this.answer(conn, req, res, { status: 400, body: 'Bad Request\n' });
      return;
    }
    const route = this.deps.router.route({ method, target, host }, conn);
    if (route.kind === 'answer') {
      this.answer(conn, req, res, route.answer);
      return;
    }
    if (route.kind === 'read') {
      this.readLocal(conn, req, res, route.limit, route.respond);
      return;
    }
    this.deps.library.web(conn, req, res);
  }

  /** A well-known endpoint that needs the body: read it (at most `limit` bytes, else 413), then answer. */
  private readLocal(conn: HttpConnection, req: Http2ServerRequest, res: Http2ServerResponse, limit: number, respond: (body: Buffer) => LocalAnswer): void {
    const declared = Number(req.headers['content-length'] ?? 0);
    const tooLarge = () => this.answer(conn, req, res, { status: 413, body: 'Content Too Large\n' });
    if (!Number.isSafeInteger(declared) || declared > limit) {
      tooLarge();
      return;
    }
    const parts: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      if (over) return;
      size += chunk.length;
      conn.countIn(chunk.length);
      if (size > limit) {
        over = true;
        tooLarge();
        return;
      }
      parts.push(chunk);
    });
    req.on('end', () => {
      if (over || conn.closed) return;
      let a: LocalAnswer;
      try {
        a = respond(Buffer.concat(parts));
      } catch (err) {
        conn.log.error({ err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'a well-known endpoint failed');
        a = { status: 500, body: 'Internal Server Error\n' };
      }
      this.answer(conn, req, res, a);
    });
  }

  private answer(conn: HttpConnection, req: Http2ServerRequest, res: Http2ServerResponse, a: LocalAnswer): void {
    const s = conn.settings;
    const length = Buffer.byteLength(a.body);
    const headers: Record<string, string | number> = { 'content-type': a.contentType ?? 'text/plain; charset=utf-8', 'cache-control': 'no-store', 'content-length': length };
    for (const [k, v] of Object.entries(a.headers ?? {})) headers[k.toLowerCase()] = v;
    if (conn.tls && s.hsts > 0) headers['strict-transport-security'] = `max-age=${s.hsts}`;
    res.writeHead(a.status, headers);
    if (req.method === 'HEAD') res.end();
    else res.end(a.body);
    conn.countOut(length);
    conn.log.debug({ method: req.method, status: a.status }, 'request');
    if (a.close) {
      conn.noteReason(a.close);
      // GOAWAY: the streams in progress finish, no new ones start, then the connection ends.
      req.stream.session?.close();
    }
  }
}
