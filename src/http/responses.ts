/**
 * The gateway's own short answers (403, 429, 502, 504, redirects), either on
 * a ServerResponse or, for a WebSocket handshake that never became a
 * response object, as raw bytes on the socket.
 */
import { STATUS_CODES, type ServerResponse } from 'node:http';

/** Headers of ours that survive when a half-prepared proxied response is replaced by an error. */
const KEEP_ON_REPLACE = new Set(['strict-transport-security', 'connection']);

/**
 * Answers with a short text body. If the proxy already copied backend headers
 * but sent nothing yet, they are dropped first (a Content-Encoding from the
 * backend must not describe our body). If bytes already went out, the only
 * honest end is to cut the connection, so the client cannot mistake a
 * truncated response for a complete one.
 */
export function sendText(res: ServerResponse, status: number, body: string, headers: Record<string, string | number> = {}): void {
  if (res.writableEnded || res.destroyed) return;
  if (res.headersSent) {
    res.destroy();
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

/** A complete HTTP/1.1 response that closes the connection, for sockets taken over by an upgrade. */
export function rawResponse(status: number, body: string, headers: Record<string, string | number> = {}): string {
  const lines = [
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Error'}`,
    'Content-Type: text/plain; charset=utf-8',
    'Cache-Control: no-store',
    ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`),
    `Content-Length: ${Buffer.byteLength(body)}`,
    'Connection: close',
  ];
  return `${lines.join('\r\n')}\r\n\r\n${body}`;
}
