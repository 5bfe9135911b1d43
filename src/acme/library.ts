/**
 * What mailgate uses of acme-client beyond its documented API, reached in
 * this one file and checked where it is reached: if a new acme-client moves
 * one of these, the gateway fails here with an ACME error that names what
 * moved (and tests/unit/acme/library.test.ts fails before that).
 *
 *  - the process-wide axios instance (`acme.axios`): its defaults (adapter,
 *    timeout, https agent) and the library's own retry setting
 *    (`defaults.acmeSettings.retryMaxAttempts`), and the node http adapter
 *    of the axios acme-client itself loads;
 *  - a client's `http` (directory, unsigned requests: ARI renewalInfo) and
 *    `api.apiRequest` (every signed request), which client.ts wraps;
 *  - createOrder with the `profile` and `replaces` fields its types lack.
 */
import type { Agent as HttpsAgent } from 'node:https';
import { createRequire } from 'node:module';
import acme from 'acme-client';
import type { Order } from 'acme-client';
import { MailgateError } from '../core/errors.ts';

export interface AxiosResponseLike {
  status: number;
  headers: Record<string, unknown>;
  data: unknown;
}

export interface AxiosConfigLike {
  url?: string;
  method?: string;
}

/** An axios adapter: one request, one response (or a rejection). */
export type Adapter = (config: AxiosConfigLike) => Promise<AxiosResponseLike>;

/** The defaults of acme-client's axios instance that mailgate sets. */
export interface AcmeHttpDefaults {
  adapter?: unknown;
  timeout?: number;
  httpsAgent?: HttpsAgent;
  /** acme-client's own retries (5 by default, sleeping Retry-After inside one request). */
  acmeSettings: { retryMaxAttempts: number; retryDefaultDelay: number };
}

/** A signed POST to the CA: acme-client's AcmeApi.apiRequest. */
export type ApiRequest = (url: string, payload?: unknown, validStatusCodes?: number[], opts?: object) => Promise<AxiosResponseLike>;

/** A client's HTTP side: the directory (cached) and unsigned requests. */
export interface ClientHttp {
  request(url: string, method: string, opts?: object): Promise<AxiosResponseLike>;
  getDirectory(): Promise<Directory>;
}

export interface Directory {
  newOrder?: string;
  renewalInfo?: string;
  meta?: { termsOfService?: string; profiles?: Record<string, unknown> };
  [key: string]: unknown;
}

function changed(what: string): MailgateError {
  return new MailgateError('ACME', `acme-client ${what} is not where mailgate expects it (has acme-client changed? see src/acme/library.ts)`);
}

/** acme-client's axios defaults, checked. */
export function acmeHttpDefaults(): AcmeHttpDefaults {
  const ax = acme.axios as unknown as { defaults?: Partial<AcmeHttpDefaults> };
  const defaults = ax.defaults;
  if (!defaults || typeof defaults.acmeSettings?.retryMaxAttempts !== 'number') throw changed('axios.defaults.acmeSettings.retryMaxAttempts');
  return defaults as AcmeHttpDefaults;
}

/** The node http adapter of the axios acme-client loads (its own dependency, not ours). */
export function acmeNodeHttpAdapter(): Adapter {
  const axiosOfAcme = createRequire(createRequire(import.meta.url).resolve('acme-client'))('axios') as { getAdapter?: (name: string) => unknown };
  const http = axiosOfAcme.getAdapter?.('http');
  if (typeof http !== 'function') throw changed("axios' http adapter");
  return http as Adapter;
}

/** A client's HTTP side, checked. */
export function clientHttp(client: acme.Client): ClientHttp {
  const http = (client as unknown as { http?: Partial<ClientHttp> }).http;
  if (typeof http?.request !== 'function' || typeof http.getDirectory !== 'function') throw changed('Client.http (request, getDirectory)');
  return http as ClientHttp;
}

/** Replaces a client's signed request with `wrap(original)`. */
export function wrapApiRequest(client: acme.Client, wrap: (original: ApiRequest) => ApiRequest): void {
  const api = (client as unknown as { api?: { apiRequest?: unknown } }).api;
  if (!api || typeof api.apiRequest !== 'function') throw changed('Client.api.apiRequest');
  const original = (api.apiRequest as ApiRequest).bind(api);
  api.apiRequest = wrap(original);
}

/** createOrder with fields acme-client passes on but does not type (RFC 9773 `replaces`, `profile`). */
export function createOrder(client: acme.Client, payload: { identifiers: { type: 'dns'; value: string }[]; profile?: string; replaces?: string }): Promise<Order> {
  return client.createOrder(payload as Parameters<acme.Client['createOrder']>[0]);
}
