/**
 * Opens a backend connection with a deadline and, where configured, the
 * PROXY protocol header first. The caller owns the returned socket.
 */
import { connect, type Socket } from 'node:net';
import { MailgateError } from '../core/errors.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';
import { proxyHeader, type ProxyEndpoints } from '../net/proxy-protocol.ts';

export interface ConnectOptions {
  timeoutMs: number;
  proxyProtocol: false | 'v1' | 'v2';
  /** The client this connection speaks for; omitted for the gateway's own probes. */
  endpoints?: ProxyEndpoints;
}

export function connectBackend(addr: HostPort, opts: ConnectOptions): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: addr.host, port: addr.port, noDelay: true });
    let settled = false;
    const settle = (err?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('error', onError);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        resolve(socket);
      }
    };
    const onConnect = () => {
      if (opts.proxyProtocol) socket.write(proxyHeader(opts.proxyProtocol, opts.endpoints ?? ownEndpoints(opts.proxyProtocol, socket)));
      settle();
    };
    const onError = (err: Error) =>
      settle(new MailgateError('BACKEND_CONNECT', `backend ${formatHostPort(addr)}: ${err.message}`, { cause: err }));
    const timer = setTimeout(
      () => settle(new MailgateError('BACKEND_TIMEOUT', `backend ${formatHostPort(addr)} did not accept within ${opts.timeoutMs} ms`)),
      opts.timeoutMs,
    );
    socket.once('connect', onConnect);
    socket.once('error', onError);
  });
}

/**
 * A connection of the gateway's own (a capability probe, a health check):
 * v2 says LOCAL; v1 names this connection's own two ends, because v1's
 * "PROXY UNKNOWN" is refused by some receivers (Postfix 3.7: "bad or missing
 * protocol type") although the spec allows it.
 */
function ownEndpoints(version: 'v1' | 'v2', socket: Socket): ProxyEndpoints | undefined {
  if (version === 'v2') return undefined;
  return { clientIp: socket.localAddress ?? '', clientPort: socket.localPort ?? 0, localIp: socket.remoteAddress ?? '', localPort: socket.remotePort ?? 0 };
}
