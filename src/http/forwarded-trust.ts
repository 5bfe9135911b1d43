/**
 * `trust_forwarded`: the proxies whose X-Forwarded-* headers the backend may
 * see. Decided once per connection, on the client address in force (the
 * PROXY header's client behind an L4 balancer, else the socket's peer).
 */
import type { Listener } from '../config/load.ts';
import { AddressSet } from '../net/cidr.ts';

const compiled = new WeakMap<object, AddressSet>();

export function trustsForwarded(listener: Listener & { protocol: 'http' }, clientIp: string): boolean {
  const list = listener.trust_forwarded;
  // Listeners built in code (tests, tools) may still say false.
  if (!Array.isArray(list) || list.length === 0) return false;
  let set = compiled.get(list);
  if (!set) {
    set = new AddressSet(list);
    compiled.set(list, set);
  }
  return set.has(clientIp);
}
