/**
 * The fast path: plain HTTP/1.x requests spliced to the backend with their
 * heads rewritten. Per client connection, one keep-alive backend connection
 * is pinned and reused.
 *
 * Requests: the head is parsed strictly (head-parser.ts; anything ambiguous is
 * answered 400 and the connection closed), routed (router.ts), rewritten
 * (X-Forwarded-*, hop-by-hop and spoofable fields dropped) and written to the
 * backend; the body follows its framing (Content-Length, or chunked read
 * strictly) as bytes, with backpressure both ways.
 *
 * Responses: only the head and the framing are read (HSTS added, hop-by-hop
 * fields dropped, Connection: close when the connection ends after it); the
 * body moves as bytes.
 *
 * One exchange at a time: a pipelined request is read only once the response
 * before it is complete, so our own answers (400, 403, 429, 502, 504) always
 * come in order, and the backend never sees a request behind one that was
 * refused. What arrives meanwhile waits in a bounded buffer (the client is
 * paused beyond it).
 *
 * Deadlines: preauth_idle for a request head (from the end of the previous
 * exchange, or the connection's start); postauth_idle for silence while a
 * request body or a response body moves; min(response_timeout,
 * postauth_idle) for the backend to begin its response (then 504).
 */
import type { Socket } from 'node:net';
import { errorCode, errorMessage, MailgateError } from '../core/errors.ts';
import { formatHostPort, normalizeIp } from '../net/address.ts';
import { proxyHeader } from '../net/proxy-protocol.ts';
import type { CloseReason } from '../protocols/types.ts';
import { connectBackend } from './backend-socket.ts';
import type { ConnectionHandler, HttpConnection } from './connection.ts';
import { checkRequestLine, ChunkedReader, findHeadEnd, HeadError, MAX_HEAD_BYTES, MAX_RESPONSE_HEAD_BYTES, parseRequestHead, parseResponseHead, skipLeadingCrlf, type RequestHead } from './head-parser.ts';
import { clientResponseHead, forwardedRequestHead, logPath } from './headers.ts';
import { rawAnswer } from './responses.ts';
import type { LocalAnswer, Router } from './router.ts';

/** Client bytes buffered while a response is outstanding, before the client is paused. */
const MAX_PENDING = 2 * MAX_HEAD_BYTES;
/** Response bytes queued towards a client before the backend is paused (its reads are 64 KiB at most). */
const MAX_CLIENT_BUFFER = 128 * 1024;

export interface FastPathDeps {
  router: Router;
  /** Host for HTTP/1.0 requests without one. */
  hostname: string;
  /** Hands a WebSocket handshake (its parsed head, and the bytes after it) to the proxy library. */
  handoff: (conn: HttpConnection, socket: Socket, head: RequestHead, rest: Buffer) => void;
}

type Phase = 'head' | 'body' | 'waiting' | 'gone';
type ResponseMode = 'none' | 'length' | 'chunked' | 'close';

interface Exchange {
  method: string;
  target: string;
  started: number;
  /** The rewritten head, kept to send again on a fresh connection when a reused one turned out dead. */
  wire: string;
  /** No body: safe to send again. */
  retryable: boolean;
  retried: boolean;
  bodyDone: boolean;
  /** The client asked to close (or is HTTP/1.0 without keep-alive), or the gateway is draining. */
  closeClient: boolean;
  /** Sent on a backend connection that had served a request before. */
  reused: boolean;
  status: number;
  /** The final response head arrived. */
  headDone: boolean;
  /** Bytes of this response written to the client. */
  sent: number;
  mode: ResponseMode;
  remaining: number;
  chunks: ChunkedReader | undefined;
  /** The backend connection may serve the next request. */
  reusable: boolean;
  responseTimer: NodeJS.Timeout | undefined;
  /** The client's response head, held back to go out with the first body bytes. */
  head: string | null;
}

export class FastPath implements ConnectionHandler {
  private readonly conn: HttpConnection;
  private readonly client: Socket;
  private readonly deps: FastPathDeps;
  private readonly hsts: string | undefined;
  private phase: Phase = 'head';
  /** Client bytes not yet handled (a head in the making, or what came after a request). */
  private pending: Buffer | null = null;
  /** How far `pending` was scanned for a head end. */
  private scanned = 0;
  private ex: Exchange | undefined;
  /** The request body being passed on (or discarded, after a local answer). */
  private bodyLeft = 0;
  private bodyChunks: ChunkedReader | undefined;
  private bodyTo: Socket | null = null;
  /** A body read for the gateway's own answer (a well-known endpoint that takes a POST): what arrived, and who answers. */
  private collect: { head: RequestHead; respond: (body: Buffer) => LocalAnswer; parts: Buffer[] } | undefined;
  private backend: Socket | undefined;
  private backendUsed = false;
  private backendError: Error | undefined;
  private readonly backendName: string;
  /** Client-side deadline: the head (preauth_idle) or silence mid-body (postauth_idle). */
  private timer: NodeJS.Timeout | undefined;
  private timerReason: 'head' | 'body' = 'head';
  private pausedForBackend = false;
  /** Stopped reading the client until it reads our own answers (pipelined requests answered locally). */
  private pausedForClient = false;

  constructor(conn: HttpConnection, client: Socket, deps: FastPathDeps) {
    this.conn = conn;
    this.client = client;
    this.deps = deps;
    const s = conn.settings;
    this.hsts = conn.tls && s.hsts > 0 ? `max-age=${s.hsts}` : undefined;
    this.backendName = formatHostPort(s.backend);
    client.on('data', this.onClientData);
    client.on('end', this.onClientEnd);
    client.on('drain', this.onClientDrain);
    client.on('error', this.onClientError);
    this.armHeadTimer();
  }

  // ---- client side ------------------------------------------------------------

  private readonly onClientData = (chunk: Buffer): void => {
    if (this.phase === 'gone') return;
    this.conn.countIn(chunk.length);
    if (this.phase === 'body') {
      this.timer?.refresh();
      this.body(chunk);
      return;
    }
    this.pending = this.pending === null ? chunk : Buffer.concat([this.pending, chunk]);
    if (this.phase === 'head') this.heads();
    else if (this.pending.length > MAX_PENDING) this.client.pause();
  };

  /** The client's FIN: it gave up (nginx reads it the same way), and what it waited for is let go at once. */
  private readonly onClientEnd = (): void => {
    if (this.phase === 'gone') return;
    this.conn.close('client-closed');
  };

  private readonly onClientDrain = (): void => {
    if (this.phase === 'gone') return;
    if (this.backend?.isPaused()) this.backend.resume();
    if (this.pausedForClient) {
      this.pausedForClient = false;
      this.client.resume();
      this.heads();
    }
  };

  private readonly onClientError = (err: Error): void => {
    this.conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error');
  };

  /** Reads request heads from `pending` while no exchange is in progress. */
  private heads(): void {
    while (this.phase === 'head' && this.pending !== null && !this.pausedForClient) {
      let buf = this.pending;
      if (this.scanned === 0) {
        const skip = skipLeadingCrlf(buf);
        if (skip > 0) {
          buf = buf.subarray(skip);
          this.pending = buf.length > 0 ? buf : null;
          if (this.pending === null) return;
        }
      }
      let end: number | undefined;
      let head: RequestHead;
      try {
        end = findHeadEnd(buf, MAX_HEAD_BYTES, this.scanned);
        if (end === undefined) {
          checkRequestLine(buf);
          this.scanned = buf.length;
          return;
        }
        head = parseRequestHead(buf.subarray(0, end));
      } catch (err) {
        this.refuse(err);
        return;
      }
      this.pending = end < buf.length ? buf.subarray(end) : null;
      this.scanned = 0;
      this.request(head);
    }
  }

  /** A request head arrived whole: answer it ourselves, hand it to the proxy library, or pass it on. */
  private request(head: RequestHead): void {
    this.clearTimer();
    this.conn.requestStarted();
    const route = this.deps.router.route({ method: head.method, target: head.target, host: head.host }, this.conn);
    if (route.kind === 'answer') {
      this.answer(head, route.answer);
      return;
    }
    if (route.kind === 'read') {
      this.readLocal(head, route.limit, route.respond);
      return;
    }
    if (isWebSocket(head)) {
      this.handoff(head);
      return;
    }
    this.exchange(head);
  }

  /** `bodyRead`: the request's body was read already (readLocal), so the next head follows at once. */
  private answer(head: RequestHead, a: LocalAnswer, bodyRead = false): void {
    const started = Date.now();
    const close = a.close !== undefined || this.conn.draining || wantsClose(head);
    const text = rawAnswer(a.status, a.body, a.headers, { close, hsts: this.hsts, headOnly: head.method === 'HEAD' }, a.contentType);
    this.accessLog(head.method, head.target, a.status, started);
    if (close) {
      this.phase = 'gone';
      this.conn.close(a.close ?? (this.conn.draining ? 'shutdown' : 'client-closed'), text);
      return;
    }
    this.write(text);
    // Pipelined requests answered here write without a backend to pause: past the bound, stop reading the client.
    if (this.client.writableLength > MAX_CLIENT_BUFFER) {
      this.pausedForClient = true;
      this.client.pause();
    }
    if (bodyRead) {
      this.phase = 'head';
      this.armHeadTimer();
      this.heads();
      return;
    }
    // A body we do not want is read and dropped, so that the next head is found where it starts.
    if (head.body.kind !== 'none') this.startBody(head, null);
    else this.armHeadTimer();
  }

  /**
   * A well-known endpoint that needs the body: it is read (bounded; chunked
   * bodies are refused with 411, since every client of these endpoints sends
   * a length), then answered. Nothing goes to the backend.
   */
  private readLocal(head: RequestHead, limit: number, respond: (body: Buffer) => LocalAnswer): void {
    if (head.body.kind === 'chunked') {
      this.answer(head, { status: 411, body: 'Length Required\n', close: 'protocol-error' });
      return;
    }
    if (head.body.kind === 'length' && head.body.length > limit) {
      this.answer(head, { status: 413, body: 'Content Too Large\n', close: 'protocol-error' });
      return;
    }
    if (head.body.kind === 'none') {
      this.answer(head, this.respondSafely(respond, Buffer.alloc(0)));
      return;
    }
    // A client that waits for 100 Continue (curl, for bodies over 1 KiB) is told to go on.
    if (head.minor === 1 && head.fields.some((f) => f.name === 'expect' && f.value.toLowerCase() === '100-continue')) this.write('HTTP/1.1 100 Continue\r\n\r\n');
    this.collect = { head, respond, parts: [] };
    this.startBody(head, null);
  }

  /** An endpoint that throws is a bug: logged, and the client gets 500. */
  private respondSafely(respond: (body: Buffer) => LocalAnswer, body: Buffer): LocalAnswer {
    try {
      return respond(body);
    } catch (err) {
      this.conn.log.error({ err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined }, 'a well-known endpoint failed');
      return { status: 500, body: 'Internal Server Error\n' };
    }
  }

  private handoff(head: RequestHead): void {
    this.phase = 'gone';
    this.clearTimer();
    this.dropBackend();
    const c = this.client;
    c.off('data', this.onClientData);
    c.off('end', this.onClientEnd);
    c.off('drain', this.onClientDrain);
    c.off('error', this.onClientError);
    const rest = this.pending;
    this.pending = null;
    this.deps.handoff(this.conn, c, head, rest ?? Buffer.alloc(0));
  }

  // ---- request to the backend --------------------------------------------------

  private exchange(head: RequestHead): void {
    const c = this.conn;
    const s = c.settings;
    const wire = forwardedRequestHead(head, {
      clientIp: c.record.clientIp,
      proto: c.tls ? 'https' : 'http',
      localPort: c.localPort,
      trust: c.trustForwarded,
      fallbackHost: this.deps.hostname,
    });
    const reused = this.backend !== undefined && this.backendUsed;
    const ex: Exchange = {
      method: head.method,
      target: head.target,
      started: Date.now(),
      wire,
      retryable: head.body.kind === 'none',
      retried: false,
      bodyDone: head.body.kind === 'none',
      closeClient: wantsClose(head) || c.draining,
      reused,
      status: 0,
      headDone: false,
      sent: 0,
      mode: 'none',
      remaining: 0,
      chunks: undefined,
      reusable: false,
      responseTimer: undefined,
      head: null,
    };
    this.ex = ex;
    c.record.backend = this.backendName;
    const backend = this.backend ?? this.connect();
    this.backendUsed = true;
    ex.responseTimer = setTimeout(this.onResponseTimeout, Math.min(s.response_timeout, s.timeouts.postauth_idle));
    this.sendToBackend(wire, 'latin1');
    if (head.body.kind === 'none') this.phase = 'waiting';
    else this.startBody(head, backend);
  }

  private startBody(head: RequestHead, to: Socket | null): void {
    this.phase = 'body';
    this.bodyTo = to;
    this.bodyLeft = head.body.kind === 'length' ? head.body.length : 0;
    this.bodyChunks = head.body.kind === 'chunked' ? new ChunkedReader() : undefined;
    this.armTimer('body', this.conn.settings.timeouts.postauth_idle);
    const rest = this.pending;
    this.pending = null;
    if (rest) this.body(rest);
  }

  /** Request body bytes: passed on (or dropped) up to where the framing says the body ends. */
  private body(chunk: Buffer): void {
    let take: number;
    let done: boolean;
    if (this.bodyChunks) {
      try {
        take = this.bodyChunks.feed(chunk);
      } catch (err) {
        this.refuse(err);
        return;
      }
      done = this.bodyChunks.done;
    } else {
      take = Math.min(this.bodyLeft, chunk.length);
      this.bodyLeft -= take;
      done = this.bodyLeft === 0;
    }
    if (take > 0 && this.bodyTo !== null) this.sendToBackend(take === chunk.length ? chunk : chunk.subarray(0, take));
    else if (take > 0 && this.collect) this.collect.parts.push(take === chunk.length ? chunk : chunk.subarray(0, take));
    if (!done) return;
    const rest = take < chunk.length ? chunk.subarray(take) : null;
    this.pending = rest;
    this.bodyChunks = undefined;
    this.bodyTo = null;
    this.clearTimer();
    const ex = this.ex;
    if (ex) {
      ex.bodyDone = true;
      this.phase = 'waiting';
      if (rest && rest.length > MAX_PENDING) this.client.pause();
      return;
    }
    const collected = this.collect;
    if (collected) {
      this.collect = undefined;
      this.answer(collected.head, this.respondSafely(collected.respond, Buffer.concat(collected.parts)), true);
      return;
    }
    // A dropped body (after a local answer) is over: the next head, unless the gateway is shutting down.
    if (this.conn.draining) {
      this.phase = 'gone';
      this.conn.close('shutdown', '');
      return;
    }
    this.phase = 'head';
    this.armHeadTimer();
    this.heads();
  }

  private sendToBackend(data: Buffer | string, encoding?: BufferEncoding): void {
    const b = this.backend;
    if (!b) return;
    const ok = typeof data === 'string' ? b.write(data, encoding ?? 'latin1') : b.write(data);
    if (!ok && !this.pausedForBackend) {
      this.pausedForBackend = true;
      this.client.pause();
    }
  }

  // ---- the backend connection ------------------------------------------------------

  private connect(): Socket {
    const s = this.conn.settings;
    const prelude =
      s.proxy_protocol === false
        ? undefined
        : proxyHeader(s.proxy_protocol, {
            clientIp: this.conn.record.clientIp,
            clientPort: this.conn.record.clientPort,
            localIp: this.conn.localIp,
            localPort: this.conn.localPort,
          });
    const b = connectBackend(s.backend, s.timeouts.backend_connect, prelude);
    this.backend = b;
    this.backendUsed = false;
    this.backendError = undefined;
    let head: Buffer | null = null;
    b.on('data', (chunk: Buffer) => {
      if (this.backend !== b || this.phase === 'gone') return;
      head = this.fromBackend(chunk, head);
    });
    b.on('drain', () => {
      if (this.backend !== b || !this.pausedForBackend) return;
      this.pausedForBackend = false;
      this.client.resume();
    });
    b.on('error', (err) => {
      if (this.backend === b) this.backendError = err;
    });
    b.on('timeout', () => {
      if (this.backend !== b) return;
      this.backendError = new Error(`backend ${this.backendName} sent nothing for ${s.timeouts.postauth_idle} ms`);
      b.destroy();
    });
    b.on('close', () => {
      if (this.backend !== b) return;
      this.backend = undefined;
      this.backendGone();
    });
    return b;
  }

  /** Bytes from the backend; returns the response head bytes still incomplete (null when none). */
  private fromBackend(chunk: Buffer, partial: Buffer | null): Buffer | null {
    const ex = this.ex;
    if (!ex) {
      // Nothing was asked: a backend that talks out of turn is not reused.
      this.dropBackend();
      return null;
    }
    if (ex.headDone) {
      this.responseBody(ex, chunk);
      return null;
    }
    let buf = partial === null ? chunk : Buffer.concat([partial, chunk]);
    for (;;) {
      let end: number | undefined;
      try {
        end = findHeadEnd(buf, MAX_RESPONSE_HEAD_BYTES);
        if (end === undefined) return buf;
        const head = parseResponseHead(buf.subarray(0, end));
        const rest = buf.subarray(end);
        if (head.status < 200) {
          if (head.status === 101) throw new HeadError('bad-request-line', 'a 101 answer to a request that asked for no upgrade');
          // 100 Continue, 103 Early Hints: passed on, the final answer follows.
          this.toClient(ex, clientResponseHead(head, { hsts: undefined, close: false }));
          if (rest.length === 0) return null;
          buf = rest;
          continue;
        }
        this.responseHead(ex, head);
        if (rest.length > 0 && this.ex === ex) this.responseBody(ex, rest);
        return null;
      } catch (err) {
        this.badGateway(ex, err);
        return null;
      }
    }
  }

  private responseHead(ex: Exchange, head: ReturnType<typeof parseResponseHead>): void {
    clearTimeout(ex.responseTimer);
    ex.headDone = true;
    ex.status = head.status;
    const s = this.conn.settings;
    let mode: ResponseMode;
    if (ex.method === 'HEAD' || head.status === 204 || head.status === 304) mode = 'none';
    else if (head.chunked === true) mode = 'chunked';
    else if (head.chunked === false) mode = 'close';
    else if (head.contentLength !== undefined) mode = head.contentLength > 0 ? 'length' : 'none';
    else mode = 'close';
    ex.mode = mode;
    ex.remaining = head.contentLength ?? 0;
    ex.chunks = mode === 'chunked' ? new ChunkedReader() : undefined;
    const keepAlive = head.minor === 1 ? !head.connection.has('close') : head.connection.has('keep-alive');
    ex.reusable = keepAlive && mode !== 'close';
    if (mode === 'close' || this.conn.draining) ex.closeClient = true;
    // Held back until the first body bytes (usually in the same read): one write, one TLS record, one syscall.
    ex.head = clientResponseHead(head, { hsts: this.hsts, close: ex.closeClient });
    this.backend?.setTimeout(s.timeouts.postauth_idle);
    if (mode === 'none') this.finish(ex);
  }

  private responseBody(ex: Exchange, chunk: Buffer): void {
    let take = chunk.length;
    let done = false;
    if (ex.mode === 'length') {
      take = Math.min(ex.remaining, chunk.length);
      ex.remaining -= take;
      done = ex.remaining === 0;
    } else if (ex.mode === 'chunked') {
      try {
        take = ex.chunks!.feed(chunk);
      } catch (err) {
        this.cut(ex, `bad chunked framing from the backend: ${errorMessage(err)}`);
        return;
      }
      done = ex.chunks!.done;
    } else if (ex.mode === 'none') {
      take = 0;
      done = true;
    }
    if (take > 0) this.toClient(ex, take === chunk.length ? chunk : chunk.subarray(0, take));
    if (take < chunk.length) ex.reusable = false;
    if (done) this.finish(ex);
  }

  private toClient(ex: Exchange, data: Buffer | string): void {
    let out = data;
    if (ex.head !== null) {
      const head = ex.head;
      ex.head = null;
      out = typeof data === 'string' ? head + data : concatHead(head, data);
    }
    ex.sent += out.length;
    this.write(out);
    // Past the bound the backend waits for the client to read: a client that stops reading holds little of ours.
    if (this.client.writableLength > MAX_CLIENT_BUFFER) this.backend?.pause();
  }

  /** A response head still held back (no body followed): out it goes. */
  private flushHead(ex: Exchange): void {
    if (ex.head === null) return;
    const head = ex.head;
    ex.head = null;
    ex.sent += head.length;
    this.write(head);
  }

  private write(data: Buffer | string): boolean {
    this.conn.countOut(typeof data === 'string' ? data.length : data.length);
    return typeof data === 'string' ? this.client.write(data, 'latin1') : this.client.write(data);
  }

  /** The response is complete. */
  private finish(ex: Exchange): void {
    this.flushHead(ex);
    clearTimeout(ex.responseTimer);
    this.ex = undefined;
    this.accessLog(ex.method, ex.target, ex.status, ex.started);
    const b = this.backend;
    if (b) {
      if (ex.reusable) {
        b.setTimeout(0);
        if (b.isPaused()) b.resume();
      } else this.dropBackend();
    }
    if (ex.closeClient || !ex.bodyDone) {
      this.phase = 'gone';
      this.conn.close(this.conn.draining ? 'shutdown' : ex.mode === 'close' ? 'backend-closed' : 'client-closed', '');
      return;
    }
    this.phase = 'head';
    this.armHeadTimer();
    if (this.client.isPaused() && !this.pausedForBackend && !this.pausedForClient) this.client.resume();
    this.heads();
  }

  private backendGone(): void {
    const ex = this.ex;
    if (!ex) return;
    if (ex.headDone && ex.mode === 'close') {
      this.finish(ex);
      return;
    }
    if (!ex.headDone && ex.sent === 0 && ex.reused && ex.retryable && !ex.retried) {
      // A kept-alive connection the backend had closed meanwhile: the request goes again on a fresh one.
      ex.retried = true;
      ex.reused = false;
      this.connect();
      this.backendUsed = true;
      this.sendToBackend(ex.wire, 'latin1');
      return;
    }
    if (!ex.headDone) {
      this.badGateway(ex, this.backendError ?? new Error(`backend ${this.backendName} closed the connection without an answer`));
      return;
    }
    this.cut(ex, 'the backend closed the connection mid-response');
  }

  private readonly onResponseTimeout = (): void => {
    const ex = this.ex;
    if (!ex || ex.headDone || this.phase === 'gone') return;
    const s = this.conn.settings;
    const ms = Math.min(s.response_timeout, s.timeouts.postauth_idle);
    this.badGateway(ex, new MailgateError('BACKEND_TIMEOUT', `backend ${this.backendName} sent no response head within ${ms} ms`));
  };

  /** No usable answer from the backend: 502 (504 when it was a deadline), and the connection ends. */
  private badGateway(ex: Exchange, err: unknown): void {
    const timeout = errorCode(err) === 'BACKEND_TIMEOUT';
    const status = timeout ? 504 : 502;
    this.conn.log.warn(
      { backend: this.backendName, err: errorMessage(err), code: errorCode(err), method: ex.method, path: logPath(ex.target) },
      timeout ? 'backend timed out' : 'backend unavailable',
    );
    ex.status = status;
    this.accessLog(ex.method, ex.target, status, ex.started);
    clearTimeout(ex.responseTimer);
    this.ex = undefined;
    this.dropBackend();
    this.phase = 'gone';
    const reason: CloseReason = timeout ? 'backend-timeout' : 'backend-unavailable';
    if (ex.sent > 0) {
      this.conn.close(reason);
      return;
    }
    const body = timeout ? 'Gateway Timeout: the server behind this gateway did not answer in time.\n' : 'Bad Gateway: the server behind this gateway is unavailable.\n';
    this.conn.close(reason, rawAnswer(status, body, {}, { close: true, hsts: this.hsts, headOnly: ex.method === 'HEAD' }));
  }

  /** The backend went away (or broke its framing) mid-response: the client is cut too, so it cannot take a part for the whole. */
  private cut(ex: Exchange, why: string): void {
    this.flushHead(ex);
    this.conn.log.warn({ backend: this.backendName, err: this.backendError ? errorMessage(this.backendError) : why, status: ex.status }, 'backend response cut short');
    clearTimeout(ex.responseTimer);
    this.ex = undefined;
    this.dropBackend();
    this.phase = 'gone';
    this.conn.close('backend-error');
  }

  private dropBackend(): void {
    const b = this.backend;
    this.backend = undefined;
    this.pausedForBackend = false;
    b?.destroy();
  }

  // ---- refusals, timers, the connection's end --------------------------------------------

  /** A head or body the gateway will not pass on: 400 (431 for an oversized head), then close. */
  private refuse(err: unknown): void {
    const code = err instanceof HeadError ? err.code : 'bad-request-line';
    const tooLarge = code === 'head-too-large' || code === 'too-many-headers';
    const status = tooLarge ? 431 : 400;
    this.conn.log.debug({ code, err: errorMessage(err) }, 'bad request from client');
    const ex = this.ex;
    this.ex = undefined;
    if (ex) clearTimeout(ex.responseTimer);
    // The backend has seen part of this request at most: its connection goes, so that part stays incomplete.
    this.dropBackend();
    this.phase = 'gone';
    const reason: CloseReason = tooLarge ? 'line-too-long' : 'protocol-error';
    if (ex && ex.sent > 0) {
      this.conn.close(reason);
      return;
    }
    const body = tooLarge ? 'Request Header Fields Too Large\n' : 'Bad Request\n';
    this.conn.close(reason, rawAnswer(status, body, {}, { close: true, hsts: this.hsts }));
  }

  private armHeadTimer(): void {
    this.armTimer('head', this.conn.settings.timeouts.preauth_idle);
  }

  private armTimer(kind: 'head' | 'body', ms: number): void {
    this.timerReason = kind;
    if (this.timer) {
      clearTimeout(this.timer);
    }
    this.timer = setTimeout(this.onTimer, ms);
  }

  private clearTimer(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  private readonly onTimer = (): void => {
    if (this.phase === 'gone') return;
    this.phase = 'gone';
    this.dropBackend();
    if (this.timerReason === 'head' && this.pending !== null) {
      // Part of a head, and no more in time: 408 (RFC 9110 §15.5.9).
      this.conn.close('idle-timeout', rawAnswer(408, 'Request Timeout\n', {}, { close: true, hsts: this.hsts }));
      return;
    }
    this.conn.close('idle-timeout');
  };

  /** The access line, at debug (its fields are not even built at info: this runs for every request). */
  private accessLog(method: string, target: string, status: number, started: number): void {
    const log = this.conn.log;
    if (log.isLevelEnabled('debug')) log.debug({ method, path: logPath(target), status, durationMs: Date.now() - started }, 'request');
  }

  drain(): void {
    if (this.phase === 'gone') return;
    const ex = this.ex;
    if (ex) {
      // The response in progress ends the connection (with Connection: close when its head is still to come).
      ex.closeClient = true;
      return;
    }
    if (this.phase === 'body') return;
    this.phase = 'gone';
    this.conn.close('shutdown', '');
  }

  teardown(): void {
    this.phase = 'gone';
    this.collect = undefined;
    this.clearTimer();
    const ex = this.ex;
    this.ex = undefined;
    if (ex) clearTimeout(ex.responseTimer);
    this.dropBackend();
  }
}

/** HTTP/1.0 connections end after one exchange (their keep-alive is not offered); HTTP/1.1 ones when the client says close. */
function wantsClose(head: RequestHead): boolean {
  return head.minor === 0 || head.connection.has('close');
}

/** RFC 6455 §4.1: GET with Upgrade: websocket and Connection: upgrade. */
function isWebSocket(head: RequestHead): boolean {
  if (head.method !== 'GET' || !head.connection.has('upgrade')) return false;
  for (const f of head.fields) {
    if (f.name === 'upgrade' && f.value.split(',').some((t) => t.trim().toLowerCase() === 'websocket')) return true;
  }
  return false;
}

function concatHead(head: string, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(head.length + body.length);
  out.write(head, 0, 'latin1');
  body.copy(out, head.length);
  return out;
}
