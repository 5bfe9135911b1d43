/**
 * The HTTP listener: https (or plain http) in front of a plaintext HTTP/1.1
 * backend. It accepts TCP connections and hands each to its parts:
 *
 *   accept → HttpConnection (registry, connection policy) → TLS (SNI, ALPN:
 *   h2 | http/1.1, ALPACA check, TLS-ALPN-01) → HTTP/2 (src/http/h2.ts) or
 *   the HTTP/1.1 fast path (src/http/fast-path.ts), both routing through
 *   src/http/router.ts; WebSocket handshakes and HTTP/2 streams are proxied by
 *   the library path (src/http/library-path.ts, http-proxy-3).
 *
 * Deadlines (all from the listener's config): tls_handshake; preauth_idle
 * for a request head and between requests; postauth_idle for silence while a
 * request or response moves, and for a WebSocket; response_timeout (or
 * postauth_idle when shorter) for the backend to begin its answer;
 * backend_connect for the TCP connect to the backend.
 */
import { createServer, type Server, type Socket } from 'node:net';
import type { Listener } from '../config/load.ts';
import { errorCode, errorMessage } from '../core/errors.ts';
import { HttpConnection, type HttpListener } from '../http/connection.ts';
import { FastPath } from '../http/fast-path.ts';
import { H2Front } from '../http/h2.ts';
import { LibraryPath } from '../http/library-path.ts';
import { Router, type ChallengeResponder } from '../http/router.ts';
import { WellKnownRegistry } from '../http/well-known.ts';
import { closeServer, listenOn } from '../net/bind.ts';
import { formatHostPort, normalizeIp } from '../net/address.ts';
import { ACME_TLS_ALPN } from '../tls/acme-alpn.ts';
import { ALPN_IDS, alpnSelector } from '../tls/options.ts';
import { acceptPeer, type Peer } from './proxied.ts';
import type { ListenerDeps, ListenerHandle } from './types.ts';

export type { HttpListener } from '../http/connection.ts';

const H2_ALPN = ['h2', ...ALPN_IDS.http];

export type HttpListenerHandle = ListenerHandle;

export interface HttpListenerDeps extends ListenerDeps {
  /**
   * ACME HTTP-01 answers for plain (tls: none) listeners, served under
   * /.well-known/acme-challenge/ before anything else; an unknown token is a
   * 404 on a redirect listener and goes to the backend on a proxying one.
   */
  acmeHttp01: ChallengeResponder;
  /** Endpoints the gateway answers itself under /.well-known/ (autoconfig, MTA-STS, …); empty by default. */
  wellKnown?: WellKnownRegistry;
}

export async function startHttpListener(listener: HttpListener, deps: HttpListenerDeps): Promise<ListenerHandle> {
  let current = listener;
  let closing = false;
  let closed: Promise<void> | undefined;
  const name = listener.name;
  const log = deps.log.child({ listener: name });
  const tls = listener.tls === 'implicit';
  const conns = new Set<HttpConnection>();

  const router = new Router({ hostname: deps.hostname, acmeHttp01: deps.acmeHttp01, wellKnown: deps.wellKnown ?? new WellKnownRegistry() });
  const library = new LibraryPath({ log, hostname: deps.hostname });
  const fastPathDeps = { router, hostname: deps.hostname, handoff: library.handoff.bind(library) };
  let h2: H2Front | undefined;
  const h2For = (settings: HttpListener): H2Front => {
    // One HTTP/2 front per stream limit: a reload that changes it applies to connections from then on.
    if (!h2 || h2Streams !== settings.http2_max_streams) {
      h2 = new H2Front({ router, library, maxStreams: settings.http2_max_streams });
      h2Streams = settings.http2_max_streams;
    }
    return h2;
  };
  let h2Streams = 0;

  const onConnection = (tcp: Socket) => {
    if (closing) {
      tcp.destroy();
      return;
    }
    const settings = current;
    if (deps.registry.countFor(name) >= settings.limits.max_connections) {
      const ip = normalizeIp(tcp.remoteAddress);
      log.warn({ client: ip }, 'connection limit reached, dropping');
      deps.registry.refused(name, ip, 'max_connections');
      tcp.destroy();
      return;
    }
    tcp.setNoDelay(true);
    acceptPeer(tcp, settings, deps, (peer) => serve(tcp, settings, peer));
  };

  const serve = (tcp: Socket, settings: HttpListener, peer: Peer) => {
    if (closing) {
      tcp.destroy();
      return;
    }
    const conn = new HttpConnection(
      tcp,
      settings,
      deps.registry.nextId(),
      {
        registry: deps.registry,
        policy: deps.policy(),
        log,
        listenerClosing: () => closing,
        onClosed: (c) => {
          conns.delete(c);
          if (closing && conns.size === 0) library.close();
        },
      },
      peer,
    );
    tcp.on('error', (err) => conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error'));
    conns.add(conn);
    conn.start();
    if (tls) startTls(conn, tcp, settings);
    else conn.attach(new FastPath(conn, tcp, fastPathDeps));
  };

  const startTls = (conn: HttpConnection, tcp: Socket, settings: HttpListener) => {
    const socket = deps.certs.accept(tcp, alpnSelector('http', settings.http2 ? H2_ALPN : ALPN_IDS.http));
    const timer = setTimeout(() => {
      conn.log.debug('TLS handshake timed out');
      conn.close('tls-handshake-timeout');
    }, settings.timeouts.tls_handshake);
    socket.on('error', (err) => {
      if (conn.record.tlsVersion === null) {
        clearTimeout(timer);
        conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'TLS handshake failed');
        conn.close('tls-handshake-failed');
      } else conn.log.debug({ err: errorMessage(err), code: errorCode(err) }, 'client socket error');
    });
    socket.once('secure', () => {
      clearTimeout(timer);
      if (conn.closed) {
        socket.destroy();
        return;
      }
      conn.secured(socket);
      const alpn = socket.alpnProtocol;
      if (alpn === ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the whole exchange (RFC 8737 §3), no HTTP follows.
        conn.log.info('ACME TLS-ALPN-01 validation handshake');
        conn.close('client-closed', '');
        return;
      }
      if (alpn === 'h2') h2For(conn.settings).serve(conn, socket);
      else conn.attach(new FastPath(conn, socket, fastPathDeps));
    });
  };

  const servers: Server[] = [];
  const addresses: string[] = [];
  try {
    for (const addr of listener.listen) {
      // Not half-open: a client's FIN ends its connection, as nginx takes it (a client that gave up waiting).
      const server = createServer({ noDelay: true }, onConnection);
      servers.push(server);
      addresses.push(await listenOn(server, addr, name, deps.sharedPorts === true));
      server.on('error', (err) => log.error({ err: errorMessage(err), code: errorCode(err) }, 'listener error'));
    }
  } catch (err) {
    // Undo a partial start, newest first, before the error goes up.
    closing = true;
    await Promise.all(servers.map(closeServer));
    library.close();
    throw err;
  }
  log.info({ protocol: 'http', tls: listener.tls, addresses, backend: formatHostPort(listener.backend), redirect: listener.redirect_https, http2: tls && listener.http2 }, 'listener up');

  return {
    name,
    addresses,
    update(next: Listener) {
      if (next.protocol !== 'http' || next.name !== name) {
        log.error({ protocol: next.protocol, name: next.name }, 'update ignored: not this HTTP listener');
        return;
      }
      if (next.tls !== listener.tls) log.warn({ tls: next.tls }, 'tls mode changes need a restart of the listener; keeping the old one');
      current = { ...next, tls: listener.tls };
    },
    close() {
      closed ??= (async () => {
        closing = true;
        await Promise.all(servers.map(closeServer));
        // As node:http's close() did: connections waiting for their next request end now, for 'shutdown'; a busy one
        // after its response; a WebSocket is left to the registry's drain.
        for (const c of [...conns]) if (c.requests > 0 || c.record.state === 'relaying') c.drain();
        if (conns.size === 0) library.close();
        log.info({ addresses }, 'listener closed');
      })();
      return closed;
    },
  };
}
