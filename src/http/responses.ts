/**
 * The gateway's own short answers (400, 403, 429, 502, 504, redirects, ACME
 * and well-known answers): as raw HTTP/1.1 bytes for the fast path and for
 * sockets taken over by an upgrade, or on a response object of node:http or
 * the HTTP/2 compatibility API.
 */
import { STATUS_CODES, type ServerResponse } from 'node:http';
import type { Http2ServerResponse } from 'node:http2';

/** Headers of ours that survive when a half-prepared proxied response is replaced by an error. */
const KEEP_ON_REPLACE = new Set(['strict-transport-security', 'connection']);

/**
 * Answers with a short text body. If the proxy already copied backend headers
 * but sent nothing yet, they are dropped first (a Content-Encoding from the
 * backend must not describe our body). If bytes already went out, the only
 * honest end is to cut the connection, so the client cannot mistake a
 * truncated response for a complete one.
 */
export function sendText(res: ServerResponse | Http2ServerResponse, status: number, body: string, headers: Record<string, string | number> = {}): void {
  if (res.writableEnded || res.destroyed) return;
  if (res.headersSent) {
    if ('stream' in res) res.stream.close();
    else res.destroy();
    return;
  }
  for (const name of res.getHeaderNames()) if (!KEEP_ON_REPLACE.has(name)) res.removeHeader(name);
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/plain; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
  res.setHeader('Content-Length', Buffer.byteLength(body));
  res.end(body);
}

export interface RawOptions {
  /** Ends the connection after it (Connection: close). */
  close: boolean;
  /** Strict-Transport-Security value, on TLS listeners that send one. */
  hsts?: string | undefined;
  /** The answer to a HEAD request: the head alone. */
  headOnly?: boolean;
}

/**
 * A complete HTTP/1.1 response with a short body: a string when the body is
 * ASCII text (written as latin1, byte for byte), else bytes (a UTF-8 text, a
 * signed profile).
 */
export function rawAnswer(
  status: number,
  body: string | Buffer,
  headers: Record<string, string | number> = {},
  o: RawOptions = { close: true },
  contentType = 'text/plain; charset=utf-8',
): string | Buffer {
  const bytes = typeof body === 'string' && !/^[\x00-\x7f]*$/.test(body) ? Buffer.from(body, 'utf8') : body;
  let out = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Error'}\r\nContent-Type: ${contentType}\r\nCache-Control: no-store\r\n`;
  for (const [name, value] of Object.entries(headers)) out += `${name}: ${value}\r\n`;
  if (o.hsts !== undefined) out += `Strict-Transport-Security: ${o.hsts}\r\n`;
  out += `Content-Length: ${bytes.length}\r\n`;
  if (o.close) out += 'Connection: close\r\n';
  out += '\r\n';
  if (o.headOnly) return out;
  return typeof bytes === 'string' ? out + bytes : Buffer.concat([Buffer.from(out, 'latin1'), bytes]);
}

/** A complete HTTP/1.1 response that closes the connection, for sockets taken over by an upgrade. */
export function rawResponse(status: number, body: string, headers: Record<string, string | number> = {}): string {
  return rawAnswer(status, body, headers, { close: true }) as string;
}
