/**
 * Which ports the workers bind. Every worker binds every listener with
 * SO_REUSEPORT, so the primary settles the ports first:
 *
 * - a configured port 0 becomes one real port, the same in every worker;
 * - an address already in use by another program fails here, with the
 *   listener's name, before any worker starts. (A probe without
 *   SO_REUSEPORT is refused by any listening socket, including another
 *   mailgate's shared one: without it, two gateways started by mistake
 *   would silently split the traffic between them.)
 *
 * Listeners whose addresses did not change keep their ports across reloads:
 * the workers are still bound to them.
 */
import { createServer, isIP } from 'node:net';
import type { Config, Listener } from '../config/load.ts';
import { MailgateError } from '../core/errors.ts';
import { formatHostPort, type HostPort } from '../net/address.ts';
import type { PortPlan, WorkerPlan } from './messages.ts';

/** `previous`: the plan in force and the listeners it was made for (reload). */
export async function planPorts(listeners: readonly Listener[], previous?: { plan: PortPlan; listeners: readonly Listener[] }): Promise<PortPlan> {
  const plan: PortPlan = {};
  // Addresses our workers hold now: a reload may give one to another listener (they swap in the workers, which
  // close the old listener first), and a probe would only meet our own socket.
  const ours = new Set<string>();
  for (const l of previous?.listeners ?? []) l.listen.forEach((a, j) => ours.add(key({ host: a.host, port: previous?.plan[l.name]?.[j] ?? a.port })));
  for (const l of listeners) {
    const before = previous?.listeners.find((p) => p.name === l.name);
    const kept = previous?.plan[l.name];
    if (before && kept && sameAddresses(before, l)) {
      plan[l.name] = kept;
      continue;
    }
    const ports: number[] = [];
    for (const addr of l.listen) ports.push(ours.has(key(addr)) ? addr.port : await probe(addr, l.name));
    plan[l.name] = ports;
  }
  return plan;
}

/** The config a worker runs: the plan's ports, and its share of each listener's connection limit. */
export function workerConfig(config: Config, plan: WorkerPlan): Config {
  return {
    ...config,
    listeners: config.listeners.map(
      (l) =>
        ({
          ...l,
          listen: l.listen.map((a, j) => ({ ...a, port: plan.ports[l.name]?.[j] ?? a.port })),
          limits: { ...l.limits, max_connections: Math.ceil(l.limits.max_connections / plan.workers) },
        }) as Listener,
    ),
  };
}

function key(a: HostPort): string {
  return `${a.host}|${a.port}`;
}

function sameAddresses(a: Listener, b: Listener): boolean {
  return a.protocol === b.protocol && a.listen.length === b.listen.length && a.listen.every((x, i) => x.host === b.listen[i]?.host && x.port === b.listen[i]?.port);
}

/** Binds the address alone for a moment: its real port, or the error a worker would meet. */
function probe(addr: HostPort, listenerName: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', (err) =>
      reject(new MailgateError('LISTEN_FAILED', `listener "${listenerName}" cannot bind ${formatHostPort(addr)}: ${err.message}`, { cause: err })),
    );
    server.listen({ host: addr.host, port: addr.port, ipv6Only: isIP(addr.host) === 6, exclusive: true }, () => {
      const a = server.address();
      const port = a && typeof a === 'object' ? a.port : addr.port;
      server.close(() => resolve(port));
    });
  });
}
