/**
 * The seam for endpoints the gateway answers itself (client autoconfig,
 * autodiscover, the Apple profile, MTA-STS, the TLS-RPT intake), generated
 * from the config, never from files. The router asks the registry after the
 * ACME challenge and before redirect, policy and proxy; a handler that
 * answers undefined lets the request go on.
 *
 * A handler is found by path (exact, or a prefix ending in `/`), and may be
 * limited to some host names (`autoconfig.example.org`: the Host header
 * without its port), to TLS listeners, and may compare its path without case
 * (Outlook asks for `/Autodiscover/Autodiscover.xml`). One that needs the
 * request body answers with a ReadBody: the connection reads at most `read`
 * bytes (a longer body is refused with 413) and hands them to `respond`;
 * those endpoints are routed after the connection's policy (router.ts).
 */
import type { LocalAnswer, RequestFacts } from './router.ts';

/** Read the request body (at most `read` bytes), then answer with `respond`. */
export interface ReadBody {
  readonly read: number;
  respond(body: Buffer): LocalAnswer;
}

export interface WellKnownHandler {
  /** Exact path (`/.well-known/mta-sts.txt`) or, ending in `/`, a prefix. Compared without the query string. */
  readonly path: string;
  /** Methods it answers; others go on to the backend. */
  readonly methods: readonly string[];
  /** Host names (lower case, no port) it answers for; every host when absent. */
  readonly hosts?: readonly string[];
  /** Only on TLS listeners: a plain listener lets the request go on (to its redirect). */
  readonly tlsOnly?: boolean;
  /** The path is compared without case (exact paths only). */
  readonly caseInsensitive?: boolean;
  handle(req: RequestFacts): LocalAnswer | ReadBody | undefined;
}

export function isReadBody(a: LocalAnswer | ReadBody): a is ReadBody {
  return 'read' in a;
}

export class WellKnownRegistry {
  private exact = new Map<string, WellKnownHandler[]>();
  /** Exact paths compared without case, by their lower-case form. */
  private folded = new Map<string, WellKnownHandler[]>();
  private prefixes: WellKnownHandler[] = [];
  private count = 0;

  /** Adds a handler; a second one for the same path and an overlapping set of hosts is a programming error. */
  register(handler: WellKnownHandler): void {
    const prefix = handler.path.endsWith('/');
    if (prefix && handler.caseInsensitive) throw new Error(`a prefix (${handler.path}) is always compared with case`);
    const key = handler.caseInsensitive ? handler.path.toLowerCase() : handler.path;
    const same = prefix ? this.prefixes.filter((h) => h.path === handler.path) : [...(this.exact.get(handler.path) ?? []), ...(this.folded.get(key) ?? [])];
    if (same.some((h) => overlaps(h.hosts, handler.hosts))) throw new Error(`a well-known handler for ${handler.path} is already registered`);
    if (prefix) this.prefixes.push(handler);
    else {
      const map = handler.caseInsensitive ? this.folded : this.exact;
      map.set(key, [...(map.get(key) ?? []), handler]);
    }
    this.count++;
  }

  /** Takes over another registry's handlers (a reload): listeners keep this object. */
  replaceWith(other: WellKnownRegistry): void {
    this.exact = other.exact;
    this.folded = other.folded;
    this.prefixes = other.prefixes;
    this.count = other.count;
  }

  get size(): number {
    return this.count;
  }

  /**
   * The handler for a request, if any: its path (no query string), method,
   * Host header (as sent; the port and a trailing dot are ignored) and
   * whether it came over TLS.
   */
  match(path: string, method: string, host?: string, tls = true): WellKnownHandler | undefined {
    // Most requests match no path: the Host header is read only when a candidate is limited to some hosts.
    let name: string | undefined | null = null;
    const fits = (h: WellKnownHandler) => {
      if (!h.methods.includes(method) || (h.tlsOnly && !tls)) return false;
      if (h.hosts === undefined) return true;
      if (name === null) name = host === undefined ? undefined : hostName(host);
      return name !== undefined && h.hosts.includes(name);
    };
    const hit = this.exact.get(path)?.find(fits) ?? (this.folded.size > 0 ? this.folded.get(path.toLowerCase())?.find(fits) : undefined);
    if (hit) return hit;
    for (const p of this.prefixes) if (path.startsWith(p.path) && fits(p)) return p;
    return undefined;
  }
}

/** The host name of a Host header: lower case, without the port, brackets or a trailing dot. */
export function hostName(host: string): string {
  let h = host.trim().toLowerCase();
  if (h.startsWith('[')) {
    const end = h.indexOf(']');
    return end < 0 ? h : h.slice(1, end);
  }
  const colon = h.indexOf(':');
  if (colon >= 0 && h.indexOf(':', colon + 1) < 0) h = h.slice(0, colon);
  return h.endsWith('.') ? h.slice(0, -1) : h;
}

function overlaps(a: readonly string[] | undefined, b: readonly string[] | undefined): boolean {
  if (a === undefined || b === undefined) return true;
  return a.some((x) => b.includes(x));
}
