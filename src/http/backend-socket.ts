/**
 * A plain TCP connection to the HTTP backend for the fast path, with the
 * connect deadline the config names (backend_connect) and, optionally, bytes
 * written first (the PROXY protocol header for this client).
 */
import { createConnection, type Socket } from 'node:net';
import { MailgateError } from '../core/errors.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';

export function connectBackend(backend: HostPort, connectTimeoutMs: number, prelude?: Buffer): Socket {
  const socket = createConnection({ host: backend.host, port: backend.port, noDelay: true });
  const timer = setTimeout(() => {
    socket.destroy(new MailgateError('BACKEND_TIMEOUT', `backend ${formatHostPort(backend)} did not accept within ${connectTimeoutMs} ms`));
  }, connectTimeoutMs);
  const done = () => clearTimeout(timer);
  socket.once('connect', done);
  socket.once('close', done);
  // Queued until the connection is up, so it precedes the request line.
  if (prelude) socket.write(prelude);
  return socket;
}
