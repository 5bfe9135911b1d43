/**
 * A mail listener: one TCP server per listen address, each accepted socket
 * handed to a MailSession with the settings in force at that moment.
 */
import { createServer, type Server, type Socket } from 'node:net';
import type { Listener } from '../config/load.ts';
import type { CapabilityCache } from '../backend/capabilities.ts';
import { closeServer, listenOn } from '../net/bind.ts';
import { normalizeIp } from '../net/address.ts';
import type { ProtocolModule } from '../protocols/types.ts';
import { MailSession } from '../session/mail-session.ts';
import { acceptPeer } from './proxied.ts';
import type { ListenerDeps, ListenerHandle } from './types.ts';

export async function startMailListener(
  initial: Listener,
  module: ProtocolModule,
  deps: ListenerDeps & { capabilities: CapabilityCache },
): Promise<ListenerHandle> {
  let current = initial;
  const servers: Server[] = [];
  const addresses: string[] = [];

  const onConnection = (socket: Socket) => {
    if (deps.registry.countFor(current.name) >= current.limits.max_connections) {
      deps.log.warn({ listener: current.name, client: normalizeIp(socket.remoteAddress) }, 'connection limit reached, dropping');
      deps.registry.refused(current.name, normalizeIp(socket.remoteAddress), 'max_connections');
      socket.destroy();
      return;
    }
    const settings = current;
    acceptPeer(socket, settings, deps, (peer) => {
      const session = new MailSession(
        socket,
        settings,
        {
          hostname: deps.hostname,
          certs: deps.certs,
          registry: deps.registry,
          policy: deps.policy(),
          log: deps.log,
          capabilities: deps.capabilities,
          module,
          ...(deps.pools ? { pools: deps.pools } : {}),
        },
        peer,
      );
      session.start();
    });
  };

  try {
    for (const addr of initial.listen) {
      const server = createServer({ noDelay: true, pauseOnConnect: false }, onConnection);
      server.on('error', (err) => deps.log.error({ listener: current.name, err: err.message }, 'listener error'));
      servers.push(server);
      addresses.push(await listenOn(server, addr, initial.name, deps.sharedPorts === true));
    }
  } catch (err) {
    // A partial start is undone before the error goes up.
    await Promise.all(servers.map(closeServer));
    throw err;
  }
  deps.log.info({ listener: initial.name, protocol: initial.protocol, tls: initial.tls, addresses, backend: `${initial.backend.host}:${initial.backend.port}` }, 'listener up');

  let closed = false;
  return {
    name: initial.name,
    addresses,
    update(next) {
      current = next;
    },
    async close() {
      if (closed) return;
      closed = true;
      await Promise.all(servers.map(closeServer));
    },
  };
}
