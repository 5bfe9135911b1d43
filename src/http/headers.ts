/**
 * Pure header work for the HTTP gateway: the X-Forwarded-* set the backend
 * sees, hop-by-hop stripping, the https redirect target and the path as it
 * may appear in a log line. Nothing here touches a socket.
 */
import type { IncomingHttpHeaders } from 'node:http';
import { isIP } from 'node:net';
import type { RequestHead, ResponseHead } from './head-parser.ts';

export interface ForwardFacts {
  /** The address the TCP connection came from (normalized, no ::ffff: prefix). */
  clientIp: string;
  proto: 'http' | 'https';
  /** The gateway port the client connected to. */
  localPort: number;
  /** Keep what an upstream proxy already said (trust_forwarded), appending ourselves to X-Forwarded-For. */
  trust: boolean;
}

/**
 * Headers a backend may believe about the client or the scheme. From an
 * untrusted client they are forged by definition, so they are removed before
 * ours are set (X-Forwarded-Ssl: on would make a plain request look secure).
 */
const SPOOFABLE = [
  'forwarded',
  'x-forwarded-ssl',
  'x-forwarded-scheme',
  'x-url-scheme',
  'front-end-https',
  'x-client-ip',
  'x-cluster-client-ip',
  'true-client-ip',
  // Routing overrides some frameworks (IIS, Symfony, Spring) honour: a client must not pick the backend's path or prefix.
  'x-original-url',
  'x-rewrite-url',
  'x-forwarded-prefix',
  'x-forwarded-server',
] as const;
const SPOOFABLE_SET: ReadonlySet<string> = new Set(SPOOFABLE);

/** Sets X-Forwarded-For/-Proto/-Host/-Port and X-Real-IP in place. */
export function applyForwardedHeaders(headers: IncomingHttpHeaders, facts: ForwardFacts): void {
  const keep = (name: string): boolean => facts.trust && typeof headers[name] === 'string' && headers[name] !== '';
  const chain = headers['x-forwarded-for'];
  headers['x-forwarded-for'] = facts.trust && typeof chain === 'string' && chain.trim() !== '' ? `${chain}, ${facts.clientIp}` : facts.clientIp;
  if (!keep('x-real-ip')) headers['x-real-ip'] = facts.clientIp;
  if (!keep('x-forwarded-proto')) headers['x-forwarded-proto'] = facts.proto;
  if (!keep('x-forwarded-port')) headers['x-forwarded-port'] = String(facts.localPort);
  if (!keep('x-forwarded-host')) {
    if (headers.host) headers['x-forwarded-host'] = headers.host;
    else delete headers['x-forwarded-host'];
  }
  if (!facts.trust) for (const name of SPOOFABLE) delete headers[name];
}

/** RFC 9110 §7.6.1: these belong to one hop and are not forwarded. */
const HOP_BY_HOP = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'upgrade'];
const HOP_BY_HOP_SET: ReadonlySet<string> = new Set(HOP_BY_HOP);
/** The forwarded set we write ourselves (a trusted upstream's values are kept or extended). */
const FORWARDED_SET: ReadonlySet<string> = new Set(['x-forwarded-for', 'x-real-ip', 'x-forwarded-proto', 'x-forwarded-port', 'x-forwarded-host']);
/** Named in Connection but never dropped for it: they frame the message or name the server. */
const NOT_DROPPABLE: ReadonlySet<string> = new Set(['transfer-encoding', 'host', 'content-length']);
/** Headers a response to an HTTP/1.1 client does not carry on from the backend's hop. */
const RESPONSE_HOP_BY_HOP: ReadonlySet<string> = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'upgrade']);

/**
 * Removes hop-by-hop headers (and those the Connection header names) before a
 * request goes to the backend. A WebSocket handshake keeps Connection and
 * Upgrade: they are the point of it. Transfer-Encoding stays because it
 * describes the body the proxy streams through.
 */
export function stripHopByHop(headers: IncomingHttpHeaders, upgrade: boolean): void {
  const connection = headers.connection;
  if (!upgrade && typeof connection === 'string') {
    for (const token of connection.split(',')) {
      const name = token.trim().toLowerCase();
      if (name && name !== 'transfer-encoding' && name !== 'host' && name !== 'content-length') delete headers[name];
    }
  }
  for (const name of HOP_BY_HOP) {
    if (upgrade && (name === 'connection' || name === 'upgrade')) continue;
    delete headers[name];
  }
}

/** True for a WebSocket handshake (RFC 6455 §4.1: GET with Upgrade: websocket). */
export function isWebSocketUpgrade(method: string | undefined, headers: IncomingHttpHeaders): boolean {
  if (method !== 'GET' || typeof headers.upgrade !== 'string') return false;
  return headers.upgrade.split(',').some((t) => t.trim().toLowerCase() === 'websocket');
}

const HOST_NAME = /^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$/;

/** The Host header without its port, or undefined when it is not a plausible host name or IP literal. */
export function hostWithoutPort(host: string | undefined): string | undefined {
  if (!host) return undefined;
  const h = host.trim();
  if (h.startsWith('[')) {
    const end = h.indexOf(']');
    if (end < 0) return undefined;
    const rest = h.slice(end + 1);
    if (rest !== '' && !/^:\d{1,5}$/.test(rest)) return undefined;
    return isIP(h.slice(1, end)) === 6 ? h.slice(0, end + 1) : undefined;
  }
  const m = /^([^:]+)(?::\d{1,5})?$/.exec(h);
  const name = m?.[1];
  if (!name || name.length > 253) return undefined;
  return isIP(name) === 4 || HOST_NAME.test(name) ? name.toLowerCase() : undefined;
}

/** The request target as origin-form (path and query), whatever form the client used. */
export function originForm(url: string | undefined): string {
  if (!url) return '/';
  if (url.startsWith('/')) return url;
  if (/^https?:\/\//i.test(url)) {
    try {
      const u = new URL(url);
      return `${u.pathname}${u.search}`;
    } catch {
      // Not a URL after all: the redirect goes to the root rather than somewhere the client did not name.
      return '/';
    }
  }
  return '/';
}

/**
 * Where a plain-HTTP request is sent: the same host without its port, over
 * https, same path and query. A missing or implausible Host falls back to the
 * gateway's own name, so a forged Host cannot put anything odd in Location.
 */
export function httpsRedirectLocation(host: string | undefined, url: string | undefined, fallbackHost: string): string {
  const name = hostWithoutPort(host) ?? fallbackHost;
  const path = originForm(url).replace(/[^\x21-\x7e]/g, (c) => encodeURIComponent(c));
  return `https://${name}${path}`;
}

/**
 * Printable ASCII but '#', '@' and '\', starting with one '/' (not two). For
 * such a target node's legacy url.parse takes its fast path and returns it
 * unchanged as `.path`. Off that path it strips a '#' fragment, turns '\'
 * into '/', and (after '@' or '//') escapes characters such as '`'.
 */
const PLAIN_ORIGIN_FORM = /^\/(?!\/)[\x21\x22\x24-\x3f\x41-\x5b\x5d-\x7e]*$/;

/**
 * True when http-proxy may send the request target to the backend as it is:
 * `url.parse(url).path` would give back the same string. http-proxy parses
 * every request's URL with url.parse otherwise, which costs microseconds per
 * request when called from node_modules (node checks the caller's stack for
 * its deprecation warning each time).
 */
export function isPlainOriginForm(url: string | undefined): boolean {
  return url !== undefined && PLAIN_ORIGIN_FORM.test(url);
}

/** The path for an access-log line: no query string (tokens live there), no fragment, bounded, printable. */
export function logPath(url: string | undefined): string {
  const path = originForm(url);
  const cut = path.search(/[?#]/);
  const bare = cut >= 0 ? path.slice(0, cut) : path;
  const printable = bare.replace(/[^\x21-\x7e]/g, '?');
  return printable.length > 256 ? `${printable.slice(0, 256)}...` : printable;
}

/** What the fast path needs to rewrite a request head; see forwardedRequestHead. */
export interface HeadFacts extends ForwardFacts {
  /** Host for an HTTP/1.0 request that named none (the gateway's host name). */
  fallbackHost: string;
}

/**
 * The request head the backend gets from the fast path: the request line as
 * the client sent it, its fields as they came (same bytes, same order) minus
 * hop-by-hop, spoofable and routing-override fields, then Host when an
 * HTTP/1.0 client sent none, and our X-Forwarded-* and X-Real-IP.
 */
export function forwardedRequestHead(h: RequestHead, f: HeadFacts): string {
  let out = `${h.method} ${h.target} HTTP/1.${h.minor}\r\n`;
  const named = h.connection;
  let chain = '';
  const kept: Record<string, string> = {};
  for (const field of h.fields) {
    const name = field.name;
    if (HOP_BY_HOP_SET.has(name) || (named.has(name) && !NOT_DROPPABLE.has(name))) continue;
    if (FORWARDED_SET.has(name)) {
      if (f.trust && field.value !== '') {
        if (name === 'x-forwarded-for') chain = chain === '' ? field.value : `${chain}, ${field.value}`;
        else kept[name] ??= field.value;
      }
      continue;
    }
    if (!f.trust && SPOOFABLE_SET.has(name)) continue;
    out += field.line;
    out += '\r\n';
  }
  let host = h.host;
  if (host === undefined) {
    host = f.fallbackHost;
    out += `Host: ${host}\r\n`;
  }
  out += `X-Forwarded-For: ${chain === '' ? f.clientIp : `${chain}, ${f.clientIp}`}\r\n`;
  out += `X-Real-IP: ${kept['x-real-ip'] ?? f.clientIp}\r\n`;
  out += `X-Forwarded-Proto: ${kept['x-forwarded-proto'] ?? f.proto}\r\n`;
  out += `X-Forwarded-Port: ${kept['x-forwarded-port'] ?? f.localPort}\r\n`;
  out += `X-Forwarded-Host: ${kept['x-forwarded-host'] ?? host}\r\n\r\n`;
  return out;
}

export interface ResponseFacts {
  /** Strict-Transport-Security value to add when the backend sent none. */
  hsts: string | undefined;
  /** The client connection ends after this response: say so. */
  close: boolean;
}

/** The response head the client gets: the backend's, minus its hop-by-hop fields, plus HSTS and Connection: close as needed. */
export function clientResponseHead(r: ResponseHead, f: ResponseFacts): string {
  let out = `${r.statusLine}\r\n`;
  const named = r.connection;
  let hasHsts = false;
  for (const field of r.fields) {
    const name = field.name;
    if (RESPONSE_HOP_BY_HOP.has(name) || (named.has(name) && !NOT_DROPPABLE.has(name))) continue;
    // Chunked wins over a length (RFC 9112 §6.3); the length is not passed on beside it.
    if (name === 'content-length' && r.chunked !== undefined) continue;
    if (name === 'strict-transport-security') hasHsts = true;
    out += field.line;
    out += '\r\n';
  }
  if (f.hsts !== undefined && !hasHsts) out += `Strict-Transport-Security: ${f.hsts}\r\n`;
  if (f.close) out += 'Connection: close\r\n';
  return `${out}\r\n`;
}

/** Application-level size of a header list (rawHeaders: names and values): each with a separator, as HTTP/1.1 carries them. */
export function headerBytes(raw: readonly string[]): number {
  let n = 0;
  for (const s of raw) n += s.length + 2;
  return n;
}
