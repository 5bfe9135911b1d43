/**
 * Inbound PROXY protocol for a listener with `accept_proxy_from`: a
 * connection from an address outside the list is refused at once (a log line
 * and a `proxy-untrusted` refusal); one from inside must begin with a v1 or
 * v2 header within `timeouts.proxy_header` and V1_MAX / V2_MAX bytes, or it
 * is closed (`proxy-header`). The client the header names is, from then on,
 * the client everywhere: policy, bans, limits, logs, the dashboard, IMAP ID,
 * XCLIENT, X-Forwarded-For and the outbound PROXY header. Bytes after the
 * header stay in the socket for TLS or the protocol (unshift).
 *
 * Without `accept_proxy_from` the socket's own addresses are the client's.
 */
export type { Peer } from '../net/proxy-inbound.ts';
import type { Socket } from 'node:net';
import type { Listener } from '../config/load.ts';
import type { Logger } from '../core/log.ts';
import { AddressSet } from '../net/cidr.ts';
import { parseProxyHeader, socketPeer, V2_MAX, type Peer } from '../net/proxy-inbound.ts';
import type { SessionRegistry } from '../session/registry.ts';

/** The trusted balancers of each listener, compiled once per config (a reload brings new lists). */
const compiled = new WeakMap<readonly unknown[], AddressSet>();

function trustedOf(listener: Listener): AddressSet | undefined {
  const list = listener.accept_proxy_from;
  if (!list || list.length === 0) return undefined;
  let set = compiled.get(list);
  if (!set) {
    set = new AddressSet(list);
    compiled.set(list, set);
  }
  return set;
}

export interface ProxiedDeps {
  registry: SessionRegistry;
  log: Logger;
}

/**
 * Calls `then` with the connection's peer: at once without
 * `accept_proxy_from`, else once the header is read. A refused or failed
 * connection is destroyed here and `then` is never called.
 */
export function acceptPeer(socket: Socket, listener: Listener, deps: ProxiedDeps, then: (peer: Peer) => void): void {
  const direct = socketPeer(socket);
  const trusted = trustedOf(listener);
  if (!trusted) {
    then(direct);
    return;
  }
  if (!trusted.has(direct.clientIp)) {
    deps.log.warn({ listener: listener.name, client: direct.clientIp }, 'PROXY protocol: connection from an address outside accept_proxy_from refused');
    deps.registry.refused(listener.name, direct.clientIp, 'proxy-untrusted', 'not a trusted proxy');
    socket.destroy();
    return;
  }
  readHeader(socket, listener, deps, direct, then);
}

function readHeader(socket: Socket, listener: Listener, deps: ProxiedDeps, direct: Peer, then: (peer: Peer) => void): void {
  let buf: Buffer = Buffer.alloc(0);
  let done = false;
  const finish = () => {
    done = true;
    clearTimeout(timer);
    socket.off('readable', onReadable);
    socket.off('error', onError);
    socket.off('close', onClose);
  };
  const fail = (why: string) => {
    if (done) return;
    finish();
    deps.log.warn({ listener: listener.name, client: direct.clientIp, why }, 'PROXY protocol: no valid header from the proxy; connection closed');
    deps.registry.refused(listener.name, direct.clientIp, 'proxy-header', why);
    socket.destroy();
  };
  const onReadable = () => {
    if (done) return;
    let chunk: Buffer | null;
    while ((chunk = socket.read() as Buffer | null) !== null) {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const r = parseProxyHeader(buf);
      if (r.kind === 'more') {
        if (buf.length > V2_MAX) return fail('header too long');
        continue;
      }
      if (r.kind === 'invalid') return fail(r.why);
      finish();
      // The rest is the client's (a TLS ClientHello, a command): back into the socket, read by whoever comes next.
      const rest = buf.subarray(r.length);
      if (rest.length > 0) socket.unshift(rest);
      then(r.info.kind === 'proxied' ? { ...r.info.endpoints, via: direct.clientIp } : direct);
      return;
    }
  };
  const onError = (err: Error) => {
    if (done) return;
    finish();
    deps.log.debug({ listener: listener.name, client: direct.clientIp, err: err.message }, 'PROXY protocol: socket error before the header');
    socket.destroy();
  };
  const onClose = () => {
    if (done) return;
    finish();
    deps.log.debug({ listener: listener.name, client: direct.clientIp }, 'PROXY protocol: closed before the header');
  };
  const timer = setTimeout(() => fail(`no header within ${listener.timeouts.proxy_header} ms`), listener.timeouts.proxy_header);
  socket.on('readable', onReadable);
  socket.on('error', onError);
  socket.on('close', onClose);
}
