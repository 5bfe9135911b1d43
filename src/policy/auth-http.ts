/**
 * `authentication: http`: a login is checked by an HTTP service speaking
 * nginx's auth_http protocol, so an admin coming from nginx's mail proxy
 * points mailgate at the service they already run.
 *
 * Request (GET, no body), as nginx sends it:
 *   Auth-Method: plain · Auth-User / Auth-Pass (URL-encoded like nginx:
 *   control bytes, space, "%" and bytes from 0x7f) · Auth-Protocol ·
 *   Auth-Login-Attempt (per connection) · Client-IP · Client-Host (SMTP) ·
 *   Auth-SSL: on (over TLS) · the configured extra headers.
 * Answer (headers; the body is ignored):
 *   Auth-Status: OK with Auth-Server and Auth-Port (where the session goes),
 *   optionally Auth-User / Auth-Pass (the login to replay there instead);
 *   any other Auth-Status refuses, after Auth-Wait seconds when given; an
 *   Auth-Error-Code of 4xx makes the refusal temporary.
 * The service down, slow (past `timeout`), answering other than 2xx or
 * without Auth-Status is the protocol's temporary failure, never a pass.
 *
 * Connections to the service are kept alive in a small pool (an http.Agent
 * per engine, `max_connections` sockets). Permanent refusals are remembered
 * for `negative_cache.ttl` (at most `size` entries, the oldest dropped
 * first), keyed by an HMAC of protocol, user, password and client address
 * under a key that never leaves the process: a client repeating a wrong
 * password does not reach the service again, and no password is stored.
 * Credentials never reach a log line.
 */
import { createHmac, randomBytes } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { isIP } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { AuthHttpSettings } from '../config/schema-auth-http.ts';
import { errorMessage } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { parseHostPort, type HostPort } from '../net/address.ts';
import type { Credentials } from '../protocols/types.ts';
import { passwordBytes } from './passwords.ts';

/** What the service is asked about one login. */
export interface AuthHttpQuery {
  protocol: 'imap' | 'pop3' | 'smtp';
  credentials: Credentials;
  clientIp: string;
  /** 1 for the first login on the connection, 2 for the next, … */
  attempt: number;
  tls: boolean;
}

export type AuthHttpAnswer =
  /** Allowed: the backend, and the credentials to replay there. */
  | { kind: 'ok'; backend: HostPort; credentials: Credentials }
  /** Refused by the service (after its Auth-Wait); `temporary` when its Auth-Error-Code was 4xx. `cached`: from the negative cache. */
  | { kind: 'refused'; temporary: boolean; cached: boolean }
  /** No usable answer: the temporary failure. `why` is for the log (never credentials). */
  | { kind: 'unavailable'; why: string };

/** The longest Auth-Wait honoured; the client waits this long at most. */
const MAX_WAIT_MS = 30_000;

export class AuthHttpClient {
  private readonly settings: AuthHttpSettings;
  private readonly url: URL;
  private readonly agent: http.Agent;
  private readonly log: Logger;
  private readonly cache = new Map<string, { until: number; waitMs: number }>();
  private readonly cacheKey = randomBytes(32);

  constructor(settings: AuthHttpSettings, log: Logger) {
    this.settings = settings;
    this.url = new URL(settings.url);
    this.log = log.child({ part: 'auth_http' });
    const options = { keepAlive: true, maxSockets: settings.max_connections, maxFreeSockets: settings.max_connections, scheduling: 'lifo' as const };
    this.agent = this.url.protocol === 'https:' ? new https.Agent(options) : new http.Agent(options);
  }

  /** Asks the service (or the negative cache); waits the service's Auth-Wait before a refusal is returned. */
  async check(q: AuthHttpQuery): Promise<AuthHttpAnswer> {
    const key = this.keyOf(q);
    const cached = this.cachedRefusal(key);
    if (cached) {
      // The same refusal, after the same wait: a client repeating a guess is slowed as the service would slow it.
      await sleep(cached.waitMs);
      return { kind: 'refused', temporary: false, cached: true };
    }
    let reply: Reply;
    try {
      reply = await this.request(q);
    } catch (err) {
      const why = errorMessage(err);
      this.log.warn({ url: this.url.origin + this.url.pathname, err: why, client: q.clientIp }, 'auth_http service unavailable; the login gets a temporary failure');
      return { kind: 'unavailable', why };
    }
    const answer = this.interpret(reply);
    if (answer.kind === 'unavailable') {
      this.log.warn({ url: this.url.origin + this.url.pathname, err: answer.why, client: q.clientIp }, 'auth_http answer unusable; the login gets a temporary failure');
      return answer;
    }
    if (answer.kind === 'refused') {
      const waitMs = Math.min(MAX_WAIT_MS, reply.waitMs ?? 0);
      if (!answer.temporary) this.remember(key, waitMs);
      await sleep(waitMs);
      return answer;
    }
    return { ...answer, credentials: { ...q.credentials, ...answer.credentials } };
  }

  /** Closes the pool's idle connections (a reload's old engine; stop). */
  close(): void {
    this.agent.destroy();
  }

  // ---- the exchange ------------------------------------------------------------

  private request(q: AuthHttpQuery): Promise<Reply> {
    const headers: Record<string, string> = {
      'Auth-Method': 'plain',
      'Auth-User': escapeLikeNginx(passwordBytes(q.credentials.user)),
      'Auth-Pass': escapeLikeNginx(passwordBytes(q.credentials.password)),
      'Auth-Protocol': q.protocol,
      'Auth-Login-Attempt': String(q.attempt),
      'Client-IP': q.clientIp,
      // nginx sends a name for SMTP clients only, "[UNAVAILABLE]" without a resolver; mailgate resolves none.
      ...(q.protocol === 'smtp' ? { 'Client-Host': '[UNAVAILABLE]' } : {}),
      ...(q.tls ? { 'Auth-SSL': 'on' } : {}),
      ...this.settings.headers,
    };
    const transport = this.url.protocol === 'https:' ? https : http;
    return new Promise<Reply>((resolve, reject) => {
      let settled = false;
      const settle = (err: Error | undefined, reply?: Reply) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(reply as Reply);
      };
      const req = transport.request(this.url, { method: 'GET', agent: this.agent, headers }, (res) => {
        const status = res.statusCode ?? 0;
        // The answer is in the headers; the body is read and dropped so the connection can be used again.
        res.resume();
        res.on('error', (err) => settle(err));
        res.on('end', () => settle(undefined, replyOf(status, res.headers)));
      });
      const timer = setTimeout(() => {
        settle(new Error(`no answer within ${this.settings.timeout} ms`));
        req.destroy();
      }, this.settings.timeout);
      req.on('error', (err) => settle(err));
      req.end();
    });
  }

  private interpret(r: Reply): AuthHttpAnswer | { kind: 'ok'; backend: HostPort; credentials: Partial<Credentials> } {
    if (r.status < 200 || r.status > 299) return { kind: 'unavailable', why: `HTTP status ${r.status}` };
    if (r.authStatus === undefined) return { kind: 'unavailable', why: 'no Auth-Status header' };
    if (r.authStatus !== 'OK') return { kind: 'refused', temporary: /^4/.test(r.errorCode ?? ''), cached: false };
    if (r.server === undefined || r.port === undefined) return { kind: 'unavailable', why: 'Auth-Status OK without Auth-Server and Auth-Port' };
    const host = r.server.trim();
    const target = parseHostPort(isIP(host) === 6 ? `[${host}]:${r.port.trim()}` : `${host}:${r.port.trim()}`);
    if (typeof target === 'string') return { kind: 'unavailable', why: `Auth-Server/Auth-Port: ${target}` };
    const credentials: Partial<Credentials> = {};
    if ([r.user, r.pass].some((v) => v !== undefined && (v.length === 0 || v.length > 1024 || /[\0-\x1f\x7f]/.test(v)))) {
      return { kind: 'unavailable', why: 'Auth-User or Auth-Pass empty, too long or with a control character' };
    }
    if (r.user !== undefined) credentials.user = r.user;
    if (r.pass !== undefined) credentials.password = r.pass;
    return { kind: 'ok', backend: target, credentials };
  }

  // ---- the negative cache ---------------------------------------------------------

  private keyOf(q: AuthHttpQuery): string {
    const mac = createHmac('sha256', this.cacheKey);
    for (const part of [q.protocol, q.credentials.user, q.credentials.password, q.clientIp]) {
      mac.update(passwordBytes(part));
      mac.update('\0');
    }
    return mac.digest('base64');
  }

  private cachedRefusal(key: string): { waitMs: number } | undefined {
    const entry = this.cache.get(key);
    if (entry === undefined) return undefined;
    if (entry.until > Date.now()) return entry;
    this.cache.delete(key);
    return undefined;
  }

  private remember(key: string, waitMs: number): void {
    const { size, ttl } = this.settings.negative_cache;
    if (size === 0) return;
    this.cache.delete(key);
    this.cache.set(key, { until: Date.now() + ttl, waitMs });
    // A Map iterates in insertion order: the first key is the oldest.
    while (this.cache.size > size) {
      const oldest = this.cache.keys().next().value;
      if (oldest === undefined) break;
      this.cache.delete(oldest);
    }
  }
}

interface Reply {
  status: number;
  authStatus: string | undefined;
  server: string | undefined;
  port: string | undefined;
  user: string | undefined;
  pass: string | undefined;
  waitMs: number | undefined;
  errorCode: string | undefined;
}

function replyOf(status: number, h: http.IncomingHttpHeaders): Reply {
  const one = (name: string): string | undefined => {
    const v = h[name];
    return typeof v === 'string' ? v : undefined;
  };
  const wait = one('auth-wait');
  return {
    status,
    authStatus: one('auth-status')?.trim(),
    server: one('auth-server'),
    port: one('auth-port'),
    user: one('auth-user'),
    pass: one('auth-pass'),
    waitMs: wait !== undefined && /^\s*\d{1,6}\s*$/.test(wait) ? Number(wait) * 1000 : undefined,
    errorCode: one('auth-error-code')?.trim(),
  };
}

/**
 * nginx's escaping of Auth-User and Auth-Pass (ngx_escape_uri, NGX_ESCAPE_MAIL_AUTH):
 * control bytes, space, "%" and bytes from 0x7f on become %XX; everything else stays.
 */
export function escapeLikeNginx(bytes: Buffer): string {
  let out = '';
  for (const b of bytes) {
    if (b <= 0x20 || b === 0x25 || b >= 0x7f) out += `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
    else out += String.fromCharCode(b);
  }
  return out;
}
