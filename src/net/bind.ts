import { isIP, type Server } from 'node:net';
import { MailgateError } from '../core/errors.ts';
import { formatHostPort, type HostPort } from './address.ts';

/**
 * Binds a server and settles once: on 'listening', or on the 'error' that
 * races it (EADDRINUSE, EACCES), which becomes a coded error naming the address.
 * IPv6 wildcard sockets are v6-only so "0.0.0.0:993" and "[::]:993" can coexist.
 *
 * `shared`: the worker processes of one gateway each bind the same address
 * (SO_REUSEPORT; the kernel spreads new connections over them), each on its
 * own rather than through node:cluster's primary (`exclusive`).
 */
export function listenOn(server: Server, addr: HostPort, listenerName: string, shared = false): Promise<string> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => {
      server.off('listening', onListening);
      reject(new MailgateError('LISTEN_FAILED', `listener "${listenerName}" cannot bind ${formatHostPort(addr)}: ${err.message}`, { cause: err }));
    };
    const onListening = () => {
      server.off('error', onError);
      const a = server.address();
      resolve(a && typeof a === 'object' ? formatHostPort({ host: a.address, port: a.port }) : formatHostPort(addr));
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({
      host: addr.host,
      port: addr.port,
      ipv6Only: isIP(addr.host) === 6,
      backlog: 1024,
      ...(shared ? { reusePort: true, exclusive: true } : {}),
    });
  });
}

export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) {
      resolve();
      return;
    }
    // close() calls back once every connection has ended; listeners only stop accepting here.
    server.close();
    resolve();
  });
}
