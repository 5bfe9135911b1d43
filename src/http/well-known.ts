/**
 * The seam for endpoints the gateway answers itself under `/.well-known/`
 * (client autoconfig, autodiscover, MTA-STS: the next features), generated
 * from the config, never from files. The router asks the registry after the
 * ACME challenge and before redirect, policy and proxy; a handler that
 * answers undefined lets the request go on.
 */
import type { LocalAnswer, RequestFacts } from './router.ts';

export interface WellKnownHandler {
  /** Exact path (`/.well-known/mta-sts.txt`) or, ending in `/`, a prefix. Compared without the query string. */
  readonly path: string;
  /** Methods it answers; others go on to the backend. */
  readonly methods: readonly string[];
  handle(req: RequestFacts): LocalAnswer | undefined;
}

export class WellKnownRegistry {
  private readonly exact = new Map<string, WellKnownHandler>();
  private readonly prefixes: WellKnownHandler[] = [];

  /** Adds a handler; a second one for the same path is a programming error. */
  register(handler: WellKnownHandler): void {
    const taken = handler.path.endsWith('/') ? this.prefixes.some((h) => h.path === handler.path) : this.exact.has(handler.path);
    if (taken) throw new Error(`a well-known handler for ${handler.path} is already registered`);
    if (handler.path.endsWith('/')) this.prefixes.push(handler);
    else this.exact.set(handler.path, handler);
  }

  get size(): number {
    return this.exact.size + this.prefixes.length;
  }

  /** The handler for a request path (no query string), if any. */
  match(path: string, method: string): WellKnownHandler | undefined {
    const h = this.exact.get(path) ?? this.prefixes.find((p) => path.startsWith(p.path));
    return h && h.methods.includes(method) ? h : undefined;
  }
}
