/**
 * What happens to one request, whatever protocol carried it (HTTP/1.1 fast
 * path, HTTP/2, the proxy library): in this order
 *
 *   ACME HTTP-01 challenge → well-known endpoints → redirect to https →
 *   policy (the connection's verdict, then requests per window) → proxy.
 *
 * The router answers with a Route: a short local answer, a local answer that
 * needs the request body first ("read", for well-known endpoints that take a
 * POST: they are asked after the connection's policy, since they do work for
 * what a client sends), or "proxy". It never writes to a socket; each path
 * renders an answer in its own framing.
 */
import type { CloseReason } from '../protocols/types.ts';
import type { HttpConnection } from './connection.ts';
import { httpsRedirectLocation, logPath } from './headers.ts';
import { isReadBody, type WellKnownRegistry } from './well-known.ts';

/** The path ACME HTTP-01 validation requests use (RFC 8555 §8.3). */
export const ACME_CHALLENGE_PREFIX = '/.well-known/acme-challenge/';
const ACME_TOKEN = /^[A-Za-z0-9_-]{1,256}$/;

/** Answers an ACME HTTP-01 token with its key authorization, or undefined when the token is not ours. */
export type ChallengeResponder = (token: string) => string | undefined;

/** The request as the router sees it. */
export interface RequestFacts {
  method: string;
  /** Origin-form target (path and query), or `*`. */
  target: string;
  /** The Host header (or HTTP/2 :authority), as sent. */
  host: string | undefined;
}

/** A short answer of the gateway's own. */
export interface LocalAnswer {
  status: number;
  /** Text (UTF-8) or bytes. */
  body: string | Buffer;
  /** Default: text/plain; charset=utf-8. */
  contentType?: string;
  headers?: Record<string, string | number>;
  /** The connection ends after it (with this reason recorded if nothing more specific happens). */
  close?: CloseReason;
}

export type Route =
  | { kind: 'answer'; answer: LocalAnswer }
  /** Read the request body, at most `limit` bytes (more: 413), then answer with `respond(body)`. */
  | { kind: 'read'; limit: number; respond: (body: Buffer) => LocalAnswer }
  | { kind: 'proxy' };

export interface RouterDeps {
  /** The gateway's host name: where a redirect goes when the Host header is missing or implausible. */
  hostname: string;
  /** HTTP-01 answers from ACME (the running manager, or a worker's copy of the primary's tokens). */
  acmeHttp01: ChallengeResponder;
  wellKnown: WellKnownRegistry;
}

const PROXY: Route = { kind: 'proxy' };

export class Router {
  private readonly deps: RouterDeps;

  constructor(deps: RouterDeps) {
    this.deps = deps;
  }

  route(req: RequestFacts, conn: HttpConnection): Route {
    const settings = conn.settings;
    const plain = !conn.tls;
    const readOnly = req.method === 'GET' || req.method === 'HEAD';
    const path = pathOf(req.target);

    if (plain && readOnly && path.startsWith(ACME_CHALLENGE_PREFIX)) {
      const token = path.slice(ACME_CHALLENGE_PREFIX.length);
      const answer = ACME_TOKEN.test(token) ? this.deps.acmeHttp01(token) : undefined;
      if (answer !== undefined) return local({ status: 200, body: answer });
      if (settings.redirect_https) return local({ status: 404, body: 'Not Found\n' });
    }

    if (this.deps.wellKnown.size > 0) {
      const answer = this.deps.wellKnown.match(path, req.method, req.host, !plain)?.handle(req);
      if (answer && !isReadBody(answer)) return local(answer);
      if (answer) return this.refusal(req, conn) ?? { kind: 'read', limit: answer.read, respond: (body) => answer.respond(body) };
    }

    if (plain && settings.redirect_https) {
      const location = httpsRedirectLocation(req.host, req.target, this.deps.hostname);
      return local({ status: readOnly ? 301 : 308, body: `Moved to ${location}\n`, headers: { Location: location } });
    }

    return this.refusal(req, conn) ?? PROXY;
  }

  /** The policy's refusal of this request (the connection's verdict, then requests per window), if any. */
  private refusal(req: RequestFacts, conn: HttpConnection): Route | undefined {
    const verdict = conn.verdict;
    if (verdict.action === 'deny') return local({ status: 403, body: 'Forbidden\n', close: 'policy-denied' });
    if (verdict.action === 'tempfail') {
      return local({ status: 429, body: 'Too Many Requests\n', headers: { 'Retry-After': retryAfterSeconds(verdict.retryAfterMs) }, close: 'policy-tempfail' });
    }
    // Requests per window (policy rate_limits: http_requests), asked per request, not per connection.
    const perRequest = conn.requestVerdict(req.method, logPath(req.target));
    if (perRequest && perRequest.action === 'deny') return local({ status: 403, body: 'Forbidden\n' });
    if (perRequest && perRequest.action === 'tempfail') {
      return local({ status: 429, body: 'Too Many Requests\n', headers: { 'Retry-After': retryAfterSeconds(perRequest.retryAfterMs) } });
    }
    return undefined;
  }
}

function local(answer: LocalAnswer): Route {
  return { kind: 'answer', answer };
}

function pathOf(target: string): string {
  const q = target.indexOf('?');
  return q < 0 ? target : target.slice(0, q);
}

export function retryAfterSeconds(ms: number | undefined): number {
  return Math.max(1, Math.ceil((ms ?? 60_000) / 1000));
}
